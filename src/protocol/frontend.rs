//! Messages a client (frontend) sends: parsing the ones pgrelay inspects, building the ones
//! pgrelay sends to nodes itself.
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>

use bytes::{BufMut, BytesMut};

use super::codec::{put_cstr, write_message, Reader, MAX_MESSAGE, MAX_SMALL_MESSAGE};
use super::ProtocolError;

pub const PROTOCOL_3_0: i32 = 196608;
pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;

/// Message tags (the first byte) of frontend messages.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
    /// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
    pub const PASSWORD: u8 = b'p';
}

/// The largest message of type `t` a logged-in client may send, as Postgres's `SocketBackend`
/// decides: 1 GiB for the messages that carry SQL or data, 10 KiB for the rest.
pub fn max_message_len(t: u8) -> usize {
    match t {
        tag::QUERY | tag::PARSE | tag::BIND | tag::COPY_DATA | tag::FUNCTION_CALL => MAX_MESSAGE,
        _ => MAX_SMALL_MESSAGE,
    }
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    Startup {
        major: u16,
        minor: u16,
        params: Vec<(String, String)>,
    },
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: i32,
    },
}

/// Parses a startup-phase packet body (after the length word).
pub fn parse_startup(body: &[u8]) -> Result<StartupRequest, ProtocolError> {
    let mut r = Reader::new(body, "startup");
    let code = r.i32()?;
    match code {
        SSL_REQUEST_CODE => return Ok(StartupRequest::Ssl),
        GSSENC_REQUEST_CODE => return Ok(StartupRequest::GssEnc),
        CANCEL_REQUEST_CODE => {
            let pid = r.i32()?;
            let secret = r.i32()?;
            return Ok(StartupRequest::Cancel { pid, secret });
        }
        _ => {}
    }
    let major = (code >> 16) as u16;
    let minor = (code & 0xffff) as u16;
    if major != 3 {
        return Err(ProtocolError::UnsupportedVersion { major, minor });
    }
    let mut params = Vec::new();
    loop {
        let name = r.cstr()?;
        if name.is_empty() {
            break;
        }
        let value = r.cstr()?;
        params.push((name.to_owned(), value.to_owned()));
    }
    Ok(StartupRequest::Startup {
        major,
        minor,
        params,
    })
}

/// Parse: statement name, query text, parameter type OIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseMsg<'a> {
    pub name: &'a str,
    pub query: &'a str,
    /// How many parameter types the client declared.
    pub param_types: usize,
}

pub fn parse_parse(body: &[u8]) -> Result<ParseMsg<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Parse");
    let name = r.cstr()?;
    let query = r.cstr()?;
    let n = r.count16()?;
    r.bytes(n * 4)?;
    Ok(ParseMsg {
        name,
        query,
        param_types: n,
    })
}

/// The parameter type OIDs a Parse declares.
pub fn parse_param_types(body: &[u8]) -> Result<Vec<u32>, ProtocolError> {
    let mut r = Reader::new(body, "Parse");
    r.cstr()?;
    r.cstr()?;
    let n = r.count16()?;
    let mut types = Vec::with_capacity(n);
    for _ in 0..n {
        types.push(r.i32()? as u32);
    }
    Ok(types)
}

/// A Bind's parameters: format codes (as sent: none, one for all, or one each) and values
/// (None: NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindParams<'a> {
    pub formats: Vec<i16>,
    pub values: Vec<Option<&'a [u8]>>,
}

pub fn parse_bind_params(body: &[u8]) -> Result<BindParams<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Bind");
    r.cstr()?;
    r.cstr()?;
    let n = r.count16()?;
    let mut formats = Vec::with_capacity(n);
    for _ in 0..n {
        formats.push(r.i16()?);
    }
    let n = r.count16()?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32()?;
        values.push(match usize::try_from(len) {
            Ok(len) => Some(r.bytes(len)?),
            Err(_) => None,
        });
    }
    Ok(BindParams { formats, values })
}

/// Bind: only the names; parameters pass through untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMsg<'a> {
    pub portal: &'a str,
    pub statement: &'a str,
}

