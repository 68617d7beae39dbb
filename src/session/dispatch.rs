//! Client messages: collecting them into units, choosing each unit's node, and sending it
//! there together with whatever pgrelay must do first on that node (replay session state,
//! prepare statements the client prepared elsewhere).

use std::sync::Arc;

use tracing::{debug, warn};

use crate::protocol::backend::{self as be, Report};
use crate::protocol::codec::Frame;
use crate::protocol::frontend::{self as fe, tag};
use crate::protocol::sqlstate;

use crate::config::{Ack, Consistency};
use crate::replication::physical::LEADER_POSITION_SQL;
use crate::routing::own_schema::names_own_schema;

use super::ddl::{self, ParsePlan};
use super::overrides;
use super::statement;
use super::unit::{Statement, StatementClass, Unit};
use super::{Flow, Group, Session, SessionEnd};

impl Session {
    /// Handles one client message.
    pub(super) async fn on_client_message(&mut self, frame: Frame) -> Result<Flow, SessionEnd> {
        let t = frame.tag();
        if self.discard_until_sync && t != tag::SYNC {
            return Ok(Flow::Continue);
        }
        match t {
            tag::QUERY => {
                self.refresh_classifier();
                if self.reload_classifier && self.statement_mode() {
                    self.load_classifier().await;
                }
                let body = frame.body();
                let sql =
                    fe::parse_query(&body).map_err(|e| self.protocol_violation(e.to_string()))?;
                if self.unit.frames.is_empty() {
                    if let Some(command) = overrides::parse_command(sql) {
                        return self.answer_command(frame, command);
                    }
                }
                let c = self.classifier.classify(sql);
                self.count_parse_failure(&c);
                let class = StatementClass::of(&c, &self.sql_prepared, sql);
                if names_own_schema(sql) {
                    self.refuse_query(self.unit.frames.len(), ddl::own_schema_refusal());
                } else {
                    if c.ddl && self.row_mode() {
                        self.load_message_key().await;
                        let temp = self.may_have_temp(class.pins_leader);
                        self.plan_query_ddl(sql, temp);
                    }
                    if self.statement_mode() && statement::may_log(&c, sql) {
                        self.plan_query_log(sql);
                    }
                }
                self.unit.merge(class);
                self.unit.changes.extend(c.session_changes);
                self.unit.frames.push(frame);
                self.unit.ends_group = true;
                self.dispatch_unit().await
            }
            tag::PARSE => {
                self.refresh_classifier();
                if self.reload_classifier && self.statement_mode() {
                    self.load_classifier().await;
                }
                if self.row_mode() && self.shared.message_key.loaded().is_none() {
                    // Only DDL needs the key: a statement is classified twice while it is
                    // missing (the leader was unreachable so far).
                    let body = frame.body();
                    let parse = fe::parse_parse(&body)
                        .map_err(|e| self.protocol_violation(e.to_string()))?;
                    if self.classifier.classify(parse.query).ddl {
                        self.load_message_key().await;
                    }
                }
                let may_refuse = self.open_unit.is_none();
                let statement = match self.plan_parse(&frame, may_refuse, false)? {
                    Ok(statement) => statement,
                    Err(refusal) => return Ok(self.refuse_unit(refusal)),
                };
                if let Some(rewritten) = statement.ddl.as_ref().and_then(|d| d.parse.clone()) {
                    self.unit.rewrites.push((self.unit.frames.len(), rewritten));
                }
                if let Some(rewritten) = &statement.leader_parse {
                    self.unit
                        .rewrites
                        .push((self.unit.frames.len(), rewritten.clone()));
                }
                let body = frame.body();
                let name = fe::parse_parse(&body)
                    .map_err(|e| self.protocol_violation(e.to_string()))?
                    .name
                    .to_owned();
                self.unit.read_only &= statement.class.read_only;
                let statement = Arc::new(statement);
                // A named statement that exists already makes the node fail the Parse (42P05);
                // the existing one stays, as in Postgres.
                if name.is_empty() || !self.statements.contains_key(&name) {
                    self.statements.insert(name.clone(), statement.clone());
                    self.unit.parses.retain(|(n, _)| *n != name);
                    self.unit.parses.push((name, statement));
                }
                self.collect(frame).await
            }
            tag::BIND => {
                let body = frame.body();
                let bind =
                    fe::parse_bind(&body).map_err(|e| self.protocol_violation(e.to_string()))?;
                let mut ddl = None;
                if let Some(s) = self.statements.get(bind.statement) {
                    let class = s.class;
                    if let Some(log) = &s.log {
                        let op = statement::bind_op(&log.0, &log.1, &body);
                        match op {
                            Some(op) => {
                                self.log_portals.insert(bind.portal.to_owned(), op);
                            }
                            None => {
                                self.log_portals.remove(bind.portal);
                            }
                        }
                    } else if !self.log_portals.is_empty() {
                        self.log_portals.remove(bind.portal);
                    }
                    if let Some(setting) = &s.setting {
                        self.unit.settings.push(setting.clone());
                    }
                    ddl = s.ddl.clone();
                    self.unit.merge(class);
                } else {
                    // Unknown statement: the node reports 26000, wherever it runs.
                    self.unit.merge(WRITE);
                }
                self.note_bind(bind.portal, ddl);
                let name = bind.statement.to_owned();
                self.unit.uses(&name);
                self.collect(frame).await
            }
            tag::DESCRIBE => {
                let body = frame.body();
                let (kind, name) = fe::parse_target(&body, "Describe")
                    .map_err(|e| self.protocol_violation(e.to_string()))?;
                if kind == b'S' {
                    let read_only = self.statements.get(name).is_some_and(|s| s.class.read_only);
                    self.unit.read_only &= read_only;
                    let name = name.to_owned();
                    self.unit.uses(&name);
                }
                self.collect(frame).await
            }
            tag::CLOSE => {
                let body = frame.body();
                let (kind, name) = fe::parse_target(&body, "Close")
                    .map_err(|e| self.protocol_violation(e.to_string()))?;
                if kind == b'S' {
                    let name = name.to_owned();
                    self.statements.remove(&name);
                    self.unit.parses.retain(|(n, _)| *n != name);
                    self.unit.closes.push(name);
                } else if !self.ddl_portals.is_empty() {
                    self.ddl_portals.remove(name);
                }
                self.collect(frame).await
            }
            tag::EXECUTE => {
                let body = frame.body();
                let portal =
                    fe::parse_execute(&body).map_err(|e| self.protocol_violation(e.to_string()))?;
                self.note_execute(portal);
                if !self.log_portals.is_empty() {
                    if let Some(op) = self.log_portals.remove(portal) {
                        if self.copy_outside_block(&op) && self.open_unit.is_none() {
                            return Ok(self.refuse_unit(statement::copy_outside_block()));
                        }
                        self.unit.log_ops.push((self.unit.frames.len(), op));
                    }
                }
                self.collect(frame).await
            }
            tag::SYNC => {
                if self.discard_until_sync {
                    if let Some(refusal) = self.refused_unit.clone() {
                        return self.raise_refusal(frame, refusal).await;
                    }
                    self.discard_until_sync = false;
                    self.unit = Unit::default();
                    be::ready_for_query(&mut self.client.wbuf, self.tx_status);
                    return Ok(Flow::Continue);
                }
                if self.copy_sync_pending {
                    // The node skipped the unit's first Sync while in COPY IN; this one
                    // finishes the group that is already waiting.
                    self.copy_sync_pending = false;
                    if let Some(node) = self.last_node {
                        if let Some(b) = self.backend_mut(node) {
                            b.conn.wbuf.extend_from_slice(frame.raw());
                            return Ok(Flow::Continue);
                        }
                    }
                }
                self.unit.frames.push(frame);
                self.unit.ends_group = true;
                self.unit.ends_with_sync = true;
                self.dispatch_unit().await
            }
            tag::FLUSH => {
                self.unit.frames.push(frame);
                self.dispatch_unit().await
            }
            tag::FUNCTION_CALL => {
                self.unit.merge(WRITE);
                self.unit.frames.push(frame);
                self.unit.ends_group = true;
                self.dispatch_unit().await
            }
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {
                if let Some(stx) = self.stx.as_mut().filter(|s| s.copy_refused) {
                    // The rest of a COPY that went past max_copy_bytes.
                    if t != tag::COPY_DATA {
                        stx.copy_refused = false;
                        self.copy_node = None;
                    }
                    return Ok(Flow::Continue);
                }
                if let Some(stx) = self.stx.as_mut().filter(|s| s.copying) {
                    if t != tag::COPY_DATA {
                        stx.copying = false;
                    } else if !self.hold_copy_data(&frame.body()) {
                        return Ok(Flow::Continue);
                    }
                }
                let node = self.copy_node.or(self.last_node);
                if t != tag::COPY_DATA {
                    self.copy_node = None;
                }
                if let Some(b) = node.and_then(|n| self.backend_mut(n)) {
                    b.conn.wbuf.extend_from_slice(frame.raw());
                }
                Ok(Flow::Continue)
            }
            tag::TERMINATE => Err(SessionEnd::Terminated),
            other => Err(self.protocol_violation(format!(
                "invalid frontend message type {}",
                char::from(other)
            ))),
        }
    }

