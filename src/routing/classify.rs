//! Statement classification for routing: is a query string a read a hot standby can serve, does
//! it write, open a transaction, change session state or pin the session to the leader?
//!
//! This runs for every query, so the common case is decided from the token stream of
//! [`super::lexer`] without building a syntax tree and without allocating per token. `sqlparser`
//! is only consulted when the tokens leave doubt (a `WITH` query mentioning a DML keyword in a
//! place that could be a column name). Whatever cannot be classified is a write, which is always
//! safe: the leader can run everything.
//!
//! A simple-protocol query string may hold several statements separated by `;`
//! (<https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-MULTI-STATEMENT>);
//! they are split with the lexer, so a `;` inside a string, comment or dollar quote never splits.

use std::collections::HashSet;

use sqlparser::ast::{Query, SetExpr, Statement};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

pub use super::functions::WRITING_FUNCTIONS_SQL;
use super::functions::{BUILTIN_WRITING_FUNCTIONS, PINNING_FUNCTIONS, WRITING_FUNCTION_PREFIXES};
use super::lexer::{LexError, Lexer, StringMode, Token, TokenKind};

/// EXPLAIN and PREPARE classify the statement they wrap; this bounds the recursion on input
/// like `EXPLAIN EXPLAIN EXPLAIN …`, which Postgres rejects anyway.
const MAX_NESTING: u32 = 4;

/// Postgres truncates identifiers to NAMEDATALEN - 1 bytes.
const MAX_IDENT_BYTES: usize = 63;

/// Classifies SQL strings. Cheap to share: classification takes `&self`.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Lowercase names of functions whose call makes a statement a write.
    writing_functions: HashSet<Box<str>>,
    /// Statement mode: the database's volatile functions and column defaults.
    catalog: std::sync::Arc<super::determinism::Catalog>,
    /// The catalog was loaded from the leader (not the empty default).
    catalog_loaded: bool,
}

/// What a query string does, as far as routing cares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Classification {
    /// Every statement is a read that a read-only hot standby can serve.
    pub read_only: bool,
    /// The string starts a transaction block (BEGIN / START TRANSACTION).
    pub begin: Option<Begin>,
    /// Session-level state changes in order, each with its own statement text, to replay on the
    /// session's other nodes.
    pub session_changes: Vec<SessionChange>,
    /// The session must stay on the leader from now on (temporary objects, LISTEN, holdable
    /// cursors, session advisory locks).
    pub pins_leader: bool,
    /// DML, DDL or a writing function: the session has written (for read-your-writes).
    pub writes: bool,
    /// Names of SQL-level prepared statements run by `EXECUTE name(...)`; the caller knows
    /// whether they are reads. `read_only` counts an EXECUTE as a read when its arguments call
    /// no writing function, so the caller must also require every executed statement to be a read.
    pub executes: Vec<String>,
    /// A statement ends the open transaction block (COMMIT, END, ROLLBACK, ABORT, PREPARE
    /// TRANSACTION; not ROLLBACK TO SAVEPOINT).
    pub ends_transaction: bool,
    /// A statement may be DDL that row-mode replication must see: it starts with CREATE, ALTER,
    /// DROP, COMMENT, GRANT, REVOKE, SECURITY, REFRESH, IMPORT or REASSIGN, or is a query with
    /// INTO (possibly inside EXPLAIN ANALYZE or PREPARE). Decided from the first keyword only;
    /// [`super::ddl`] looks closer.
    pub ddl: bool,
    /// The string did not lex, or the parser could not settle a statement the tokens left in
    /// doubt: it is treated as a write (and so runs on the leader) only because pgrelay could
    /// not tell. Counted in `pgrelay_parse_failures_total`.
    pub parse_failed: bool,
}

/// A `BEGIN` / `START TRANSACTION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// Declared `READ ONLY`, so the whole transaction may run on a follower.
    pub read_only: bool,
}

/// One statement that changes session state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionChange {
    /// The statement's original text (without the separating `;`), ready to replay.
    pub text: String,
    pub op: SessionOp,
}

/// The kind of session state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionOp {
    /// `SET [SESSION] name TO/= value`, `SET ROLE` ("role"), `SET SESSION AUTHORIZATION`
    /// ("session_authorization"), `SET TIME ZONE` ("timezone"), `SET SCHEMA` ("search_path"),
    /// `SET NAMES` ("client_encoding"), `SET XML OPTION` ("xmloption"). Names are lowercase.
    Set { name: String },
    /// `RESET name`, with the same name mapping as `Set`.
    Reset { name: String },
    /// `RESET ALL`.
    ResetAll,
    /// `PREPARE name [(types)] AS stmt`; `read_only` classifies the body.
    Prepare { name: String, read_only: bool },
    /// `DEALLOCATE [PREPARE] name`.
    Deallocate { name: String },
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
    /// `DISCARD ALL | PLANS | SEQUENCES | TEMP`; `DISCARD ALL` also drops prepared statements.
    Discard,
    /// Anything else session-scoped, e.g. `SET SESSION CHARACTERISTICS AS TRANSACTION ...`,
    /// `LOAD`.
    Other,
}

impl Default for Classifier {
    /// Knows the built-in writing functions only.
    fn default() -> Self {
        Self::new(std::iter::empty())
    }
}

impl Classifier {
    /// `writing_functions`: extra function names (lowercase, unqualified) loaded from the
    /// leader's `pg_proc` with [`WRITING_FUNCTIONS_SQL`] that must run on the leader.
    pub fn new(writing_functions: impl IntoIterator<Item = String>) -> Self {
        let mut set: HashSet<Box<str>> = BUILTIN_WRITING_FUNCTIONS
            .iter()
            .map(|f| Box::from(*f))
            .collect();
        set.extend(
            writing_functions
                .into_iter()
                .map(|f| f.to_ascii_lowercase().into_boxed_str()),
        );
        Classifier {
            writing_functions: set,
            catalog: std::sync::Arc::default(),
            catalog_loaded: false,
        }
    }

    /// The same classifier with the database's catalog for statement mode.
    pub fn with_catalog(mut self, catalog: super::determinism::Catalog) -> Self {
        self.catalog = std::sync::Arc::new(catalog);
        self.catalog_loaded = true;
        self
    }

    /// Whether [`Classifier::with_catalog`] gave it the database's catalog.
    pub fn has_catalog(&self) -> bool {
        self.catalog_loaded
    }

    pub fn catalog(&self) -> std::sync::Arc<super::determinism::Catalog> {
        self.catalog.clone()
    }

