//! DDL in the change stream: the logical messages the session writes for DDL that passes
//! through pgrelay (see `crate::session::ddl`), run on the follower at their place in the
//! stream, with the rights of the role that ran them on the leader and with the schemas its
//! search path resolved to there.
//!
//! A message's content is, one per line: the format (`v2`), its signature
//! ([`super::super::message_key`]), the role the session logged in as, the role it ran the
//! statement as (`current_user`), the schemas of its search path, and the statement. A message
//! whose signature does not verify, or whose role the login role cannot `SET ROLE` to on the
//! follower, is refused: logged, counted in `pgrelay_replication_refused_total{reason}`, and
//! skipped; replication goes on.
//!
//! The applier's connection is a superuser's, so the statement must not be able to return to
//! it (`RESET ROLE`, `SET SESSION AUTHORIZATION`): a statement inside a transaction runs in a
//! `SECURITY DEFINER` function created for it and owned by its role, where Postgres forbids
//! changing the role at all; one that cannot run in a transaction (`CONCURRENTLY`) runs after
//! `SET ROLE`, and only if pgrelay's own analysis finds exactly one such statement in it.

use tracing::warn;

use crate::protocol::pgoutput::LogicalMessage;
use crate::routing::classify::statement_spans;
use crate::routing::ddl::{self as rddl, dollar_tag, Ddl, MESSAGE_VERSION};
use crate::routing::lexer::StringMode;

use super::super::super::positions::{format_lsn, Position};
use super::super::setup::{ident, literal};
use super::super::RowError;
use super::{Applier, DDL_PREFIX};

/// The function a transactional statement runs in (created and dropped in the applying
/// transaction).
const DDL_FUNCTION: &str = "pgrelay.apply_ddl";

/// A verified message.
struct Signed<'a> {
    login: &'a str,
    role: &'a str,
    schemas: &'a str,
    sql: &'a str,
}

/// Why a message is refused (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not in pgrelay's signed format.
    Unsigned,
    /// The signature does not match.
    Signature,
    /// The login role may not act as the role the message names.
    Role,
    /// Not one statement of the kind pgrelay writes outside a transaction.
    Statement,
}

impl Refused {
    /// Its `reason` label (one of [`crate::metrics::REFUSED_REASONS`]).
    pub fn label(self) -> &'static str {
        match self {
            Refused::Unsigned => "unsigned",
            Refused::Signature => "signature",
            Refused::Role => "role",
            Refused::Statement => "statement",
        }
    }
}

impl Applier {
    fn refuse(&self, at: Position, why: Refused, detail: &str) {
        warn!(
            follower = %self.follower,
            position = %format_lsn(at),
            reason = why.label(),
            detail,
            "refused a DDL message that pgrelay did not write or that its role may not run"
        );
        if let Some(m) = &self.metrics {
            m.refused(why.label());
        }
    }