    /// Adds an extended-protocol message to the unit. A unit that grows past
    /// [`UNIT_BUFFER_LIMIT`] without a Sync is sent on as if the client had flushed: Postgres
    /// processes messages as they arrive, and a client must not make pgrelay buffer without bound.
    async fn collect(&mut self, frame: Frame) -> Result<Flow, SessionEnd> {
        self.unit.bytes += frame.raw().len();
        self.unit.frames.push(frame);
        if self.unit.bytes > UNIT_BUFFER_LIMIT {
            return self.dispatch_unit().await;
        }
        Ok(Flow::Continue)
    }

    /// Plans a client's Parse under the session's replication mode: its class, and what the
    /// leader gets instead of the client's text (row-mode DDL, statement-mode rewrites). A
    /// refusal is `Err` when `may_refuse` (the unit is refused); otherwise the leader's Parse
    /// has the server raise it when the statement runs. `replanning`: a statement prepared
    /// before, planned again for a new replication mode (not counted as a new message).
    pub(super) fn plan_parse(
        &mut self,
        frame: &Frame,
        may_refuse: bool,
        replanning: bool,
    ) -> Result<Result<Statement, ddl::Raise>, SessionEnd> {
        let body = frame.body();
        let parse = fe::parse_parse(&body).map_err(|e| self.protocol_violation(e.to_string()))?;
        let c = self.classifier.classify(parse.query);
        if !replanning {
            self.count_parse_failure(&c);
        }
        let class = StatementClass::of(&c, &self.sql_prepared, parse.query);
        let own_schema = names_own_schema(parse.query);
        if own_schema && may_refuse {
            return Ok(Err(ddl::own_schema_refusal()));
        }
        let ddl = if own_schema {
            Some(raised_at_execute(parse.name, &ddl::own_schema_refusal()))
        } else if c.ddl && self.row_mode() {
            let temp = self.may_have_temp(class.pins_leader);
            match self.signer() {
                None if may_refuse => return Ok(Err(ddl::no_message_key())),
                None => Some(raised_at_execute(parse.name, &ddl::no_message_key())),
                Some(signer) => match ddl::plan_parse(&parse, temp, &signer) {
                    ParsePlan::Keep => None,
                    ParsePlan::Statement(d) => Some(Arc::new(d)),
                    ParsePlan::RefuseUnit(refusal) if may_refuse => return Ok(Err(refusal.into())),
                    // Part of the unit is on a node already: its Sync must go there. The
                    // server raises the refusal at Execute instead (a client that binds
                    // parameters is told they do not fit first).
                    ParsePlan::RefuseUnit(refusal) => {
                        Some(raised_at_execute(parse.name, &refusal.into()))
                    }
                },
            }
        } else {
            None
        };
        let (log, leader_parse) = if self.statement_mode() && !own_schema {
            match self.plan_parse_log(&body, parse.name, parse.query, &c) {
                Ok(planned) => planned,
                Err(refusal) if may_refuse => return Ok(Err(refusal)),
                Err(refusal) => {
                    // Part of the unit is on the leader already: the server raises the
                    // refusal at Execute instead.
                    let mut out = bytes::BytesMut::new();
                    fe::parse(&mut out, parse.name, &ddl::raise_sql(&refusal), &[]);
                    (None, Some(out.freeze()))
                }
            }
        } else {
            (None, None)
        };
        let setting = overrides::parse_command(parse.query)
            .filter(|c| !matches!(c, overrides::Command::Show { .. }));
        let statement = Statement {
            id: self.next_statement_id,
            parse: frame.raw().clone(),
            class,
            setting,
            ddl,
            log,
            leader_parse,
        };
        self.next_statement_id += 1;
        Ok(Ok(statement))
    }

