//! The task that stands for one follower: it finds the databases to replicate (starting a
//! task for each), and publishes the follower's state for routing, acknowledgement and the
//! metrics: the lowest position its ready databases have applied, which databases it can serve,
//! and whether one of them stopped on an error. Row mode and statement mode share it; they
//! differ in what a database task does ([`StartDatabase`]) and where lag comes from
//! ([`LagSource`]).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{connect_own, BackendConn};
use crate::config::Config;
use crate::metrics::Metrics;

use super::super::lag::LeaderHistory;
use super::super::positions::{FollowerState, Position, Positions};
use super::{setup, FollowerShared, DISCOVER_INTERVAL, LAG_REFRESH};

/// Starts replicating one database (the task runs until the stop token fires).
pub(crate) type StartDatabase =
    Box<dyn Fn(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Where a follower's lag comes from.
pub(crate) enum LagSource {
    /// Row mode: the age and distance of the applied LSN in samples of the leader's WAL
    /// position; the WAL its slots retain is measured too.
    LeaderHistory(Arc<Mutex<LeaderHistory>>),
    /// Statement mode: each database task reports its own in [`super::DbState`]; the
    /// follower's lag is the age of the oldest change waiting in any database, its bytes and
    /// backlog the sums.
    Reported,
}

/// What the follower task needs.
pub(crate) struct FollowerTask {
    pub(crate) config: Arc<Config>,
    pub(crate) node: usize,
    pub(crate) positions: Arc<Positions>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shared: Arc<FollowerShared>,
    pub(crate) lag: LagSource,
    pub(crate) start: StartDatabase,
}

/// Lists the leader's databases (or the configured ones); `leader` is a connection kept
/// between calls (opened when None, dropped on an error).
pub(crate) async fn databases(
    config: &Config,
    leader: &mut Option<BackendConn>,
) -> Result<Vec<String>, String> {
    if !config.replication.databases.is_empty() {
        return Ok(config.replication.databases.clone());
    }
    if leader.is_none() {
        *leader = Some(
            connect_own(
                config,
                config.leader,
                &config.replication.database,
                "pgrelay row supervisor",
                false,
            )
            .await?,
        );
    }
    let Some(conn) = leader.as_mut() else {
        return Err("not connected".into());
    };
    match conn
        .query("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname")
        .await
    {
        Ok(rows) => Ok(rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect()),
        Err(e) => {
            *leader = None;
            Err(e.message)
        }
    }
}

pub(crate) async fn follower_task(
    task: FollowerTask,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let FollowerTask {
        config,
        node,
        positions,
        metrics,
        shared,
        lag: lag_source,
        start,
    } = task;
    let name = config.node_name(node);
    if let Some(m) = metrics.follower(node) {
        m.apply_transactions.increment(0);
        m.apply_errors.increment(0);
    }
    let mut started: HashSet<String> = HashSet::new();
    let mut leader: Option<BackendConn> = None;
    let mut next_discovery = Instant::now();
    let mut next_slot_check = Instant::now();
    let mut was_up: Option<bool> = None;
    let mut published_ready: HashSet<String> = HashSet::new();
    let mut last_published: Option<(bool, Option<Position>, Instant)> = None;
    loop {
        if Instant::now() >= next_discovery {
            match databases(&config, &mut leader).await {
                Ok(list) => {
                    for db in list {
                        if started.insert(db.clone()) {
                            shared.update(&db, |_| {});
                            tracker.spawn(start(db));
                        }
                    }
                }
                Err(e) => warn!(follower = %name, error = %e, "cannot list the leader's databases"),
            }
            next_discovery = Instant::now()
                + if config.replication.databases.is_empty() {
                    DISCOVER_INTERVAL
                } else {
                    Duration::from_secs(3600)
                };
        }
        if matches!(lag_source, LagSource::LeaderHistory(_)) && Instant::now() >= next_slot_check {
            next_slot_check = Instant::now() + Duration::from_secs(1);
            let slots: Vec<String> = started
                .iter()
                .map(|db| setup::slot_name(&name, db))
                .collect();
            if leader.is_none() {
                leader = connect_own(
                    &config,
                    config.leader,
                    &config.replication.database,
                    "pgrelay row supervisor",
                    false,
                )
                .await
                .ok();
            }
            if let (Some(conn), Some(m)) = (leader.as_mut(), metrics.follower(node)) {
                match retained_bytes(conn, &slots).await {
                    Ok(bytes) => m.slot_retained_bytes.set(bytes as f64),
                    Err(_) => leader = None,
                }
            }
        }
        // Publish the follower's position: the lowest of its ready databases.
        let Summary {
            ready,
            applied,
            error,
            reported,
        } = summarize(&shared);
        let up = error.is_none() && !ready.is_empty();
        let (lag, lag_bytes) = match &lag_source {
            LagSource::LeaderHistory(history) => match (applied, history.lock()) {
                (Some(a), Ok(h)) => (h.lag(a, Instant::now()), h.lag_bytes(a)),
                _ => (Duration::ZERO, 0),
            },
            LagSource::Reported => (
                reported
                    .oldest_pending
                    .map(|at| at.elapsed())
                    .unwrap_or(Duration::ZERO),
                reported.lag_bytes,
            ),
        };
        if ready != published_ready {
            positions.set_databases(node, Some(ready.clone()));
            published_ready = ready;
        }
        let state = FollowerState {
            up,
            applied,
            lag_bytes,
            lag,
        };
        // Waiters wake on every publication: publish what moved, and lag now and then.
        let moved = last_published.is_none_or(|(u, a, _)| u != up || a != applied);
        let stale = last_published.is_none_or(|(_, _, at): (bool, Option<Position>, Instant)| {
            at.elapsed() >= LAG_REFRESH
        });
        if moved || stale {
            positions.publish(node, state);
            last_published = Some((up, applied, Instant::now()));
        }
        if let Some(m) = metrics.follower(node) {
            m.up.set(if up { 1.0 } else { 0.0 });
            m.lag_seconds.set(lag.as_secs_f64());
            m.lag_bytes.set(lag_bytes as f64);
            if let Some(a) = applied {
                m.applied_position.set(a as f64);
            }
            if matches!(lag_source, LagSource::Reported) {
                m.statement_log_backlog.set(reported.backlog as f64);
            }
        }
        if was_up != Some(up) && (up || error.is_some()) {
            match &error {
                None => info!(follower = %name, "follower is applying changes"),
                Some(e) => warn!(follower = %name, error = %e, "follower is down for routing"),
            }
            was_up = Some(up);
        }
        // Positions arrive by themselves from the database tasks (requests to poll are theirs
        // to answer).
        let wake = match lag_source {
            LagSource::LeaderHistory(_) => next_discovery.min(next_slot_check),
            LagSource::Reported => next_discovery.min(Instant::now() + LAG_REFRESH),
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// What the follower task reads from its database tasks' states.
struct Summary {
    /// The databases that are bootstrapped and applying.
    ready: HashSet<String>,
    /// The lowest position the ready databases applied.
    applied: Option<Position>,
    /// The first error of any database.
    error: Option<String>,
    /// Statement mode: the oldest change and the sum of bytes waiting in the ready databases,
    /// and the transactions waiting in all of them.
    reported: super::DbState,
}

fn summarize(shared: &FollowerShared) -> Summary {
    let Ok(states) = shared.states.lock() else {
        return Summary {
            ready: HashSet::new(),
            applied: None,
            error: Some("state lock poisoned".into()),
            reported: super::DbState::default(),
        };
    };
    let ready_states = || states.values().filter(|s| s.ready);
    let mut reported = super::DbState::default();
    for s in ready_states() {
        reported.oldest_pending = match (reported.oldest_pending, s.oldest_pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        reported.lag_bytes += s.lag_bytes;
    }
    // A database that stopped still has a backlog, and it grows.
    reported.backlog = states.values().map(|s| s.backlog).sum();
    Summary {
        ready: states
            .iter()
            .filter(|(_, s)| s.ready)
            .map(|(d, _)| d.clone())
            .collect(),
        applied: ready_states().filter_map(|s| s.applied).min(),
        error: states.values().find_map(|s| s.error.clone()),
        reported,
    }
}

async fn retained_bytes(leader: &mut BackendConn, slots: &[String]) -> Result<u64, String> {
    if slots.is_empty() {
        return Ok(0);
    }
    let list = slots
        .iter()
        .map(|s| setup::literal(s))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = leader
        .query(&format!(
            "SELECT coalesce(sum(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)), 0)::bigint \
             FROM pg_replication_slots WHERE slot_name IN ({list})"
        ))
        .await
        .map_err(|e| e.message)?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}
