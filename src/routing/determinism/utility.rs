//! Utility statements (DDL, COPY, DO, CALL): most run as they are; some run a query now, name
//! temporary tables, or hide code pgrelay can only check.
//! See <https://www.postgresql.org/docs/current/sql-commands.html>.

use super::super::lexer::TokenKind;
use super::defaults::{check_target, copy_from, is_temp, resolve_table};
use super::expr::{check_body, literal_body, scan, Generators};
use super::tokens::{split_commas, Edit, Toks};
use super::{serialized, Context, Kind, Unsafe};

/// The relation names of `DROP TABLE` / `TRUNCATE` (`[IF EXISTS] [ONLY] a [*], b ...`).
pub(super) fn relations(t: &Toks<'_>, mut i: usize, to: usize) -> Option<Vec<Vec<String>>> {
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
pub(super) fn temp_relations(
    names: Option<Vec<Vec<String>>>,
    cx: &Context<'_>,
) -> Result<Kind, Unsafe> {
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

/// `CALL procedure(args)`: the arguments are rewritten, the body is checked.
pub(super) fn call(
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
pub(super) fn do_block(
    t: &Toks<'_>,
    at: usize,
    to: usize,
    cx: &Context<'_>,
) -> Result<Kind, Unsafe> {
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
pub(super) fn copy(t: &Toks<'_>, at: usize, to: usize, cx: &Context<'_>) -> Result<Kind, Unsafe> {
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

/// `CREATE [OR REPLACE] [GLOBAL|LOCAL] [TEMP|TEMPORARY|UNLOGGED]`: whether the object is
/// temporary and the index of the object type.
pub(super) fn create_prefix(t: &Toks<'_>) -> (bool, usize) {
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
pub(super) fn create(
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
            found.check_row_choice()?;
            serialized(found.top_reads || found.subquery_reads, "CREATE ... AS", cx)?;
        }
    }
    Ok(Kind::Replicated)
}

/// ALTER TABLE: a new column's non-deterministic default (or serial, identity) would give the
/// existing rows different values on each node; `ALTER COLUMN ... TYPE ... USING expr` rewrites
/// every row with `expr`.
pub(super) fn alter(
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
            let mut k = a;
            while k < b {
                if t.is_any(k, SERIAL) {
                    return Err(added(t.text(k)));
                }
                if t.is(k, "identity") && t.is(k.wrapping_sub(1), "as") {
                    return Err(added("GENERATED AS IDENTITY"));
                }
                if t.is(k, "default") {
                    // The expression ends at the next column constraint outside parentheses.
                    let end = t.depth0_any(k + 1, b, CONSTRAINT).unwrap_or(b);
                    let mut scratch = Vec::new();
                    let text = t.sql.get(t.start(k + 1)..t.end(end - 1)).unwrap_or("");
                    match scan(t, k + 1, end, Generators::Once, cx, &mut scratch) {
                        Ok(_) if scratch.is_empty() => {}
                        _ => return Err(added(&format!("DEFAULT {text}"))),
                    }
                    k = end;
                    continue;
                }
                k += 1;
            }
        } else if let Some(u) = (a..b).find(|&k| t.is(k, "using")) {
            scan(t, u + 1, b, Generators::PerRow, cx, edits)?;
        }
    }
    Ok(Kind::Replicated)
}
