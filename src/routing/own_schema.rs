//! The schema `pgrelay` is pgrelay's own: on the leader it holds the statement log and the
//! function that appends to it, on the followers the applied positions and the keys of the
//! replay connections. A client statement that names an object in it (`pgrelay.x`, also
//! quoted) is refused before it reaches a node, whatever the replication mode, so that no
//! client can forge replication input through pgrelay. `SET`, `RESET` and `SHOW` of
//! `pgrelay.*` are settings, not objects: they stay allowed (pgrelay answers or passes them). (Directly on a node, the grants refuse
//! it: nothing there is writable by other roles.)

use super::lexer::{Lexer, StringMode, TokenKind};

/// The schema's name.
pub const OWN_SCHEMA: &str = "pgrelay";

/// Whether `sql` names an object in schema `pgrelay`: the name followed by a dot, outside
/// strings and comments (read both ways a backslash can be read in a plain string).
pub fn names_own_schema(sql: &str) -> bool {
    // Almost every statement lacks the word: decide that without lexing.
    if !contains_ignore_case(sql.as_bytes(), OWN_SCHEMA.as_bytes()) {
        return false;
    }
    names_in(sql, StringMode::Standard) || names_in(sql, StringMode::Backslash)
}

fn names_in(sql: &str, mode: StringMode) -> bool {
    let mut previous_is_schema = false;
    // At the first token of a statement; in a SET, RESET or SHOW (names there are settings).
    let (mut first, mut setting) = (true, false);
    for token in Lexer::new(sql, mode).filter(|t| !t.is_comment()) {
        if token.kind == TokenKind::Semicolon {
            (first, setting, previous_is_schema) = (true, false, false);
            continue;
        }
        if first {
            first = false;
            let word = token.text(sql);
            setting = token.kind == TokenKind::Ident
                && ["set", "reset", "show"]
                    .iter()
                    .any(|k| word.eq_ignore_ascii_case(k));
        }
        if setting {
            continue;
        }
        if token.kind == TokenKind::Dot && previous_is_schema {
            return true;
        }
        previous_is_schema = match token.kind {
            TokenKind::Ident => token.text(sql).eq_ignore_ascii_case(OWN_SCHEMA),
            TokenKind::QuotedIdent => token.quoted_ident_body(sql) == Some(OWN_SCHEMA),
            _ => false,
        };
    }
    false
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

#[cfg(test)]
mod tests {
    use super::names_own_schema;

    #[test]
    fn qualified_names_in_the_schema_are_found() {
        for sql in [
            "INSERT INTO pgrelay.statement_log VALUES (1)",
            "select PGRELAY.log_append('[]', '[]', null, null)",
            "SELECT \"pgrelay\".log_append()",
            "SELECT * FROM pgrelay . applied",
            "SELECT pgrelay/* c */.now()",
            "UPDATE x SET a = 1; DELETE FROM pgrelay.applied",
            "SET search_path = public; SELECT pgrelay.now()",
        ] {
            assert!(names_own_schema(sql), "{sql}");
        }
    }

    #[test]
    fn other_uses_of_the_word_are_not() {
        for sql in [
            "SELECT 1",
            "SELECT 'pgrelay.applied'",
            "SELECT pgrelay FROM t",
            "SELECT t.pgrelay FROM t",
            "SELECT \"PGRELAY\".x FROM \"PGRELAY\"",
            "-- pgrelay.applied\nSELECT 1",
            "SELECT $$pgrelay.x$$",
            "SHOW pgrelay_consistency",
            "SET pgrelay.consistency = 'eventual'",
            "RESET pgrelay.min_position; SHOW pgrelay.last_write_position",
            "/* pgrelay: leader */ SELECT 1",
        ] {
            assert!(!names_own_schema(sql), "{sql}");
        }
    }
}
