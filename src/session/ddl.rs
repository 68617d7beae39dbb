//! Row mode: the DDL a unit sends to the leader is written into the leader's WAL with
//! `pg_logical_emit_message`, in the transaction that runs it, so the followers' applier runs it
//! at the same point of the change stream. [`crate::routing::ddl`] decides which statements.
//!
//! - A replicated statement S runs inside
//!   `DO $pgrelay$BEGIN PERFORM pg_catalog.pg_logical_emit_message(true, 'pgrelay.ddl',
//!   <role, search path schemas> || $ddl$S$ddl$); EXECUTE $ddl$S$ddl$;
//!   END$pgrelay$`, with dollar-quote tags that cannot end early inside S. The client sees S's
//!   own command tag instead of `DO`, and S's errors and notices without the context lines the
//!   DO block adds (a syntax error keeps its position in the client's text).
//! - A statement that cannot run in a transaction block (`CONCURRENTLY`) runs as sent. Once it
//!   succeeded, pgrelay emits a non-transactional message on the same connection; the
//!   session's next unit waits until that is sent, so it lands behind it.
//! - A refused statement (`CREATE TABLE ... AS`, `SELECT ... INTO`) becomes a DO block that
//!   raises the refusal, so the server fails the statement (and its transaction) itself.
//!
//! In a session that may have temporary relations, S only emits its message if none of the
//! relations it names is temporary, checked before and after it runs.
//! <https://www.postgresql.org/docs/current/functions-admin.html#FUNCTIONS-REPLICATION>

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tracing::warn;

use crate::protocol::backend::{self as be, tag};
use crate::protocol::codec::Frame;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::{self, SqlState};
use crate::replication::row::message_key::MessageKey;
use crate::routing::classify::statement_spans;
pub use crate::routing::ddl::dollar_tag;
use crate::routing::ddl::{
    self as rddl, Ddl, Refusal, MESSAGE_HEADER_SQL, MESSAGE_PREFIX, MESSAGE_VERSION,
};
use crate::routing::lexer::StringMode;

use super::unit::Unit;
use super::{Flow, Group, Session, SessionEnd};

/// What a session signs its DDL messages with: the key the appliers check
/// ([`crate::replication::row::message_key`]) and the role the session logged in as.
#[derive(Debug, Clone)]
pub struct Signer {
    pub key: MessageKey,
    pub login: String,
}

impl Signer {
    /// The SQL expression of a message's content up to the statement's text (which follows
    /// after `||`): format, signature, login role, then the role and schemas on the leader.
    fn header(&self, statement: &str) -> String {
        let q = dollar_tag("login", &[&self.login]);
        format!(
            "'{MESSAGE_VERSION}' || E'\\n' || '{}' || E'\\n' || {q}{}{q} || E'\\n' || \
             {MESSAGE_HEADER_SQL}",
            self.key.sign(&self.login, statement),
            self.login
        )
    }
}

/// What pgrelay does with the replies to one statement it changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The statement ran in a DO block: the client gets `tag` instead of `DO`, and errors and
    /// notices lose the block's context.
    Wrapped {
        tag: String,
        statement: String,
        /// Characters before the statement in the text the client sent (for error positions).
        offset: usize,
        /// The DO block's line of the EXECUTE, as error contexts name it.
        execute_line: usize,
    },
    /// A DO block raised pgrelay's refusal.
    Refused,
    /// The statement ran as sent; once it succeeded, this query emits its message.
    EmitAfter { sql: String },
}

/// A reply expected in a group: to the `index`-th message there that completes (Execute, or
/// statement of a simple query).
#[derive(Debug, Clone)]
pub struct Expect {
    pub index: usize,
    pub reply: Arc<Reply>,
}

/// A reply expected for a unit's message, before the unit is sent.
#[derive(Debug, Clone)]
pub struct UnitDdl {
    /// The unit's frame that asked for it.
    pub frame: usize,
    /// Among the unit's completing messages.
    pub index: usize,
    pub reply: Arc<Reply>,
}

/// What row mode does to a statement prepared with Parse.
#[derive(Debug)]
pub struct StatementDdl {
    /// The Parse to send to the leader instead of the client's, if it is rewritten.
    pub parse: Option<Bytes>,
    pub reply: Arc<Reply>,
}

/// A Parse's fate in row mode.
#[derive(Debug)]
pub enum ParsePlan {
    /// Nothing to do.
    Keep,
    Statement(StatementDdl),
    /// Refused, and the statement has parameters a DO block cannot take: pgrelay drops the
    /// unit and has the server raise the refusal at the Sync.
    RefuseUnit(Refusal),
}

