//! What pgrelay sends with a unit on the leader in statement mode: the ordering lock, the log
//! insert, and the simple query string with them in it.

use bytes::{Bytes, BytesMut};

use crate::protocol::frontend as fe;
use crate::replication::statement::log::{self, LoggedStatement};

use super::super::ddl::dollar_tag;
use super::super::Session;
use super::{LoggedTx, Plan, TxOp, LOCK_ALIAS, LOCK_STATEMENT, LOG_STATEMENT, SEQ_ALIAS};

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
        .replace(" AS seq", &format!(" AS \"{SEQ_ALIAS}\""))
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

impl Session {
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
    pub(in crate::session) fn plan_log_send(
        &mut self,
        unit: &crate::session::unit::Unit,
    ) -> LogSend {
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
