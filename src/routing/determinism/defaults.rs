//! Rule 3: column defaults. A column the statement leaves to its default is computed by each
//! node on its own, so where that default is not deterministic (a sequence, an identity, the
//! time, a random value) pgrelay fills the column in explicitly with the rewritten default.
//! See <https://www.postgresql.org/docs/current/sql-insert.html>.

use super::super::lexer::{StringMode, TokenKind};
use super::catalog::{Column, Identity, Relkind, Trigger};
use super::expr::check_body;
use super::expr::{scan, Generators};
use super::tokens::{apply, quote_ident, quote_literal, tokenize, Edit, Toks};
use super::{Context, Unsafe};

/// A table the catalog knows.
pub(super) struct Table<'c> {
    /// `schema.table` as the client is told.
    pub name: String,
    pub columns: &'c [Column],
    pub triggers: &'c [Trigger],
}

/// Resolves a (folded) relation name as Postgres would: qualified, or the first schema of the
/// search path that has it (`pg_catalog` holds no user tables; temporary tables are checked by
/// the caller first).
pub(super) fn resolve_table<'c>(parts: &[String], cx: &Context<'c>) -> Option<Table<'c>> {
    let found = |schema: &str, table: &str| {
        cx.catalog.table(schema, table).map(|columns| Table {
            name: format!("{}.{}", quote_ident(schema), quote_ident(table)),
            columns,
            triggers: cx.catalog.triggers(schema, table),
        })
    };
    let (schema, table) = relation(parts, cx)?;
    found(schema, table)
}

/// The schema and name a (folded) relation name resolves to.
fn relation<'n>(parts: &'n [String], cx: &Context<'n>) -> Option<(&'n str, &'n str)> {
    match parts {
        [table] => Some((cx.catalog.schema_of(cx.search_path, table)?, table.as_str())),
        [schema, table] | [_, schema, table] => Some((schema.as_str(), table.as_str())),
        _ => None,
    }
}

/// A write to a foreign table (each node would write to the remote server), or an insert
/// through a view (pgrelay cannot see which defaults and triggers it runs), is unsafe.
pub(super) fn check_target(
    parts: &[String],
    inserts: bool,
    cx: &Context<'_>,
) -> Result<(), Unsafe> {
    let Some((schema, name)) = relation(parts, cx) else {
        return Ok(());
    };
    let construct = format!("{}.{}", quote_ident(schema), quote_ident(name));
    match cx.catalog.other_relation(schema, name) {
        Some(Relkind::Foreign) => Err(Unsafe::new(
            construct,
            "a foreign table: every follower would write to the remote server again",
        )),
        Some(Relkind::View) if inserts => Err(Unsafe::new(
            construct,
            "an INSERT through a view: pgrelay cannot see which defaults and triggers it runs; insert into the table",
        )),
        _ => Ok(()),
    }
}

/// The table's triggers run on the followers too: each trigger function is checked like a DO
/// block (pgrelay cannot rewrite inside it).
pub(super) fn check_triggers(table: &Table<'_>, cx: &Context<'_>) -> Result<(), Unsafe> {
    for trigger in table.triggers {
        let what = format!("trigger {} on {}", quote_ident(&trigger.name), table.name);
        match &trigger.function.0 {
            Some(body) => check_body(body, &what, cx, 1)?,
            None => {
                return Err(Unsafe::new(
                    what.clone(),
                    format!("pgrelay cannot read the function of {what} (not SQL or PL/pgSQL), so it cannot tell whether it runs the same on the followers"),
                ))
            }
        }
    }
    Ok(())
}

/// The relation is one of this session's temporary tables (`pg_temp.x`, or an unqualified name
/// of one: the temporary schema comes first in the search path).
pub(super) fn is_temp(parts: &[String], cx: &Context<'_>) -> bool {
    match parts {
        [table] => cx.temp_tables.contains(table),
        [schema, _] => schema.starts_with("pg_temp"),
        _ => false,
    }
}

/// What pgrelay writes for a column instead of letting each node compute its default.
#[derive(Debug, Clone)]
pub(super) struct Fill {
    pub expr: String,
    /// It produces a value that is recorded and replayed (so its evaluation order matters).
    pub generator: bool,
    /// A `GENERATED ALWAYS` identity: an explicit value needs `OVERRIDING SYSTEM VALUE`.
    pub always: bool,
}

