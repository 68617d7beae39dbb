//! Messages a server (backend) sends: parsing the ones pgrelay inspects from nodes, building
//! the ones pgrelay sends to clients itself.
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>

use bytes::{BufMut, BytesMut};

use super::codec::{put_cstr, write_message, Reader};
use super::sqlstate::SqlState;
use super::ProtocolError;

/// Message tags (the first byte) of backend messages.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const DATA_ROW: u8 = b'D';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const NO_DATA: u8 = b'n';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
}

/// Authentication request codes.
pub mod auth {
    pub const OK: i32 = 0;
    pub const CLEARTEXT: i32 = 3;
    pub const MD5: i32 = 5;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// Transaction status in ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

pub fn parse_ready_for_query(body: &[u8]) -> Result<TxStatus, ProtocolError> {
    match Reader::new(body, "ReadyForQuery").u8()? {
        b'I' => Ok(TxStatus::Idle),
        b'T' => Ok(TxStatus::InTransaction),
        b'E' => Ok(TxStatus::Failed),
        _ => Err(ProtocolError::malformed("ReadyForQuery")),
    }
}

/// Authentication request: the code and whatever data follows it.
pub fn parse_authentication(body: &[u8]) -> Result<(i32, &[u8]), ProtocolError> {
    let mut r = Reader::new(body, "Authentication");
    let code = r.i32()?;
    Ok((code, r.rest()))
}

pub fn parse_parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let mut r = Reader::new(body, "ParameterStatus");
    Ok((r.cstr()?, r.cstr()?))
}

pub fn parse_backend_key_data(body: &[u8]) -> Result<(i32, i32), ProtocolError> {
    let mut r = Reader::new(body, "BackendKeyData");
    Ok((r.i32()?, r.i32()?))
}

pub fn parse_command_complete(body: &[u8]) -> Result<&str, ProtocolError> {
    Reader::new(body, "CommandComplete").cstr()
}

/// The fields of an ErrorResponse or NoticeResponse that pgrelay looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn parse_error_fields(body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut fields = ErrorFields::default();
    loop {
        let kind = r.u8()?;
        if kind == 0 {
            break;
        }
        let value = String::from_utf8_lossy(r.cstr_bytes()?).into_owned();
        match kind {
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
    }
    Ok(fields)
}

/// Every field of an ErrorResponse or NoticeResponse body, in order: type byte and value.
pub fn all_error_fields(body: &[u8]) -> Result<Vec<(u8, &[u8])>, ProtocolError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut fields = Vec::new();
    loop {
        let kind = r.u8()?;
        if kind == 0 {
            return Ok(fields);
        }
        fields.push((kind, r.cstr_bytes()?));
    }
}

