//! Statement mode: sessions log the write statements of every leader transaction in
//! `pgrelay.statement_log` (see [`log`]), and a replayer per follower runs them there in `seq`
//! order, each leader transaction in one follower transaction.
//!
//! - [`log`]: the contract between sessions and the replayer (table, functions, JSON).
//! - [`entry`]: reading and decoding entries on the leader, and the backlog.
//! - [`setup`]: the follower database: replayer lock, bookkeeping, bootstrap.
//! - [`replay`]: applying entries, pipelined, exactly once.
//! - `database`: the task per follower and database that ties them together.
//! - [`retention`]: deleting entries every follower applied.
//!
//! The task per follower that finds the databases and publishes the follower's state is row
//! mode's ([`super::row::follower`]); positions are per database
//! ([`Positions::publish_database`]).

mod database;
pub mod entry;
pub mod log;
pub mod replay;
pub mod retention;
pub mod setup;

use std::collections::HashSet;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;

use super::positions::Positions;
use super::row::follower::{self, FollowerTask, LagSource, StartDatabase};
use super::row::{FollowerShared, RowError};

/// Why replaying one database to one follower stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplayError {
    /// Something must change first (in the config, on a node, by hand).
    #[error("{0}")]
    Setup(String),
    #[error("leader: {0}")]
    Leader(String),
    #[error("follower: {0}")]
    Follower(String),
    /// A statement failed on the follower: it is no longer equal to the leader.
    #[error("{message}")]
    Diverged { seq: u64, message: String },
    /// A log entry pgrelay cannot read (written by another version, or by hand).
    #[error("{0}")]
    BadEntry(String),
}

impl From<RowError> for ReplayError {
    fn from(e: RowError) -> Self {
        match e {
            RowError::Setup(m) => ReplayError::Setup(m),
            RowError::Leader(m) => ReplayError::Leader(m),
            RowError::Follower(m) | RowError::Decode(m) => ReplayError::Follower(m),
            RowError::Mismatch(m) | RowError::Diverged(m) => ReplayError::Setup(m),
        }
    }
}

/// Starts statement-mode replication: per follower the task that finds databases (and one
/// replaying task per database), and the log's retention on the leader.
pub fn spawn(
    config: Arc<Config>,
    positions: Arc<Positions>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    positions.use_database_positions();
    for node in 0..config.nodes.len() {
        if node == config.leader {
            continue;
        }
        positions.set_databases(node, Some(HashSet::new()));
        let shared = Arc::new(FollowerShared::default());
        let poll = poll_fan_out(&positions, node, tracker, &stop);
        let start: StartDatabase = {
            let task = database::DatabaseTask {
                config: config.clone(),
                node,
                database: String::new(),
                positions: positions.clone(),
                shared: shared.clone(),
                metrics: metrics.follower(node).map(|m| Arc::new(m.clone())),
                poll,
                stop: stop.clone(),
            };
            Box::new(move |db| {
                Box::pin(database::run(database::DatabaseTask {
                    database: db,
                    ..task.clone()
                }))
            })
        };
        tracker.spawn(follower::follower_task(
            FollowerTask {
                config: config.clone(),
                node,
                positions: positions.clone(),
                metrics: metrics.clone(),
                shared,
                lag: LagSource::Reported,
                start,
            },
            tracker.clone(),
            stop.clone(),
        ));
    }
    tracker.spawn(retention::retention_task(config, positions, stop));
}

/// A read or a commit waiting for `node` asks its watcher to poll now
/// ([`Positions::poll_requested`] wakes one waiter): every database task of the follower
/// hears it through the returned channel.
fn poll_fan_out(
    positions: &Arc<Positions>,
    node: usize,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    let (positions, stop) = (positions.clone(), stop.clone());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = positions.poll_requested(node) => tx.send_modify(|n| *n = n.wrapping_add(1)),
            }
        }
    });
    rx
}
