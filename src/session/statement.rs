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

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::config::UnsafePolicy;
use crate::protocol::frontend as fe;
use crate::replication::statement::log::{self, Extended, LoggedStatement};
use crate::routing::classify::Classification;
use crate::routing::ddl::{self as rddl, Ddl};
use crate::routing::determinism::{self, Outcome};

use super::ddl::{dollar_tag, Raise};
use super::Session;

/// Name of the statement and portal pgrelay prepares for its log insert and its lock.
pub const LOG_STATEMENT: &str = "pgrelay_statement_log";
pub const LOCK_STATEMENT: &str = "pgrelay_order_lock";
/// Column aliases that mark the rows of pgrelay's own statements in a simple query's replies.
pub const LOCK_ALIAS: &str = "pgrelay.lock";
pub const SEQ_ALIAS: &str = "pgrelay.seq";

/// What statement mode does with one SQL text (a simple query string or a Parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not logged: reads, session commands, temporary objects, cluster-wide objects.
    Skip,
    /// Logged; `sql` is what runs on the leader (rewritten when needed) and what is logged.
    Log {
        sql: String,
        copy: bool,
        /// `unsafe = "allow"` let an unsafe statement through: the client is warned.
        warning: Option<String>,
    },
    /// Cannot run in a transaction block: runs as sent, logged once it succeeded.
    AfterSuccess {
        sql: String,
    },
    Savepoint(String),
    RollbackTo(String),
    Release(String),
    Begin,
    Commit,
    Rollback,
    Refuse(Raise),
}

/// What a unit does to the session's logged transaction, in the order of its frames.
#[derive(Debug, Clone)]
pub enum TxOp {
    Log(LoggedStatement),
    Savepoint(String),
    RollbackTo(String),
    Release(String),
    Begin,
    Commit,
    Rollback,
}

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

/// The first keyword(s) of a SQL text, lowercased, skipping comments.
fn words(sql: &str, n: usize) -> Vec<String> {
    use crate::routing::lexer::{Lexer, StringMode, TokenKind};
    Lexer::new(sql, StringMode::Standard)
        .filter(|t| !t.is_comment())
        .take(n)
        .map(|t| match t.kind {
            TokenKind::Ident => t.text(sql).to_ascii_lowercase(),
            TokenKind::QuotedIdent => t.text(sql).trim_matches('"').to_owned(),
            _ => t.text(sql).to_owned(),
        })
        .collect()
}

/// Commands that change nothing a follower must repeat (or that only the leader may run).
const NOT_LOGGED: &[&str] = &[
    "vacuum",
    "analyze",
    "analyse",
    "checkpoint",
    "cluster",
    "reindex",
    "listen",
    "unlisten",
    "notify",
    "discard",
    "load",
    "lock",
    "set",
    "reset",
    "show",
    "prepare",
    "deallocate",
    "fetch",
    "move",
    "close",
    "declare",
];

/// Reads, unless they call something that writes.
const READS: &[&str] = &["select", "values", "table", "explain"];

/// Whether a classified query string may do anything statement mode logs or tracks (a write,
/// DDL, transaction control, a savepoint); plain reads skip the planning.
pub fn may_log(c: &Classification, sql: &str) -> bool {
    !c.read_only
        || c.writes
        || c.begin.is_some()
        || c.ends_transaction
        || matches!(
            words(sql, 1).first().map(String::as_str),
            Some("savepoint" | "release" | "rollback" | "abort" | "commit" | "end")
        )
}

/// What the session needs to plan a statement.
pub struct PlanContext<'a> {
    pub determinism: determinism::Context<'a>,
    pub unsafe_policy: UnsafePolicy,
}

