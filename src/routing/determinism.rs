//! Makes write statements deterministic for statement-mode replication: the leader runs the
//! rewritten text, pgrelay logs that same text, and the followers replay it with the values the
//! leader recorded (see [`crate::replication::statement::log`] for the `pgrelay.*` functions).
//!
//! There is no SQL parser here: statements are analysed on the tokens of
//! [`super::lexer`] and rewritten by splicing text, so everything pgrelay does not rewrite
//! (comments, whitespace, strings, `$n` parameters) stays byte-identical. The rules:
//! 1. The transaction's time (`now()`, `CURRENT_TIMESTAMP`, `CURRENT_DATE`, ...) becomes
//!    `pgrelay.now()`, cast to the original type.
//! 2. `random()`, `gen_random_uuid()`, `uuid_generate_v4()` and `nextval()` become
//!    `pgrelay.random()`, `pgrelay.uuid()` and `pgrelay.nextval()`, whose values are replayed in
//!    the order they were produced: only where that order is fixed (`INSERT ... VALUES`, a
//!    SELECT without FROM, arguments of CALL and EXECUTE). `currval()`/`lastval()` are unsafe.
//! 3. Columns left to a non-deterministic default (a sequence, an identity, the time, a random
//!    value) are filled in explicitly (`defaults`): in every VALUES row, or appended to the
//!    select list of a plain `INSERT ... SELECT` (a sequence only when it has no FROM).
//! 4. Any other volatile function is unsafe (`expr`).
//! 5. With `serialize_writes = false`, a write that reads other rows is unsafe: concurrent
//!    transactions may change them before the follower replays it.
//! 6. DDL runs as is, except `ADD COLUMN` with a non-deterministic default; CREATE TABLE AS,
//!    SELECT INTO and CREATE MATERIALIZED VIEW have their query rewritten; DO blocks and
//!    procedures are checked, not rewritten.
//! 7. Writes to the session's temporary tables are [`Outcome::Local`].
//!
//! Layout: `catalog` (what pgrelay loads from the leader), `expr` (rules 1, 2, 4 on tokens,
//! and the check of bodies it cannot rewrite), `defaults` (rule 3 and INSERT), `dml`
//! (UPDATE, DELETE, MERGE, queries, WITH), `utility` (DDL, COPY, DO, CALL), `tokens`
//! (token helpers and text splicing).
//!
//! See <https://www.postgresql.org/docs/current/xfunc-volatility.html> and
//! <https://www.postgresql.org/docs/current/functions-datetime.html#FUNCTIONS-DATETIME-CURRENT>.

mod catalog;
mod defaults;
mod dml;
mod expr;
mod tokens;
mod utility;

#[cfg(test)]
mod tests;

use std::collections::HashSet;

pub use catalog::{Body, Catalog, Column, Identity, Relkind, Trigger};

use super::classify::statement_spans;
use super::lexer::{StringMode, Token, TokenKind};
use defaults::{insert, Insert, InsertIn};
use expr::{scan, Generators};
use tokens::{apply, tokenize, Edit, Toks};

/// What [`make_deterministic`] needs to know about the session.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub catalog: &'a Catalog,
    /// The schemas of the search path in order, `$user` already replaced; `pg_catalog` is
    /// implicit.
    pub search_path: &'a [String],
    /// Writes take the ordering lock before they run (`[statement] serialize_writes`), so a
    /// statement that reads other rows sees what the follower will see.
    pub serialize_writes: bool,
    /// Names of this session's temporary tables (unquoted names lowercased).
    pub temp_tables: &'a HashSet<String>,
}

/// What to do with a query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Deterministic as it is: run and log it unchanged.
    Keep,
    /// Run and log this text instead.
    Rewrite(String),
    /// A write to a temporary table (or its creation): run it as is, do not log it.
    Local,
    /// Cannot be made deterministic: refuse it.
    Unsafe(Unsafe),
}

