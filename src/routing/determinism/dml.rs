//! UPDATE, DELETE, MERGE, queries and WITH (INSERT is in [`super::defaults`], with the column
//! defaults it fills in). See <https://www.postgresql.org/docs/current/dml.html>.

use super::super::lexer::TokenKind;
use super::defaults::{
    self, check_target, check_triggers, fill, insert, is_temp, resolve_table, Insert, InsertIn,
};
use super::expr::{scan, Generators};
use super::tokens::{Edit, Toks};
use super::{serialized, Context, Kind, Unsafe};

/// `UPDATE [ONLY] table ... SET ... [FROM ...]`.
pub(super) fn update(
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
                if !t.is(k, "default") {
                    continue;
                }
                if !eq {
                    // `SET (a, b) = (DEFAULT, ...)`: pgrelay does not map the positions.
                    if let Some((col, _)) = defaults::fill_candidates(&table, cx).first() {
                        return Err(Unsafe::new(
                            "DEFAULT in a multi-column SET",
                            format!("{} has a sequence or volatile default ({}); set the columns one by one", table.name, col.name),
                        ));
                    }
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
    found.check_row_choice()?;
    serialized(
        found.top_reads || found.subquery_reads,
        "UPDATE reading other rows",
        cx,
    )?;
    Ok(Kind::Replicated)
}

/// `DELETE FROM [ONLY] table [USING ...]`.
pub(super) fn delete(
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
    found.check_row_choice()?;
    let using = t.depth0(at, to, "using").is_some();
    serialized(
        using || found.subquery_reads,
        "DELETE reading other rows",
        cx,
    )?;
    Ok(Kind::Replicated)
}

/// `MERGE INTO table USING source ON ... WHEN ... THEN INSERT ...`.
pub(super) fn merge(
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
    scan(t, at, to, Generators::PerRow, cx, edits)?.check_row_choice()?;
    Ok(Kind::Replicated)
}

/// SELECT / VALUES / TABLE, possibly `SELECT ... INTO new_table`.
pub(super) fn query(
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
        found.check_row_choice()?;
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
pub(super) fn with(
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
        if !t.is(k, "insert") {
            // UPDATE [ONLY] x, DELETE FROM [ONLY] x, MERGE INTO [ONLY] x.
            let mut i = if t.is(k, "update") { k + 1 } else { k + 2 };
            if t.is(i, "only") {
                i += 1;
            }
            if let Some((parts, _)) = t.qualified(i) {
                if is_temp(&parts, cx) {
                    temp += 1;
                    continue;
                }
                check_target(&parts, t.is(k, "merge"), cx)?;
                if let Some(table) = resolve_table(&parts, cx) {
                    check_triggers(&table, cx)?;
                }
            }
        }
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
    if writes > 0 {
        found.check_row_choice()?;
    }
    Ok(if writes > 0 || found.generator {
        Kind::Replicated
    } else {
        Kind::Neutral
    })
}
