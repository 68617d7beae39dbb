//! Framing: splitting a byte stream into whole messages, and a cursor to read their fields.
//!
//! Sans-IO in the style of `decode(&mut BytesMut) -> Result<Option<_>, _>`: `Ok(None)` means
//! "need more bytes", an `Err` means the peer sent something invalid. Every length is checked
//! against a cap before anything is allocated for it.
//! <https://www.postgresql.org/docs/current/protocol-overview.html#PROTOCOL-MESSAGE-CONCEPTS>

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::ProtocolError;

/// Largest startup packet a client may send (Postgres itself allows 10000 bytes).
pub const MAX_STARTUP_PACKET: usize = 10 * 1024;
/// Largest message of the types that carry SQL or data (Query, Parse, Bind, CopyData,
/// FunctionCall): Postgres's `PQ_LARGE_MESSAGE_LIMIT`.
pub const MAX_MESSAGE: usize = 1 << 30;
/// Largest message of every other type a client may send once logged in (Sync, Describe,
/// Execute, Close, CopyDone, CopyFail, ...); Postgres's `PQ_SMALL_MESSAGE_LIMIT` is 10000.
pub const MAX_SMALL_MESSAGE: usize = 10 * 1024;
/// Largest message a client may send before it logged in (a password or SASL message):
/// Postgres's `PG_MAX_AUTH_TOKEN_LENGTH`.
pub const MAX_AUTH_MESSAGE: usize = 65535;

/// One complete tagged message, kept as the original bytes so it can be forwarded unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The whole message: tag, length, body.
    raw: Bytes,
}

impl Frame {
    /// Builds a frame from a tag and body (used by message builders and tests).
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut buf = BytesMut::with_capacity(body.len() + 5);
        buf.put_u8(tag);
        buf.put_i32(i32::try_from(body.len() + 4).unwrap_or(i32::MAX));
        buf.put_slice(body);
        Frame { raw: buf.freeze() }
    }

    pub fn tag(&self) -> u8 {
        self.raw.first().copied().unwrap_or(0)
    }

    /// The message body, after the tag and length.
    pub fn body(&self) -> Bytes {
        self.raw.slice(5.min(self.raw.len())..)
    }

    /// The whole message as sent on the wire.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn into_raw(self) -> Bytes {
        self.raw
    }
}

/// The big-endian i32 at the start of `bytes`, if there are four bytes.
pub fn be_i32(bytes: &[u8]) -> Option<i32> {
    let four: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    Some(i32::from_be_bytes(four))
}

/// Splits one tagged message of at most `max` bytes off the front of `buf`.
pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, ProtocolError> {
    decode_frame_capped(buf, |_| max)
}

/// Splits one tagged message off the front of `buf`; `cap` gives the largest message of a
/// type (by its tag), checked as soon as the header is there. Allocates nothing: the caller
/// grows `buf` as bytes arrive (a header announcing a large message reserves nothing).
pub fn decode_frame_capped(
    buf: &mut BytesMut,
    cap: impl Fn(u8) -> usize,
) -> Result<Option<Frame>, ProtocolError> {
    let Some(total) = announced_len(buf)? else {
        return Ok(None);
    };
    let max = cap(buf.first().copied().unwrap_or(0));
    if total > max {
        return Err(ProtocolError::TooLarge { len: total, max });
    }
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame {
        raw: buf.split_to(total).freeze(),
    }))
}

/// The whole length (tag included) of the tagged message at the front of `buf`, once its
/// header is there.
pub fn announced_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    let Some(len) = buf.get(1..5).and_then(be_i32) else {
        return Ok(None);
    };
    if len < 4 {
        return Err(ProtocolError::InvalidLength(i64::from(len)));
    }
    Ok(Some(len as usize + 1))
}

/// Splits one untagged startup-phase packet (StartupMessage, SSLRequest, GSSENCRequest,
/// CancelRequest) off the front of `buf`; returns its body after the length word.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
    let Some(len) = buf.get(..4).and_then(be_i32) else {
        return Ok(None);
    };
    if len < 8 {
        return Err(ProtocolError::InvalidLength(i64::from(len)));
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_STARTUP_PACKET,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    Ok(Some(packet.freeze()))
}

