//! A live switch between row mode and statement mode, on the replication side: waiting until
//! every follower applied everything under the old mode ([`drain`]), then recording on each
//! follower where the new mode starts ([`to_row`], [`to_statement`]), so that it neither
//! copies the followers again nor misses or repeats a change.
//!
//! Both run while no write transaction is open on the leader (the session gate of
//! [`crate::control`] is held) and the old mode's tasks have stopped, so "everything the leader
//! committed" is a fixed point that both modes can name: the end of every database's statement
//! log, or the leader's WAL position.

use std::time::{Duration, Instant};

use tracing::info;

use crate::backend::{connect_own, connect_own_with, BackendConn};
use crate::config::{Config, ReplicationMode, Role};

use super::physical::LEADER_POSITION_SQL;
use super::positions::{format_lsn, parse_lsn, Positions};
use super::row::setup::{self as row_setup, literal, slot_name, APPLIED_TABLE_SQL};
use super::row::stream::ReplicationStream;
use super::row::{follower, follower_database, FOLLOWER_OPTIONS, LEADER_OPTIONS};
use super::statement::{log, setup as statement_setup};

/// Every sequence of the database that was used, with its value (pgrelay's own excepted).
const SEQUENCES_SQL: &str = "SELECT format('%I.%I', schemaname, sequencename), last_value \
     FROM pg_catalog.pg_sequences WHERE last_value IS NOT NULL AND schemaname <> 'pgrelay'";

/// The followers' node indexes.
fn followers(config: &Config) -> Vec<usize> {
    config
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.role == Role::Follower)
        .map(|(i, _)| i)
        .collect()
}

/// The databases the running mode replicates (as its follower tasks list them).
pub async fn databases(config: &Config) -> Result<Vec<String>, String> {
    follower::databases(config, &mut None)
        .await
        .map_err(|e| format!("listing the leader's databases: {e}"))
}

async fn leader(config: &Config, database: &str) -> Result<BackendConn, String> {
    connect_own(
        config,
        config.leader,
        database,
        "pgrelay mode switch",
        false,
    )
    .await
    .map_err(|e| format!("leader, database \"{database}\": {e}"))
}

fn single(rows: Vec<Vec<Option<String>>>) -> Option<String> {
    rows.into_iter()
        .next()
        .and_then(|r| r.into_iter().next())
        .flatten()
}

/// Waits until every follower applied everything the leader committed under `mode`, in every
/// database in `databases`, until `deadline`. The error says who is behind.
pub async fn drain(
    config: &Config,
    positions: &Positions,
    mode: ReplicationMode,
    databases: &[String],
    deadline: Instant,
) -> Result<(), String> {
    let followers = followers(config);
    let remaining = || deadline.saturating_duration_since(Instant::now());
    match mode {
        ReplicationMode::Row => {
            let mut conn = leader(config, &config.replication.database).await?;
            let target = conn
                .query(LEADER_POSITION_SQL)
                .await
                .map(single)
                .map_err(|e| format!("reading the leader's WAL position: {}", e.message))?
                .as_deref()
                .and_then(parse_lsn)
                .ok_or("the leader gave no WAL position")?;
            conn.terminate().await;
            let done = |p: &Positions| {
                followers.iter().all(|&f| {
                    p.follower(f).has_applied(target) && databases.iter().all(|d| p.serves(f, d))
                })
            };
            if positions.wait_until(remaining(), done).await {
                return Ok(());
            }
            let behind: Vec<String> = followers
                .iter()
                .filter(|&&f| !done_one_row(positions, f, target, databases))
                .map(|&f| {
                    let state = positions.follower(f);
                    format!(
                        "{} (up: {}, applied: {})",
                        config.node_name(f),
                        state.up,
                        state.applied.map(format_lsn).unwrap_or_else(|| "-".into())
                    )
                })
                .collect();
            Err(format!(
                "followers did not apply the leader's WAL up to {} in time: {}",
                format_lsn(target),
                behind.join(", ")
            ))
        }
        ReplicationMode::Statement => {
            let mut targets = Vec::new();
            for db in databases {
                let mut conn = leader(config, db).await?;
                let end = conn
                    .query(
                        "SELECT CASE WHEN to_regclass('pgrelay.statement_log') IS NULL THEN 0 \
                         ELSE (SELECT coalesce(max(seq), 0) FROM pgrelay.statement_log) END",
                    )
                    .await
                    .map(single)
                    .map_err(|e| format!("reading the end of {db}'s statement log: {}", e.message))?
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                conn.terminate().await;
                targets.push((db.clone(), end));
            }
            let behind_in = |p: &Positions| -> Vec<String> {
                let mut behind = Vec::new();
                for &f in &followers {
                    for (db, end) in &targets {
                        let applied = p.database_applied(f, db);
                        if !p.serves(f, db) || applied.is_none_or(|a| a < *end) {
                            behind.push(format!(
                                "{} in {db} (applied {}, log ends at {end})",
                                config.node_name(f),
                                applied.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
                            ));
                        }
                    }
                }
                behind
            };
            if positions
                .wait_until(remaining(), |p| behind_in(p).is_empty())
                .await
            {
                return Ok(());
            }
            Err(format!(
                "followers did not replay the statement log to its end in time: {}",
                behind_in(positions).join(", ")
            ))
        }
        ReplicationMode::Physical => Err("physical mode has nothing to drain".into()),
    }
}

