//! A small, allocation-free lexer for PostgreSQL SQL text, just precise enough to route statements.
//!
//! It follows the token rules of Postgres's `scan.l` (see
//! <https://www.postgresql.org/docs/current/sql-syntax-lexical.html>): `'…'` strings with `''`
//! escapes, `E'…'` strings with backslash escapes, `$tag$…$tag$` dollar quotes, `"quoted
//! identifiers"`, `--` and nested `/* */` comments, numbers, `$n` parameters and operators.
//! Getting strings, quoted identifiers and comments exactly right is what matters: a `;` or a
//! function name inside them must not be mistaken for real syntax. Everything else (exact number
//! syntax, operator splitting rules) is deliberately loose because the classifier never needs it.
//!
//! Tokens are byte ranges into the input; the lexer never allocates.

/// What a token is. Keywords are [`TokenKind::Ident`]s: Postgres keywords are context dependent,
/// so recognising them is the classifier's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Unquoted identifier or keyword (`select`, `pgbench_accounts`, `a$b`).
    Ident,
    /// `"quoted identifier"` or `U&"…"`.
    QuotedIdent,
    /// `'…'`, `E'…'`, `B'…'`, `X'…'`, `N'…'` or `U&'…'`.
    String,
    /// `$$…$$` or `$tag$…$tag$`.
    DollarString,
    /// `42`, `3.14`, `.5e-3`.
    Number,
    /// `$1`.
    Param,
    /// A run of operator characters (`=`, `<>`, `||`, `->>`).
    Operator,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Semicolon,
    Dot,
    /// `:` (array slices, `:=`).
    Colon,
    /// `::` (type cast).
    DoubleColon,
    /// `-- …` up to the end of the line.
    LineComment,
    /// `/* … */`, possibly nested.
    BlockComment,
    /// A character Postgres rejects outside strings (`\`, `{`, control characters): the server
    /// reports a syntax error, so the classifier need not care.
    Other,
    /// Unterminated string, quoted identifier, dollar quote or comment; the lexer stops here.
    Error(LexError),
}

/// Why lexing stopped early. Postgres rejects such a string as a whole before running any of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LexError {
    #[error("unterminated quoted string")]
    UnterminatedString,
    #[error("unterminated quoted identifier")]
    UnterminatedQuotedIdent,
    #[error("unterminated dollar-quoted string")]
    UnterminatedDollarQuote,
    #[error("unterminated /* comment")]
    UnterminatedComment,
}

/// One token: its kind and its byte range `start..end` in the lexed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: TokenKind,
    pub start: usize,
    pub end: usize,
}

impl Token {
    /// The token's text. Token boundaries always fall on ASCII bytes, so this only returns `""`
    /// if `sql` is not the string the token came from.
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        sql.get(self.start..self.end).unwrap_or("")
    }

    /// A quoted identifier's text between its quotes (`""` still doubled); None for another
    /// kind of token, and for a `U&"…"` name with escapes (not decoded).
    pub fn quoted_ident_body<'a>(&self, sql: &'a str) -> Option<&'a str> {
        if self.kind != TokenKind::QuotedIdent {
            return None;
        }
        let text = self.text(sql);
        let unicode = text.starts_with(['u', 'U']);
        let inner = text
            .trim_start_matches(['u', 'U'])
            .trim_start_matches('&')
            .strip_prefix('"')?
            .strip_suffix('"')?;
        if unicode && inner.contains('\\') {
            return None;
        }
        Some(inner)
    }

    /// Comments carry no syntax (they may carry routing hints later, hence they are tokens).
    pub fn is_comment(&self) -> bool {
        matches!(self.kind, TokenKind::LineComment | TokenKind::BlockComment)
    }
}

/// How plain `'…'` strings treat backslashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMode {
    /// `standard_conforming_strings = on` (the default since Postgres 9.1): a backslash is an
    /// ordinary character.
    Standard,
    /// `standard_conforming_strings = off`: a backslash escapes the next character, as in `E'…'`.
    Backslash,
}

/// Iterator over the tokens of a SQL string. Stops after the first [`TokenKind::Error`].
#[derive(Debug, Clone)]
pub struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    mode: StringMode,
    done: bool,
    /// Set when a plain `'…'` string contained a backslash: its meaning then depends on
    /// `standard_conforming_strings`, which the classifier checks both ways.
    pub backslash_in_plain_string: bool,
}