/// A rewritten simple query string, and the replies of its changed statements by position.
#[derive(Debug, PartialEq, Eq)]
pub struct QueryRewrite {
    pub sql: String,
    pub replies: Vec<(usize, Reply)>,
}

/// The refusal pgrelay answers for a query string whose statements it cannot tell apart.
const AMBIGUOUS: Refusal = Refusal {
    message: "pgrelay cannot tell where the statements of this query string end",
    detail: "A backslash in a '...' string means something else with standard_conforming_strings \
        off, and that changes where the statements end; in row replication mode pgrelay must \
        know them to replicate DDL.",
    hint: "Use E'...' strings for backslash escapes, or send the statements one at a time.",
};

/// Rewrites the DDL statements of a simple query string; None if nothing changes or the string
/// does not lex (the server rejects it). `temp_check`: the session may have temporary relations.
pub fn rewrite_query(sql: &str, temp_check: bool, signer: &Signer) -> Option<QueryRewrite> {
    let spans = statement_spans(sql, StringMode::Standard).ok()?;
    if sql.contains('\\') {
        if let Ok(legacy) = statement_spans(sql, StringMode::Backslash) {
            if legacy != spans {
                return Some(QueryRewrite {
                    sql: raise_block(AMBIGUOUS),
                    replies: vec![(0, Reply::Refused)],
                });
            }
        }
    }
    let mut out = String::with_capacity(sql.len() * 2 + 256);
    let mut replies = Vec::new();
    let mut copied = 0;
    for (i, &(start, end)) in spans.iter().enumerate() {
        let statement = sql.get(start..end).unwrap_or("");
        let (replacement, reply) = match plan_statement(statement, temp_check, signer) {
            Planned::Keep => continue,
            Planned::EmitAfter(sql) => (None, Reply::EmitAfter { sql }),
            Planned::Refused(refusal) => (Some(raise_block(refusal)), Reply::Refused),
            Planned::Wrapped(wrapped, tag) => {
                let offset = sql.get(..start).unwrap_or("").chars().count();
                let reply = Reply::Wrapped {
                    tag,
                    statement: statement.to_owned(),
                    offset,
                    execute_line: wrapped.execute_line,
                };
                (Some(wrapped.sql), reply)
            }
        };
        if let Some(replacement) = replacement {
            out.push_str(sql.get(copied..start).unwrap_or(""));
            out.push_str(&replacement);
            copied = end;
        }
        replies.push((i, reply));
    }
    if replies.is_empty() {
        return None;
    }
    out.push_str(sql.get(copied..).unwrap_or(""));
    Some(QueryRewrite { sql: out, replies })
}

/// Plans a Parse's statement. `temp_check` as for [`rewrite_query`].
pub fn plan_parse(parse: &fe::ParseMsg<'_>, temp_check: bool, signer: &Signer) -> ParsePlan {
    let sql = parse.query;
    let Ok(spans) = statement_spans(sql, StringMode::Standard) else {
        return ParsePlan::Keep;
    };
    // Several statements cannot be prepared: the server says so.
    let [(start, end)] = spans.as_slice() else {
        return ParsePlan::Keep;
    };
    let (start, end) = (*start, *end);
    let statement = sql.get(start..end).unwrap_or("");
    let replace = |replacement: &str| {
        let mut text = String::with_capacity(sql.len() + replacement.len());
        text.push_str(sql.get(..start).unwrap_or(""));
        text.push_str(replacement);
        text.push_str(sql.get(end..).unwrap_or(""));
        let mut out = BytesMut::new();
        fe::parse(&mut out, parse.name, &text, &[]);
        out.freeze()
    };
    match plan_statement(statement, temp_check, signer) {
        Planned::Keep => ParsePlan::Keep,
        Planned::EmitAfter(sql) => ParsePlan::Statement(StatementDdl {
            parse: None,
            reply: Arc::new(Reply::EmitAfter { sql }),
        }),
        Planned::Refused(refusal) => {
            if parse.param_types > 0 || rddl::has_parameters(statement) {
                return ParsePlan::RefuseUnit(refusal);
            }
            ParsePlan::Statement(StatementDdl {
                parse: Some(replace(&raise_block(refusal))),
                reply: Arc::new(Reply::Refused),
            })
        }
        Planned::Wrapped(wrapped, tag) => {
            if parse.param_types > 0 {
                // DDL takes no parameters; leave what the client declared alone.
                warn!(
                    command = %tag,
                    "a DDL statement prepared with parameter types is not replicated"
                );
                return ParsePlan::Keep;
            }
            let offset = sql.get(..start).unwrap_or("").chars().count();
            ParsePlan::Statement(StatementDdl {
                parse: Some(replace(&wrapped.sql)),
                reply: Arc::new(Reply::Wrapped {
                    tag,
                    statement: statement.to_owned(),
                    offset,
                    execute_line: wrapped.execute_line,
                }),
            })
        }
    }
}

