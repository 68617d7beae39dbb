//! The OS user that runs `initdb`, `postgres` and `pg_basebackup`.
//!
//! Postgres refuses to run as root ("root" execution of the PostgreSQL server is not permitted), so when we
//! are root the server tools run as another user: `$PGRELAY_OS_USER`, else `postgres` if it exists, else
//! `nobody`. Files we create for the server are handed to that user. When we are not root, everything runs
//! as the current user and no ownership changes are needed.
//! See <https://www.postgresql.org/docs/current/postgres-user.html>.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use super::ClusterError;

/// Environment variable naming the OS user to run Postgres as when we are root.
pub const OS_USER_ENV: &str = "PGRELAY_OS_USER";

/// A non-root OS user to switch to before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    /// Decides who runs the server tools: `None` means "the current user".
    pub fn for_postgres() -> Result<Option<OsUser>, ClusterError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        if let Ok(name) = std::env::var(OS_USER_ENV) {
            return match lookup(&name)? {
                Some(user) if user.uid == 0 => Err(ClusterError::OsUser {
                    user: name,
                    reason: "it is root, and postgres refuses to run as root".to_string(),
                }),
                Some(user) => Ok(Some(user)),
                None => Err(ClusterError::OsUser {
                    user: name,
                    reason: format!("no such user (from {OS_USER_ENV})"),
                }),
            };
        }
        for name in ["postgres", "nobody"] {
            if let Some(user) = lookup(name)? {
                return Ok(Some(user));
            }
        }
        Err(ClusterError::OsUser {
            user: "postgres".to_string(),
            reason: format!(
                "running as root and neither `postgres` nor `nobody` exists; create one or set {OS_USER_ENV}"
            ),
        })
    }

    /// Makes `cmd` run as this user (std also drops supplementary groups when uid is set).
    pub fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid);
    }
}

/// Looks a user up in the passwd database.
fn lookup(name: &str) -> Result<Option<OsUser>, ClusterError> {
    let c_name = CString::new(name).map_err(|_| ClusterError::OsUser {
        user: name.to_string(),
        reason: "name contains a NUL byte".to_string(),
    })?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; all-zero is a valid (empty) value that getpwnam_r overwrites.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and buf's length is passed along.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 {
        return Err(ClusterError::OsUser {
            user: name.to_string(),
            reason: format!(
                "getpwnam_r failed: {}",
                std::io::Error::from_raw_os_error(rc)
            ),
        });
    }
    if result.is_null() {
        return Ok(None);
    }
    Ok(Some(OsUser {
        name: name.to_string(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    }))
}

/// Gives `path` and everything below it to `user` (no-op for `None`). Symlinks are not followed.
pub fn chown_recursive(path: &Path, user: Option<&OsUser>) -> Result<(), ClusterError> {
    let Some(user) = user else {
        return Ok(());
    };
    let io_err = |source| ClusterError::Io {
        what: format!("chown {} to {}", path.display(), user.name),
        source,
    };
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)).map_err(io_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            chown_recursive(&entry.path(), Some(user))?;
        }
    }
    Ok(())
}

/// Writes a file that the server must be able to read (or, for the log, write) and hands it to `user`.
pub fn write_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    user: Option<&OsUser>,
) -> Result<(), ClusterError> {
    let io_err = |source| ClusterError::Io {
        what: format!("write {}", path.display()),
        source,
    };
    std::fs::write(path, contents).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    chown_recursive(path, user)
}

/// Checks that `user` can reach `dir`: every ancestor must be searchable by it, otherwise Postgres fails
/// later with a far less obvious "permission denied" in its log.
pub fn check_traversable(dir: &Path, user: Option<&OsUser>) -> Result<(), ClusterError> {
    let Some(user) = user else {
        return Ok(());
    };
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.mode();
        let searchable = if meta.uid() == user.uid {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !searchable {
            return Err(ClusterError::OsUser {
                user: user.name.clone(),
                reason: format!(
                    "it cannot enter {} (mode {:o}); put the cluster dir somewhere world-searchable such as /tmp",
                    ancestor.display(),
                    mode & 0o7777
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_user_exists() {
        let root = lookup("root").ok().flatten();
        assert_eq!(root.map(|u| u.uid), Some(0));
    }

    #[test]
    fn unknown_user_is_none() {
        assert!(matches!(lookup("pgrelay-no-such-user-xyz"), Ok(None)));
    }

    #[test]
    fn nul_in_name_is_an_error() {
        assert!(lookup("a\0b").is_err());
    }
}
