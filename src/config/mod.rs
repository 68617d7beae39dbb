//! Configuration: one TOML file, validated into [`Config`] at load. Every option is documented
//! in README.md and `pgrelay.example.toml`.

mod raw;
mod size;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use raw::{
    RawConfig, RawMetrics, RawNode, RawProxy, RawReplication, RawRouting, RawStatement, RawUser,
};

use crate::protocol::auth::scram::ScramSecret;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    /// All nodes; `nodes[leader]` is the leader.
    pub nodes: Vec<NodeConfig>,
    pub leader: usize,
    leader_node: NodeConfig,
    pub users: Vec<UserConfig>,
    pub replication: ReplicationConfig,
    pub routing: RoutingConfig,
    pub statement: StatementConfig,
    pub metrics: MetricsConfig,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// None: no endpoint (`listen = ""`).
    pub listen: Option<SocketAddr>,
}

pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9930";

/// When a COMMIT's reply may go to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// As soon as the leader committed.
    Async,
    /// Once this many followers applied the commit.
    Quorum(usize),
    /// Once every follower that is up applied the commit.
    All,
}

impl fmt::Display for Ack {
    /// As written in the config: `async`, `quorum:K`, `all`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ack::Async => f.write_str("async"),
            Ack::Quorum(k) => write!(f, "quorum:{k}"),
            Ack::All => f.write_str("all"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// A client that has not finished logging in by then is disconnected.
    pub client_login_timeout: Duration,
    /// How long opening a connection to a node may take.
    pub connect_timeout: Duration,
    /// On shutdown, how long sessions get to finish before they are closed.
    pub shutdown_timeout: Duration,
    /// Logged-in clients at once; more are refused after they authenticated.
    pub max_client_connections: usize,
    /// Connections still logging in at once (not counted in `max_client_connections`); more
    /// are refused as they connect.
    pub max_logins_in_progress: usize,
    /// A node that refused a connection is not tried again for this long.
    pub node_retry_interval: Duration,
    /// Threads serving sessions; 0: one per CPU core.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub role: Role,
    pub host: String,
    pub port: u16,
}

impl NodeConfig {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// How pgrelay checks a client's password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    Trust,
}

impl AuthMethod {
    fn name(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Trust => "trust",
        }
    }
}

/// A password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

#[derive(Debug, Clone)]
pub struct UserConfig {
    pub name: String,
    pub password: Secret,
    pub auth: AuthMethod,
    /// May use the admin console (the virtual database `pgrelay`).
    pub admin: bool,
    /// Salted SCRAM keys, computed once at load so a login does not pay PBKDF2.
    pub scram: ScramSecret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    Physical,
    Row,
    Statement,
}

impl ReplicationMode {
    pub fn name(self) -> &'static str {
        match self {
            ReplicationMode::Physical => "physical",
            ReplicationMode::Row => "row",
            ReplicationMode::Statement => "statement",
        }
    }

    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "physical" => Ok(ReplicationMode::Physical),
            "row" => Ok(ReplicationMode::Row),
            "statement" => Ok(ReplicationMode::Statement),
            other => Err(invalid(format!(
                "replication.mode = {other:?}: expected \"physical\", \"row\" or \"statement\""
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    pub mode: ReplicationMode,
    pub ack: Ack,
    /// How long a commit's reply waits for followers before it goes out with a warning.
    pub ack_timeout: Duration,
    /// A live mode switch (or PAUSE) waits this long for open transactions to finish and for
    /// followers to catch up; past it the switch is abandoned and writes go on in the old mode.
    pub switch_timeout: Duration,
    /// How often follower positions (and the leader's) are polled.
    pub poll_interval: Duration,
    /// The configured user pgrelay's own connections (position polling) log in as.
    pub user: String,
    /// The database those connections use.
    pub database: String,
    /// Row and statement mode: the databases pgrelay replicates; empty means every database
    /// of the leader that accepts connections (except templates), found again as they appear.
    pub databases: Vec<String>,
    /// Row and statement mode: how many tables a follower's bootstrap copies at once.
    pub bootstrap_workers: usize,
    /// Where `pg_dump` and `psql` are (None: found like the server binaries).
    pub pg_bin_dir: Option<std::path::PathBuf>,
}

/// What statement mode does with a statement it cannot make deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsafePolicy {
    /// Refused with SQLSTATE 0A000.
    Reject,
    /// Run and logged anyway, with a WARNING to the client and a counter.
    Allow,
}

#[derive(Debug, Clone)]
pub struct StatementConfig {
    /// Write transactions take the ordering lock at their first write (not just before
    /// COMMIT), so replay in commit order does exactly what the leader did.
    pub serialize_writes: bool,
    pub unsafe_policy: UnsafePolicy,
    /// Log entries every follower applied are kept this much longer before they are deleted.
    pub log_retention: Duration,
    /// The COPY data one transaction may hold (pgrelay keeps it until the commit logs it);
    /// past it the COPY fails with SQLSTATE 54000.
    pub max_copy_bytes: u64,
}

/// Default of `statement.max_copy_bytes`.
pub const DEFAULT_MAX_COPY_BYTES: u64 = 64 << 20;

/// Which node may serve a read (see README, "Consistency").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    Eventual,
    Session,
    Global,
    Leader,
}

