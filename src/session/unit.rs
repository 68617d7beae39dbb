//! A unit of client messages routed together: everything from the first message after a
//! ReadyForQuery up to the Sync (or Query, or FunctionCall) that asks for the next one. The
//! messages of one unit form one implicit transaction on the node, so they must go to one node.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::codec::Frame;
use crate::routing::classify::{Classification, SessionChange, SessionOp};

use super::overrides::Hint;

/// How a statement may be routed, derived once from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatementClass {
    pub read_only: bool,
    pub writes: bool,
    pub pins_leader: bool,
    /// `Some(read_only)` when the statement begins a transaction block.
    pub begin: Option<bool>,
    /// The statement ends the open transaction block (COMMIT, ROLLBACK, ...).
    pub ends_tx: bool,
    /// A `/* pgrelay: ... */` routing hint.
    pub hint: Option<Hint>,
    /// A COPY that writes (COPY ... FROM): the node may wait for the client's data.
    pub copies: bool,
}

impl StatementClass {
    /// The class of a classified string; `sql_prepared` says which SQL-level prepared
    /// statements (run with EXECUTE) are reads.
    pub fn of(c: &Classification, sql_prepared: &HashMap<String, bool>, sql: &str) -> Self {
        let executes_read_only = c
            .executes
            .iter()
            .all(|name| sql_prepared.get(name).copied().unwrap_or(false));
        StatementClass {
            read_only: c.read_only && executes_read_only,
            writes: c.writes || !executes_read_only,
            pins_leader: c.pins_leader,
            begin: c.begin.as_ref().map(|b| b.read_only),
            ends_tx: c.ends_transaction,
            hint: super::overrides::parse_hint(sql),
            copies: c.writes && starts_with_copy(sql),
        }
    }
}

/// What pgrelay remembers of a statement the client prepared with Parse, so it can prepare it
/// again on another node before running it there.
#[derive(Debug)]
pub struct Statement {
    /// Distinguishes two statements prepared under the same name at different times.
    pub id: u64,
    /// The client's Parse message, as sent.
    pub parse: Bytes,
    pub class: StatementClass,
    /// A `SET`/`RESET pgrelay.*` prepared with the extended protocol: pgrelay applies it when
    /// it runs (the node also runs it, as a harmless placeholder setting).
    pub setting: Option<super::overrides::Command>,
    /// Row mode: what happens to the statement on the leader, if it is DDL.
    pub ddl: Option<Arc<super::ddl::StatementDdl>>,
    /// Statement mode: what is logged when the statement runs, and its parameter types.
    pub log: Option<Arc<(super::statement::Plan, Vec<u32>)>>,
    /// Statement mode: the Parse the leader gets instead of the client's (rewritten text).
    pub leader_parse: Option<Bytes>,
}

/// Client messages collected for one routing decision.
#[derive(Debug, Clone)]
pub struct Unit {
    pub frames: Vec<Frame>,
    /// Bytes of extended-protocol messages in `frames`.
    pub bytes: usize,
    pub read_only: bool,
    pub writes: bool,
    pub pins_leader: bool,
    pub begin: Option<bool>,
    pub ends_tx: bool,
    pub hint: Option<Hint>,
    /// A statement is a COPY, which may put the node in COPY IN mode until the client's data
    /// is through: nothing of pgrelay's may be pipelined behind it.
    pub copies: bool,
    /// Session-level changes (SET, PREPARE, ...) made by the unit's simple queries.
    pub changes: Vec<SessionChange>,
    /// Statements the unit uses that it did not prepare itself: they must exist on its node.
    pub needs: Vec<String>,
    /// Statements the unit prepares, with their ids.
    pub parses: Vec<(String, Arc<Statement>)>,
    /// Statements the unit closes.
    pub closes: Vec<String>,
    /// pgrelay settings the unit's statements change.
    pub settings: Vec<super::overrides::Command>,
    /// The unit ends with a message that makes the node send ReadyForQuery.
    pub ends_group: bool,
    /// The unit ends with Sync (extended protocol) rather than Query or FunctionCall.
    pub ends_with_sync: bool,
    /// Execute messages in `frames`.
    pub executes: usize,
    /// Row mode: frames (by index) the leader gets rewritten, and the replies to fix.
    pub rewrites: Vec<(usize, Bytes)>,
    pub ddl: Vec<super::ddl::UnitDdl>,
    /// Statement mode: what the unit's frames (by index) do to the logged transaction.
    pub log_ops: Vec<(usize, super::statement::TxOp)>,
    /// Statement mode: warnings for unsafe statements run anyway.
    pub log_warnings: Vec<String>,
    /// Statement mode: a simple query's frame index and its statements, planned.
    pub log_query: Option<(usize, Vec<(String, super::statement::Plan)>)>,
}

impl Default for Unit {
    fn default() -> Self {
        Unit {
            frames: Vec::new(),
            bytes: 0,
            read_only: true,
            writes: false,
            pins_leader: false,
            begin: None,
            ends_tx: false,
            hint: None,
            copies: false,
            changes: Vec::new(),
            needs: Vec::new(),
            parses: Vec::new(),
            closes: Vec::new(),
            settings: Vec::new(),
            ends_group: false,
            ends_with_sync: false,
            executes: 0,
            rewrites: Vec::new(),
            ddl: Vec::new(),
            log_ops: Vec::new(),
            log_warnings: Vec::new(),
            log_query: None,
        }
    }
}

impl Unit {
    pub fn merge(&mut self, class: StatementClass) {
        self.read_only &= class.read_only;
        self.writes |= class.writes;
        self.pins_leader |= class.pins_leader;
        self.ends_tx |= class.ends_tx;
        self.copies |= class.copies;
        if class.begin.is_some() {
            self.begin = class.begin;
        }
        if class.hint.is_some() {
            self.hint = class.hint;
        }
    }

    /// A statement the unit refers to by name (Bind, Describe): prepared in this unit, or needed.
    pub fn uses(&mut self, name: &str) {
        let prepared_here = self.parses.iter().any(|(n, _)| n == name);
        if !prepared_here && !self.needs.iter().any(|n| n == name) {
            self.needs.push(name.to_owned());
        }
    }

    /// SQL-level PREPAREs in the unit, to record which names are reads.
    pub fn sql_prepares(&self) -> impl Iterator<Item = (&str, bool)> {
        self.changes.iter().filter_map(|c| match &c.op {
            SessionOp::Prepare { name, read_only } => Some((name.as_str(), *read_only)),
            _ => None,
        })
    }
}

/// Whether a query string's first statement starts with COPY (after white space and comments).
pub fn starts_with_copy(sql: &str) -> bool {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, after)| after);
        } else {
            break;
        }
    }
    rest.get(..4)
        .is_some_and(|w| w.eq_ignore_ascii_case("copy"))
        && !rest
            .get(4..5)
            .is_some_and(|c| c.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_statements() {
        assert!(starts_with_copy("COPY t FROM STDIN"));
        assert!(starts_with_copy("  -- load\n/* x */ copy t from stdin"));
        assert!(!starts_with_copy("COPYRIGHT"));
        assert!(!starts_with_copy("SELECT 'COPY'"));
        assert!(starts_with_copy("copy"));
    }
}
