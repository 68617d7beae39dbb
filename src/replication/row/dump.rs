//! The schema part of a bootstrap: `pg_dump --schema-only` of the leader database in the
//! slot's snapshot, restored on the follower with `psql --single-transaction`.
//! <https://www.postgresql.org/docs/current/app-pgdump.html>
//!
//! Both programs get the node and database as one quoted connection string
//! ([`crate::protocol::conninfo`]), never as bare names: a leader database may be named
//! `host=elsewhere ...`, and the programs carry the replication user's password. The dump goes
//! through a file that pgrelay creates itself (`O_EXCL`, mode 0600) in a fresh directory of
//! random name and mode 0700 under the temporary directory, so nobody else can read it or make
//! pgrelay write somewhere else through a name prepared in advance. The programs only get the
//! open file as their stdout or stdin, so they need no access to the path themselves (they
//! would not, were they ever run as another OS user).

use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::config::{Config, NodeConfig};
use crate::protocol::conninfo;

use super::RowError;

/// Where `pg_dump` and `psql` are.
fn tool(config: &Config, name: &str) -> PathBuf {
    let dir = config
        .replication
        .pg_bin_dir
        .clone()
        .or_else(|| crate::cluster::find_pg_bin().ok());
    match dir {
        Some(d) if d.join(name).is_file() => d.join(name),
        _ => PathBuf::from(name),
    }
}

/// What the schema copy needs to know.
pub(super) struct SchemaCopy<'a> {
    pub config: &'a Config,
    pub follower: &'a NodeConfig,
    pub follower_name: &'a str,
    pub database: &'a str,
    pub snapshot: &'a str,
}

impl SchemaCopy<'_> {
    /// Dumps the leader's schema as of the snapshot and restores it on the follower, in one
    /// follower transaction.
    pub async fn run(&self) -> Result<(), RowError> {
        let user = &self.config.replication.user;
        let password = self
            .config
            .user(user)
            .map(|u| u.password.expose().to_owned())
            .unwrap_or_default();
        let leader = self.connection(self.config.leader())?;
        let follower = self.connection(self.follower)?;
        let dump = PrivateFile::create(&std::env::temp_dir()).map_err(|e| {
            RowError::Setup(format!(
                "creating the schema dump file under {}: {e}",
                std::env::temp_dir().display()
            ))
        })?;
        let snapshot = format!("--snapshot={}", self.snapshot);
        let out = self
            .run_tool(
                "pg_dump",
                &[
                    "--schema-only",
                    "--no-publications",
                    "--no-subscriptions",
                    "--exclude-schema",
                    "pgrelay",
                    &snapshot,
                    "-d",
                    &leader,
                ],
                Stdio::null(),
                dump.writer().map_err(|e| dump.error(e))?.into(),
                &password,
            )
            .await?;
        if !out.status.success() {
            return Err(RowError::Leader(format!(
                "pg_dump of the schema failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let out = self
            .run_tool(
                "psql",
                &[
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "--single-transaction",
                    "-d",
                    &follower,
                ],
                dump.reader().map_err(|e| dump.error(e))?.into(),
                Stdio::piped(),
                &password,
            )
            .await?;
        if !out.status.success() {
            return Err(RowError::Follower(format!(
                "restoring the schema on follower \"{}\" failed: {}",
                self.follower_name,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The connection string of this database on `node`, as the replication user.
    fn connection(&self, node: &NodeConfig) -> Result<String, RowError> {
        conninfo::database(
            &node.host,
            node.port,
            &self.config.replication.user,
            self.database,
        )
        .map_err(|e| RowError::Setup(format!("cannot run pg_dump and psql: {e}")))
    }

    /// Runs `pg_dump` or `psql` with `args` and the given stdin and stdout.
    async fn run_tool(
        &self,
        name: &str,
        args: &[&str],
        stdin: Stdio,
        stdout: Stdio,
        password: &str,
    ) -> Result<std::process::Output, RowError> {
        Command::new(tool(self.config, name))
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGOPTIONS", "-c client_min_messages=warning")
            .kill_on_drop(true)
            // Not `output()`: it would pipe stdout, and pg_dump's must go to the file.
            .spawn()
            .map_err(|e| {
                RowError::Setup(format!(
                    "cannot run {name}: {e} (set replication.pg_bin_dir)"
                ))
            })?
            .wait_with_output()
            .await
            .map_err(|e| RowError::Setup(format!("waiting for {name}: {e}")))
    }
}

/// A file only pgrelay's OS user can reach: created new (`O_EXCL`, mode 0600) in a directory
/// of random name and mode 0700. Dropping it removes both.
pub(super) struct PrivateFile {
    dir: tempfile::TempDir,
}

impl PrivateFile {
    const NAME: &'static str = "schema.sql";

    /// A new empty private file under `root`.
    pub fn create(root: &Path) -> std::io::Result<PrivateFile> {
        // mkdir(2) of a new random name (tried again under another if it exists), mode 0700.
        let dir = tempfile::Builder::new()
            .prefix("pgrelay-bootstrap-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(root)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.path().join(Self::NAME))?;
        Ok(PrivateFile { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join(Self::NAME)
    }

    /// The file, opened for writing from the start (it is empty until written).
    fn writer(&self) -> std::io::Result<File> {
        std::fs::OpenOptions::new().write(true).open(self.path())
    }

    fn reader(&self) -> std::io::Result<File> {
        File::open(self.path())
    }

    fn error(&self, e: std::io::Error) -> RowError {
        RowError::Setup(format!("opening {}: {e}", self.path().display()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_new_and_only_ours() {
        let root = tempfile::tempdir().unwrap();
        let a = PrivateFile::create(root.path()).unwrap();
        let b = PrivateFile::create(root.path()).unwrap();
        let dir = a.path().parent().unwrap().to_path_buf();
        assert_ne!(
            Some(dir.as_path()),
            b.path().parent(),
            "names are not predictable"
        );
        assert_eq!(dir.parent(), Some(root.path()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&a.path()), 0o600);
        std::fs::write(a.path(), "x").unwrap();
        drop(a);
        assert!(!dir.exists(), "removed with the file");
    }
}
