//! Applying log entries on a follower: each entry in one follower transaction that runs the
//! leader transaction's statements again and moves the recorded `seq` from the previous
//! entry's to its own, so the follower holds exactly the entries up to its recorded `seq`
//! after any crash.
//!
//! A batch of entries is pipelined: every message of every entry is written before the first
//! reply is read (one round trip per batch). Inside an explicit transaction a Sync does not
//! commit, so extended-protocol statements fit in. When a step fails, its transaction's COMMIT
//! rolls back, and the entries after it fail too: their `seq` update expects the failed
//! entry's `seq` (see [`ADVANCE_SQL`]).
//!
//! An entry runs on a connection logged in as its author (the leader session's user, with
//! its `[[users]]` password), never on pgrelay's superuser connection: `SET ROLE NONE`,
//! `RESET ROLE` or `SET SESSION AUTHORIZATION` in the replayed text fall back to the author,
//! so a replay can do on the follower exactly what its author could do on the leader. The
//! seq moves in the entry's transaction through `pgrelay.replay_advance`, which only a
//! connection pgrelay registered with a key may call ([`setup::REPLAY_ADVANCE_SQL`]).
//! Consecutive entries of one author are pipelined together; the next author's entries wait
//! for the previous commit, so commit order stays.
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-PIPELINING>

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;

use crate::backend::{connect_as, BackendConn};
use crate::config::Config;
use crate::metrics::FollowerMetrics;
use crate::protocol::backend::{self as be, tag};
use crate::protocol::frontend as fe;

use super::super::row::setup::literal;
use super::entry::Entry;
use super::setup;
use super::ReplayError;

/// COPY data goes out in messages of at most this size.
const COPY_CHUNK: usize = 64 * 1024;

/// Moves the recorded seq from `$1` to `$2` (the replay connection's key is `$3`); when the
/// recorded seq is not `$1`, the division by zero fails the statement, and so the transaction.
pub const ADVANCE_SQL: &str = "SELECT 1 / pgrelay.replay_advance($1::bigint, $2::bigint, $3::text)";

/// Replay connections kept open per follower database (one per author); past it the others
/// are closed.
const MAX_AUTHORS: usize = 16;

/// The first step of every entry: the author itself, whatever an earlier entry left set.
const AS_AUTHOR_SQL: &str = "SET LOCAL SESSION AUTHORIZATION DEFAULT; SET LOCAL ROLE NONE";

/// One part of a replayed transaction: what one ReadyForQuery ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Begin,
    /// [`AS_AUTHOR_SQL`].
    Role,
    /// Index in `settings`, from 1.
    Setting(usize),
    Replaying,
    /// Index in `statements`, from 1.
    Statement(usize),
    Advance,
    Commit,
}

impl Step {
    /// Whether a failure of this step means the follower cannot do what the leader did (as
    /// opposed to pgrelay's own bookkeeping failing).
    fn replays_the_leader(self) -> bool {
        matches!(
            self,
            Step::Role | Step::Setting(_) | Step::Replaying | Step::Statement(_) | Step::Commit
        )
    }

    fn describe(self) -> String {
        match self {
            Step::Begin => "BEGIN".into(),
            Step::Role => "SET LOCAL ROLE NONE".into(),
            Step::Setting(i) => format!("setting {i}"),
            Step::Replaying => "setting the generated values".into(),
            Step::Statement(i) => format!("statement {i}"),
            Step::Advance => "recording the seq".into(),
            Step::Commit => "COMMIT".into(),
        }
    }
}

/// The first error of a batch.
#[derive(Debug)]
struct Failure {
    seq: u64,
    step: Step,
    code: String,
    message: String,
}

/// SQLSTATEs of a failure that says nothing about the follower's data: retry the entry.
fn is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "40001" | "40P01" | "55P03" | "")
}

/// A connection logged in as one author, and the key pgrelay registered for it.
struct Author {
    conn: BackendConn,
    key: String,
}

/// Replays entries into one follower database; holds pgrelay's own connection there (which
/// holds the replayer lock) and a connection per author.
pub struct Replayer {
    conn: BackendConn,
    config: Arc<Config>,
    node: usize,
    authors: HashMap<String, Author>,
    follower: String,
    database: String,
    /// The recorded seq: every entry up to it is committed on the follower.
    applied: u64,
    metrics: Option<Arc<FollowerMetrics>>,
}

