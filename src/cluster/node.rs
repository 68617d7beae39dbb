//! One Postgres server of a local cluster: creating its data directory, writing its settings, starting
//! `postgres` as a child process and stopping it.
//!
//! Readiness is read from `postmaster.pid`, whose eighth line is the server's status (`ready` or `standby`
//! once it accepts connections); `pg_ctl -w` waits the same way.
//! See <https://www.postgresql.org/docs/current/server-start.html> and
//! <https://www.postgresql.org/docs/current/server-shutdown.html>.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::os_user::{chown_recursive, write_owned, OsUser};
use super::tools::{base_command, file_tail, psql, run_server_tool, PsqlTarget};
use super::{free_port, spawner, ClusterError, NodeInfo};
use crate::protocol::conninfo;

/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a standby may take to start streaming from the leader.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before we escalate to an immediate one.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an immediate shutdown may take before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll interval for readiness and exit checks.
const POLL: Duration = Duration::from_millis(25);
/// How many fresh ports to try when the chosen one was taken between `free_port` and bind.
const PORT_ATTEMPTS: usize = 5;

/// Our settings live in their own file so that re-writing them (a new port) never touches the rest.
const PGRELAY_CONF: &str = "pgrelay.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'pgrelay.conf'";
pub(crate) const LOG_FILE: &str = "server.log";
const PID_FILE: &str = "postmaster.pid";

/// Everything a node needs to know about the cluster it belongs to.
#[derive(Debug, Clone)]
pub(crate) struct NodeEnv {
    pub bin_dir: PathBuf,
    pub cluster_dir: PathBuf,
    pub os_user: Option<OsUser>,
    pub superuser: String,
    pub password: String,
    pub extra_conf: Vec<(String, String)>,
}

impl NodeEnv {
    pub fn psql_target<'a>(&'a self, info: &'a NodeInfo) -> PsqlTarget<'a> {
        PsqlTarget {
            bin_dir: &self.bin_dir,
            host: &info.host,
            port: info.port,
            user: &self.superuser,
            password: &self.password,
        }
    }
}

/// A server and, while it runs, its postmaster process.
#[derive(Debug)]
pub(crate) struct Node {
    pub info: NodeInfo,
    pub standby: bool,
    child: Option<Child>,
}

impl Node {
    /// Creates a fresh, writable server with its own `initdb` (the leader, or an `Empty` follower) and starts it.
    pub fn create_primary(env: &NodeEnv, name: &str) -> Result<Node, ClusterError> {
        let data_dir = env.cluster_dir.join(name);
        let pwfile = env.cluster_dir.join(format!(".pwfile-{name}"));
        write_owned(
            &pwfile,
            env.password.as_bytes(),
            0o600,
            env.os_user.as_ref(),
        )?;
        let args = vec![
            "-D".to_string(),
            data_dir.display().to_string(),
            "-E".to_string(),
            "UTF8".to_string(),
            "--locale=C".to_string(),
            "--auth-local=trust".to_string(),
            "--auth-host=scram-sha-256".to_string(),
            "-U".to_string(),
            env.superuser.clone(),
            format!("--pwfile={}", pwfile.display()),
            // fsync is off on these throwaway clusters anyway; syncing the fresh files costs seconds.
            "--no-sync".to_string(),
        ];
        let result = run_server_tool(
            &env.bin_dir,
            "initdb",
            &args,
            &[],
            &env.cluster_dir,
            env.os_user.as_ref(),
        );
        let _ = std::fs::remove_file(&pwfile);
        result?;
        write_owned(
            &data_dir.join("pg_hba.conf"),
            pg_hba().as_bytes(),
            0o600,
            env.os_user.as_ref(),
        )?;
        let mut node = Node::new(name, data_dir, false);
        node.start(env, true)?;
        Ok(node)
    }

