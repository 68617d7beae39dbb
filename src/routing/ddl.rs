//! Which statements row-mode replication carries to the followers as DDL, and the command tag
//! Postgres answers each of them with.
//!
//! Logical decoding carries rows, not schema changes
//! (<https://www.postgresql.org/docs/current/logical-replication-restrictions.html>). So in
//! `row` mode pgrelay writes the DDL that passes through it into the leader's WAL with
//! `pg_logical_emit_message` (prefix [`MESSAGE_PREFIX`]), and the follower's applier runs it at
//! that point of the stream. This module decides, from the tokens of one statement:
//! - DDL on the objects of a database (tables, indexes, views, functions, types, schemas,
//!   extensions, triggers, policies, ..., privileges on them, comments, security labels) is
//!   replicated. So are foreign-data wrappers, servers and user mappings: they belong to the
//!   database, and the foreign tables that are replicated need them.
//! - Statements on cluster-wide or node-local objects (databases, roles, tablespaces,
//!   publications, subscriptions, `ALTER SYSTEM`, large objects, role membership, `GRANT ... ON
//!   PARAMETER`), on temporary objects, and on pgrelay's own schema `pgrelay` are not. Neither
//!   is maintenance (REINDEX, VACUUM, CLUSTER): each node does its own.
//! - `CREATE TABLE ... AS` and `SELECT ... INTO` are refused: the rows they insert are decoded
//!   too, so replaying the statement would give the followers those rows twice. A materialized
//!   view's rows are not decoded, so `CREATE MATERIALIZED VIEW` and `REFRESH` replay fine.
//!
//! It runs only for statements whose first keyword the classifier flagged
//! ([`super::classify::Classification::ddl`]), so it may take its time.

use super::lexer::{Lexer, StringMode, Token, TokenKind};

/// The prefix of pgrelay's DDL messages in the leader's WAL. The content is six parts
/// separated by newlines: [`MESSAGE_VERSION`]; the signature (HMAC-SHA256 in hex, see
/// `crate::replication::row::message_key`) over the next part and the last; the role the
/// session logged in as; the role that ran the statement (`current_user`, so the objects get
/// the same owner on the followers); the schemas its `search_path` resolved to
/// (`current_schemas(false)`, each quoted: `"$user"` means the leader's user, whatever schemas
/// a follower has); and the text of one statement.
pub const MESSAGE_PREFIX: &str = "pgrelay.ddl";

/// The first part of a DDL message: its format.
pub const MESSAGE_VERSION: &str = "v2";

/// The SQL expression for the role and schemas parts of a DDL message, each followed by a
/// newline.
pub const MESSAGE_HEADER_SQL: &str = "current_user || E'\\n' || \
     coalesce((SELECT pg_catalog.string_agg(pg_catalog.quote_ident(s), ', ') \
     FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) AS s), '') || E'\\n'";

/// What row-mode replication does with one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ddl {
    /// Not replicated DDL (or no DDL at all): it runs as sent.
    Local,
    /// Replicated in the transaction that runs it.
    Transactional(Replicated),
    /// Cannot run inside a transaction block (`CREATE INDEX CONCURRENTLY` and the like): it
    /// runs as sent and is replicated once it succeeded.
    AfterSuccess(Replicated),
    /// Not allowed in row mode.
    Refused(Refusal),
}

/// A statement that is replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replicated {
    /// The CommandComplete tag Postgres answers the statement with.
    pub tag: String,
    /// Unqualified names of the relations the statement acts on (or the view it creates), as
    /// written: if one of them is a temporary relation when the statement runs, the statement
    /// concerns the session only and is not replicated.
    pub relations: Vec<String>,
}

/// Why a statement is refused, as the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub message: &'static str,
    pub detail: &'static str,
    pub hint: &'static str,
}

const ROWS_TWICE: &str = "In row mode pgrelay replays DDL on the followers and also replicates \
    the rows a statement inserts, so the followers would get these rows twice.";
const CREATE_THEN_INSERT: &str =
    "Create the table with CREATE TABLE, then fill it with INSERT INTO ... SELECT ...";

pub const CREATE_TABLE_AS: Refusal = Refusal {
    message: "CREATE TABLE ... AS is not supported in pgrelay's row replication mode",
    detail: ROWS_TWICE,
    hint: CREATE_THEN_INSERT,
};

pub const SELECT_INTO: Refusal = Refusal {
    message: "SELECT ... INTO is not supported in pgrelay's row replication mode",
    detail: ROWS_TWICE,
    hint: CREATE_THEN_INSERT,
};

pub const PREPARED_SELECT_INTO: Refusal = Refusal {
    message: "PREPARE of SELECT ... INTO is not supported in pgrelay's row replication mode",
    detail: ROWS_TWICE,
    hint: CREATE_THEN_INSERT,
};

pub const EXPLAIN_ANALYZE: Refusal = Refusal {
    message: "EXPLAIN ANALYZE of CREATE TABLE ... AS, SELECT ... INTO or CREATE MATERIALIZED \
        VIEW is not supported in pgrelay's row replication mode",
    detail: "EXPLAIN ANALYZE runs the statement, but pgrelay cannot replicate it from there.",
    hint: "Run the statement without EXPLAIN ANALYZE; for a new table, CREATE TABLE, then \
        INSERT INTO ... SELECT ...",
};

/// Decides what row-mode replication does with one statement (a statement's text as
/// [`super::classify::split_statements`] returns it). Text that does not lex is [`Ddl::Local`]:
/// the server rejects it.
pub fn analyze(statement: &str) -> Ddl {
    match Toks::lex(statement) {
        Some(toks) => toks.statement(0),
        None => Ddl::Local,
    }
}

/// Whether the text holds a `$n` parameter.
pub fn has_parameters(statement: &str) -> bool {
    Lexer::new(statement, StringMode::Standard).any(|t| t.kind == TokenKind::Param)
}

/// Where an object lives, as far as replication cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// In the database: replicated.
    Database,
    /// Shared by the cluster, or meaningful on one node only: not replicated.
    Elsewhere,
}

