//! Local cluster launcher: starts a leader and followers from the installed PostgreSQL binaries, on free
//! loopback ports, in a directory of the caller's choice; used by `pgrelay demo` and the integration tests.
//!
//! Everything here is blocking and std-only. Servers never outlive their owner: they are children of this
//! process, stopped on [`LocalCluster::shutdown`] / drop, and killed by the kernel if we die (see
//! [`spawner`] for the parent-death signal and why one thread forks them all).
//! Followers are either physical streaming standbys
//! (<https://www.postgresql.org/docs/current/warm-standby.html#STREAMING-REPLICATION>) or empty writable
//! servers that pgrelay's own replication modes fill.
//!
//! # Layout
//! - [`binaries`]: where `initdb`, `postgres` and friends are installed.
//! - [`os_user`]: which OS user runs them when we are root, and handing files to it.
//! - [`spawner`]: the one thread that forks servers, arming the parent-death signal.
//! - `tools`: one-shot programs (`initdb`, `pg_basebackup`, `psql`).
//! - `node`: one server: data directory, settings, start, readiness, stop.
//! - [`cleanup`]: test directories, stale leftovers and shutdown at process exit.

pub mod binaries;
pub mod cleanup;
mod node;
pub mod os_user;
pub mod spawner;
mod tools;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use binaries::find_pg_bin;
pub use cleanup::{stop_at_exit, test_dir};

use node::{Node, NodeEnv};
use os_user::{check_traversable, chown_recursive, OsUser};

/// What went wrong while starting, querying or stopping a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries found (looked at {searched}); install them with \
         `apt-get install -y postgresql` (Debian/Ubuntu) or set PGRELAY_PG_BIN to the directory containing initdb"
    )]
    NoPgBinaries { searched: String },
    #[error("cannot run postgres as OS user `{user}`: {reason}")]
    OsUser { user: String, reason: String },
    #[error(transparent)]
    ConnInfo(#[from] crate::protocol::conninfo::ConnInfoError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}); stderr:\n{stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("postgres for node {node} exited during startup ({status}); server.log ends with:\n{log_tail}")]
    ServerExited {
        node: String,
        status: String,
        log_tail: String,
    },
    #[error("node {node} did not {what} within {after:?}; server.log ends with:\n{log_tail}")]
    Timeout {
        node: String,
        what: String,
        after: Duration,
        log_tail: String,
    },
    #[error(
        "{dir} is in use by a running postgres (pid {pid}); stop it or choose another directory"
    )]
    InUse { dir: PathBuf, pid: i32 },
    #[error("no node named `{0}` in this cluster")]
    UnknownNode(String),
}

/// How to build a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The cluster lives in `dir/leader`, `dir/follower1`, ...; created if missing. Existing node
    /// directories from an earlier, no longer running cluster are wiped.
    pub dir: PathBuf,
    pub followers: usize,
    /// Role created by initdb; also used for replication.
    pub superuser: String,
    /// Its password (SCRAM-SHA-256 for every TCP connection).
    pub password: String,
    pub follower_kind: FollowerKind,
    /// Extra `postgresql.conf` settings for every node, as raw values (quoted for you); they win over ours.
    pub extra_conf: Vec<(String, String)>,
    /// Delete `dir` after stopping the servers (tests: yes; the demo keeps it for inspection).
    pub remove_dir_on_drop: bool,
}

impl ClusterOptions {
    /// Two standby followers, superuser and password `pgrelay`, keep the directory.
    pub fn new(dir: impl Into<PathBuf>) -> ClusterOptions {
        ClusterOptions {
            dir: dir.into(),
            followers: 2,
            superuser: "pgrelay".to_string(),
            password: "pgrelay".to_string(),
            follower_kind: FollowerKind::Standby,
            extra_conf: Vec::new(),
            remove_dir_on_drop: false,
        }
    }
}

/// How followers get their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowerKind {
    /// `pg_basebackup -R`: a read-only hot standby fed by Postgres streaming replication.
    Standby,
    /// Its own `initdb`: an ordinary writable server that pgrelay's row/statement modes fill.
    Empty,
}

/// Where a node listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Always "127.0.0.1".
    pub host: String,
    pub port: u16,
    pub data_dir: PathBuf,
}

