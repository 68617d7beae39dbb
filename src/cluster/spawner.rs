//! One long-lived thread that forks every Postgres child process.
//!
//! Each child asks the kernel for `PR_SET_PDEATHSIG` (see `prctl(2)`) so that it receives `SIGQUIT`
//! (Postgres's "immediate shutdown") when we die, even by `kill -9`. The catch: the parent-death signal
//! fires when the *thread* that forked the child exits, not when the process does. Test harnesses run each
//! test on its own short-lived thread, so a server forked from a test thread would be killed as soon as that
//! test finished, while other tests still share the cluster. Forking from a dedicated thread that lives
//! until the process exits ties the servers' lifetime to the process instead.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, OnceLock, PoisonError};

struct SpawnRequest {
    command: Command,
    reply: Sender<io::Result<Child>>,
}

static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();

/// Spawns `command` from the spawner thread, with the parent-death signal armed.
///
/// Whatever the command sets (uid/gid, process group, stdio) is kept; the pre-exec hook added here runs
/// after std has switched uid, which matters because a credential change clears the parent-death signal.
pub fn spawn(mut command: Command) -> io::Result<Child> {
    let parent = std::process::id();
    // SAFETY: the hook only makes async-signal-safe syscalls (prctl, getppid) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If we died between fork and prctl the signal will never come: give up instead of lingering.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }

    let sender = spawner()?;
    let (reply, answer) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("postgres spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("postgres spawner thread dropped the request"))?
}

fn spawner() -> io::Result<&'static Mutex<Sender<SpawnRequest>>> {
    if let Some(sender) = SPAWNER.get() {
        return Ok(sender);
    }
    // Two threads may race here; the loser's thread just sees its channel close and exits, which is
    // harmless because it never forked anything.
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    std::thread::Builder::new()
        .name("pgrelay-pg-spawner".to_string())
        .spawn(move || serve(rx))?;
    Ok(SPAWNER.get_or_init(|| Mutex::new(tx)))
}

fn serve(requests: Receiver<SpawnRequest>) {
    // The sender lives in a static, so this loop only ends when the process does.
    while let Ok(SpawnRequest { mut command, reply }) = requests.recv() {
        let result = command.spawn();
        // Nobody owns this child any more and our thread outlives it, so reap it here.
        if let Err(mpsc::SendError(Ok(mut child))) = reply.send(result) {
            tracing::warn!(
                pid = child.id(),
                "spawn requester went away; killing its child"
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
