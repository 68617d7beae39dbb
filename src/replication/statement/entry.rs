//! Reading the log on the leader: the entries a follower has yet to apply, decoded, and how
//! far behind it is.
//!
//! The JSON columns are decoded here ([`log::decode_statements`]); `copy_data` is sent as hex
//! text, one element per block, so that no `bytea[]` text form has to be parsed.

use std::time::Duration;

use crate::backend::BackendConn;

use super::log::{self, LoggedStatement};
use super::ReplayError;

/// One committed leader transaction, ready to replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: u64,
    /// The leader session's user; the replay runs as this role.
    pub role: String,
    /// `SET LOCAL ...` statements to run first.
    pub settings: Vec<String>,
    pub statements: Vec<LoggedStatement>,
    /// What the leader's `pgrelay.random/uuid/nextval` produced, comma-separated ("" for none).
    pub gen_values: String,
    /// The data of the entry's COPY ... FROM STDIN statements; `copy: i` is `copy_data[i - 1]`.
    pub copy_data: Vec<Vec<u8>>,
    /// `pg_column_size` of the row on the leader.
    pub size_bytes: u64,
    /// How long ago it was logged, when it was read.
    pub age: Duration,
}

impl Entry {
    /// The data block of the statement with `copy: index` (counted from 1).
    pub fn copy_block(&self, index: usize) -> Option<&[u8]> {
        index
            .checked_sub(1)
            .and_then(|i| self.copy_data.get(i))
            .map(Vec::as_slice)
    }
}

/// The entries after `after`, oldest first, at most `limit`.
fn fetch_sql(after: u64, limit: usize) -> String {
    format!(
        "SELECT seq, role, settings::text, statements::text, coalesce(gen_values, ''), \
                coalesce(pg_catalog.cardinality(copy_data), 0), \
                pg_catalog.array_to_string(ARRAY(SELECT coalesce(pg_catalog.encode(c.b, 'hex'), '') \
                    FROM pg_catalog.unnest(copy_data) WITH ORDINALITY AS c(b, i) ORDER BY c.i), ','), \
                pg_catalog.pg_column_size(l.*), \
                greatest(extract(epoch FROM pg_catalog.clock_timestamp() - logged_at), 0) \
         FROM pgrelay.statement_log l WHERE seq > {after} ORDER BY seq LIMIT {limit}"
    )
}

/// What one read of the log found.
#[derive(Debug)]
pub struct Fetched {
    /// The entries up to the first that cannot be read.
    pub entries: Vec<Entry>,
    /// Why the entry after them cannot be read: replay stops there.
    pub unreadable: Option<ReplayError>,
}

/// Reads the entries after `after` (at most `limit`) from the leader database.
pub async fn fetch(
    leader: &mut BackendConn,
    after: u64,
    limit: usize,
) -> Result<Fetched, ReplayError> {
    let rows = leader
        .query(&fetch_sql(after, limit))
        .await
        .map_err(|e| ReplayError::Leader(format!("reading the statement log: {}", e.message)))?;
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        match parse_row(row) {
            Ok(e) => entries.push(e),
            Err(e) => {
                return Ok(Fetched {
                    entries,
                    unreadable: Some(e),
                })
            }
        }
    }
    Ok(Fetched {
        entries,
        unreadable: None,
    })
}

/// Decodes one row of [`fetch_sql`].
fn parse_row(row: Vec<Option<String>>) -> Result<Entry, ReplayError> {
    let mut it = row.into_iter();
    let mut next = || it.next().flatten().unwrap_or_default();
    let seq_text = next();
    let seq: u64 = seq_text
        .parse()
        .map_err(|_| ReplayError::BadEntry(format!("seq {seq_text:?} is not a number")))?;
    let bad = |what: String| ReplayError::BadEntry(format!("entry seq {seq}: {what}"));
    let role = next();
    let settings = log::decode_settings(&next()).map_err(bad)?;
    let statements = log::decode_statements(&next()).map_err(bad)?;
    let gen_values = next();
    let blocks: usize = next().parse().unwrap_or(0);
    let hex = next();
    let copy_data = if blocks == 0 {
        Vec::new()
    } else {
        hex.split(',')
            .map(log::unhex)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("copy_data: {e}")))?
    };
    let size_bytes = next().parse().unwrap_or(0);
    let age = next()
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(Duration::ZERO);
    Ok(Entry {
        seq,
        role,
        settings,
        statements,
        gen_values,
        copy_data,
        size_bytes,
        age,
    })
}

/// What waits for a follower in one database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Entries after the follower's seq.
    pub entries: u64,
    /// Their `pg_column_size` summed.
    pub bytes: u64,
    /// How long ago the oldest of them was logged.
    pub oldest: Duration,
}

/// Counts the entries after `after`. It reads every pending entry, so it is not run on every
/// poll when the backlog is long.
pub async fn backlog(leader: &mut BackendConn, after: u64) -> Result<Backlog, ReplayError> {
    let rows = leader
        .query(&format!(
            "SELECT count(*), coalesce(sum(pg_catalog.pg_column_size(l.*)), 0), \
                    coalesce(greatest(extract(epoch FROM \
                        pg_catalog.clock_timestamp() - min(logged_at)), 0), 0) \
             FROM pgrelay.statement_log l WHERE seq > {after}"
        ))
        .await
        .map_err(|e| ReplayError::Leader(format!("measuring the backlog: {}", e.message)))?;
    let row = rows.into_iter().next().unwrap_or_default();
    let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok(Backlog {
        entries: text(0).parse().unwrap_or(0),
        bytes: text(1).parse().unwrap_or(0),
        oldest: text(2)
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or(Duration::ZERO),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn row(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some((*v).to_owned())).collect()
    }

    #[test]
    fn a_row_decodes_into_an_entry() {
        let e = parse_row(row(&[
            "7",
            "app",
            r#"["SET LOCAL pgrelay.now = '2020-01-01'"]"#,
            r#"[{"sql": "COPY t FROM STDIN", "copy": 2}]"#,
            "0.5,42",
            "2",
            "310a,",
            "120",
            "1.5",
        ]))
        .unwrap();
        assert_eq!(e.seq, 7);
        assert_eq!(e.role, "app");
        assert_eq!(e.settings.len(), 1);
        assert_eq!(e.statements[0].copy, Some(2));
        assert_eq!(e.copy_block(1), Some(&b"1\n"[..]));
        assert_eq!(e.copy_block(2), Some(&b""[..]));
        assert_eq!(e.copy_block(0), None);
        assert_eq!(e.copy_block(3), None);
        assert_eq!(e.size_bytes, 120);
        assert_eq!(e.age, Duration::from_millis(1500));
    }

    #[test]
    fn a_malformed_entry_names_its_seq() {
        let err = parse_row(row(&["9", "app", "[]", "not json", "", "0", "", "1", "0"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("seq 9"), "{err}");
    }
}