impl Consistency {
    pub fn name(self) -> &'static str {
        match self {
            Consistency::Eventual => "eventual",
            Consistency::Session => "session",
            Consistency::Global => "global",
            Consistency::Leader => "leader",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub consistency: Consistency,
    /// Followers further behind get no eventual reads.
    pub max_lag: Duration,
    /// How long a read waits for a follower to catch up before it goes to the leader.
    pub ryw_wait: Duration,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
/// One worker thread per core (measured 8 % more pgbench -S throughput than one thread on
/// two cores; see BENCHMARKS.md).
pub const DEFAULT_WORKER_THREADS: usize = 0;
const SCRAM_ITERATIONS: u32 = crate::protocol::auth::scram::DEFAULT_ITERATIONS;

fn duration(key: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v).map_err(|e| {
            invalid(format!(
                "{key} = {v:?}: {e} (write it like \"500ms\" or \"5s\")"
            ))
        }),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config = Config::parse(&text)?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        Ok(config)
    }

    /// What the config allows but is probably not meant, one sentence each: logged when a
    /// config file is loaded and printed by `pgrelay check-config`.
    pub fn warnings(&self) -> Vec<String> {
        self.users
            .iter()
            .filter(|u| u.auth == AuthMethod::Trust)
            .map(|u| {
                format!(
                    "user {:?} has auth = \"trust\": anyone who can connect to pgrelay logs in as {:?} \
                     without a password, and pgrelay logs in to the nodes as that user with its configured password",
                    u.name, u.name
                )
            })
            .collect()
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Config::try_from(raw)
    }

    pub fn leader(&self) -> &NodeConfig {
        &self.leader_node
    }

    /// The name of node `node` (empty for an index out of range).
    pub fn node_name(&self, node: usize) -> String {
        self.nodes
            .get(node)
            .map(|n| n.name.clone())
            .unwrap_or_default()
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// What a reload to `new` puts in force: `new`, except the options that only a restart can
    /// change, which keep their values here; those are named in the second part.
    pub fn reloaded(&self, mut new: Config) -> (Config, Vec<&'static str>) {
        let mut restart = Vec::new();
        let mut keep = |changed: bool, name: &'static str| {
            if changed {
                restart.push(name);
            }
        };
        keep(new.proxy.listen != self.proxy.listen, "proxy.listen");
        keep(
            new.proxy.worker_threads != self.proxy.worker_threads,
            "proxy.worker_threads",
        );
        keep(new.metrics.listen != self.metrics.listen, "metrics.listen");
        keep(new.nodes != self.nodes, "nodes");
        let r = (&new.replication, &self.replication);
        keep(r.0.user != r.1.user, "replication.user");
        keep(r.0.database != r.1.database, "replication.database");
        keep(r.0.databases != r.1.databases, "replication.databases");
        keep(
            r.0.poll_interval != r.1.poll_interval,
            "replication.poll_interval",
        );
        keep(
            r.0.bootstrap_workers != r.1.bootstrap_workers,
            "replication.bootstrap_workers",
        );
        keep(r.0.pg_bin_dir != r.1.pg_bin_dir, "replication.pg_bin_dir");
        keep(
            new.statement.log_retention != self.statement.log_retention,
            "statement.log_retention",
        );
        new.proxy.listen = self.proxy.listen;
        new.proxy.worker_threads = self.proxy.worker_threads;
        new.metrics.listen = self.metrics.listen;
        new.nodes = self.nodes.clone();
        new.leader = self.leader;
        new.leader_node = self.leader_node.clone();
        new.replication.user = self.replication.user.clone();
        new.replication.database = self.replication.database.clone();
        new.replication.databases = self.replication.databases.clone();
        new.replication.poll_interval = self.replication.poll_interval;
        new.replication.bootstrap_workers = self.replication.bootstrap_workers;
        new.replication.pg_bin_dir = self.replication.pg_bin_dir.clone();
        new.statement.log_retention = self.statement.log_retention;
        (new, restart)
    }