/// Why a statement cannot be replicated by statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsafe {
    /// The construct at fault, e.g. `clock_timestamp()`.
    pub construct: String,
    /// One sentence for the client.
    pub reason: String,
}

impl Unsafe {
    pub(crate) fn new(construct: impl Into<String>, reason: impl Into<String>) -> Self {
        Unsafe {
            construct: construct.into(),
            reason: reason.into(),
        }
    }
}

/// EXPLAIN ANALYZE and PREPARE wrap a statement; this bounds `EXPLAIN EXPLAIN ...`.
const MAX_NESTING: u32 = 4;

const SERIALIZE: &str = "with serialize_writes = false, this statement reads rows that \
    concurrent transactions may change before the follower replays it; set serialize_writes = \
    true or use row mode";

/// Statements that neither write nor need rewriting.
const NEUTRAL: &[&str] = &[
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "set",
    "reset",
    "show",
    "discard",
    "deallocate",
    "listen",
    "unlisten",
    "fetch",
    "move",
    "close",
    "declare",
    "lock",
    "checkpoint",
    "vacuum",
    "analyze",
    "analyse",
    "load",
];

/// Makes the statements of a query string (one or more, separated by `;`) deterministic. Run
/// it on every query string the session logs, and log exactly what the leader ran: a
/// rewritten value is recorded on the leader and must be consumed by the replay. Text that does
/// not lex is [`Outcome::Keep`]: the server rejects it.
pub fn make_deterministic(sql: &str, cx: &Context<'_>) -> Outcome {
    let Some((standard, ambiguous)) = run(sql, StringMode::Standard, cx) else {
        return Outcome::Keep;
    };
    if !ambiguous {
        return standard;
    }
    // A plain string holds a backslash: its meaning depends on standard_conforming_strings.
    // Safe only if both readings come out the same.
    match run(sql, StringMode::Backslash, cx) {
        Some((legacy, _)) if legacy != standard => Outcome::Unsafe(Unsafe::new(
            "a backslash in a '...' string",
            "the statement means different things depending on standard_conforming_strings; \
             write the string as E'...'",
        )),
        _ => standard,
    }
}

/// The name (unquoted names lowercased) of the first temporary table a query string creates
/// with `CREATE TEMP[ORARY] TABLE [IF NOT EXISTS] name` (or `CREATE TABLE pg_temp.name`).
pub fn temp_table_created(sql: &str) -> Option<String> {
    let (toks, _) = tokenize(sql, StringMode::Standard)?;
    let spans = statement_spans(sql, StringMode::Standard).ok()?;
    spans
        .into_iter()
        .find_map(|(a, b)| creates_temp_table(&Toks::new(sql, statement_tokens(&toks, a, b))))
}

/// The temporary table one statement creates.
fn creates_temp_table(t: &Toks<'_>) -> Option<String> {
    let (temp, i) = utility::create_prefix(t);
    if !t.is(i, "table") {
        return None;
    }
    let i = if t.is(i + 1, "if") { i + 4 } else { i + 1 };
    let (parts, _) = t.qualified(i)?;
    let pg_temp = parts.len() == 2 && parts.first().is_some_and(|s| s.starts_with("pg_temp"));
    (temp || pg_temp).then(|| parts.last().cloned()).flatten()
}

/// Removes from `temp_tables` what a query string drops once it succeeded: `DROP TABLE` of a
/// temporary table (unqualified or `pg_temp.x`), all of them on `DISCARD ALL | TEMP`. A name
/// left behind would make later writes to a real table of that name local.
pub fn forget_temp_tables(sql: &str, temp_tables: &mut HashSet<String>) {
    let Some((toks, _)) = tokenize(sql, StringMode::Standard) else {
        return;
    };
    let Ok(spans) = statement_spans(sql, StringMode::Standard) else {
        return;
    };
    for (a, b) in spans {
        let t = Toks::new(sql, statement_tokens(&toks, a, b));
        if t.is(0, "discard") && t.is_any(1, &["all", "temp", "temporary"]) {
            temp_tables.clear();
        }
        if !(t.is(0, "drop") && t.is(1, "table")) {
            continue;
        }
        for parts in utility::relations(&t, 2, t.len()).unwrap_or_default() {
            match parts.as_slice() {
                [name] => temp_tables.remove(name),
                [schema, name] if schema.starts_with("pg_temp") => temp_tables.remove(name),
                _ => false,
            };
        }
    }
}

