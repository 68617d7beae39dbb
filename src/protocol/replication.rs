//! The streaming-replication sub-protocol spoken inside CopyData frames after
//! `START_REPLICATION` on a `replication=database` connection: WAL data and keepalives from the
//! walsender, standby status updates back to it. Only the bodies of CopyData ('d') frames are
//! handled here; framing is [`super::codec`]'s job.
//! <https://www.postgresql.org/docs/current/protocol-replication.html>

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{write_message, Reader};
use super::ProtocolError;

/// First bytes of the messages carried inside CopyData.
pub mod tag {
    /// The CopyData frame itself.
    pub const COPY_DATA: u8 = b'd';
    /// XLogData, from the walsender.
    pub const XLOG_DATA: u8 = b'w';
    /// Primary keepalive, from the walsender.
    pub const KEEPALIVE: u8 = b'k';
    /// Standby status update, to the walsender.
    pub const STANDBY_STATUS_UPDATE: u8 = b'r';
}

/// Seconds from the Unix epoch to the Postgres epoch, 2000-01-01 00:00:00 UTC.
const POSTGRES_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// A message the walsender sends inside CopyData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    XLogData(XLogData),
    Keepalive(Keepalive),
}

/// A chunk of WAL; with logical replication, one message of the output plugin
/// (for pgoutput, see [`super::pgoutput::decode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    /// The LSN where `data` starts.
    pub wal_start: u64,
    /// The end of WAL on the server when this was sent.
    pub wal_end: u64,
    /// Microseconds since the Postgres epoch (see [`system_time`]).
    pub send_time: i64,
    /// A zero-copy slice of the CopyData body.
    pub data: Bytes,
}

/// The walsender's keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// The end of WAL on the server.
    pub wal_end: u64,
    /// Microseconds since the Postgres epoch (see [`system_time`]).
    pub send_time: i64,
    /// The server wants a standby status update as soon as possible (it will otherwise end the
    /// connection after `wal_sender_timeout`).
    pub reply_requested: bool,
}

/// Decodes the body of one CopyData frame sent by the walsender ('w' or 'k').
pub fn decode_server_message(body: Bytes) -> Result<ServerMessage, ProtocolError> {
    let mut r = Reader::new(&body, "replication CopyData");
    match r.u8()? {
        tag::XLOG_DATA => {
            let mut r = Reader::new(r.rest(), "XLogData");
            let wal_start = r.u64()?;
            let wal_end = r.u64()?;
            let send_time = r.i64()?;
            let data = body.slice_ref(r.rest());
            Ok(ServerMessage::XLogData(XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            }))
        }
        tag::KEEPALIVE => {
            let mut r = Reader::new(r.rest(), "primary keepalive");
            let wal_end = r.u64()?;
            let send_time = r.i64()?;
            // Postgres's own receivers treat any non-zero byte as "reply requested".
            let reply_requested = r.u8()? != 0;
            if r.remaining() != 0 {
                return Err(ProtocolError::malformed("primary keepalive"));
            }
            Ok(ServerMessage::Keepalive(Keepalive {
                wal_end,
                send_time,
                reply_requested,
            }))
        }
        other => Err(ProtocolError::UnexpectedMessage(other)),
    }
}

/// Appends a complete CopyData frame ('d', length, then 'r' standby status update) to `out`.
///
/// `written`, `flushed` and `applied` are each the LSN of the last WAL byte + 1 the client has
/// reached; `now` is microseconds since the Postgres epoch (see [`postgres_time`]).
pub fn standby_status_update(
    out: &mut BytesMut,
    written: u64,
    flushed: u64,
    applied: u64,
    now: i64,
    reply_requested: bool,
) {
    write_message(out, tag::COPY_DATA, |b| {
        b.put_u8(tag::STANDBY_STATUS_UPDATE);
        b.put_u64(written);
        b.put_u64(flushed);
        b.put_u64(applied);
        b.put_i64(now);
        b.put_u8(u8::from(reply_requested));
    });
}

/// Microseconds since 2000-01-01 (the Postgres epoch) for a SystemTime; and the reverse.
///
/// Saturates at `i64::MIN`/`i64::MAX` for times some 292,000 years away.
pub fn postgres_time(t: SystemTime) -> i64 {
    let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECS);
    match t.duration_since(epoch) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => {
            let micros = i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX);
            -micros
        }
    }
}

