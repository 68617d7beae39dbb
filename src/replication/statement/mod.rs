//! Statement mode: sessions log the write statements of every leader transaction in
//! `pgrelay.statement_log` (see [`log`]), and a replayer per follower runs them there in `seq`
//! order, each leader transaction in one follower transaction.

pub mod log;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;

use super::positions::Positions;

/// Starts statement-mode replication: one replayer task per follower.
pub fn spawn(
    config: Arc<Config>,
    positions: Arc<Positions>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    positions.use_database_positions();
    let _ = (config, metrics, tracker, stop);
}