/// What becomes of one statement.
enum Planned {
    Keep,
    /// Its DO block, and its own command tag.
    Wrapped(Wrapped, String),
    EmitAfter(String),
    Refused(Refusal),
}

fn plan_statement(statement: &str, temp_check: bool, signer: &Signer) -> Planned {
    let relations = |r: &rddl::Replicated| {
        if temp_check {
            r.relations.clone()
        } else {
            Vec::new()
        }
    };
    match rddl::analyze(statement) {
        Ddl::Local => Planned::Keep,
        Ddl::Transactional(r) => Planned::Wrapped(wrap(statement, &relations(&r), signer), r.tag),
        Ddl::AfterSuccess(r) => Planned::EmitAfter(emit_after(statement, &relations(&r), signer)),
        Ddl::Refused(refusal) => Planned::Refused(refusal),
    }
}

/// A statement's DO block.
#[derive(Debug, PartialEq, Eq)]
pub struct Wrapped {
    pub sql: String,
    /// The block's line of its EXECUTE.
    pub execute_line: usize,
}

/// The DO block that emits `statement` into the WAL and runs it; with `relations`, only if
/// none of them is temporary before or after it ran.
pub fn wrap(statement: &str, relations: &[String], signer: &Signer) -> Wrapped {
    let mut texts: Vec<&str> = vec![statement];
    texts.extend(relations.iter().map(String::as_str));
    let q = dollar_tag("ddl", &texts);
    let literal = format!("{q}{statement}{q}");
    let emit = format!(
        "PERFORM pg_catalog.pg_logical_emit_message(true, '{MESSAGE_PREFIX}', \
         {} || {literal});",
        signer.header(statement)
    );
    let execute = format!("EXECUTE {literal};");
    let body = if relations.is_empty() {
        format!("BEGIN {emit} {execute} END")
    } else {
        let temp = temporary(relations, &q);
        format!(
            "DECLARE pgrelay_temp boolean := {temp}; BEGIN {execute} \
             IF NOT (pgrelay_temp OR {temp}) THEN {emit} END IF; END"
        )
    };
    let before_execute = body.find(&execute).unwrap_or(0);
    let execute_line = 1 + body
        .get(..before_execute)
        .unwrap_or("")
        .matches('\n')
        .count();
    let o = dollar_tag("pgrelay", &[&body]);
    Wrapped {
        sql: format!("DO {o}{body}{o}"),
        execute_line,
    }
}

/// The query that emits a statement that ran outside a transaction block, once it succeeded.
pub fn emit_after(statement: &str, relations: &[String], signer: &Signer) -> String {
    let mut texts: Vec<&str> = vec![statement];
    texts.extend(relations.iter().map(String::as_str));
    let q = dollar_tag("ddl", &texts);
    let mut sql = format!(
        "SELECT pg_catalog.pg_logical_emit_message(false, '{MESSAGE_PREFIX}', \
         {} || {q}{statement}{q})",
        signer.header(statement)
    );
    if !relations.is_empty() {
        sql.push_str(" WHERE NOT ");
        sql.push_str(&temporary(relations, &q));
    }
    sql
}

/// SQL that is true if one of `relations` is a temporary relation now.
fn temporary(relations: &[String], q: &str) -> String {
    let names: Vec<String> = relations
        .iter()
        .map(|r| format!("pg_catalog.to_regclass({q}{r}{q})"))
        .collect();
    format!(
        "EXISTS (SELECT FROM pg_catalog.pg_class WHERE oid IN ({}) AND relpersistence = 't')",
        names.join(", ")
    )
}

/// A DO block that raises pgrelay's refusal as the server's own error.
pub fn raise_block(refusal: Refusal) -> String {
    raise_sql(&Raise::from(refusal))
}

/// A refusal pgrelay has the server raise (SQLSTATE `code`: 0A000 unless said otherwise),
/// with text made at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raise {
    pub code: SqlState,
    pub message: String,
    pub detail: String,
    pub hint: String,
}

