//! Replies from nodes: relayed to the client or swallowed, with the bookkeeping they drive
//! (transaction state, COPY mode, session changes, write positions, held commit replies), and
//! what happens when a node connection fails.

use std::time::Instant;

use tracing::{debug, warn};

use crate::config::Ack;
use crate::protocol::backend::{self as be, tag, Report, TxStatus};
use crate::protocol::codec::Frame;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate;
use crate::replication::physical::LEADER_POSITION_SQL;
use crate::replication::positions::{parse_lsn, Position};

use super::state;
use super::{ddl, AckWait, Group, Session, SessionEnd};

impl Session {
    /// Handles one reply from a node: relays it or swallows it, and keeps track of transaction
    /// state, COPY mode and statements.
    pub(super) fn on_backend_message(
        &mut self,
        node: usize,
        frame: Frame,
    ) -> Result<(), SessionEnd> {
        let Some(backend) = self.backends.get_mut(node).and_then(|b| b.as_mut()) else {
            return Ok(());
        };
        let Some(group) = backend.groups.front_mut() else {
            // Idle connection: only asynchronous messages arrive here.
            match frame.tag() {
                tag::NOTIFICATION_RESPONSE | tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS => {
                    self.emit(frame.raw());
                }
                tag::ERROR_RESPONSE => {
                    // A FATAL error on an idle connection (the node is shutting down): it will close.
                    let fields = be::parse_error_fields(&frame.body()).unwrap_or_default();
                    debug!(node, message = %fields.message, "idle node connection reported an error");
                }
                other => {
                    debug!(node, tag = %char::from(other), "unexpected message on an idle node connection")
                }
            }
            return Ok(());
        };
        let frame = if group.ddl.is_empty() {
            frame
        } else {
            ddl::fix_reply(group, frame)
        };
        if group.forward && swallow_own(group, &frame) {
            return Ok(());
        }
        let frame = match group.error_instead.take() {
            Some(instead) if frame.tag() == tag::ERROR_RESPONSE => instead,
            other => {
                group.error_instead = other;
                frame
            }
        };
        match frame.tag() {
            tag::READY_FOR_QUERY => {
                let status = be::parse_ready_for_query(&frame.body())
                    .map_err(|e| SessionEnd::Fatal(format!("node sent {e}")))?;
                let group = backend.groups.pop_front().unwrap_or_default();
                let more_forwarding = backend.forwarding();
                // What pgrelay prepared in a failed group may not exist, so it is prepared
                // again (after a Close) when next needed.
                if group.error {
                    for name in &group.injected {
                        backend.prepared.remove(name);
                    }
                }
                if group.capture {
                    self.capture_done(group.position);
                    return Ok(());
                }
                if group.log_insert {
                    self.pending_seq = if group.error { None } else { group.position };
                    if let Some(e) = group.error_frame {
                        self.log_failure = Some(e);
                    }
                    return Ok(());
                }
                if let Some(ready) = &group.release {
                    self.emit(ready);
                    self.record_duration(node, group.started);
                    return Ok(());
                }
                // DDL that succeeded outside a transaction block is emitted now, before
                // anything else the session sends on this connection; the client hears that
                // its statement is done when the message is in the WAL.
                let release_later = group.forward && !group.ddl_emits.is_empty();
                if release_later {
                    fe::query(&mut backend.conn.wbuf, &group.ddl_emits.join(";\n"));
                    // The client's unit ends when the group that releases its reply does.
                    backend.groups.push_back(Group {
                        release: Some(frame.raw().clone()),
                        started: group.started,
                        ..Group::default()
                    });
                }
                if group.ddl_emit_pending {
                    self.ddl_emits_pending = self.ddl_emits_pending.saturating_sub(1);
                }
                let Some(backend) = self.backends.get_mut(node).and_then(|b| b.as_mut()) else {
                    return Ok(());
                };
                if group.capture_when_ready {
                    fe::query(&mut backend.conn.wbuf, LEADER_POSITION_SQL);
                    backend.groups.push_back(Group {
                        capture: true,
                        ..Group::default()
                    });
                    // The COPY's ReadyForQuery waits for its position, like any commit's.
                    self.holding = true;
                }
                if !group.forward {
                    return Ok(());
                }
                if !group.preamble.is_empty() {
                    self.emit(&group.preamble);
                }
                // Statement mode: the commit of a logged transaction reached this position.
                let logged = group.log_capture.then(|| {
                    let position = if group.position_from_pending {
                        self.pending_seq.take()
                    } else {
                        group.position
                    };
                    position.filter(|_| !group.error && !group.rolled_back)
                });
                if group.log_capture {
                    if let Some(failure) = self.log_failure.take() {
                        self.emit(&failure);
                    }
                }
                if !release_later {
                    self.emit(frame.raw());
                    self.record_duration(node, group.started);
                }
                self.tx_status = status;
                if !more_forwarding && self.open_unit.is_none() {
                    // Every unit sent has run: the block state is the server's.
                    self.in_block = status != TxStatus::Idle;
                    if status == TxStatus::Idle {
                        self.stx = None;
                    }
                }
                if status == TxStatus::Idle {
                    self.tx_wrote = false;
                }
                match status {
                    TxStatus::InTransaction | TxStatus::Failed => self.pinned = Some(node),
                    TxStatus::Idle if !more_forwarding && self.open_unit.is_none() => {
                        self.pinned = None
                    }
                    TxStatus::Idle => {}
                }
                self.record_changes(node, group, status);
                if let Some(position) = logged {
                    self.capture_done(position);
                }
                return Ok(());
            }
            tag::ERROR_RESPONSE => {
                group.error = true;
                if group.log_insert {
                    let fields = be::parse_error_fields(&frame.body()).unwrap_or_default();
                    // In a failed transaction the client saw its own error already.
                    if fields.code != sqlstate::IN_FAILED_SQL_TRANSACTION.code() {
                        group.error_frame = Some(frame.raw().clone());
                    }
                }
                if group.retry.is_some() && !group.forwarded {
                    // A node shutting down ends its connections with a FATAL error: a read that
                    // has not answered yet runs again elsewhere when the connection closes.
                    let fields = be::parse_error_fields(&frame.body()).unwrap_or_default();
                    if fields.severity == "FATAL" || fields.severity == "PANIC" {
                        debug!(node, code = %fields.code, "node is going away; the read will be retried");
                        return Ok(());
                    }
                }
                if !(group.forward || group.log_insert && group.error_frame.is_none()) {
                    // pgrelay's own statement failed (a replayed SET, a statement prepared
                    // again): the client's next statement on this node will show the effect.
                    let fields = be::parse_error_fields(&frame.body()).unwrap_or_default();
                    warn!(node = %backend.conn.node_name, code = %fields.code, message = %fields.message, "statement pgrelay ran on a node failed");
                }
            }
            tag::EMPTY_QUERY_RESPONSE | tag::PORTAL_SUSPENDED => group.completions += 1,
            tag::COMMAND_COMPLETE => {
                group.completions += 1;
                let body = frame.body();
                match body.first() {
                    Some(b'R') if body.starts_with(b"ROLLBACK\0") => group.rolled_back = true,
                    Some(b'C' | b'A' | b'D') if is_function_ddl(&body) => {
                        self.shared.classifiers.invalidate(&self.database);
                    }
                    // Statement mode: tables and their defaults may have changed.
                    Some(b'C' | b'A' | b'D')
                        if self.config.replication.mode
                            == crate::config::ReplicationMode::Statement
                            && [&b"CREATE"[..], b"ALTER", b"DROP"]
                                .iter()
                                .any(|p| body.starts_with(p)) =>
                    {
                        self.shared.classifiers.invalidate(&self.database);
                    }
                    _ => {}
                }
            }
            // ParseComplete and CloseComplete carry nothing, so which of them are swallowed
            // does not matter, only how many.
            tag::PARSE_COMPLETE if group.swallow_parse_completes > 0 => {
                group.swallow_parse_completes -= 1;
                return Ok(());
            }
            tag::CLOSE_COMPLETE if group.swallow_close_completes > 0 => {
                group.swallow_close_completes -= 1;
                return Ok(());
            }
            tag::DATA_ROW if group.capture => {
                group.position = first_column(&frame.body()).and_then(parse_lsn);
            }
            tag::DATA_ROW if group.log_insert => {
                if let Some(seq) = first_column(&frame.body()).and_then(|t| t.parse().ok()) {
                    group.position = Some(seq);
                }
            }
            tag::COPY_IN_RESPONSE if group.forward => {
                self.copy_node = Some(node);
                if group.extended {
                    self.copy_sync_pending = true;
                }
            }
            _ => {}
        }
        if group.forward {
            if group.retry.is_some() && !group.forwarded && is_preamble(frame.tag()) {
                group.preamble.extend_from_slice(frame.raw());
                return Ok(());
            }
            let preamble = std::mem::take(&mut group.preamble);
            group.forwarded = true;
            if !preamble.is_empty() {
                self.emit(&preamble);
            }
            self.emit(frame.raw());
        }
        Ok(())
    }

