//! The follower's replies to the applier's pipelined statements: each one checked in order
//! (an UPDATE or DELETE that found no row means the follower diverged), and a group's position
//! and counts taken once the ReadyForQuery behind its COMMIT arrived.

use crate::protocol::backend::{self as be, tag};
use crate::protocol::frontend as fe;

use super::super::RowError;
use super::{follower_io, Applier, Committed, Op, PendingSync};

impl Applier {
    pub(super) fn queue_sync(&mut self, commit: Option<Committed>) {
        fe::sync(&mut self.conn.wbuf);
        self.syncs.push_back(PendingSync {
            checks: self.unsynced,
            commit,
        });
        self.unsynced = 0;
    }

    /// Groups sent whose commit the follower has not confirmed yet.
    pub fn in_flight(&self) -> bool {
        !self.syncs.is_empty()
    }

    /// Waits until the follower answered everything sent.
    pub async fn wait_all(&mut self) -> Result<(), RowError> {
        self.conn.flush().await.map_err(follower_io)?;
        while !self.syncs.is_empty() {
            self.read_reply().await?;
        }
        Ok(())
    }

    /// Reads and checks one reply of the follower. Cancel-safe: the read keeps partial input
    /// buffered, and the reply is handled without awaiting.
    pub async fn read_reply(&mut self) -> Result<(), RowError> {
        let frame = self.conn.read_frame().await.map_err(follower_io)?;
        self.on_reply(&frame)
    }

    pub(super) fn on_reply(
        &mut self,
        frame: &crate::protocol::codec::Frame,
    ) -> Result<(), RowError> {
        match frame.tag() {
            tag::COMMAND_COMPLETE => {
                let check = self.checks.pop_front();
                // Replies come in order: the oldest Sync's first, then those of statements no
                // Sync follows yet.
                match self.syncs.front_mut() {
                    Some(sync) => sync.checks = sync.checks.saturating_sub(1),
                    None => self.unsynced = self.unsynced.saturating_sub(1),
                }
                if self.failure.is_some() {
                    return Ok(());
                }
                let Some(check) = check else {
                    return Ok(());
                };
                let body = frame.body();
                let command = be::parse_command_complete(&body).unwrap_or_default();
                let rows = command
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok());
                match check.op {
                    Op::Update | Op::Delete if rows == Some(0) => {
                        self.failure = Some(RowError::Diverged(format!(
                            "the row to {} in {} is missing on follower \"{}\"",
                            if check.op == Op::Update {
                                "update"
                            } else {
                                "delete"
                            },
                            self.table_name(check.relation),
                            self.follower
                        )));
                    }
                    Op::Insert => self.rows[0] += 1,
                    Op::Update => self.rows[1] += 1,
                    Op::Delete => self.rows[2] += 1,
                    Op::Truncate => self.rows[3] += 1,
                    Op::Record | Op::Other => {}
                }
            }
            tag::ERROR_RESPONSE if self.failure.is_none() => {
                let f = be::parse_error_fields(&frame.body()).unwrap_or_default();
                if self.checks.front().is_some_and(|c| c.op == Op::Record) && f.code == "22012" {
                    self.failure = Some(RowError::Follower(format!(
                        "the position recorded in pgrelay.applied on follower \"{}\" is not where \
                         the previous group left it (a group failed to commit, or an earlier \
                         connection is still applying); starting over from what it records",
                        self.follower
                    )));
                    return Ok(());
                }
                let what = match self.checks.front() {
                    Some(c) if c.relation != 0 => {
                        format!("{:?} on {}", c.op, self.table_name(c.relation))
                    }
                    _ => "a statement".to_owned(),
                };
                self.failure = Some(RowError::Follower(format!(
                    "applying {what} failed on follower \"{}\": {} ({})",
                    self.follower, f.message, f.code
                )));
            }
            tag::READY_FOR_QUERY => {
                let Some(sync) = self.syncs.pop_front() else {
                    return Err(RowError::Follower("an unexpected ReadyForQuery".into()));
                };
                // After an error the follower skipped the rest up to the Sync.
                for _ in 0..sync.checks {
                    self.checks.pop_front();
                }
                if let Some(err) = self.failure.take() {
                    // The follower transaction is lost: the next connection starts over from
                    // the recorded position.
                    self.open = false;
                    return Err(err);
                }
                if let Some(done) = sync.commit {
                    if let Some(end) = done.end.max(done.caught_up) {
                        self.applied = self.applied.max(end);
                    }
                    if let Some(m) = &self.metrics {
                        m.apply_transactions.increment(done.transactions);
                        m.apply_inserts.increment(self.rows[0]);
                        m.apply_updates.increment(self.rows[1]);
                        m.apply_deletes.increment(self.rows[2]);
                        m.apply_truncates.increment(self.rows[3]);
                    }
                    self.rows = [0; 4];
                }
            }
            _ => {}
        }
        Ok(())
    }
}
