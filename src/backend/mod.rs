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
    let user = config.replication.user.as_str();
    let password = config
        .user(user)
        .map(|u| u.password.expose().to_owned())
        .unwrap_or_default();
    connect_with_params(config, node, &params, user, &password).await
}

/// Opens a connection of pgrelay's to `node` logged in as the client role `user` (with its
/// `[[users]]` password), for work that must run with that role's rights and no more: the
/// replay of the statements it wrote. An error when the config has no such user.
pub async fn connect_as(
    config: &Config,
    node: usize,
    database: &str,
    user: &str,
    application_name: &str,
    options: &str,
) -> Result<BackendConn, String> {
    let Some(u) = config.user(user) else {
        return Err(format!(
            "role \"{user}\" has no [[users]] entry, so pgrelay cannot log in as it"
        ));
    };
    let mut params = vec![
        ("database".to_owned(), database.to_owned()),
        ("application_name".to_owned(), application_name.to_owned()),
    ];
    if !options.is_empty() {
        params.push(("options".to_owned(), options.to_owned()));
    }
    let password = u.password.expose().to_owned();
    connect_with_params(config, node, &params, user, &password).await
}

async fn connect_with_params(
    config: &Config,
    node: usize,
    params: &[(String, String)],
    user: &str,
    password: &str,
) -> Result<BackendConn, String> {
    let cfg = config.nodes.get(node).ok_or("no such node")?;
    BackendConn::connect(
        node,
        cfg,
        params,
        user,
        password,
        config.proxy.connect_timeout,
    )
    .await
    .map_err(|e| e.to_string())
}
