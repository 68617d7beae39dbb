//! Leaving nothing behind: per-test directories, removal of leftovers from dead runs, and stopping
//! clusters kept in `static`s (which are never dropped) when the process exits.
//!
//! The parent-death signal (see [`super::spawner`]) already stops servers when we die abruptly; this module
//! handles what a signal cannot: directories on disk, and an orderly shutdown on a normal exit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, PoisonError, TryLockError};

use super::node::recorded_postmaster_pid;
use super::LocalCluster;

/// Common parent of test cluster directories, under the system temp dir.
const TEST_ROOT: &str = "pgrelay-tests";

static NEXT_TEST_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh path `<tmp>/pgrelay-tests/<prefix>-<pid>-<n>` (not yet created) for one test cluster.
///
/// Siblings left by processes that no longer exist (killed runs never get to clean up) are removed first,
/// unless a server still runs in them.
pub fn test_dir(prefix: &str) -> PathBuf {
    let root = std::env::temp_dir().join(TEST_ROOT);
    if std::fs::create_dir_all(&root).is_ok() {
        remove_stale_test_dirs(&root);
    }
    let n = NEXT_TEST_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = root.join(format!("{prefix}-{}-{n}", std::process::id()));
    // A leftover with our own pid can only come from a recycled pid: it is stale too.
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn remove_stale_test_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = owner_pid(&name) else {
            continue;
        };
        if process_alive(owner) {
            continue;
        }
        let dir = entry.path();
        // Our own servers die with their owner (parent-death signal); a server still running here was
        // handed to some other live process, so the directory is not ours to delete.
        if has_live_server(&dir) {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(dir = %dir.display(), "removed stale test cluster dir"),
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "could not remove stale test cluster dir")
            }
        }
    }
}

/// The owning pid encoded in a test dir name `<prefix>-<pid>-<n>` (the prefix may contain dashes).
pub(crate) fn owner_pid(name: &str) -> Option<libc::pid_t> {
    let mut parts = name.rsplitn(3, '-');
    let n = parts.next()?;
    let pid = parts.next()?;
    let _prefix = parts.next()?;
    n.parse::<usize>().ok()?;
    pid.parse::<libc::pid_t>().ok().filter(|p| *p > 0)
}

/// Whether any node directory below `cluster_dir` has a running postmaster.
fn has_live_server(cluster_dir: &Path) -> bool {
    std::fs::read_dir(cluster_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|entry| live_postmaster(&entry.path()).is_some())
        })
        .unwrap_or(false)
}

/// The pid of a postgres that is still running from `data_dir`, judged by its `postmaster.pid`.
pub(crate) fn live_postmaster(data_dir: &Path) -> Option<libc::pid_t> {
    let pid = recorded_postmaster_pid(data_dir)?;
    if !process_alive(pid) {
        return None;
    }
    // The pid may have been recycled by an unrelated program after a crash.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    (comm == "postgres" || comm == "postmaster").then_some(pid)
}

pub(crate) fn process_alive(pid: libc::pid_t) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

type SharedCluster = &'static Mutex<Option<LocalCluster>>;

static AT_EXIT: Mutex<Vec<SharedCluster>> = Mutex::new(Vec::new());
static REGISTER_HOOK: Once = Once::new();

/// Shuts the cluster in `cluster` down when the process exits normally, for test harnesses that keep one
/// shared cluster in a `static` (statics are never dropped).
///
/// Rust test binaries return from `main` (or call `exit`) even when tests fail, so `atexit` handlers run;
/// the directory is removed if the cluster was started with `remove_dir_on_drop`. Registering the same
/// static twice is harmless.
pub fn stop_at_exit(cluster: SharedCluster) {
    {
        let mut registered = AT_EXIT.lock().unwrap_or_else(PoisonError::into_inner);
        if !registered.iter().any(|c| std::ptr::eq(*c, cluster)) {
            registered.push(cluster);
        }
    }
    REGISTER_HOOK.call_once(|| {
        // SAFETY: run_at_exit is an `extern "C" fn()` that never unwinds.
        let rc = unsafe { libc::atexit(run_at_exit) };
        if rc != 0 {
            tracing::warn!("could not register atexit hook; clusters in statics rely on the parent-death signal");
        }
    });
}

extern "C" fn run_at_exit() {
    // Unwinding out of an extern "C" fn aborts; keep any panic inside.
    let _ = std::panic::catch_unwind(|| {
        let registered = match AT_EXIT.try_lock() {
            Ok(guard) => guard.clone(),
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().clone(),
            Err(TryLockError::WouldBlock) => return,
        };
        for shared in registered {
            // A thread still holding the lock while we exit would deadlock us: skip, the servers still
            // die by the parent-death signal.
            let taken = match shared.try_lock() {
                Ok(mut guard) => guard.take(),
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().take(),
                Err(TryLockError::WouldBlock) => None,
            };
            drop(taken);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner_pid_from_dir_name() {
        assert_eq!(owner_pid("cluster-1234-0"), Some(1234));
        assert_eq!(owner_pid("my-test-77-12"), Some(77));
        assert_eq!(owner_pid("1234-0"), None);
        assert_eq!(owner_pid("cluster-abc-0"), None);
        assert_eq!(owner_pid("cluster-12-x"), None);
    }

    #[test]
    fn own_process_is_alive() {
        let me = libc::pid_t::try_from(std::process::id()).unwrap_or_default();
        assert!(process_alive(me));
        assert!(!process_alive(0));
    }

    #[test]
    fn test_dirs_are_unique_and_under_root() {
        let a = test_dir("unit");
        let b = test_dir("unit");
        assert_ne!(a, b);
        assert!(a.starts_with(std::env::temp_dir().join(TEST_ROOT)));
        assert_eq!(
            owner_pid(&a.file_name().unwrap_or_default().to_string_lossy()),
            libc::pid_t::try_from(std::process::id()).ok()
        );
    }

    #[test]
    fn stale_test_dirs_are_removed() {
        let root = std::env::temp_dir().join(TEST_ROOT);
        std::fs::create_dir_all(&root).unwrap_or_default();
        // pid_max is at most 2^22, so this pid cannot be alive.
        let stale = root.join("unit-99999999-0");
        std::fs::create_dir_all(stale.join("leader")).unwrap_or_default();
        let _fresh = test_dir("unit");
        assert!(!stale.exists());
    }
}