    fn protocol_violation(&mut self, message: String) -> SessionEnd {
        Report::fatal(sqlstate::PROTOCOL_VIOLATION, &message).write_error(&mut self.client.wbuf);
        SessionEnd::Fatal(message)
    }

    /// Picks up a newer function list after DDL on functions anywhere in pgrelay.
    fn refresh_classifier(&mut self) {
        let generation = self.shared.classifiers.generation();
        if generation != self.classifier_generation {
            if let Some(c) = self.shared.classifiers.get(&self.database) {
                self.classifier = c;
                self.classifier_generation = generation;
            } else {
                self.reload_classifier = true;
            }
        }
    }

    pub(super) fn backend_mut(&mut self, node: usize) -> Option<&mut super::Backend> {
        self.backends.get_mut(node).and_then(|b| b.as_mut())
    }

    /// Puts the unit's last message back into the inbox, to be handled again later.
    pub(super) fn wait_for_last_frame(&mut self) -> Flow {
        match self.unit.frames.pop() {
            Some(frame) => {
                self.unit.bytes = self.unit.bytes.saturating_sub(frame.raw().len());
                if frame.tag() == tag::SYNC
                    || frame.tag() == tag::QUERY
                    || frame.tag() == tag::FUNCTION_CALL
                {
                    self.unit.ends_group = false;
                    self.unit.ends_with_sync = false;
                }
                if frame.tag() == tag::EXECUTE {
                    self.unit.executes = self.unit.executes.saturating_sub(1);
                }
                // Handled again later: what it asked for is asked again then.
                let kept = self.unit.frames.len();
                self.unit.rewrites.retain(|(f, _)| *f < kept);
                self.unit.ddl.retain(|d| d.frame < kept);
                if frame.tag() == tag::EXECUTE {
                    // Handled again later: its portal logs then.
                    if let Some(i) = self.unit.log_ops.iter().position(|(f, _)| *f == kept) {
                        let (_, op) = self.unit.log_ops.remove(i);
                        if let Ok(portal) = fe::parse_execute(&frame.body()) {
                            self.log_portals.insert(portal.to_owned(), op);
                        }
                    }
                }
                self.unit.log_ops.retain(|(f, _)| *f < kept);
                if self
                    .unit
                    .log_query
                    .as_ref()
                    .is_some_and(|(f, _)| *f >= kept)
                {
                    self.unit.log_query = None;
                }
                if self.unit.frames.is_empty() {
                    // The message is handled (and classified) again later; a unit of other
                    // messages keeps its already merged, more conservative flags.
                    self.unit = Unit::default();
                }
                Flow::Wait(frame)
            }
            None => Flow::Continue,
        }
    }