fn done_one_row(p: &Positions, f: usize, target: u64, databases: &[String]) -> bool {
    p.follower(f).has_applied(target) && databases.iter().all(|d| p.serves(f, d))
}

/// Statement -> row: creates each follower's slot in each database and records its starting
/// point on the follower, as if a bootstrap had just copied the data there. On an error the
/// slots created so far are dropped again.
pub async fn to_row(config: &Config, databases: &[String]) -> Result<(), String> {
    let mut created: Vec<(String, String)> = Vec::new();
    let result = create_row_starts(config, databases, &mut created).await;
    if result.is_err() {
        for (db, slot) in &created {
            if let Ok(mut conn) = leader(config, db).await {
                let _ = drop_slot_when_free(&mut conn, slot, Duration::from_secs(5)).await;
                conn.terminate().await;
            }
        }
    }
    result
}

async fn create_row_starts(
    config: &Config,
    databases: &[String],
    created: &mut Vec<(String, String)>,
) -> Result<(), String> {
    for db in databases {
        let mut conn = leader(config, db).await?;
        row_setup::prepare_leader(&mut conn, db)
            .await
            .map_err(|e| e.to_string())?;
        for f in followers(config) {
            let name = config.node_name(f);
            let slot = slot_name(&name, db);
            // A slot of an earlier row-mode period: its position is from before the switch.
            drop_slot_when_free(&mut conn, &slot, Duration::from_secs(5)).await?;
            let repl = connect_own_with(
                config,
                config.leader,
                db,
                "pgrelay mode switch",
                true,
                LEADER_OPTIONS,
            )
            .await
            .map_err(|e| format!("leader replication connection: {e}"))?;
            let mut stream = ReplicationStream::new(repl);
            let slot_made = stream.create_slot(&slot).await.map_err(|e| e.to_string())?;
            created.push((db.clone(), slot.clone()));
            stream.close().await;
            let start = format_lsn(slot_made.consistent_point);
            let mut follower_conn =
                follower_database(config, f, db, &mut conn, false, FOLLOWER_OPTIONS)
                    .await
                    .map_err(|e| e.to_string())?;
            let recorded = follower_conn
                .query(&format!(
                    "{APPLIED_TABLE_SQL}; \
                     INSERT INTO pgrelay.applied (source, position) VALUES ({src}, '{start}') \
                     ON CONFLICT (source) DO UPDATE SET position = EXCLUDED.position, \
                        diverged = NULL, updated_at = now()",
                    src = literal(&slot)
                ))
                .await;
            follower_conn.terminate().await;
            recorded.map_err(|e| {
                format!(
                    "follower {name}, database {db}: recording the row-mode start: {}",
                    e.message
                )
            })?;
            info!(follower = %name, database = %db, start = %start, "row mode starts here");
        }
        conn.terminate().await;
    }
    Ok(())
}

