//! Statement mode, the session's part: every leader transaction that writes through pgrelay
//! logs its statements in `pgrelay.statement_log` (see
//! [`crate::replication::statement::log`]) inside that same transaction, right before it
//! commits, after taking the ordering lock.
//!
//! - Each write's text is made deterministic first ([`crate::routing::determinism`]); the
//!   leader runs the rewritten text and the log keeps it. An unsafe statement is refused
//!   (SQLSTATE 0A000, raised by the server so the transaction fails as it would for any
//!   error) or, with `unsafe = "allow"`, run with a WARNING.
//! - Outside a transaction block (autocommit), pgrelay's statements travel inside the client's
//!   own unit, so the client pays no extra round trip: the ordering lock before the client's
//!   statements (with `serialize_writes`), the log insert after them, all in the implicit
//!   transaction the server commits at the unit's end. Their replies are swallowed.
//! - In a transaction block the lock is taken before its first write (a group of pgrelay's
//!   own), the statements are collected as they are sent (a `ROLLBACK TO SAVEPOINT` drops
//!   those after the savepoint), and the log insert is a group of pgrelay's own just before
//!   the client's COMMIT. The COMMIT's reply waits for the entry's `seq`, the commit's position.
//! - Writes to the session's temporary tables, cluster-wide DDL and maintenance commands are
//!   not logged. A statement that cannot run in a transaction block (`CONCURRENTLY`) runs as
//!   sent and is logged in a transaction of its own once it succeeded.
//!
//! - [`plan`]: what a statement's text asks of statement mode (log it rewritten, skip it,
//!   refuse it, track a savepoint).
//! - [`send`]: the lock, the log insert, and the query string that carries them.
//! - here: the session's logged transaction, its settings and temporary tables.

mod plan;
mod send;

pub use plan::{bind_op, copy_outside_block, may_log, Plan, TxOp};
pub use send::{is_own_row_description, LogSend};

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::protocol::backend::{self as be, Report};
use crate::protocol::codec::Frame;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate;
use crate::replication::statement::log::{self, LoggedStatement};
use crate::routing::classify::Classification;
use crate::routing::determinism;

use super::ddl::Raise;
use super::Session;
use plan::{local_setting, without_concurrently, PlanContext};
use send::{insert_literal_sql, query_frame};

/// Name of the statement and portal pgrelay prepares for its log insert and its lock.
pub const LOG_STATEMENT: &str = "pgrelay_statement_log";
pub const LOCK_STATEMENT: &str = "pgrelay_order_lock";
/// Column aliases that mark the rows of pgrelay's own statements in a simple query's replies.
pub const LOCK_ALIAS: &str = "pgrelay.lock";
pub const SEQ_ALIAS: &str = "pgrelay.seq";

/// The statements of the open transaction block that will be logged at its COMMIT.
#[derive(Debug, Default)]
pub struct LoggedTx {
    pub statements: Vec<LoggedStatement>,
    pub copies: Vec<Vec<u8>>,
    /// Savepoint name -> how many statements and copies existed when it was set.
    pub savepoints: Vec<(String, usize, usize)>,
    /// Settings in force at the first logged statement.
    pub settings: Vec<String>,
    /// The ordering lock is held.
    pub locked: bool,
    /// A COPY's data is being collected (into the last of `copies`).
    pub copying: bool,
    /// A COPY went past `max_copy_bytes`: the rest of its messages are dropped.
    pub copy_refused: bool,
    /// Statements of a unit outside any transaction block whose end (its Sync) is still to
    /// come.
    pub implicit: bool,
}

impl LoggedTx {
    pub fn apply(&mut self, op: &TxOp) {
        match op {
            TxOp::Log(s) => {
                let mut s = s.clone();
                if s.copy.is_some() {
                    self.copies.push(Vec::new());
                    s.copy = Some(self.copies.len());
                    self.copying = true;
                }
                self.statements.push(s);
            }
            TxOp::Savepoint(name) => {
                self.savepoints
                    .push((name.clone(), self.statements.len(), self.copies.len()));
            }
            TxOp::RollbackTo(name) => {
                // The savepoint stays; what came after it is gone.
                if let Some(&(_, statements, copies)) =
                    self.savepoints.iter().rev().find(|(n, _, _)| n == name)
                {
                    self.statements.truncate(statements);
                    self.copies.truncate(copies);
                    if let Some(i) = self.savepoints.iter().rposition(|(n, _, _)| n == name) {
                        self.savepoints.truncate(i + 1);
                    }
                }
            }
            TxOp::Release(name) => {
                if let Some(i) = self.savepoints.iter().rposition(|(n, _, _)| n == name) {
                    self.savepoints.truncate(i);
                }
            }
            TxOp::Begin | TxOp::Commit | TxOp::Rollback => {}
        }
    }
}