/// The fill for `col`: `Ok(None)` if its default is deterministic (or it has none), an error if
/// it is not deterministic and pgrelay cannot make it so.
pub(super) fn fill(table: &str, col: &Column, cx: &Context<'_>) -> Result<Option<Fill>, Unsafe> {
    if col.generated {
        return Ok(None);
    }
    if col.identity != Identity::None {
        let Some(seq) = &col.sequence else {
            return Err(Unsafe::new(
                format!("{table}.{}", col.name),
                "an identity column whose sequence pgrelay does not know",
            ));
        };
        return Ok(Some(Fill {
            expr: format!("pgrelay.nextval({}::regclass)", quote_literal(seq)),
            generator: true,
            always: col.identity == Identity::Always,
        }));
    }
    let Some(default) = &col.default else {
        return Ok(None);
    };
    let named = |u: Unsafe| Unsafe {
        reason: format!(
            "column {} of {table} defaults to {default}: {}",
            quote_ident(&col.name),
            u.reason
        ),
        construct: u.construct,
    };
    let Some((toks, _)) = tokenize(default, StringMode::Standard) else {
        return Err(named(Unsafe::new(default, "pgrelay cannot read it")));
    };
    let t = Toks::new(default, &toks);
    let mut edits = Vec::new();
    let found = scan(&t, 0, t.len(), Generators::Once, cx, &mut edits).map_err(named)?;
    if edits.is_empty() {
        return Ok(None);
    }
    let Some(expr) = apply(default, edits) else {
        return Err(named(Unsafe::new(default, "pgrelay could not rewrite it")));
    };
    Ok(Some(Fill {
        expr,
        generator: found.generator,
        always: false,
    }))
}

/// The columns whose default each node would compute differently, in table order, with their
/// fills.
pub(super) fn fill_candidates<'c>(
    table: &Table<'c>,
    cx: &Context<'_>,
) -> Vec<(&'c Column, Result<Fill, Unsafe>)> {
    table
        .columns
        .iter()
        .filter_map(|c| match fill(&table.name, c, cx) {
            Ok(None) => None,
            Ok(Some(f)) => Some((c, Ok(f))),
            Err(u) => Some((c, Err(u))),
        })
        .collect()
}

/// The refusal for rows whose defaults would be numbered in an order the follower may not
/// repeat.
pub(super) fn unordered(table: &Table<'_>, col: &Column, what: &str) -> Unsafe {
    Unsafe::new(
        format!("{}.{}", table.name, quote_ident(&col.name)),
        format!("{what} into a table with a sequence or volatile default ({}): the follower may number the rows in another order", quote_ident(&col.name)),
    )
}

/// What an INSERT is.
pub(super) enum Insert {
    /// Into one of the session's temporary tables.
    Temp,
    /// Rewritten (or left as is); `reads`: it reads rows of other relations (for rule 5).
    Done { reads: bool },
}

/// Where an INSERT is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InsertIn {
    /// The statement itself.
    Statement,
    /// The only INSERT of a WITH query: its VALUES run once, in order, so sequences may fill
    /// its columns (the caller scans the rest of the query).
    OnlyInsertOfWith,
    /// One of several writes of a WITH query, which run in no fixed order.
    With,
}