impl From<Refusal> for Raise {
    fn from(r: Refusal) -> Self {
        Raise {
            code: sqlstate::FEATURE_NOT_SUPPORTED,
            message: r.message.to_owned(),
            detail: r.detail.to_owned(),
            hint: r.hint.to_owned(),
        }
    }
}

/// The refusal of DDL while the key that signs its message could not be read from the leader.
pub fn no_message_key() -> Raise {
    Raise {
        code: sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
        message: "pgrelay could not read its message key from the leader, so it cannot replicate DDL in row mode yet".into(),
        detail: "Row mode signs every DDL statement it writes into the leader's WAL with a key kept on the leader.".into(),
        hint: "Check that replication.user can connect to the leader; pgrelay tries again with the next statement.".into(),
    }
}

/// The refusal of a client statement that names an object in pgrelay's own schema
/// ([`crate::routing::own_schema`]), in every replication mode.
pub fn own_schema_refusal() -> Raise {
    Raise {
        code: sqlstate::INSUFFICIENT_PRIVILEGE,
        message: "permission denied for schema pgrelay".into(),
        detail: "The schema pgrelay holds pgrelay's replication state (the statement log, the \
                 applied positions); statements sent through pgrelay may not name it."
            .into(),
        hint: "pgrelay maintains this schema itself; see Security in pgrelay's README.".into(),
    }
}

/// A DO block that raises `refusal`.
pub fn raise_sql(refusal: &Raise) -> String {
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let body = format!(
        "BEGIN RAISE EXCEPTION USING ERRCODE = {}, MESSAGE = {}, DETAIL = {}, HINT = {}; END",
        literal(refusal.code.code()),
        literal(&refusal.message),
        literal(&refusal.detail),
        literal(&refusal.hint)
    );
    let o = dollar_tag("pgrelay", &[&body]);
    format!("DO {o}{body}{o}")
}

/// The context line a DO block adds to what a statement it runs with EXECUTE reports.
fn at_execute(line: usize) -> String {
    format!("PL/pgSQL function inline_code_block line {line} at EXECUTE")
}

const AT_RAISE: &str = "PL/pgSQL function inline_code_block line 1 at RAISE";

/// An ErrorResponse or NoticeResponse of a changed statement as the original statement would
/// have reported it: without the DO block's context, and with a syntax error's position in the
/// client's text. None: nothing to change.
pub fn fix_report(frame: &Frame, reply: &Reply) -> Option<Frame> {
    let body = frame.body();
    let fields = be::all_error_fields(&body).ok()?;
    let mut changed = false;
    let mut out: Vec<(u8, Vec<u8>)> = Vec::with_capacity(fields.len() + 1);
    let position = match reply {
        Reply::Wrapped {
            statement, offset, ..
        } => {
            let query = fields.iter().find(|(k, _)| *k == b'q').map(|(_, v)| *v);
            let internal = fields.iter().find(|(k, _)| *k == b'p').map(|(_, v)| *v);
            match (query, internal) {
                (Some(q), Some(p)) if q == statement.as_bytes() => std::str::from_utf8(p)
                    .ok()
                    .and_then(|p| p.parse::<usize>().ok())
                    .map(|p| p + offset),
                _ => None,
            }
        }
        _ => None,
    };
    for (kind, value) in fields {
        match (kind, reply) {
            (b'q' | b'p', _) if position.is_some() => {
                if kind == b'q' {
                    if let Some(p) = position {
                        out.push((b'P', p.to_string().into_bytes()));
                    }
                }
                changed = true;
            }
            (
                b'W',
                Reply::Wrapped {
                    statement,
                    execute_line,
                    ..
                },
            ) => {
                let context = String::from_utf8_lossy(value);
                match strip_context(&context, statement, *execute_line) {
                    Some(rest) => {
                        changed = true;
                        if !rest.is_empty() {
                            out.push((b'W', rest.into_bytes()));
                        }
                    }
                    None => out.push((kind, value.to_vec())),
                }
            }
            (b'W', Reply::Refused) if value == AT_RAISE.as_bytes() => changed = true,
            _ => out.push((kind, value.to_vec())),
        }
    }
    if !changed {
        return None;
    }
    let refs: Vec<(u8, &[u8])> = out.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    let mut buf = BytesMut::new();
    be::error_from_fields(&mut buf, frame.tag(), &refs);
    Some(Frame::new(frame.tag(), buf.get(5..).unwrap_or_default()))
}