/// Startup parameters that do not change what a statement means (or that the replayer must
/// not copy).
const STARTUP_NOT_REPLAYED: &[&str] = &[
    "user",
    "database",
    "application_name",
    "fallback_application_name",
    "client_encoding",
    "replication",
    "options",
];

impl Session {
    /// Takes one CopyData of a COPY being logged. Past `statement.max_copy_bytes` for the
    /// transaction the COPY fails instead: the node gets a CopyFail (so the transaction fails
    /// there), the client that error as SQLSTATE 54000 naming the limit, and the rest of the
    /// COPY is dropped, as Postgres drops it after an error. Returns whether to forward it.
    pub(in crate::session) fn hold_copy_data(&mut self, data: &[u8]) -> bool {
        let limit = self.config.statement.max_copy_bytes;
        let Some(stx) = self.stx.as_mut() else {
            return true;
        };
        let held: usize = stx.copies.iter().map(Vec::len).sum();
        if (held.saturating_add(data.len()) as u64) <= limit {
            if let Some(block) = stx.copies.last_mut() {
                block.extend_from_slice(data);
            }
            return true;
        }
        stx.copying = false;
        stx.copy_refused = true;
        if let Some(block) = stx.copies.last_mut() {
            *block = Vec::new();
        }
        let message = format!(
            "COPY data of this transaction exceeds statement.max_copy_bytes ({} bytes)",
            limit
        );
        let hint = "pgrelay's statement mode holds a transaction's COPY data in memory until it \
                    commits: raise statement.max_copy_bytes, or split the COPY over several transactions.";
        let mut error = BytesMut::new();
        Report::error(sqlstate::PROGRAM_LIMIT_EXCEEDED, &message)
            .with_hint(hint)
            .write_error(&mut error);
        let node = self.copy_node.or(self.last_node);
        if let Some(b) = node.and_then(|n| self.backend_mut(n)) {
            fe::copy_fail(&mut b.conn.wbuf, &message);
            if let Some(group) = b.groups.front_mut() {
                group.error_instead = Some(Frame::new(
                    be::tag::ERROR_RESPONSE,
                    error.get(5..).unwrap_or_default(),
                ));
            }
        }
        false
    }

    pub(in crate::session) fn statement_mode(&self) -> bool {
        self.config.replication.mode == crate::config::ReplicationMode::Statement
    }