    /// Clones `leader` with `pg_basebackup -R` into a streaming hot standby, starts it and waits until it streams.
    pub fn create_standby(
        env: &NodeEnv,
        name: &str,
        leader: &NodeInfo,
    ) -> Result<Node, ClusterError> {
        let data_dir = env.cluster_dir.join(name);
        // application_name ends up in primary_conninfo, so the leader's pg_stat_replication names us.
        let conninfo = conninfo::conninfo(&[
            ("host", &leader.host),
            ("port", &leader.port.to_string()),
            ("user", &env.superuser),
            ("application_name", name),
        ])?;
        let args = vec![
            "-d".to_string(),
            conninfo,
            "-D".to_string(),
            data_dir.display().to_string(),
            "-R".to_string(),
            "-S".to_string(),
            name.to_string(),
            "-X".to_string(),
            "stream".to_string(),
            "-c".to_string(),
            "fast".to_string(),
            "--no-sync".to_string(),
        ];
        // A slot per standby, reserved before the backup starts: otherwise the checkpoint of a concurrent
        // backup may recycle WAL this backup still has to stream (`pg_basebackup -C` creates its slot too
        // late for that), and a stopped standby could not catch up after a restart.
        psql(
            &env.psql_target(leader),
            &format!("SELECT pg_create_physical_replication_slot('{name}', true)"),
        )?;
        run_server_tool(
            &env.bin_dir,
            "pg_basebackup",
            &args,
            &[("PGPASSWORD", env.password.as_str())],
            &env.cluster_dir,
            env.os_user.as_ref(),
        )?;
        // The backup copied the leader's log; this server's log should start empty.
        let _ = std::fs::remove_file(data_dir.join(LOG_FILE));
        let mut node = Node::new(name, data_dir, true);
        node.start(env, true)?;
        Ok(node)
    }

    fn new(name: &str, data_dir: PathBuf, standby: bool) -> Node {
        Node {
            info: NodeInfo {
                name: name.to_string(),
                host: "127.0.0.1".to_string(),
                port: 0,
                data_dir,
            },
            standby,
            child: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the postmaster and waits until it accepts connections (and, for a standby, streams).
    ///
    /// With `new_port_allowed` a port lost to another process is replaced by a fresh one (first start only:
    /// later starts must keep the port that clients and standbys already know).
    pub fn start(&mut self, env: &NodeEnv, new_port_allowed: bool) -> Result<(), ClusterError> {
        if self.child.is_some() {
            return Ok(());
        }
        let attempts = if new_port_allowed { PORT_ATTEMPTS } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            if self.info.port == 0 || (new_port_allowed && attempt > 1) {
                self.info.port = free_port()?;
            }
            match self.start_once(env) {
                Err(ClusterError::ServerExited { ref log_tail, .. })
                    if attempt < attempts && port_was_taken(log_tail) =>
                {
                    tracing::warn!(node = %self.info.name, port = self.info.port, "port taken, retrying with another");
                }
                Err(err) => return Err(err),
                Ok(()) => break,
            }
        }
        if self.standby {
            self.wait_streaming(env)?;
        }
        Ok(())
    }

    fn start_once(&mut self, env: &NodeEnv) -> Result<(), ClusterError> {
        self.write_settings(env)?;
        let log_path = self.info.data_dir.join(LOG_FILE);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| ClusterError::Io {
                what: format!("open {}", log_path.display()),
                source,
            })?;
        chown_recursive(&log_path, env.os_user.as_ref())?;
        let log_for_stdout = log.try_clone().map_err(|source| ClusterError::Io {
            what: format!("duplicate {}", log_path.display()),
            source,
        })?;

        let program = env.bin_dir.join("postgres");
        let mut cmd = base_command(&program);
        cmd.arg("-D")
            .arg(&self.info.data_dir)
            .current_dir(&self.info.data_dir)
            .stdout(Stdio::from(log_for_stdout))
            .stderr(Stdio::from(log))
            // Own process group: a Ctrl-C in the terminal reaches us, not the server directly; we (or the
            // parent-death signal) decide how it stops.
            .process_group(0);
        if let Some(user) = &env.os_user {
            user.apply(&mut cmd);
        }
        let child = spawner::spawn(cmd).map_err(|source| ClusterError::Io {
            what: format!("start {}", program.display()),
            source,
        })?;
        tracing::debug!(node = %self.info.name, port = self.info.port, pid = child.id(), "postgres started");
        self.child = Some(child);
        if let Err(err) = self.wait_ready() {
            self.kill_now();
            return Err(err);
        }
        tracing::info!(node = %self.info.name, port = self.info.port, "postgres accepting connections");
        Ok(())
    }

