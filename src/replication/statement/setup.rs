//! What statement mode needs in a follower database before it replays: the replayer lock, the
//! functions rewritten statements call, `pgrelay.applied` with a `seq` column, and, for an
//! empty database, a copy of the leader taken in the same snapshot as the log's position.
//! Row mode's parts do the work ([`row::setup::inspect_follower_at`], [`row::bootstrap`]).
//! <https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-SNAPSHOT-SYNCHRONIZATION>

use std::sync::Arc;

use tracing::info;

use crate::backend::{connect_own_with, BackendConn, QueryError};
use crate::config::Config;
use crate::metrics::FollowerMetrics;

use super::super::row::setup::{inspect_follower_at, literal, FollowerDb, APPLIED_TABLE_SQL};
use super::super::row::{bootstrap, LEADER_OPTIONS};
use super::log::{APPLIED_SOURCE, FUNCTIONS_SQL, REPLAYER_LOCK};
use super::ReplayError;

/// Settings of the replaying connection: the text forms row mode uses, and a commit is on
/// disk before its seq is reported. Unlike row mode's `session_replication_role = replica`,
/// triggers and foreign keys run: the statements are executed again, as on the leader.
pub(crate) const FOLLOWER_OPTIONS: &str = "-c datestyle=ISO -c intervalstyle=postgres \
     -c extra_float_digits=3 -c TimeZone=UTC -c synchronous_commit=on";

fn follower_error(what: &str) -> impl Fn(QueryError) -> ReplayError + '_ {
    move |e| ReplayError::Follower(format!("{what}: {}", e.message))
}

fn single(rows: Vec<Vec<Option<String>>>) -> Option<String> {
    rows.into_iter()
        .next()
        .and_then(|r| r.into_iter().next())
        .flatten()
}

/// Takes the replayer lock on `conn`'s database (session-level, without waiting); false when
/// another process holds it.
pub async fn try_lock(conn: &mut BackendConn) -> Result<bool, ReplayError> {
    let got = conn
        .query(&format!(
            "SELECT pg_catalog.pg_try_advisory_lock({REPLAYER_LOCK})"
        ))
        .await
        .map(single)
        .map_err(follower_error("taking the replayer lock"))?;
    Ok(got.as_deref() == Some("t"))
}

/// The seq the follower recorded, None while it has none (or stopped on a divergence): what
/// a process that does not hold the lock publishes.
pub async fn recorded_seq(conn: &mut BackendConn) -> Result<Option<u64>, ReplayError> {
    let rows = conn
        .query(&format!(
            "SELECT seq FROM pgrelay.applied WHERE source = {} AND diverged IS NULL",
            literal(APPLIED_SOURCE)
        ))
        .await;
    match rows {
        Ok(rows) => Ok(single(rows).and_then(|s| s.parse().ok())),
        // Not created yet (the other process is still setting up).
        Err(e) if e.code == "42P01" || e.code == "42703" => Ok(None),
        Err(e) => Err(follower_error("reading the recorded seq")(e)),
    }
}

/// What lets a replay connection, logged in as the entry's author, move the recorded seq
/// in the entry's own transaction and nothing else: `pgrelay.replay_advance` runs with its
/// owner's rights (pgrelay's replication user) but only for a session whose backend pid and
/// key pgrelay registered in `pgrelay.replay_keys` through its own connection. The key is
/// sent as a parameter, never in query text, and no other role can read the table; so the
/// replayed statements, which run before it in that session, cannot move the seq themselves.
pub const REPLAY_ADVANCE_SQL: &str = r#"
CREATE TABLE IF NOT EXISTS pgrelay.replay_keys (pid integer PRIMARY KEY, key text NOT NULL);
REVOKE ALL ON pgrelay.replay_keys FROM PUBLIC;
CREATE OR REPLACE FUNCTION pgrelay.replay_advance(from_seq bigint, to_seq bigint, replay_key text)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS
$f$
DECLARE
  moved integer;
BEGIN
  IF NOT EXISTS (SELECT FROM pgrelay.replay_keys k
                 WHERE k.pid = pg_catalog.pg_backend_pid() AND k.key = replay_key) THEN
    RAISE EXCEPTION 'pgrelay.replay_advance is for pgrelay''s replayer' USING ERRCODE = '42501';
  END IF;
  UPDATE pgrelay.applied SET seq = to_seq, updated_at = pg_catalog.now()
   WHERE source = 'statement' AND seq = from_seq;
  GET DIAGNOSTICS moved = ROW_COUNT;
  RETURN moved;