/// Rules 1-4 on `INSERT INTO ...` at tokens `at..to`.
pub(super) fn insert(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    place: InsertIn,
    cx: &Context<'_>,
    edits: &mut Vec<Edit>,
) -> Result<Insert, Unsafe> {
    let in_with = place != InsertIn::Statement;
    let scan_all = |gens, edits: &mut Vec<Edit>| -> Result<Insert, Unsafe> {
        // Inside WITH, the caller scans the whole statement.
        if in_with {
            return Ok(Insert::Done { reads: false });
        }
        let found = scan(t, at, to, gens, cx, edits)?;
        found.check_row_choice()?;
        Ok(Insert::Done {
            reads: found.top_reads || found.subquery_reads,
        })
    };
    if !t.is(at + 1, "into") {
        return scan_all(Generators::PerRow, edits);
    }
    let Some((parts, mut j)) = t.qualified(at + 2) else {
        return scan_all(Generators::PerRow, edits);
    };
    if is_temp(&parts, cx) {
        return Ok(Insert::Temp);
    }
    check_target(&parts, true, cx)?;
    let mut name_end = j - 1;
    if t.is(j, "as") && t.is_name(j + 1) {
        name_end = j + 1;
        j += 2;
    }
    let mut list = None;
    if t.kind(j) == Some(TokenKind::LParen) && !t.opens_query(j) {
        let Some(close) = t.close(j) else {
            return Ok(Insert::Done { reads: false });
        };
        let names: Vec<Option<String>> = t.list_items(j).iter().map(|&(a, _)| t.name(a)).collect();
        list = Some((close, names));
        j = close + 1;
    }
    let mut overriding = None;
    if t.is(j, "overriding") {
        overriding = Some(t.is(j + 1, "system"));
        j += 3;
    }
    let default_values = t.is(j, "default") && t.is(j + 1, "values");
    let values = t.is(j, "values");
    let gens = match (in_with, values || default_values) {
        (false, true) => Generators::Once,
        (false, false) => Generators::Query,
        (true, _) => Generators::PerRow,
    };
    let what = if in_with {
        "INSERT in a WITH query"
    } else {
        "INSERT ... SELECT"
    };
    let Some(table) = resolve_table(&parts, cx) else {
        return scan_all(gens, edits);
    };
    check_triggers(&table, cx)?;
    let candidates = fill_candidates(&table, cx);
    if candidates.is_empty() {
        return scan_all(gens, edits);
    }
    if overriding == Some(false) && candidates.iter().any(|(c, _)| c.identity != Identity::None) {
        return Err(Unsafe::new(
            "OVERRIDING USER VALUE",
            "the identity values would come from each node's own sequence; leave the identity column out instead",
        ));
    }
    let rows = if values {
        values_rows(t, j)
    } else {
        Some(Vec::new())
    };
    let Some(rows) = rows else {
        // Malformed: the server rejects it.
        return scan_all(gens, edits);
    };
    // The columns given, by position.
    let given: Option<Vec<String>> = match &list {
        Some((_, names)) => names.iter().cloned().collect(),
        None if values => {
            let n = rows.first().map_or(0, |(_, _, items)| items.len());
            Some(
                table
                    .columns
                    .iter()
                    .take(n)
                    .map(|c| c.name.clone())
                    .collect(),
            )
        }
        None if default_values => Some(Vec::new()),
        None => None,
    };
    let Some(given) = given else {
        // INSERT ... SELECT without a column list: pgrelay cannot tell which columns it gives.
        return match candidates.first() {
            Some((col, _)) => Err(unordered(&table, col, what)),
            None => scan_all(gens, edits),
        };
    };
    let is_default = |item: &(usize, usize)| item.1 == item.0 + 1 && t.is(item.0, "default");
    // An explicit value for an ALWAYS identity column without OVERRIDING: the server rejects the
    // statement, and adding OVERRIDING SYSTEM VALUE would make it pass.
    for (c, _) in &candidates {
        if c.identity == Identity::Always && overriding.is_none() {
            if let Some(k) = given.iter().position(|g| *g == c.name) {
                if rows
                    .iter()
                    .any(|(_, _, items)| items.get(k).is_some_and(|it| !is_default(it)))
                {
                    return scan_all(gens, edits);
                }
            }
        }
    }
    let mut appended: Vec<(&Column, Fill)> = Vec::new();
    let mut needs_override = false;
    for (col, fill) in candidates {
        let position = given.iter().position(|g| *g == col.name);
        let defaulted = position.is_some_and(|k| {
            rows.iter()
                .any(|(_, _, items)| items.get(k).is_some_and(is_default))
        });
        if position.is_some() && !defaulted {
            continue;
        }
        let fill = fill?;
        let query = !values && !default_values;
        let target_end = if query {
            select_list_end(t, j, to)
        } else {
            None
        };
        if query && target_end.is_none() {
            return Err(if fill.generator {
                unordered(&table, col, what)
            } else {
                Unsafe::new(
                    format!("{}.{}", table.name, quote_ident(&col.name)),
                    format!(
                        "{what} into a table whose column {name} defaults to {default}: pgrelay cannot fill it in; list the column and give it {default} explicitly",
                        name = quote_ident(&col.name),
                        default = col.default.as_deref().unwrap_or("")
                    ),
                )
            });
        }
        let fill_once = match place {
            // A query's values are generated once per row: in a fixed order only for a
            // single SELECT without FROM.
            _ if query => place != InsertIn::With && target_end.is_some_and(|(_, from)| !from),
            InsertIn::Statement => gens == Generators::Once,
            InsertIn::OnlyInsertOfWith => true,
            InsertIn::With => false,
        };
        if fill.generator && !fill_once {
            return Err(unordered(&table, col, what));
        }
        needs_override |= fill.always;
        match position {
            Some(k) => {
                for (_, _, items) in &rows {
                    if let Some(item) = items.get(k).filter(|it| is_default(it)) {
                        edits.push(Edit::replace(
                            t.start(item.0),
                            t.end(item.0),
                            fill.expr.clone(),
                        ));
                    }
                }
            }
            None => appended.push((col, fill)),
        }
    }
    let override_text = if needs_override && overriding.is_none() {
        "OVERRIDING SYSTEM VALUE "
    } else {
        ""
    };
    if default_values {
        if !appended.is_empty() || needs_override {
            let cols: Vec<String> = appended.iter().map(|(c, _)| quote_ident(&c.name)).collect();
            let exprs: Vec<&str> = appended.iter().map(|(_, f)| f.expr.as_str()).collect();
            let text = format!(
                "({}) {override_text}VALUES ({})",
                cols.join(", "),
                exprs.join(", ")
            );
            edits.push(Edit::replace(t.start(j), t.end(j + 1), text));
        }
        return scan_all(gens, edits);
    }
    if !override_text.is_empty() {
        edits.push(Edit::insert(t.start(j), override_text));
    }
    if !appended.is_empty() {
        let names: Vec<String> = appended.iter().map(|(c, _)| quote_ident(&c.name)).collect();
        match &list {
            Some((close, _)) => {
                edits.push(Edit::insert(
                    t.start(*close),
                    format!(", {}", names.join(", ")),
                ));
            }
            None => {
                let mut all: Vec<String> = given.iter().map(|g| quote_ident(g)).collect();
                all.extend(names);
                edits.push(Edit::insert(
                    t.end(name_end),
                    format!(" ({})", all.join(", ")),
                ));
            }
        }
        let exprs: Vec<&str> = appended.iter().map(|(_, f)| f.expr.as_str()).collect();
        let exprs = exprs.join(", ");
        if let Some((last, _)) = select_list_end(t, j, to).filter(|_| !values) {
            edits.push(Edit::insert(t.end(last), format!(", {exprs}")));
        }
        for (open, close, _) in &rows {
            let sep = if *close == open + 1 { "" } else { ", " };
            edits.push(Edit::insert(t.start(*close), format!("{sep}{exprs}")));
        }
    }
    scan_all(gens, edits)
}

