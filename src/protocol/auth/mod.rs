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
    /// The peer sent a SCRAM message that does not follow RFC 5802 / RFC 7677, or sent it out of order.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The server's signature did not match: it does not know the password (or is an impostor).
    #[error("server signature mismatch")]
    ServerSignature,
    /// The server ended the exchange with `e=<message>` in its server-final-message.
    /// The text comes from the server (untrusted); it is kept verbatim, lossily decoded as UTF-8.
    #[error("server rejected SCRAM exchange: {0}")]
    ServerError(String),
    /// A configured SCRAM secret is not in Postgres's stored form
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    #[error("invalid SCRAM secret: {0}")]
    InvalidSecret(&'static str),
}

/// Compares two byte strings without an early exit, so the time taken does not reveal how many
/// leading bytes of a proof or signature were right. The lengths are public and compared first.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the optimiser from turning the fold back into a short-circuiting comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"", b"a"));
    }
}
