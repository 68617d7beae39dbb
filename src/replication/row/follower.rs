//! The task that stands for one follower: it finds the databases to replicate (starting a
//! stream for each), and publishes the follower's state for routing, acknowledgement and the
//! metrics: the lowest position its ready databases have applied, which databases it can serve,
//! and whether one of them stopped on an error.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{connect_own, BackendConn};
use crate::config::Config;
use crate::metrics::Metrics;

use super::super::lag::LeaderHistory;
use super::super::positions::{FollowerState, Position, Positions};
use super::{database_task, setup, FollowerShared, DISCOVER_INTERVAL, LAG_REFRESH};

/// Lists the leader's databases (or the configured ones).
async fn databases(
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

#[allow(clippy::too_many_arguments)]
pub(super) async fn follower_task(
    config: Arc<Config>,
    node: usize,
    positions: Arc<Positions>,
    metrics: Arc<Metrics>,
    history: Arc<Mutex<LeaderHistory>>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let name = config.node_name(node);
    let shared = Arc::new(FollowerShared {
        states: Mutex::new(HashMap::new()),
        changed: Notify::new(),
    });
    let follower_metrics = metrics.follower(node).map(|m| Arc::new(m.clone()));
    if let Some(m) = &follower_metrics {
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
                            tracker.spawn(database_task(
                                config.clone(),
                                node,
                                db,
                                shared.clone(),
                                follower_metrics.clone(),
                                stop.clone(),
                            ));
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
        if Instant::now() >= next_slot_check {
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
            if let (Some(conn), Some(m)) = (leader.as_mut(), &follower_metrics) {
                match retained_bytes(conn, &slots).await {
                    Ok(bytes) => m.slot_retained_bytes.set(bytes as f64),
                    Err(_) => leader = None,
                }
            }
        }
        // Publish the follower's position: the lowest of its ready databases.
        let (ready, applied, error) = match shared.states.lock() {
            Ok(states) => {
                let ready: HashSet<String> = states
                    .iter()
                    .filter(|(_, s)| s.ready)
                    .map(|(d, _)| d.clone())
                    .collect();
                let applied = states
                    .values()
                    .filter(|s| s.ready)
                    .filter_map(|s| s.applied)
                    .min();
                let error = states.values().find_map(|s| s.error.clone());
                (ready, applied, error)
            }
            Err(_) => (HashSet::new(), None, Some("state lock poisoned".into())),
        };
        let up = error.is_none() && !ready.is_empty();
        let (lag, lag_bytes) = match (applied, history.lock()) {
            (Some(a), Ok(h)) => (h.lag(a, Instant::now()), h.lag_bytes(a)),
            _ => (Duration::ZERO, 0),
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
        }
        if was_up != Some(up) && (up || error.is_some()) {
            match &error {
                None => info!(follower = %name, "follower is applying changes"),
                Some(e) => warn!(follower = %name, error = %e, "follower is down for routing"),
            }
            was_up = Some(up);
        }
        // Positions arrive by themselves in row mode (requests to poll need no answer).
        let wake = next_discovery.min(next_slot_check);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
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