/// Whether a query string may change what [`Catalog::LOAD_SQL`] returns (CREATE, ALTER, DROP,
/// IMPORT FOREIGN SCHEMA, SELECT ... INTO, except on temporary objects): the session loads the
/// catalog again after it committed.
pub fn affects_catalog(sql: &str) -> bool {
    let Some((toks, _)) = tokenize(sql, StringMode::Standard) else {
        return false;
    };
    let Ok(spans) = statement_spans(sql, StringMode::Standard) else {
        return false;
    };
    spans.into_iter().any(|(a, b)| {
        let t = Toks::new(sql, statement_tokens(&toks, a, b));
        let (temp, _) = utility::create_prefix(&t);
        (t.is_any(0, &["create", "alter", "drop", "import"]) && !temp)
            || (t.is(0, "select") && t.depth0(0, t.len(), "into").is_some())
    })
}

/// The tokens of the statement spanning bytes `a..b`.
fn statement_tokens(toks: &[Token], a: usize, b: usize) -> &[Token] {
    let lo = toks.partition_point(|t| t.start < a);
    let hi = toks.partition_point(|t| t.end <= b);
    toks.get(lo..hi.max(lo)).unwrap_or_default()
}

/// What one statement is, for combining the statements of a query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Writes nothing (transaction control, settings, plain reads).
    Neutral,
    /// Runs and is logged.
    Replicated,
    /// Touches temporary tables only.
    Local,
}

fn run(sql: &str, mode: StringMode, cx: &Context<'_>) -> Option<(Outcome, bool)> {
    let (toks, ambiguous) = tokenize(sql, mode)?;
    let spans = statement_spans(sql, mode).ok()?;
    let mut edits = Vec::new();
    let (mut local, mut replicated) = (false, false);
    // Temporary tables created by earlier statements of the string.
    let mut temp_tables: Option<HashSet<String>> = None;
    for (a, b) in spans {
        let t = Toks::new(sql, statement_tokens(&toks, a, b));
        let outcome = {
            let cx = Context {
                temp_tables: temp_tables.as_ref().unwrap_or(cx.temp_tables),
                ..*cx
            };
            statement(&t, 0, t.len(), &cx, &mut edits, 0)
        };
        if let Some(name) = creates_temp_table(&t) {
            temp_tables
                .get_or_insert_with(|| cx.temp_tables.clone())
                .insert(name);
        }
        match outcome {
            Err(u) => return Some((Outcome::Unsafe(u), ambiguous)),
            Ok(Kind::Local) => local = true,
            Ok(Kind::Replicated) => replicated = true,
            Ok(Kind::Neutral) => {}
        }
    }
    let outcome = if local && replicated {
        Outcome::Unsafe(Unsafe::new(
            "temporary and replicated tables in one query string",
            "the writes to temporary tables must not be replayed and the others must; send them \
             as separate queries",
        ))
    } else if local {
        Outcome::Local
    } else if edits.is_empty() {
        Outcome::Keep
    } else {
        match apply(sql, edits) {
            Some(text) => Outcome::Rewrite(text),
            None => Outcome::Unsafe(Unsafe::new(
                "this statement",
                "pgrelay could not rewrite it consistently",
            )),
        }
    };
    Some((outcome, ambiguous))
}

/// Rule 5.
fn serialized(reads: bool, construct: &str, cx: &Context<'_>) -> Result<(), Unsafe> {
    if reads && !cx.serialize_writes {
        return Err(Unsafe::new(construct, SERIALIZE));
    }
    Ok(())
}