    /// Classifies a query string of one or more statements.
    pub fn classify(&self, sql: &str) -> Classification {
        let Ok((standard, ambiguous)) = self.classify_mode(sql, StringMode::Standard) else {
            return Classification::unclassifiable();
        };
        if !ambiguous {
            return standard;
        }
        // A plain string held a backslash, so what the server sees depends on the session's
        // standard_conforming_strings. The result must be safe under both readings: with it
        // off, `'a\'; DELETE …'` hides or reveals statements. A reading that does not lex is
        // harmless: the server would reject the whole string before running any of it.
        let Ok((legacy, _)) = self.classify_mode(sql, StringMode::Backslash) else {
            return standard;
        };
        Classification {
            read_only: standard.read_only && legacy.read_only,
            writes: standard.writes || legacy.writes,
            pins_leader: standard.pins_leader || legacy.pins_leader,
            ddl: standard.ddl || legacy.ddl,
            parse_failed: standard.parse_failed || legacy.parse_failed,
            ..standard
        }
    }

    /// Returns the classification and whether a plain string contained a backslash.
    fn classify_mode(
        &self,
        sql: &str,
        mode: StringMode,
    ) -> Result<(Classification, bool), LexError> {
        let (tokens, ambiguous) = tokenize(sql, mode)?;
        let mut out = Classification {
            read_only: true,
            ..Classification::default()
        };
        for stmt in Statements::new(sql, &tokens) {
            let st = self.statement(stmt, 0);
            out.read_only &= st.read;
            out.writes |= st.writes;
            out.pins_leader |= st.pins;
            out.ends_transaction |= st.ends_transaction;
            out.ddl |= st.ddl;
            out.parse_failed |= st.parse_failed;
            if out.begin.is_none() {
                out.begin = st.begin;
            }
            if let Some(op) = st.session {
                out.session_changes.push(SessionChange {
                    text: stmt.text().to_owned(),
                    op,
                });
            }
            if let Some(name) = st.execute {
                out.executes.push(name);
            }
        }
        Ok((out, ambiguous))
    }

    fn statement(&self, s: Toks<'_>, depth: u32) -> Stmt {
        if depth > MAX_NESTING {
            return Stmt::write();
        }
        let mut buf = [0u8; 16];
        let first = if s.kind(0) == Some(TokenKind::LParen) {
            "("
        } else {
            match s.word(0).and_then(|w| lower(w, &mut buf)) {
                Some(w) => w,
                None => return Stmt::write(),
            }
        };
        match first {
            "select" | "values" | "table" => self.query(s, false),
            // Only a top-level WITH (possibly parenthesised) may hold INSERT/UPDATE/DELETE/MERGE.
            "with" | "(" => self.query(s, true),
            "show" => Stmt::read(),
            "explain" => self.explain(s, depth),
            "begin" => begin(s),
            "start" if s.is(1, "transaction") => begin(s),
            // Transaction control, including COMMIT/ROLLBACK PREPARED and ROLLBACK TO: it neither
            // reads nor writes by itself.
            "commit" | "end" | "rollback" | "abort" | "savepoint" | "release" => Stmt {
                // The statements that end the open transaction block (not ROLLBACK TO a savepoint).
                ends_transaction: matches!(first, "commit" | "end" | "abort")
                    || (first == "rollback" && !s.is(1, "to")),
                ..Stmt::default()
            },
            "prepare" if s.is(1, "transaction") => Stmt {
                ends_transaction: true,
                ..Stmt::default()
            },
            "prepare" => self.prepare(s, depth),
            "execute" => self.execute(s),
            "deallocate" => deallocate(s),
            "set" => set(s),
            "reset" => reset(s),
            "discard" => discard(s),
            "load" => Stmt::session(SessionOp::Other),
            "listen" => Stmt {
                pins: true,
                ..Stmt::default()
            },
            // Cursors live in the transaction on the leader; LOCK and CHECKPOINT change no data.
            "unlisten" | "fetch" | "move" | "close" | "lock" | "checkpoint" => Stmt::default(),
            "declare" => self.declare(s),
            "create" => Stmt {
                ddl: true,
                ..self.create(s)
            },
            "copy" => self.copy(s, depth),
            _ => Stmt {
                writes: true,
                pins: self.calls(s).pins,
                ddl: matches!(
                    first,
                    "alter"
                        | "drop"
                        | "comment"
                        | "grant"
                        | "revoke"
                        | "security"
                        | "refresh"
                        | "import"
                        | "reassign"
                ),
                ..Stmt::default()
            },
        }
    }