/// For `INSERT ... SELECT` with the SELECT at `j`: the index of the last token of its select
/// list, and whether it has a FROM. `None` unless it is one plain SELECT with a non-empty
/// select list (no WITH, UNION, INTERSECT or EXCEPT), where pgrelay can append expressions.
fn select_list_end(t: &Toks<'_>, j: usize, to: usize) -> Option<(usize, bool)> {
    const CLAUSES: &[&str] = &[
        "from",
        "where",
        "group",
        "having",
        "window",
        "order",
        "limit",
        "offset",
        "fetch",
        "for",
        "returning",
        "on",
    ];
    if !t.is(j, "select") {
        return None;
    }
    let mut end = None;
    let mut i = j + 1;
    while i < to.min(t.len()) {
        if t.kind(i) == Some(TokenKind::LParen) {
            i = t.close(i)? + 1;
            continue;
        }
        if t.is_any(i, &["union", "intersect", "except"]) {
            return None;
        }
        // `a IS DISTINCT FROM b`, `SELECT DISTINCT ON (a)`: not clauses.
        let clause = t.is_any(i, CLAUSES)
            && !(t.is(i, "from") && t.is(i - 1, "distinct"))
            && (!t.is(i, "on") || t.is(i + 1, "conflict"));
        if clause && end.is_none() {
            end = Some(i);
        }
        i += 1;
    }
    let end = end.unwrap_or(to.min(t.len()));
    let first = if t.is_any(j + 1, &["all", "distinct"]) {
        j + 2
    } else {
        j + 1
    };
    if end <= first {
        return None;
    }
    let from = t.is(end, "from");
    Some((end - 1, from))
}

/// The rows of `VALUES (...), (...)` at `v`: each row's parentheses and items. `None` if
/// malformed.
type Row = (usize, usize, Vec<(usize, usize)>);

fn values_rows(t: &Toks<'_>, v: usize) -> Option<Vec<Row>> {
    let mut rows = Vec::new();
    let mut j = v + 1;
    loop {
        let close = t.close(j)?;
        rows.push((j, close, t.list_items(j)));
        if t.kind(close + 1) != Some(TokenKind::Comma) {
            return Some(rows);
        }
        j = close + 2;
    }
}

/// `COPY table [(columns)] FROM STDIN`: the defaults of the columns not listed run on each node.
pub(super) fn copy_from(
    table: &Table<'_>,
    listed: Option<&[String]>,
    cx: &Context<'_>,
) -> Result<(), Unsafe> {
    check_triggers(table, cx)?;
    for (col, _) in fill_candidates(table, cx) {
        if !listed.is_some_and(|l| l.contains(&col.name)) {
            return Err(Unsafe::new(
                format!("{}.{}", table.name, quote_ident(&col.name)),
                format!("COPY into a table whose column {} has a sequence or volatile default: the followers would compute it differently; list the column and send its values", quote_ident(&col.name)),
            ));
        }
    }
    Ok(())
}