    /// The effective config as TOML, every default filled in and passwords masked.
    pub fn to_masked_toml(&self) -> String {
        let raw = RawConfig {
            proxy: RawProxy {
                listen: Some(self.proxy.listen.to_string()),
                client_login_timeout: Some(fmt_duration(self.proxy.client_login_timeout)),
                connect_timeout: Some(fmt_duration(self.proxy.connect_timeout)),
                shutdown_timeout: Some(fmt_duration(self.proxy.shutdown_timeout)),
                max_client_connections: Some(self.proxy.max_client_connections),
                max_logins_in_progress: Some(self.proxy.max_logins_in_progress),
                node_retry_interval: Some(fmt_duration(self.proxy.node_retry_interval)),
                worker_threads: Some(self.proxy.worker_threads),
            },
            nodes: self
                .nodes
                .iter()
                .map(|n| RawNode {
                    name: n.name.clone(),
                    role: match n.role {
                        Role::Leader => "leader".into(),
                        Role::Follower => "follower".into(),
                    },
                    host: n.host.clone(),
                    port: Some(n.port),
                })
                .collect(),
            users: self
                .users
                .iter()
                .map(|u| RawUser {
                    name: u.name.clone(),
                    password: Some("********".into()),
                    password_env: None,
                    auth: Some(u.auth.name().into()),
                    admin: Some(u.admin),
                })
                .collect(),
            statement: RawStatement {
                serialize_writes: Some(self.statement.serialize_writes),
                unsafe_: Some(
                    match self.statement.unsafe_policy {
                        UnsafePolicy::Reject => "reject",
                        UnsafePolicy::Allow => "allow",
                    }
                    .into(),
                ),
                log_retention: Some(fmt_duration(self.statement.log_retention)),
                max_copy_bytes: Some(size::format_bytes(self.statement.max_copy_bytes)),
            },
            replication: RawReplication {
                mode: Some(self.replication.mode.name().into()),
                ack: Some(self.replication.ack.to_string()),
                ack_timeout: Some(fmt_duration(self.replication.ack_timeout)),
                switch_timeout: Some(fmt_duration(self.replication.switch_timeout)),
                poll_interval: Some(fmt_duration(self.replication.poll_interval)),
                user: Some(self.replication.user.clone()),
                database: Some(self.replication.database.clone()),
                databases: Some(self.replication.databases.clone()),
                bootstrap_workers: Some(self.replication.bootstrap_workers),
                pg_bin_dir: self
                    .replication
                    .pg_bin_dir
                    .as_ref()
                    .map(|p| p.display().to_string()),
            },
            routing: RawRouting {
                consistency: Some(self.routing.consistency.name().into()),
                max_lag: Some(fmt_duration(self.routing.max_lag)),
                ryw_wait: Some(fmt_duration(self.routing.ryw_wait)),
            },
            metrics: RawMetrics {
                listen: Some(
                    self.metrics
                        .listen
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                ),
            },
        };
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        let listen_str = raw.proxy.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_str.parse().map_err(|e| {
            invalid(format!(
                "proxy.listen = {listen_str:?}: {e} (expected an address like \"127.0.0.1:6432\")"
            ))
        })?;
        let proxy = ProxyConfig {
            listen,
            client_login_timeout: duration(
                "proxy.client_login_timeout",
                raw.proxy.client_login_timeout.as_deref(),
                Duration::from_secs(15),
            )?,
            connect_timeout: duration(
                "proxy.connect_timeout",
                raw.proxy.connect_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
            shutdown_timeout: duration(
                "proxy.shutdown_timeout",
                raw.proxy.shutdown_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            max_client_connections: raw.proxy.max_client_connections.unwrap_or(1000),
            max_logins_in_progress: raw.proxy.max_logins_in_progress.unwrap_or(100),
            node_retry_interval: duration(
                "proxy.node_retry_interval",
                raw.proxy.node_retry_interval.as_deref(),
                Duration::from_secs(1),
            )?,
            worker_threads: raw.proxy.worker_threads.unwrap_or(DEFAULT_WORKER_THREADS),
        };
        if proxy.max_client_connections == 0 {
            return Err(invalid("proxy.max_client_connections must be at least 1"));
        }
        if proxy.max_logins_in_progress == 0 {
            return Err(invalid("proxy.max_logins_in_progress must be at least 1"));
        }

        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for n in &raw.nodes {
            let role = match n.role.as_str() {
                "leader" => Role::Leader,
                "follower" => Role::Follower,
                other => {
                    return Err(invalid(format!(
                        "node {:?}: role = {other:?}: expected \"leader\" or \"follower\"",
                        n.name
                    )))
                }
            };
            if n.name.is_empty() {
                return Err(invalid("every [[nodes]] entry needs a non-empty name"));
            }
            if nodes.iter().any(|m: &NodeConfig| m.name == n.name) {
                return Err(invalid(format!("node name {:?} is used twice", n.name)));
            }
            nodes.push(NodeConfig {
                name: n.name.clone(),
                role,
                host: n.host.clone(),
                port: n.port.unwrap_or(5432),
            });
        }
        let leaders: Vec<usize> = nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.role == Role::Leader)
            .map(|(i, _)| i)
            .collect();
        let leader = match leaders.as_slice() {
            [one] => *one,
            [] => {
                return Err(invalid(
                    "exactly one [[nodes]] entry must have role = \"leader\"; found none",
                ))
            }
            _ => {
                return Err(invalid(format!(
                    "exactly one [[nodes]] entry must have role = \"leader\"; found {}",
                    leaders.len()
                )))
            }
        };

        let mut users = Vec::with_capacity(raw.users.len());
        for u in &raw.users {
            if users.iter().any(|m: &UserConfig| m.name == u.name) {
                return Err(invalid(format!("user {:?} is listed twice", u.name)));
            }
            let password = match (&u.password, &u.password_env) {
                (Some(p), None) => p.clone(),
                (None, Some(var)) => std::env::var(var).map_err(|_| {
                    invalid(format!(
                        "user {:?}: password_env = {var:?}, but that environment variable is not set",
                        u.name
                    ))
                })?,
                (Some(_), Some(_)) => {
                    return Err(invalid(format!(
                        "user {:?}: set either password or password_env, not both",
                        u.name
                    )))
                }
                (None, None) => {
                    return Err(invalid(format!(
                        "user {:?}: needs password or password_env (pgrelay logs in to the nodes with it)",
                        u.name
                    )))
                }
            };
            let auth = match u.auth.as_deref().unwrap_or("scram-sha-256") {
                "scram-sha-256" => AuthMethod::ScramSha256,
                "md5" => AuthMethod::Md5,
                "trust" => AuthMethod::Trust,
                other => {
                    return Err(invalid(format!(
                    "user {:?}: auth = {other:?}: expected \"scram-sha-256\", \"md5\" or \"trust\"",
                    u.name
                )))
                }
            };
            users.push(UserConfig {
                name: u.name.clone(),
                scram: ScramSecret::from_password(&password, SCRAM_ITERATIONS),
                password: Secret::new(password),
                auth,
                admin: u.admin.unwrap_or(false),
            });
        }
        if users.is_empty() {
            return Err(invalid("at least one [[users]] entry is needed"));
        }

        let followers = nodes.iter().filter(|n| n.role == Role::Follower).count();
        let ack = match raw.replication.ack.as_deref().unwrap_or("async") {
            "async" => Ack::Async,
            "all" => Ack::All,
            other => match other.strip_prefix("quorum:").map(str::parse::<usize>) {
                Some(Ok(k)) if k >= 1 && k <= followers => Ack::Quorum(k),
                Some(Ok(k)) => {
                    return Err(invalid(format!(
                        "replication.ack = {other:?}: K must be between 1 and the number of followers ({followers}), got {k}"
                    )))
                }
                _ => {
                    return Err(invalid(format!(
                        "replication.ack = {other:?}: expected \"async\", \"quorum:K\" or \"all\""
                    )))
                }
            },
        };
        let replication_user = match &raw.replication.user {
            Some(u) if users.iter().any(|c| &c.name == u) => u.clone(),
            Some(u) => {
                return Err(invalid(format!(
                    "replication.user = {u:?} is not one of the [[users]]"
                )))
            }
            None => users.first().map(|u| u.name.clone()).unwrap_or_default(),
        };
        let replication = ReplicationConfig {
            mode: ReplicationMode::parse(raw.replication.mode.as_deref().unwrap_or("physical"))?,
            ack,
            ack_timeout: duration(
                "replication.ack_timeout",
                raw.replication.ack_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
            switch_timeout: duration(
                "replication.switch_timeout",
                raw.replication.switch_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            poll_interval: duration(
                "replication.poll_interval",
                raw.replication.poll_interval.as_deref(),
                Duration::from_millis(10),
            )?,
            user: replication_user,
            database: raw
                .replication
                .database
                .clone()
                .unwrap_or_else(|| "postgres".to_owned()),
            databases: raw.replication.databases.clone().unwrap_or_default(),
            bootstrap_workers: raw.replication.bootstrap_workers.unwrap_or(2),
            pg_bin_dir: raw
                .replication
                .pg_bin_dir
                .as_deref()
                .filter(|p| !p.is_empty())
                .map(std::path::PathBuf::from),
        };
        let statement = StatementConfig {
            serialize_writes: raw.statement.serialize_writes.unwrap_or(true),
            unsafe_policy: match raw.statement.unsafe_.as_deref().unwrap_or("reject") {
                "reject" => UnsafePolicy::Reject,
                "allow" => UnsafePolicy::Allow,
                other => {
                    return Err(invalid(format!(
                        "statement.unsafe = {other:?}: expected \"reject\" or \"allow\""
                    )))
                }
            },
            log_retention: duration(
                "statement.log_retention",
                raw.statement.log_retention.as_deref(),
                Duration::ZERO,
            )?,
            max_copy_bytes: match raw.statement.max_copy_bytes.as_deref() {
                None => DEFAULT_MAX_COPY_BYTES,
                Some(text) => size::parse_bytes(text).ok_or_else(|| {
                    invalid(format!(
                        "statement.max_copy_bytes = {text:?}: expected a size like \"64MiB\" or \"512kB\""
                    ))
                })?,
            },
        };
        if replication.bootstrap_workers == 0 {
            return Err(invalid("replication.bootstrap_workers must be at least 1"));
        }
        if let Some(db) = replication.databases.iter().find(|d| d.is_empty()) {
            return Err(invalid(format!(
                "replication.databases contains an empty name ({db:?})"
            )));
        }
        if replication.poll_interval.is_zero() {
            return Err(invalid("replication.poll_interval must be more than 0"));
        }
        let metrics_listen = match raw.metrics.listen.as_deref().unwrap_or(DEFAULT_METRICS_LISTEN) {
            "" => None,
            text => Some(text.parse().map_err(|e| {
                invalid(format!(
                    "metrics.listen = {text:?}: {e} (expected an address like \"127.0.0.1:9930\", or \"\" for none)"
                ))
            })?),
        };
        let consistency = match raw.routing.consistency.as_deref().unwrap_or("session") {
            "eventual" => Consistency::Eventual,
            "session" => Consistency::Session,
            "global" => Consistency::Global,
            "leader" => Consistency::Leader,
            other => {
                return Err(invalid(format!(
                    "routing.consistency = {other:?}: expected \"eventual\", \"session\", \"global\" or \"leader\""
                )))
            }
        };
        let leader_node = nodes
            .get(leader)
            .cloned()
            .ok_or_else(|| invalid("no leader"))?;
        Ok(Config {
            proxy,
            nodes,
            leader,
            leader_node,
            users,
            replication,
            statement,
            routing: RoutingConfig {
                consistency,
                max_lag: duration(
                    "routing.max_lag",
                    raw.routing.max_lag.as_deref(),
                    Duration::from_secs(1),
                )?,
                ryw_wait: duration(
                    "routing.ryw_wait",
                    raw.routing.ryw_wait.as_deref(),
                    Duration::from_millis(50),
                )?,
            },
            metrics: MetricsConfig {
                listen: metrics_listen,
            },
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[nodes]]
name = "leader"
role = "leader"
host = "127.0.0.1"
port = 5432
[[nodes]]
name = "f1"
role = "follower"
host = "127.0.0.1"
port = 5433
[[users]]
name = "app"
password = "secret"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.proxy.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.leader().name, "leader");
        assert_eq!(c.replication.mode, ReplicationMode::Physical);
        assert_eq!(c.routing.consistency, Consistency::Session);
        assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
        assert_eq!(c.replication.ack, Ack::Async);
        assert_eq!(c.replication.user, "app");
        assert_eq!(c.routing.ryw_wait, Duration::from_millis(50));
        assert_eq!(
            c.metrics.listen.map(|a| a.to_string()).as_deref(),
            Some(DEFAULT_METRICS_LISTEN)
        );
        let quorum = Config::parse(&format!(
            "[replication]\nack = \"quorum:1\"\n[metrics]\nlisten = \"\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(quorum.replication.ack, Ack::Quorum(1));
        assert!(quorum.metrics.listen.is_none());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{MINIMAL}\n[routing]\nconsistensy = \"leader\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("consistensy"), "{err}");
    }

    #[test]
    fn exactly_one_leader() {
        let text = MINIMAL.replace("role = \"follower\"", "role = \"leader\"");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("exactly one"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        for (extra, needle) in [
            ("[replication]\nmode = \"logical\"\n", "replication.mode"),
            ("[statement]\nunsafe = \"maybe\"\n", "statement.unsafe"),
            (
                "[statement]\nlog_retention = \"soon\"\n",
                "statement.log_retention",
            ),
            (
                "[replication]\nbootstrap_workers = 0\n",
                "bootstrap_workers must be at least 1",
            ),
            ("[replication]\ndatabases = [\"\"]\n", "empty name"),
            (
                "[routing]\nconsistency = \"strong\"\n",
                "routing.consistency",
            ),
            (
                "[proxy]\nconnect_timeout = \"soon\"\n",
                "proxy.connect_timeout",
            ),
            ("[proxy]\nlisten = \"nowhere\"\n", "proxy.listen"),
            (
                "[replication]\nack = \"quorum:2\"\n",
                "between 1 and the number of followers",
            ),
            ("[replication]\nack = \"most\"\n", "replication.ack"),
            ("[replication]\nuser = \"ghost\"\n", "replication.user"),
            ("[metrics]\nlisten = \"x\"\n", "metrics.listen"),
            (
                "[statement]\nmax_copy_bytes = \"lots\"\n",
                "statement.max_copy_bytes",
            ),
            (
                "[proxy]\nmax_logins_in_progress = 0\n",
                "max_logins_in_progress must be at least 1",
            ),
        ] {
            let err = Config::parse(&format!("{extra}{MINIMAL}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn masked_output_hides_passwords_and_reparses() {
        let c = Config::parse(MINIMAL).unwrap();
        let out = c.to_masked_toml();
        assert!(!out.contains("secret"), "{out}");
        assert!(out.contains("********"));
        let again = Config::parse(&out).unwrap();
        assert_eq!(again.nodes, c.nodes);
        assert_eq!(format!("{:?}", c.users[0].password), "********");
    }

    #[test]
    fn password_env() {
        let text = MINIMAL.replace(
            "password = \"secret\"",
            "password_env = \"PGRELAY_TEST_UNSET_VAR\"",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("PGRELAY_TEST_UNSET_VAR"), "{err}");
    }
}