    /// SELECT / VALUES / TABLE / WITH: a read unless something in it writes or locks.
    /// `dml_possible`: a DML keyword may start a data-modifying CTE or the main statement.
    fn query(&self, s: Toks<'_>, dml_possible: bool) -> Stmt {
        let mut st = Stmt::read();
        let mut doubt = false;
        let mut buf = [0u8; 16];
        for (i, t) in s.toks.iter().enumerate() {
            match t.kind {
                TokenKind::Ident | TokenKind::QuotedIdent
                    if s.kind(i + 1) == Some(TokenKind::LParen) =>
                {
                    let call = self.call(t, s.sql);
                    st.read &= !call.writes;
                    st.writes |= call.writes;
                    st.pins |= call.pins;
                }
                TokenKind::Ident => match lower(t.text(s.sql), &mut buf) {
                    // SELECT … INTO creates a table.
                    Some("into") => {
                        st.read = false;
                        st.writes = true;
                        st.ddl = true;
                        st.pins |= s.is(i + 1, "temp") || s.is(i + 1, "temporary");
                    }
                    Some("for") if locking_clause(s, i + 1) => st.read = false,
                    Some("insert" | "update" | "delete" | "merge") if dml_possible => {
                        let prev = i.checked_sub(1).and_then(|p| s.toks.get(p));
                        match prev.map(|p| p.kind) {
                            // `t.update` is a column.
                            Some(TokenKind::Dot) => {}
                            // `AS (DELETE`, `MATERIALIZED (…`, `) INSERT` after the CTE list.
                            Some(TokenKind::LParen | TokenKind::RParen) => {
                                st.read = false;
                                st.writes = true;
                            }
                            _ if s.is(i.wrapping_sub(1), "materialized") => {
                                st.read = false;
                                st.writes = true;
                            }
                            // Possibly a column named `update`: let the parser decide.
                            _ => doubt = true,
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        if st.read && doubt {
            let verdict = parser_says_read(s.text());
            if verdict != Some(true) {
                st.read = false;
                st.writes = true;
                st.parse_failed = verdict.is_none();
            }
        }
        st
    }

    /// Whether calling the function named by `name_tok` (followed by `(`) writes or pins.
    fn call(&self, name_tok: &Token, sql: &str) -> Call {
        let mut buf = [0u8; MAX_IDENT_BYTES];
        let Some(name) = fold_ident(name_tok, sql, &mut buf) else {
            // A U&"…" name with escapes: we cannot tell which function it is.
            return Call {
                writes: true,
                pins: false,
            };
        };
        let writes = self.writing_functions.contains(name)
            || WRITING_FUNCTION_PREFIXES
                .iter()
                .any(|p| name.starts_with(p));
        Call {
            writes,
            pins: writes && PINNING_FUNCTIONS.contains(&name),
        }
    }

    /// Writing or pinning function calls anywhere in a statement.
    fn calls(&self, s: Toks<'_>) -> Call {
        let mut out = Call::default();
        for (i, t) in s.toks.iter().enumerate() {
            if matches!(t.kind, TokenKind::Ident | TokenKind::QuotedIdent)
                && s.kind(i + 1) == Some(TokenKind::LParen)
            {
                let c = self.call(t, s.sql);
                out.writes |= c.writes;
                out.pins |= c.pins;
            }
        }
        out
    }

    /// `EXPLAIN [ANALYZE] [VERBOSE] stmt` or `EXPLAIN (options) stmt`: only ANALYZE runs it.
    fn explain(&self, s: Toks<'_>, depth: u32) -> Stmt {
        let mut i = 1;
        let mut analyze = false;
        if s.kind(1) == Some(TokenKind::LParen) {
            let Some(close) = s.close_paren(1) else {
                return Stmt::write();
            };
            for j in 2..close {
                if s.is(j, "analyze") || s.is(j, "analyse") {
                    let off = s.is(j + 1, "false")
                        || s.is(j + 1, "off")
                        || s.is(j + 1, "no")
                        || s.toks.get(j + 1).is_some_and(|t| t.text(s.sql) == "0");
                    analyze |= !off;
                }
            }
            i = close + 1;
        } else {
            if s.is(i, "analyze") || s.is(i, "analyse") {
                analyze = true;
                i += 1;
            }
            if s.is(i, "verbose") {
                i += 1;
            }
        }
        let inner = self.statement(s.from(i), depth + 1);
        Stmt {
            read: inner.read,
            writes: analyze && inner.writes,
            pins: analyze && inner.pins,
            ddl: analyze && inner.ddl,
            parse_failed: inner.parse_failed,
            ..Stmt::default()
        }
    }

    /// `PREPARE name [(types)] AS stmt`, or `PREPARE TRANSACTION 'gid'` (two-phase commit).
    fn prepare(&self, s: Toks<'_>, depth: u32) -> Stmt {
        if s.is(1, "transaction") && s.kind(2) == Some(TokenKind::String) {
            return Stmt::default();
        }
        let Some(name) = object_name(s, 1) else {
            return Stmt::write();
        };
        let mut i = 2;
        if s.kind(i) == Some(TokenKind::LParen) {
            match s.close_paren(i) {
                Some(close) => i = close + 1,
                None => return Stmt::write(),
            }
        }
        if !s.is(i, "as") {
            return Stmt::write();
        }
        // Preparing runs nothing: the body's writes count when it is executed.
        let body = self.statement(s.from(i + 1), depth + 1);
        Stmt {
            ddl: body.ddl,
            parse_failed: body.parse_failed,
            ..Stmt::session(SessionOp::Prepare {
                name,
                read_only: body.read,
            })
        }
    }

    /// `EXECUTE name [(args)]`: the caller decides by the prepared statement; the arguments may
    /// still call writing functions.
    fn execute(&self, s: Toks<'_>) -> Stmt {
        let Some(name) = object_name(s, 1) else {
            return Stmt::write();
        };
        let args = self.calls(s.from(2));
        Stmt {
            // A read as far as this text goes; the caller also checks the prepared statement.
            read: !args.writes && !args.pins,
            writes: args.writes,
            pins: args.pins,
            execute: Some(name),
            ..Stmt::default()
        }
    }

    /// `DECLARE name … CURSOR [WITH HOLD] FOR query`: a holdable cursor outlives the transaction
    /// on the leader.
    fn declare(&self, s: Toks<'_>) -> Stmt {
        let mut hold = false;
        for i in 1..s.toks.len() {
            if s.is(i, "for") {
                break;
            }
            hold |= s.is(i, "with") && s.is(i + 1, "hold");
        }
        let calls = self.calls(s);
        Stmt {
            writes: calls.writes,
            pins: hold || calls.pins,
            ..Stmt::default()
        }
    }

    /// CREATE is DDL; temporary objects exist only in the leader session.
    fn create(&self, s: Toks<'_>) -> Stmt {
        let mut i = 1;
        if s.is(1, "or") && s.is(2, "replace") {
            i = 3;
        }
        if s.is(i, "global") || s.is(i, "local") {
            i += 1;
        }
        let temp_keyword = s.is(i, "temp") || s.is(i, "temporary");
        // `CREATE TABLE pg_temp.t` is a temporary table too.
        let temp_schema = s.toks.iter().enumerate().any(|(j, t)| {
            matches!(t.kind, TokenKind::Ident | TokenKind::QuotedIdent)
                && s.kind(j + 1) == Some(TokenKind::Dot)
                && t.text(s.sql)
                    .trim_start_matches('"')
                    .get(..7)
                    .is_some_and(|p| p.eq_ignore_ascii_case("pg_temp"))
        });
        Stmt {
            writes: true,
            pins: temp_keyword || temp_schema || self.calls(s).pins,
            ..Stmt::default()
        }
    }

    /// COPY stays on the leader; only COPY … FROM (or a data-modifying query in COPY (…) TO)
    /// writes.
    fn copy(&self, s: Toks<'_>, depth: u32) -> Stmt {
        let calls = self.calls(s);
        let to = s.depth0_word(1, "to");
        let writes = if !to {
            true
        } else if s.kind(1) == Some(TokenKind::LParen) {
            match s.close_paren(1) {
                Some(close) => self.statement(s.range(2, close), depth + 1).writes,
                None => true,
            }
        } else {
            calls.writes
        };
        Stmt {
            writes: writes || calls.writes,
            pins: calls.pins,
            ..Stmt::default()
        }
    }
}

impl Classification {
    /// A string that does not lex: a write, which the leader will reject as a whole.
    fn unclassifiable() -> Self {
        Classification {
            writes: true,
            parse_failed: true,
            ..Classification::default()
        }
    }
}

/// Splits a query string into its statements' text (without separators, surrounding
/// whitespace or leading comments), as the server would execute them one by one.
pub fn split_statements(sql: &str) -> Result<Vec<&str>, LexError> {
    Ok(statement_spans(sql, StringMode::Standard)?
        .into_iter()
        .map(|(a, b)| sql.get(a..b).unwrap_or(""))
        .collect())
}

/// The byte ranges of the statements [`split_statements`] returns, with plain strings read
/// in `mode`.
pub fn statement_spans(sql: &str, mode: StringMode) -> Result<Vec<(usize, usize)>, LexError> {
    let (tokens, _) = tokenize(sql, mode)?;
    Ok(Statements::new(sql, &tokens).map(|s| s.span()).collect())
}

/// The non-comment tokens of `sql`, and whether a plain string contained a backslash.
fn tokenize(sql: &str, mode: StringMode) -> Result<(Vec<Token>, bool), LexError> {
    let mut lexer = Lexer::new(sql, mode);
    // One allocation per query string; a token is rarely shorter than 4 bytes with its space.
    let mut tokens = Vec::with_capacity(sql.len() / 4 + 4);
    for t in lexer.by_ref() {
        match t.kind {
            TokenKind::Error(e) => return Err(e),
            TokenKind::LineComment | TokenKind::BlockComment => {}
            _ => tokens.push(t),
        }
    }
    Ok((tokens, lexer.backslash_in_plain_string))
}

/// What one statement does.
#[derive(Debug, Default)]
struct Stmt {
    read: bool,
    writes: bool,
    pins: bool,
    begin: Option<Begin>,
    session: Option<SessionOp>,
    execute: Option<String>,
    ends_transaction: bool,
    ddl: bool,
    /// The parser failed on a statement the tokens left in doubt.
    parse_failed: bool,
}

impl Stmt {
    fn read() -> Self {
        Stmt {
            read: true,
            ..Stmt::default()
        }
    }

    fn write() -> Self {
        Stmt {
            writes: true,
            ..Stmt::default()
        }
    }

    fn session(op: SessionOp) -> Self {
        Stmt {
            session: Some(op),
            ..Stmt::default()
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Call {
    writes: bool,
    pins: bool,
}

/// The tokens of one statement (comments removed), with the text they index into.
#[derive(Debug, Clone, Copy)]
struct Toks<'a> {
    sql: &'a str,
    toks: &'a [Token],
}

impl<'a> Toks<'a> {
    fn kind(&self, i: usize) -> Option<TokenKind> {
        self.toks.get(i).map(|t| t.kind)
    }

    /// The text of token `i` if it is an unquoted identifier or keyword.
    fn word(&self, i: usize) -> Option<&'a str> {
        self.toks
            .get(i)
            .filter(|t| t.kind == TokenKind::Ident)
            .map(|t| t.text(self.sql))
    }

    /// Token `i` is the keyword `kw` (given in lowercase).
    fn is(&self, i: usize, kw: &str) -> bool {
        self.word(i).is_some_and(|w| w.eq_ignore_ascii_case(kw))
    }

    fn from(&self, i: usize) -> Toks<'a> {
        Toks {
            sql: self.sql,
            toks: self.toks.get(i..).unwrap_or_default(),
        }
    }

    fn range(&self, start: usize, end: usize) -> Toks<'a> {
        Toks {
            sql: self.sql,
            toks: self.toks.get(start..end).unwrap_or_default(),
        }
    }

    /// The original text from the first to the last token.
    fn text(&self) -> &'a str {
        let (a, b) = self.span();
        self.sql.get(a..b).unwrap_or("")
    }

    /// Byte range from the first to the last token.
    fn span(&self) -> (usize, usize) {
        match (self.toks.first(), self.toks.last()) {
            (Some(a), Some(b)) => (a.start, b.end),
            _ => (0, 0),
        }
    }

    /// Index of the `)` matching the `(` at `open`.
    fn close_paren(&self, open: usize) -> Option<usize> {
        let mut depth = 0usize;
        for (i, t) in self.toks.iter().enumerate().skip(open) {
            match t.kind {
                TokenKind::LParen => depth += 1,
                TokenKind::RParen => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// The keyword `kw` occurs outside parentheses at or after `from`.
    fn depth0_word(&self, from: usize, kw: &str) -> bool {
        let mut depth = 0usize;
        for (i, t) in self.toks.iter().enumerate().skip(from) {
            match t.kind {
                TokenKind::LParen => depth += 1,
                TokenKind::RParen => depth = depth.saturating_sub(1),
                TokenKind::Ident if depth == 0 && self.is(i, kw) => return true,
                _ => {}
            }
        }
        false
    }
}

/// Iterator over the statements of a token list, split at `;`.
struct Statements<'a> {
    sql: &'a str,
    rest: &'a [Token],
}

impl<'a> Statements<'a> {
    fn new(sql: &'a str, toks: &'a [Token]) -> Self {
        Statements { sql, rest: toks }
    }
}

impl<'a> Iterator for Statements<'a> {
    type Item = Toks<'a>;

    fn next(&mut self) -> Option<Toks<'a>> {
        let start = self
            .rest
            .iter()
            .position(|t| t.kind != TokenKind::Semicolon)?;
        let rest = self.rest.get(start..).unwrap_or_default();
        let s = Toks {
            sql: self.sql,
            toks: rest,
        };
        // A SQL-standard function body (`CREATE FUNCTION … BEGIN ATOMIC …; …; END`) contains
        // semicolons that do not end the statement; CASE … END nests inside it. So does the
        // parenthesised action list of `CREATE RULE … DO (…; …)`.
        let is_create = s.is(0, "create");
        let mut atomic = 0u32;
        let mut parens = 0u32;
        let mut end = rest.len();
        for (i, t) in rest.iter().enumerate() {
            match t.kind {
                TokenKind::Semicolon if atomic == 0 && parens == 0 => {
                    end = i;
                    break;
                }
                TokenKind::LParen if is_create => parens += 1,
                TokenKind::RParen if is_create => parens = parens.saturating_sub(1),
                TokenKind::Ident if is_create => {
                    let opens = (s.is(i, "begin") && s.is(i + 1, "atomic"))
                        || (atomic > 0 && s.is(i, "case"));
                    if opens {
                        atomic += 1;
                    } else if atomic > 0 && s.is(i, "end") {
                        atomic -= 1;
                    }
                }
                _ => {}
            }
        }
        self.rest = rest.get(end..).unwrap_or_default();
        Some(Toks {
            sql: self.sql,
            toks: rest.get(..end).unwrap_or_default(),
        })
    }
}

/// `BEGIN` / `START TRANSACTION` with its modes; the last access mode given wins.
fn begin(s: Toks<'_>) -> Stmt {
    let mut read_only = false;
    for i in 1..s.toks.len() {
        if s.is(i, "read") {
            if s.is(i + 1, "only") {
                read_only = true;
            } else if s.is(i + 1, "write") {
                read_only = false;
            }
        }
    }
    Stmt {
        begin: Some(Begin { read_only }),
        ..Stmt::default()
    }
}

fn set(s: Toks<'_>) -> Stmt {
    // SET LOCAL, SET TRANSACTION and SET CONSTRAINTS end with the transaction.
    if s.is(1, "local") || s.is(1, "transaction") || s.is(1, "constraints") {
        return Stmt::default();
    }
    let mut i = 1;
    if s.is(1, "session") {
        if s.is(2, "characteristics") {
            return Stmt::session(SessionOp::Other);
        }
        if s.is(2, "authorization") {
            return set_op("session_authorization");
        }
        i = 2;
    }
    let name = if s.is(i, "time") && s.is(i + 1, "zone") {
        "timezone".to_owned()
    } else if s.is(i, "schema") && !is_assign(s, i + 1) {
        "search_path".to_owned()
    } else if s.is(i, "names") && !is_assign(s, i + 1) {
        "client_encoding".to_owned()
    } else if s.is(i, "xml") && s.is(i + 1, "option") {
        "xmloption".to_owned()
    } else {
        match dotted_name(s, i) {
            Some(n) => n,
            None => return Stmt::session(SessionOp::Other),
        }
    };
    Stmt::session(SessionOp::Set { name })
}

fn set_op(name: &str) -> Stmt {
    Stmt::session(SessionOp::Set {
        name: name.to_owned(),
    })
}

/// `TO` or `=` follows: a generic `SET name = value`.
fn is_assign(s: Toks<'_>, i: usize) -> bool {
    s.is(i, "to") || s.toks.get(i).is_some_and(|t| t.text(s.sql) == "=")
}

fn reset(s: Toks<'_>) -> Stmt {
    let name = if s.is(1, "all") {
        return Stmt::session(SessionOp::ResetAll);
    } else if s.is(1, "session") && s.is(2, "authorization") {
        "session_authorization".to_owned()
    } else if s.is(1, "time") && s.is(2, "zone") {
        "timezone".to_owned()
    } else {
        match dotted_name(s, 1) {
            Some(n) => n,
            None => return Stmt::session(SessionOp::Other),
        }
    };
    Stmt::session(SessionOp::Reset { name })
}

fn deallocate(s: Toks<'_>) -> Stmt {
    let i = if s.is(1, "prepare") { 2 } else { 1 };
    if s.is(i, "all") {
        return Stmt::session(SessionOp::DeallocateAll);
    }
    match object_name(s, i) {
        Some(name) => Stmt::session(SessionOp::Deallocate { name }),
        None => Stmt::write(),
    }
}

fn discard(s: Toks<'_>) -> Stmt {
    let known = ["all", "plans", "sequences", "temp", "temporary"];
    if s.toks.len() == 2 && known.iter().any(|k| s.is(1, k)) {
        Stmt::session(SessionOp::Discard)
    } else {
        Stmt::write()
    }
}

/// `FOR UPDATE | FOR NO KEY UPDATE | FOR SHARE | FOR KEY SHARE`, starting after the FOR.
fn locking_clause(s: Toks<'_>, i: usize) -> bool {
    s.is(i, "update")
        || s.is(i, "share")
        || (s.is(i, "no") && s.is(i + 1, "key") && s.is(i + 2, "update"))
        || (s.is(i, "key") && s.is(i + 1, "share"))
}

/// A configuration parameter name such as `search_path` or `pgrelay.consistency`, lowercased
/// (Postgres looks them up case-insensitively).
fn dotted_name(s: Toks<'_>, mut i: usize) -> Option<String> {
    let mut name = String::new();
    loop {
        let part = object_name(s, i)?;
        name.push_str(&part.to_ascii_lowercase());
        if s.kind(i + 1) != Some(TokenKind::Dot) {
            return Some(name);
        }
        name.push('.');
        i += 2;
    }
}

/// An identifier as Postgres resolves it: unquoted names fold to lowercase, quoted names keep
/// their case.
fn object_name(s: Toks<'_>, i: usize) -> Option<String> {
    let t = s.toks.get(i)?;
    match t.kind {
        TokenKind::Ident => Some(t.text(s.sql).to_ascii_lowercase()),
        TokenKind::QuotedIdent => {
            let text = t.text(s.sql);
            let inner = text.strip_prefix('"')?.strip_suffix('"')?;
            Some(inner.replace("\"\"", "\""))
        }
        _ => None,
    }
}

/// ASCII-lowercases a short word into `buf` (keywords are ASCII); `None` if it does not fit.
fn lower<'b>(word: &str, buf: &'b mut [u8]) -> Option<&'b str> {
    let out = buf.get_mut(..word.len())?;
    for (d, c) in out.iter_mut().zip(word.bytes()) {
        *d = c.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

/// A function name as the lookup key: lowercased (also when quoted, so that a quoted call of a
/// user function still matches the lowercase list; a false match only sends a read to the
/// leader) and truncated to 63 bytes like Postgres does. `None` for a `U&"…"` name with
/// escapes.
fn fold_ident<'b>(t: &Token, sql: &str, buf: &'b mut [u8; MAX_IDENT_BYTES]) -> Option<&'b str> {
    let text = t.text(sql);
    let raw = if t.kind == TokenKind::QuotedIdent {
        t.quoted_ident_body(sql)?
    } else {
        text
    };
    let mut n = 0;
    let mut bytes = raw.bytes().peekable();
    while let Some(c) = bytes.next() {
        // `""` inside a quoted name is one `"`.
        if c == b'"' && bytes.peek() == Some(&b'"') {
            bytes.next();
        }
        let Some(slot) = buf.get_mut(n) else { break };
        *slot = c.to_ascii_lowercase();
        n += 1;
    }
    let folded = buf.get(..n).unwrap_or_default();
    // Truncation may have cut a multi-byte character; Postgres cuts before it.
    match std::str::from_utf8(folded) {
        Ok(s) => Some(s),
        Err(e) => std::str::from_utf8(folded.get(..e.valid_up_to()).unwrap_or_default()).ok(),
    }
}

/// Full parse for the doubtful case: a single query whose CTEs and body are all plain queries.
/// None when the parser does not understand the text (Postgres syntax sqlparser lacks), which
/// the caller must treat as not a read.
fn parser_says_read(text: &str) -> Option<bool> {
    match Parser::parse_sql(&PostgreSqlDialect {}, text) {
        Ok(stmts) => Some(matches!(stmts.as_slice(), [Statement::Query(q)] if query_is_read(q))),
        Err(_) => None,
    }
}

fn query_is_read(q: &Query) -> bool {
    let ctes_read = q
        .with
        .as_ref()
        .is_none_or(|w| w.cte_tables.iter().all(|c| query_is_read(&c.query)));
    ctes_read && set_expr_is_read(&q.body)
}

fn set_expr_is_read(e: &SetExpr) -> bool {
    match e {
        SetExpr::Select(_) | SetExpr::Values(_) | SetExpr::Table(_) => true,
        SetExpr::Query(q) => query_is_read(q),
        SetExpr::SetOperation { left, right, .. } => {
            set_expr_is_read(left) && set_expr_is_read(right)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use rand::{Rng, SeedableRng};

    fn classifier() -> Classifier {
        Classifier::new(["My_Writer".to_owned()])
    }

    /// (sql, read_only, writes, pins_leader)
    const CASES: &[(&str, bool, bool, bool)] = &[
        // Reads.
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 42;", true, false, false),
        ("select 1", true, false, false),
        ("VALUES (1), (2)", true, false, false),
        ("TABLE t", true, false, false),
        ("(SELECT 1) UNION (SELECT 2)", true, false, false),
        ("WITH a AS (SELECT 1) SELECT * FROM a", true, false, false),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r", true, false, false),
        ("SHOW search_path", true, false, false),
        ("SHOW ALL", true, false, false),
        ("EXPLAIN SELECT * FROM t", true, false, false),
        ("EXPLAIN ANALYZE SELECT * FROM t", true, false, false),
        ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", true, false, false),
        ("SELECT pg_is_in_recovery()", true, false, false),
        ("SELECT random(), clock_timestamp(), pg_sleep(0), pg_last_wal_replay_lsn()", true, false, false),
        ("select 'nextval(' ", true, false, false),
        ("select $$nextval($$, 'x;y'", true, false, false),
        ("SELECT t.update, t.delete FROM t", true, false, false),
        ("SELECT 1 update", true, false, false),
        ("SELECT lo_get(42)", true, false, false),
        ("SELECT * FROM t FOR READ ONLY", true, false, false),
        ("SELECT substring('abc' FROM 1 FOR 2)", true, false, false),
        ("", true, false, false),
        ("  -- just a comment\n", true, false, false),
        ("/* c1 */ ; /* c2 */", true, false, false),
        (";;", true, false, false),
        ("SELECT 1; SELECT 2", true, false, false),
        // Writable CTEs and the main statement of a WITH.
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", false, true, false),
        ("WITH d AS MATERIALIZED (UPDATE t SET a = 1 RETURNING *) SELECT * FROM d", false, true, false),
        ("WITH d AS NOT MATERIALIZED (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM d", false, true, false),
        ("WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a", false, true, false),
        ("(WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d)", false, true, false),
        ("WITH m AS (MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE) SELECT 1", false, true, false),
        // A DML word in doubt: the parser settles it.
        ("WITH a AS (SELECT b update FROM t) SELECT * FROM a", true, false, false),
        // SELECT INTO and locking clauses.
        ("SELECT * INTO x FROM t", false, true, false),
        ("SELECT * INTO TEMP x FROM t", false, true, true),
        ("SELECT * INTO TEMPORARY TABLE x FROM t", false, true, true),
        ("SELECT * FROM t FOR UPDATE", false, false, false),
        ("SELECT * FROM t FOR NO KEY UPDATE", false, false, false),
        ("SELECT * FROM t FOR SHARE", false, false, false),
        ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", false, false, false),
        ("SELECT * FROM t WHERE a IN (SELECT a FROM u FOR UPDATE)", false, false, false),
        ("WITH a AS (SELECT * FROM t FOR UPDATE) SELECT * FROM a", false, false, false),
        // Writing functions.
        ("SELECT nextval('s')", false, true, false),
        ("select pg_catalog.setval('s', 1)", false, true, false),
        ("SELECT \"nextval\"('s')", false, true, false),
        ("SELECT pg_catalog.\"currval\" ('s')", false, true, false),
        ("SELECT NEXTVAL/* x */('s')", false, true, false),
        ("SELECT my_writer(1)", false, true, false),
        ("SELECT public.MY_WRITER(1)", false, true, false),
        ("SELECT set_config('a.b', 'c', false)", false, true, false),
        ("SELECT pg_stat_reset_shared('bgwriter')", false, true, false),
        ("SELECT pg_advisory_xact_lock(1)", false, true, false),
        ("SELECT pg_advisory_unlock_all()", false, true, false),
        ("SELECT U&\"\\006Eextval\"('s')", false, true, false),
        ("SELECT * FROM t WHERE a = (SELECT txid_current())", false, true, false),
        ("SELECT pg_current_wal_lsn()", false, true, false),
        ("SELECT pg_walfile_name('0/1')", false, true, false),
        ("EXPLAIN SELECT nextval('s')", false, false, false),
        ("EXPLAIN ANALYZE SELECT nextval('s')", false, true, false),
        // Multi-statement strings.
        ("SELECT 1; INSERT INTO t VALUES (1)", false, true, false),
        ("SELECT ';'; SELECT $x$;$x$ -- ;\n; /* ; */ SELECT 3", true, false, false),
        // DML and DDL.
        ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1;", false, true, false),
        ("INSERT INTO t VALUES (1)", false, true, false),
        ("DELETE FROM t", false, true, false),
        ("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE", false, true, false),
        ("EXPLAIN ANALYZE UPDATE t SET a = 1", false, true, false),
        ("EXPLAIN (ANALYZE) DELETE FROM t", false, true, false),
        ("EXPLAIN (ANALYZE false) DELETE FROM t", false, false, false),
        ("EXPLAIN DELETE FROM t", false, false, false),
        ("CREATE TABLE t (a int)", false, true, false),
        ("CREATE TEMP TABLE t (a int)", false, true, true),
        ("create temporary table t as select 1", false, true, true),
        ("CREATE GLOBAL TEMPORARY TABLE t (a int)", false, true, true),
        ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", false, true, true),
        ("CREATE TEMP SEQUENCE s", false, true, true),
        ("CREATE TABLE pg_temp.t (a int)", false, true, true),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END", false, true, false),
        ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql", false, true, false),
        ("DROP TABLE t", false, true, false),
        ("ALTER TABLE t ADD COLUMN b int", false, true, false),
        ("TRUNCATE t", false, true, false),
        ("GRANT SELECT ON t TO u", false, true, false),
        ("VACUUM t", false, true, false),
        ("ANALYZE t", false, true, false),
        ("DO $$ BEGIN PERFORM 1; END $$", false, true, false),
        ("CALL p()", false, true, false),
        ("COPY t FROM STDIN", false, true, false),
        ("COPY t TO STDOUT", false, false, false),
        ("COPY (SELECT * FROM t) TO STDOUT", false, false, false),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", false, true, false),
        ("NOTIFY ch, 'x'", false, true, false),
        ("SELECT pg_notify('ch', 'x')", false, true, false),
        ("INSERT INTO t SELECT pg_advisory_lock(1)", false, true, true),
        // Cursors, locks, listen.
        ("DECLARE c CURSOR FOR SELECT 1", false, false, false),
        ("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT 1", false, false, true),
        ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", false, false, false),
        ("FETCH 10 FROM c", false, false, false),
        ("MOVE NEXT IN c", false, false, false),
        ("CLOSE c", false, false, false),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", false, false, false),
        ("CHECKPOINT", false, false, false),
        ("LISTEN ch", false, false, true),
        ("UNLISTEN *", false, false, false),
        ("SELECT pg_advisory_lock(1)", false, true, true),
        ("SELECT pg_advisory_lock_shared(1)", false, true, true),
        ("SELECT pg_try_advisory_lock(1, 2)", false, true, true),
        ("SELECT pg_try_advisory_lock_shared(1)", false, true, true),
        ("SELECT pg_try_advisory_xact_lock(1)", false, true, false),
        // Transaction control.
        ("BEGIN", false, false, false),
        ("COMMIT", false, false, false),
        ("END", false, false, false),
        ("ROLLBACK", false, false, false),
        ("ABORT", false, false, false),
        ("SAVEPOINT a", false, false, false),
        ("RELEASE SAVEPOINT a", false, false, false),
        ("ROLLBACK TO SAVEPOINT a", false, false, false),
        ("PREPARE TRANSACTION 'gid'", false, false, false),
        ("COMMIT PREPARED 'gid'", false, false, false),
        ("SET LOCAL search_path = x", false, false, false),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", false, false, false),
        // Garbage and unknown statements are writes.
        ("SELEC 1", false, true, false),
        ("$$ unterminated", false, true, false),
        ("SELECT 'unterminated", false, true, false),
        ("SELECT \"unterminated", false, true, false),
        ("SELECT 1 /* unterminated", false, true, false),
        ("42", false, true, false),
        ("START", false, true, false),
        // Too deep (and invalid): not a read; EXPLAIN without ANALYZE runs nothing.
        ("EXPLAIN EXPLAIN EXPLAIN EXPLAIN EXPLAIN EXPLAIN SELECT 1", false, false, false),
        ("EXPLAIN SELEC 1", false, false, false),
        // Plain strings with a backslash are read both ways.
        // With standard_conforming_strings off this does not lex, so the server rejects it.
        (r"SELECT 'a\', 1", true, false, false),
        (r"SELECT E'a\'', 1", true, false, false),
        (r"SELECT 'a\''; DELETE FROM t; --'", false, true, false),
        (r"SELECT 'a\'', 1; DELETE FROM t; --'", false, true, false),
    ];

    #[test]
    fn classification_table() {
        let c = classifier();
        let mut failures = Vec::new();
        for &(sql, read_only, writes, pins) in CASES {
            let got = c.classify(sql);
            if (got.read_only, got.writes, got.pins_leader) != (read_only, writes, pins) {
                failures.push(format!(
                    "{sql:?}: want read_only={read_only} writes={writes} pins={pins}, got {got:?}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn parse_failures_are_writes_and_say_so() {
        let c = classifier();
        // Valid Postgres that sqlparser does not know (ROWS FROM), with a DML word in doubt.
        let failed = c.classify(
            "WITH a AS (SELECT 1 AS x) SELECT x AS update, g FROM a, ROWS FROM (generate_series(1, 2)) g",
        );
        assert!(failed.parse_failed && failed.writes && !failed.read_only);
        let wrapped = c.classify(
            "EXPLAIN WITH a AS (SELECT 1 AS x) SELECT x AS update FROM a, ROWS FROM (f()) g",
        );
        assert!(wrapped.parse_failed);
        assert!(c.classify("SELECT 'unterminated").parse_failed);
        // Settled by the parser, or never in doubt: no failure.
        for sql in [
            "WITH a AS (SELECT b update FROM t) SELECT * FROM a",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "SELECT * FROM ROWS FROM (generate_series(1, 2)) g",
        ] {
            assert!(!c.classify(sql).parse_failed, "{sql}");
        }
    }

    #[test]
    fn default_knows_only_builtins() {
        let c = Classifier::default();
        assert!(c.classify("SELECT my_writer(1)").read_only);
        assert!(!c.classify("SELECT nextval('s')").read_only);
    }

    #[test]
    fn statements_that_end_a_transaction() {
        let c = classifier();
        for sql in [
            "COMMIT",
            "end",
            "ROLLBACK",
            "abort work",
            "PREPARE TRANSACTION 'x'",
            "INSERT INTO t VALUES (1); COMMIT",
        ] {
            assert!(c.classify(sql).ends_transaction, "{sql}");
        }
        for sql in [
            "ROLLBACK TO SAVEPOINT a",
            "rollback to a",
            "SAVEPOINT a",
            "BEGIN",
            "SELECT 1",
        ] {
            assert!(!c.classify(sql).ends_transaction, "{sql}");
        }
    }

    #[test]
    fn begin_modes() {
        let c = classifier();
        let begin = |sql: &str| c.classify(sql).begin;
        assert_eq!(begin("BEGIN"), Some(Begin { read_only: false }));
        assert_eq!(begin("begin work"), Some(Begin { read_only: false }));
        assert_eq!(begin("BEGIN READ ONLY"), Some(Begin { read_only: true }));
        assert_eq!(
            begin("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
            Some(Begin { read_only: true })
        );
        assert_eq!(
            begin("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY, DEFERRABLE"),
            Some(Begin { read_only: true })
        );
        assert_eq!(
            begin("BEGIN ISOLATION LEVEL READ COMMITTED"),
            Some(Begin { read_only: false })
        );
        assert_eq!(
            begin("START TRANSACTION READ WRITE"),
            Some(Begin { read_only: false })
        );
        assert_eq!(
            begin("BEGIN; SELECT 1; COMMIT"),
            Some(Begin { read_only: false })
        );
        assert_eq!(begin("SELECT 1"), None);
        assert_eq!(begin("COMMIT"), None);
    }

    fn ops(sql: &str) -> Vec<(String, SessionOp)> {
        let got = classifier().classify(sql);
        assert!(!got.read_only, "{sql}");
        assert!(!got.writes, "{sql}");
        got.session_changes
            .into_iter()
            .map(|c| (c.text, c.op))
            .collect()
    }

    fn set(name: &str) -> SessionOp {
        SessionOp::Set { name: name.into() }
    }

    #[test]
    fn session_changes() {
        let one = |sql: &str| {
            let v = ops(sql);
            assert_eq!(v.len(), 1, "{sql}: {v:?}");
            assert_eq!(v[0].0, sql.trim_end_matches(';'));
            v[0].1.clone()
        };
        assert_eq!(one("SET search_path TO a, b"), set("search_path"));
        assert_eq!(one("SET SESSION Search_Path = a;"), set("search_path"));
        assert_eq!(
            one("set pgrelay.Consistency = 'leader'"),
            set("pgrelay.consistency")
        );
        assert_eq!(one("SET \"MyApp\".\"User\" = 1"), set("myapp.user"));
        assert_eq!(one("SET ROLE admin"), set("role"));
        assert_eq!(one("SET SESSION ROLE admin"), set("role"));
        assert_eq!(
            one("SET SESSION AUTHORIZATION bob"),
            set("session_authorization")
        );
        assert_eq!(one("SET TIME ZONE 'UTC'"), set("timezone"));
        assert_eq!(one("SET SCHEMA 'x'"), set("search_path"));
        assert_eq!(one("SET NAMES 'UTF8'"), set("client_encoding"));
        assert_eq!(one("SET XML OPTION DOCUMENT"), set("xmloption"));
        assert_eq!(
            one("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            SessionOp::Other
        );
        assert_eq!(
            one("RESET work_mem"),
            SessionOp::Reset {
                name: "work_mem".into()
            }
        );
        assert_eq!(
            one("RESET TIME ZONE"),
            SessionOp::Reset {
                name: "timezone".into()
            }
        );
        assert_eq!(
            one("RESET SESSION AUTHORIZATION"),
            SessionOp::Reset {
                name: "session_authorization".into()
            }
        );
        assert_eq!(one("RESET ALL"), SessionOp::ResetAll);
        assert_eq!(
            one("PREPARE p AS SELECT 1"),
            SessionOp::Prepare {
                name: "p".into(),
                read_only: true
            }
        );
        assert_eq!(
            one("PREPARE Ins (int, text) AS INSERT INTO t VALUES ($1, $2)"),
            SessionOp::Prepare {
                name: "ins".into(),
                read_only: false
            }
        );
        assert_eq!(
            one("PREPARE \"Q\" AS SELECT nextval('s')"),
            SessionOp::Prepare {
                name: "Q".into(),
                read_only: false
            }
        );
        assert_eq!(
            one("DEALLOCATE p"),
            SessionOp::Deallocate { name: "p".into() }
        );
        assert_eq!(
            one("DEALLOCATE PREPARE P"),
            SessionOp::Deallocate { name: "p".into() }
        );
        assert_eq!(one("DEALLOCATE ALL"), SessionOp::DeallocateAll);
        assert_eq!(one("DEALLOCATE PREPARE ALL"), SessionOp::DeallocateAll);
        for d in [
            "DISCARD ALL",
            "DISCARD PLANS",
            "DISCARD SEQUENCES",
            "DISCARD TEMP",
        ] {
            assert_eq!(one(d), SessionOp::Discard);
        }
        assert_eq!(one("LOAD 'auto_explain'"), SessionOp::Other);
    }

    #[test]
    fn session_changes_in_order_with_own_text() {
        let v = ops("SET a.b = 1; /* c */ RESET x;SET LOCAL y = 2; PREPARE p AS SELECT ';'");
        assert_eq!(
            v,
            vec![
                ("SET a.b = 1".to_owned(), set("a.b")),
                ("RESET x".to_owned(), SessionOp::Reset { name: "x".into() }),
                (
                    "PREPARE p AS SELECT ';'".to_owned(),
                    SessionOp::Prepare {
                        name: "p".into(),
                        read_only: true
                    }
                ),
            ]
        );
        assert!(ops("SET LOCAL search_path = x").is_empty());
        assert!(ops("SET TRANSACTION READ ONLY").is_empty());
    }

    #[test]
    fn executes() {
        let c = classifier();
        let got = c.classify("EXECUTE p(1)");
        assert_eq!(got.executes, vec!["p".to_owned()]);
        assert!(got.read_only && !got.writes);
        let got = c.classify("EXECUTE \"P\"; execute Q (nextval('s'))");
        assert_eq!(got.executes, vec!["P".to_owned(), "q".to_owned()]);
        assert!(got.writes);
    }

    #[test]
    fn ddl_candidates() {
        let c = classifier();
        for sql in [
            "CREATE TABLE t (a int)",
            "alter table t add column c int",
            "SELECT 1; DROP TABLE t",
            "SELECT * INTO x FROM t",
            "EXPLAIN ANALYZE SELECT 1 INTO x",
            "PREPARE p AS SELECT 1 INTO x",
            "GRANT SELECT ON t TO u",
            "REVOKE SELECT ON t FROM u",
            "COMMENT ON TABLE t IS 'x'",
            "SECURITY LABEL ON TABLE t IS 'x'",
            "REFRESH MATERIALIZED VIEW v",
            "IMPORT FOREIGN SCHEMA s FROM SERVER f INTO public",
            "REASSIGN OWNED BY a TO b",
            r"SELECT 'a\'; CREATE TABLE x (a int); --'",
        ] {
            assert!(c.classify(sql).ddl, "{sql}");
        }
        for sql in [
            "SELECT 1",
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "EXPLAIN SELECT 1 INTO x",
            "TRUNCATE t",
            "VACUUM t",
            "DO $$ BEGIN CREATE TABLE t (); END $$",
            "SELECT 'CREATE TABLE x'",
        ] {
            assert!(!c.classify(sql).ddl, "{sql}");
        }
    }

    #[test]
    fn splits_statements() {
        let sql = "SELECT 1; /* ; */ SELECT ';' -- ;\n;; SELECT $a$ ; $a$";
        assert_eq!(
            split_statements(sql).unwrap(),
            vec!["SELECT 1", "SELECT ';'", "SELECT $a$ ; $a$"]
        );
        let atomic =
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; SELECT 2";
        assert_eq!(
            split_statements(atomic).unwrap(),
            vec![
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
                "SELECT 2"
            ]
        );
        let rule = "CREATE RULE r AS ON UPDATE TO t DO ALSO (NOTIFY a; NOTIFY b); SELECT (1)";
        assert_eq!(
            split_statements(rule).unwrap(),
            vec![
                "CREATE RULE r AS ON UPDATE TO t DO ALSO (NOTIFY a; NOTIFY b)",
                "SELECT (1)"
            ]
        );
        assert_eq!(split_statements("").unwrap(), Vec::<&str>::new());
        assert_eq!(
            split_statements("SELECT 'x"),
            Err(LexError::UnterminatedString)
        );
    }

    #[test]
    fn random_input_never_panics() {
        let c = classifier();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        // Bias towards bytes that drive the lexer's and classifier's branches.
        let alphabet: &[u8] = b"'\"$;()-/*\\ eEuU&selctSELCTforupdatwhin.:,=0123456789\n\xc3\xa9";
        for _ in 0..5000 {
            let len = rng.gen_range(0..64);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.gen_bool(0.8) {
                        alphabet[rng.gen_range(0..alphabet.len())]
                    } else {
                        rng.gen()
                    }
                })
                .collect();
            let sql = String::from_utf8_lossy(&bytes);
            let _ = c.classify(&sql);
            let _ = split_statements(&sql);
        }
        // And some structured noise from real keywords.
        let words = [
            "SELECT",
            "WITH",
            "EXPLAIN",
            "PREPARE",
            "SET",
            "RESET",
            "(",
            ")",
            "AS",
            "FOR",
            "UPDATE",
            "INTO",
            "nextval(",
            "'",
            "$$",
            ";",
            "BEGIN",
            "ATOMIC",
            "END",
            "CASE",
            "DEALLOCATE",
            "EXECUTE",
            "COPY",
            "TO",
            "CREATE",
            "TEMP",
            ".",
            "DELETE",
        ];
        for _ in 0..5000 {
            let n = rng.gen_range(0..16);
            let sql: Vec<&str> = (0..n)
                .map(|_| words[rng.gen_range(0..words.len())])
                .collect();
            let _ = c.classify(&sql.join(" "));
        }
    }

    /// `cargo test --release --lib classify_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn classify_timing() {
        let c = Classifier::default();
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1;",
            "BEGIN",
            "COMMIT",
        ] {
            let n = 1_000_000u32;
            let start = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(c.classify(std::hint::black_box(sql)));
            }
            println!(
                "{:>8.0} ns  {sql}",
                start.elapsed().as_nanos() as f64 / f64::from(n)
            );
        }
    }
}
