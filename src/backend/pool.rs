//! Where sessions get their node connections. For now every session opens its own connection
//! per node and closes it at the end; the interface is the seam where transaction pooling will
//! go, so sessions do not change when it does.

use std::sync::Arc;

use crate::config::Config;

use super::conn::{BackendConn, ConnectError};

/// Identifies what a connection is for: a user on a database with given startup parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnKey {
    pub user: String,
    /// Startup parameters other than `user` (database, application_name, client_encoding...).
    pub params: Vec<(String, String)>,
}

/// Hands out node connections.
#[derive(Debug, Clone, Default)]
pub struct Pool {}

impl Pool {
    pub fn new() -> Self {
        Pool {}
    }

    /// A connection to `node` for `key`, logged in with the user's configured password.
    pub async fn checkout(
        &self,
        config: &Arc<Config>,
        node: usize,
        key: &ConnKey,
    ) -> Result<BackendConn, ConnectError> {
        let node_cfg = config.nodes.get(node).ok_or_else(|| ConnectError::Auth {
            node: format!("#{node}"),
            message: "no such node".to_owned(),
        })?;
        let password = config
            .user(&key.user)
            .map(|u| u.password.expose().to_owned())
            .unwrap_or_default();
        BackendConn::connect(
            node,
            node_cfg,
            &key.params,
            &key.user,
            &password,
            config.proxy.connect_timeout,
        )
        .await
    }

    /// Gives a connection back. Session connections carry session state, so it is closed.
    pub async fn checkin(&self, conn: BackendConn) {
        conn.terminate().await;
    }
}
