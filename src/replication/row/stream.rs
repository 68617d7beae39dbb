//! The logical replication connection to the leader: a `replication=database` connection that
//! creates the slot (exporting its snapshot for the bootstrap), then streams pgoutput changes in
//! CopyBoth mode and answers with standby status updates. It reports as flushed only what the
//! follower committed, so the slot keeps everything a crash could still need.
//! <https://www.postgresql.org/docs/current/protocol-replication.html>

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::backend::BackendConn;
use crate::protocol::backend as be;
use crate::protocol::codec::Frame;
use crate::protocol::frontend as fe;
use crate::protocol::pgoutput;
use crate::protocol::replication::{self as rp, ServerMessage};

use super::super::positions::{format_lsn, parse_lsn, Position};
use super::setup::{ident, literal, PUBLICATION};
use super::RowError;

/// A slot just created, with the snapshot it exported.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    /// The position from which the slot streams every transaction that commits later.
    pub consistent_point: Position,
    /// Valid until the next command on this connection.
    pub snapshot: String,
}

/// One item of the change stream.
#[derive(Debug)]
pub enum Event {
    /// A pgoutput message, at the WAL position it was sent with.
    Change {
        at: Position,
        message: pgoutput::Message,
    },
    /// The leader has sent everything up to `wal_end`.
    Keepalive {
        wal_end: Position,
        reply_requested: bool,
    },
}

pub struct ReplicationStream {
    conn: BackendConn,
    streaming: bool,
    /// The highest WAL position received.
    received: Position,
    last_status: Instant,
    confirmed: Position,
}

impl ReplicationStream {
    pub fn new(conn: BackendConn) -> ReplicationStream {
        ReplicationStream {
            conn,
            streaming: false,
            received: 0,
            last_status: Instant::now(),
            confirmed: 0,
        }
    }

    /// Creates a logical slot with pgoutput, exporting a snapshot.
    pub async fn create_slot(&mut self, slot: &str) -> Result<CreatedSlot, RowError> {
        let rows = self
            .conn
            .query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                ident(slot)
            ))
            .await
            .map_err(|e| match e.code.as_str() {
                "53400" => RowError::Setup(format!(
                    "the leader has no free replication slot for \"{slot}\" ({}); raise \
                     max_replication_slots on the leader (it needs one per follower and \
                     database) and restart it",
                    e.message
                )),
                "42501" => RowError::Setup(format!(
                    "replication.user may not create replication slots: {}",
                    e.message
                )),
                _ => RowError::Leader(format!("creating slot \"{slot}\": {}", e.message)),
            })?;
        let row = rows.into_iter().next().unwrap_or_default();
        let consistent_point = row
            .get(1)
            .cloned()
            .flatten()
            .as_deref()
            .and_then(parse_lsn)
            .ok_or_else(|| RowError::Leader("CREATE_REPLICATION_SLOT gave no position".into()))?;
        let snapshot =
            row.get(2).cloned().flatten().ok_or_else(|| {
                RowError::Leader("CREATE_REPLICATION_SLOT gave no snapshot".into())
            })?;
        Ok(CreatedSlot {
            consistent_point,
            snapshot,
        })
    }

    /// Starts streaming the slot from `start` (the server may start later: at the slot's
    /// confirmed position).
    pub async fn start(&mut self, slot: &str, start: Position) -> Result<(), RowError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \
             \"publication_names\" {}, \"messages\" 'true')",
            ident(slot),
            format_lsn(start),
            literal(&ident(PUBLICATION)),
        );
        fe::query(&mut self.conn.wbuf, &sql);
        self.conn.flush().await.map_err(leader_io)?;
        loop {
            let frame = self.conn.read_frame().await.map_err(leader_io)?;
            match frame.tag() {
                be::tag::COPY_BOTH_RESPONSE => break,
                be::tag::ERROR_RESPONSE => {
                    let f = be::parse_error_fields(&frame.body()).unwrap_or_default();
                    return Err(RowError::Leader(format!(
                        "START_REPLICATION of slot \"{slot}\": {} ({})",
                        f.message, f.code
                    )));
                }
                // Notices and parameter reports before the stream starts.
                _ => {}
            }
        }
        self.streaming = true;
        self.received = start;
        Ok(())
    }

    /// The next change or keepalive. Cancel-safe (bytes read stay buffered).
    pub async fn next(&mut self) -> Result<Event, RowError> {
        let frame = self.conn.read_frame().await.map_err(leader_io)?;
        self.event(frame)
    }

    /// The next event if it has arrived already, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Event>, RowError> {
        match self.conn.try_frame_now().map_err(leader_io)? {
            Some(frame) => self.event(frame).map(Some),
            None => Ok(None),
        }
    }

    fn event(&mut self, frame: Frame) -> Result<Event, RowError> {
        match frame.tag() {
            fe::tag::COPY_DATA => {}
            be::tag::ERROR_RESPONSE => {
                let f = be::parse_error_fields(&frame.body()).unwrap_or_default();
                return Err(RowError::Leader(format!(
                    "replication stream: {} ({})",
                    f.message, f.code
                )));
            }
            fe::tag::COPY_DONE => {
                return Err(RowError::Leader(
                    "the leader ended the replication stream".into(),
                ))
            }
            other => {
                return Err(RowError::Leader(format!(
                    "unexpected message '{}' in the replication stream",
                    char::from(other)
                )))
            }
        }
        let body: Bytes = frame.body();
        match rp::decode_server_message(body).map_err(|e| RowError::Decode(e.to_string()))? {
            ServerMessage::XLogData(x) => {
                self.received = self.received.max(x.wal_end);
                let message =
                    pgoutput::decode(x.data).map_err(|e| RowError::Decode(e.to_string()))?;
                Ok(Event::Change {
                    at: x.wal_start,
                    message,
                })
            }
            ServerMessage::Keepalive(k) => {
                self.received = self.received.max(k.wal_end);
                Ok(Event::Keepalive {
                    wal_end: k.wal_end,
                    reply_requested: k.reply_requested,
                })
            }
        }
    }

    /// Tells the leader what the follower committed: the slot may free WAL before `flushed`.
    pub async fn send_status(&mut self, flushed: Position) -> Result<(), RowError> {
        rp::standby_status_update(
            &mut self.conn.wbuf,
            self.received.max(flushed),
            flushed,
            flushed,
            rp::postgres_time(SystemTime::now()),
            false,
        );
        self.conn.flush().await.map_err(leader_io)?;
        self.last_status = Instant::now();
        self.confirmed = flushed;
        Ok(())
    }

    /// Time since the last status update.
    pub fn since_status(&self) -> Duration {
        self.last_status.elapsed()
    }

    /// The flushed position last reported to the leader.
    pub fn confirmed(&self) -> Position {
        self.confirmed
    }

    pub async fn close(self) {
        self.conn.terminate().await;
    }
}

fn leader_io(e: std::io::Error) -> RowError {
    RowError::Leader(format!("replication connection: {e}"))
}
