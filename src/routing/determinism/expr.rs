//! Rules 1, 2 and 4 on the tokens of an expression or query: the transaction's time becomes
//! `pgrelay.now()`, generated values (`random()`, UUIDs, `nextval`) become the `pgrelay.*`
//! functions that record and replay them where their evaluation order is fixed, and any other
//! volatile function makes the statement unsafe. Also the scan of PL/pgSQL and SQL bodies (DO
//! blocks, procedures), which pgrelay cannot rewrite and can only check.

use super::super::lexer::{StringMode, TokenKind};
use super::defaults::{fill_candidates, resolve_table};
use super::tokens::{tokenize, Edit, Toks};
use super::{Context, Unsafe};

/// Where a generated value (`random()`, `gen_random_uuid()`, `nextval()`) may be produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Generators {
    /// Evaluated once (INSERT ... VALUES, arguments of CALL and EXECUTE, a column default):
    /// allowed outside subqueries that read rows.
    Once,
    /// A query: allowed unless it reads rows (a SELECT without FROM).
    Query,
    /// Evaluated per row in an order the follower may not repeat: never.
    PerRow,
}

/// What a scan saw besides its edits.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Found {
    /// A generated value was rewritten.
    pub generator: bool,
    /// The top level reads rows (`FROM`, `JOIN`, `TABLE`).
    pub top_reads: bool,
    /// A subquery reads rows.
    pub subquery_reads: bool,
    /// A construct that picks rows by their physical order or by other sessions' locks
    /// (`LIMIT` without `ORDER BY`, `SKIP LOCKED`, `TABLESAMPLE`): unsafe where the rows are
    /// written.
    pub row_choice: Option<&'static str>,
}

impl Found {
    /// For statements that write the rows they choose.
    pub fn check_row_choice(&self) -> Result<(), Unsafe> {
        let Some(construct) = self.row_choice else {
            return Ok(());
        };
        let reason = match construct {
            "SKIP LOCKED" => "the rows it skips depend on the locks other sessions hold on the leader",
            "TABLESAMPLE" => "the sample depends on the physical layout of the table, which differs on the followers",
            _ => "the rows it picks depend on the physical order of the table, which differs on the followers; add an ORDER BY on a unique key",
        };
        Err(Unsafe::new(construct, reason))
    }
}

/// Volatile built-ins that give the same result on every node (or only affect the session),
/// so a statement may call them.
const KEEP: &[&str] = &[
    "setval",
    "set_config",
    "setseed",
    "pg_notify",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_logical_emit_message",
];

/// Built-ins whose result differs between nodes although some are not marked volatile, so the
/// catalog does not list them all.
const BUILTIN_UNSAFE: &[&str] = &[
    "clock_timestamp",
    "timeofday",
    "random_normal",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "gen_random_bytes",
    "txid_current",
    "txid_current_if_assigned",
    "txid_current_snapshot",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_current_snapshot",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_backend_pid",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "inet_client_addr",
    "inet_client_port",
    "inet_server_addr",
    "inet_server_port",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
];

/// Names of the functions rules 1 and 2 rewrite (for the body scan, which cannot rewrite).
const REWRITTEN: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "random",
    "gen_random_uuid",
    "uuidv4",
    "uuid_generate_v4",
    "nextval",
    "currval",
    "lastval",
];

/// The SQL value functions of the transaction's time, written without parentheses, and the
/// type each one has.
const TIME_KEYWORDS: &[(&str, &str)] = &[
    ("current_timestamp", "timestamptz"),
    ("current_date", "date"),
    ("current_time", "timetz"),
    ("localtime", "time"),
    ("localtimestamp", "timestamp"),
];

/// Keywords after which `name (` is a relation or column list, not a call.
const NOT_A_CALL_AFTER: &[&str] = &[
    "into",
    "as",
    "copy",
    "references",
    "table",
    "update",
    "only",
    "call",
    "with",
    "recursive",
    "exists",
];

/// Nesting bound for bodies inside bodies (dynamic SQL strings, procedures calling procedures).
const MAX_BODY_DEPTH: u32 = 4;

pub(super) fn rows_order(construct: &str) -> Unsafe {
    Unsafe::new(
        construct,
        format!(
            "{construct} over many rows: the rows are visited in an order the follower may not repeat"
        ),
    )
}

pub(super) fn volatile(construct: &str) -> Unsafe {
    Unsafe::new(
        construct,
        format!(
            "{construct} is a volatile function; pgrelay cannot know that it returns the same on the followers"
        ),
    )
}