/// An ErrorResponse or NoticeResponse (`message_tag`) with the given fields.
pub fn error_from_fields(out: &mut BytesMut, message_tag: u8, fields: &[(u8, &[u8])]) {
    write_message(out, message_tag, |b| {
        for (kind, value) in fields {
            b.put_u8(*kind);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// An error or notice pgrelay reports itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report<'a> {
    pub severity: &'a str,
    pub code: SqlState,
    pub message: &'a str,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
}

impl<'a> Report<'a> {
    pub fn error(code: SqlState, message: &'a str) -> Self {
        Report {
            severity: "ERROR",
            code,
            message,
            detail: None,
            hint: None,
        }
    }

    pub fn fatal(code: SqlState, message: &'a str) -> Self {
        Report {
            severity: "FATAL",
            ..Report::error(code, message)
        }
    }

    pub fn warning(code: SqlState, message: &'a str) -> Self {
        Report {
            severity: "WARNING",
            ..Report::error(code, message)
        }
    }

    pub fn notice(message: &'a str) -> Self {
        Report {
            severity: "NOTICE",
            ..Report::error(crate::protocol::sqlstate::SUCCESSFUL_COMPLETION, message)
        }
    }

    pub fn with_hint(self, hint: &'a str) -> Self {
        Report {
            hint: Some(hint),
            ..self
        }
    }

    pub fn with_detail(self, detail: &'a str) -> Self {
        Report {
            detail: Some(detail),
            ..self
        }
    }

    fn write(&self, out: &mut BytesMut, tag: u8) {
        write_message(out, tag, |b| {
            for (kind, value) in [(b'S', self.severity), (b'V', self.severity)] {
                b.put_u8(kind);
                put_cstr(b, value.as_bytes());
            }
            b.put_u8(b'C');
            put_cstr(b, self.code.code().as_bytes());
            b.put_u8(b'M');
            put_cstr(b, self.message.as_bytes());
            if let Some(detail) = self.detail {
                b.put_u8(b'D');
                put_cstr(b, detail.as_bytes());
            }
            if let Some(hint) = self.hint {
                b.put_u8(b'H');
                put_cstr(b, hint.as_bytes());
            }
            b.put_u8(0);
        });
    }

    pub fn write_error(&self, out: &mut BytesMut) {
        self.write(out, tag::ERROR_RESPONSE);
    }

    pub fn write_notice(&self, out: &mut BytesMut) {
        self.write(out, tag::NOTICE_RESPONSE);
    }
}

pub fn authentication(out: &mut BytesMut, code: i32, data: &[u8]) {
    write_message(out, tag::AUTHENTICATION, |b| {
        b.put_i32(code);
        b.put_slice(data);
    });
}

pub fn authentication_sasl(out: &mut BytesMut, mechanisms: &[&str]) {
    write_message(out, tag::AUTHENTICATION, |b| {
        b.put_i32(auth::SASL);
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    write_message(out, tag::PARAMETER_STATUS, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    write_message(out, tag::BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: TxStatus) {
    write_message(out, tag::READY_FOR_QUERY, |b| b.put_u8(status.byte()));
}

pub fn empty_query_response(out: &mut BytesMut) {
    write_message(out, tag::EMPTY_QUERY_RESPONSE, |_| {});
}

pub fn command_complete(out: &mut BytesMut, command_tag: &str) {
    write_message(out, tag::COMMAND_COMPLETE, |b| {
        put_cstr(b, command_tag.as_bytes())
    });
}

/// RowDescription for text columns.
pub fn row_description(out: &mut BytesMut, columns: &[&str]) {
    const TEXT_OID: i32 = 25;
    write_message(out, tag::ROW_DESCRIPTION, |b| {
        b.put_i16(i16::try_from(columns.len()).unwrap_or(i16::MAX));
        for c in columns {
            put_cstr(b, c.as_bytes());
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_i32(TEXT_OID);
            b.put_i16(-1); // type size
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values (None: NULL).
pub fn data_row(out: &mut BytesMut, values: &[Option<&str>]) {
    write_message(out, tag::DATA_ROW, |b| {
        b.put_i16(i16::try_from(values.len()).unwrap_or(i16::MAX));
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                    b.put_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

/// NegotiateProtocolVersion: the newest minor version we support and the options we did not recognise.
pub fn negotiate_protocol_version(out: &mut BytesMut, minor: i32, unrecognized: &[&str]) {
    write_message(out, tag::NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(minor);
        b.put_i32(i32::try_from(unrecognized.len()).unwrap_or(i32::MAX));
        for o in unrecognized {
            put_cstr(b, o.as_bytes());
        }
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::protocol::codec::{decode_frame, MAX_MESSAGE};
    use crate::protocol::sqlstate;

    #[test]
    fn error_round_trip() {
        let mut out = BytesMut::new();
        Report::error(sqlstate::PROTOCOL_VIOLATION, "bad")
            .with_hint("fix it")
            .write_error(&mut out);
        let f = decode_frame(&mut out, MAX_MESSAGE).unwrap().unwrap();
        assert_eq!(f.tag(), tag::ERROR_RESPONSE);
        let fields = parse_error_fields(&f.body()).unwrap();
        assert_eq!(fields.code, "08P01");
        assert_eq!(fields.message, "bad");
        assert_eq!(fields.severity, "ERROR");
    }

    #[test]
    fn error_fields_round_trip() {
        let mut out = BytesMut::new();
        Report::error(sqlstate::FEATURE_NOT_SUPPORTED, "no")
            .with_detail("why")
            .write_error(&mut out);
        let f = decode_frame(&mut out, MAX_MESSAGE).unwrap().unwrap();
        let body = f.body();
        let fields = all_error_fields(&body).unwrap();
        assert_eq!(fields.len(), 5);
        assert_eq!(fields[2], (b'C', &b"0A000"[..]));
        let mut again = BytesMut::new();
        error_from_fields(&mut again, tag::ERROR_RESPONSE, &fields);
        assert_eq!(&again[..], &f.raw()[..]);
        assert!(all_error_fields(b"Cx").is_err());
    }

    #[test]
    fn ready_for_query_status() {
        assert_eq!(
            parse_ready_for_query(b"T").unwrap(),
            TxStatus::InTransaction
        );
        assert!(parse_ready_for_query(b"x").is_err());
        assert!(parse_ready_for_query(b"").is_err());
    }
}
