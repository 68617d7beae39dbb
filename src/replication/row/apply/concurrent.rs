//! DDL that cannot run in a transaction (`CREATE INDEX CONCURRENTLY`, `DROP INDEX
//! CONCURRENTLY`, `DETACH PARTITION ... CONCURRENTLY`), applied on the follower.
//! <https://www.postgresql.org/docs/current/sql-createindex.html#SQL-CREATEINDEX-CONCURRENTLY>
//!
//! Such a statement commits on its own, before its position is recorded, so after a crash it
//! may meet what it did before: "already exists" or "does not exist". That is only taken as
//! done where the follower shows it is: an interrupted `CREATE INDEX CONCURRENTLY` leaves an
//! INVALID index behind, which is dropped (`DROP INDEX CONCURRENTLY`) and built again; a valid
//! index of that name on that table is done; a `DROP INDEX CONCURRENTLY` of an index that is
//! not there is done. Anything else is an error, reported like any other apply error (the
//! follower stops applying the database and retries), never skipped silently.

use tracing::{info, warn};

use crate::backend::QueryError;
use crate::protocol::sqlstate::{DUPLICATE_TABLE, UNDEFINED_OBJECT};
use crate::routing::lexer::{Lexer, StringMode, Token, TokenKind};

use super::super::setup::literal;
use super::super::RowError;
use super::Applier;

/// What a statement outside a transaction is, as far as checking its result goes.
#[derive(Debug, PartialEq, Eq)]
enum Statement {
    /// `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON [ONLY] table ...`.
    CreateIndex {
        /// The index name as Postgres stores it (unquoted, or folded to lower case).
        name: String,
        /// The table as written (quotes kept), for `to_regclass`.
        table: String,
    },
    /// `DROP INDEX CONCURRENTLY ...`.
    DropIndex,
    /// Anything else (an unnamed index, DETACH PARTITION, text this does not read).
    Other,
}

impl Applier {
    /// Runs `sql`, a DDL statement that cannot run in a transaction, with the role and search
    /// path already set, and makes sure the follower holds what it should: see the module doc.
    pub(super) async fn apply_outside_transaction(&mut self, sql: &str) -> Result<(), RowError> {
        let statement = Statement::parse(sql);
        match (&statement, self.conn.query(sql).await) {
            (_, Ok(_)) => {}
            (Statement::CreateIndex { .. }, Err(e)) if e.code == DUPLICATE_TABLE.code() => {
                warn!(follower = %self.follower, error = %e.message, "index outside a transaction exists already; checking it");
            }
            (Statement::DropIndex, Err(e)) if e.code == UNDEFINED_OBJECT.code() => {
                warn!(follower = %self.follower, error = %e.message, "index outside a transaction was dropped already");
                return Ok(());
            }
            (_, Err(e)) => return Err(self.ddl_failed(e)),
        }
        if let Statement::CreateIndex { name, table } = &statement {
            self.ensure_valid_index(sql, name, table).await?;
        }
        info!(follower = %self.follower, "applied DDL outside a transaction");
        Ok(())
    }

    /// The index `name` on `table` is there and valid; an INVALID one (left by an interrupted
    /// build) is dropped and built again by `sql`, once.
    async fn ensure_valid_index(
        &mut self,
        sql: &str,
        name: &str,
        table: &str,
    ) -> Result<(), RowError> {
        let Some((qualified, valid)) = self.index_state(name, table).await? else {
            return Err(self.unverified(name, table));
        };
        if valid {
            return Ok(());
        }
        warn!(follower = %self.follower, index = %qualified, "the index is INVALID (an interrupted CREATE INDEX CONCURRENTLY); dropping it and building it again");
        let drop = format!("DROP INDEX CONCURRENTLY {qualified}");
        self.conn
            .query(&drop)
            .await
            .map_err(|e| self.ddl_failed(e))?;
        self.conn.query(sql).await.map_err(|e| self.ddl_failed(e))?;
        match self.index_state(name, table).await? {
            Some((_, true)) => Ok(()),
            _ => Err(self.unverified(name, table)),
        }
    }

