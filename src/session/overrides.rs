//! pgrelay's own per-session settings and per-statement hints, which pgrelay answers itself:
//! `SET pgrelay.consistency = 'eventual'`, `SET pgrelay.min_position = '<token>'`,
//! `SHOW pgrelay.last_write_position`, `RESET pgrelay.*`, and a leading comment
//! `/* pgrelay: leader */` or `/* pgrelay: consistency=eventual */` on one statement.

use crate::config::Consistency;
use crate::protocol::backend::{self as be, Report};
use crate::protocol::codec::Frame;
use crate::protocol::sqlstate;
use crate::replication::positions::{format_lsn, parse_lsn};

use super::{Flow, Session, SessionEnd};

/// A statement addressed to pgrelay rather than to the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Set { name: String, value: String },
    Reset { name: String },
    Show { name: String },
}

/// Settings pgrelay knows.
pub const CONSISTENCY: &str = "consistency";
pub const MIN_POSITION: &str = "min_position";
pub const LAST_WRITE_POSITION: &str = "last_write_position";

/// Recognises a single `SET`/`RESET`/`SHOW` of a `pgrelay.` setting. Cheap for everything
/// else: it looks at the first bytes only.
pub fn parse_command(sql: &str) -> Option<Command> {
    let s = sql.trim().trim_end_matches(';').trim_end();
    let (verb, rest) = s.split_once(char::is_whitespace)?;
    let verb = verb.to_ascii_lowercase();
    if !matches!(verb.as_str(), "set" | "reset" | "show") {
        return None;
    }
    let rest = rest.trim_start();
    let mut rest = rest;
    if verb == "set" {
        if let Some(r) = strip_word(rest, "session") {
            rest = r;
        }
    }
    let after = strip_prefix_ci(rest, "pgrelay.")?;
    let name_len = after
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(after.len());
    let (name, tail) = after.split_at(name_len);
    let name = name.to_ascii_lowercase();
    let tail = tail.trim();
    match verb.as_str() {
        "show" | "reset" if !tail.is_empty() => None,
        "show" => Some(Command::Show { name }),
        "reset" => Some(Command::Reset { name }),
        _ => {
            let value = tail
                .strip_prefix('=')
                .or_else(|| strip_word(tail, "to"))?
                .trim();
            let value = unquote(value)?;
            Some(Command::Set { name, value })
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..))
        .flatten()
}

fn strip_word<'a>(s: &'a str, word: &str) -> Option<&'a str> {
    let rest = strip_prefix_ci(s, word)?;
    rest.starts_with(char::is_whitespace)
        .then(|| rest.trim_start())
}

/// `'text'` (with `''` escapes), or a bare word.
fn unquote(value: &str) -> Option<String> {
    if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        if inner.replace("''", "").contains('\'') {
            return None;
        }
        return Some(inner.replace("''", "'"));
    }
    if value.is_empty() || value.contains(char::is_whitespace) || value.contains('\'') {
        return None;
    }
    Some(value.to_owned())
}

pub fn parse_consistency(value: &str) -> Option<Consistency> {
    match value.to_ascii_lowercase().as_str() {
        "eventual" => Some(Consistency::Eventual),
        "session" => Some(Consistency::Session),
        "global" => Some(Consistency::Global),
        "leader" => Some(Consistency::Leader),
        _ => None,
    }
}

/// A routing hint in a statement's leading comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Leader,
    Consistency(Consistency),
}

/// Reads `/* pgrelay: leader */` or `/* pgrelay: consistency=<level> */` at the start of a
/// statement (after white space). Anything else, including an unknown hint, is no hint.
pub fn parse_hint(sql: &str) -> Option<Hint> {
    let body = sql.trim_start().strip_prefix("/*")?;
    let end = body.find("*/")?;
    let comment = body.get(..end)?.trim();
    let hint = strip_prefix_ci(comment, "pgrelay:")?.trim();
    if hint.eq_ignore_ascii_case("leader") {
        return Some(Hint::Leader);
    }
    let (key, value) = hint.split_once('=')?;
    if !key.trim().eq_ignore_ascii_case("consistency") {
        return None;
    }
    parse_consistency(value.trim()).map(Hint::Consistency)
}

/// Why pgrelay refused one of its own settings.
pub struct SettingError {
    code: crate::protocol::sqlstate::SqlState,
    message: String,
    hint: &'static str,
}

impl SettingError {
    fn unknown(name: &str) -> Self {
        SettingError {
            code: sqlstate::UNDEFINED_OBJECT,
            message: format!("unrecognized configuration parameter \"pgrelay.{name}\""),
            hint: "pgrelay knows pgrelay.consistency, pgrelay.min_position and pgrelay.last_write_position",
        }
    }

