//! The applier: turns one follower database into a copy of the leader's by applying the
//! decoded change stream. Consecutive leader transactions are applied together in one follower
//! transaction that also records, in `pgrelay.applied`, the end position of the last of them,
//! so after any crash the follower holds exactly the transactions up to that position and
//! resumes after it: nothing lost, nothing applied twice.
//!
//! Row changes run as prepared statements (one per table, operation and column set), pipelined
//! in the extended protocol: a group costs one round trip to the follower, not one per row.
//! <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tracing::debug;

use crate::backend::BackendConn;
use crate::metrics::FollowerMetrics;

use crate::protocol::frontend as fe;
use crate::protocol::pgoutput::{
    Delete, Insert, Message, OldTuple, Truncate, Tuple, Update, Value,
};

use super::super::positions::{format_lsn, Position};
use super::message_key::MessageKey;
use super::relations::{describe_sql, FollowerColumn, Table};
use super::setup::advance_sql;
use super::RowError;

mod concurrent;
mod ddl;
mod replies;

use crate::routing::ddl::MESSAGE_PREFIX as DDL_PREFIX;

/// pgrelay's schema on every node; its tables are not replicated.
const OWN_SCHEMA: &str = "pgrelay";

/// A group is committed after this many leader transactions even if more are waiting.
const GROUP_TRANSACTIONS: u64 = 1000;
/// At most this many statements' replies are outstanding (about 25 bytes each, well within
/// the sockets' buffers), so that neither side blocks writing while the other waits.
const OUTSTANDING_REPLIES: usize = 2000;
/// Groups sent whose commit is not confirmed yet: the next group is prepared while the
/// follower applies the previous one.
const GROUPS_IN_FLIGHT: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// Moving the recorded position.
    Record,
    Other,
}

/// A reply still to come, and what it must say.
#[derive(Debug)]
struct Check {
    op: Op,
    /// The relation id (for the error message).
    relation: u32,
}

/// Statement cache key: relation, generation of its description, operation, and which
/// columns are set and which identify the row.
type StatementKey = (u32, u64, Op, Vec<usize>, Vec<usize>);

pub struct Applier {
    conn: BackendConn,
    /// Checks the signatures of DDL messages; without it every DDL message is refused.
    key: Option<MessageKey>,
    follower: String,
    record_sql: String,
    /// The position the last group sent records (`pgrelay.advance` starts the next from it).
    recorded: Position,
    metrics: Option<Arc<FollowerMetrics>>,
    /// Leader relations as the stream described them, by relation id.
    relations: HashMap<u32, crate::protocol::pgoutput::Relation>,
    /// Those relations matched against the follower's tables.
    tables: HashMap<u32, Arc<Table>>,
    /// Leader type OID -> `schema.name`, from Type messages.
    types: HashMap<u32, String>,
    statements: HashMap<StatementKey, String>,
    next_statement: u64,
    generation: u64,
    prepared_fixed: bool,
    /// Replies still to come, in order.
    checks: VecDeque<Check>,
    /// Checks queued since the last Sync.
    unsynced: usize,
    /// Syncs sent whose ReadyForQuery has not arrived, oldest first.
    syncs: VecDeque<PendingSync>,
    /// The first error among the replies of the oldest Sync.
    failure: Option<RowError>,
    /// Rows applied by replies read so far, counted once their group commits.
    rows: [u64; 4],
    /// A follower transaction is open (BEGIN sent).
    open: bool,
    /// Inside a leader transaction (Begin seen, Commit not yet).
    in_leader_tx: bool,
    /// The current leader transaction was applied before (its commit precedes `applied`).
    skipping: bool,
    /// Committed on the follower up to here.
    applied: Position,
    /// End position of the last leader transaction in the open group.
    group_end: Option<Position>,
    group_transactions: u64,
}

