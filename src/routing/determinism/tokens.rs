//! The tokens of one statement with their matching parentheses, and the edits made to its text.

use super::super::lexer::{Lexer, StringMode, Token, TokenKind};

/// No matching parenthesis.
const NONE: usize = usize::MAX;

/// Postgres truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_IDENT_BYTES: usize = 63;

/// The non-comment tokens of one statement, indexed from 0, with the text they index into.
pub(super) struct Toks<'a> {
    pub sql: &'a str,
    pub toks: &'a [Token],
    /// For a `(` the index of its `)`, and the other way round; [`NONE`] otherwise.
    pair: Vec<usize>,
}

impl<'a> Toks<'a> {
    pub fn new(sql: &'a str, toks: &'a [Token]) -> Self {
        let mut pair = vec![NONE; toks.len()];
        let mut stack = Vec::new();
        for (i, t) in toks.iter().enumerate() {
            match t.kind {
                TokenKind::LParen => stack.push(i),
                TokenKind::RParen => {
                    if let Some(open) = stack.pop() {
                        if let Some(p) = pair.get_mut(open) {
                            *p = i;
                        }
                        if let Some(p) = pair.get_mut(i) {
                            *p = open;
                        }
                    }
                }
                _ => {}
            }
        }
        Toks { sql, toks, pair }
    }

    pub fn len(&self) -> usize {
        self.toks.len()
    }