/// Plans one SQL text (`c` is its classification).
pub fn plan(sql: &str, c: &Classification, cx: &PlanContext<'_>) -> Plan {
    let w = words(sql, 3);
    let first = w.first().map(String::as_str).unwrap_or("");
    let second = w.get(1).map(String::as_str).unwrap_or("");
    match first {
        "savepoint" => return Plan::Savepoint(second.to_owned()),
        "release" => {
            let name = if second == "savepoint" {
                w.get(2).cloned().unwrap_or_default()
            } else {
                second.to_owned()
            };
            return Plan::Release(name);
        }
        "rollback" | "abort" if second == "to" => {
            let name = match w.get(2).map(String::as_str) {
                Some("savepoint") => words(sql, 4).get(3).cloned().unwrap_or_default(),
                Some(n) => n.to_owned(),
                None => String::new(),
            };
            return Plan::RollbackTo(name);
        }
        "rollback" | "abort" if second == "prepared" => return Plan::Skip,
        "commit" if second == "prepared" => return Plan::Skip,
        "prepare" if second == "transaction" => {
            return Plan::Refuse(Raise {
                message: "PREPARE TRANSACTION is not supported in pgrelay's statement replication mode".into(),
                detail: "pgrelay logs a transaction's statements when it commits; a prepared transaction commits later, from any session.".into(),
                hint: "Use COMMIT, or row replication mode.".into(),
            })
        }
        _ => {}
    }
    if c.begin.is_some() && !c.writes {
        return Plan::Begin;
    }
    if c.ends_transaction && !c.writes {
        return match first {
            "rollback" | "abort" => Plan::Rollback,
            _ => Plan::Commit,
        };
    }
    if c.read_only && !c.writes {
        return Plan::Skip;
    }
    if c.ends_transaction || c.begin.is_some() {
        return Plan::Refuse(Raise {
            message: "pgrelay's statement replication mode needs BEGIN, COMMIT and ROLLBACK as statements of their own".into(),
            detail: "This query string both writes and starts or ends a transaction block.".into(),
            hint: "Send the transaction control statement separately.".into(),
        });
    }
    if first == "execute" && !c.executes.is_empty() {
        return Plan::Refuse(Raise {
            message: "EXECUTE of a prepared statement that writes is not supported in pgrelay's statement replication mode".into(),
            detail: "The followers replay the log without the session's PREPAREd statements.".into(),
            hint: "Run the statement itself, or prepare it with the extended query protocol.".into(),
        });
    }
    if first == "copy" {
        let upper = sql.to_ascii_uppercase();
        if !upper.contains("STDIN") {
            return Plan::Refuse(Raise {
                message: "COPY ... FROM a file or program is not supported in pgrelay's statement replication mode".into(),
                detail: "The file is on the leader; the followers cannot read it.".into(),
                hint: "Use COPY ... FROM STDIN (psql's \\copy).".into(),
            });
        }
    }
    if NOT_LOGGED.contains(&first) || (READS.contains(&first) && !c.writes) {
        return Plan::Skip;
    }
    if matches!(
        first,
        "create"
            | "alter"
            | "drop"
            | "comment"
            | "grant"
            | "revoke"
            | "security"
            | "reassign"
            | "import"
            | "refresh"
    ) {
        let temp = |relations: &[String]| {
            relations
                .iter()
                .any(|r| cx.determinism.temp_tables.contains(&r.to_ascii_lowercase()))
        };
        match rddl::analyze(sql) {
            // Temporary and cluster-wide objects (roles, databases, tablespaces).
            Ddl::Local => return Plan::Skip,
            Ddl::Transactional(r) if temp(&r.relations) => return Plan::Skip,
            Ddl::AfterSuccess(r) if temp(&r.relations) => return Plan::Skip,
            Ddl::AfterSuccess(_) => {
                return Plan::AfterSuccess {
                    sql: sql.to_owned(),
                }
            }
            // Row mode refuses what creates rows (CREATE TABLE ... AS); a replayed statement
            // creates them on the followers too.
            Ddl::Transactional(_) | Ddl::Refused(_) => {}
        }
    }
    let copy = first == "copy";
    match determinism::make_deterministic(sql, &cx.determinism) {
        Outcome::Keep => Plan::Log {
            sql: sql.to_owned(),
            copy,
            warning: None,
        },
        Outcome::Rewrite(rewritten) => Plan::Log {
            sql: rewritten,
            copy,
            warning: None,
        },
        Outcome::Local => Plan::Skip,
        Outcome::Unsafe(u) => match cx.unsafe_policy {
            UnsafePolicy::Reject => Plan::Refuse(Raise {
                message: format!(
                    "{} is not deterministic, so pgrelay's statement replication mode cannot replay it",
                    u.construct
                ),
                detail: u.reason,
                hint: "Compute the value in the application and pass it in, or use [replication] mode = \"row\" (or [statement] unsafe = \"allow\" to run it anyway).".into(),
            }),
            UnsafePolicy::Allow => Plan::Log {
                sql: sql.to_owned(),
                copy,
                warning: Some(format!(
                    "pgrelay: {} is not deterministic; the followers may get a different result ({})",
                    u.construct, u.reason
                )),
            },
        },
    }
}

