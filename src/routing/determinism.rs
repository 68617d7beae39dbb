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
//!    value) are filled in explicitly ([`defaults`]).
//! 4. Any other volatile function is unsafe ([`expr`]).
//! 5. With `serialize_writes = false`, a write that reads other rows is unsafe: concurrent
//!    transactions may change them before the follower replays it.
//! 6. DDL runs as is, except `ADD COLUMN` with a non-deterministic default; CREATE TABLE AS,
//!    SELECT INTO and CREATE MATERIALIZED VIEW have their query rewritten; DO blocks and
//!    procedures are checked, not rewritten.
//! 7. Writes to the session's temporary tables are [`Outcome::Local`].
//!
//! See <https://www.postgresql.org/docs/current/xfunc-volatility.html> and
//! <https://www.postgresql.org/docs/current/functions-datetime.html#FUNCTIONS-DATETIME-CURRENT>.

mod catalog;
mod defaults;
mod expr;
mod tokens;

#[cfg(test)]
mod tests;

use std::collections::HashSet;

pub use catalog::{Body, Catalog, Column, Identity, Trigger};

use super::classify::statement_spans;
use super::lexer::{StringMode, Token, TokenKind};
use defaults::{
    check_target, check_triggers, copy_from, fill, insert, is_temp, resolve_table, Insert, InsertIn,
};
use expr::{check_body, literal_body, scan, Generators};
use tokens::{apply, split_commas, tokenize, Edit, Toks};

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
    spans.into_iter().find_map(|(a, b)| {
        let t = Toks::new(sql, statement_tokens(&toks, a, b));
        let (temp, i) = create_prefix(&t);
        if !t.is(i, "table") {
            return None;
        }
        let i = if t.is(i + 1, "if") { i + 4 } else { i + 1 };
        let (parts, _) = t.qualified(i)?;
        let pg_temp = parts.len() == 2 && parts.first().is_some_and(|s| s.starts_with("pg_temp"));
        (temp || pg_temp).then(|| parts.last().cloned()).flatten()
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
    for (a, b) in spans {
        let t = Toks::new(sql, statement_tokens(&toks, a, b));
        match statement(&t, 0, t.len(), cx, &mut edits, 0) {
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
        "update" => update(t, at, to, cx, edits),
        "delete" => delete(t, at, to, cx, edits),
        "merge" => merge(t, at, to, cx, edits),
        "select" | "values" | "table" | "(" => query(t, at, to, cx, edits),
        "with" => with(t, at, to, cx, edits),
        "execute" => {
            scan(t, at + 2, to, Generators::Once, cx, edits)?;
            Ok(Kind::Replicated)
        }
        "call" => call(t, at, to, cx, edits),
        "do" => do_block(t, at, to, cx),
        "copy" => copy(t, at, to, cx),
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
        "create" => create(t, at, to, cx, edits),
        "alter" => alter(t, at, to, cx, edits),
        "drop" => {
            let names = if t.is(at + 1, "table") {
                relations(t, at + 2, to)
            } else {
                None
            };
            Ok(temp_relations(names, cx)?)
        }
        "truncate" => {
            let i = if t.is(at + 1, "table") {
                at + 2
            } else {
                at + 1
            };
            Ok(temp_relations(relations(t, i, to), cx)?)
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

/// The relation names of `DROP TABLE` / `TRUNCATE` (`[IF EXISTS] [ONLY] a [*], b ...`).
fn relations(t: &Toks<'_>, mut i: usize, to: usize) -> Option<Vec<Vec<String>>> {
    if t.is(i, "if") && t.is(i + 1, "exists") {
        i += 2;
    }
    let mut out = Vec::new();
    for (a, _) in split_commas(t, i, to) {
        let a = if t.is(a, "only") { a + 1 } else { a };
        out.push(t.qualified(a)?.0);
    }
    Some(out)
}

/// Local if every relation is temporary, unsafe if some are.
fn temp_relations(names: Option<Vec<Vec<String>>>, cx: &Context<'_>) -> Result<Kind, Unsafe> {
    let Some(names) = names else {
        return Ok(Kind::Replicated);
    };
    let temp = names.iter().filter(|n| is_temp(n, cx)).count();
    if temp == 0 {
        Ok(Kind::Replicated)
    } else if temp == names.len() {
        Ok(Kind::Local)
    } else {
        Err(Unsafe::new(
            "temporary and replicated tables in one statement",
            "the temporary tables do not exist on the followers; name them in a separate statement",
        ))
    }
}

/// `UPDATE [ONLY] table ... SET ... [FROM ...]`.
fn update(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Kind, Unsafe> {
    let i = if t.is(at + 1, "only") { at + 2 } else { at + 1 };
    let target = t.qualified(i);
    if let Some((parts, _)) = &target {
        if is_temp(parts, cx) {
            return Ok(Kind::Local);
        }
        check_target(parts, false, cx)?;
        // `SET col = DEFAULT`: the default runs per row.
        if let Some(table) = resolve_table(parts, cx) {
            check_triggers(&table, cx)?;
            for k in i..to {
                let eq = t.kind(k.wrapping_sub(1)) == Some(TokenKind::Operator)
                    && t.text(k.wrapping_sub(1)) == "=";
                if !(t.is(k, "default") && eq) {
                    continue;
                }
                let Some(name) = t.name(k.wrapping_sub(2)) else {
                    continue;
                };
                let Some(col) = table.columns.iter().find(|c| c.name == name) else {
                    continue;
                };
                if let Some(f) = fill(&table.name, col, cx)? {
                    if f.generator {
                        return Err(defaults::unordered(
                            &table,
                            col,
                            "UPDATE ... SET column = DEFAULT",
                        ));
                    }
                    edits.push(Edit::replace(t.start(k), t.end(k), f.expr));
                }
            }
        }
    }
    let found = scan(t, at, to, Generators::PerRow, cx, edits)?;
    serialized(
        found.top_reads || found.subquery_reads,
        "UPDATE reading other rows",
        cx,
    )?;
    Ok(Kind::Replicated)
}

/// `DELETE FROM [ONLY] table [USING ...]`.
fn delete(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Kind, Unsafe> {
    let mut i = at + 2;
    if t.is(i, "only") {
        i += 1;
    }
    if let Some((parts, _)) = t.qualified(i) {
        if is_temp(&parts, cx) {
            return Ok(Kind::Local);
        }
        check_target(&parts, false, cx)?;
        if let Some(table) = resolve_table(&parts, cx) {
            check_triggers(&table, cx)?;
        }
    }
    let found = scan(t, at, to, Generators::PerRow, cx, edits)?;
    let using = t.depth0(at, to, "using").is_some();
    serialized(
        using || found.subquery_reads,
        "DELETE reading other rows",
        cx,
    )?;
    Ok(Kind::Replicated)
}

/// `MERGE INTO table USING source ON ... WHEN ... THEN INSERT ...`.
fn merge(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Kind, Unsafe> {
    let i = if t.is(at + 2, "only") { at + 3 } else { at + 2 };
    if let Some((parts, _)) = t.qualified(i) {
        if is_temp(&parts, cx) {
            return Ok(Kind::Local);
        }
        serialized(true, "MERGE", cx)?;
        check_target(&parts, true, cx)?;
        if let Some(table) = resolve_table(&parts, cx) {
            check_triggers(&table, cx)?;
            for k in i..to {
                if !(t.is(k, "insert") && t.is(k.wrapping_sub(1), "then")) {
                    continue;
                }
                let listed: Vec<String> = if t.kind(k + 1) == Some(TokenKind::LParen) {
                    t.list_items(k + 1)
                        .iter()
                        .filter_map(|&(a, _)| t.name(a))
                        .collect()
                } else {
                    Vec::new()
                };
                for (col, _) in defaults::fill_candidates(&table, cx) {
                    if !listed.contains(&col.name) {
                        return Err(defaults::unordered(&table, col, "MERGE ... INSERT"));
                    }
                }
            }
        }
    }
    scan(t, at, to, Generators::PerRow, cx, edits)?;
    Ok(Kind::Replicated)
}

/// SELECT / VALUES / TABLE, possibly `SELECT ... INTO new_table`.
fn query(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Kind, Unsafe> {
    let into = t.depth0(at, to, "into");
    if let Some(k) = into {
        let mut j = k + 1;
        if t.is_any(j, &["temp", "temporary"]) {
            return Ok(Kind::Local);
        }
        if t.is(j, "unlogged") {
            j += 1;
        }
        if t.is(j, "table") {
            j += 1;
        }
        if let Some((parts, _)) = t.qualified(j) {
            if is_temp(&parts, cx) && parts.len() == 2 {
                return Ok(Kind::Local);
            }
        }
    }
    let found = scan(t, at, to, Generators::Query, cx, edits)?;
    if into.is_some() {
        serialized(
            found.top_reads || found.subquery_reads,
            "SELECT ... INTO",
            cx,
        )?;
        return Ok(Kind::Replicated);
    }
    Ok(if found.generator {
        Kind::Replicated
    } else {
        Kind::Neutral
    })
}

/// `WITH ... ` : CTEs (possibly writing) and a main statement, which run in no fixed order.
fn with(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Kind, Unsafe> {
    // The data-modifying parts: `AS (INSERT ...`, `) INSERT ...` after the CTE list.
    let dml: Vec<usize> = (at..to)
        .filter(|&k| {
            let prev = t.kind(k.wrapping_sub(1));
            matches!(prev, Some(TokenKind::LParen | TokenKind::RParen))
                && t.is_any(k, &["insert", "update", "delete", "merge"])
        })
        .collect();
    let writes = dml.len();
    let place = if writes == 1 {
        InsertIn::OnlyInsertOfWith
    } else {
        InsertIn::With
    };
    let mut temp = 0;
    for &k in &dml {
        let prev = t.kind(k.wrapping_sub(1));
        if t.is(k, "insert") {
            let end = match prev {
                Some(TokenKind::LParen) => t.close(k - 1).unwrap_or(to),
                _ => to,
            };
            if let Insert::Temp = insert(t, k, end, place, cx, edits)? {
                temp += 1;
            }
        }
    }
    if temp > 0 {
        return if temp == writes {
            Ok(Kind::Local)
        } else {
            Err(Unsafe::new(
                "temporary and replicated tables in one statement",
                "the temporary tables do not exist on the followers; write them in a separate statement",
            ))
        };
    }
    serialized(writes > 0, "WITH", cx)?;
    let found = scan(t, at, to, Generators::PerRow, cx, edits)?;
    Ok(if writes > 0 || found.generator {
        Kind::Replicated
    } else {
        Kind::Neutral
    })
}

/// `CALL procedure(args)`: the arguments are rewritten, the body is checked.
fn call(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Kind, Unsafe> {
    let Some((parts, after)) = t.qualified(at + 1) else {
        return Ok(Kind::Replicated);
    };
    scan(t, after, to, Generators::Once, cx, edits)?;
    let name = parts
        .last()
        .map(|p| p.to_ascii_lowercase())
        .unwrap_or_default();
    let what = format!("procedure {name}");
    for body in cx.catalog.procedure(&name) {
        match &body.0 {
            Some(text) => check_body(text, &what, cx, 1)?,
            None => {
                return Err(Unsafe::new(
                    what.clone(),
                    format!("pgrelay cannot read {what} (not SQL or PL/pgSQL), so it cannot tell whether it runs the same on the followers"),
                ))
            }
        }
    }
    Ok(Kind::Replicated)
}

/// `DO [LANGUAGE l] 'body' [LANGUAGE l]`: checked, not rewritten.
fn do_block(t: &Toks<'_>, at: usize, to: usize, cx: &Context<'_>) -> Result<Kind, Unsafe> {
    let what = "a DO block";
    for k in at..to {
        if t.is(k, "language") && !t.is_any(k + 1, &["plpgsql", "sql"]) {
            return Err(Unsafe::new(
                what,
                "pgrelay can only read DO blocks in PL/pgSQL, so it cannot tell whether this one runs the same on the followers",
            ));
        }
    }
    let body =
        (at..to).find(|&k| matches!(t.kind(k), Some(TokenKind::String | TokenKind::DollarString)));
    if let Some(inner) = body.and_then(|k| literal_body(t.text(k))) {
        check_body(&inner, what, cx, 1)?;
    }
    Ok(Kind::Replicated)
}

/// `COPY table [(columns)] FROM STDIN` (rule 3's check), or a COPY that only reads.
fn copy(t: &Toks<'_>, at: usize, to: usize, cx: &Context<'_>) -> Result<Kind, Unsafe> {
    let Some((parts, mut j)) = t.qualified(at + 1) else {
        // COPY (query) TO ...
        return Ok(Kind::Neutral);
    };
    let mut listed = None;
    if t.kind(j) == Some(TokenKind::LParen) {
        let names: Vec<String> = t
            .list_items(j)
            .iter()
            .filter_map(|&(a, _)| t.name(a))
            .collect();
        listed = Some(names);
        j = t.close(j).map_or(to, |c| c + 1);
    }
    if !t.is(j, "from") {
        return Ok(Kind::Neutral);
    }
    if is_temp(&parts, cx) {
        return Ok(Kind::Local);
    }
    check_target(&parts, true, cx)?;
    if !t.is(j + 1, "stdin") {
        return Err(Unsafe::new(
            "COPY ... FROM a file or program",
            "the file or program is on the leader's host, the followers would read something else; use COPY ... FROM STDIN",
        ));
    }
    if let Some(table) = resolve_table(&parts, cx) {
        copy_from(&table, listed.as_deref(), cx)?;
    }
    Ok(Kind::Replicated)
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

/// `CREATE [OR REPLACE] [GLOBAL|LOCAL] [TEMP|TEMPORARY|UNLOGGED]`: whether the object is
/// temporary and the index of the object type.
fn create_prefix(t: &Toks<'_>) -> (bool, usize) {
    if !t.is(0, "create") {
        return (false, 0);
    }
    let mut i = 1;
    if t.is(i, "or") && t.is(i + 1, "replace") {
        i += 2;
    }
    if t.is_any(i, &["global", "local"]) {
        i += 1;
    }
    let temp = t.is_any(i, &["temp", "temporary"]);
    if temp || t.is(i, "unlogged") {
        i += 1;
    }
    (temp, i)
}

/// CREATE: temporary objects are local; CREATE TABLE AS and CREATE MATERIALIZED VIEW run their
/// query now, so it is rewritten.
fn create(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Kind, Unsafe> {
    let sub = Toks::new(t.sql, t.toks.get(at..to).unwrap_or_default());
    let (temp, mut i) = create_prefix(&sub);
    if temp {
        return Ok(Kind::Local);
    }
    if sub.is(i, "table") {
        i += 1;
    } else if sub.is(i, "materialized") && sub.is(i + 1, "view") {
        i += 2;
    } else {
        return Ok(Kind::Replicated);
    }
    if sub.is(i, "if") {
        i += 3;
    }
    if let Some((parts, after)) = sub.qualified(i) {
        if parts.len() == 2 && is_temp(&parts, cx) {
            return Ok(Kind::Local);
        }
        if let Some(k) = sub.depth0(after, sub.len(), "as") {
            let found = scan(&sub, k + 1, sub.len(), Generators::Query, cx, edits)?;
            serialized(found.top_reads || found.subquery_reads, "CREATE ... AS", cx)?;
        }
    }
    Ok(Kind::Replicated)
}

/// ALTER TABLE: a new column's non-deterministic default (or serial, identity) would give the
/// existing rows different values on each node; `ALTER COLUMN ... TYPE ... USING expr` rewrites
/// every row with `expr`.
fn alter(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Kind, Unsafe> {
    if !t.is(at + 1, "table") {
        return Ok(Kind::Replicated);
    }
    let mut i = at + 2;
    if t.is(i, "if") && t.is(i + 1, "exists") {
        i += 2;
    }
    if t.is(i, "only") {
        i += 1;
    }
    let Some((parts, mut after)) = t.qualified(i) else {
        return Ok(Kind::Replicated);
    };
    if is_temp(&parts, cx) {
        return Ok(Kind::Local);
    }
    if t.text(after) == "*" {
        after += 1;
    }
    const SERIAL: &[&str] = &[
        "serial",
        "bigserial",
        "smallserial",
        "serial2",
        "serial4",
        "serial8",
    ];
    const CONSTRAINT: &[&str] = &[
        "not",
        "null",
        "check",
        "constraint",
        "primary",
        "unique",
        "references",
        "generated",
        "collate",
        "deferrable",
        "initially",
    ];
    for (a, b) in split_commas(t, after, to) {
        if t.is(a, "add") {
            let added = |construct: &str| {
                Unsafe::new(
                    construct,
                    "ADD COLUMN with it: the existing rows would get a different value on each \
                     node; add the column, then fill it with UPDATE",
                )
            };
            for k in a..b {
                if t.is_any(k, SERIAL) {
                    return Err(added(t.text(k)));
                }
                if t.is(k, "identity") && t.is(k.wrapping_sub(1), "as") {
                    return Err(added("GENERATED AS IDENTITY"));
                }
                if t.is(k, "default") {
                    let end = (k + 1..b).find(|&e| t.is_any(e, CONSTRAINT)).unwrap_or(b);
                    let mut scratch = Vec::new();
                    let text = t.sql.get(t.start(k + 1)..t.end(end - 1)).unwrap_or("");
                    match scan(t, k + 1, end, Generators::Once, cx, &mut scratch) {
                        Ok(_) if scratch.is_empty() => {}
                        _ => return Err(added(&format!("DEFAULT {text}"))),
                    }
                }
            }
        } else if let Some(u) = (a..b).find(|&k| t.is(k, "using")) {
            scan(t, u + 1, b, Generators::PerRow, cx, edits)?;
        }
    }
    Ok(Kind::Replicated)
}