/// The SystemTime for microseconds since 2000-01-01 (the Postgres epoch); the reverse of
/// [`postgres_time`].
///
/// Every `i64` is representable on Unix; a platform whose SystemTime cannot hold the result gets
/// the Postgres epoch itself rather than a panic.
pub fn system_time(pg_micros: i64) -> SystemTime {
    let epoch = UNIX_EPOCH + Duration::from_secs(POSTGRES_EPOCH_UNIX_SECS);
    let offset = Duration::from_micros(pg_micros.unsigned_abs());
    let t = if pg_micros >= 0 {
        epoch.checked_add(offset)
    } else {
        epoch.checked_sub(offset)
    };
    t.unwrap_or(epoch)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::protocol::codec::{decode_frame, MAX_MESSAGE};

    fn xlog_data_body(start: u64, end: u64, time: i64, data: &[u8]) -> Vec<u8> {
        let mut body = vec![b'w'];
        body.extend_from_slice(&start.to_be_bytes());
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.extend_from_slice(data);
        body
    }

    fn keepalive_body(end: u64, time: i64, reply: u8) -> Vec<u8> {
        let mut body = vec![b'k'];
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.push(reply);
        body
    }

    #[test]
    fn decodes_xlog_data_without_copying() {
        let body = Bytes::from(xlog_data_body(0x1_0000_0028, 0x1_0000_0100, -5, b"B\0\x01"));
        let msg = decode_server_message(body.clone()).unwrap();
        let ServerMessage::XLogData(x) = msg else {
            panic!("not XLogData: {msg:?}");
        };
        assert_eq!(x.wal_start, 0x1_0000_0028);
        assert_eq!(x.wal_end, 0x1_0000_0100);
        assert_eq!(x.send_time, -5);
        assert_eq!(&x.data[..], b"B\0\x01");
        // Same memory as the input: a slice, not a copy.
        assert_eq!(x.data.as_ptr(), body[25..].as_ptr());
    }

    #[test]
    fn decodes_empty_xlog_data() {
        let body = Bytes::from(xlog_data_body(1, 2, 3, b""));
        let ServerMessage::XLogData(x) = decode_server_message(body).unwrap() else {
            panic!("not XLogData");
        };
        assert!(x.data.is_empty());
    }

    #[test]
    fn decodes_keepalive() {
        let body = Bytes::from(keepalive_body(u64::MAX, 42, 1));
        assert_eq!(
            decode_server_message(body).unwrap(),
            ServerMessage::Keepalive(Keepalive {
                wal_end: u64::MAX,
                send_time: 42,
                reply_requested: true,
            })
        );
        let body = Bytes::from(keepalive_body(7, 0, 0));
        let ServerMessage::Keepalive(k) = decode_server_message(body).unwrap() else {
            panic!("not a keepalive");
        };
        assert!(!k.reply_requested);
    }

    #[test]
    fn rejects_truncated_and_padded_messages() {
        for valid in [xlog_data_body(1, 2, 3, b""), keepalive_body(1, 2, 1)] {
            for len in 0..valid.len() {
                let prefix = Bytes::copy_from_slice(&valid[..len]);
                assert!(decode_server_message(prefix).is_err(), "prefix {len}");
            }
        }
        let mut padded = keepalive_body(1, 2, 1);
        padded.push(0);
        assert!(decode_server_message(Bytes::from(padded)).is_err());
    }

    #[test]
    fn rejects_unknown_tag() {
        assert_eq!(
            decode_server_message(Bytes::from_static(b"r")),
            Err(ProtocolError::UnexpectedMessage(b'r'))
        );
    }

    #[test]
    fn standby_status_update_is_a_copy_data_frame() {
        let mut out = BytesMut::new();
        standby_status_update(&mut out, 0x10, 0x20, 0x30, 1_000_000, true);
        assert_eq!(out.len(), 1 + 4 + 1 + 8 * 4 + 1);
        let frame = decode_frame(&mut out, MAX_MESSAGE).unwrap().unwrap();
        assert!(out.is_empty());
        assert_eq!(frame.tag(), b'd');
        let body = frame.body();
        let mut expected = vec![b'r'];
        for v in [0x10u64, 0x20, 0x30, 1_000_000] {
            expected.extend_from_slice(&v.to_be_bytes());
        }
        expected.push(1);
        assert_eq!(&body[..], &expected[..]);
    }

    #[test]
    fn postgres_epoch_conversions() {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(946_684_800);
        assert_eq!(postgres_time(pg_epoch), 0);
        assert_eq!(postgres_time(UNIX_EPOCH), -946_684_800_000_000);
        assert_eq!(system_time(0), pg_epoch);
        // 2024-01-01 00:00:00 UTC, as Postgres reports it.
        assert_eq!(
            system_time(757_382_400_000_000),
            UNIX_EPOCH + Duration::from_secs(1_704_067_200)
        );
        for micros in [-1, 1, 757_382_400_123_456, -946_684_800_000_001] {
            assert_eq!(postgres_time(system_time(micros)), micros);
        }
        assert_eq!(postgres_time(system_time(i64::MAX)), i64::MAX);
        assert_eq!(postgres_time(system_time(i64::MIN + 1)), i64::MIN + 1);
    }
}