    /// Records how long a client's unit took on `node`, from its first message written there
    /// to its last reply (`started` is None for pgrelay's own groups).
    fn record_duration(&self, node: usize, started: Option<Instant>) {
        if let Some(started) = started {
            let leader = node == self.shared.nodes.leader();
            self.shared
                .metrics
                .query_duration(leader, started.elapsed().as_secs_f64());
        }
    }

    /// Sends bytes to the client, or holds them while a commit waits for followers.
    pub(super) fn emit(&mut self, bytes: &[u8]) {
        if self.holding {
            self.held.extend_from_slice(bytes);
        } else {
            self.client.wbuf.extend_from_slice(bytes);
        }
    }

    /// The leader position a commit reached is known (None: the query failed).
    fn capture_done(&mut self, position: Option<Position>) {
        self.captures_in_flight = self.captures_in_flight.saturating_sub(1);
        if let Some(p) = position {
            self.last_write = Some(self.last_write.map_or(p, |w| w.max(p)));
        }
        match (self.holding, position) {
            // Acknowledged before the client hears of the commit, so that a `global` read
            // that starts after it waits for it.
            (true, Some(p)) if self.config.replication.ack == Ack::Async => {
                self.shared.positions.acknowledge(p, &self.database);
                self.release(None);
            }
            (true, Some(p)) => {
                self.ack_wait = Some(AckWait {
                    position: p,
                    started: Instant::now(),
                });
            }
            (true, None) => self.release(None),
            (false, Some(p)) => self.shared.positions.acknowledge(p, &self.database),
            (false, None) => {}
        }
    }