/// An object type as written after CREATE, ALTER, DROP, COMMENT ON, GRANT ... ON.
#[derive(Debug)]
struct Object {
    words: &'static [&'static str],
    /// As in command tags.
    tag: &'static str,
    scope: Scope,
}

const fn object(words: &'static [&'static str], tag: &'static str, scope: Scope) -> Object {
    Object { words, tag, scope }
}

use Scope::{Database as DB, Elsewhere as ELSEWHERE};

/// Longer phrases before their prefixes (OPERATOR CLASS before OPERATOR).
const OBJECTS: &[Object] = &[
    object(&["access", "method"], "ACCESS METHOD", DB),
    object(&["aggregate"], "AGGREGATE", DB),
    object(&["cast"], "CAST", DB),
    object(&["collation"], "COLLATION", DB),
    object(&["column"], "COLUMN", DB),
    object(&["constraint"], "CONSTRAINT", DB),
    object(&["conversion"], "CONVERSION", DB),
    object(&["database"], "DATABASE", ELSEWHERE),
    object(&["default", "privileges"], "DEFAULT PRIVILEGES", DB),
    object(&["domain"], "DOMAIN", DB),
    object(&["event", "trigger"], "EVENT TRIGGER", DB),
    object(&["extension"], "EXTENSION", DB),
    object(&["foreign", "data", "wrapper"], "FOREIGN DATA WRAPPER", DB),
    object(&["foreign", "server"], "FOREIGN SERVER", DB),
    object(&["foreign", "table"], "FOREIGN TABLE", DB),
    object(&["function"], "FUNCTION", DB),
    object(&["group"], "GROUP", ELSEWHERE),
    object(&["index"], "INDEX", DB),
    object(&["language"], "LANGUAGE", DB),
    object(&["large", "object"], "LARGE OBJECT", ELSEWHERE),
    object(&["materialized", "view"], "MATERIALIZED VIEW", DB),
    object(&["operator", "class"], "OPERATOR CLASS", DB),
    object(&["operator", "family"], "OPERATOR FAMILY", DB),
    object(&["operator"], "OPERATOR", DB),
    object(&["owned"], "OWNED", DB),
    object(&["parameter"], "PARAMETER", ELSEWHERE),
    object(&["policy"], "POLICY", DB),
    object(&["procedure"], "PROCEDURE", DB),
    object(&["publication"], "PUBLICATION", ELSEWHERE),
    object(&["role"], "ROLE", ELSEWHERE),
    object(&["routine"], "ROUTINE", DB),
    object(&["rule"], "RULE", DB),
    object(&["schema"], "SCHEMA", DB),
    object(&["sequence"], "SEQUENCE", DB),
    object(&["server"], "SERVER", DB),
    object(&["statistics"], "STATISTICS", DB),
    object(&["subscription"], "SUBSCRIPTION", ELSEWHERE),
    object(&["system"], "SYSTEM", ELSEWHERE),
    object(&["table"], "TABLE", DB),
    object(&["tablespace"], "TABLESPACE", ELSEWHERE),
    object(
        &["text", "search", "configuration"],
        "TEXT SEARCH CONFIGURATION",
        DB,
    ),
    object(
        &["text", "search", "dictionary"],
        "TEXT SEARCH DICTIONARY",
        DB,
    ),
    object(&["text", "search", "parser"], "TEXT SEARCH PARSER", DB),
    object(&["text", "search", "template"], "TEXT SEARCH TEMPLATE", DB),
    object(&["transform"], "TRANSFORM", DB),
    object(&["trigger"], "TRIGGER", DB),
    object(&["type"], "TYPE", DB),
    object(&["user", "mapping"], "USER MAPPING", DB),
    object(&["user"], "USER", ELSEWHERE),
    object(&["view"], "VIEW", DB),
];

/// Object types whose statements name relations directly (for the temporary-relation check).
const RELATIONS: &[&str] = &[
    "TABLE",
    "INDEX",
    "VIEW",
    "MATERIALIZED VIEW",
    "SEQUENCE",
    "FOREIGN TABLE",
];

/// The tokens of one statement, comments left out.
struct Toks<'a> {
    sql: &'a str,
    toks: Vec<Token>,
}

impl<'a> Toks<'a> {
    fn lex(sql: &'a str) -> Option<Self> {
        let mut toks = Vec::new();
        for t in Lexer::new(sql, StringMode::Standard) {
            match t.kind {
                TokenKind::Error(_) => return None,
                TokenKind::LineComment | TokenKind::BlockComment => {}
                _ => toks.push(t),
            }
        }
        Some(Toks { sql, toks })
    }

    fn kind(&self, i: usize) -> Option<TokenKind> {
        self.toks.get(i).map(|t| t.kind)
    }