/// A Sync sent to the follower.
#[derive(Debug)]
struct PendingSync {
    /// Checks (replies) that belong to it.
    checks: usize,
    /// Set for the Sync behind a group's COMMIT: what that group makes durable.
    commit: Option<Committed>,
}

#[derive(Debug, Clone, Copy)]
struct Committed {
    end: Option<Position>,
    transactions: u64,
    /// The leader said it sent everything before this while the group was in flight: once
    /// the group is confirmed, the follower is there.
    caught_up: Option<Position>,
}

fn follower_io(e: std::io::Error) -> RowError {
    RowError::Follower(format!("connection lost: {e}"))
}

impl Applier {
    /// `applied`: the position the follower recorded (everything before it is there).
    pub fn new(
        conn: BackendConn,
        follower: &str,
        source: &str,
        applied: Position,
        metrics: Option<Arc<FollowerMetrics>>,
    ) -> Applier {
        Applier {
            conn,
            key: None,
            follower: follower.to_owned(),
            record_sql: advance_sql(source),
            recorded: applied,
            metrics,
            relations: HashMap::new(),
            tables: HashMap::new(),
            types: HashMap::new(),
            statements: HashMap::new(),
            next_statement: 0,
            generation: 0,
            prepared_fixed: false,
            checks: VecDeque::new(),
            unsynced: 0,
            syncs: VecDeque::new(),
            failure: None,
            rows: [0; 4],
            open: false,
            in_leader_tx: false,
            skipping: false,
            applied,
            group_end: None,
            group_transactions: 0,
        }
    }

    /// The key DDL messages must be signed with.
    pub fn with_message_key(mut self, key: MessageKey) -> Applier {
        self.key = Some(key);
        self
    }

    /// Everything up to here is committed on the follower (or was nothing to apply).
    pub fn applied(&self) -> Position {
        self.applied
    }

    /// A follower transaction is open and waits for [`Applier::finish_group`].
    pub fn has_open_group(&self) -> bool {
        self.open && !self.in_leader_tx
    }

    /// The group has grown enough to commit even if more transactions are waiting.
    pub fn group_full(&self) -> bool {
        self.group_transactions >= GROUP_TRANSACTIONS
    }

    /// The leader sent everything up to `wal_end`: nothing between the last commit and there
    /// concerns this database. The follower is at `wal_end` once it confirmed everything sent
    /// so far (at once if nothing is in flight). Call it with no group open; inside a leader
    /// transaction it means nothing.
    pub fn caught_up_to(&mut self, wal_end: Position) {
        if self.open || self.in_leader_tx {
            return;
        }
        match self.syncs.back_mut() {
            None => self.applied = self.applied.max(wal_end),
            Some(last) => {
                let commit = last.commit.get_or_insert(Committed {
                    end: None,
                    transactions: 0,
                    caught_up: None,
                });
                commit.caught_up = Some(commit.caught_up.unwrap_or(0).max(wal_end));
            }
        }
    }