/// The context without the lines the DO block added; None if it does not end with them.
fn strip_context(context: &str, statement: &str, execute_line: usize) -> Option<String> {
    let rest = context.strip_suffix(&at_execute(execute_line))?;
    let rest = rest.strip_suffix('\n').unwrap_or(rest);
    let sql_line = format!("SQL statement \"{statement}\"");
    let rest = match rest.strip_suffix(&sql_line) {
        Some(r) => r.strip_suffix('\n').unwrap_or(r),
        None => rest,
    };
    Some(rest.to_owned())
}

/// Fixes a reply of a group with rewritten statements: counts them off, gives CommandComplete
/// its original tag back, notes the messages to emit after the group, cleans up reports.
pub(super) fn fix_reply(group: &mut Group, frame: Frame) -> Frame {
    let Some(expect) = group.ddl.front() else {
        return frame;
    };
    if expect.index != group.completions {
        return frame;
    }
    match frame.tag() {
        tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE | tag::PORTAL_SUSPENDED => {
            let Some(expect) = group.ddl.pop_front() else {
                return frame;
            };
            match &*expect.reply {
                Reply::Wrapped { tag: t, .. } if frame.body().as_ref() == b"DO\0" => {
                    let mut body = Vec::with_capacity(t.len() + 1);
                    body.extend_from_slice(t.as_bytes());
                    body.push(0);
                    Frame::new(tag::COMMAND_COMPLETE, &body)
                }
                Reply::EmitAfter { sql } if frame.tag() == tag::COMMAND_COMPLETE => {
                    if !group.error {
                        group.ddl_emits.push(sql.clone());
                    }
                    frame
                }
                _ => frame,
            }
        }
        tag::ERROR_RESPONSE | tag::NOTICE_RESPONSE => {
            fix_report(&frame, &expect.reply).unwrap_or(frame)
        }
        _ => frame,
    }
}

impl Session {
    /// Whether DDL is replicated through the WAL (row mode).
    pub(super) fn row_mode(&self) -> bool {
        self.config.replication.mode == crate::config::ReplicationMode::Row
    }

    /// What the session signs its DDL messages with; None until the key is read from the
    /// leader ([`Session::load_message_key`]).
    pub(super) fn signer(&self) -> Option<Signer> {
        Some(Signer {
            key: self.shared.message_key.loaded()?.clone(),
            login: self.key.user.clone(),
        })
    }

    /// Reads the message key from the leader unless it was read already (once per process).
    pub(super) async fn load_message_key(&mut self) {
        if self.shared.message_key.loaded().is_none() {
            let config = self.config.clone();
            if let Err(e) = self.shared.message_key.get(&config).await {
                warn!(error = %e, "cannot read the key that signs DDL messages");
            }
        }
    }

    /// Whether the session may have temporary relations (it is pinned to the leader for them,
    /// or the unit pins it).
    pub(super) fn may_have_temp(&self, pins: bool) -> bool {
        self.leader_only || self.unit.pins_leader || pins
    }

    /// Plans the rewrite of a simple query that the classifier flagged, before it joins the
    /// unit as its next frame.
    pub(super) fn plan_query_ddl(&mut self, sql: &str, temp_check: bool) {
        let frame = self.unit.frames.len();
        let Some(signer) = self.signer() else {
            return self.refuse_query(frame, no_message_key());
        };
        let Some(rewrite) = rewrite_query(sql, temp_check, &signer) else {
            return;
        };
        let mut out = BytesMut::new();
        fe::query(&mut out, &rewrite.sql);
        self.unit.rewrites.push((frame, out.freeze()));
        let executes = self.unit.executes;
        for (i, reply) in rewrite.replies {
            self.unit.ddl.push(UnitDdl {
                frame,
                index: executes + i,
                reply: Arc::new(reply),
            });
        }
    }

    /// Drops the unit whose Parse was refused and skips the client's messages up to its Sync,
    /// where the server raises the refusal ([`Session::raise_refusal`]).
    pub(super) fn refuse_unit(&mut self, refusal: impl Into<Raise>) -> Flow {
        let unit = std::mem::take(&mut self.unit);
        for (name, _) in &unit.parses {
            self.statements.remove(name);
        }
        self.discard_until_sync = true;
        self.refused_unit = Some(refusal.into());
        Flow::Continue
    }

