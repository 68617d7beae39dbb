//! A session under a config that can change while it runs (see [`crate::control`]): it holds
//! the control gate from the first message of a transaction until it is idle again, and when
//! it enters a new transaction after a reload it takes the new config. After a switch between
//! row and statement mode it plans its prepared statements again, so that nothing prepared
//! under one mode runs under the other.

use std::sync::Arc;

use tracing::{debug, info};

use crate::protocol::backend::TxStatus;
use crate::protocol::codec::Frame;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate;

use super::{Report, Session, SessionEnd};

impl Session {
    /// Whether a client message needs the gate (everything but Terminate).
    pub(super) fn needs_gate(&self, frame: &Frame) -> bool {
        self.gate.is_none() && frame.tag() != fe::tag::TERMINATE
    }

    /// Takes the gate (waiting while a mode switch or PAUSE holds it), then the newest config.
    pub(super) async fn enter(&mut self) -> Result<(), SessionEnd> {
        let control = self.shared.clone();
        let guard = tokio::select! {
            guard = control.control.enter() => guard,
            _ = &mut self.shutdown => {
                let message = "terminating connection because pgrelay is shutting down";
                Report::fatal(sqlstate::ADMIN_SHUTDOWN, message).write_error(&mut self.client.wbuf);
                return Err(SessionEnd::Fatal(message.to_owned()));
            }
        };
        self.gate = Some(guard);
        if self.shared.control.generation() != self.generation {
            self.adopt_config().await;
        } else if self.replan {
            self.replan_statements().await;
        }
        Ok(())
    }

    /// Gives the gate back once nothing of the session is open or in flight anywhere.
    pub(super) fn leave_if_idle(&mut self) {
        if self.gate.is_some() && self.quiescent() {
            self.gate = None;
        }
    }

    fn quiescent(&self) -> bool {
        self.inbox.is_empty()
            && self.retries.is_empty()
            && self.unit.frames.is_empty()
            && self.tx_status == TxStatus::Idle
            && self.pinned.is_none()
            && self.open_unit.is_none()
            && !self.holding
            && self.ack_wait.is_none()
            && self.copy_node.is_none()
            && !self.copy_sync_pending
            && self.captures_in_flight == 0
            && self.stx.is_none()
            && !self.in_block
            && self.backends.iter().flatten().all(|b| b.groups.is_empty())
    }

    /// Takes the config in force: routing, acknowledgement and statement options at once; a
    /// new replication mode with everything that depends on it.
    async fn adopt_config(&mut self) {
        self.generation = self.shared.control.generation();
        let config = self.shared.config();
        // A session that did not choose its own consistency level follows the config's.
        if self.consistency == self.config.routing.consistency {
            self.consistency = config.routing.consistency;
        }
        let switched = config.replication.mode != self.config.replication.mode;
        self.config = config;
        if switched {
            self.adopt_mode().await;
        }
    }

    /// After a mode switch: positions of the old mode were all applied before it, portals and
    /// logging state belong to transactions that ended, and prepared statements are planned
    /// again (the next use prepares them again on each node, as after a replacement).
    async fn adopt_mode(&mut self) {
        let mode = self.config.replication.mode;
        info!(
            mode = mode.name(),
            "session continues in the new replication mode"
        );
        self.last_write = None;
        self.min_position = None;
        self.stx = None;
        self.log_portals.clear();
        self.ddl_portals.clear();
        self.pending_seq = None;
        self.log_failure = None;
        self.replan_statements().await;
    }

    /// Plans every prepared statement again under the session's mode (the next use prepares it
    /// again on each node, as after a replacement). Statement mode plans a write that needs the
    /// catalog as an error while the catalog cannot be read, never as a write that would not
    /// be logged; `replan` has it tried again.
    async fn replan_statements(&mut self) {
        self.reload_classifier = true;
        self.load_classifier().await;
        self.replan = self.statement_mode() && !self.classifier.has_catalog();
        let names: Vec<String> = self.statements.keys().cloned().collect();
        for name in names {
            let Some(old) = self.statements.get(&name).cloned() else {
                continue;
            };
            let raw = old.parse.clone();
            let frame = Frame::new(fe::tag::PARSE, raw.get(5..).unwrap_or_default());
            // Planned once already, so it parses; should it not, the old plan stays.
            if let Ok(Ok(statement)) = self.plan_parse(&frame, false, true) {
                debug!(statement = %name, "planned again for the new mode");
                self.statements.insert(name, Arc::new(statement));
            }
        }
    }
}