    /// Applies one message of the stream; `at` is the WAL position it came with.
    pub async fn apply(&mut self, at: Position, message: Message) -> Result<(), RowError> {
        match message {
            Message::Begin(b) => {
                self.in_leader_tx = true;
                // Transactions stream in commit order; one whose commit record starts before
                // the recorded position was applied before a restart.
                self.skipping = b.final_lsn < self.applied;
                if self.skipping {
                    debug!(commit = %format_lsn(b.final_lsn), "skipping a transaction applied before");
                } else if !self.open {
                    self.begin()?;
                }
            }
            Message::Commit(c) => {
                self.in_leader_tx = false;
                if self.skipping {
                    self.skipping = false;
                    return Ok(());
                }
                self.group_end = Some(c.end_lsn);
                self.group_transactions += 1;
            }
            Message::Origin(_) => {}
            Message::Relation(r) => {
                self.tables.remove(&r.id);
                self.generation += 1;
                self.relations.insert(r.id, r);
            }
            Message::Type(t) => {
                self.types
                    .insert(t.id, format!("{}.{}", t.namespace, t.name));
            }
            Message::Insert(i) if !self.skips(i.relation) => self.insert(i).await?,
            Message::Update(u) if !self.skips(u.relation) => self.update(u).await?,
            Message::Delete(d) if !self.skips(d.relation) => self.delete(d).await?,
            Message::Truncate(t) if !self.skipping => self.truncate(t)?,
            Message::Message(m) => self.message(at, m).await?,
            Message::Insert(_) | Message::Update(_) | Message::Delete(_) | Message::Truncate(_) => {
            }
        }
        if self.checks.len() >= OUTSTANDING_REPLIES {
            // Read replies before sending more, so that neither side's socket buffer fills
            // up while the other waits for it.
            self.conn.flush().await.map_err(follower_io)?;
            while self.checks.len() >= OUTSTANDING_REPLIES / 2 {
                self.read_reply().await?;
                if self.failure.is_some() {
                    // The follower skips everything up to a Sync: send one to hear the end.
                    self.queue_sync(None);
                    self.wait_all().await?;
                }
            }
        }
        if self.conn.wbuf.len() >= 64 * 1024 {
            self.conn.flush().await.map_err(follower_io)?;
        }
        Ok(())
    }

    /// Changes not to apply: the transaction was applied before, or the table is pgrelay's
    /// own bookkeeping (each node keeps its own).
    fn skips(&self, relation: u32) -> bool {
        self.skipping
            || self
                .relations
                .get(&relation)
                .is_some_and(|r| r.namespace == OWN_SCHEMA)
    }

    fn prepare_fixed(&mut self) {
        if !self.prepared_fixed {
            fe::parse(&mut self.conn.wbuf, "pgrelay_begin", "BEGIN", &[]);
            fe::parse(&mut self.conn.wbuf, "pgrelay_commit", "COMMIT", &[]);
            fe::parse(
                &mut self.conn.wbuf,
                "pgrelay_record",
                &self.record_sql,
                &[0, 0],
            );
            self.prepared_fixed = true;
        }
    }

    fn run(&mut self, statement: &str, params: &[Option<&[u8]>], check: Check) {
        fe::bind_text(&mut self.conn.wbuf, statement, params.iter().copied());
        fe::execute(&mut self.conn.wbuf);
        self.checks.push_back(check);
        self.unsynced += 1;
    }

    fn begin(&mut self) -> Result<(), RowError> {
        self.prepare_fixed();
        self.run(
            "pgrelay_begin",
            &[],
            Check {
                op: Op::Other,
                relation: 0,
            },
        );
        self.open = true;
        Ok(())
    }

    fn record(&mut self, end: Position) {
        let from = format_lsn(self.recorded);
        let to = format_lsn(end);
        self.recorded = end;
        self.run(
            "pgrelay_record",
            &[Some(from.as_bytes()), Some(to.as_bytes())],
            Check {
                op: Op::Record,
                relation: 0,
            },
        );
    }

    /// Commits the open group. Its replies are read later ([`Applier::read_reply`]), while
    /// the next group is sent: the position advances once the follower confirmed the commit.
    pub async fn finish_group(&mut self) -> Result<(), RowError> {
        if !self.open {
            return Ok(());
        }
        if let Some(end) = self.group_end {
            self.record(end);
        }
        self.run(
            "pgrelay_commit",
            &[],
            Check {
                op: Op::Other,
                relation: 0,
            },
        );
        let committed = Committed {
            end: self.group_end.take(),
            transactions: self.group_transactions,
            caught_up: None,
        };
        self.queue_sync(Some(committed));
        self.open = false;
        self.group_transactions = 0;
        self.conn.flush().await.map_err(follower_io)?;
        while self.syncs.len() > GROUPS_IN_FLIGHT {
            self.read_reply().await?;
        }
        Ok(())
    }