    /// The held commit was applied by enough followers (`confirmed`), or its time ran out.
    pub(super) fn finish_ack(&mut self, confirmed: bool) {
        let Some(wait) = self.ack_wait.take() else {
            return;
        };
        self.shared
            .metrics
            .ack_wait
            .record(wait.started.elapsed().as_secs_f64());
        self.shared
            .positions
            .acknowledge(wait.position, &self.database);
        if confirmed {
            self.release(None);
            return;
        }
        self.shared.metrics.ack_timeouts.increment(1);
        let applied = self
            .shared
            .positions
            .applied_count(wait.position, &self.database);
        let wanted = match self.config.replication.ack {
            Ack::Quorum(k) => k.to_string(),
            _ => "every".to_owned(),
        };
        let message = format!(
            "pgrelay: the commit is durable on the leader, but only {applied} follower(s) applied it within {:?} ({wanted} required by ack = \"{}\")",
            self.config.replication.ack_timeout, self.config.replication.ack
        );
        warn!(
            position = wait.position,
            applied, "acknowledgement timed out"
        );
        self.release(Some(message));
    }

    /// Sends the held replies; a warning goes just before their closing ReadyForQuery.
    fn release(&mut self, warning: Option<String>) {
        self.holding = false;
        let held = std::mem::take(&mut self.held);
        let Some(warning) = warning else {
            self.client.wbuf.extend_from_slice(&held);
            return;
        };
        let split = match held.len().checked_sub(6) {
            Some(at) if held.get(at) == Some(&tag::READY_FOR_QUERY) => at,
            _ => held.len(),
        };
        let (replies, ready) = held.split_at(split);
        self.client.wbuf.extend_from_slice(replies);
        Report::warning(sqlstate::WARNING, &warning).write_notice(&mut self.client.wbuf);
        self.client.wbuf.extend_from_slice(ready);
    }

    /// Records a finished group's session changes once they are known to have taken effect:
    /// outside a transaction at once, inside one at its COMMIT.
    fn record_changes(&mut self, node: usize, group: Group, status: TxStatus) {
        match status {
            TxStatus::InTransaction => {
                if !group.error {
                    self.tx_changes.extend(group.changes);
                }
            }
            TxStatus::Failed => {}
            TxStatus::Idle => {
                let mut changes = std::mem::take(&mut self.tx_changes);
                if group.rolled_back || group.error {
                    changes.clear();
                } else {
                    changes.extend(group.changes);
                }
                for change in changes {
                    self.state.apply(&change);
                    let drops_prepared = state::drops_prepared_statements(&change);
                    for (i, b) in self.backends.iter_mut().enumerate() {
                        let Some(b) = b.as_mut() else { continue };
                        if drops_prepared {
                            b.prepared.clear();
                        }
                        if i != node {
                            b.pending_replay.push(change.text.clone());
                        }
                    }
                }
            }
        }
    }

