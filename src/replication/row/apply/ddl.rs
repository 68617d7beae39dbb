//! DDL in the change stream: the logical messages the session writes for DDL that passes
//! through pgrelay (see `crate::session::ddl`), run on the follower at their place in the
//! stream, as the role that ran them on the leader and with the schemas its search path
//! resolved to there.

use crate::protocol::pgoutput::LogicalMessage;

use super::super::super::positions::{format_lsn, Position};
use super::super::setup::literal;
use super::super::RowError;
use super::{Applier, DDL_PREFIX};

impl Applier {
    /// A logical message: DDL that passed through pgrelay, executed at its place in the stream.
    pub(super) async fn message(
        &mut self,
        at: Position,
        m: LogicalMessage,
    ) -> Result<(), RowError> {
        if m.prefix != DDL_PREFIX {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&m.content).into_owned();
        let mut parts = text.splitn(3, '\n');
        let (Some(role), Some(schemas), Some(sql)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(RowError::Decode(format!(
                "a DDL message at {} has no role and schemas",
                format_lsn(at)
            )));
        };
        let follower = self.follower.clone();
        let fail = move |e: crate::backend::QueryError| {
            RowError::Follower(format!(
                "DDL from the leader failed on follower \"{follower}\": {} ({})",
                e.message, e.code
            ))
        };
        // As the role that ran it (objects get the same owner) and with the schemas its
        // search_path resolved to on the leader.
        let setup = |local: bool| {
            format!(
                "SELECT pg_catalog.set_config('role', {}, {local}), \
                 pg_catalog.set_config('search_path', {}, {local})",
                literal(role),
                literal(schemas)
            )
        };
        let reset = |local: bool| {
            format!(
                "SELECT pg_catalog.set_config('role', 'none', {local}), \
                 pg_catalog.set_config('search_path', '\"$user\", public', {local})"
            )
        };
        if m.transactional {
            if self.skipping {
                return Ok(());
            }
            // Whatever is queued runs first, then the DDL inside the same follower transaction.
            self.sync_keep_open().await?;
            let sql = format!("{}; {sql}", setup(true));
            self.conn.query(&sql).await.map_err(&fail)?;
            self.conn.query(&reset(true)).await.map_err(&fail)?;
            self.tables.clear();
            self.generation += 1;
            return Ok(());
        }
        // Not transactional (CREATE INDEX CONCURRENTLY and the like): it runs on its own,
        // after everything before it, and its position is recorded right after.
        if at < self.applied {
            return Ok(());
        }
        self.finish_group().await?;
        self.wait_all().await?;
        self.conn.query(&setup(false)).await.map_err(&fail)?;
        // Possibly run already, before a crash that came before its position was recorded.
        self.apply_outside_transaction(sql).await?;
        self.conn.query(&reset(false)).await.map_err(&fail)?;
        // One past the message, so that a restart does not run it again.
        let next = at + 1;
        let record = self
            .record_sql
            .replace("$1", &literal(&format_lsn(self.recorded)))
            .replace("$2", &literal(&format_lsn(next)));
        self.conn
            .query(&format!("BEGIN; {record}; COMMIT"))
            .await
            .map_err(&fail)?;
        self.recorded = next;
        self.applied = self.applied.max(next);
        Ok(())
    }
}