pub fn parse_bind(body: &[u8]) -> Result<BindMsg<'_>, ProtocolError> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    Ok(BindMsg { portal, statement })
}

/// Describe and Close: 'S' for a statement or 'P' for a portal, and its name.
pub fn parse_target<'a>(
    body: &'a [u8],
    what: &'static str,
) -> Result<(u8, &'a str), ProtocolError> {
    let mut r = Reader::new(body, what);
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::malformed(what));
    }
    let name = r.cstr()?;
    Ok((kind, name))
}

/// Execute: portal name (the row limit passes through).
pub fn parse_execute(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut r = Reader::new(body, "Execute");
    let portal = r.cstr()?;
    r.i32()?;
    Ok(portal)
}

/// Query: the SQL text.
pub fn parse_query(body: &[u8]) -> Result<&str, ProtocolError> {
    Reader::new(body, "Query").cstr()
}

/// SASLInitialResponse: mechanism and the initial client response.
pub fn parse_sasl_initial(body: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let mut r = Reader::new(body, "SASLInitialResponse");
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = if len < 0 {
        &[][..]
    } else {
        r.bytes(len as usize)?
    };
    Ok((mechanism, data))
}

/// StartupMessage toward a node.
pub fn startup_message(out: &mut BytesMut, params: &[(String, String)]) {
    let len_at = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(out, k.as_bytes());
        put_cstr(out, v.as_bytes());
    }
    out.put_u8(0);
    let len = i32::try_from(out.len() - len_at).unwrap_or(i32::MAX);
    if let Some(slot) = out.get_mut(len_at..len_at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

pub fn cancel_request(out: &mut BytesMut, pid: i32, secret: i32) {
    out.put_i32(16);
    out.put_i32(CANCEL_REQUEST_CODE);
    out.put_i32(pid);
    out.put_i32(secret);
}

pub fn query(out: &mut BytesMut, sql: &str) {
    write_message(out, tag::QUERY, |b| put_cstr(b, sql.as_bytes()));
}

pub fn sync(out: &mut BytesMut) {
    write_message(out, tag::SYNC, |_| {});
}

pub fn terminate(out: &mut BytesMut) {
    write_message(out, tag::TERMINATE, |_| {});
}

pub fn close_statement(out: &mut BytesMut, name: &str) {
    write_message(out, tag::CLOSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, name.as_bytes());
    });
}

pub fn close_portal(out: &mut BytesMut, name: &str) {
    write_message(out, tag::CLOSE, |b| {
        b.put_u8(b'P');
        put_cstr(b, name.as_bytes());
    });
}

/// Parse with the given parameter types (0: let the server infer).
pub fn parse(out: &mut BytesMut, name: &str, sql: &str, param_types: &[u32]) {
    write_message(out, tag::PARSE, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, sql.as_bytes());
        b.put_i16(i16::try_from(param_types.len()).unwrap_or(i16::MAX));
        for t in param_types {
            b.put_u32(*t);
        }
    });
}

/// Bind of text-format parameters (None: NULL) to the unnamed portal; results in text.
pub fn bind_text<'a>(
    out: &mut BytesMut,
    statement: &str,
    params: impl ExactSizeIterator<Item = Option<&'a [u8]>>,
) {
    bind(out, "", statement, &[], params);
}