    fn table_name(&self, relation: u32) -> String {
        self.relations
            .get(&relation)
            .map(|r| format!("\"{}\".\"{}\"", r.namespace, r.name))
            .unwrap_or_else(|| format!("relation {relation}"))
    }

    /// The follower's table for a leader relation, matched on first use after each Relation
    /// message.
    async fn table(&mut self, relation: u32) -> Result<Arc<Table>, RowError> {
        if !self.tables.contains_key(&relation) {
            let rel = self.relations.get(&relation).cloned().ok_or_else(|| {
                RowError::Decode(format!(
                    "change for relation {relation} before its description"
                ))
            })?;
            // Queued statements first: the follower's catalog must reflect them.
            self.sync_keep_open().await?;
            let rows = self
                .conn
                .query(&describe_sql(&rel.namespace, &rel.name))
                .await
                .map_err(|e| RowError::Follower(format!("describing a table: {}", e.message)))?;
            let columns: Vec<FollowerColumn> = rows
                .into_iter()
                .filter_map(|r| {
                    let mut it = r.into_iter();
                    Some(FollowerColumn {
                        name: it.next().flatten()?,
                        type_oid: it.next().flatten()?.parse().ok()?,
                        type_name: it.next().flatten()?,
                    })
                })
                .collect();
            let types = &self.types;
            let table = Table::resolve(
                rel,
                (!columns.is_empty()).then_some(columns.as_slice()),
                |oid| types.get(&oid).cloned(),
                self.generation,
            )
            .map_err(|e| RowError::Mismatch(format!("follower \"{}\": {e}", self.follower)))?;
            self.tables.insert(relation, Arc::new(table));
        }
        self.tables
            .get(&relation)
            .cloned()
            .ok_or_else(|| RowError::Decode(format!("relation {relation} vanished")))
    }

    /// Everything sent so far answered, in the middle of a group: the follower transaction
    /// stays open (a Sync inside a transaction block does not commit).
    async fn sync_keep_open(&mut self) -> Result<(), RowError> {
        self.queue_sync(None);
        self.wait_all().await
    }

    /// The name of the prepared statement for `key`, queuing its Parse on first use.
    fn statement(&mut self, key: StatementKey, sql: impl FnOnce() -> (String, Vec<u32>)) -> String {
        if let Some(name) = self.statements.get(&key) {
            return name.clone();
        }
        let name = format!("pgrelay_s{}", self.next_statement);
        self.next_statement += 1;
        let (sql, types) = sql();
        fe::parse(&mut self.conn.wbuf, &name, &sql, &types);
        self.statements.insert(key, name.clone());
        name
    }

    async fn insert(&mut self, i: Insert) -> Result<(), RowError> {
        let table = self.table(i.relation).await?;
        let all: Vec<usize> = (0..table.relation.columns.len()).collect();
        let params = values(&i.new, &all, &table, "insert")?;
        let key = (i.relation, table.generation, Op::Insert, all, Vec::new());
        let name = self.statement(key, || (table.insert_sql(), table.param_types.clone()));
        self.run(
            &name,
            &params,
            Check {
                op: Op::Insert,
                relation: i.relation,
            },
        );
        Ok(())
    }

    async fn update(&mut self, u: Update) -> Result<(), RowError> {
        let table = self.table(u.relation).await?;
        // Unchanged TOASTed columns keep the follower's value: they are not set.
        let set: Vec<usize> = u
            .new
            .0
            .iter()
            .enumerate()
            .filter(|(_, v)| !matches!(v, Value::Unchanged))
            .map(|(i, _)| i)
            .collect();
        let (key_tuple, key) = identify(&table, u.old.as_ref(), &u.new);
        let mut params = values(&u.new, &set, &table, "update")?;
        params.extend(values(key_tuple, &key, &table, "update")?);
        let types: Vec<u32> = set
            .iter()
            .map(|&i| table.param_types.get(i).copied().unwrap_or(0))
            .chain(table.types_of(key.iter()))
            .collect();
        let sql_key = (
            u.relation,
            table.generation,
            Op::Update,
            set.clone(),
            key.clone(),
        );
        let name = self.statement(sql_key, || (table.update_sql(&set, &key), types));
        self.run(
            &name,
            &params,
            Check {
                op: Op::Update,
                relation: u.relation,
            },
        );
        Ok(())
    }