/// Reads fields from a message body; every read is bounds-checked.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// `what` names the message in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn err(&self) -> ProtocolError {
        ProtocolError::malformed(self.what)
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, ProtocolError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.err())?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, ProtocolError> {
        let bytes = self.bytes(2)?;
        let bytes: [u8; 2] = bytes.try_into().map_err(|_| self.err())?;
        Ok(i16::from_be_bytes(bytes))
    }

    pub fn i32(&mut self) -> Result<i32, ProtocolError> {
        let bytes = self.bytes(4)?;
        be_i32(bytes).ok_or_else(|| self.err())
    }

    /// A 64-bit big-endian integer (WAL positions, timestamps).
    pub fn u64(&mut self) -> Result<u64, ProtocolError> {
        let bytes = self.bytes(8)?;
        let bytes: [u8; 8] = bytes.try_into().map_err(|_| self.err())?;
        Ok(u64::from_be_bytes(bytes))
    }

    pub fn i64(&mut self) -> Result<i64, ProtocolError> {
        self.u64().map(|v| v as i64)
    }

    /// A non-negative count (of parameters, formats, ...).
    pub fn count16(&mut self) -> Result<usize, ProtocolError> {
        usize::try_from(self.i16()?).map_err(|_| self.err())
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string, as raw bytes without the NUL.
    pub fn cstr_bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err())?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = rest.get(1..).unwrap_or_default();
        Ok(s)
    }

    /// A NUL-terminated string that must be UTF-8.
    pub fn cstr(&mut self) -> Result<&'a str, ProtocolError> {
        let bytes = self.cstr_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| self.err())
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Writes one tagged message into `out`, with the length filled in after `body` wrote its fields.
pub fn write_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_i32(0);
    body(out);
    let len = i32::try_from(out.len() - len_at).unwrap_or(i32::MAX);
    if let Some(slot) = out.get_mut(len_at..len_at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

/// Appends a NUL-terminated string.
pub fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn frame_needs_whole_message() {
        let frame = Frame::new(b'Q', b"SELECT 1\0");
        let raw = frame.raw().clone();
        let mut buf = BytesMut::new();
        for (i, b) in raw.iter().enumerate() {
            buf.put_u8(*b);
            let got = decode_frame(&mut buf, MAX_MESSAGE).unwrap();
            if i + 1 < raw.len() {
                assert!(got.is_none());
            } else {
                assert_eq!(got.unwrap(), frame);
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn frame_rejects_bad_lengths() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            decode_frame(&mut buf, MAX_MESSAGE),
            Err(ProtocolError::InvalidLength(3))
        );
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            decode_frame(&mut buf, MAX_MESSAGE),
            Err(ProtocolError::TooLarge { .. })
        ));
        // A negative length must not wrap around into a huge allocation.
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(decode_frame(&mut buf, MAX_MESSAGE).is_err());
    }

    #[test]
    fn caps_are_per_type_and_nothing_is_reserved() {
        let cap = |tag: u8| if tag == b'Q' { MAX_MESSAGE } else { 100 };
        let mut buf = BytesMut::from(&[b'S', 0, 0, 0, 101][..]);
        assert_eq!(
            decode_frame_capped(&mut buf, cap),
            Err(ProtocolError::TooLarge { len: 102, max: 100 })
        );
        let mut buf = BytesMut::with_capacity(16);
        buf.put_slice(&[b'Q', 0x10, 0, 0, 0]);
        assert_eq!(decode_frame_capped(&mut buf, cap), Ok(None));
        assert!(buf.capacity() < 1024, "a header reserves nothing");
    }

    #[test]
    fn startup_packet_capped() {
        let mut buf = BytesMut::new();
        buf.put_i32(20_000);
        buf.put_i32(196608);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(ProtocolError::TooLarge { .. })
        ));
        let mut buf = BytesMut::new();
        buf.put_i32(8);
        buf.put_i32(80877103);
        let body = decode_startup(&mut buf).unwrap().unwrap();
        assert_eq!(&body[..], &80877103i32.to_be_bytes());
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(b"ab", "test");
        assert!(r.cstr().is_err());
        let mut r = Reader::new(b"a\0\0\x01", "test");
        assert_eq!(r.cstr().unwrap(), "a");
        assert!(r.i32().is_err());
        assert_eq!(r.i16().unwrap(), 1);
        assert!(r.u8().is_err());
    }

    #[test]
    fn write_message_fills_length() {
        let mut out = BytesMut::new();
        write_message(&mut out, b'Z', |b| b.put_u8(b'I'));
        assert_eq!(&out[..], &[b'Z', 0, 0, 0, 5, b'I']);
    }
}
