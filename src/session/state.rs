//! Session state that must follow a session to every node it uses: settings changed with
//! `SET`, SQL-level `PREPARE`d statements. pgrelay keeps the statements that produced the current
//! state, replays them on a connection opened later, and queues each new change for the
//! connections that already exist.

use crate::routing::classify::{SessionChange, SessionOp};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Setting(String),
    Prepared(String),
    Other,
}

/// The statements that recreate the session's state on a fresh connection, in order.
#[derive(Debug, Default, Clone)]
pub struct SessionState {
    entries: Vec<(Key, String)>,
}

impl SessionState {
    /// Records a change that succeeded.
    pub fn apply(&mut self, change: &SessionChange) {
        let text = change.text.clone();
        match &change.op {
            SessionOp::Set { name } => {
                self.entries
                    .retain(|(k, _)| !matches!(k, Key::Setting(n) if n == name));
                self.entries.push((Key::Setting(name.clone()), text));
            }
            SessionOp::Reset { name } => self
                .entries
                .retain(|(k, _)| !matches!(k, Key::Setting(n) if n == name)),
            SessionOp::ResetAll => self.entries.retain(|(k, _)| matches!(k, Key::Prepared(_))),
            SessionOp::Prepare { name, .. } => {
                self.entries.push((Key::Prepared(name.clone()), text));
            }
            SessionOp::Deallocate { name } => self
                .entries
                .retain(|(k, _)| !matches!(k, Key::Prepared(n) if n == name)),
            SessionOp::DeallocateAll => {
                self.entries.retain(|(k, _)| !matches!(k, Key::Prepared(_)))
            }
            SessionOp::Discard => {
                if is_discard_all(&change.text) {
                    self.entries.clear();
                }
            }
            SessionOp::Other => self.entries.push((Key::Other, text)),
        }
    }

    /// The `SET` statements among them (what changes the meaning of a statement).
    pub fn settings(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().filter_map(|(k, t)| match k {
            Key::Setting(_) => Some(t.as_str()),
            _ => None,
        })
    }

    /// The statements to run on a new connection.
    pub fn replay(&self) -> Vec<String> {
        self.entries.iter().map(|(_, t)| t.clone()).collect()
    }
}

/// `DISCARD ALL` also drops protocol-level prepared statements on the node that ran it.
pub fn is_discard_all(text: &str) -> bool {
    let upper = text.to_ascii_uppercase();
    let mut words = upper.split_whitespace();
    words.next() == Some("DISCARD")
        && words
            .next()
            .is_some_and(|w| w.trim_end_matches(';') == "ALL")
}

/// Whether a change drops the node's protocol-level prepared statements.
pub fn drops_prepared_statements(change: &SessionChange) -> bool {
    match change.op {
        SessionOp::DeallocateAll => true,
        SessionOp::Discard => is_discard_all(&change.text),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(text: &str, op: SessionOp) -> SessionChange {
        SessionChange {
            text: text.to_owned(),
            op,
        }
    }

    fn set(name: &str, value: &str) -> SessionChange {
        change(
            &format!("SET {name} = {value}"),
            SessionOp::Set {
                name: name.to_owned(),
            },
        )
    }

    #[test]
    fn last_set_wins_and_reset_removes() {
        let mut s = SessionState::default();
        s.apply(&set("search_path", "a"));
        s.apply(&set("work_mem", "'8MB'"));
        s.apply(&set("search_path", "b"));
        assert_eq!(
            s.replay(),
            vec!["SET work_mem = '8MB'", "SET search_path = b"]
        );
        s.apply(&change(
            "RESET work_mem",
            SessionOp::Reset {
                name: "work_mem".into(),
            },
        ));
        assert_eq!(s.replay(), vec!["SET search_path = b"]);
    }

    #[test]
    fn prepares_survive_reset_all_but_not_discard_all() {
        let mut s = SessionState::default();
        s.apply(&set("search_path", "a"));
        s.apply(&change(
            "PREPARE p AS SELECT 1",
            SessionOp::Prepare {
                name: "p".into(),
                read_only: true,
            },
        ));
        s.apply(&change("RESET ALL", SessionOp::ResetAll));
        assert_eq!(s.replay(), vec!["PREPARE p AS SELECT 1"]);
        s.apply(&change("discard   all", SessionOp::Discard));
        assert!(s.replay().is_empty());
    }

    #[test]
    fn deallocate() {
        let mut s = SessionState::default();
        for name in ["a", "b"] {
            s.apply(&change(
                &format!("PREPARE {name} AS SELECT 1"),
                SessionOp::Prepare {
                    name: name.into(),
                    read_only: true,
                },
            ));
        }
        s.apply(&change(
            "DEALLOCATE a",
            SessionOp::Deallocate { name: "a".into() },
        ));
        assert_eq!(s.replay(), vec!["PREPARE b AS SELECT 1"]);
        s.apply(&change("DEALLOCATE ALL", SessionOp::DeallocateAll));
        assert!(s.replay().is_empty());
        assert!(drops_prepared_statements(&change(
            "DEALLOCATE ALL",
            SessionOp::DeallocateAll
        )));
        assert!(!drops_prepared_statements(&change(
            "DISCARD PLANS",
            SessionOp::Discard
        )));
    }
}