/// A running leader and its followers; stopped (and optionally deleted) on drop.
#[derive(Debug)]
pub struct LocalCluster {
    env: NodeEnv,
    leader: Node,
    followers: Vec<Node>,
    follower_infos: Vec<NodeInfo>,
    remove_dir_on_drop: bool,
    shut_down: bool,
}

impl LocalCluster {
    /// Creates and starts the leader, then the followers (in parallel), and waits until every node
    /// accepts connections and every standby streams.
    pub fn start(opts: ClusterOptions) -> Result<LocalCluster, ClusterError> {
        let started = Instant::now();
        let bin_dir = find_pg_bin()?;
        let os_user = OsUser::for_postgres()?;
        prepare_dir(&opts.dir, os_user.as_ref())?;
        let env = NodeEnv {
            bin_dir,
            cluster_dir: opts.dir.clone(),
            os_user,
            superuser: opts.superuser.clone(),
            password: opts.password.clone(),
            extra_conf: opts.extra_conf.clone(),
        };
        tracing::info!(dir = %opts.dir.display(), bin_dir = %env.bin_dir.display(), followers = opts.followers, "starting local cluster");

        let leader = match Node::create_primary(&env, "leader") {
            Ok(leader) => leader,
            Err(err) => {
                if opts.remove_dir_on_drop {
                    let _ = std::fs::remove_dir_all(&opts.dir);
                }
                return Err(err);
            }
        };
        // From here on, drop (on any error) stops what already runs.
        let mut cluster = LocalCluster {
            env,
            leader,
            followers: Vec::new(),
            follower_infos: Vec::new(),
            remove_dir_on_drop: opts.remove_dir_on_drop,
            shut_down: false,
        };

        let env = &cluster.env;
        let leader_info = &cluster.leader.info;
        let results: Vec<Result<Node, ClusterError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (1..=opts.followers)
                .map(|i| {
                    let name = format!("follower{i}");
                    scope.spawn(move || match opts.follower_kind {
                        FollowerKind::Standby => Node::create_standby(env, &name, leader_info),
                        FollowerKind::Empty => Node::create_primary(env, &name),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ClusterError::Io {
                            what: "create follower".to_string(),
                            source: std::io::Error::other("follower thread panicked"),
                        })
                    })
                })
                .collect()
        });
        let mut first_error = None;
        for result in results {
            match result {
                Ok(node) => {
                    cluster.follower_infos.push(node.info.clone());
                    cluster.followers.push(node);
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        if let Some(err) = first_error {
            return Err(err);
        }
        tracing::info!(elapsed = ?started.elapsed(), leader_port = cluster.leader.info.port, "local cluster ready");
        Ok(cluster)
    }

    pub fn leader(&self) -> &NodeInfo {
        &self.leader.info
    }

    pub fn followers(&self) -> &[NodeInfo] {
        &self.follower_infos
    }

    /// The directory holding the Postgres binaries in use (`psql`, `pgbench` usually live there too).
    pub fn bin_dir(&self) -> &Path {
        &self.env.bin_dir
    }

    pub fn dir(&self) -> &Path {
        &self.env.cluster_dir
    }

    pub fn superuser(&self) -> &str {
        &self.env.superuser
    }

    pub fn password(&self) -> &str {
        &self.env.password
    }

    /// A libpq connection string for `node` as the superuser, e.g. for `tokio_postgres::connect`.
    pub fn conn_string(&self, node: &NodeInfo, dbname: &str) -> String {
        format!(
            "host={} port={} user={} password={} dbname={}",
            node.host, node.port, self.env.superuser, self.env.password, dbname
        )
    }

    /// Runs SQL on `node` with `psql -Atc` as the superuser and returns the trimmed output.
    pub fn psql(&self, node: &NodeInfo, sql: &str) -> Result<String, ClusterError> {
        tools::psql(&self.env.psql_target(node), sql)
    }

    /// Changes a setting on a running node (`ALTER SYSTEM`, then a configuration reload), e.g.
    /// `recovery_min_apply_delay` to make a standby lag on purpose.
    pub fn set_setting(&self, name: &str, key: &str, value: &str) -> Result<(), ClusterError> {
        let info = self.node(name)?.info.clone();
        let value = value.replace('\'', "''");
        self.psql(&info, &format!("ALTER SYSTEM SET {key} = '{value}'"))?;
        self.psql(&info, "SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// Whether `name`'s postmaster is currently running (as far as this cluster knows).
    pub fn is_running(&self, name: &str) -> Result<bool, ClusterError> {
        Ok(self.node(name)?.is_running())
    }

    /// Fast shutdown of one node; returns once its postmaster has exited.
    pub fn stop_node(&mut self, name: &str) -> Result<(), ClusterError> {
        tracing::info!(node = name, "stopping node");
        self.node_mut(name)?.stop()
    }

    /// Stops a node the way a crash would (immediate shutdown, no checkpoint).
    pub fn crash_node(&mut self, name: &str) -> Result<(), ClusterError> {
        tracing::info!(node = name, "crashing node");
        self.node_mut(name)?.crash()
    }

    /// Starts a stopped node again on its old port and waits until it is ready (a standby: streaming).
    pub fn start_node(&mut self, name: &str) -> Result<(), ClusterError> {
        tracing::info!(node = name, "starting node");
        let env = self.env.clone();
        self.node_mut(name)?.start(&env, false)
    }

    /// Stops every node (followers and leader in parallel) and, if asked, deletes the directory.
    /// Idempotent; errors are logged because there is nobody left to handle them.
    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        let all = || std::iter::once(&self.leader).chain(self.followers.iter());
        for node in all() {
            node.request_stop();
        }
        for node in std::iter::once(&mut self.leader).chain(self.followers.iter_mut()) {
            if let Err(err) = node.stop() {
                tracing::warn!(node = %node.info.name, error = %err, "stopping node failed");
            }
        }
        if self.remove_dir_on_drop {
            if let Err(err) = std::fs::remove_dir_all(&self.env.cluster_dir) {
                tracing::warn!(dir = %self.env.cluster_dir.display(), error = %err, "removing cluster dir failed");
            }
        }
        tracing::info!(dir = %self.env.cluster_dir.display(), "local cluster shut down");
    }

    fn node(&self, name: &str) -> Result<&Node, ClusterError> {
        std::iter::once(&self.leader)
            .chain(self.followers.iter())
            .find(|n| n.info.name == name)
            .ok_or_else(|| ClusterError::UnknownNode(name.to_string()))
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut Node, ClusterError> {
        std::iter::once(&mut self.leader)
            .chain(self.followers.iter_mut())
            .find(|n| n.info.name == name)
            .ok_or_else(|| ClusterError::UnknownNode(name.to_string()))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds 127.0.0.1:0 and returns the port the kernel chose. Another process may take it before Postgres
/// binds it; node start retries with a new port when that happens.
pub fn free_port() -> Result<u16, ClusterError> {
    let io_err = |source| ClusterError::Io {
        what: "find a free port on 127.0.0.1".to_string(),
        source,
    };
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(io_err)?;
    Ok(listener.local_addr().map_err(io_err)?.port())
}

/// Creates `dir`, refuses it while a server still runs there, wipes stale node directories and hands it
/// to the Postgres OS user.
fn prepare_dir(dir: &Path, user: Option<&OsUser>) -> Result<(), ClusterError> {
    let io_err = |what: String| move |source| ClusterError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    let entries = std::fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_node_dir_name(&name) {
            continue;
        }
        let data_dir = entry.path();
        if let Some(pid) = cleanup::live_postmaster(&data_dir) {
            return Err(ClusterError::InUse { dir: data_dir, pid });
        }
        tracing::info!(dir = %data_dir.display(), "removing stale node directory");
        std::fs::remove_dir_all(&data_dir)
            .map_err(io_err(format!("remove {}", data_dir.display())))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("chmod {}", dir.display())))?;
    chown_recursive(dir, user)?;
    check_traversable(dir, user)
}

/// Names this launcher gives node directories: `leader`, `follower<N>`.
fn is_node_dir_name(name: &str) -> bool {
    name == "leader"
        || name
            .strip_prefix("follower")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_dir_names() {
        assert!(is_node_dir_name("leader"));
        assert!(is_node_dir_name("follower12"));
        assert!(!is_node_dir_name("follower"));
        assert!(!is_node_dir_name("followers"));
        assert!(!is_node_dir_name("notes.txt"));
    }

    #[test]
    fn free_port_is_nonzero() {
        assert!(free_port().is_ok_and(|p| p != 0));
    }
}