/// Applies rules 1, 2 and 4 to the tokens `from..to` of `t`, adding the rewrites to `edits`.
pub(super) fn scan(
    t: &Toks<'_>,
    from: usize,
    to: usize,
    gens: Generators,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Found, Unsafe> {
    let to = to.min(t.len());
    let mut found = Found::default();
    if from >= to {
        return Ok(found);
    }
    // Pass 1: which subqueries (and whether the top level) read rows.
    let mut reads = vec![false; to - from];
    let mut stack: Vec<usize> = Vec::new();
    // Per scope (the top level first): an ORDER BY was seen.
    let mut ordered: Vec<bool> = vec![false];
    for i in from..to {
        match t.kind(i) {
            Some(TokenKind::LParen) => {
                stack.push(i);
                ordered.push(false);
            }
            Some(TokenKind::RParen) => {
                stack.pop();
                if ordered.len() > 1 {
                    ordered.pop();
                }
            }
            Some(TokenKind::Ident) => {
                if t.is(i, "order") && t.is(i + 1, "by") {
                    if let Some(o) = ordered.last_mut() {
                        *o = true;
                    }
                }
                let unordered = !ordered.last().copied().unwrap_or(false);
                if t.is_any(i, &["limit", "offset", "fetch"]) && unordered {
                    found
                        .row_choice
                        .get_or_insert(match t.text(i).to_ascii_lowercase().as_str() {
                            "limit" => "LIMIT without ORDER BY",
                            "offset" => "OFFSET without ORDER BY",
                            _ => "FETCH FIRST without ORDER BY",
                        });
                }
                if t.is(i, "skip") && t.is(i + 1, "locked") {
                    found.row_choice = Some("SKIP LOCKED");
                }
                if t.is(i, "tablesample") {
                    found.row_choice.get_or_insert("TABLESAMPLE");
                }
                let from_kw = t.is(i, "from") && !t.is(i.wrapping_sub(1), "distinct");
                let table_kw =
                    t.is(i, "table") && (i == from || t.kind(i - 1) == Some(TokenKind::LParen));
                if from_kw || table_kw || t.is(i, "join") {
                    match stack.last() {
                        Some(&open) if t.opens_query(open) => {
                            if let Some(r) = reads.get_mut(open - from) {
                                *r = true;
                            }
                            found.subquery_reads = true;
                        }
                        Some(_) => {}
                        None => found.top_reads = true,
                    }
                }
            }
            _ => {}
        }
    }
    // Pass 2: rewrite, with whether an enclosing subquery reads rows.
    let mut stack: Vec<bool> = Vec::new();
    let mut i = from;
    while i < to {
        let inherited = stack.last().copied().unwrap_or(false);
        let gen_ok = match gens {
            Generators::Once => !inherited,
            Generators::Query => !inherited && !found.top_reads,
            Generators::PerRow => false,
        };
        let after_dot = i > 0 && t.kind(i - 1) == Some(TokenKind::Dot);
        match t.kind(i) {
            Some(TokenKind::LParen) => {
                let r = reads.get(i - from).copied().unwrap_or(false);
                stack.push(inherited || (r && t.opens_query(i)));
            }
            Some(TokenKind::RParen) => {
                stack.pop();
            }
            Some(TokenKind::Ident) if !after_dot && !t.is(i.wrapping_sub(1), "as") => {
                if let Some(next) = time_keyword(t, i, edits) {
                    i = next;
                    continue;
                }
                if let Some(next) = call(t, i, gen_ok, cx, edits, &mut found)? {
                    i = next;
                    continue;
                }
            }
            Some(TokenKind::QuotedIdent) if !after_dot => {
                if let Some(next) = call(t, i, gen_ok, cx, edits, &mut found)? {
                    i = next;
                    continue;
                }
            }
            Some(TokenKind::String) => time_literal(t, i)?,
            _ => {}
        }
        i += 1;
    }
    Ok(found)
}

/// `CURRENT_TIMESTAMP`, `CURRENT_DATE`, ... at `i`: rewrites it and returns the index after it.
fn time_keyword(t: &Toks<'_>, i: usize, edits: &mut Vec<Edit>) -> Option<usize> {
    let (_, ty) = TIME_KEYWORDS.iter().find(|(kw, _)| t.is(i, kw))?;
    // `CURRENT_TIMESTAMP(3)`: a precision.
    if t.kind(i + 1) == Some(TokenKind::LParen)
        && t.kind(i + 2) == Some(TokenKind::Number)
        && t.kind(i + 3) == Some(TokenKind::RParen)
        && *ty != "date"
    {
        let text = format!("(pgrelay.now())::{ty}({})", t.text(i + 2));
        edits.push(Edit::replace(t.start(i), t.end(i + 3), text));
        return Some(i + 4);
    }
    let text = if *ty == "timestamptz" {
        "pgrelay.now()".to_owned()
    } else {
        format!("(pgrelay.now())::{ty}")
    };
    edits.push(Edit::replace(t.start(i), t.end(i), text));
    Some(i + 1)
}

/// A function call whose name starts at `head` (possibly `schema.name`). Returns the index to
/// continue at, or `None` if this is no call.
fn call(
    t: &Toks<'_>,
    head: usize,
    gen_ok: bool,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
    found: &mut Found,
) -> Result<Option<usize>, Unsafe> {
    let qualified = t.kind(head + 1) == Some(TokenKind::Dot) && t.is_name(head + 2);
    let name_at = if qualified { head + 2 } else { head };
    let open = name_at + 1;
    let Some(close) = t.close(open) else {
        return Ok(None);
    };
    if t.is_any(head.wrapping_sub(1), NOT_A_CALL_AFTER) {
        return Ok(None);
    }
    // `WITH name (columns) AS (...)`: a CTE's column list.
    if t.is(close + 1, "as")
        && (t.kind(close + 2) == Some(TokenKind::LParen)
            || t.is_any(close + 2, &["materialized", "not"]))
    {
        return Ok(None);
    }
    let Some(name) = t.name(name_at) else {
        return Err(Unsafe::new(
            t.text(name_at),
            "a function name written with Unicode escapes: pgrelay cannot tell which function it calls",
        ));
    };
    let schema = if qualified { t.name(head) } else { None };
    let lower = name.to_ascii_lowercase();
    let builtin = matches!(schema.as_deref(), None | Some("pg_catalog"));
    if schema.as_deref() == Some("pgrelay") {
        return Ok(Some(open));
    }
    let empty = close == open + 1;
    let start = t.start(head);
    let whole_call = |text: &str, edits: &mut Vec<Edit>| {
        edits.push(Edit::replace(start, t.end(close), text));
        Some(close + 1)
    };
    let construct = format!("{lower}()");
    match name.as_str() {
        "now" | "transaction_timestamp" | "statement_timestamp" if builtin && empty => {
            return Ok(whole_call("pgrelay.now()", edits));
        }
        "random" | "gen_random_uuid" | "uuidv4" | "uuid_generate_v4" | "nextval"
            if (builtin || name == "uuid_generate_v4") && (empty || name == "nextval") =>
        {
            if !gen_ok {
                return Err(rows_order(&construct));
            }
            found.generator = true;
            return Ok(match name.as_str() {
                "random" => whole_call("pgrelay.random()", edits),
                "nextval" => {
                    edits.push(Edit::replace(start, t.end(name_at), "pgrelay.nextval"));
                    Some(open)
                }
                _ => whole_call("pgrelay.uuid()", edits),
            });
        }
        "currval" | "lastval" if builtin => {
            return Err(Unsafe::new(
                construct,
                "reads the sequence state of the leader's session, which the follower's replay does not have; use the value RETURNING gives",
            ));
        }
        _ => {}
    }
    // `random(min, max)` and the like: generators pgrelay does not rewrite, even when the
    // catalog could not be loaded.
    if builtin && matches!(lower.as_str(), "random" | "gen_random_uuid" | "uuidv4") {
        return Err(volatile(&construct));
    }
    if builtin && KEEP.contains(&lower.as_str()) {
        return Ok(Some(open));
    }
    if (builtin && BUILTIN_UNSAFE.contains(&lower.as_str())) || cx.catalog.is_volatile(&lower) {
        return Err(volatile(&construct));
    }
    Ok(Some(open))
}

/// `'now'::timestamptz`, `timestamp 'today'`, `CAST('now' AS date)`: a time chosen by each node.
fn time_literal(t: &Toks<'_>, i: usize) -> Result<(), Unsafe> {
    const TYPES: &[&str] = &["date", "time", "timetz", "timestamp", "timestamptz", "zone"];
    let text = t.text(i);
    let Some(inner) = text.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) else {
        return Ok(());
    };
    let word = inner.trim().to_ascii_lowercase();
    if !matches!(word.as_str(), "now" | "today" | "tomorrow" | "yesterday") {
        return Ok(());
    }
    let cast = t.kind(i + 1) == Some(TokenKind::DoubleColon) && t.is_any(i + 2, TYPES);
    let typed = t.is_any(i.wrapping_sub(1), TYPES);
    let cast_as = t.is(i + 1, "as") && t.is_any(i + 2, TYPES);
    if cast || typed || cast_as {
        return Err(Unsafe::new(
            text,
            format!("the string {text} means the time the statement runs on each node; use pgrelay-rewritten now() or CURRENT_TIMESTAMP instead"),
        ));
    }
    Ok(())
}