    /// Answers the unit with an error pgrelay produced itself.
    pub(super) fn fail_unit(&mut self, message: &str) {
        let unit = std::mem::take(&mut self.unit);
        Report::error(sqlstate::CONNECTION_FAILURE, message).write_error(&mut self.client.wbuf);
        if unit.ends_group {
            be::ready_for_query(&mut self.client.wbuf, self.tx_status);
        } else {
            self.discard_until_sync = true;
        }
        for (name, _) in &unit.parses {
            self.statements.remove(name);
        }
    }

    /// Writes the unit, preceded by pgrelay's own preparation, into the node's buffer.
    pub(super) fn send_unit(&mut self, node: usize) {
        let unit = std::mem::take(&mut self.unit);
        let leader = self.shared.nodes.leader();
        let in_tx = self.pinned.is_some() || unit.begin.is_some();
        // The leader position a committed write reached is read right behind the commit, on
        // the same connection, so the client pays no extra round trip.
        // Statement mode: the position is the seq of the log entry the commit inserts.
        let statement_mode = node == leader && self.statement_mode();
        let log_send = if statement_mode {
            self.plan_log_send(&unit)
        } else {
            statement::LogSend::default()
        };
        for warning in &unit.log_warnings {
            let mut out = bytes::BytesMut::new();
            Report::warning(sqlstate::WARNING, warning).write_notice(&mut out);
            self.emit(&out);
        }
        let capture = if statement_mode {
            log_send.log_capture
        } else {
            self.tracks_positions()
                && node == leader
                && unit.ends_group
                && ((unit.writes && !in_tx) || (unit.ends_tx && (self.tx_wrote || unit.writes)))
        };
        // The commit's replies wait for its position (which follows on the same connection):
        // with `ack = "async"` only for that, otherwise until followers applied it.
        let hold = capture;
        // Row mode: DDL on the leader is rewritten (see `ddl`).
        let row_ddl = node == leader && (self.row_mode() || statement_mode);
        // A read outside a transaction may run again elsewhere if its follower dies first.
        let retryable = node != leader && !in_tx && unit.ends_group && self.open_unit.is_none();
        let statements: Vec<(String, Arc<Statement>)> = unit
            .needs
            .iter()
            .filter_map(|n| self.statements.get(n).map(|s| (n.clone(), s.clone())))
            .collect();
        let Some(backend) = self.backends.get_mut(node).and_then(|b| b.as_mut()) else {
            return;
        };
        let continuing = self.open_unit == Some(node);
        let conn = &mut backend.conn;
        // Session changes made elsewhere, as a group of their own: only between units, since
        // their ReadyForQuery would end an unfinished unit's implicit transaction.
        if !continuing && !backend.pending_replay.is_empty() {
            let sql = backend.pending_replay.join(";\n");
            backend.pending_replay.clear();
            fe::query(&mut conn.wbuf, &sql);
            backend.groups.push_back(Group::default());
        }
        // Statement mode: the ordering lock, the log insert before a COMMIT.
        let mut inline_own = 0;
        let mut head = bytes::BytesMut::new();
        for (bytes, insert, statements) in &log_send.pre_groups {
            if continuing {
                // The client's unit is open on this connection: inside it, without the Sync.
                let without_sync = bytes.strip_suffix(&[fe::tag::SYNC, 0, 0, 0, 4][..]);
                head.extend_from_slice(without_sync.unwrap_or(bytes));
                inline_own += statements;
                continue;
            }
            conn.wbuf.extend_from_slice(bytes);
            backend.groups.push_back(Group {
                log_insert: *insert,
                ..Group::default()
            });
        }
        if let Some(h) = &log_send.head {
            head.extend_from_slice(h);
            inline_own += 1;
        }
        // Statements the client closed on another node, and statements it prepared on another
        // node (or replaced since): closed and prepared here, inside the client's unit; their
        // CloseComplete and ParseComplete replies are swallowed. Closing a statement that does
        // not exist is not an error, so a name in doubt is simply closed first.
        let (mut closes, mut parses, mut injected) = (0, 0, Vec::new());
        for name in backend.pending_closes.drain(..) {
            fe::close_statement(&mut conn.wbuf, &name);
            closes += 1;
        }
        for (name, statement) in statements {
            if backend.prepared.get(&name) == Some(&statement.id) {
                continue;
            }
            if !name.is_empty() {
                fe::close_statement(&mut conn.wbuf, &name);
                closes += 1;
            }
            let parse = match (&statement.ddl, &statement.leader_parse) {
                (Some(d), _) if row_ddl => d.parse.as_ref().unwrap_or(&statement.parse),
                (_, Some(p)) if node == leader => p,
                _ => &statement.parse,
            };
            conn.wbuf.extend_from_slice(parse);
            parses += 1;
            debug!(node, statement = %name, "preparing a statement on another node");
            backend.prepared.insert(name.clone(), statement.id);
            injected.push(name);
        }
        conn.wbuf.extend_from_slice(&head);
        let last = unit.frames.len().saturating_sub(1);
        if row_ddl
            && (!unit.rewrites.is_empty()
                || log_send.query_override.is_some()
                || log_send.tail.is_some())
        {
            for (i, frame) in unit.frames.iter().enumerate() {
                if i == last && frame.tag() == fe::tag::SYNC {
                    if let Some(tail) = &log_send.tail {
                        conn.wbuf.extend_from_slice(tail);
                    }
                }
                match unit.rewrites.iter().find(|(f, _)| *f == i) {
                    Some((_, rewritten)) => conn.wbuf.extend_from_slice(rewritten),
                    None => match &log_send.query_override {
                        Some((f, sql)) if *f == i => fe::query(&mut conn.wbuf, sql),
                        _ => conn.wbuf.extend_from_slice(frame.raw()),
                    },
                }
            }
        } else {
            for frame in &unit.frames {
                conn.wbuf.extend_from_slice(frame.raw());
            }
        }
        for (name, statement) in &unit.parses {
            backend.prepared.insert(name.clone(), statement.id);
        }
        for name in &unit.closes {
            backend.prepared.remove(name);
        }
        let target = crate::server::CancelTarget {
            addr: conn.addr,
            pid: conn.pid,
            secret: conn.secret,
        };
        // The unit's replies are relayed from its first part on (after a Flush the client
        // reads them before it sends the rest).
        let group = match backend.groups.back_mut() {
            Some(group) if continuing => group,
            _ => {
                backend.groups.push_back(Group {
                    forward: true,
                    started: Some(std::time::Instant::now()),
                    ..Group::default()
                });
                match backend.groups.back_mut() {
                    Some(group) => group,
                    None => return,
                }
            }
        };
        group.extended |= unit.ends_with_sync;
        let mut emit_pending = false;
        if row_ddl && !unit.ddl.is_empty() {
            let base = group.completions_sent;
            for d in &unit.ddl {
                if matches!(*d.reply, ddl::Reply::EmitAfter { .. }) && !group.ddl_emit_pending {
                    group.ddl_emit_pending = true;
                    emit_pending = true;
                }
                group.ddl.push_back(ddl::Expect {
                    index: base + d.index,
                    reply: d.reply.clone(),
                });
            }
        }
        if inline_own > 0 {
            let base = group.completions_sent;
            group.own_completions.extend(base..base + inline_own);
            group.swallow_close_completes += 2 * inline_own;
            group.swallow_parse_completes += inline_own;
            group.swallow_bind_completes += inline_own;
            group.completions_sent += inline_own;
        }
        group.completions_sent += unit.executes;
        if log_send.tail.is_some() {
            group.tail_at = Some(group.completions_sent);
            group.tail_replies = [2, 1, 1];
            group.completions_sent += 1;
        }
        group.own_statements |= log_send.query_override.is_some();
        if log_send.log_capture {
            group.log_capture = true;
            group.position_from_pending =
                log_send.position_from_pending && !(continuing && inline_own > 0);
        }
        group.changes.extend(unit.changes.iter().cloned());
        group.swallow_close_completes += closes;
        group.swallow_parse_completes += parses;
        group.injected.extend(injected);
        if capture && statement_mode {
            // The position arrives with the unit's own replies.
            self.captures_in_flight += 1;
            self.holding = true;
        } else if capture {
            if unit.copies || group.ddl_emit_pending {
                // The node may be in COPY IN mode until the client sent its data: the position
                // is read once the COPY is over. DDL emitted after the group counts as well.
                group.capture_when_ready = true;
            } else {
                fe::query(&mut conn.wbuf, LEADER_POSITION_SQL);
                backend.groups.push_back(Group {
                    capture: true,
                    ..Group::default()
                });
            }
            self.captures_in_flight += 1;
            // A COPY's replies (CopyInResponse first) must reach the client for it to send
            // its data; its ReadyForQuery is held once it arrives (see the relay).
            if hold && !unit.copies {
                self.holding = true;
            }
        }
        if emit_pending {
            self.ddl_emits_pending += 1;
        }
        if in_tx {
            self.tx_wrote |= unit.writes;
        }
        // Statements the client closed here may still exist on its other connections.
        for name in &unit.closes {
            for (i, other) in self.backends.iter_mut().enumerate() {
                let Some(other) = other.as_mut() else {
                    continue;
                };
                if i != node && other.prepared.remove(name).is_some() {
                    other.pending_closes.push(name.clone());
                }
            }
        }
        for (name, read_only) in unit.sql_prepares() {
            self.sql_prepared.insert(name.to_owned(), read_only);
        }
        for setting in &unit.settings {
            if let Err(err) = self.apply_setting(setting) {
                // The node accepted it as a placeholder; pgrelay cannot answer with an error
                // in the middle of the extended protocol, so it says so in its log.
                warn!(error = %err.message(), "ignored a pgrelay setting sent with the extended protocol");
            }
        }
        if self.cancel_target != Some(target) {
            self.cancel_target = Some(target);
            if let Ok(mut slot) = self.cancel_slot.lock() {
                *slot = Some(target);
            }
        }
        self.open_unit = if unit.ends_group { None } else { Some(node) };
        if unit.begin.is_some() {
            self.pinned = Some(node);
        }
        if unit.pins_leader && node == self.shared.nodes.leader() {
            self.leader_only = true;
        }
        self.last_node = Some(node);
        if retryable {
            if let Some(group) = self.backend_mut(node).and_then(|b| b.groups.back_mut()) {
                group.retry = Some(Box::new(unit));
            }
        }
    }