    /// The message's parts, if its signature verifies.
    fn verify<'a>(&self, text: &'a str) -> Result<Signed<'a>, (Refused, String)> {
        let mut parts = text.splitn(6, '\n');
        let (Some(version), Some(signature), Some(login), Some(role), Some(schemas), Some(sql)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err((Refused::Unsigned, "not in pgrelay's message format".into()));
        };
        if version != MESSAGE_VERSION {
            return Err((Refused::Unsigned, "not in pgrelay's message format".into()));
        }
        let Some(key) = &self.key else {
            return Err((Refused::Signature, "no message key to check it with".into()));
        };
        if !key.verify(login, sql, signature) {
            return Err((Refused::Signature, format!("claims login role \"{login}\"")));
        }
        Ok(Signed {
            login,
            role,
            schemas,
            sql,
        })
    }

    /// A logical message: DDL that passed through pgrelay, executed at its place in the stream.
    pub(super) async fn message(
        &mut self,
        at: Position,
        m: LogicalMessage,
    ) -> Result<(), RowError> {
        if m.prefix != DDL_PREFIX {
            return Ok(());
        }
        if m.transactional && self.skipping {
            return Ok(());
        }
        if !m.transactional && at < self.applied {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&m.content).into_owned();
        let signed = match self.verify(&text) {
            Ok(s) => s,
            Err((why, detail)) => {
                self.refuse(at, why, &detail);
                return Ok(());
            }
        };
        let (login, role, schemas, sql) = (signed.login, signed.role, signed.schemas, signed.sql);
        let follower = self.follower.clone();
        let fail = move |e: crate::backend::QueryError| {
            RowError::Follower(format!(
                "DDL from the leader failed on follower \"{follower}\": {} ({})",
                e.message, e.code
            ))
        };
        if !m.transactional {
            // Whatever is queued is committed first; the statement then runs on its own.
            self.finish_group().await?;
            self.wait_all().await?;
        } else {
            // Whatever is queued runs first, then the DDL inside the same follower transaction.
            self.sync_keep_open().await?;
        }
        // What the login role may become on the leader it may become here (the roles are the
        // same on every node): SET ROLE needs membership.
        let member = self
            .conn
            .query(&format!(
                "SELECT pg_catalog.pg_has_role({}, {}, 'MEMBER')",
                literal(login),
                literal(role)
            ))
            .await
            .map_err(&fail)?;
        let is_member = member
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .is_some_and(|v| v == "t");
        if !is_member {
            self.refuse(
                at,
                Refused::Role,
                &format!("login role \"{login}\" is not a member of \"{role}\""),
            );
            if !m.transactional {
                self.record_past(at).await.map_err(&fail)?;
            }
            return Ok(());
        }
        if m.transactional {
            let body = format!(
                "BEGIN EXECUTE {q}{sql}{q}; END",
                q = dollar_tag("ddl", &[sql])
            );
            let o = dollar_tag("pgrelay", &[&body]);
            let run = format!(
                "SELECT pg_catalog.set_config('search_path', {schemas}, true); \
                 CREATE OR REPLACE FUNCTION {DDL_FUNCTION}() RETURNS void LANGUAGE plpgsql \
                   SECURITY DEFINER SET search_path FROM CURRENT AS {o}{body}{o}; \
                 SELECT pg_catalog.set_config('search_path', '\"$user\", public', true); \
                 ALTER FUNCTION {DDL_FUNCTION}() OWNER TO {role}; \
                 SELECT {DDL_FUNCTION}(); \
                 DROP FUNCTION IF EXISTS {DDL_FUNCTION}()",
                schemas = literal(schemas),
                role = ident(role),
            );
            self.conn.query(&run).await.map_err(&fail)?;
            self.tables.clear();
            self.generation += 1;
            return Ok(());
        }
        // Not transactional (CREATE INDEX CONCURRENTLY and the like): it runs on its own,
        // after everything before it, and its position is recorded right after. Behind SET
        // ROLE, so only if it is exactly one statement pgrelay writes this way.
        let one_statement = statement_spans(sql, StringMode::Standard)
            .is_ok_and(|spans| spans.len() == 1)
            && statement_spans(sql, StringMode::Backslash).is_ok_and(|spans| spans.len() == 1);
        if !one_statement || !matches!(rddl::analyze(sql), Ddl::AfterSuccess(_)) {
            self.refuse(
                at,
                Refused::Statement,
                "not one statement that runs outside a transaction",
            );
            self.record_past(at).await.map_err(&fail)?;
            return Ok(());
        }
        let setup = format!(
            "SELECT pg_catalog.set_config('role', {}, false), \
             pg_catalog.set_config('search_path', {}, false)",
            literal(role),
            literal(schemas)
        );
        let reset = "SELECT pg_catalog.set_config('role', 'none', false), \
                     pg_catalog.set_config('search_path', '\"$user\", public', false)";
        self.conn.query(&setup).await.map_err(&fail)?;
        // Possibly run already, before a crash that came before its position was recorded.
        self.apply_outside_transaction(sql).await?;
        self.conn.query(reset).await.map_err(&fail)?;
        self.record_past(at).await.map_err(&fail)
    }

    /// Records the position one past the non-transactional message at `at`, so that a restart
    /// does not run it again.
    async fn record_past(&mut self, at: Position) -> Result<(), crate::backend::QueryError> {
        let next = at + 1;
        let record = self
            .record_sql
            .replace("$1", &literal(&format_lsn(self.recorded)))
            .replace("$2", &literal(&format_lsn(next)));
        self.conn.query(&format!("BEGIN; {record}; COMMIT")).await?;
        self.recorded = next;
        self.applied = self.applied.max(next);
        Ok(())
    }
}