/// Turns a session `SET` statement into its transaction-local form for the replay.
pub fn local_setting(text: &str) -> Option<String> {
    let trimmed = text.trim().trim_end_matches(';').trim_end();
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("set session characteristics") || !lower.starts_with("set ") {
        // Transaction characteristics change no statement's meaning.
        return None;
    }
    if lower.starts_with("set local ") {
        return Some(trimmed.to_owned());
    }
    // `SET [SESSION] x`, also `SET SESSION AUTHORIZATION`, become `SET LOCAL ...`.
    let rest = match lower.strip_prefix("set session ") {
        Some(r) if !r.starts_with("authorization") => trimmed.get("set session ".len()..),
        _ => trimmed.get("set ".len()..),
    }?;
    Some(format!("SET LOCAL {rest}"))
}

/// A SQL literal that keeps `text` intact (dollar quoting, whatever the string settings).
pub fn dollar_literal(text: &str) -> String {
    let tag = dollar_tag("pgrelay", &[text]);
    format!("{tag}{text}{tag}")
}

/// The log insert with literal values, for a simple query string.
pub fn insert_literal_sql(settings: &str, statements: &str, copies: &[Vec<u8>]) -> String {
    let copies = if copies.is_empty() {
        "NULL".to_owned()
    } else {
        dollar_literal(&log::encode_copy_data(copies))
    };
    log::INSERT_SQL
        .replace("$1::jsonb", &format!("{}::jsonb", dollar_literal(settings)))
        .replace(
            "$2::jsonb",
            &format!("{}::jsonb", dollar_literal(statements)),
        )
        .replace("$3::bytea[]", &format!("{copies}::bytea[]"))
        .replace(
            "RETURNING seq",
            &format!("RETURNING seq AS \"{SEQ_ALIAS}\""),
        )
}

/// Appends Close, Parse, Bind, Execute and Close (of the portal) of pgrelay's log insert
/// (named statement and portal, so the client's unnamed ones stay) to `out`: two
/// CloseComplete, one ParseComplete, one BindComplete to swallow.
pub fn write_log_insert(out: &mut BytesMut, settings: &str, statements: &str, copies: &[Vec<u8>]) {
    fe::close_statement(out, LOG_STATEMENT);
    fe::parse(out, LOG_STATEMENT, log::INSERT_SQL, &[]);
    let copy = (!copies.is_empty()).then(|| log::encode_copy_data(copies));
    let params: [Option<&[u8]>; 3] = [
        Some(settings.as_bytes()),
        Some(statements.as_bytes()),
        copy.as_deref().map(str::as_bytes),
    ];
    fe::bind(out, LOG_STATEMENT, LOG_STATEMENT, &[], params.into_iter());
    fe::execute_portal(out, LOG_STATEMENT);
    fe::close_portal(out, LOG_STATEMENT);
}