    /// Counts a client statement the classifier could not parse (it runs on the leader), so
    /// operators see how often routing fell back for want of understanding the SQL.
    fn count_parse_failure(&self, c: &crate::routing::classify::Classification) {
        if c.parse_failed {
            self.shared.metrics.parse_failures.increment(1);
        }
    }

    /// Whether the positions of this session's writes are read. Not when everything goes to
    /// the leader and commits are not acknowledged by followers: nobody would use them.
    fn tracks_positions(&self) -> bool {
        self.consistency != Consistency::Leader
            || self.config.routing.consistency != Consistency::Leader
            || self.config.replication.ack != Ack::Async
    }
}

/// How many bytes of one unit pgrelay collects before it sends them on without the Sync.
const UNIT_BUFFER_LIMIT: usize = 1 << 20;

/// The class of anything pgrelay cannot prove to be a read.
const WRITE: StatementClass = StatementClass {
    read_only: false,
    writes: true,
    pins_leader: false,
    begin: None,
    ends_tx: false,
    hint: None,
    copies: false,
};

/// A statement whose Parse the leader gets as a DO block that raises `refusal`, once it runs
/// (part of the unit is on a node already, so the unit cannot be refused as a whole).
fn raised_at_execute(name: &str, refusal: &ddl::Raise) -> Arc<ddl::StatementDdl> {
    let mut out = bytes::BytesMut::new();
    fe::parse(&mut out, name, &ddl::raise_sql(refusal), &[]);
    Arc::new(ddl::StatementDdl {
        parse: Some(out.freeze()),
        reply: Arc::new(ddl::Reply::Refused),
    })
}