    /// The Sync of a refused unit: the server raises the refusal, so the client gets the
    /// error, and the transaction the state, that a failing statement gives.
    pub(super) async fn raise_refusal(
        &mut self,
        sync: Frame,
        refusal: Raise,
    ) -> Result<Flow, SessionEnd> {
        if self.busy_node().is_some()
            || self.holding
            || self.ack_wait.is_some()
            || self.ddl_emits_pending > 0
        {
            return Ok(Flow::Wait(sync));
        }
        self.discard_until_sync = false;
        self.refused_unit = None;
        let mut body = raise_sql(&refusal).into_bytes();
        body.push(0);
        self.unit = Unit {
            frames: vec![Frame::new(fe::tag::QUERY, &body)],
            read_only: false,
            ends_group: true,
            ddl: vec![UnitDdl {
                frame: 0,
                index: 0,
                reply: Arc::new(Reply::Refused),
            }],
            ..Unit::default()
        };
        self.dispatch_unit().await
    }

    /// An Execute of `portal` joins the unit as its next frame.
    pub(super) fn note_execute(&mut self, portal: &str) {
        if !self.ddl_portals.is_empty() {
            if let Some(d) = self.ddl_portals.get(portal) {
                self.unit.ddl.push(UnitDdl {
                    frame: self.unit.frames.len(),
                    index: self.unit.executes,
                    reply: d.reply.clone(),
                });
            }
        }
        self.unit.executes += 1;
    }