/// Bind of `statement` to `portal` with the given parameter formats (as in Bind: none means
/// all text, one applies to all) and values (None: NULL); results in text.
pub fn bind<'a>(
    out: &mut BytesMut,
    portal: &str,
    statement: &str,
    formats: &[i16],
    params: impl ExactSizeIterator<Item = Option<&'a [u8]>>,
) {
    write_message(out, tag::BIND, |b| {
        put_cstr(b, portal.as_bytes());
        put_cstr(b, statement.as_bytes());
        b.put_i16(i16::try_from(formats.len()).unwrap_or(i16::MAX));
        for f in formats {
            b.put_i16(*f);
        }
        b.put_i16(i16::try_from(params.len()).unwrap_or(i16::MAX));
        for p in params {
            match p {
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(0);
    });
}

/// Execute of a named portal, all rows.
pub fn execute_portal(out: &mut BytesMut, portal: &str) {
    write_message(out, tag::EXECUTE, |b| {
        put_cstr(b, portal.as_bytes());
        b.put_i32(0);
    });
}

pub fn copy_data(out: &mut BytesMut, data: &[u8]) {
    write_message(out, tag::COPY_DATA, |b| b.put_slice(data));
}

/// Execute of the unnamed portal, all rows.
pub fn execute(out: &mut BytesMut) {
    write_message(out, tag::EXECUTE, |b| {
        put_cstr(b, b"");
        b.put_i32(0);
    });
}

pub fn copy_done(out: &mut BytesMut) {
    write_message(out, tag::COPY_DONE, |_| {});
}

pub fn copy_fail(out: &mut BytesMut, reason: &str) {
    write_message(out, tag::COPY_FAIL, |b| put_cstr(b, reason.as_bytes()));
}

pub fn password(out: &mut BytesMut, password: &[u8]) {
    write_message(out, tag::PASSWORD, |b| put_cstr(b, password));
}

pub fn sasl_initial_response(out: &mut BytesMut, mechanism: &str, data: &[u8]) {
    write_message(out, tag::PASSWORD, |b| {
        put_cstr(b, mechanism.as_bytes());
        b.put_i32(i32::try_from(data.len()).unwrap_or(i32::MAX));
        b.put_slice(data);
    });
}

pub fn sasl_response(out: &mut BytesMut, data: &[u8]) {
    write_message(out, tag::PASSWORD, |b| b.put_slice(data));
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::protocol::codec::{decode_frame, decode_startup, MAX_MESSAGE};

    #[test]
    fn startup_round_trip() {
        let mut out = BytesMut::new();
        let params = vec![
            ("user".to_owned(), "app".to_owned()),
            ("database".to_owned(), "db".to_owned()),
        ];
        startup_message(&mut out, &params);
        let body = decode_startup(&mut out).unwrap().unwrap();
        assert_eq!(
            parse_startup(&body).unwrap(),
            StartupRequest::Startup {
                major: 3,
                minor: 0,
                params
            }
        );
    }

    #[test]
    fn cancel_round_trip() {
        let mut out = BytesMut::new();
        cancel_request(&mut out, 7, -9);
        let body = decode_startup(&mut out).unwrap().unwrap();
        assert_eq!(
            parse_startup(&body).unwrap(),
            StartupRequest::Cancel { pid: 7, secret: -9 }
        );
    }

    #[test]
    fn rejects_protocol_2_and_garbage() {
        assert!(parse_startup(&0x0002_0000i32.to_be_bytes()).is_err());
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app"); // unterminated
        assert!(parse_startup(&body).is_err());
    }

    #[test]
    fn parse_message_fields() {
        let mut b = BytesMut::new();
        write_message(&mut b, tag::PARSE, |b| {
            put_cstr(b, b"s1");
            put_cstr(b, b"SELECT $1");
            b.put_i16(1);
            b.put_i32(23);
        });
        let f = decode_frame(&mut b, MAX_MESSAGE).unwrap().unwrap();
        let body = f.body();
        let p = parse_parse(&body).unwrap();
        assert_eq!(p.name, "s1");
        assert_eq!(p.query, "SELECT $1");
        assert_eq!(p.param_types, 1);
        let mut out = BytesMut::new();
        parse(&mut out, "s2", "SELECT 2", &[]);
        let f = decode_frame(&mut out, MAX_MESSAGE).unwrap().unwrap();
        let body = f.body();
        let p = parse_parse(&body).unwrap();
        assert_eq!((p.name, p.query, p.param_types), ("s2", "SELECT 2", 0));
        // Truncated parameter types.
        assert!(parse_parse(b"s1\0SELECT 1\0\0\x02\0\0\0\x17").is_err());
        assert!(parse_parse(b"s1\0SELECT 1\0\xff\xff").is_err());
    }

    #[test]
    fn describe_kind_checked() {
        assert_eq!(
            parse_target(b"Sname\0", "Describe").unwrap(),
            (b'S', "name")
        );
        assert!(parse_target(b"Xname\0", "Describe").is_err());
        assert!(parse_target(b"", "Describe").is_err());
    }
}