/// One statement at tokens `at..to` of `t`.
fn statement(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
    depth: u32,
) -> Result<Kind, Unsafe> {
    if depth > MAX_NESTING {
        return Ok(Kind::Replicated);
    }
    let first = if t.kind(at) == Some(TokenKind::LParen) {
        "(".to_owned()
    } else if t.kind(at) == Some(TokenKind::Ident) {
        t.text(at).to_ascii_lowercase()
    } else {
        return Ok(Kind::Replicated);
    };
    match first.as_str() {
        "insert" => match insert(t, at, to, InsertIn::Statement, cx, edits)? {
            Insert::Temp => Ok(Kind::Local),
            Insert::Done { reads } => {
                serialized(reads, "INSERT reading other rows", cx)?;
                Ok(Kind::Replicated)
            }
        },
        "update" => dml::update(t, at, to, cx, edits),
        "delete" => dml::delete(t, at, to, cx, edits),
        "merge" => dml::merge(t, at, to, cx, edits),
        "select" | "values" | "table" | "(" => dml::query(t, at, to, cx, edits),
        "with" => dml::with(t, at, to, cx, edits),
        "execute" => {
            scan(t, at + 2, to, Generators::Once, cx, edits)?;
            Ok(Kind::Replicated)
        }
        "call" => utility::call(t, at, to, cx, edits),
        "do" => utility::do_block(t, at, to, cx),
        "copy" => utility::copy(t, at, to, cx),
        "prepare" => {
            if t.is(at + 1, "transaction") {
                return Ok(Kind::Neutral);
            }
            let mut i = at + 2;
            if t.kind(i) == Some(TokenKind::LParen) {
                i = t.close(i).map_or(to, |c| c + 1);
            }
            if !t.is(i, "as") {
                return Ok(Kind::Replicated);
            }
            statement(t, i + 1, to, cx, edits, depth + 1).map(|_| Kind::Replicated)
        }
        "explain" => explain(t, at, to, cx, edits, depth),
        "create" => utility::create(t, at, to, cx, edits),
        "alter" => utility::alter(t, at, to, cx, edits),
        "drop" => {
            let names = if t.is(at + 1, "table") {
                utility::relations(t, at + 2, to)
            } else {
                None
            };
            Ok(utility::temp_relations(names, cx)?)
        }
        "truncate" => {
            let i = if t.is(at + 1, "table") {
                at + 2
            } else {
                at + 1
            };
            Ok(utility::temp_relations(utility::relations(t, i, to), cx)?)
        }
        "refresh" => {
            // The view's query is not in the text; it reads rows, so rule 5 applies.
            serialized(true, "REFRESH MATERIALIZED VIEW", cx)?;
            Ok(Kind::Replicated)
        }
        w if NEUTRAL.contains(&w) => Ok(Kind::Neutral),
        _ => Ok(Kind::Replicated),
    }
}

/// `EXPLAIN ANALYZE stmt` runs it; plain EXPLAIN does not.
fn explain(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
    depth: u32,
) -> Result<Kind, Unsafe> {
    let mut i = at + 1;
    let mut analyze = false;
    if t.kind(i) == Some(TokenKind::LParen) {
        let close = t.close(i).unwrap_or(to);
        for j in i + 1..close {
            if t.is_any(j, &["analyze", "analyse"]) {
                analyze |= !t.is_any(j + 1, &["false", "off", "no"]) && t.text(j + 1) != "0";
            }
        }
        i = close + 1;
    } else {
        if t.is_any(i, &["analyze", "analyse"]) {
            analyze = true;
            i += 1;
        }
        if t.is(i, "verbose") {
            i += 1;
        }
    }
    if !analyze {
        return Ok(Kind::Neutral);
    }
    statement(t, i, to, cx, edits, depth + 1)
}