impl Replayer {
    /// `conn`: pgrelay's connection to follower `node`'s database; `applied`: the seq the
    /// follower recorded.
    pub fn new(
        conn: BackendConn,
        config: Arc<Config>,
        node: usize,
        database: &str,
        applied: u64,
        metrics: Option<Arc<FollowerMetrics>>,
    ) -> Replayer {
        Replayer {
            conn,
            follower: config.node_name(node),
            config,
            node,
            authors: HashMap::new(),
            database: database.to_owned(),
            applied,
            metrics,
        }
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// pgrelay's own follower connection, idle between batches.
    pub fn conn(&mut self) -> &mut BackendConn {
        &mut self.conn
    }

    pub async fn close(self) {
        for (_, a) in self.authors {
            a.conn.terminate().await;
        }
        self.conn.terminate().await;
    }

    fn io_error(&self, e: std::io::Error) -> ReplayError {
        ReplayError::Follower(format!(
            "follower \"{}\" database \"{}\": connection lost: {e}",
            self.follower, self.database
        ))
    }

    /// Applies `entries` (in `seq` order, all after [`Replayer::applied`]): one round trip per
    /// run of consecutive entries of one author. On an error, [`Replayer::applied`] still
    /// says what was committed before it.
    /// Not cancel-safe: a cancelled batch leaves a connection mid-pipeline (drop the
    /// replayer; the follower rolls the open transaction back).
    pub async fn apply(&mut self, entries: &[Entry]) -> Result<(), ReplayError> {
        let mut rest = entries;
        while let Some(first) = rest.first() {
            let run = rest.iter().take_while(|e| e.role == first.role).count();
            let (now, later) = rest.split_at(run);
            self.apply_run(&first.role, now).await?;
            rest = later;
        }
        Ok(())
    }

    /// The connection of `role`, opened and registered when there is none.
    async fn open_author(&mut self, role: &str) -> Result<Author, ReplayError> {
        if self.authors.len() >= MAX_AUTHORS {
            for (_, a) in self.authors.drain() {
                a.conn.terminate().await;
            }
        }
        let mut conn = connect_as(
            &self.config,
            self.node,
            &self.database,
            role,
            "pgrelay replay",
            setup::FOLLOWER_OPTIONS,
        )
        .await
        .map_err(|e| {
            ReplayError::Setup(format!(
                "follower \"{}\" database \"{}\": cannot replay the statements of role \
                 \"{role}\", which pgrelay replays as that role: {e}",
                self.follower, self.database
            ))
        })?;
        let pid = conn
            .query("SELECT pg_catalog.pg_backend_pid()")
            .await
            .ok()
            .and_then(|rows| rows.into_iter().next())
            .and_then(|r| r.into_iter().next().flatten())
            .and_then(|p| p.parse::<i32>().ok())
            .ok_or_else(|| {
                ReplayError::Follower(format!(
                    "follower \"{}\": cannot read the replay connection's backend pid",
                    self.follower
                ))
            })?;
        let key = format!("{:032x}", rand::random::<u128>());
        setup::register_replay_key(&mut self.conn, pid, &key).await?;
        Ok(Author { conn, key })
    }

    /// Applies consecutive entries of `role` in one round trip on its connection.
    async fn apply_run(&mut self, role: &str, entries: &[Entry]) -> Result<(), ReplayError> {
        let mut author = match self.authors.remove(role) {
            Some(a) => a,
            None => self.open_author(role).await?,
        };
        let mut steps: Vec<(u64, Step)> = Vec::new();
        let mut previous = self.applied;
        // An entry that cannot be queued stops the batch there: the entries before it are
        // applied, its own half-queued messages are dropped.
        let mut unqueued: Option<ReplayError> = None;
        for entry in entries {
            let (bytes, queued) = (author.conn.wbuf.len(), steps.len());
            let queuing = queue_entry(
                &mut author.conn.wbuf,
                entry,
                previous,
                &author.key,
                &mut steps,
            );
            if let Err(e) = queuing {
                author.conn.wbuf.truncate(bytes);
                steps.truncate(queued);
                unqueued = Some(e);
                break;
            }
            previous = entry.seq;
        }
        if let Err(e) = author.conn.flush_while_reading().await {
            return Err(self.io_error(e));
        }
        let mut failure: Option<Failure> = None;
        let mut entry_failed = false;
        for (seq, step) in steps {
            if step == Step::Begin {
                entry_failed = false;
            }
            let (error, complete) = match read_until_ready(&mut author.conn).await {
                Ok(r) => r,
                // The connection is gone (and not kept).
                Err(e) => return Err(self.io_error(e)),
            };
            if let Some(f) = error {
                entry_failed = true;
                if failure.is_none() {
                    failure = Some(Failure {
                        seq,
                        step,
                        code: f.code,
                        message: f.message,
                    });
                }
            }
            if step == Step::Commit && !entry_failed && complete.as_deref() == Some("COMMIT") {
                self.applied = seq;
                if let Some(m) = &self.metrics {
                    m.apply_transactions.increment(1);
                }
            }
        }
        self.authors.insert(role.to_owned(), author);
        match (failure, unqueued) {
            (Some(f), _) => Err(self.classify(f)),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(()),
        }
    }

    /// Turns the first error of a batch into what the database task does about it.
    fn classify(&self, f: Failure) -> ReplayError {
        let at = format!(
            "follower \"{}\" database \"{}\" entry seq {} {}",
            self.follower,
            self.database,
            f.seq,
            f.step.describe()
        );
        if f.step == Step::Advance && f.code == "22012" {
            return ReplayError::Follower(format!(
                "{at}: the recorded seq is not {} any more (does another process replay into \
                 this database?)",
                self.applied
            ));
        }
        if f.step.replays_the_leader() && !is_transient(&f.code) {
            return ReplayError::Diverged {
                seq: f.seq,
                message: format!("{at}: {} (SQLSTATE {})", f.message, f.code),
            };
        }
        ReplayError::Follower(format!("{at}: {} (SQLSTATE {})", f.message, f.code))
    }
}

/// Reads replies up to the next ReadyForQuery: the first error among them, and the tag of the
/// last CommandComplete.
async fn read_until_ready(
    conn: &mut BackendConn,
) -> std::io::Result<(Option<be::ErrorFields>, Option<String>)> {
    let mut error = None;
    let mut complete = None;
    loop {
        let frame = conn.read_frame().await?;
        match frame.tag() {
            tag::ERROR_RESPONSE if error.is_none() => {
                error = Some(be::parse_error_fields(&frame.body()).unwrap_or_default());
            }
            tag::COMMAND_COMPLETE => {
                complete = be::parse_command_complete(&frame.body())
                    .ok()
                    .map(str::to_owned);
            }
            tag::READY_FOR_QUERY => return Ok((error, complete)),
            // Rows, notices, CopyInResponse (the data is on its way already): nothing to do.
            _ => {}
        }
    }
}

/// Queues every message of one entry's transaction (the previous entry's seq is
/// `previous`, the connection's key `key`), and the steps whose replies follow, one per
/// ReadyForQuery.
fn queue_entry(
    out: &mut BytesMut,
    entry: &Entry,
    previous: u64,
    key: &str,
    steps: &mut Vec<(u64, Step)>,
) -> Result<(), ReplayError> {
    let seq = entry.seq;
    let query = |out: &mut BytesMut, sql: &str, step: Step| {
        fe::query(out, sql);
        (seq, step)
    };
    steps.push(query(out, "BEGIN", Step::Begin));
    steps.push(query(out, AS_AUTHOR_SQL, Step::Role));
    for (i, setting) in entry.settings.iter().enumerate() {
        steps.push(query(out, setting, Step::Setting(i + 1)));
    }
    // Always on: a statement that asks for a value the leader did not record fails
    // rather than making up a new one.
    let replaying = format!(
        "SET LOCAL pgrelay.replaying = on; \
         SELECT pg_catalog.set_config('pgrelay.replay_values', {}, true)",
        literal(&entry.gen_values)
    );
    steps.push(query(out, &replaying, Step::Replaying));
    for (i, statement) in entry.statements.iter().enumerate() {
        let step = Step::Statement(i + 1);
        if let Some(index) = statement.copy {
            let Some(block) = entry.copy_block(index) else {
                return Err(ReplayError::BadEntry(format!(
                    "entry seq {seq} statement {}: no copy_data[{index}]",
                    i + 1
                )));
            };
            steps.push(query(out, &statement.sql, step));
            for chunk in block.chunks(COPY_CHUNK) {
                fe::copy_data(out, chunk);
            }
            fe::copy_done(out);
        } else if let Some(ext) = &statement.extended {
            fe::parse(out, "", &statement.sql, &ext.types);
            fe::bind(
                out,
                "",
                "",
                &ext.formats,
                ext.params.iter().map(|p| p.as_deref()),
            );
            fe::execute(out);
            fe::sync(out);
            steps.push((seq, step));
        } else {
            steps.push(query(out, &statement.sql, step));
        }
    }
    // The key travels as a parameter: the replayed statements' session cannot read it from
    // pg_stat_activity.
    fe::parse(out, "", ADVANCE_SQL, &[]);
    let (from, to) = (previous.to_string(), seq.to_string());
    let params = [from.as_bytes(), to.as_bytes(), key.as_bytes()];
    fe::bind(out, "", "", &[], params.into_iter().map(Some));
    fe::execute(out);
    fe::sync(out);
    steps.push((seq, Step::Advance));
    steps.push(query(out, "COMMIT", Step::Commit));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::protocol::codec::decode_frame;
    use crate::replication::statement::log::{Extended, LoggedStatement};

    /// The messages an entry becomes: (tag, text of the first field or the data).
    fn messages(mut out: BytesMut) -> Vec<(char, String)> {
        let mut seen = Vec::new();
        while let Some(frame) = decode_frame(&mut out, 1 << 20).unwrap() {
            let body = frame.body();
            let text = String::from_utf8_lossy(&body)
                .split('\0')
                .find(|s| !s.is_empty())
                .unwrap_or("")
                .to_owned();
            seen.push((char::from(frame.tag()), text));
        }
        seen
    }

    #[test]
    fn an_entry_is_one_transaction_of_pipelined_messages() {
        let entry = Entry {
            seq: 12,
            role: "app".into(),
            settings: vec!["SET LOCAL pgrelay.now = '2020-01-01'".into()],
            statements: vec![
                LoggedStatement {
                    sql: "INSERT INTO t VALUES ($1)".into(),
                    extended: Some(Extended {
                        types: vec![23],
                        formats: vec![],
                        params: vec![Some(b"1".to_vec())],
                    }),
                    copy: None,
                },
                LoggedStatement {
                    sql: "COPY t FROM STDIN".into(),
                    extended: None,
                    copy: Some(1),
                },
            ],
            gen_values: "7,".into(),
            copy_data: vec![b"2\n".to_vec()],
            size_bytes: 0,
            age: std::time::Duration::ZERO,
        };
        let mut out = BytesMut::new();
        let mut steps = Vec::new();
        queue_entry(&mut out, &entry, 9, "k3y", &mut steps).unwrap();
        let seen = messages(out);
        let tags: String = seen.iter().map(|(t, _)| *t).collect();
        assert_eq!(tags, "QQQQPBESQdcPBESQ");
        assert_eq!(seen[0].1, "BEGIN");
        // As the author, whatever an earlier entry set: no role to switch to or back from.
        assert_eq!(seen[1].1, AS_AUTHOR_SQL);
        assert!(seen[3].1.contains("'7,'"), "{}", seen[3].1);
        assert_eq!(seen[9].1, "2\n");
        // The seq moves through the keyed function, the key only as a parameter.
        assert_eq!(seen[11].1, ADVANCE_SQL);
        let tail = String::from_utf8_lossy(&{
            let mut out = BytesMut::new();
            queue_entry(&mut out, &entry, 9, "k3y", &mut Vec::new()).unwrap();
            out
        })
        .into_owned();
        assert!(
            !tail.contains("k3y'") && tail.matches("k3y").count() == 1,
            "{tail}"
        );
        assert_eq!(seen[15].1, "COMMIT");
        // One step per ReadyForQuery to come: every Query, and the extended statement's Sync.
        assert_eq!(
            steps,
            vec![
                (12, Step::Begin),
                (12, Step::Role),
                (12, Step::Setting(1)),
                (12, Step::Replaying),
                (12, Step::Statement(1)),
                (12, Step::Statement(2)),
                (12, Step::Advance),
                (12, Step::Commit),
            ]
        );
        // COPY data that the entry does not have: nothing to replay.
        let mut broken = entry.clone();
        broken.copy_data.clear();
        let err = queue_entry(&mut BytesMut::new(), &broken, 9, "k", &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("seq 12 statement 2"), "{err}");
    }

    #[test]
    fn statement_errors_diverge_and_connection_errors_retry() {
        assert!(Step::Statement(1).replays_the_leader());
        assert!(!Step::Advance.replays_the_leader());
        assert!(is_transient("40P01") && is_transient("08006") && is_transient("57P01"));
        assert!(!is_transient("23505") && !is_transient("42P01"));
    }
}