impl<'a> Lexer<'a> {
    pub fn new(sql: &'a str, mode: StringMode) -> Self {
        Lexer {
            src: sql.as_bytes(),
            pos: 0,
            mode,
            done: false,
            backslash_in_plain_string: false,
        }
    }

    fn at(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn lex(&mut self) -> Option<Token> {
        while self.pos < self.src.len() && is_space(self.at(self.pos)) {
            self.pos += 1;
        }
        let start = self.pos;
        let c = *self.src.get(start)?;
        let next = self.at(start + 1);
        let kind = match c {
            b'-' if next == b'-' => {
                self.pos = memchr2(b'\n', b'\r', self.src, start).unwrap_or(self.src.len());
                TokenKind::LineComment
            }
            b'/' if next == b'*' => self.block_comment(),
            b'\'' => {
                self.pos += 1;
                self.quoted_string(self.mode == StringMode::Backslash, true)
            }
            b'e' | b'E' if next == b'\'' => {
                self.pos += 2;
                self.quoted_string(true, false)
            }
            // B'…', X'…', N'…' and U&'…' can't contain backslash escapes; for U& a backslash
            // starts a Unicode escape, which never swallows the closing quote.
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if next == b'\'' => {
                self.pos += 2;
                self.quoted_string(false, false)
            }
            b'u' | b'U' if next == b'&' && self.at(start + 2) == b'\'' => {
                self.pos += 3;
                self.quoted_string(false, false)
            }
            b'u' | b'U' if next == b'&' && self.at(start + 2) == b'"' => {
                self.pos += 3;
                self.quoted_ident()
            }
            b'"' => {
                self.pos += 1;
                self.quoted_ident()
            }
            b'$' if next.is_ascii_digit() => {
                self.pos += 1;
                self.skip_while(|b| b.is_ascii_digit());
                TokenKind::Param
            }
            b'$' => self.dollar(),
            b'0'..=b'9' => self.number(),
            b'.' if next.is_ascii_digit() => self.number(),
            _ if is_ident_start(c) => {
                self.pos += 1;
                self.skip_while(is_ident_cont);
                TokenKind::Ident
            }
            b'(' => self.single(TokenKind::LParen),
            b')' => self.single(TokenKind::RParen),
            b'[' => self.single(TokenKind::LBracket),
            b']' => self.single(TokenKind::RBracket),
            b',' => self.single(TokenKind::Comma),
            b';' => self.single(TokenKind::Semicolon),
            b'.' => self.single(TokenKind::Dot),
            b':' if next == b':' => {
                self.pos += 2;
                TokenKind::DoubleColon
            }
            b':' => self.single(TokenKind::Colon),
            _ if is_op_char(c) => self.operator(),
            _ => self.single(TokenKind::Other),
        };
        if let TokenKind::Error(_) = kind {
            self.done = true;
        }
        Some(Token {
            kind,
            start,
            end: self.pos,
        })
    }

    fn single(&mut self, kind: TokenKind) -> TokenKind {
        self.pos += 1;
        kind
    }

    fn skip_while(&mut self, f: impl Fn(u8) -> bool) {
        while self.pos < self.src.len() && f(self.at(self.pos)) {
            self.pos += 1;
        }
    }

    fn block_comment(&mut self) -> TokenKind {
        self.pos += 2;
        let mut depth = 1u32;
        while self.pos < self.src.len() {
            match (self.at(self.pos), self.at(self.pos + 1)) {
                (b'/', b'*') => {
                    depth += 1;
                    self.pos += 2;
                }
                (b'*', b'/') => {
                    depth -= 1;
                    self.pos += 2;
                    if depth == 0 {
                        return TokenKind::BlockComment;
                    }
                }
                _ => self.pos += 1,
            }
        }
        TokenKind::Error(LexError::UnterminatedComment)
    }

    /// After the opening quote. `backslash`: a backslash escapes the next byte. `plain`: this is
    /// a plain `'…'` string, whose backslashes are remembered.
    fn quoted_string(&mut self, backslash: bool, plain: bool) -> TokenKind {
        while self.pos < self.src.len() {
            match self.at(self.pos) {
                b'\'' if self.at(self.pos + 1) == b'\'' => self.pos += 2,
                b'\'' => {
                    self.pos += 1;
                    return TokenKind::String;
                }
                b'\\' => {
                    if plain {
                        self.backslash_in_plain_string = true;
                    }
                    self.pos += if backslash { 2 } else { 1 };
                }
                _ => self.pos += 1,
            }
        }
        self.pos = self.src.len();
        TokenKind::Error(LexError::UnterminatedString)
    }

    /// After the opening `"`.
    fn quoted_ident(&mut self) -> TokenKind {
        while self.pos < self.src.len() {
            if self.at(self.pos) == b'"' {
                if self.at(self.pos + 1) == b'"' {
                    self.pos += 2;
                    continue;
                }
                self.pos += 1;
                return TokenKind::QuotedIdent;
            }
            self.pos += 1;
        }
        TokenKind::Error(LexError::UnterminatedQuotedIdent)
    }

    /// At a `$` not followed by a digit: a dollar quote `$tag$…$tag$`, or a stray `$`.
    fn dollar(&mut self) -> TokenKind {
        let start = self.pos;
        let mut end = start + 1;
        // A tag is an identifier without `$`, and cannot start with a digit.
        if is_ident_start(self.at(end)) {
            end += 1;
            while is_ident_cont(self.at(end)) && self.at(end) != b'$' {
                end += 1;
            }
        }
        if self.at(end) != b'$' {
            self.pos = start + 1;
            return TokenKind::Other;
        }
        let tag = self.src.get(start..=end).unwrap_or_default();
        let body = end + 1;
        match find(self.src.get(body..).unwrap_or_default(), tag) {
            Some(i) => {
                self.pos = body + i + tag.len();
                TokenKind::DollarString
            }
            None => {
                self.pos = self.src.len();
                TokenKind::Error(LexError::UnterminatedDollarQuote)
            }
        }
    }

    fn number(&mut self) -> TokenKind {
        self.skip_while(|b| b.is_ascii_digit());
        // `1..2` does not occur in SQL, but `a[1:2]` and `1.` do; only take a `.` that is not
        // the start of a `..`.
        if self.at(self.pos) == b'.' && self.at(self.pos + 1) != b'.' {
            self.pos += 1;
            self.skip_while(|b| b.is_ascii_digit());
        }
        if matches!(self.at(self.pos), b'e' | b'E') {
            let sign = usize::from(matches!(self.at(self.pos + 1), b'+' | b'-'));
            if self.at(self.pos + 1 + sign).is_ascii_digit() {
                self.pos += 1 + sign;
                self.skip_while(|b| b.is_ascii_digit());
            }
        }
        TokenKind::Number
    }

    /// A run of operator characters; a `--` or `/*` inside it starts a comment, as in Postgres.
    fn operator(&mut self) -> TokenKind {
        self.pos += 1;
        while self.pos < self.src.len() {
            let c = self.at(self.pos);
            let n = self.at(self.pos + 1);
            if !is_op_char(c) || (c == b'-' && n == b'-') || (c == b'/' && n == b'*') {
                break;
            }
            self.pos += 1;
        }
        TokenKind::Operator
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        if self.done {
            return None;
        }
        self.lex()
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

/// Postgres treats every non-ASCII byte as an identifier letter, so multi-byte UTF-8 characters
/// never split a token and token boundaries stay on ASCII bytes.
fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn is_op_char(b: u8) -> bool {
    matches!(
        b,
        b'~' | b'!'
            | b'@'
            | b'#'
            | b'^'
            | b'&'
            | b'|'
            | b'`'
            | b'?'
            | b'+'
            | b'-'
            | b'*'
            | b'/'
            | b'%'
            | b'<'
            | b'>'
            | b'='
    )
}

fn memchr2(a: u8, b: u8, hay: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .iter()
        .position(|&c| c == a || c == b)
        .map(|i| i + from)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn lex(sql: &str) -> Vec<(TokenKind, &str)> {
        Lexer::new(sql, StringMode::Standard)
            .map(|t| (t.kind, t.text(sql)))
            .collect()
    }

    fn one(sql: &str) -> TokenKind {
        let toks = lex(sql);
        assert_eq!(toks.len(), 1, "{sql:?} -> {toks:?}");
        assert_eq!(toks[0].1, sql);
        toks[0].0
    }

    use TokenKind as K;

    #[test]
    fn each_token_kind() {
        assert_eq!(one("select"), K::Ident);
        assert_eq!(one("a$b_1"), K::Ident);
        assert_eq!(one("tëst"), K::Ident);
        assert_eq!(one(r#""Quoted "" id""#), K::QuotedIdent);
        assert_eq!(one(r#"U&"d\0061t""#), K::QuotedIdent);
        assert_eq!(one("'it''s'"), K::String);
        assert_eq!(one(r"'back\'"), K::String);
        assert_eq!(one(r"E'it\'s'"), K::String);
        assert_eq!(one(r"e'a\\'"), K::String);
        assert_eq!(one("B'0101'"), K::String);
        assert_eq!(one("X'ff'"), K::String);
        assert_eq!(one("N'x'"), K::String);
        assert_eq!(one(r"U&'d\0061t'"), K::String);
        assert_eq!(one("$$a;b$$"), K::DollarString);
        assert_eq!(one("$fn$ $$ ; $x$ $fn$"), K::DollarString);
        assert_eq!(one("42"), K::Number);
        assert_eq!(one("3.14"), K::Number);
        assert_eq!(one(".5e-3"), K::Number);
        assert_eq!(one("1e10"), K::Number);
        assert_eq!(one("$1"), K::Param);
        assert_eq!(one("<>"), K::Operator);
        assert_eq!(one("->>"), K::Operator);
        assert_eq!(one("("), K::LParen);
        assert_eq!(one(")"), K::RParen);
        assert_eq!(one("["), K::LBracket);
        assert_eq!(one("]"), K::RBracket);
        assert_eq!(one(","), K::Comma);
        assert_eq!(one(";"), K::Semicolon);
        assert_eq!(one("."), K::Dot);
        assert_eq!(one(":"), K::Colon);
        assert_eq!(one("::"), K::DoubleColon);
        assert_eq!(one("-- to the end"), K::LineComment);
        assert_eq!(one("/* a /* nested */ ; */"), K::BlockComment);
        assert_eq!(one("\\"), K::Other);
        assert_eq!(one("{"), K::Other);
    }

    #[test]
    fn errors_stop_lexing() {
        let e = |sql: &str| lex(sql).last().map(|t| t.0);
        assert_eq!(
            e("select 'abc"),
            Some(K::Error(LexError::UnterminatedString))
        );
        assert_eq!(
            e(r"select E'abc\'"),
            Some(K::Error(LexError::UnterminatedString))
        );
        assert_eq!(
            e("select \"abc"),
            Some(K::Error(LexError::UnterminatedQuotedIdent))
        );
        assert_eq!(
            e("$$ unterminated"),
            Some(K::Error(LexError::UnterminatedDollarQuote))
        );
        assert_eq!(
            e("/* /* */ x"),
            Some(K::Error(LexError::UnterminatedComment))
        );
    }

    #[test]
    fn statement_text() {
        let toks = lex("SELECT a.b::int, f($1) FROM t--c\nWHERE x>=.5;");
        let kinds: Vec<_> = toks.iter().map(|t| t.0).collect();
        assert_eq!(
            kinds,
            vec![
                K::Ident,
                K::Ident,
                K::Dot,
                K::Ident,
                K::DoubleColon,
                K::Ident,
                K::Comma,
                K::Ident,
                K::LParen,
                K::Param,
                K::RParen,
                K::Ident,
                K::Ident,
                K::LineComment,
                K::Ident,
                K::Ident,
                K::Operator,
                K::Number,
                K::Semicolon,
            ]
        );
        // A comment start ends an operator run.
        assert_eq!(lex("a+/*c*/b")[1], (K::Operator, "+"));
        assert_eq!(lex("1--c")[1], (K::LineComment, "--c"));
        // Identifiers may contain `$`, so this is not a dollar quote.
        assert_eq!(lex("a$$b"), vec![(K::Ident, "a$$b")]);
        // A stray `$` is not a dollar quote either.
        assert_eq!(lex("$ x")[0], (K::Other, "$"));
    }

    #[test]
    fn string_modes() {
        let sql = r"'a\'', x";
        let mut std = Lexer::new(sql, StringMode::Standard);
        assert_eq!(
            std.next().unwrap().kind,
            K::Error(LexError::UnterminatedString)
        );
        assert!(std.backslash_in_plain_string);
        let bs: Vec<_> = Lexer::new(sql, StringMode::Backslash).collect();
        assert_eq!(bs[0].text(sql), r"'a\''");
        assert_eq!(bs[1].kind, K::Comma);
        assert_eq!(bs[2].text(sql), "x");
    }
}
