//! Running the one-shot Postgres programs: `initdb`, `pg_basebackup` and `psql`.
//!
//! Server-side tools run as the Postgres OS user (they write into the data directory); `psql` is a plain
//! client and runs as whoever we are. Failures carry the tail of the program's stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::binaries::client_tool;
use super::os_user::OsUser;
use super::{spawner, ClusterError};
use crate::protocol::conninfo;

/// Libpq and server variables from the caller's environment that could point our tools somewhere else.
const INHERITED_PG_VARS: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGDATA",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGPASSFILE",
    "PGPASSWORD",
    "PGSSLMODE",
    "PGTARGETSESSIONATTRS",
];

/// How many lines of stderr or log an error message carries.
pub(crate) const TAIL_LINES: usize = 25;

/// A command with a scrubbed libpq environment.
pub(crate) fn base_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in INHERITED_PG_VARS {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs a server-side tool (initdb, pg_basebackup) as `user` from `cwd` and waits for it.
///
/// `cwd` must be reachable by `user`: initdb complains when it cannot return to its working directory.
pub(crate) fn run_server_tool(
    bin_dir: &Path,
    program: &str,
    args: &[String],
    envs: &[(&str, &str)],
    cwd: &Path,
    user: Option<&OsUser>,
) -> Result<String, ClusterError> {
    let path = bin_dir.join(program);
    let mut cmd = base_command(&path);
    cmd.args(args)
        .envs(envs.iter().copied())
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(user) = user {
        user.apply(&mut cmd);
    }
    let described = describe(program, args);
    tracing::debug!(command = %described, "running postgres tool");
    // Through the spawner so that a long pg_basebackup also dies with us.
    let child = spawner::spawn(cmd).map_err(|source| ClusterError::Io {
        what: format!("start {}", path.display()),
        source,
    })?;
    let output = child
        .wait_with_output()
        .map_err(|source| ClusterError::Io {
            what: format!("wait for {program}"),
            source,
        })?;
    if !output.status.success() {
        return Err(ClusterError::Command {
            command: described,
            status: output.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&output.stderr), TAIL_LINES),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Connection details for `psql`.
#[derive(Debug, Clone)]
pub(crate) struct PsqlTarget<'a> {
    pub bin_dir: &'a Path,
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
}

/// Runs one SQL string through `psql -Atc` and returns its trimmed output.
pub(crate) fn psql(target: &PsqlTarget<'_>, sql: &str) -> Result<String, ClusterError> {
    let program: PathBuf = client_tool(target.bin_dir, "psql");
    let port = target.port;
    let conninfo = conninfo::database(target.host, port, target.user, "postgres")?;
    let args = [
        "-X", // ignore ~/.psqlrc
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        &conninfo,
        "-Atc",
        sql,
    ];
    let output = base_command(&program)
        .args(args)
        .env("PGPASSWORD", target.password)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .map_err(|source| ClusterError::Io {
            what: format!("run {}", program.display()),
            source,
        })?;
    if !output.status.success() {
        return Err(ClusterError::Command {
            command: format!("psql -p {port} -c {sql:?}"),
            status: output.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&output.stderr), TAIL_LINES),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all.get(start..).unwrap_or_default().join("\n")
}

/// The last lines of a file, or a note saying why there are none (for error messages).
pub(crate) fn file_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), TAIL_LINES),
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

fn describe(program: &str, args: &[String]) -> String {
    // Arguments hold no secrets (passwords go through files or the environment), so they may be shown.
    std::iter::once(program.to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