    async fn delete(&mut self, d: Delete) -> Result<(), RowError> {
        let table = self.table(d.relation).await?;
        let (key_tuple, key) = identify(&table, Some(&d.old), &d.old.tuple);
        let params = values(key_tuple, &key, &table, "delete")?;
        let types = table.types_of(key.iter());
        let sql_key = (
            d.relation,
            table.generation,
            Op::Delete,
            Vec::new(),
            key.clone(),
        );
        let name = self.statement(sql_key, || (table.delete_sql(&key), types));
        self.run(
            &name,
            &params,
            Check {
                op: Op::Delete,
                relation: d.relation,
            },
        );
        Ok(())
    }

    fn truncate(&mut self, t: Truncate) -> Result<(), RowError> {
        let mut names = Vec::with_capacity(t.relations.len());
        for id in &t.relations {
            let rel = self.relations.get(id).ok_or_else(|| {
                RowError::Decode(format!("truncate of relation {id} before its description"))
            })?;
            if rel.namespace == OWN_SCHEMA {
                continue;
            }
            names.push(format!(
                "{}.{}",
                super::setup::ident(&rel.namespace),
                super::setup::ident(&rel.name)
            ));
        }
        if names.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "TRUNCATE ONLY {}{}{}",
            names.join(", "),
            if t.restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            },
            if t.cascade { " CASCADE" } else { "" }
        );
        fe::parse(&mut self.conn.wbuf, "", &sql, &[]);
        self.run(
            "",
            &[],
            Check {
                op: Op::Truncate,
                relation: t.relations.first().copied().unwrap_or(0),
            },
        );
        Ok(())
    }

    pub async fn close(mut self) {
        if self.open {
            let _ = self.conn.query("ROLLBACK").await;
        }
        self.conn.terminate().await;
    }
}

/// Which tuple and columns identify the old row: the old key or old row when the stream sent
/// one, else the key columns of the new row (the key did not change).
fn identify<'a>(
    table: &Table,
    old: Option<&'a OldTuple>,
    new: &'a Tuple,
) -> (&'a Tuple, Vec<usize>) {
    let key = table.key_columns();
    match old {
        Some(old) => {
            // A full old row may carry unchanged TOASTed values: those cannot be compared.
            let key = key
                .into_iter()
                .filter(|&i| !matches!(old.tuple.0.get(i), Some(Value::Unchanged) | None))
                .collect();
            (&old.tuple, key)
        }
        None => (new, key),
    }
}

/// The text values of `columns` of a tuple, as Bind parameters.
fn values<'a>(
    tuple: &'a Tuple,
    columns: &[usize],
    table: &Table,
    what: &str,
) -> Result<Vec<Option<&'a [u8]>>, RowError> {
    columns
        .iter()
        .map(|&i| match tuple.0.get(i) {
            Some(Value::Text(b)) => Ok(Some(b.as_ref())),
            Some(Value::Null) => Ok(None),
            Some(Value::Unchanged) => Err(RowError::Decode(format!(
                "{what} on {} needs an unchanged TOASTed value it was not sent",
                table.qualified
            ))),
            Some(Value::Binary(_)) => Err(RowError::Decode(
                "binary value in a text-format stream".to_owned(),
            )),
            None => Err(RowError::Decode(format!(
                "{what} on {} has fewer columns than its description",
                table.qualified
            ))),
        })
        .collect()
}