    pub fn tok(&self, i: usize) -> Option<&'a Token> {
        self.toks.get(i)
    }

    pub fn kind(&self, i: usize) -> Option<TokenKind> {
        self.toks.get(i).map(|t| t.kind)
    }

    pub fn text(&self, i: usize) -> &'a str {
        self.toks.get(i).map_or("", |t| t.text(self.sql))
    }

    pub fn start(&self, i: usize) -> usize {
        self.toks.get(i).map_or(self.sql.len(), |t| t.start)
    }

    pub fn end(&self, i: usize) -> usize {
        self.toks.get(i).map_or(self.sql.len(), |t| t.end)
    }

    /// Token `i` is the keyword `kw` (given in lowercase).
    pub fn is(&self, i: usize, kw: &str) -> bool {
        self.kind(i) == Some(TokenKind::Ident) && self.text(i).eq_ignore_ascii_case(kw)
    }

    pub fn is_any(&self, i: usize, kws: &[&str]) -> bool {
        kws.iter().any(|k| self.is(i, k))
    }

    pub fn is_name(&self, i: usize) -> bool {
        matches!(
            self.kind(i),
            Some(TokenKind::Ident | TokenKind::QuotedIdent)
        )
    }

    /// The `)` matching the `(` at `open`.
    pub fn close(&self, open: usize) -> Option<usize> {
        if self.kind(open) != Some(TokenKind::LParen) {
            return None;
        }
        self.pair.get(open).copied().filter(|&c| c != NONE)
    }

    /// The `(` at `i` opens a subquery.
    pub fn opens_query(&self, i: usize) -> bool {
        self.kind(i) == Some(TokenKind::LParen)
            && self.is_any(i + 1, &["select", "with", "values", "table"])
    }

    /// The first index in `from..to` of the keyword `kw` outside parentheses.
    pub fn depth0(&self, from: usize, to: usize, kw: &str) -> Option<usize> {
        self.depth0_any(from, to, &[kw])
    }

    /// The first index in `from..to` of one of the keywords `kws` outside parentheses.
    pub fn depth0_any(&self, from: usize, to: usize, kws: &[&str]) -> Option<usize> {
        let mut i = from;
        while i < to.min(self.len()) {
            if self.kind(i) == Some(TokenKind::LParen) {
                i = self.close(i).unwrap_or(to) + 1;
                continue;
            }
            if self.is_any(i, kws) {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// The items of the parenthesised list opening at `open`, split at commas outside nested
    /// parentheses: each item as a token range `start..end` (empty for `()`).
    pub fn list_items(&self, open: usize) -> Vec<(usize, usize)> {
        let Some(close) = self.close(open) else {
            return Vec::new();
        };
        split_commas(self, open + 1, close)
    }

    /// The identifier at `i` as Postgres resolves it (see [`ident_value`]).
    pub fn name(&self, i: usize) -> Option<String> {
        self.tok(i).and_then(|t| ident_value(t, self.sql))
    }

    /// A possibly qualified name at `i`: the parts (folded) and the index after it.
    pub fn qualified(&self, mut i: usize) -> Option<(Vec<String>, usize)> {
        let mut parts = Vec::new();
        loop {
            if !self.is_name(i) || parts.len() >= 3 {
                return None;
            }
            parts.push(self.name(i)?);
            if self.kind(i + 1) != Some(TokenKind::Dot) {
                return Some((parts, i + 1));
            }
            i += 2;
        }
    }
}

/// Splits `from..to` at commas outside parentheses.
pub(super) fn split_commas(t: &Toks<'_>, from: usize, to: usize) -> Vec<(usize, usize)> {
    let mut items = Vec::new();
    if from >= to {
        return items;
    }
    let mut start = from;
    let mut i = from;
    while i < to {
        match t.kind(i) {
            Some(TokenKind::LParen) => {
                i = t.close(i).unwrap_or(to);
            }
            Some(TokenKind::Comma) => {
                items.push((start, i));
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    items.push((start, to));
    items
}

/// An identifier as Postgres resolves it: unquoted names fold to lowercase (and are truncated
/// to 63 bytes), quoted names keep their case. `None` for a `U&"…"` name with escapes and for
/// tokens that are not names.
pub(super) fn ident_value(t: &Token, sql: &str) -> Option<String> {
    let text = t.text(sql);
    let value = match t.kind {
        TokenKind::Ident => text.to_ascii_lowercase(),
        TokenKind::QuotedIdent => t.quoted_ident_body(sql)?.replace("\"\"", "\""),
        _ => return None,
    };
    let mut cut = value.len().min(MAX_IDENT_BYTES);
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(value.get(..cut).unwrap_or_default().to_owned())
}

/// The non-comment tokens of `sql`, and whether a plain string held a backslash; `None` if the
/// text does not lex.
pub(super) fn tokenize(sql: &str, mode: StringMode) -> Option<(Vec<Token>, bool)> {
    let mut lexer = Lexer::new(sql, mode);
    let mut toks = Vec::with_capacity(sql.len() / 4 + 4);
    for t in lexer.by_ref() {
        match t.kind {
            TokenKind::Error(_) => return None,
            TokenKind::LineComment | TokenKind::BlockComment => {}
            _ => toks.push(t),
        }
    }
    Some((toks, lexer.backslash_in_plain_string))
}

/// Replaces the bytes `start..end` of the query string with `text` (an insertion when
/// `start == end`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Edit {
    pub start: usize,
    pub end: usize,
    pub text: String,
}

impl Edit {
    pub fn replace(start: usize, end: usize, text: impl Into<String>) -> Self {
        Edit {
            start,
            end,
            text: text.into(),
        }
    }

    pub fn insert(at: usize, text: impl Into<String>) -> Self {
        Self::replace(at, at, text)
    }
}

/// Applies edits to `sql`; `None` if two of them overlap (a bug: the caller refuses the
/// statement rather than run a half-rewritten one).
pub(super) fn apply(sql: &str, mut edits: Vec<Edit>) -> Option<String> {
    edits.sort_by_key(|e| e.start);
    let extra: usize = edits.iter().map(|e| e.text.len()).sum();
    let mut out = String::with_capacity(sql.len() + extra);
    let mut at = 0;
    for e in &edits {
        if e.start < at || e.end < e.start {
            return None;
        }
        out.push_str(sql.get(at..e.start)?);
        out.push_str(&e.text);
        at = e.end;
    }
    out.push_str(sql.get(at..)?);
    Some(out)
}

/// Reserved words that cannot name a column unquoted (Postgres's reserved and
/// type/function-name keywords).
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

/// Quotes an identifier if it needs it, like Postgres's `quote_ident`.
pub(super) fn quote_ident(name: &str) -> String {
    let plain = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'$')
        && !RESERVED.contains(&name);
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Quotes `text` as a SQL string literal.
pub(super) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