    /// The index `name` on `table` (qualified and quoted) and whether it is valid; None if
    /// there is no index of that name on that table.
    async fn index_state(
        &mut self,
        name: &str,
        table: &str,
    ) -> Result<Option<(String, bool)>, RowError> {
        let rows = self
            .conn
            .query(&format!(
                "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname), \
                        i.indisvalid \
                 FROM pg_catalog.pg_index i \
                 JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relname = {} AND i.indrelid = pg_catalog.to_regclass({})",
                literal(name),
                literal(table)
            ))
            .await
            .map_err(|e| self.ddl_failed(e))?;
        let mut row = rows.into_iter().next().unwrap_or_default().into_iter();
        match (row.next().flatten(), row.next().flatten()) {
            (Some(qualified), Some(valid)) => Ok(Some((qualified, valid == "t"))),
            _ => Ok(None),
        }
    }

    fn ddl_failed(&self, e: QueryError) -> RowError {
        RowError::Follower(format!(
            "DDL from the leader failed on follower \"{}\": {} ({})",
            self.follower, e.message, e.code
        ))
    }

    fn unverified(&self, name: &str, table: &str) -> RowError {
        RowError::Follower(format!(
            "CREATE INDEX CONCURRENTLY from the leader: follower \"{}\" has no valid index \
             \"{name}\" on {table} after it (another relation of that name?)",
            self.follower
        ))
    }
}

impl Statement {
    fn parse(sql: &str) -> Statement {
        let toks: Vec<Token> = Lexer::new(sql, StringMode::Standard)
            .filter(|t| !t.is_comment())
            .collect();
        let word = |i: usize, w: &str| {
            toks.get(i)
                .is_some_and(|t| t.kind == TokenKind::Ident && t.text(sql).eq_ignore_ascii_case(w))
        };
        let mut i = 0;
        if word(0, "drop") && word(1, "index") && word(2, "concurrently") {
            return Statement::DropIndex;
        }
        if !word(i, "create") {
            return Statement::Other;
        }
        i += 1;
        if word(i, "unique") {
            i += 1;
        }
        if !(word(i, "index") && word(i + 1, "concurrently")) {
            return Statement::Other;
        }
        i += 2;
        if word(i, "if") && word(i + 1, "not") && word(i + 2, "exists") {
            i += 3;
        }
        let Some(name) = toks.get(i).and_then(|t| stored_name(t, sql)) else {
            return Statement::Other;
        };
        i += 1;
        if !word(i, "on") {
            return Statement::Other;
        }
        i += 1;
        if word(i, "only") {
            i += 1;
        }
        // `name` or `schema.name`, each part plain or quoted.
        let start = i;
        while toks
            .get(i)
            .is_some_and(|t| matches!(t.kind, TokenKind::Ident | TokenKind::QuotedIdent))
        {
            i += 1;
            if toks.get(i).is_some_and(|t| t.kind == TokenKind::Dot) {
                i += 1;
            } else {
                break;
            }
        }
        match (toks.get(start), toks.get(i.saturating_sub(1))) {
            (Some(first), Some(last)) if i > start => Statement::CreateIndex {
                name,
                table: sql
                    .get(first.start..last.end)
                    .unwrap_or_default()
                    .to_owned(),
            },
            _ => Statement::Other,
        }
    }
}

/// A name token as Postgres stores it: quoted ones as written, plain ones in lower case.
fn stored_name(t: &Token, sql: &str) -> Option<String> {
    match t.kind {
        TokenKind::Ident => Some(t.text(sql).to_lowercase()),
        TokenKind::QuotedIdent => t.quoted_ident_body(sql).map(|b| b.replace("\"\"", "\"")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, table: &str) -> Statement {
        Statement::CreateIndex {
            name: name.into(),
            table: table.into(),
        }
    }

    #[test]
    fn statements_are_read() {
        assert_eq!(
            Statement::parse("CREATE INDEX CONCURRENTLY ci ON c (a)"),
            create("ci", "c")
        );
        assert_eq!(
            Statement::parse(
                "create unique index concurrently if not exists \"My\"\"Idx\" on only s.\"T\" using btree (a)"
            ),
            create("My\"Idx", "s.\"T\"")
        );
        assert_eq!(
            Statement::parse("CREATE INDEX CONCURRENTLY Ci /* x */ ON public . c(a)"),
            create("ci", "public . c")
        );
        assert_eq!(
            Statement::parse("DROP INDEX CONCURRENTLY IF EXISTS ci"),
            Statement::DropIndex
        );
        for other in [
            "CREATE INDEX CONCURRENTLY ON c (a)",
            "CREATE INDEX ci ON c (a)",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
            "CREATE INDEX CONCURRENTLY ci ON (a)",
        ] {
            assert_eq!(Statement::parse(other), Statement::Other, "{other}");
        }
    }
}