    /// The settings a replayed transaction starts with: the session's startup parameters and
    /// its `SET`s, transaction-local.
    pub(in crate::session) fn log_settings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.key.params {
            if STARTUP_NOT_REPLAYED.contains(&k.to_ascii_lowercase().as_str()) {
                continue;
            }
            out.push(format!(
                "SELECT pg_catalog.set_config({}, {}, true)",
                quote(k),
                quote(v)
            ));
        }
        for s in self.state.settings() {
            out.extend(local_setting(s));
        }
        for c in &self.tx_changes {
            if let crate::routing::classify::SessionOp::Set { .. } = c.op {
                out.extend(local_setting(&c.text));
            }
        }
        out
    }

    /// The search path the determinism rewriter resolves unqualified tables with.
    pub(in crate::session) fn search_path(&self) -> Vec<String> {
        let mut path: Option<String> = self
            .key
            .params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("search_path"))
            .map(|(_, v)| v.clone());
        for c in self
            .state
            .settings()
            .chain(self.tx_changes.iter().map(|c| c.text.as_str()))
        {
            let lower = c.to_ascii_lowercase();
            if let Some(i) = lower.find("search_path") {
                let rest = &c[i + "search_path".len()..];
                let rest = rest.trim_start();
                let rest = rest
                    .strip_prefix('=')
                    .or_else(|| {
                        rest.get(..2)
                            .filter(|p| p.eq_ignore_ascii_case("to"))
                            .map(|_| &rest[2..])
                    })
                    .unwrap_or(rest);
                path = Some(rest.trim().trim_end_matches(';').to_owned());
            }
        }
        let path = path.unwrap_or_else(|| "\"$user\", public".to_owned());
        path.split(',')
            .map(|s| {
                let s = s.trim();
                let s = s.trim_matches('\'');
                if s.starts_with('"') {
                    s.trim_matches('"').to_owned()
                } else {
                    s.to_ascii_lowercase()
                }
            })
            .map(|s| {
                if s == "$user" {
                    self.key.user.clone()
                } else {
                    s
                }
            })
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Plans one SQL text of the session in statement mode.
    pub(in crate::session) fn plan_statement(&self, sql: &str, c: &Classification) -> Plan {
        let path = self.search_path();
        let catalog = self.classifier.catalog();
        let cx = PlanContext {
            determinism: determinism::Context {
                catalog: &catalog,
                search_path: &path,
                serialize_writes: self.config.statement.serialize_writes,
                temp_tables: &self.temp_tables,
            },
            unsafe_policy: self.config.statement.unsafe_policy,
        };
        let plan = plan::plan(sql, c, &cx);
        if matches!(plan, Plan::Log { .. }) && !self.classifier.has_catalog() {
            // Without the column defaults pgrelay cannot tell what the statement needs filled in.
            return Plan::Refuse(Raise {
                code: sqlstate::FEATURE_NOT_SUPPORTED,
                message: "pgrelay could not read this database's catalog from the leader, so it cannot replicate writes in statement mode yet".into(),
                detail: "Statement mode fills in column defaults (sequences, now(), ...) from the leader's catalog.".into(),
                hint: "Check that replication.user can connect to the leader; pgrelay tries again with the next statement.".into(),
            });
        }
        if let Plan::Log {
            warning: Some(_), ..
        } = &plan
        {
            self.shared.metrics.unsafe_statements.increment(1);
        }
        plan
    }

    /// Remembers temporary tables a statement creates or drops.
    pub(in crate::session) fn note_temp_tables(&mut self, sql: &str) {
        if let Some(name) = determinism::temp_table_created(sql) {
            self.temp_tables.insert(name);
        } else if !self.temp_tables.is_empty() {
            determinism::forget_temp_tables(sql, &mut self.temp_tables);
        }
    }

    /// The query that logs a statement that ran outside any transaction block
    /// (`CONCURRENTLY`), in a transaction of its own. The follower replays it without
    /// `CONCURRENTLY`, inside the transaction that records it (only the replayer writes there,
    /// and readers are not blocked by an index build).
    pub(in crate::session) fn after_success_log_sql(&self, sql: &str) -> String {
        let settings = log::encode_settings(&self.log_settings());
        let statements = log::encode_statements(&[LoggedStatement {
            sql: without_concurrently(sql),
            ..LoggedStatement::default()
        }]);
        format!(
            "BEGIN; {}; {}; COMMIT",
            log::order_lock_sql(),
            insert_literal_sql(&settings, &statements, &[])
        )
    }
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Session {
    /// Plans a simple query string that joins the unit as its next frame, statement by
    /// statement; the string pgrelay sends instead is built when the unit is sent.
    pub(in crate::session) fn plan_query_log(&mut self, sql: &str) {
        use super::ddl::{Reply, UnitDdl};
        use crate::routing::classify::statement_spans;
        use crate::routing::lexer::StringMode;
        let frame = self.unit.frames.len();
        // Text that does not lex is rejected by the server as a whole.
        let Ok(spans) = statement_spans(sql, StringMode::Standard) else {
            return;
        };
        let mut in_block = self.in_block;
        let mut statements = Vec::with_capacity(spans.len());
        let mut copy_pending = false;
        for &(a, b) in &spans {
            let Some(text) = sql.get(a..b) else { return };
            let c = self.classifier.classify(text);
            // Planned before the session's temporary tables change: a DROP of one is not
            // logged, a write to one created here is not either.
            let plan = self.plan_statement(text, &c);
            self.note_temp_tables(text);
            match &plan {
                Plan::Refuse(r) => return self.refuse_query(frame, r.clone()),
                Plan::AfterSuccess { sql: s } if spans.len() == 1 => {
                    let emit = self.after_success_log_sql(s);
                    self.unit.ddl.push(UnitDdl {
                        frame,
                        index: self.unit.executes,
                        reply: Arc::new(Reply::EmitAfter { sql: emit }),
                    });
                    return;
                }
                Plan::Log { copy: true, .. } if !in_block => {
                    return self.refuse_query(frame, copy_outside_block());
                }
                Plan::Log { copy: true, .. } => copy_pending = true,
                Plan::Log {
                    warning: Some(w), ..
                } => self.unit.log_warnings.push(w.clone()),
                Plan::Begin => in_block = true,
                Plan::Commit if copy_pending => {
                    // The COPY's data arrives after the string is sent: too late to log it
                    // before this COMMIT.
                    return self.refuse_query(frame, Raise {
                        code: sqlstate::FEATURE_NOT_SUPPORTED,
                        message: "COPY ... FROM STDIN and COMMIT in one query string are not supported in pgrelay's statement replication mode".into(),
                        detail: "pgrelay logs the COPY's data before the COMMIT that follows it.".into(),
                        hint: "Send the COMMIT as a query of its own.".into(),
                    });
                }
                Plan::Commit | Plan::Rollback => in_block = false,
                _ => {}
            }
            statements.push((text.to_owned(), plan));
        }
        if statements
            .iter()
            .all(|(_, p)| matches!(p, Plan::Skip | Plan::AfterSuccess { .. }))
        {
            return;
        }
        self.unit.log_query = Some((frame, statements));
    }

    /// Whether `op` is a COPY that would run outside a transaction block.
    pub(in crate::session) fn copy_outside_block(&self, op: &TxOp) -> bool {
        matches!(op, TxOp::Log(s) if s.copy.is_some())
            && !self.in_block
            && !self
                .unit
                .log_ops
                .iter()
                .any(|(_, o)| matches!(o, TxOp::Begin))
    }

    /// The query at `frame` becomes a DO block that raises `refusal` on the leader.
    pub(in crate::session) fn refuse_query(&mut self, frame: usize, refusal: Raise) {
        use super::ddl::{raise_sql, Reply, UnitDdl};
        self.unit
            .rewrites
            .push((frame, query_frame(&raise_sql(&refusal))));
        self.unit.ddl.push(UnitDdl {
            frame,
            index: self.unit.executes,
            reply: Arc::new(Reply::Refused),
        });
    }

    /// Plans a Parse: what its executions log, and the Parse the leader gets instead.
    #[allow(clippy::type_complexity)]
    pub(in crate::session) fn plan_parse_log(
        &mut self,
        body: &[u8],
        name: &str,
        query: &str,
        c: &Classification,
    ) -> Result<(Option<Arc<(Plan, Vec<u32>)>>, Option<Bytes>), Raise> {
        let plan = self.plan_statement(query, c);
        self.note_temp_tables(query);
        let types = fe::parse_param_types(body).unwrap_or_default();
        match plan {
            Plan::Skip => Ok((None, None)),
            Plan::Refuse(r) => Err(r),
            Plan::AfterSuccess { .. } => Err(Raise {
                code: sqlstate::FEATURE_NOT_SUPPORTED,
                message: "statements that cannot run in a transaction block are not supported with the extended query protocol in pgrelay's statement replication mode".into(),
                detail: "pgrelay logs such a statement once it succeeded, which it can only tell for a simple query.".into(),
                hint: "Send the statement as a simple query (psql does).".into(),
            }),
            Plan::Log { ref sql, ref warning, .. } => {
                if let Some(w) = warning {
                    self.unit.log_warnings.push(w.clone());
                }
                let leader_parse = (sql != query).then(|| {
                    let mut out = BytesMut::new();
                    fe::parse(&mut out, name, sql, &types);
                    out.freeze()
                });
                Ok((Some(Arc::new((plan, types))), leader_parse))
            }
            other => Ok((Some(Arc::new((other, types))), None)),
        }
    }
}