    /// Polls `postmaster.pid` until our postmaster reports `ready` or `standby`.
    fn wait_ready(&mut self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let pid_path = self.info.data_dir.join(PID_FILE);
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(self.exited("not running".to_string()));
            };
            let pid = child.id();
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Err(self.exited(status.to_string()));
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(ClusterError::Io {
                        what: format!("wait for postgres of {}", self.info.name),
                        source,
                    })
                }
            }
            if let Ok(contents) = std::fs::read_to_string(&pid_path) {
                if pid_file_says_ready(&contents, pid) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("accept connections", START_TIMEOUT));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the standby's WAL receiver streams from the leader.
    fn wait_streaming(&mut self, env: &NodeEnv) -> Result<(), ClusterError> {
        let deadline = Instant::now() + STREAMING_TIMEOUT;
        let sql = "SELECT status FROM pg_stat_wal_receiver";
        loop {
            if let Ok(status) = psql(&env.psql_target(&self.info), sql) {
                if status == "streaming" {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("stream from the leader", STREAMING_TIMEOUT));
            }
            std::thread::sleep(POLL * 4);
        }
    }

    /// Sends the fast-shutdown signal without waiting, so several servers can stop in parallel.
    pub fn request_stop(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGINT);
        }
    }

    /// Fast shutdown (SIGINT), escalating to immediate (SIGQUIT) and SIGKILL if it takes too long.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        for (sig, timeout) in [(libc::SIGINT, STOP_TIMEOUT), (libc::SIGQUIT, QUIT_TIMEOUT)] {
            signal(&child, sig);
            if wait_exit(&mut child, timeout)? {
                tracing::debug!(node = %self.info.name, "postgres stopped");
                return Ok(());
            }
            tracing::warn!(node = %self.info.name, signal = sig, "postgres did not stop in time, escalating");
        }
        let _ = child.kill();
        child.wait().map_err(|source| ClusterError::Io {
            what: format!("wait for postgres of {}", self.info.name),
            source,
        })?;
        Ok(())
    }

    /// Immediate shutdown (SIGQUIT): no checkpoint, so the next start runs crash recovery, as
    /// after a power loss.
    pub fn crash(&mut self) -> Result<(), ClusterError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(&child, libc::SIGQUIT);
        if !wait_exit(&mut child, QUIT_TIMEOUT)? {
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Writes `pgrelay.conf` (our settings, including the current port) and makes sure it is included.
    fn write_settings(&self, env: &NodeEnv) -> Result<(), ClusterError> {
        let conf_path = self.info.data_dir.join("postgresql.conf");
        let conf = std::fs::read_to_string(&conf_path).map_err(|source| ClusterError::Io {
            what: format!("read {}", conf_path.display()),
            source,
        })?;
        if !conf.lines().any(|line| line.trim() == INCLUDE_LINE) {
            let updated = format!(
                "{conf}\n# settings written by pgrelay's cluster launcher\n{INCLUDE_LINE}\n"
            );
            write_owned(&conf_path, updated.as_bytes(), 0o600, env.os_user.as_ref())?;
        }
        let settings = settings(self.info.port, &env.extra_conf);
        write_owned(
            &self.info.data_dir.join(PGRELAY_CONF),
            settings.as_bytes(),
            0o600,
            env.os_user.as_ref(),
        )
    }

    fn exited(&self, status: String) -> ClusterError {
        ClusterError::ServerExited {
            node: self.info.name.clone(),
            status,
            log_tail: file_tail(&self.info.data_dir.join(LOG_FILE)),
        }
    }

    fn timeout(&self, what: &str, after: Duration) -> ClusterError {
        ClusterError::Timeout {
            node: self.info.name.clone(),
            what: what.to_string(),
            after,
            log_tail: file_tail(&self.info.data_dir.join(LOG_FILE)),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so not recycled.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Waits up to `timeout` for `child` to exit; true if it did.
fn wait_exit(child: &mut Child, timeout: Duration) -> Result<bool, ClusterError> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(true),
            Ok(None) if Instant::now() >= deadline => return Ok(false),
            Ok(None) => std::thread::sleep(POLL),
            Err(source) => {
                return Err(ClusterError::Io {
                    what: "wait for postgres to exit".to_string(),
                    source,
                })
            }
        }
    }
}