    fn text(&self, i: usize) -> &'a str {
        self.toks.get(i).map_or("", |t| t.text(self.sql))
    }

    /// Token `i` is the keyword `kw` (given in lowercase).
    fn is(&self, i: usize, kw: &str) -> bool {
        self.kind(i) == Some(TokenKind::Ident) && self.text(i).eq_ignore_ascii_case(kw)
    }

    fn is_name(&self, i: usize) -> bool {
        matches!(
            self.kind(i),
            Some(TokenKind::Ident | TokenKind::QuotedIdent)
        )
    }

    /// Token `i` names `name` (lowercase), quoted or not.
    fn names(&self, i: usize, name: &str) -> bool {
        match self.kind(i) {
            Some(TokenKind::Ident) => self.text(i).eq_ignore_ascii_case(name),
            Some(TokenKind::QuotedIdent) => {
                self.text(i)
                    .strip_prefix('"')
                    .and_then(|t| t.strip_suffix('"'))
                    == Some(name)
            }
            _ => false,
        }
    }

    /// The index of the first `kw` outside parentheses at or after `from`.
    fn depth0(&self, from: usize, kw: &str) -> Option<usize> {
        let mut depth = 0usize;
        for (i, t) in self.toks.iter().enumerate().skip(from) {
            match t.kind {
                TokenKind::LParen => depth += 1,
                TokenKind::RParen => depth = depth.saturating_sub(1),
                TokenKind::Ident if depth == 0 && self.is(i, kw) => return Some(i),
                _ => {}
            }
        }
        None
    }

    /// The object type at `i` and the index after it.
    fn object(&self, i: usize) -> Option<(&'static Object, usize)> {
        OBJECTS
            .iter()
            .find(|o| {
                o.words.iter().enumerate().all(|(k, w)| self.is(i + k, w))
                    // `OPERATOR class.+` is an operator in schema `class`.
                    && self.kind(i + o.words.len()) != Some(TokenKind::Dot)
            })
            .map(|o| (o, i + o.words.len()))
    }

    /// Skips `IF [NOT] EXISTS`, `ONLY` and `CONCURRENTLY` before a name.
    fn skip_name_modifiers(&self, mut i: usize) -> usize {
        loop {
            if self.is(i, "if") && self.is(i + 1, "exists") {
                i += 2;
            } else if self.is(i, "if") && self.is(i + 1, "not") && self.is(i + 2, "exists") {
                i += 3;
            } else if self.is(i, "only") || self.is(i, "concurrently") {
                i += 1;
            } else {
                return i;
            }
        }
    }

    /// The (possibly qualified) name at `i`: its parts' texts and the index after it.
    fn name(&self, mut i: usize) -> Option<(Vec<&'a str>, usize)> {
        let mut parts = Vec::new();
        loop {
            if !self.is_name(i) {
                return None;
            }
            parts.push(self.text(i));
            if self.kind(i + 1) != Some(TokenKind::Dot) {
                return Some((parts, i + 1));
            }
            i += 2;
        }
    }

    /// The unqualified relation named at `i` (after modifiers), if any.
    fn relation_at(&self, i: usize, out: &mut Vec<String>) {
        if let Some((parts, _)) = self.name(self.skip_name_modifiers(i)) {
            if let [one] = parts.as_slice() {
                out.push((*one).to_owned());
            }
        }
    }

    /// The comma-separated unqualified relations named from `i` on (`DROP TABLE a, b`).
    fn relations_at(&self, i: usize, out: &mut Vec<String>) {
        let mut i = self.skip_name_modifiers(i);
        while let Some((parts, next)) = self.name(i) {
            if let [one] = parts.as_slice() {
                out.push((*one).to_owned());
            }
            if self.kind(next) != Some(TokenKind::Comma) {
                break;
            }
            i = next + 1;
        }
    }

    /// A name qualified with a temporary schema (`pg_temp.t`, `pg_temp_3.t`).
    fn mentions_temp_schema(&self) -> bool {
        (0..self.toks.len()).any(|i| {
            self.is_name(i)
                && self.kind(i + 1) == Some(TokenKind::Dot)
                && is_temp_schema(self.text(i))
        })
    }

    /// pgrelay's own schema: `pgrelay.x`, `SCHEMA pgrelay`, or any `pgrelay` in a statement
    /// on schemas.
    fn mentions_pgrelay_schema(&self, on_schemas: bool) -> bool {
        (0..self.toks.len()).any(|i| {
            self.names(i, "pgrelay")
                && (on_schemas
                    || self.kind(i + 1) == Some(TokenKind::Dot)
                    || i.checked_sub(1).is_some_and(|p| self.is(p, "schema")))
        })
    }

    fn statement(&self, i: usize) -> Ddl {
        let Some(first) = self.toks.get(i) else {
            return Ddl::Local;
        };
        if first.kind == TokenKind::LParen {
            return self.select_into(i, SELECT_INTO);
        }
        let word = |kw: &str| self.is(i, kw);
        if word("create") {
            self.create(i + 1)
        } else if word("alter") {
            self.alter(i + 1)
        } else if word("drop") {
            self.drop(i + 1)
        } else if word("comment") && self.is(i + 1, "on") {
            self.on_object(i + 2, "COMMENT")
        } else if word("security") && self.is(i + 1, "label") {
            // SECURITY LABEL [FOR provider] ON object
            let on = if self.is(i + 2, "for") { i + 4 } else { i + 2 };
            if self.is(on, "on") {
                self.on_object(on + 1, "SECURITY LABEL")
            } else {
                Ddl::Local
            }
        } else if word("grant") || word("revoke") {
            self.grant(i)
        } else if word("refresh") && self.is(i + 1, "materialized") && self.is(i + 2, "view") {
            self.replicated("REFRESH MATERIALIZED VIEW".to_owned(), Vec::new(), false)
        } else if word("import") && self.is(i + 1, "foreign") && self.is(i + 2, "schema") {
            let into_pgrelay = self
                .depth0(i + 3, "into")
                .is_some_and(|into| self.names(into + 1, "pgrelay"));
            if into_pgrelay {
                return Ddl::Local;
            }
            self.replicated("IMPORT FOREIGN SCHEMA".to_owned(), Vec::new(), false)
        } else if word("reassign") && self.is(i + 1, "owned") {
            self.replicated("REASSIGN OWNED".to_owned(), Vec::new(), false)
        } else if word("select") || word("with") || word("values") || word("table") {
            self.select_into(i, SELECT_INTO)
        } else if word("explain") {
            self.explain(i + 1)
        } else if word("prepare") {
            self.prepare(i + 1)
        } else {
            Ddl::Local
        }
    }

    /// A replicated statement, unless it concerns temporary objects or pgrelay's schema.
    fn replicated(&self, tag: String, relations: Vec<String>, on_schemas: bool) -> Ddl {
        if self.mentions_temp_schema() || self.mentions_pgrelay_schema(on_schemas) {
            return Ddl::Local;
        }
        let concurrently = self.depth0(0, "concurrently").is_some();
        let replicated = Replicated { tag, relations };
        // REFRESH MATERIALIZED VIEW CONCURRENTLY runs in a transaction block; the others
        // (CREATE/DROP INDEX, ALTER TABLE ... DETACH PARTITION) do not.
        if concurrently && !self.is(0, "refresh") {
            Ddl::AfterSuccess(replicated)
        } else {
            Ddl::Transactional(replicated)
        }
    }

    /// After CREATE.
    fn create(&self, mut i: usize) -> Ddl {
        if self.is(i, "or") && self.is(i + 1, "replace") {
            i += 2;
        }
        if self.is(i, "global") || self.is(i, "local") {
            i += 1;
        }
        if self.is(i, "temp") || self.is(i, "temporary") {
            return Ddl::Local;
        }
        // Words that do not change the command tag.
        while [
            "unlogged",
            "unique",
            "trusted",
            "procedural",
            "default",
            "recursive",
        ]
        .iter()
        .any(|w| self.is(i, w))
            || (self.is(i, "constraint") && self.is(i + 1, "trigger"))
        {
            i += 1;
        }
        let Some((object, next)) = self.object(i) else {
            return Ddl::Local;
        };
        if object.scope == Scope::Elsewhere {
            return Ddl::Local;
        }
        if object.tag == "TABLE" && self.depth0(next, "as").is_some() {
            // The new table decides, not what the query reads.
            let target = self.name(self.skip_name_modifiers(next));
            if target.is_some_and(|(parts, _)| self.in_temp_or_pgrelay_schema(&parts)) {
                return Ddl::Local;
            }
            return Ddl::Refused(CREATE_TABLE_AS);
        }
        let mut relations = Vec::new();
        let on = match object.tag {
            "INDEX" | "TRIGGER" | "POLICY" => self.depth0(next, "on"),
            "RULE" => self.depth0(next, "to"),
            "STATISTICS" => self.depth0(next, "from"),
            _ => None,
        };
        if let Some(on) = on {
            self.relation_at(on + 1, &mut relations);
        }
        if object.tag == "VIEW" {
            // A view on a temporary table is temporary itself.
            self.relation_at(next, &mut relations);
        }
        self.replicated(
            format!("CREATE {}", object.tag),
            relations,
            object.tag == "SCHEMA",
        )
    }

    /// A qualified name in a temporary schema or in pgrelay's.
    fn in_temp_or_pgrelay_schema(&self, parts: &[&str]) -> bool {
        match parts {
            [schema, _] => {
                is_temp_schema(schema)
                    || schema.eq_ignore_ascii_case("pgrelay")
                    || *schema == "\"pgrelay\""
            }
            _ => false,
        }
    }

    /// After ALTER.
    fn alter(&self, i: usize) -> Ddl {
        self.alter_or_drop(i, "ALTER")
    }

    /// After DROP (which may name several relations).
    fn drop(&self, i: usize) -> Ddl {
        self.alter_or_drop(i, "DROP")
    }

    fn alter_or_drop(&self, mut i: usize, verb: &str) -> Ddl {
        if self.is(i, "procedural") {
            i += 1;
        }
        let Some((object, next)) = self.object(i) else {
            return Ddl::Local;
        };
        if object.scope == Scope::Elsewhere {
            return Ddl::Local;
        }
        let mut relations = Vec::new();
        if RELATIONS.contains(&object.tag) {
            if verb == "DROP" {
                self.relations_at(next, &mut relations);
            } else {
                self.relation_at(next, &mut relations);
            }
        }
        self.replicated(
            format!("{verb} {}", object.tag),
            relations,
            object.tag == "SCHEMA",
        )
    }

    /// COMMENT ON / SECURITY LABEL ON an object, from the object type on.
    fn on_object(&self, i: usize, tag: &str) -> Ddl {
        let mut relations = Vec::new();
        let mut on_schemas = false;
        if let Some((object, next)) = self.object(i) {
            if object.scope == Scope::Elsewhere {
                return Ddl::Local;
            }
            on_schemas = object.tag == "SCHEMA";
            match object.tag {
                t if RELATIONS.contains(&t) => self.relation_at(next, &mut relations),
                // COMMENT ON COLUMN t.c: the relation is all but the last part.
                "COLUMN" => {
                    if let Some((parts, _)) = self.name(next) {
                        if let [table, _] = parts.as_slice() {
                            relations.push((*table).to_owned());
                        }
                    }
                }
                "CONSTRAINT" | "TRIGGER" | "RULE" | "POLICY" => {
                    if let Some(on) = self.depth0(next, "on") {
                        self.relation_at(on + 1, &mut relations);
                    }
                }
                _ => {}
            }
        }
        self.replicated(tag.to_owned(), relations, on_schemas)
    }

    /// GRANT / REVOKE at `i`: privileges on objects are replicated, role membership is not.
    fn grant(&self, i: usize) -> Ddl {
        let tag = if self.is(i, "grant") {
            "GRANT"
        } else {
            "REVOKE"
        };
        let end = self
            .depth0(i + 1, if tag == "GRANT" { "to" } else { "from" })
            .unwrap_or(self.toks.len());
        let on = match self.depth0(i + 1, "on") {
            Some(on) if on < end => on,
            _ => return Ddl::Local,
        };
        if let Some((object, _)) = self.object(on + 1) {
            if object.scope == Scope::Elsewhere {
                return Ddl::Local;
            }
        }
        self.replicated(tag.to_owned(), Vec::new(), false)
    }

    /// A query at `i` that may hold `INTO new_table`.
    fn select_into(&self, i: usize, refusal: Refusal) -> Ddl {
        let into = (i..self.toks.len()).find(|&j| {
            self.is(j, "into")
                && !j
                    .checked_sub(1)
                    .is_some_and(|p| self.is(p, "insert") || self.is(p, "merge"))
        });
        let Some(into) = into else {
            return Ddl::Local;
        };
        let mut t = into + 1;
        if self.is(t, "temp") || self.is(t, "temporary") {
            return Ddl::Local;
        }
        if self.is(t, "unlogged") {
            t += 1;
        }
        if self.is(t, "table") {
            t += 1;
        }
        if self
            .name(t)
            .is_some_and(|(parts, _)| self.in_temp_or_pgrelay_schema(&parts))
        {
            return Ddl::Local;
        }
        Ddl::Refused(refusal)
    }

    /// After EXPLAIN: only EXPLAIN ANALYZE runs the statement.
    fn explain(&self, mut i: usize) -> Ddl {
        let mut analyze = false;
        if self.kind(i) == Some(TokenKind::LParen) {
            let mut depth = 0usize;
            while let Some(kind) = self.kind(i) {
                match kind {
                    TokenKind::LParen => depth += 1,
                    TokenKind::RParen => depth = depth.saturating_sub(1),
                    _ if self.is(i, "analyze") || self.is(i, "analyse") => {
                        let off = ["false", "off", "no"].iter().any(|w| self.is(i + 1, w))
                            || self.text(i + 1) == "0";
                        analyze |= !off;
                    }
                    _ => {}
                }
                i += 1;
                if depth == 0 {
                    break;
                }
            }
        } else {
            if self.is(i, "analyze") || self.is(i, "analyse") {
                analyze = true;
                i += 1;
            }
            if self.is(i, "verbose") {
                i += 1;
            }
        }
        if !analyze {
            return Ddl::Local;
        }
        match self.statement(i) {
            Ddl::Refused(_) => Ddl::Refused(EXPLAIN_ANALYZE),
            Ddl::Transactional(r) if r.tag == "CREATE MATERIALIZED VIEW" => {
                Ddl::Refused(EXPLAIN_ANALYZE)
            }
            _ => Ddl::Local,
        }
    }

    /// After PREPARE: `name [(types)] AS statement`.
    fn prepare(&self, i: usize) -> Ddl {
        match self.depth0(i, "as") {
            Some(as_) => match self.select_into(as_ + 1, PREPARED_SELECT_INTO) {
                refused @ Ddl::Refused(_) => refused,
                _ => Ddl::Local,
            },
            None => Ddl::Local,
        }
    }
}

