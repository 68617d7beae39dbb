//! The PostgreSQL frontend/backend protocol, version 3, without I/O: framing, the messages
//! pgrelay inspects or writes, authentication exchanges and SQLSTATEs; and, for row mode, the
//! walsender's CopyBoth sub-protocol ([`replication`]) and pgoutput's messages ([`pgoutput`]);
//! and libpq connection strings for the programs pgrelay runs ([`conninfo`]).
//! <https://www.postgresql.org/docs/current/protocol.html>
pub mod auth;
pub mod backend;
pub mod codec;
pub mod conninfo;
pub mod frontend;
pub mod pgoutput;
pub mod replication;
pub mod sqlstate;

/// What can be wrong with bytes a peer sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    InvalidLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("unexpected message type '{}'", char::from(*.0))]
    UnexpectedMessage(u8),
}

impl ProtocolError {
    pub(crate) fn malformed(what: &'static str) -> Self {
        ProtocolError::Malformed { what }
    }
}
