//! What row mode needs on the leader and on each follower, created idempotently and checked
//! with errors that say what to change: `wal_level = logical`, a role allowed to replicate, a
//! publication of every table, one logical slot per follower and database, and on each
//! follower the table `pgrelay.applied` that records, in the same transaction as the changes,
//! the leader position applied.
//! <https://www.postgresql.org/docs/current/logical-replication-config.html>

use crate::backend::{BackendConn, QueryError};

use super::RowError;

/// The publication pgrelay creates in every replicated leader database.
pub const PUBLICATION: &str = "pgrelay";

/// The slot that streams `database` to `follower`: `pgrelay_<follower>_<database>`, made of
/// the characters slot names allow and cut to Postgres's 63 bytes. A name that had to be
/// changed gets a hash of the original, so that two followers or databases never share a slot.
pub fn slot_name(follower: &str, database: &str) -> String {
    let raw = format!("pgrelay_{follower}_{database}");
    let clean: String = raw
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    if clean == raw && clean.len() <= 63 {
        return clean;
    }
    let hash = raw.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let keep: String = clean.chars().take(63 - 17).collect();
    format!("{keep}_{hash:016x}")
}

/// Quotes an identifier for SQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL (standard_conforming_strings is on since Postgres 9.1).
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn leader_error(what: &str, e: QueryError) -> RowError {
    RowError::Leader(format!("{what}: {}", e.message))
}

fn single(rows: Vec<Vec<Option<String>>>) -> Option<String> {
    rows.into_iter()
        .next()
        .and_then(|r| r.into_iter().next())
        .flatten()
}

/// Checks the leader can do row mode and creates the publication in `database` (idempotent).
/// `leader` is an ordinary connection to that database.
pub async fn prepare_leader(leader: &mut BackendConn, database: &str) -> Result<(), RowError> {
    let wal_level = leader
        .query("SHOW wal_level")
        .await
        .map(single)
        .map_err(|e| leader_error("reading wal_level", e))?
        .unwrap_or_default();
    if wal_level != "logical" {
        return Err(RowError::Setup(format!(
            "the leader has wal_level = {wal_level}; row mode needs wal_level = logical \
             (ALTER SYSTEM SET wal_level = logical, then restart the leader)"
        )));
    }
    let rows = leader
        .query(
            "SELECT r.rolsuper, r.rolreplication, current_user, \
                    current_setting('max_replication_slots')::int, \
                    (SELECT count(*) FROM pg_replication_slots)::int \
             FROM pg_roles r WHERE r.rolname = current_user",
        )
        .await
        .map_err(|e| leader_error("reading the role's privileges", e))?;
    let row = rows.into_iter().next().unwrap_or_default();
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let (superuser, replication, user) = (get(0) == "t", get(1) == "t", get(2));
    if !superuser {
        // FOR ALL TABLES publications and reading every table need a superuser.
        return Err(RowError::Setup(format!(
            "role \"{user}\" (replication.user) is not a superuser; row mode creates a \
             publication FOR ALL TABLES and copies every table, which needs one{}",
            if replication {
                ""
            } else {
                " (and the REPLICATION attribute)"
            }
        )));
    }
    let exists = leader
        .query(&format!(
            "SELECT puballtables FROM pg_publication WHERE pubname = {}",
            literal(PUBLICATION)
        ))
        .await
        .map_err(|e| leader_error("reading publications", e))?;
    match single(exists).as_deref() {
        Some("t") => Ok(()),
        Some(_) => Err(RowError::Setup(format!(
            "database \"{database}\" on the leader has a publication named \"{PUBLICATION}\" \
             that is not FOR ALL TABLES; drop it so pgrelay can create its own"
        ))),
        None => {
            let created = leader
                .query(&format!(
                    "CREATE PUBLICATION {} FOR ALL TABLES",
                    ident(PUBLICATION)
                ))
                .await;
            match created {
                Ok(_) => Ok(()),
                // Another pgrelay process created it at the same moment.
                Err(e) if e.code == "42710" || e.code == "23505" => Ok(()),
                Err(e) => Err(leader_error("creating the publication", e)),
            }
        }
    }
}

/// Whether the leader has `slot`, and whether a walsender uses it right now.
pub async fn slot_state(leader: &mut BackendConn, slot: &str) -> Result<Option<bool>, RowError> {
    let rows = leader
        .query(&format!(
            "SELECT active FROM pg_replication_slots WHERE slot_name = {}",
            literal(slot)
        ))
        .await
        .map_err(|e| leader_error("reading replication slots", e))?;
    Ok(single(rows).map(|active| active == "t"))
}

