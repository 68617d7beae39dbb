//! Where sessions get their node connections. For now every session opens its own connection
//! per node and closes it at the end; the interface is the seam where transaction pooling will
//! go, so sessions do not change when it does.
//!
//! Every connection the pool opens carries a [`Counted`] guard, so `pgrelay_backend_connections`
//! follows the connections that exist however they end (closed, dropped on an error, or kept
//! idle by a future pool).

use std::sync::Arc;

use metrics::Gauge;

use crate::config::Config;
use crate::metrics::Metrics;

use super::conn::{BackendConn, ConnectError};

/// Identifies what a connection is for: a user on a database with given startup parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnKey {
    pub user: String,
    /// Startup parameters other than `user` (database, application_name, client_encoding...).
    pub params: Vec<(String, String)>,
}

/// Hands out node connections.
#[derive(Clone)]
pub struct Pool {
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

/// Counts one open connection in a gauge for as long as it lives: incremented when made,
/// decremented when dropped, so the count cannot drift whichever way the connection ends.
pub struct Counted(Gauge);

impl Counted {
    pub fn new(gauge: Gauge) -> Counted {
        gauge.increment(1.0);
        Counted(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Pool {
    /// `metrics`: where the connections the pool opens are counted, per node.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Pool { metrics }
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
        let mut conn = BackendConn::connect(
            node,
            node_cfg,
            &key.params,
            &key.user,
            &password,
            config.proxy.connect_timeout,
        )
        .await?;
        if let Some(gauge) = self.metrics.backend_connections(node) {
            conn.counted = Some(Counted::new(gauge.clone()));
        }
        Ok(conn)
    }

    /// Gives a connection back. Session connections carry session state, so it is closed.
    pub async fn checkin(&self, conn: BackendConn) {
        conn.terminate().await;
    }
}