/// The settings every node gets; `extra` comes last so it can override ours.
pub(crate) fn settings(port: u16, extra: &[(String, String)]) -> String {
    let port = port.to_string();
    let ours = [
        ("listen_addresses", "127.0.0.1"),
        ("port", port.as_str()),
        // TCP only: no socket files in shared directories, no clashes between clusters.
        ("unix_socket_directories", ""),
        ("wal_level", "logical"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("max_connections", "200"),
        ("hot_standby", "on"),
        ("hot_standby_feedback", "on"),
        // Throwaway clusters: durability across an OS crash is not worth the time.
        ("fsync", "off"),
        ("full_page_writes", "off"),
        ("synchronous_commit", "on"),
        // The log goes to stderr, which we point at server.log.
        ("logging_collector", "off"),
    ];
    let mut out = String::new();
    let extra = extra.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    for (name, value) in ours.into_iter().chain(extra) {
        out.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
    }
    out
}

/// Password (SCRAM) for every TCP connection, replication included; trust on the (disabled) local socket.
pub(crate) fn pg_hba() -> String {
    [
        "# written by pgrelay's cluster launcher",
        "local all all trust",
        "local replication all trust",
        "host all all 127.0.0.1/32 scram-sha-256",
        "host replication all 127.0.0.1/32 scram-sha-256",
        "",
    ]
    .join("\n")
}

/// True when `postmaster.pid` belongs to `pid` and says the server accepts connections.
pub(crate) fn pid_file_says_ready(contents: &str, pid: u32) -> bool {
    let lines: Vec<&str> = contents.lines().collect();
    let owner_matches = lines.first().and_then(|l| l.trim().parse::<u32>().ok()) == Some(pid);
    let status = lines.get(7).map(|l| l.trim());
    owner_matches && matches!(status, Some("ready") | Some("standby"))
}

/// The pid recorded in a data directory's `postmaster.pid`, if any.
pub(crate) fn recorded_postmaster_pid(data_dir: &Path) -> Option<libc::pid_t> {
    let contents = std::fs::read_to_string(data_dir.join(PID_FILE)).ok()?;
    contents.lines().next()?.trim().parse().ok()
}

fn port_was_taken(log_tail: &str) -> bool {
    log_tail.contains("Address already in use") || log_tail.contains("could not bind")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_quote_and_let_extra_override() {
        let text = settings(5555, &[("work_mem".into(), "it's".into())]);
        assert!(text.contains("port = '5555'\n"));
        assert!(text.contains("unix_socket_directories = ''\n"));
        assert!(text.ends_with("work_mem = 'it''s'\n"));
    }

    #[test]
    fn hba_requires_scram_for_replication() {
        assert!(pg_hba().contains("host replication all 127.0.0.1/32 scram-sha-256"));
    }

    #[test]
    fn pid_file_readiness() {
        let ready = "123\n/data\n1700000000\n5432\n\n127.0.0.1\n  42  7\nready   \n";
        assert!(pid_file_says_ready(ready, 123));
        assert!(!pid_file_says_ready(ready, 124));
        let starting = ready.replace("ready   ", "starting");
        assert!(!pid_file_says_ready(&starting, 123));
        let standby = ready.replace("ready   ", "standby ");
        assert!(pid_file_says_ready(&standby, 123));
        assert!(!pid_file_says_ready("123\n", 123));
    }

    #[test]
    fn detects_port_clash() {
        assert!(port_was_taken(
            "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
        ));
        assert!(!port_was_taken(
            "FATAL:  data directory has wrong ownership"
        ));
    }
}
