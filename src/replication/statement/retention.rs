//! Log retention: entries every follower has applied are deleted from the leader's log once
//! they are older than `statement.log_retention`.
//!
//! "Every follower" is every follower in the config, as this process knows their positions:
//! while any follower's position in a database is unknown (not bootstrapped, unreachable
//! since pgrelay started), nothing is deleted there. A follower that stopped on a divergence
//! keeps its last position, so the entries it still needs stay.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backend::{connect_own, BackendConn};
use crate::config::Config;

use super::super::positions::{Position, Positions};
use super::super::row::follower::databases;
use super::super::row::DISCOVER_INTERVAL;

/// How often the log is trimmed.
const RETENTION_INTERVAL: Duration = Duration::from_secs(1);

/// The highest seq of `database` that every follower has applied; None while one is unknown.
/// With no followers, every seq.
pub fn applied_by_all(
    positions: &Positions,
    followers: &[usize],
    database: &str,
) -> Option<Position> {
    followers
        .iter()
        .map(|&f| positions.database_applied(f, database))
        .try_fold(i64::MAX as u64, |low, p| p.map(|p| low.min(p)))
}

/// The delete of entries up to `seq` older than `retention`.
fn delete_sql(seq: Position, retention: Duration) -> String {
    format!(
        "DELETE FROM pgrelay.statement_log WHERE seq <= {seq} AND logged_at < \
         pg_catalog.now() - pg_catalog.make_interval(secs => {})",
        retention.as_secs_f64()
    )
}

/// Trims the log of every replicated database, every [`RETENTION_INTERVAL`], until `stop`.
pub async fn retention_task(
    config: Arc<Config>,
    positions: Arc<Positions>,
    stop: CancellationToken,
) {
    let followers: Vec<usize> = (0..config.nodes.len())
        .filter(|&n| n != config.leader)
        .collect();
    let mut admin: Option<BackendConn> = None;
    let mut list: Vec<String> = Vec::new();
    let mut next_discovery = Instant::now();
    let mut conns: HashMap<String, BackendConn> = HashMap::new();
    let mut failing: HashMap<String, String> = HashMap::new();
    loop {
        if Instant::now() >= next_discovery {
            match databases(&config, &mut admin).await {
                Ok(l) => list = l,
                Err(e) => debug!(error = %e, "log retention: cannot list the databases"),
            }
            next_discovery = Instant::now() + DISCOVER_INTERVAL;
        }
        for database in &list {
            let Some(seq) = applied_by_all(&positions, &followers, database) else {
                continue;
            };
            match trim(&config, &mut conns, database, seq).await {
                Ok(deleted) => {
                    failing.remove(database);
                    if deleted > 0 {
                        debug!(database = %database, up_to = seq, deleted, "trimmed the statement log");
                    }
                }
                Err(e) => {
                    conns.remove(database);
                    if failing.get(database) != Some(&e) {
                        warn!(database = %database, error = %e, "cannot trim the statement log");
                        failing.insert(database.clone(), e);
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
        }
    }
    for (_, conn) in conns {
        conn.terminate().await;
    }
}

/// Deletes what may go from one database's log; returns how many entries went.
async fn trim(
    config: &Config,
    conns: &mut HashMap<String, BackendConn>,
    database: &str,
    seq: Position,
) -> Result<u64, String> {
    if !conns.contains_key(database) {
        let conn = connect_own(
            config,
            config.leader,
            database,
            "pgrelay log retention",
            false,
        )
        .await?;
        conns.insert(database.to_owned(), conn);
    }
    let Some(conn) = conns.get_mut(database) else {
        return Ok(0);
    };
    // The rows count is in the CommandComplete tag, which `query` does not return: count
    // with a CTE instead.
    let sql = format!(
        "WITH gone AS ({} RETURNING 1) SELECT count(*) FROM gone",
        delete_sql(seq, config.statement.log_retention)
    );
    match conn.query(&sql).await {
        Ok(rows) => Ok(rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)),
        // No log there yet: nothing to trim.
        Err(e) if e.code == "42P01" || e.code == "3F000" => Ok(0),
        Err(e) => Err(e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::positions::Positions;

    #[test]
    fn the_log_is_kept_for_the_slowest_follower_and_while_one_is_unknown() {
        let p = Positions::new(3, &[1, 2]);
        p.use_database_positions();
        assert_eq!(applied_by_all(&p, &[1, 2], "db"), None);
        p.publish_database(1, "db", 10);
        assert_eq!(applied_by_all(&p, &[1, 2], "db"), None);
        p.publish_database(2, "db", 7);
        assert_eq!(applied_by_all(&p, &[1, 2], "db"), Some(7));
        assert_eq!(applied_by_all(&p, &[1, 2], "other"), None);
        assert_eq!(applied_by_all(&p, &[], "db"), Some(i64::MAX as u64));
    }

    #[test]
    fn the_delete_keeps_recent_entries() {
        let sql = delete_sql(5, Duration::from_millis(1500));
        assert!(sql.contains("seq <= 5"), "{sql}");
        assert!(sql.contains("make_interval(secs => 1.5)"), "{sql}");
    }
}
