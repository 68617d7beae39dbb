//! Postgres's md5 password scheme (`AuthenticationMD5Password` / `PasswordMessage`).
//! <https://www.postgresql.org/docs/current/auth-password.html>
//!
//! The client answers the server's 4-byte salt with
//! `"md5" + hex(md5(hex(md5(password + user)) + salt))`. Postgres deprecates md5 in favour of
//! SCRAM-SHA-256, but older drivers and configurations still use it.
use super::ct_eq;
use ::md5::{Digest, Md5};

/// `"md5" + hex(md5(hex(md5(password + user)) + salt))`, as the client sends in PasswordMessage
/// (without the trailing NUL).
pub fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = hex(&Md5::new()
        .chain_update(password.as_bytes())
        .chain_update(user.as_bytes())
        .finalize());
    let outer = Md5::new()
        .chain_update(inner.as_bytes())
        .chain_update(salt)
        .finalize();
    format!("md5{}", hex(&outer))
}

/// Server side: checks what the client sent in PasswordMessage (bytes without the trailing NUL)
/// in constant time. Any response that is not exactly the expected 35 bytes is rejected.
pub fn verify_md5_response(user: &str, password: &str, salt: [u8; 4], response: &[u8]) -> bool {
    ct_eq(md5_password(user, password, salt).as_bytes(), response)
}

/// Lowercase hex, as Postgres writes it.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing into a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Computed independently with Python:
    /// `"md5" + md5(md5(b"postgrespostgres").hexdigest().encode() + bytes([1,2,3,4])).hexdigest()`.
    const POSTGRES_POSTGRES_1234: &str = "md568be9ed08db75f318087ab337aaea044";

    #[test]
    fn known_value() {
        assert_eq!(
            md5_password("postgres", "postgres", [1, 2, 3, 4]),
            POSTGRES_POSTGRES_1234
        );
    }

    #[test]
    fn matches_hash_stored_by_postgres() {
        // Postgres 15 with password_encryption=md5 stored, for role "bob" with password
        // "postgres", rolpassword = "md565170a859842ceb2930dc2fa1454af9d"; salting that hex
        // with [1,2,3,4] (Python hashlib) gives the value below.
        assert_eq!(
            md5_password("bob", "postgres", [1, 2, 3, 4]),
            "md59c0b69c6db9916209e79d39889dac44f"
        );
    }

    #[test]
    fn verify_accepts_only_the_exact_response() {
        let salt = [1, 2, 3, 4];
        assert!(verify_md5_response(
            "postgres",
            "postgres",
            salt,
            POSTGRES_POSTGRES_1234.as_bytes()
        ));
        assert!(!verify_md5_response(
            "postgres",
            "wrong",
            salt,
            POSTGRES_POSTGRES_1234.as_bytes()
        ));
        assert!(!verify_md5_response(
            "postgres",
            "postgres",
            [1, 2, 3, 5],
            POSTGRES_POSTGRES_1234.as_bytes()
        ));
        assert!(!verify_md5_response(
            "other",
            "postgres",
            salt,
            POSTGRES_POSTGRES_1234.as_bytes()
        ));
        let upper = POSTGRES_POSTGRES_1234.to_uppercase();
        assert!(!verify_md5_response(
            "postgres",
            "postgres",
            salt,
            upper.as_bytes()
        ));
        let with_nul = format!("{POSTGRES_POSTGRES_1234}\0");
        assert!(!verify_md5_response(
            "postgres",
            "postgres",
            salt,
            with_nul.as_bytes()
        ));
        for len in 0..POSTGRES_POSTGRES_1234.len() {
            assert!(!verify_md5_response(
                "postgres",
                "postgres",
                salt,
                &POSTGRES_POSTGRES_1234.as_bytes()[..len]
            ));
        }
    }

    #[test]
    fn garbage_responses_are_rejected_without_panicking() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let len = rng.gen_range(0..80);
            let response: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            assert!(!verify_md5_response("u", "p", [0; 4], &response));
        }
    }
}