/// Appends the ordering lock to `out`, like [`write_log_insert`].
pub fn write_lock(out: &mut BytesMut) {
    fe::close_statement(out, LOCK_STATEMENT);
    fe::parse(out, LOCK_STATEMENT, &log::order_lock_sql(), &[]);
    fe::bind(out, LOCK_STATEMENT, LOCK_STATEMENT, &[], std::iter::empty());
    fe::execute_portal(out, LOCK_STATEMENT);
    fe::close_portal(out, LOCK_STATEMENT);
}

/// A logged statement from a Bind of a statement whose plan is [`Plan::Log`].
pub fn extended_statement(
    sql: &str,
    types: &[u32],
    bind_body: &[u8],
    copy: bool,
) -> Option<LoggedStatement> {
    let params = fe::parse_bind_params(bind_body).ok()?;
    Some(LoggedStatement {
        sql: sql.to_owned(),
        extended: Some(Extended {
            types: types.to_vec(),
            formats: params.formats,
            params: params
                .values
                .into_iter()
                .map(|v| v.map(<[u8]>::to_vec))
                .collect(),
        }),
        copy: copy.then_some(0),
    })
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
    pub(super) fn statement_mode(&self) -> bool {
        self.config.replication.mode == crate::config::ReplicationMode::Statement
    }

    /// The settings a replayed transaction starts with: the session's startup parameters and
    /// its `SET`s, transaction-local.
    pub(super) fn log_settings(&self) -> Vec<String> {
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
    pub(super) fn search_path(&self) -> Vec<String> {
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
    pub(super) fn plan_statement(&self, sql: &str, c: &Classification) -> Plan {
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
        let plan = plan(sql, c, &cx);
        if matches!(plan, Plan::Log { .. }) && !self.classifier.has_catalog() {
            // Without the column defaults pgrelay cannot tell what the statement needs filled in.
            return Plan::Refuse(Raise {
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
    pub(super) fn note_temp_tables(&mut self, sql: &str) {
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
    pub(super) fn after_success_log_sql(&self, sql: &str) -> String {
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

/// `sql` without its `CONCURRENTLY` keyword.
pub fn without_concurrently(sql: &str) -> String {
    use crate::routing::lexer::{Lexer, StringMode, TokenKind};
    let found = Lexer::new(sql, StringMode::Standard)
        .find(|t| t.kind == TokenKind::Ident && t.text(sql).eq_ignore_ascii_case("concurrently"));
    match found {
        Some(t) => format!(
            "{}{}",
            sql.get(..t.start).unwrap_or(""),
            sql.get(t.end..).unwrap_or("").trim_start()
        ),
        None => sql.to_owned(),
    }
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A Query frame's bytes for `sql`.
pub fn query_frame(sql: &str) -> Bytes {
    let mut out = BytesMut::new();
    fe::query(&mut out, sql);
    out.freeze()
}

/// Whether a RowDescription is that of one of pgrelay's own statements in a client's query.
pub fn is_own_row_description(body: &[u8]) -> Option<bool> {
    let mut r = crate::protocol::codec::Reader::new(body, "RowDescription");
    if r.count16().ok()? != 1 {
        return None;
    }
    match r.cstr().ok()? {
        SEQ_ALIAS => Some(true),
        LOCK_ALIAS => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_local() {
        let local = |t: &str| local_setting(t).unwrap_or_default();
        assert_eq!(local("SET search_path = a"), "SET LOCAL search_path = a");
        assert_eq!(
            local("set session TimeZone to 'UTC';"),
            "SET LOCAL TimeZone to 'UTC'"
        );
        assert_eq!(local("SET LOCAL x = 1"), "SET LOCAL x = 1");
        assert_eq!(
            local("SET SESSION AUTHORIZATION bob"),
            "SET LOCAL SESSION AUTHORIZATION bob"
        );
        assert_eq!(
            local_setting("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            None
        );
    }

    #[test]
    fn concurrently_is_dropped_for_the_replay() {
        assert_eq!(
            without_concurrently("CREATE INDEX CONCURRENTLY i ON t (a)"),
            "CREATE INDEX i ON t (a)"
        );
        assert_eq!(
            without_concurrently("drop index concurrently \"concurrently\""),
            "drop index \"concurrently\""
        );
    }

    #[test]
    fn savepoints_drop_what_came_after() {
        let mut tx = LoggedTx::default();
        let s = |sql: &str| {
            TxOp::Log(LoggedStatement {
                sql: sql.into(),
                ..Default::default()
            })
        };
        tx.apply(&s("a"));
        tx.apply(&TxOp::Savepoint("p".into()));
        tx.apply(&s("b"));
        tx.apply(&TxOp::RollbackTo("p".into()));
        tx.apply(&s("c"));
        tx.apply(&TxOp::Savepoint("q".into()));
        tx.apply(&s("d"));
        tx.apply(&TxOp::Release("q".into()));
        tx.apply(&TxOp::RollbackTo("q".into()));
        let sql: Vec<_> = tx.statements.iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(sql, ["a", "c", "d"]);
    }
}

/// The log operation a Bind of a statement planned as `plan` will do when its portal runs.
pub fn bind_op(plan: &Plan, types: &[u32], bind_body: &[u8]) -> Option<TxOp> {
    match plan {
        Plan::Log { sql, copy, .. } => {
            extended_statement(sql, types, bind_body, *copy).map(TxOp::Log)
        }
        Plan::Begin => Some(TxOp::Begin),
        Plan::Commit => Some(TxOp::Commit),
        Plan::Rollback => Some(TxOp::Rollback),
        Plan::Savepoint(n) => Some(TxOp::Savepoint(n.clone())),
        Plan::RollbackTo(n) => Some(TxOp::RollbackTo(n.clone())),
        Plan::Release(n) => Some(TxOp::Release(n.clone())),
        Plan::Skip | Plan::AfterSuccess { .. } | Plan::Refuse(_) => None,
    }
}

/// What pgrelay sends with one unit on the leader in statement mode.
#[derive(Debug, Default)]
pub struct LogSend {
    /// Groups of pgrelay's own before the unit (extended protocol, ending with Sync): the
    /// bytes, whether it holds the log insert, and how many statements it runs.
    pub pre_groups: Vec<(Bytes, bool, usize)>,
    /// Extended protocol: the ordering lock at the unit's start.
    pub head: Option<Bytes>,
    /// Simple protocol: frame index -> the query text to send instead.
    pub query_override: Option<(usize, String)>,
    /// Extended protocol: the log insert just before the unit's Sync.
    pub tail: Option<Bytes>,
    /// The unit commits a logged transaction: its ReadyForQuery completes the position.
    pub log_capture: bool,
    /// That position comes from a pre-group's log insert.
    pub position_from_pending: bool,
}

/// The refusal of a COPY ... FROM STDIN outside a transaction block.
pub fn copy_outside_block() -> Raise {
    Raise {
        message: "COPY ... FROM STDIN outside a transaction block is not supported in pgrelay's statement replication mode".into(),
        detail: "pgrelay logs the COPY's data with the transaction that commits it.".into(),
        hint: "Run it in a transaction: BEGIN; COPY ...; COMMIT.".into(),
    }
}

impl Session {
    /// Plans a simple query string that joins the unit as its next frame, statement by
    /// statement; the string pgrelay sends instead is built when the unit is sent.
    pub(super) fn plan_query_log(&mut self, sql: &str) {
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
    pub(super) fn copy_outside_block(&self, op: &TxOp) -> bool {
        matches!(op, TxOp::Log(s) if s.copy.is_some())
            && !self.in_block
            && !self
                .unit
                .log_ops
                .iter()
                .any(|(_, o)| matches!(o, TxOp::Begin))
    }

    /// The query at `frame` becomes a DO block that raises `refusal` on the leader.
    fn refuse_query(&mut self, frame: usize, refusal: Raise) {
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
    pub(super) fn plan_parse_log(
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

    /// The text that runs a planned simple query string with pgrelay's statements in it: the
    /// ordering lock before the first logged statement of a transaction (with
    /// `serialize_writes`, else before the log insert), the log insert before each COMMIT of a
    /// block that wrote and at the end of an implicit transaction that wrote. Returns the text
    /// (None: the client's own will do) and whether the string commits a logged transaction.
    fn query_log_text(
        &mut self,
        statements: &[(String, Plan)],
        settings: &[String],
    ) -> (Option<String>, bool) {
        let serialize = self.config.statement.serialize_writes;
        let lock = format!("{} AS \"{LOCK_ALIAS}\"", log::order_lock_sql());
        let mut out = String::new();
        let push = |out: &mut String, text: &str| {
            out.push_str(text);
            out.push_str(";\n");
        };
        let insert = |out: &mut String, tx: &LoggedTx| {
            if !tx.locked {
                push(out, &lock);
            }
            push(
                out,
                &insert_literal_sql(
                    &log::encode_settings(&tx.settings),
                    &log::encode_statements(&tx.statements),
                    &tx.copies,
                ),
            );
        };
        let mut in_block = self.in_block;
        let mut implicit: Option<LoggedTx> = None;
        let mut capture = false;
        // Whether the string differs from the client's (pgrelay's statements, rewritten text).
        let mut changed = false;
        for (text, plan) in statements {
            match plan {
                Plan::Begin => {
                    push(&mut out, text);
                    in_block = true;
                    // BEGIN turns the implicit transaction into the block.
                    if let Some(tx) = implicit.take() {
                        self.stx = Some(tx);
                    }
                }
                Plan::Log { sql, copy, .. } => {
                    let op = TxOp::Log(LoggedStatement {
                        sql: sql.clone(),
                        extended: None,
                        copy: copy.then_some(0),
                    });
                    let tx = if in_block {
                        self.stx.get_or_insert_with(|| LoggedTx {
                            settings: settings.to_vec(),
                            ..LoggedTx::default()
                        })
                    } else {
                        implicit.get_or_insert_with(|| LoggedTx {
                            settings: settings.to_vec(),
                            ..LoggedTx::default()
                        })
                    };
                    if serialize && !tx.locked {
                        push(&mut out, &lock);
                        tx.locked = true;
                        changed = true;
                    }
                    tx.apply(&op);
                    push(&mut out, sql);
                    changed |= sql != text;
                }
                Plan::Commit => {
                    if let Some(tx) = self.stx.take() {
                        if !tx.statements.is_empty() {
                            insert(&mut out, &tx);
                            capture = true;
                            changed = true;
                        }
                    }
                    push(&mut out, text);
                    in_block = false;
                }
                Plan::Rollback => {
                    self.stx = None;
                    push(&mut out, text);
                    in_block = false;
                }
                Plan::Savepoint(n) | Plan::RollbackTo(n) | Plan::Release(n) => {
                    if let Some(tx) = self.stx.as_mut() {
                        tx.apply(&match plan {
                            Plan::Savepoint(_) => TxOp::Savepoint(n.clone()),
                            Plan::RollbackTo(_) => TxOp::RollbackTo(n.clone()),
                            _ => TxOp::Release(n.clone()),
                        });
                    }
                    push(&mut out, text);
                }
                Plan::Skip | Plan::AfterSuccess { .. } | Plan::Refuse(_) => push(&mut out, text),
            }
        }
        if let Some(tx) = implicit {
            if !tx.statements.is_empty() {
                insert(&mut out, &tx);
                capture = true;
                changed = true;
            }
        }
        self.in_block = in_block;
        (changed.then_some(out), capture)
    }

    /// What to send with `unit` on the leader, and what it does to the logged transaction.
    pub(super) fn plan_log_send(&mut self, unit: &super::unit::Unit) -> LogSend {
        let mut send = LogSend::default();
        if unit.log_ops.is_empty() && unit.log_query.is_none() {
            return send;
        }
        let serialize = self.config.statement.serialize_writes;
        let settings = self.log_settings();
        let mut in_block = self.in_block;
        let mut began_here = false;
        // Statements run in this unit's implicit transaction (no block).
        let mut implicit = match self.stx.take() {
            Some(s) if s.implicit => s,
            other => {
                self.stx = other;
                LoggedTx::default()
            }
        };
        let mut implicit_used = implicit.implicit;
        let mut head_lock = false;
        for (_, op) in &unit.log_ops {
            match op {
                TxOp::Begin => {
                    in_block = true;
                    began_here = true;
                    // BEGIN turns the implicit transaction into the block.
                    if implicit_used {
                        self.stx = Some(std::mem::take(&mut implicit));
                        implicit_used = false;
                    }
                }
                TxOp::Log(_) if !in_block => {
                    if !implicit_used {
                        implicit.settings = settings.clone();
                        implicit_used = true;
                        if serialize {
                            head_lock = true;
                            implicit.locked = true;
                        }
                    }
                    implicit.apply(op);
                }
                TxOp::Log(_) => {
                    let stx = self.stx.get_or_insert_with(|| LoggedTx {
                        settings: settings.clone(),
                        ..LoggedTx::default()
                    });
                    if serialize && !stx.locked {
                        if began_here {
                            head_lock = true;
                        } else {
                            let mut out = BytesMut::new();
                            write_lock(&mut out);
                            fe::sync(&mut out);
                            send.pre_groups.push((out.freeze(), false, 1));
                        }
                        stx.locked = true;
                    }
                    stx.apply(op);
                }
                TxOp::Savepoint(_) | TxOp::RollbackTo(_) | TxOp::Release(_) => {
                    if let Some(stx) = self.stx.as_mut() {
                        stx.apply(op);
                    }
                }
                TxOp::Commit => {
                    if let Some(stx) = self.stx.take() {
                        if !stx.statements.is_empty() {
                            let mut out = BytesMut::new();
                            let mut statements = 1;
                            if !stx.locked {
                                write_lock(&mut out);
                                statements += 1;
                            }
                            write_log_insert(
                                &mut out,
                                &log::encode_settings(&stx.settings),
                                &log::encode_statements(&stx.statements),
                                &stx.copies,
                            );
                            fe::sync(&mut out);
                            send.pre_groups.push((out.freeze(), true, statements));
                            send.log_capture = true;
                            send.position_from_pending = true;
                        }
                    }
                    in_block = false;
                }
                TxOp::Rollback => {
                    self.stx = None;
                    in_block = false;
                }
            }
        }
        if let Some((frame, statements)) = &unit.log_query {
            let (text, capture) = self.query_log_text(statements, &settings);
            send.query_override = text.map(|t| (*frame, t));
            send.log_capture = capture;
            return send;
        }
        if head_lock {
            let mut out = BytesMut::new();
            write_lock(&mut out);
            send.head = Some(out.freeze());
        }
        if implicit_used && unit.ends_with_sync {
            let mut out = BytesMut::new();
            write_log_insert(
                &mut out,
                &log::encode_settings(&implicit.settings),
                &log::encode_statements(&implicit.statements),
                &[],
            );
            send.tail = Some(out.freeze());
            send.log_capture = true;
            implicit_used = false;
        }
        if implicit_used {
            // The unit's rest (after a Flush) comes later: its Sync logs these.
            implicit.implicit = true;
            self.stx = Some(implicit);
        }
        self.in_block = in_block;
        send
    }
}