/// Drops a slot of pgrelay's that a failed bootstrap left behind.
pub async fn drop_slot(leader: &mut BackendConn, slot: &str) -> Result<(), RowError> {
    leader
        .query(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = {} AND NOT active",
            literal(slot)
        ))
        .await
        .map(|_| ())
        .map_err(|e| leader_error("dropping a stale replication slot", e))
}

/// What a follower database holds for one source (slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowerDb {
    /// No database of that name on the follower.
    Missing,
    /// No user tables and no pgrelay record: ready for a bootstrap.
    Empty,
    /// A bootstrap started and did not finish: its partial copy must go.
    PartialBootstrap,
    /// Bootstrapped; changes applied up to this position.
    Applied(u64),
    /// User tables that pgrelay did not put there.
    Foreign { tables: i64 },
    /// Applying found the follower different from the leader; it stays stopped until someone
    /// looks (the reason is in `pgrelay.applied.diverged`).
    Diverged(String),
}

pub const APPLIED_TABLE_SQL: &str = "CREATE SCHEMA IF NOT EXISTS pgrelay; \
     CREATE TABLE IF NOT EXISTS pgrelay.applied ( \
        source text PRIMARY KEY, \
        position pg_lsn, \
        updated_at timestamptz NOT NULL DEFAULT now(), \
        diverged text)";

/// Marks `source` as diverged (parameter-free: the reason is quoted in).
pub fn mark_diverged_sql(source: &str, why: &str) -> String {
    format!(
        "UPDATE pgrelay.applied SET diverged = {} WHERE source = {}",
        literal(why),
        literal(source)
    )
}

/// Advances the position of `source` (parameters: from, to, as LSNs) in plain SQL: when the
/// position is not at `from`, the division by zero fails the statement and so the transaction
/// (cheaper than calling `pgrelay.advance` for every group; the applier names the problem).
pub fn advance_sql(source: &str) -> String {
    format!(
        "WITH moved AS (UPDATE pgrelay.applied SET position = $2::pg_lsn, updated_at = now() \
         WHERE source = {} AND position = $1::pg_lsn RETURNING 1) \
         SELECT 1 / (SELECT count(*)::int FROM moved)",
        literal(source)
    )
}

/// Reads what `follower` (a connection to the follower database) holds for `source`.
pub async fn inspect_follower(
    follower: &mut BackendConn,
    source: &str,
) -> Result<FollowerDb, RowError> {
    inspect_follower_at(
        follower,
        source,
        "position::text",
        super::super::positions::parse_lsn,
    )
    .await
}

/// Like [`inspect_follower`], for a mode that records its position in `column` of
/// `pgrelay.applied` (an SQL expression giving text that `parse` reads; NULL while a
/// bootstrap runs).
pub(crate) async fn inspect_follower_at(
    follower: &mut BackendConn,
    source: &str,
    column: &str,
    parse: fn(&str) -> Option<u64>,
) -> Result<FollowerDb, RowError> {
    let fail =
        |e: QueryError| RowError::Follower(format!("inspecting the database: {}", e.message));
    let has_table = follower
        .query("SELECT to_regclass('pgrelay.applied') IS NOT NULL")
        .await
        .map(single)
        .map_err(fail)?;
    if has_table.as_deref() == Some("t") {
        let rows = follower
            .query(&format!(
                "ALTER TABLE pgrelay.applied ADD COLUMN IF NOT EXISTS diverged text; \
                 SELECT {column}, diverged FROM pgrelay.applied WHERE source = {}",
                literal(source)
            ))
            .await
            .map_err(fail)?;
        if let Some(row) = rows.into_iter().next() {
            let mut row = row.into_iter();
            let position = row.next().flatten().as_deref().and_then(parse);
            return Ok(match (position, row.next().flatten()) {
                (_, Some(why)) => FollowerDb::Diverged(why),
                (Some(p), None) => FollowerDb::Applied(p),
                (None, None) => FollowerDb::PartialBootstrap,
            });
        }
    }
    let tables = follower
        .query(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgrelay') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'",
        )
        .await
        .map(single)
        .map_err(fail)?
        .and_then(|t| t.parse::<i64>().ok())
        .unwrap_or(0);
    Ok(if tables == 0 {
        FollowerDb::Empty
    } else {
        FollowerDb::Foreign { tables }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_and_distinct() {
        assert_eq!(slot_name("f1", "app"), "pgrelay_f1_app");
        let a = slot_name("Follower-1", "app");
        let b = slot_name("follower_1", "app");
        assert_ne!(a, b);
        for name in [a, b, slot_name("f", &"x".repeat(100))] {
            assert!(name.len() <= 63, "{name}");
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
        assert_ne!(
            slot_name("f", &"x".repeat(100)),
            slot_name("f", &"x".repeat(101))
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
