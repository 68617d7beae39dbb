//! The config file as written: serde structs that reject unknown keys. [`super::Config`] is
//! built from these by validation, so an invalid config never exists past load.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub nodes: Vec<RawNode>,
    #[serde(default)]
    pub users: Vec<RawUser>,
    #[serde(default)]
    pub replication: RawReplication,
    #[serde(default)]
    pub routing: RawRouting,
    #[serde(default)]
    pub statement: RawStatement,
    #[serde(default)]
    pub metrics: RawMetrics,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<String>,
    pub client_login_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    pub max_client_connections: Option<usize>,
    pub max_logins_in_progress: Option<usize>,
    pub node_retry_interval: Option<String>,
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub name: String,
    pub role: String,
    pub host: String,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub name: String,
    pub password: Option<String>,
    pub password_env: Option<String>,
    pub auth: Option<String>,
    pub admin: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplication {
    pub mode: Option<String>,
    pub ack: Option<String>,
    pub ack_timeout: Option<String>,
    pub switch_timeout: Option<String>,
    pub poll_interval: Option<String>,
    pub user: Option<String>,
    pub database: Option<String>,
    pub databases: Option<Vec<String>>,
    pub bootstrap_workers: Option<usize>,
    pub pg_bin_dir: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub consistency: Option<String>,
    pub max_lag: Option<String>,
    pub ryw_wait: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStatement {
    pub serialize_writes: Option<bool>,
    #[serde(rename = "unsafe")]
    pub unsafe_: Option<String>,
    pub log_retention: Option<String>,
    pub max_copy_bytes: Option<String>,
}
