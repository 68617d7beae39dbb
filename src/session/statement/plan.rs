//! Deciding, from a statement's text and classification, what statement mode does with it.

use crate::config::UnsafePolicy;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate;
use crate::replication::statement::log::{Extended, LoggedStatement};
use crate::routing::classify::Classification;
use crate::routing::ddl::{self as rddl, Ddl};
use crate::routing::determinism::{self, Outcome};

use super::super::ddl::Raise;

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
                code: sqlstate::FEATURE_NOT_SUPPORTED,
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
            code: sqlstate::FEATURE_NOT_SUPPORTED,
            message: "pgrelay's statement replication mode needs BEGIN, COMMIT and ROLLBACK as statements of their own".into(),
            detail: "This query string both writes and starts or ends a transaction block.".into(),
            hint: "Send the transaction control statement separately.".into(),
        });
    }
    if first == "execute" && !c.executes.is_empty() {
        return Plan::Refuse(Raise {
            code: sqlstate::FEATURE_NOT_SUPPORTED,
            message: "EXECUTE of a prepared statement that writes is not supported in pgrelay's statement replication mode".into(),
            detail: "The followers replay the log without the session's PREPAREd statements.".into(),
            hint: "Run the statement itself, or prepare it with the extended query protocol.".into(),
        });
    }
    if first == "copy" {
        let upper = sql.to_ascii_uppercase();
        if !upper.contains("STDIN") {
            return Plan::Refuse(Raise {
                code: sqlstate::FEATURE_NOT_SUPPORTED,
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
                code: sqlstate::FEATURE_NOT_SUPPORTED,
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

/// The refusal of a COPY ... FROM STDIN outside a transaction block.
pub fn copy_outside_block() -> Raise {
    Raise {
        code: sqlstate::FEATURE_NOT_SUPPORTED,
        message: "COPY ... FROM STDIN outside a transaction block is not supported in pgrelay's statement replication mode".into(),
        detail: "pgrelay logs the COPY's data with the transaction that commits it.".into(),
        hint: "Run it in a transaction: BEGIN; COPY ...; COMMIT.".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::statement::LoggedTx;

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