END
$f$;
REVOKE ALL ON FUNCTION pgrelay.replay_advance(bigint, bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgrelay.replay_advance(bigint, bigint, text) TO PUBLIC;
"#;

/// Registers `key` for the replay connection with backend `pid` (through pgrelay's own
/// connection), dropping the keys of sessions that are gone.
pub async fn register_replay_key(
    conn: &mut BackendConn,
    pid: i32,
    key: &str,
) -> Result<(), ReplayError> {
    conn.query(&format!(
        "DELETE FROM pgrelay.replay_keys WHERE pid NOT IN \
           (SELECT pid FROM pg_catalog.pg_stat_activity WHERE pid IS NOT NULL); \
         INSERT INTO pgrelay.replay_keys (pid, key) VALUES ({pid}, {}) \
           ON CONFLICT (pid) DO UPDATE SET key = EXCLUDED.key",
        literal(key)
    ))
    .await
    .map(|_| ())
    .map_err(follower_error("registering a replay connection"))
}

/// Creates the functions and `pgrelay.applied` (with its `seq` column), idempotently.
pub async fn ensure_bookkeeping(conn: &mut BackendConn) -> Result<(), ReplayError> {
    conn.query(&format!(
        "{FUNCTIONS_SQL}; {APPLIED_TABLE_SQL}; \
         ALTER TABLE pgrelay.applied ADD COLUMN IF NOT EXISTS seq bigint; {REPLAY_ADVANCE_SQL}"
    ))
    .await
    .map(|_| ())
    .map_err(follower_error(
        "creating pgrelay's functions and pgrelay.applied",
    ))
}

/// The highest seq the leader's log ever handed out (committed or not).
pub async fn leader_log_end(leader: &mut BackendConn) -> Result<u64, ReplayError> {
    let end = leader
        .query("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM pgrelay.statement_seq")
        .await
        .map(single)
        .map_err(|e| {
            ReplayError::Leader(format!("reading pgrelay.statement_seq: {}", e.message))
        })?;
    Ok(end.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// What the follower database holds for statement mode.
pub async fn inspect(conn: &mut BackendConn) -> Result<FollowerDb, ReplayError> {
    Ok(inspect_follower_at(conn, APPLIED_SOURCE, "seq::text", |t| t.parse().ok()).await?)
}

/// The seq an empty follower database starts from, and the snapshot it is copied in: a
/// transaction on the leader that must stay open until the copy is done.
struct LogSnapshot {
    conn: BackendConn,
    snapshot: String,
    seq: u64,
}

/// Opens the snapshot. It sees exactly the entries committed before it, and the data they
/// wrote: seqs are taken under a lock held until commit, so the highest visible seq is where
/// replay starts.
async fn log_snapshot(config: &Config, database: &str) -> Result<LogSnapshot, ReplayError> {
    let mut conn = connect_own_with(
        config,
        config.leader,
        database,
        "pgrelay statement bootstrap",
        false,
        LEADER_OPTIONS,
    )
    .await
    .map_err(ReplayError::Leader)?;
    let rows = conn
        .query(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SELECT pg_catalog.pg_export_snapshot(), \
                    coalesce((SELECT max(seq) FROM pgrelay.statement_log), 0)",
        )
        .await
        .map_err(|e| ReplayError::Leader(format!("exporting a snapshot: {}", e.message)))?;
    let row = rows.into_iter().next().unwrap_or_default();
    let mut it = row.into_iter().flatten();
    match (it.next(), it.next().and_then(|s| s.parse().ok())) {
        (Some(snapshot), Some(seq)) => Ok(LogSnapshot {
            conn,
            snapshot,
            seq,
        }),
        _ => Err(ReplayError::Leader(
            "exporting a snapshot: no snapshot name or seq".into(),
        )),
    }
}

/// Copies the leader database into the empty follower database (`follower_conn`) and records
/// the seq replay starts after. Returns that seq.
pub async fn bootstrap(
    config: &Arc<Config>,
    node: usize,
    database: &str,
    follower_conn: &mut BackendConn,
    metrics: Option<Arc<FollowerMetrics>>,
) -> Result<u64, ReplayError> {
    let follower = config.node_name(node);
    let snap = log_snapshot(config, database).await?;
    info!(follower = %follower, database, seq = snap.seq, "bootstrapping from a snapshot");
    let boot = bootstrap::Bootstrap {
        config,
        follower: node,
        follower_name: &follower,
        database,
        source: APPLIED_SOURCE,
        snapshot: &snap.snapshot,
        metrics,
    };
    let copied = boot.run(follower_conn).await;
    copied?;
    // pg_dump leaves schema pgrelay out: the functions are created again (idempotent).
    follower_conn
        .query(&format!(
            "{FUNCTIONS_SQL}; UPDATE pgrelay.applied SET seq = {}, updated_at = pg_catalog.now() \
             WHERE source = {}",
            snap.seq,
            literal(APPLIED_SOURCE)
        ))
        .await
        .map_err(follower_error("finishing the bootstrap"))?;
    let mut conn = snap.conn;
    let _ = conn.query("COMMIT").await;
    conn.terminate().await;
    Ok(snap.seq)
}
