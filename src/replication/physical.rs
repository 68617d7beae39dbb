//! Physical mode: followers are streaming standbys. Positions are WAL LSNs: the leader's
//! `pg_current_wal_insert_lsn()` (past every commit record, also with `synchronous_commit =
//! off`) and each standby's `pg_last_wal_replay_lsn()`, polled every `poll_interval` on
//! connections of pgrelay's own.
//! <https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-RECOVERY-CONTROL>

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::BackendConn;
use crate::config::Config;
use crate::metrics::Metrics;

use super::lag::LeaderHistory;
use super::positions::{parse_lsn, FollowerState, Position, Positions};

pub const LEADER_POSITION_SQL: &str = "SELECT pg_current_wal_insert_lsn()";
pub const REPLAY_POSITION_SQL: &str = "SELECT pg_last_wal_replay_lsn()";

/// How far back leader samples are kept: lag older than this reads as at least this.
const HISTORY: Duration = Duration::from_secs(300);

/// Starts the leader sampler and one watcher per follower.
pub fn spawn(
    config: Arc<Config>,
    positions: Arc<Positions>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let history = spawn_leader_sampler(&config, &positions, &metrics, tracker, &stop);
    for (node, n) in config.nodes.iter().enumerate() {
        if node == config.leader {
            continue;
        }
        debug!(follower = %n.name, "watching follower position");
        tracker.spawn(watch_follower(
            config.clone(),
            node,
            positions.clone(),
            metrics.clone(),
            history.clone(),
            stop.clone(),
        ));
    }
}

/// Starts sampling the leader's WAL insert position every `poll_interval` (in every mode whose
/// positions are LSNs); the returned history turns a follower's position into lag in seconds.
pub fn spawn_leader_sampler(
    config: &Arc<Config>,
    positions: &Arc<Positions>,
    metrics: &Arc<Metrics>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Arc<Mutex<LeaderHistory>> {
    let history = Arc::new(Mutex::new(LeaderHistory::new(HISTORY)));
    tracker.spawn(sample_leader(
        config.clone(),
        positions.clone(),
        metrics.clone(),
        history.clone(),
        stop.clone(),
    ));
    history
}

/// A connection of pgrelay's own to `node`, opened on demand and dropped on failure.
struct Poller {
    config: Arc<Config>,
    node: usize,
    conn: Option<BackendConn>,
    sql: &'static str,
}

impl Poller {
    /// Runs the position query; Ok(None) when the node answered NULL.
    async fn poll(&mut self) -> Result<Option<Position>, String> {
        let timeout = Duration::from_secs(1).max(self.config.replication.poll_interval * 10);
        if self.conn.is_none() {
            let cfg = self.config.nodes.get(self.node).ok_or("no such node")?;
            let user = self.config.replication.user.as_str();
            let password = self
                .config
                .user(user)
                .map(|u| u.password.expose().to_owned())
                .unwrap_or_default();
            let params = vec![
                (
                    "database".to_owned(),
                    self.config.replication.database.clone(),
                ),
                (
                    "application_name".to_owned(),
                    "pgrelay position watcher".to_owned(),
                ),
            ];
            let conn = BackendConn::connect(
                self.node,
                cfg,
                &params,
                user,
                &password,
                self.config.proxy.connect_timeout,
            )
            .await
            .map_err(|e| e.to_string())?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err("not connected".to_owned());
        };
        let result = tokio::time::timeout(timeout, conn.simple_query(self.sql)).await;
        let rows = match result {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(e);
            }
            Err(_) => {
                self.conn = None;
                return Err(format!("no answer within {timeout:?}"));
            }
        };
        let text = rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .flatten();
        Ok(text.as_deref().and_then(parse_lsn))
    }
}

async fn sample_leader(
    config: Arc<Config>,
    positions: Arc<Positions>,
    metrics: Arc<Metrics>,
    history: Arc<Mutex<LeaderHistory>>,
    stop: CancellationToken,
) {
    let mut poller = Poller {
        node: config.leader,
        config: config.clone(),
        conn: None,
        sql: LEADER_POSITION_SQL,
    };
    let mut tick = tokio::time::interval(config.replication.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match poller.poll().await {
            Ok(Some(position)) => {
                if failing {
                    info!("leader position available again");
                    failing = false;
                }
                if let Ok(mut h) = history.lock() {
                    h.record(Instant::now(), position);
                }
                positions.set_leader(position);
                metrics.leader_position.set(position as f64);
            }
            Ok(None) => {}
            Err(err) => {
                if !failing {
                    warn!(error = %err, "cannot read the leader's position");
                    failing = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(config.proxy.node_retry_interval) => {}
                }
            }
        }
    }
}

async fn watch_follower(
    config: Arc<Config>,
    node: usize,
    positions: Arc<Positions>,
    metrics: Arc<Metrics>,
    history: Arc<Mutex<LeaderHistory>>,
    stop: CancellationToken,
) {
    let name = config.node_name(node);
    let mut poller = Poller {
        config: config.clone(),
        node,
        conn: None,
        sql: REPLAY_POSITION_SQL,
    };
    let mut tick = tokio::time::interval(config.replication.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut was_up = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            // A read or a commit waits for this follower: poll now instead of at the next tick.
            _ = positions.poll_requested(node) => {}
        }
        let polled = poller.poll().await;
        let state = match &polled {
            Ok(applied) => {
                let (lag, lag_bytes) = match (applied, history.lock()) {
                    (Some(a), Ok(h)) => (h.lag(*a, Instant::now()), h.lag_bytes(*a)),
                    _ => (Duration::ZERO, 0),
                };
                FollowerState {
                    up: true,
                    applied: *applied,
                    lag_bytes,
                    lag,
                }
            }
            Err(_) => FollowerState {
                up: false,
                ..positions.follower(node)
            },
        };
        positions.publish(node, state);
        if let Some(m) = metrics.follower(node) {
            m.up.set(if state.up { 1.0 } else { 0.0 });
            m.lag_seconds.set(state.lag.as_secs_f64());
            m.lag_bytes.set(state.lag_bytes as f64);
            if let Some(a) = state.applied {
                m.applied_position.set(a as f64);
            }
        }
        if was_up != Some(state.up) {
            match &polled {
                Ok(_) => info!(follower = %name, "follower is up"),
                Err(err) => warn!(follower = %name, error = %err, "follower is down"),
            }
            was_up = Some(state.up);
        }
        if polled.is_err() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(config.proxy.node_retry_interval) => {}
            }
        }
    }
}