    /// A node connection failed: the client gets an error for every reply it was waiting for
    /// from it; if its transaction was there, the session ends as Postgres would end it.
    pub(super) fn backend_lost(&mut self, node: usize, reason: &str) -> Result<(), SessionEnd> {
        let Some(backend) = self.backends.get_mut(node).and_then(|b| b.take()) else {
            return Ok(());
        };
        self.shared.nodes.mark_down(node);
        let name = backend.conn.node_name.clone();
        warn!(node = %name, error = %reason, "lost connection to node");
        let message = format!("lost connection to node \"{name}\": {reason}");
        if self.pinned == Some(node) || self.open_unit == Some(node) || self.copy_node == Some(node)
        {
            Report::fatal(sqlstate::CONNECTION_FAILURE, &message)
                .write_error(&mut self.client.wbuf);
            return Err(SessionEnd::Fatal(message));
        }
        for group in backend.groups {
            if group.ddl_emit_pending {
                self.ddl_emits_pending = self.ddl_emits_pending.saturating_sub(1);
            }
            if group.capture {
                self.capture_done(None);
                continue;
            }
            if !group.forward && group.release.is_none() {
                continue;
            }
            match group.retry {
                // Nothing of the answer reached the client yet: the read runs again elsewhere.
                Some(unit) if !group.forwarded => {
                    debug!(node = %name, "retrying a read on another node");
                    self.retries.push_back(*unit);
                }
                _ => {
                    let mut out = bytes::BytesMut::new();
                    Report::error(sqlstate::CONNECTION_FAILURE, &message).write_error(&mut out);
                    be::ready_for_query(&mut out, TxStatus::Idle);
                    self.emit(&out);
                    if group.log_capture {
                        // Statement mode: the commit's outcome is unknown; its reply goes out.
                        self.capture_done(None);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Statement mode: swallows the replies to pgrelay's own statements inside a client's unit
/// (the ordering lock, the log insert), keeping the position the insert returns. True if the
/// frame was pgrelay's.
fn swallow_own(group: &mut Group, frame: &Frame) -> bool {
    let t = frame.tag();
    // Simple query: the rows of pgrelay's statements are marked by their column alias.
    if t == tag::ROW_DESCRIPTION && group.own_statements {
        if let Some(seq) = super::statement::is_own_row_description(&frame.body()) {
            group.own_rows = Some(seq);
            return true;
        }
        return false;
    }
    if let Some(seq) = group.own_rows {
        match t {
            tag::DATA_ROW => {
                if seq {
                    if let Some(p) = first_column(&frame.body()).and_then(|t| t.parse().ok()) {
                        group.position = Some(p);
                    }
                }
                return true;
            }
            tag::COMMAND_COMPLETE => {
                group.own_rows = None;
                return true;
            }
            _ => return false,
        }
    }
    if group.own_completions.is_empty()
        && group.tail_at.is_none()
        && group.swallow_bind_completes == 0
    {
        return false;
    }
    if t == tag::BIND_COMPLETE && group.swallow_bind_completes > 0 {
        group.swallow_bind_completes -= 1;
        return true;
    }
    // The insert's replies come after every client statement's (it is sent right before the
    // Sync); its portal's CloseComplete after its own CommandComplete.
    let at_tail = group.tail_at.is_some_and(|t| group.completions >= t);
    if at_tail {
        let slot = match t {
            tag::CLOSE_COMPLETE => Some(0),
            tag::PARSE_COMPLETE => Some(1),
            tag::BIND_COMPLETE => Some(2),
            _ => None,
        };
        if let Some(slot) = slot {
            if let Some(n) = group.tail_replies.get_mut(slot).filter(|n| **n > 0) {
                *n -= 1;
                return true;
            }
        }
    }
    let own = group.tail_at == Some(group.completions)
        || group.own_completions.contains(&group.completions);
    if !own {
        return false;
    }
    match t {
        tag::DATA_ROW => {
            if let Some(p) = first_column(&frame.body()).and_then(|t| t.parse().ok()) {
                group.position = Some(p);
            }
            true
        }
        tag::COMMAND_COMPLETE => {
            group.completions += 1;
            true
        }
        _ => false,
    }
}

/// CommandComplete tags after which the database's function list may have changed.
fn is_function_ddl(body: &[u8]) -> bool {
    const TAGS: [&[u8]; 9] = [
        b"CREATE FUNCTION",
        b"ALTER FUNCTION",
        b"DROP FUNCTION",
        b"CREATE PROCEDURE",
        b"CREATE EXTENSION",
        b"ALTER EXTENSION",
        b"DROP EXTENSION",
        b"DROP SCHEMA",
        b"ALTER ROUTINE",
    ];
    TAGS.iter().any(|t| body.starts_with(t))
}

/// The first column of a DataRow, as text.
fn first_column(body: &[u8]) -> Option<&str> {
    let mut r = crate::protocol::codec::Reader::new(body, "DataRow");
    if r.count16().ok()? < 1 {
        return None;
    }
    let len = usize::try_from(r.i32().ok()?).ok()?;
    std::str::from_utf8(r.bytes(len).ok()?).ok()
}

/// Replies that come before a statement's rows and carry no result.
fn is_preamble(t: u8) -> bool {
    matches!(
        t,
        tag::PARSE_COMPLETE
            | tag::BIND_COMPLETE
            | tag::CLOSE_COMPLETE
            | tag::PARAMETER_DESCRIPTION
            | tag::ROW_DESCRIPTION
            | tag::NO_DATA
            | tag::PARAMETER_STATUS
            | tag::NOTICE_RESPONSE
    )
}