/// `pg_temp` or `pg_temp_N`, quoted or not.
fn is_temp_schema(name: &str) -> bool {
    name.trim_start_matches('"')
        .get(..7)
        .is_some_and(|p| p.eq_ignore_ascii_case("pg_temp"))
}

/// A dollar-quote tag (`$base$`, `$base1$`, ...) that quotes each of `texts` intact: its first
/// occurrence in `text` followed by the tag is that closing tag.
pub fn dollar_tag(base: &str, texts: &[&str]) -> String {
    let fits = |tag: &str| {
        texts.iter().all(|t| {
            let mut quoted = String::with_capacity(t.len() + tag.len());
            quoted.push_str(t);
            quoted.push_str(tag);
            quoted.find(tag) == Some(t.len())
        })
    };
    let mut n = 0usize;
    loop {
        let tag = if n == 0 {
            format!("${base}$")
        } else {
            format!("${base}{n}$")
        };
        if fits(&tag) {
            return tag;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;

    fn tag(sql: &str) -> Option<String> {
        match analyze(sql) {
            Ddl::Transactional(r) => Some(r.tag),
            other => panic!("{sql}: {other:?}"),
        }
    }

    /// Statements and the tag Postgres 15 answers them with (checked against the server).
    const TAGS: &[(&str, &str)] = &[
        ("CREATE TABLE t (a int primary key, b text)", "CREATE TABLE"),
        ("create unlogged table tu (a int)", "CREATE TABLE"),
        (
            "CREATE TABLE IF NOT EXISTS t (a int GENERATED ALWAYS AS (1) STORED)",
            "CREATE TABLE",
        ),
        (
            "CREATE TABLE tp1 PARTITION OF tp FOR VALUES FROM (1) TO (10)",
            "CREATE TABLE",
        ),
        ("ALTER TABLE t ADD COLUMN c int", "ALTER TABLE"),
        (
            "ALTER TABLE IF EXISTS ONLY t RENAME COLUMN c TO d",
            "ALTER TABLE",
        ),
        (
            "ALTER TABLE ALL IN TABLESPACE pg_default SET TABLESPACE pg_default",
            "ALTER TABLE",
        ),
        (
            "ALTER TABLE pq DETACH PARTITION pq1 FINALIZE",
            "ALTER TABLE",
        ),
        ("CREATE INDEX ON t (b)", "CREATE INDEX"),
        (
            "CREATE UNIQUE INDEX IF NOT EXISTS tb ON t (b)",
            "CREATE INDEX",
        ),
        ("ALTER INDEX tb RENAME TO tb2", "ALTER INDEX"),
        ("DROP INDEX tb2", "DROP INDEX"),
        ("CREATE SEQUENCE s", "CREATE SEQUENCE"),
        ("CREATE UNLOGGED SEQUENCE su", "CREATE SEQUENCE"),
        ("ALTER SEQUENCE s RESTART", "ALTER SEQUENCE"),
        ("DROP SEQUENCE IF EXISTS su", "DROP SEQUENCE"),
        ("CREATE VIEW v AS SELECT 1 AS x", "CREATE VIEW"),
        ("CREATE OR REPLACE VIEW v AS SELECT 1 AS x", "CREATE VIEW"),
        ("CREATE RECURSIVE VIEW rv (n) AS SELECT 1", "CREATE VIEW"),
        ("ALTER VIEW v RENAME TO v2", "ALTER VIEW"),
        ("DROP VIEW v2, rv", "DROP VIEW"),
        (
            "CREATE MATERIALIZED VIEW mv AS SELECT 1 AS x WITH DATA",
            "CREATE MATERIALIZED VIEW",
        ),
        ("REFRESH MATERIALIZED VIEW mv", "REFRESH MATERIALIZED VIEW"),
        (
            "REFRESH MATERIALIZED VIEW CONCURRENTLY mv",
            "REFRESH MATERIALIZED VIEW",
        ),
        (
            "ALTER MATERIALIZED VIEW mv RENAME TO mv2",
            "ALTER MATERIALIZED VIEW",
        ),
        ("DROP MATERIALIZED VIEW mv2", "DROP MATERIALIZED VIEW"),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
            "CREATE FUNCTION",
        ),
        (
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 2 $$",
            "CREATE FUNCTION",
        ),
        ("ALTER FUNCTION f() STABLE", "ALTER FUNCTION"),
        (
            "CREATE PROCEDURE pr() LANGUAGE sql AS $$ SELECT 1 $$",
            "CREATE PROCEDURE",
        ),
        ("ALTER PROCEDURE pr() RENAME TO pr2", "ALTER PROCEDURE"),
        ("ALTER ROUTINE pr2() RENAME TO pr3", "ALTER ROUTINE"),
        ("DROP ROUTINE pr3()", "DROP ROUTINE"),
        ("DROP FUNCTION f()", "DROP FUNCTION"),
        (
            "CREATE OR REPLACE AGGREGATE ag (int) (sfunc = int4pl, stype = int)",
            "CREATE AGGREGATE",
        ),
        ("ALTER AGGREGATE ag(int) RENAME TO ag2", "ALTER AGGREGATE"),
        ("DROP AGGREGATE ag2(int)", "DROP AGGREGATE"),
        ("CREATE TYPE en AS ENUM ('a')", "CREATE TYPE"),
        ("ALTER TYPE en ADD VALUE 'b'", "ALTER TYPE"),
        ("DROP TYPE ty, en", "DROP TYPE"),
        ("CREATE DOMAIN dm AS int CHECK (VALUE > 0)", "CREATE DOMAIN"),
        ("ALTER DOMAIN dm DROP NOT NULL", "ALTER DOMAIN"),
        ("DROP DOMAIN dm", "DROP DOMAIN"),
        ("CREATE SCHEMA sc", "CREATE SCHEMA"),
        ("CREATE SCHEMA sc2 CREATE TABLE x (a int)", "CREATE SCHEMA"),
        ("ALTER SCHEMA sc RENAME TO sc3", "ALTER SCHEMA"),
        ("DROP SCHEMA sc3 CASCADE", "DROP SCHEMA"),
        ("CREATE EXTENSION IF NOT EXISTS plpgsql", "CREATE EXTENSION"),
        ("ALTER EXTENSION plpgsql UPDATE", "ALTER EXTENSION"),
        (
            "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION trf()",
            "CREATE TRIGGER",
        ),
        (
            "CREATE OR REPLACE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION trf()",
            "CREATE TRIGGER",
        ),
        (
            "CREATE CONSTRAINT TRIGGER ctr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION trf()",
            "CREATE TRIGGER",
        ),
        ("ALTER TRIGGER tr ON t RENAME TO tr2", "ALTER TRIGGER"),
        ("DROP TRIGGER tr2 ON t", "DROP TRIGGER"),
        (
            "CREATE RULE ru AS ON UPDATE TO t DO ALSO NOTIFY t",
            "CREATE RULE",
        ),
        (
            "CREATE OR REPLACE RULE ru AS ON UPDATE TO t DO ALSO (NOTIFY t; NOTIFY t)",
            "CREATE RULE",
        ),
        ("ALTER RULE ru ON t RENAME TO ru2", "ALTER RULE"),
        ("DROP RULE ru2 ON t", "DROP RULE"),
        ("CREATE POLICY po ON t USING (true)", "CREATE POLICY"),
        ("ALTER POLICY po ON t RENAME TO po2", "ALTER POLICY"),
        ("DROP POLICY po2 ON t", "DROP POLICY"),
        (
            "CREATE COLLATION co (provider = icu, locale = 'und')",
            "CREATE COLLATION",
        ),
        ("ALTER COLLATION co RENAME TO co2", "ALTER COLLATION"),
        ("DROP COLLATION co2", "DROP COLLATION"),
        (
            "CREATE OPERATOR === (leftarg = int, rightarg = int, function = int4eq)",
            "CREATE OPERATOR",
        ),
        (
            "CREATE OPERATOR class.=== (leftarg = int, rightarg = int, function = int4eq)",
            "CREATE OPERATOR",
        ),
        (
            "ALTER OPERATOR === (int, int) OWNER TO postgres",
            "ALTER OPERATOR",
        ),
        ("DROP OPERATOR === (int, int)", "DROP OPERATOR"),
        (
            "CREATE OPERATOR FAMILY of USING btree",
            "CREATE OPERATOR FAMILY",
        ),
        (
            "ALTER OPERATOR FAMILY of USING btree RENAME TO of2",
            "ALTER OPERATOR FAMILY",
        ),
        (
            "CREATE OPERATOR CLASS oc FOR TYPE int USING btree FAMILY of2 AS OPERATOR 1 <",
            "CREATE OPERATOR CLASS",
        ),
        (
            "ALTER OPERATOR CLASS oc USING btree RENAME TO oc2",
            "ALTER OPERATOR CLASS",
        ),
        ("DROP OPERATOR CLASS oc2 USING btree", "DROP OPERATOR CLASS"),
        (
            "DROP OPERATOR FAMILY of2 USING btree",
            "DROP OPERATOR FAMILY",
        ),
        ("CREATE CAST (int AS ty2) WITHOUT FUNCTION", "CREATE CAST"),
        (
            "CREATE DEFAULT CONVERSION cv FOR 'LATIN1' TO 'UTF8' FROM iso8859_1_to_utf8",
            "CREATE CONVERSION",
        ),
        ("ALTER CONVERSION cv RENAME TO cv2", "ALTER CONVERSION"),
        ("DROP CONVERSION cv2", "DROP CONVERSION"),
        (
            "CREATE TEXT SEARCH CONFIGURATION tsc (COPY = english)",
            "CREATE TEXT SEARCH CONFIGURATION",
        ),
        (
            "ALTER TEXT SEARCH CONFIGURATION tsc RENAME TO tsc2",
            "ALTER TEXT SEARCH CONFIGURATION",
        ),
        (
            "DROP TEXT SEARCH CONFIGURATION tsc2",
            "DROP TEXT SEARCH CONFIGURATION",
        ),
        (
            "CREATE TEXT SEARCH DICTIONARY tsd (TEMPLATE = simple)",
            "CREATE TEXT SEARCH DICTIONARY",
        ),
        (
            "ALTER TEXT SEARCH DICTIONARY tsd (STOPWORDS = english)",
            "ALTER TEXT SEARCH DICTIONARY",
        ),
        (
            "DROP TEXT SEARCH DICTIONARY tsd",
            "DROP TEXT SEARCH DICTIONARY",
        ),
        ("CREATE STATISTICS st ON a, b FROM t", "CREATE STATISTICS"),
        ("ALTER STATISTICS st SET STATISTICS 10", "ALTER STATISTICS"),
        ("DROP STATISTICS st", "DROP STATISTICS"),
        (
            "CREATE ACCESS METHOD am TYPE TABLE HANDLER heap_tableam_handler",
            "CREATE ACCESS METHOD",
        ),
        ("DROP ACCESS METHOD am", "DROP ACCESS METHOD"),
        (
            "CREATE TRUSTED PROCEDURAL LANGUAGE lx HANDLER plpgsql_call_handler",
            "CREATE LANGUAGE",
        ),
        ("ALTER LANGUAGE lx RENAME TO lx2", "ALTER LANGUAGE"),
        ("DROP LANGUAGE lx2", "DROP LANGUAGE"),
        (
            "CREATE FOREIGN DATA WRAPPER fdw",
            "CREATE FOREIGN DATA WRAPPER",
        ),
        (
            "ALTER FOREIGN DATA WRAPPER fdw OPTIONS (ADD a '1')",
            "ALTER FOREIGN DATA WRAPPER",
        ),
        (
            "CREATE SERVER srv FOREIGN DATA WRAPPER fdw",
            "CREATE SERVER",
        ),
        ("ALTER SERVER srv OPTIONS (ADD b '1')", "ALTER SERVER"),
        (
            "CREATE USER MAPPING FOR postgres SERVER srv",
            "CREATE USER MAPPING",
        ),
        (
            "ALTER USER MAPPING FOR postgres SERVER srv OPTIONS (ADD c '1')",
            "ALTER USER MAPPING",
        ),
        (
            "CREATE FOREIGN TABLE ft (a int) SERVER srv",
            "CREATE FOREIGN TABLE",
        ),
        (
            "ALTER FOREIGN TABLE ft ADD COLUMN b int",
            "ALTER FOREIGN TABLE",
        ),
        (
            "IMPORT FOREIGN SCHEMA public FROM SERVER srv INTO public",
            "IMPORT FOREIGN SCHEMA",
        ),
        ("DROP FOREIGN TABLE ft", "DROP FOREIGN TABLE"),
        (
            "DROP USER MAPPING FOR postgres SERVER srv",
            "DROP USER MAPPING",
        ),
        ("DROP SERVER srv", "DROP SERVER"),
        ("DROP FOREIGN DATA WRAPPER fdw", "DROP FOREIGN DATA WRAPPER"),
        (
            "CREATE EVENT TRIGGER et ON ddl_command_start EXECUTE FUNCTION etf()",
            "CREATE EVENT TRIGGER",
        ),
        (
            "CREATE TRANSFORM FOR int LANGUAGE sql (FROM SQL WITH FUNCTION f(internal))",
            "CREATE TRANSFORM",
        ),
        ("COMMENT ON TABLE t IS 'x'", "COMMENT"),
        ("COMMENT ON COLUMN t.a IS 'x'", "COMMENT"),
        ("GRANT SELECT ON t TO public", "GRANT"),
        ("GRANT SELECT (a, b) ON TABLE t TO public", "GRANT"),
        (
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO public",
            "GRANT",
        ),
        ("GRANT USAGE ON FOREIGN SERVER srv TO public", "GRANT"),
        ("REVOKE SELECT ON t FROM public", "REVOKE"),
        ("REVOKE GRANT OPTION FOR SELECT ON t FROM public", "REVOKE"),
        (
            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO public",
            "ALTER DEFAULT PRIVILEGES",
        ),
        ("SECURITY LABEL ON TABLE t IS 'x'", "SECURITY LABEL"),
        (
            "SECURITY LABEL FOR selinux ON TABLE t IS 'x'",
            "SECURITY LABEL",
        ),
        ("REASSIGN OWNED BY a TO postgres", "REASSIGN OWNED"),
        ("DROP OWNED BY a", "DROP OWNED"),
        ("/* c */ create  -- x\n table \"T\" (a int)", "CREATE TABLE"),
    ];

    #[test]
    fn tags() {
        for (sql, expected) in TAGS {
            assert_eq!(tag(sql).as_deref(), Some(*expected), "{sql}");
        }
    }

    #[test]
    fn not_replicated() {
        for sql in [
            "CREATE DATABASE d",
            "ALTER DATABASE d SET work_mem = '8MB'",
            "DROP DATABASE IF EXISTS d",
            "CREATE ROLE r",
            "CREATE USER u",
            "ALTER USER u PASSWORD 'x'",
            "ALTER GROUP g ADD USER u",
            "DROP ROLE r",
            "CREATE TABLESPACE ts LOCATION '/tmp'",
            "ALTER TABLESPACE ts RENAME TO ts2",
            "CREATE PUBLICATION p FOR ALL TABLES",
            "ALTER PUBLICATION p ADD TABLE t",
            "DROP SUBSCRIPTION s",
            "ALTER SYSTEM SET work_mem = '8MB'",
            "ALTER LARGE OBJECT 1 OWNER TO postgres",
            "COMMENT ON DATABASE d IS 'x'",
            "COMMENT ON ROLE r IS 'x'",
            "SECURITY LABEL ON ROLE r IS 'x'",
            "GRANT r1 TO postgres",
            "REVOKE r1 FROM postgres",
            "REVOKE ADMIN OPTION FOR r1 FROM postgres",
            "GRANT CONNECT ON DATABASE d TO public",
            "GRANT CREATE ON TABLESPACE ts TO public",
            "GRANT SET ON PARAMETER work_mem TO public",
            "GRANT SELECT ON LARGE OBJECT 1 TO public",
            "CREATE TEMP TABLE tt (a int)",
            "CREATE TEMPORARY TABLE tt AS SELECT 1",
            "CREATE GLOBAL TEMPORARY TABLE tt (a int)",
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            "CREATE TEMP SEQUENCE s",
            "CREATE TABLE pg_temp.x (a int)",
            "CREATE TABLE pg_temp.x AS SELECT 1",
            "CREATE INDEX ON pg_temp.x (a)",
            "ALTER TABLE pg_temp_3.x ADD COLUMN b int",
            "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE TABLE pgrelay.applied (a int)",
            "ALTER TABLE \"pgrelay\".statement_log ADD COLUMN x int",
            "CREATE SCHEMA pgrelay",
            "CREATE SCHEMA IF NOT EXISTS pgrelay",
            "DROP SCHEMA IF EXISTS pgrelay CASCADE",
            "GRANT USAGE ON SCHEMA pgrelay TO public",
            "GRANT SELECT ON ALL TABLES IN SCHEMA pgrelay TO public",
            "COMMENT ON TABLE pgrelay.applied IS 'x'",
            "IMPORT FOREIGN SCHEMA r FROM SERVER s INTO pgrelay",
            "SELECT * INTO TEMP x FROM t",
            "SELECT * INTO TEMPORARY TABLE x FROM t",
            "SELECT 1 INTO pg_temp.x",
            "SELECT 1",
            "INSERT INTO t VALUES (1)",
            "WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a",
            "WITH m AS (MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE) SELECT 1",
            "EXPLAIN CREATE TABLE x AS SELECT 1",
            "EXPLAIN SELECT 1 INTO x",
            "EXPLAIN (ANALYZE false) SELECT 1 INTO x",
            "EXPLAIN ANALYZE SELECT 1",
            "PREPARE p AS INSERT INTO t VALUES (1)",
            "TRUNCATE t",
            "REINDEX TABLE t",
            "REINDEX TABLE CONCURRENTLY t",
            "VACUUM FULL t",
            "CLUSTER t",
            "CREATE FOO x",
            "ALTER",
            "",
            "CREATE TABLE 'x",
        ] {
            assert_eq!(analyze(sql), Ddl::Local, "{sql}");
        }
    }

    #[test]
    fn refused() {
        for (sql, refusal) in [
            ("CREATE TABLE x AS SELECT 1", CREATE_TABLE_AS),
            (
                "create unlogged table if not exists x (a) as table t",
                CREATE_TABLE_AS,
            ),
            ("CREATE TABLE x AS EXECUTE p", CREATE_TABLE_AS),
            (
                "CREATE TABLE public.x WITH (fillfactor = 50) AS VALUES (1)",
                CREATE_TABLE_AS,
            ),
            (
                "CREATE TABLE x AS SELECT * FROM pgrelay.applied",
                CREATE_TABLE_AS,
            ),
            ("SELECT * INTO x FROM t", SELECT_INTO),
            ("SELECT a INTO UNLOGGED TABLE x FROM t", SELECT_INTO),
            ("WITH a AS (SELECT 1) SELECT * INTO x FROM a", SELECT_INTO),
            ("(SELECT 1 INTO x)", SELECT_INTO),
            (
                "EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
                EXPLAIN_ANALYZE,
            ),
            (
                "EXPLAIN (ANALYZE, BUFFERS) SELECT 1 INTO x",
                EXPLAIN_ANALYZE,
            ),
            (
                "EXPLAIN ANALYZE VERBOSE CREATE MATERIALIZED VIEW mv AS SELECT 1",
                EXPLAIN_ANALYZE,
            ),
            ("PREPARE p (int) AS SELECT $1 INTO x", PREPARED_SELECT_INTO),
        ] {
            assert_eq!(analyze(sql), Ddl::Refused(refusal), "{sql}");
        }
    }

    #[test]
    fn concurrently_is_replicated_after_success() {
        for (sql, expected) in [
            ("CREATE INDEX CONCURRENTLY i ON t (a)", "CREATE INDEX"),
            (
                "create unique index concurrently if not exists i on t (a)",
                "CREATE INDEX",
            ),
            ("DROP INDEX CONCURRENTLY IF EXISTS i", "DROP INDEX"),
            (
                "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY",
                "ALTER TABLE",
            ),
        ] {
            match analyze(sql) {
                Ddl::AfterSuccess(r) => assert_eq!(r.tag, expected, "{sql}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
    }

    fn relations(sql: &str) -> Vec<String> {
        match analyze(sql) {
            Ddl::Transactional(r) | Ddl::AfterSuccess(r) => r.relations,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn relations_for_the_temporary_check() {
        assert_eq!(
            relations("ALTER TABLE IF EXISTS ONLY t ADD COLUMN c int"),
            ["t"]
        );
        assert_eq!(
            relations("DROP TABLE IF EXISTS a, \"B\", s.c CASCADE"),
            ["a", "\"B\""]
        );
        assert_eq!(relations("DROP INDEX CONCURRENTLY i"), ["i"]);
        assert_eq!(relations("CREATE UNIQUE INDEX i ON ONLY t (a)"), ["t"]);
        assert_eq!(
            relations("CREATE INDEX CONCURRENTLY ON t USING btree (a)"),
            ["t"]
        );
        assert_eq!(
            relations("CREATE TRIGGER x AFTER UPDATE OF a ON t FOR EACH ROW EXECUTE FUNCTION f()"),
            ["t"]
        );
        assert_eq!(
            relations("CREATE RULE r AS ON INSERT TO t DO NOTHING"),
            ["t"]
        );
        assert_eq!(
            relations("CREATE OR REPLACE VIEW v AS SELECT * FROM tmp"),
            ["v"]
        );
        assert_eq!(relations("COMMENT ON COLUMN t.a IS 'x'"), ["t"]);
        assert_eq!(relations("COMMENT ON TRIGGER x ON t IS 'x'"), ["t"]);
        assert!(relations("ALTER TABLE s.t ADD COLUMN c int").is_empty());
        assert!(relations("CREATE TABLE t (a int)").is_empty());
        assert!(relations("ALTER FUNCTION f() STABLE").is_empty());
    }

    #[test]
    fn parameters() {
        assert!(has_parameters("CREATE TABLE x AS SELECT $1::int"));
        assert!(!has_parameters(
            "CREATE FUNCTION f(int) RETURNS int AS $$ SELECT $1 $$ LANGUAGE sql"
        ));
    }
}