    fn invalid(name: &str, value: &str, hint: &'static str) -> Self {
        SettingError {
            code: sqlstate::INVALID_PARAMETER_VALUE,
            message: format!("invalid value for parameter \"pgrelay.{name}\": \"{value}\""),
            hint,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    fn write(&self, out: &mut bytes::BytesMut) {
        Report::error(self.code, &self.message)
            .with_hint(self.hint)
            .write_error(out);
    }
}

impl Session {
    /// Applies a `SET` or `RESET` of a `pgrelay.` setting (a `SHOW` changes nothing). These
    /// settings belong to pgrelay's session and are not transactional.
    pub(super) fn apply_setting(&mut self, command: &Command) -> Result<(), SettingError> {
        match command {
            Command::Set { name, value } => match name.as_str() {
                CONSISTENCY => {
                    self.consistency = parse_consistency(value).ok_or_else(|| {
                        SettingError::invalid(
                            name,
                            value,
                            "Available values: eventual, session, global, leader.",
                        )
                    })?;
                }
                MIN_POSITION => {
                    let position = parse_lsn(value).ok_or_else(|| {
                        SettingError::invalid(
                            name,
                            value,
                            "Use a token from SHOW pgrelay.last_write_position, like 0/16B3748.",
                        )
                    })?;
                    self.min_position = Some(position);
                }
                other => return Err(SettingError::unknown(other)),
            },
            Command::Reset { name } => match name.as_str() {
                CONSISTENCY => self.consistency = self.config.routing.consistency,
                MIN_POSITION => self.min_position = None,
                other => return Err(SettingError::unknown(other)),
            },
            Command::Show { .. } => {}
        }
        Ok(())
    }

    /// Answers a `SET`/`RESET`/`SHOW` of a `pgrelay.` setting sent as a simple query itself,
    /// after the replies the client is still waiting for.
    pub(super) fn answer_command(
        &mut self,
        frame: Frame,
        command: Command,
    ) -> Result<Flow, SessionEnd> {
        if self.busy_node().is_some() || self.holding || self.captures_in_flight > 0 {
            return Ok(Flow::Wait(frame));
        }
        let result = match &command {
            Command::Show { name } => match name.as_str() {
                CONSISTENCY => Ok(Some(self.consistency.name().to_owned())),
                MIN_POSITION => Ok(Some(self.min_position.map(format_lsn).unwrap_or_default())),
                LAST_WRITE_POSITION => Ok(Some(format_lsn(self.last_write.unwrap_or(0)))),
                other => Err(SettingError::unknown(other)),
            },
            other => self.apply_setting(other).map(|()| None),
        };
        let out = &mut self.client.wbuf;
        match (result, &command) {
            (Err(err), _) => err.write(out),
            (Ok(Some(value)), Command::Show { name }) => {
                let column = format!("pgrelay.{name}");
                be::row_description(out, &[column.as_str()]);
                be::data_row(out, &[Some(value.as_str())]);
                be::command_complete(out, "SHOW");
            }
            (Ok(_), Command::Reset { .. }) => be::command_complete(out, "RESET"),
            (Ok(_), _) => be::command_complete(out, "SET"),
        }
        be::ready_for_query(out, self.tx_status);
        Ok(Flow::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> Option<Command> {
        Some(Command::Set {
            name: name.into(),
            value: value.into(),
        })
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse_command("SET pgrelay.consistency = 'eventual'"),
            set("consistency", "eventual")
        );
        assert_eq!(
            parse_command("set pgrelay.consistency to leader;"),
            set("consistency", "leader")
        );
        assert_eq!(
            parse_command("SET SESSION pgrelay.min_position='0/16B3748'"),
            set("min_position", "0/16B3748")
        );
        assert_eq!(
            parse_command("  SHOW pgrelay.last_write_position  "),
            Some(Command::Show {
                name: "last_write_position".into()
            })
        );
        assert_eq!(
            parse_command("RESET pgrelay.min_position"),
            Some(Command::Reset {
                name: "min_position".into()
            })
        );
        assert_eq!(parse_command("SET pgrelay.x = 'it''s'"), set("x", "it's"));
        for other in [
            "SET work_mem = '8MB'",
            "SELECT 1",
            "SHOW pgrelay.a; SELECT 1",
            "SET pgrelay.consistency = 'a' 'b'",
            "SET pgrelay.consistency",
            "SET LOCAL pgrelay.consistency = leader",
            "show",
            "",
        ] {
            assert_eq!(parse_command(other), None, "{other}");
        }
    }

    #[test]
    fn hints() {
        assert_eq!(
            parse_hint("/* pgrelay: leader */ SELECT 1"),
            Some(Hint::Leader)
        );
        assert_eq!(
            parse_hint("  /*pgrelay: consistency=eventual*/SELECT 1"),
            Some(Hint::Consistency(Consistency::Eventual))
        );
        assert_eq!(parse_hint("SELECT /* pgrelay: leader */ 1"), None);
        assert_eq!(
            parse_hint("/* pgrelay: consistency=strong */ SELECT 1"),
            None
        );
        assert_eq!(parse_hint("/* just a comment */ SELECT 1"), None);
        assert_eq!(parse_hint("/* pgrelay: leader"), None);
    }
}