    /// A Bind creates `portal` for a statement (with its row-mode plan, if any).
    pub(super) fn note_bind(&mut self, portal: &str, ddl: Option<Arc<StatementDdl>>) {
        match ddl {
            Some(d) => {
                self.ddl_portals.insert(portal.to_owned(), d);
            }
            None if !self.ddl_portals.is_empty() => {
                self.ddl_portals.remove(portal);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use crate::protocol::backend::Report;
    use crate::protocol::sqlstate;
    use crate::routing::lexer::{Lexer, TokenKind};

    /// The dollar-quoted strings of `sql` as the lexer reads them.
    fn dollar_strings(sql: &str) -> Vec<&str> {
        Lexer::new(sql, StringMode::Standard)
            .filter(|t| t.kind == TokenKind::DollarString)
            .map(|t| t.text(sql))
            .collect()
    }

    fn signer() -> Signer {
        Signer {
            key: MessageKey::from_bytes([3; 32]),
            login: "app".into(),
        }
    }

    #[test]
    fn a_message_header_is_signed_for_the_login_and_statement() {
        let h = signer().header("CREATE TABLE t ()");
        let sig = signer().key.sign("app", "CREATE TABLE t ()");
        assert_eq!(
            h,
            format!("'v2' || E'\\n' || '{sig}' || E'\\n' || $login$app$login$ || E'\\n' || {MESSAGE_HEADER_SQL}")
        );
    }

    #[test]
    fn wraps_a_statement() {
        let w = wrap("alter table a add column c int", &[], &signer());
        assert_eq!(
            w.sql,
            format!(
                "DO $pgrelay$BEGIN PERFORM pg_catalog.pg_logical_emit_message(true, 'pgrelay.ddl', \
                 {} || \
                 $ddl$alter table a add column c int$ddl$); \
                 EXECUTE $ddl$alter table a add column c int$ddl$; END$pgrelay$",
                signer().header("alter table a add column c int")
            )
        );
        assert_eq!(w.execute_line, 1);
    }

    #[test]
    fn quotes_survive_dollar_bodies() {
        let f = "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $ddl$ BEGIN RETURN \
                 '$$ $pgrelay$ $ddl'; END $ddl$";
        let w = wrap(f, &[], &signer());
        assert!(w.sql.starts_with("DO $pgrelay1$BEGIN"), "{}", w.sql);
        // The whole block is one dollar string, whose body quotes the statement intact.
        let outer = dollar_strings(&w.sql);
        assert_eq!(outer.len(), 1, "{}", w.sql);
        let body = outer[0]
            .strip_prefix("$pgrelay1$")
            .and_then(|b| b.strip_suffix("$pgrelay1$"))
            .unwrap();
        let inner: Vec<&str> = dollar_strings(body)
            .into_iter()
            .filter(|s| !s.starts_with("$login$"))
            .collect();
        assert_eq!(inner, vec![format!("$ddl1${f}$ddl1$"); 2]);
        // A statement ending in a tag's prefix does not end the quote early.
        let tag = dollar_tag("ddl", &["x$ddl"]);
        assert_ne!(tag, "$ddl$");
        assert_eq!(dollar_tag("ddl", &["x$ddl$", "$ddl1$"]), "$ddl2$");
        assert_eq!(dollar_tag("ddl", &["$$"]), "$ddl$");
    }

    #[test]
    fn execute_line_counts_statement_lines() {
        let w = wrap("CREATE TABLE t (\n a int\n)", &[], &signer());
        assert_eq!(w.execute_line, 3);
        let w = wrap("DROP TABLE\n t", &["t".to_owned()], &signer());
        assert_eq!(w.execute_line, 1);
        assert!(
            w.sql.contains("pg_catalog.to_regclass($ddl$t$ddl$)"),
            "{}",
            w.sql
        );
        assert!(w
            .sql
            .starts_with("DO $pgrelay$DECLARE pgrelay_temp boolean := EXISTS"));
    }

    #[test]
    fn rewrites_only_ddl_statements() {
        let sql = "/* pgrelay: leader */ CREATE TABLE m (a int); INSERT INTO m VALUES (1);\n\
                   alter table m add column b int ; SELECT 1";
        let r = rewrite_query(sql, false, &signer()).unwrap();
        let statements = crate::routing::classify::split_statements(&r.sql).unwrap();
        assert_eq!(statements.len(), 4, "{}", r.sql);
        assert!(r.sql.starts_with("/* pgrelay: leader */ DO $pgrelay$"));
        assert_eq!(statements[1], "INSERT INTO m VALUES (1)");
        assert_eq!(statements[3], "SELECT 1");
        assert_eq!(r.replies.len(), 2);
        assert_eq!(
            r.replies[0],
            (
                0,
                Reply::Wrapped {
                    tag: "CREATE TABLE".into(),
                    statement: "CREATE TABLE m (a int)".into(),
                    offset: 22,
                    execute_line: 1
                }
            )
        );
        match &r.replies[1] {
            (2, Reply::Wrapped { tag, offset, .. }) => {
                assert_eq!(tag, "ALTER TABLE");
                assert_eq!(&sql[*offset..*offset + 5], "alter");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            rewrite_query("SELECT 1; INSERT INTO t VALUES (1)", false, &signer()),
            None
        );
        assert_eq!(
            rewrite_query("CREATE TEMP TABLE t (a int)", false, &signer()),
            None
        );
        assert_eq!(rewrite_query("SELECT 'x", false, &signer()), None);
    }

    #[test]
    fn concurrently_and_refusals() {
        let r = rewrite_query("CREATE INDEX CONCURRENTLY i ON t (a)", true, &signer()).unwrap();
        assert_eq!(r.sql, "CREATE INDEX CONCURRENTLY i ON t (a)");
        match &r.replies[..] {
            [(0, Reply::EmitAfter { sql })] => assert_eq!(
                sql,
                &format!(
                    "SELECT pg_catalog.pg_logical_emit_message(false, 'pgrelay.ddl', \
                     {} || \
                     $ddl$CREATE INDEX CONCURRENTLY i ON t (a)$ddl$) WHERE NOT EXISTS (SELECT FROM \
                     pg_catalog.pg_class WHERE oid IN (pg_catalog.to_regclass($ddl$t$ddl$)) AND \
                     relpersistence = 't')",
                    signer().header("CREATE INDEX CONCURRENTLY i ON t (a)")
                )
            ),
            other => panic!("{other:?}"),
        }
        let r = rewrite_query("SELECT 1; CREATE TABLE x AS SELECT 2", false, &signer()).unwrap();
        assert!(r.sql.starts_with("SELECT 1; DO $pgrelay$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = 'CREATE TABLE ... AS is not supported in pgrelay''s row"), "{}", r.sql);
        assert_eq!(r.replies, vec![(1, Reply::Refused)]);
        // Statement boundaries that depend on standard_conforming_strings.
        let r = rewrite_query(r"SELECT 'a\'; CREATE TABLE x (); --'", false, &signer()).unwrap();
        assert!(
            r.sql.contains("cannot tell where the statements"),
            "{}",
            r.sql
        );
        let r = rewrite_query(r"COMMENT ON TABLE t IS 'a\b'", false, &signer()).unwrap();
        assert!(r.sql.starts_with("DO $pgrelay$BEGIN PERFORM"));
    }

    fn parse_msg(query: &str, param_types: usize) -> fe::ParseMsg<'_> {
        fe::ParseMsg {
            name: "s1",
            query,
            param_types,
        }
    }

    #[test]
    fn parse_plans() {
        match plan_parse(&parse_msg("ALTER TABLE t ADD c int;", 0), false, &signer()) {
            ParsePlan::Statement(StatementDdl {
                parse: Some(bytes),
                reply,
            }) => {
                let mut buf = BytesMut::from(&bytes[..]);
                let frame = crate::protocol::codec::decode_frame(&mut buf, 1 << 20)
                    .unwrap()
                    .unwrap();
                let body = frame.body();
                let p = fe::parse_parse(&body).unwrap();
                assert_eq!(p.name, "s1");
                assert!(p.query.starts_with("DO $pgrelay$BEGIN PERFORM"));
                assert!(p.query.ends_with("END$pgrelay$;"), "{}", p.query);
                assert!(matches!(&*reply, Reply::Wrapped { tag, .. } if tag == "ALTER TABLE"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan_parse(&parse_msg("ALTER TABLE t ADD c int", 1), false, &signer()),
            ParsePlan::Keep
        ));
        assert!(matches!(
            plan_parse(&parse_msg("SELECT $1::int INTO x", 0), false, &signer()),
            ParsePlan::RefuseUnit(_)
        ));
        assert!(matches!(
            plan_parse(
                &parse_msg("CREATE TABLE x AS SELECT 1", 0),
                false,
                &signer()
            ),
            ParsePlan::Statement(StatementDdl { parse: Some(_), .. })
        ));
        assert!(matches!(
            plan_parse(&parse_msg("DROP INDEX CONCURRENTLY i", 0), false, &signer()),
            ParsePlan::Statement(StatementDdl { parse: None, .. })
        ));
        assert!(matches!(
            plan_parse(
                &parse_msg("CREATE TABLE a (); CREATE TABLE b ()", 0),
                false,
                &signer()
            ),
            ParsePlan::Keep
        ));
    }

    fn report(fields: &[(u8, &str)]) -> Frame {
        let refs: Vec<(u8, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        let mut buf = BytesMut::new();
        be::error_from_fields(&mut buf, tag::ERROR_RESPONSE, &refs);
        Frame::new(tag::ERROR_RESPONSE, &buf[5..])
    }

    fn fields(frame: &Frame) -> Vec<(u8, String)> {
        let body = frame.body();
        be::all_error_fields(&body)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.to_vec()).unwrap()))
            .collect()
    }

    #[test]
    fn reports_lose_the_do_blocks_context() {
        let statement = "alter table nosuch add column c int";
        let reply = Reply::Wrapped {
            tag: "ALTER TABLE".into(),
            statement: statement.into(),
            offset: 10,
            execute_line: 1,
        };
        let err = report(&[
            (b'S', "ERROR"),
            (b'C', "42P01"),
            (b'M', "relation \"nosuch\" does not exist"),
            (
                b'W',
                "SQL statement \"alter table nosuch add column c int\"\n\
                 PL/pgSQL function inline_code_block line 1 at EXECUTE",
            ),
            (b'F', "namespace.c"),
        ]);
        assert_eq!(
            fields(&fix_report(&err, &reply).unwrap()),
            vec![
                (b'S', "ERROR".into()),
                (b'C', "42P01".into()),
                (b'M', "relation \"nosuch\" does not exist".into()),
                (b'F', "namespace.c".into())
            ]
        );
        // Context from deeper down stays.
        let err = report(&[
            (b'C', "P0001"),
            (
                b'W',
                "PL/pgSQL function trf() line 3 at RAISE\n\
                 SQL statement \"alter table nosuch add column c int\"\n\
                 PL/pgSQL function inline_code_block line 1 at EXECUTE",
            ),
        ]);
        assert_eq!(
            fields(&fix_report(&err, &reply).unwrap())[1],
            (b'W', "PL/pgSQL function trf() line 3 at RAISE".into())
        );
        // A syntax error points into the client's text.
        let err = report(&[
            (b'C', "42601"),
            (b'p', "7"),
            (b'q', statement),
            (
                b'W',
                "PL/pgSQL function inline_code_block line 1 at EXECUTE",
            ),
        ]);
        assert_eq!(
            fields(&fix_report(&err, &reply).unwrap()),
            vec![(b'C', "42601".into()), (b'P', "17".into())]
        );
        // Someone else's error is left alone.
        let other = report(&[(b'C', "42P01"), (b'W', "SQL function \"f\" statement 1")]);
        assert!(fix_report(&other, &reply).is_none());
        let mut raised = BytesMut::new();
        Report::error(sqlstate::FEATURE_NOT_SUPPORTED, "no").write_error(&mut raised);
        let raised = Frame::new(tag::ERROR_RESPONSE, &raised[5..]);
        assert!(fix_report(&raised, &Reply::Refused).is_none());
        let raised = report(&[(b'C', "0A000"), (b'W', AT_RAISE)]);
        assert_eq!(
            fields(&fix_report(&raised, &Reply::Refused).unwrap()),
            vec![(b'C', "0A000".into())]
        );
    }
}
