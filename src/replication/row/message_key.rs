//! The key that signs row mode's DDL messages, so that the appliers run only DDL that pgrelay
//! itself wrote into the leader's WAL.
//!
//! `pg_logical_emit_message` is executable by every role, so any client could write a message
//! with pgrelay's prefix. Each message pgrelay writes therefore carries an HMAC-SHA256, made by
//! pgrelay in its own process, over the login role of the session that ran the DDL and the
//! statement's text; the applier checks it and refuses (counts and logs, then skips) any message
//! whose signature does not match. The key is 32 random bytes kept on the leader, in
//! `pgrelay.message_key` of `[replication] database`, which only pgrelay's replication user
//! can read: every pgrelay process in front of the leader signs and checks with the same key,
//! also across restarts. (The schema `pgrelay` is neither copied nor applied on followers.)
//!
//! What the signature binds is the login role: the applier runs the statement with no more
//! rights than that role has on the follower (see [`super::apply`]'s DDL). A client that reads
//! its own signed statement back (its query text is visible to itself) can only emit that same
//! statement again, as itself.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::OnceCell;

use crate::backend::connect_own;
use crate::config::Config;

/// Key of the transaction-level advisory lock around creating the key.
const KEY_LOCK: i64 = 0x7067_7265_6c61_7904;

/// Signs and checks DDL messages.
#[derive(Clone)]
pub struct MessageKey([u8; 32]);

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(..)")
    }
}

impl MessageKey {
    /// A key from its bytes (tests; otherwise [`load`]).
    pub fn from_bytes(bytes: [u8; 32]) -> MessageKey {
        MessageKey(bytes)
    }

    fn mac(&self, login: &str, statement: &str) -> Hmac<Sha256> {
        // HMAC pads a key shorter than the hash's block to the block with zeros: done here,
        // the fixed-size constructor cannot fail.
        let mut block = [0u8; 64];
        for (b, k) in block.iter_mut().zip(self.0) {
            *b = k;
        }
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&block.into());
        mac.update(login.as_bytes());
        mac.update(&[0]);
        mac.update(statement.as_bytes());
        mac
    }

    /// The signature of `statement` run by a session logged in as `login`, in hex.
    pub fn sign(&self, login: &str, statement: &str) -> String {
        hex(&self.mac(login, statement).finalize().into_bytes())
    }

    /// Whether `signature` (hex) is that of `statement` by `login` (constant time).
    pub fn verify(&self, login: &str, statement: &str, signature: &str) -> bool {
        match unhex(signature) {
            Some(bytes) => self.mac(login, statement).verify_slice(&bytes).is_ok(),
            None => false,
        }
    }
}

/// The key, read once per process from the leader (created there on first use).
#[derive(Debug, Default)]
pub struct SharedKey(OnceCell<MessageKey>);

impl SharedKey {
    /// The key, reading it from the leader the first time (concurrent callers wait for one
    /// read).
    pub async fn get(&self, config: &Config) -> Result<&MessageKey, String> {
        self.0.get_or_try_init(|| load(config)).await
    }

    /// The key if it was read already.
    pub fn loaded(&self) -> Option<&MessageKey> {
        self.0.get()
    }
}

/// Reads the key from the leader, creating it when there is none.
pub async fn load(config: &Config) -> Result<MessageKey, String> {
    let database = &config.replication.database;
    let mut conn = connect_own(
        config,
        config.leader,
        database,
        "pgrelay message key",
        false,
    )
    .await
    .map_err(|e| format!("reading pgrelay's message key on the leader: {e}"))?;
    let candidate = hex(&rand::random::<[u8; 32]>());
    let rows = conn
        .query(&format!(
            "BEGIN; SELECT pg_catalog.pg_advisory_xact_lock({KEY_LOCK}); \
             CREATE SCHEMA IF NOT EXISTS pgrelay; \
             CREATE TABLE IF NOT EXISTS pgrelay.message_key \
               (id integer PRIMARY KEY CHECK (id = 1), key text NOT NULL); \
             REVOKE ALL ON pgrelay.message_key FROM PUBLIC; \
             INSERT INTO pgrelay.message_key VALUES (1, '{candidate}') ON CONFLICT (id) DO NOTHING; \
             SELECT key FROM pgrelay.message_key; COMMIT"
        ))
        .await;
    conn.terminate().await;
    let rows = rows.map_err(|e| {
        format!(
            "reading pgrelay's message key in database \"{database}\" on the leader: {} ({})",
            e.message, e.code
        )
    })?;
    // The rows of every statement: the key is the last.
    let text = rows
        .into_iter()
        .last()
        .and_then(|r| r.into_iter().next().flatten())
        .unwrap_or_default();
    let bytes: [u8; 32] = unhex(&text)
        .and_then(|b| b.try_into().ok())
        .ok_or("pgrelay.message_key on the leader does not hold a 32-byte hex key")?;
    Ok(MessageKey(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::MessageKey;

    #[test]
    fn a_signature_binds_the_login_and_the_statement() {
        let key = MessageKey::from_bytes([7; 32]);
        let sig = key.sign("app", "CREATE TABLE t ()");
        assert_eq!(sig.len(), 64);
        assert!(key.verify("app", "CREATE TABLE t ()", &sig));
        assert!(!key.verify("relay_admin", "CREATE TABLE t ()", &sig));
        assert!(!key.verify("app", "CREATE TABLE u ()", &sig));
        // The separator keeps "ab" + "c" apart from "a" + "bc".
        assert!(!key.verify("ap", "pCREATE TABLE t ()", &sig));
        assert!(!MessageKey::from_bytes([8; 32]).verify("app", "CREATE TABLE t ()", &sig));
        assert!(!key.verify("app", "CREATE TABLE t ()", "zz"));
    }
}
