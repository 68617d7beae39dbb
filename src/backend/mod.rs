//! Connections from pgrelay to nodes: opening and authenticating them, and the pool that hands
//! them to sessions.
pub mod conn;
pub mod pool;

pub use conn::{BackendConn, ConnectError, QueryError};
pub use pool::Pool;

use crate::config::Config;

/// Opens a connection of pgrelay's own (not a client's) to `node`, logged in as
/// `[replication] user`. `replication`: a logical replication connection
/// (`replication=database`), which speaks the walsender's commands.
pub async fn connect_own(
    config: &Config,
    node: usize,
    database: &str,
    application_name: &str,
    replication: bool,
) -> Result<BackendConn, String> {
    connect_own_with(config, node, database, application_name, replication, "").await
}

/// Like [`connect_own`], with session settings for the node (`-c name=value ...`, the
/// startup packet's `options`).
pub async fn connect_own_with(
    config: &Config,
    node: usize,
    database: &str,
    application_name: &str,
    replication: bool,
    options: &str,
) -> Result<BackendConn, String> {
    let cfg = config.nodes.get(node).ok_or("no such node")?;
    let user = config.replication.user.as_str();
    let password = config
        .user(user)
        .map(|u| u.password.expose().to_owned())
        .unwrap_or_default();
    let mut params = vec![
        ("database".to_owned(), database.to_owned()),
        ("application_name".to_owned(), application_name.to_owned()),
    ];
    if replication {
        params.push(("replication".to_owned(), "database".to_owned()));
    }
    if !options.is_empty() {
        params.push(("options".to_owned(), options.to_owned()));
    }
    BackendConn::connect(
        node,
        cfg,
        &params,
        user,
        &password,
        config.proxy.connect_timeout,
    )
    .await
    .map_err(|e| e.to_string())
}