/// Checks a body pgrelay cannot rewrite (a DO block, a procedure): unsafe if it mentions a
/// function or value whose result differs on the followers, calls a procedure that does, or
/// inserts into a table whose defaults differ on the followers. `what` names the body for the
/// client ("a DO block").
pub(super) fn check_body(
    text: &str,
    what: &str,
    cx: &Context<'_>,
    depth: u32,
) -> Result<(), Unsafe> {
    let unreadable = || {
        Unsafe::new(
            what,
            format!("pgrelay cannot read {what}, so it cannot tell whether it runs the same on the followers"),
        )
    };
    if depth > MAX_BODY_DEPTH {
        return Err(unreadable());
    }
    let Some((toks, _)) = tokenize(text, StringMode::Standard) else {
        return Err(unreadable());
    };
    let t = Toks::new(text, &toks);
    let mentions = |construct: &str| {
        let time = matches!(
            construct,
            "now()" | "transaction_timestamp()" | "statement_timestamp()"
        ) || TIME_KEYWORDS
            .iter()
            .any(|(kw, _)| kw.eq_ignore_ascii_case(construct));
        let hint = if time {
            " (call pgrelay.now() there for the transaction's time)"
        } else {
            ""
        };
        Unsafe::new(
            construct,
            format!("{what} calls {construct}, which returns something else on the followers; pgrelay cannot rewrite inside it{hint}"),
        )
    };
    for i in 0..t.len() {
        let after_dot = i > 0 && t.kind(i - 1) == Some(TokenKind::Dot);
        match t.kind(i) {
            Some(TokenKind::Ident | TokenKind::QuotedIdent) if !after_dot => {
                let Some(name) = t.name(i) else {
                    return Err(unreadable());
                };
                let qualified = t.kind(i + 1) == Some(TokenKind::Dot);
                let (schema, fname, paren) = if qualified {
                    (
                        Some(name.as_str()),
                        t.name(i + 2).unwrap_or_default(),
                        i + 3,
                    )
                } else {
                    (None, name.clone(), i + 1)
                };
                if t.kind(i) == Some(TokenKind::Ident)
                    && TIME_KEYWORDS.iter().any(|(kw, _)| *kw == name)
                {
                    return Err(mentions(&name.to_ascii_uppercase()));
                }
                if t.kind(paren) == Some(TokenKind::LParen) && schema != Some("pgrelay") {
                    let lower = fname.to_ascii_lowercase();
                    let keep = KEEP.contains(&lower.as_str());
                    if REWRITTEN.contains(&lower.as_str())
                        || BUILTIN_UNSAFE.contains(&lower.as_str())
                        || (!keep && cx.catalog.is_volatile(&lower))
                    {
                        return Err(mentions(&format!("{lower}()")));
                    }
                }
                if name == "call" {
                    if let Some((parts, _)) = t.qualified(i + 1) {
                        let proc_name = parts.last().map(|p| p.to_ascii_lowercase());
                        for body in cx.catalog.procedure(&proc_name.unwrap_or_default()) {
                            match &body.0 {
                                Some(b) => check_body(b, what, cx, depth + 1)?,
                                None => return Err(unreadable()),
                            }
                        }
                    }
                }
                if name == "into" {
                    check_insert_target(&t, i + 1, what, cx)?;
                }
            }
            Some(TokenKind::String | TokenKind::DollarString) => {
                if let Some(inner) = literal_body(t.text(i)) {
                    check_body(&inner, what, cx, depth + 1)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `INTO table [(columns)]` inside a body: the table's defaults run on the follower.
fn check_insert_target(
    t: &Toks<'_>,
    at: usize,
    what: &str,
    cx: &Context<'_>,
) -> Result<(), Unsafe> {
    let Some((parts, after)) = t.qualified(at) else {
        return Ok(());
    };
    let Some(table) = resolve_table(&parts, cx) else {
        return Ok(());
    };
    let listed: Vec<String> = if t.kind(after) == Some(TokenKind::LParen) {
        t.list_items(after)
            .iter()
            .filter_map(|&(a, _)| t.name(a))
            .collect()
    } else {
        Vec::new()
    };
    for (col, _) in fill_candidates(&table, cx) {
        if !listed.contains(&col.name) {
            return Err(Unsafe::new(
                format!("{}.{}", table.name, col.name),
                format!("{what} inserts into {}, whose column {} gets a sequence or volatile default that the followers would compute differently", table.name, col.name),
            ));
        }
    }
    Ok(())
}

/// The text inside a string or dollar-quoted literal.
pub(super) fn literal_body(text: &str) -> Option<String> {
    if let Some(rest) = text.strip_prefix('$') {
        let tag_end = rest.find('$')?;
        let tag_len = tag_end + 2;
        let inner = text.get(tag_len..text.len().checked_sub(tag_len)?)?;
        return Some(inner.to_owned());
    }
    let start = text.find('\'')?;
    let inner = text.get(start + 1..text.len().checked_sub(1)?)?;
    Some(inner.replace("''", "'"))
}
