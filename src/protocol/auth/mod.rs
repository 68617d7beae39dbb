//! Password authentication exchanges, both as a server (toward clients) and as a client (toward nodes).
//! <https://www.postgresql.org/docs/current/sasl-authentication.html>
pub mod md5;
pub mod scram;

/// Why an authentication exchange failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The peer proved it does not know the password (SCRAM proof or md5 hash mismatch).
    #[error("password authentication failed")]
    WrongPassword,
    /// The peer sent a SCRAM message that does not follow RFC 5802 / RFC 7677.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The server's signature did not match: it does not know the password (or is an impostor).
    #[error("server signature mismatch")]
    ServerSignature,
}