/// Row -> statement: records on each follower that replay starts after the current end of
/// each database's statement log, then drops row mode's slots (they would hold the leader's
/// WAL forever) and their records.
pub async fn to_statement(config: &Config, databases: &[String]) -> Result<(), String> {
    for db in databases {
        let mut conn = leader(config, db).await?;
        conn.query(&log::leader_setup_sql())
            .await
            .map_err(|e| format!("creating {db}'s statement log: {}", e.message))?;
        let end = statement_setup::leader_log_end(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        // Row mode carries rows, not sequence values; statement mode keeps the followers'
        // sequences at the leader's, so they start equal.
        let sequences = conn
            .query(SEQUENCES_SQL)
            .await
            .map_err(|e| format!("reading {db}'s sequences: {}", e.message))?;
        let set_sequences: String = sequences
            .iter()
            .filter_map(
                |r| match (r.first().cloned().flatten(), r.get(1).cloned().flatten()) {
                    (Some(name), Some(value)) => Some(format!(
                        "SELECT pg_catalog.setval({}, {value});",
                        literal(&name)
                    )),
                    _ => None,
                },
            )
            .collect();
        for f in followers(config) {
            let name = config.node_name(f);
            let mut follower_conn = follower_database(
                config,
                f,
                db,
                &mut conn,
                false,
                statement_setup::FOLLOWER_OPTIONS,
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut recorded = statement_setup::ensure_bookkeeping(&mut follower_conn)
                .await
                .map_err(|e| e.to_string());
            if recorded.is_ok() && !set_sequences.is_empty() {
                recorded = follower_conn
                    .query(&set_sequences)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        format!("setting sequences to the leader's values: {}", e.message)
                    });
            }
            if recorded.is_ok() {
                recorded = follower_conn
                    .query(&format!(
                        "INSERT INTO pgrelay.applied (source, seq) VALUES ({src}, {end}) \
                         ON CONFLICT (source) DO UPDATE SET seq = EXCLUDED.seq, diverged = NULL, \
                            updated_at = now()",
                        src = literal(log::APPLIED_SOURCE)
                    ))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.message);
            }
            follower_conn.terminate().await;
            recorded.map_err(|e| {
                format!("follower {name}, database {db}: recording the statement-mode start: {e}")
            })?;
            info!(follower = %name, database = %db, seq = end, "statement mode starts here");
        }
        conn.terminate().await;
    }
    // Committed to statement mode from here: what row mode leaves behind goes.
    for db in databases {
        let mut conn = leader(config, db).await?;
        for f in followers(config) {
            let slot = slot_name(&config.node_name(f), db);
            drop_slot_when_free(&mut conn, &slot, Duration::from_secs(10)).await?;
            if let Ok(mut follower_conn) =
                connect_own(config, f, db, "pgrelay mode switch", false).await
            {
                let _ = follower_conn
                    .query(&format!(
                        "DELETE FROM pgrelay.applied WHERE source = {}",
                        literal(&slot)
                    ))
                    .await;
                follower_conn.terminate().await;
            }
        }
        conn.terminate().await;
    }
    Ok(())
}

/// Drops `slot` once no walsender uses it (the stopped mode's stream may take a moment to
/// go); nothing to do when it does not exist.
async fn drop_slot_when_free(
    conn: &mut BackendConn,
    slot: &str,
    wait: Duration,
) -> Result<(), String> {
    let end = Instant::now() + wait;
    loop {
        match row_setup::slot_state(conn, slot)
            .await
            .map_err(|e| e.to_string())?
        {
            None => return Ok(()),
            Some(false) => {
                row_setup::drop_slot(conn, slot)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Some(true) if Instant::now() >= end => {
                return Err(format!(
                    "replication slot \"{slot}\" is still in use; is another pgrelay process \
                     replicating in row mode?"
                ))
            }
            Some(true) => {
                // The walsender of the stream that was just stopped exits on its own soon.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
