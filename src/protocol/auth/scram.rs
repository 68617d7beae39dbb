//! SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding, as Postgres uses it.
//! <https://www.postgresql.org/docs/current/sasl-authentication.html>
//!
//! [`ScramServer`] authenticates clients against a [`ScramSecret`]; [`ScramClient`] authenticates
//! pgrelay to Postgres nodes. Both only transform SASL payloads: the caller frames them in
//! AuthenticationSASL / SASLContinue / SASLFinal and SASLInitialResponse / SASLResponse.
//!
//! The exchange, with the attributes Postgres uses:
//! ```text
//! client-first  n,,n=<ignored>,r=<client nonce>
//! server-first  r=<client nonce><server nonce>,s=<salt b64>,i=<iterations>
//! client-final  c=biws,r=<full nonce>,p=<ClientProof b64>
//! server-final  v=<ServerSignature b64>            (or e=<error>)
//! ```
//! pgrelay speaks no TLS yet, so only the GS2 headers `n,,` ("no channel binding") and `y,,`
//! ("client supports it but thinks the server does not") are accepted; `p=...` is refused because
//! we never advertise SCRAM-SHA-256-PLUS. Like Postgres, the server ignores the SCRAM username
//! (the startup packet names the user) and refuses an authorization identity (`a=`).
//!
//! # Password normalization
//! Postgres runs passwords through SASLprep (RFC 4013) and falls back to the raw bytes when the
//! password is not valid UTF-8 or contains prohibited characters. We always use the raw bytes.
//! That is identical for ASCII passwords; a non-ASCII password that SASLprep would change (e.g.
//! one containing a non-ASCII space or a character NFKC normalizes) derives different keys here
//! than in Postgres, so it works between pgrelay and its clients only if both skip SASLprep, and a
//! Postgres-generated stored secret for such a password will not match.
use std::fmt;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{ct_eq, AuthError};

type HmacSha256 = Hmac<Sha256>;

/// Length of SHA-256 output, and so of every key, proof and signature.
const KEY_LEN: usize = 32;
/// Random bytes in a nonce before base64; Postgres uses 18 (`SCRAM_RAW_NONCE_LEN`).
const RAW_NONCE_LEN: usize = 18;
/// Salt length for secrets we generate; Postgres uses 16 (`SCRAM_DEFAULT_SALT_LEN`).
const SALT_LEN: usize = 16;
/// Postgres's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Most PBKDF2 iterations [`ScramClient`] agrees to run for a node.
///
/// The iteration count comes from the server, unauthenticated (and, without TLS, possibly from
/// anyone on the path), and we pay for it in CPU before we learn whether the server is genuine:
/// `i=2147483647` would pin a core for about 15 minutes per connection attempt. Postgres's default
/// is 4096 and its `scram_iterations` setting is rarely raised far; one million iterations is
/// roughly half a second of one core (measured with OpenSSL's PBKDF2), which bounds the damage
/// while leaving 244x headroom over the default. Callers on an async runtime may still want
/// `spawn_blocking` for [`ScramClient::handle_server_first`] when nodes use high counts.
pub const MAX_CLIENT_ITERATIONS: u32 = 1_000_000;

/// Salted secret for one user: salt, iteration count, StoredKey and ServerKey, as Postgres keeps
/// in `pg_authid.rolpassword`. Computed once per configured user at config load, so a login only
/// costs a few HMACs instead of PBKDF2.
#[derive(Clone)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl fmt::Debug for ScramSecret {
    /// Prints the iteration count only: the keys allow impersonating the server toward clients
    /// and offline guessing of the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramSecret {
    /// Prefix of Postgres's stored form.
    const STORED_PREFIX: &'static str = "SCRAM-SHA-256$";

    /// Derives a secret with a random 16-byte salt. [`DEFAULT_ITERATIONS`] (4096) is Postgres's
    /// default. Runs PBKDF2, so it costs about as much as a login does for Postgres; an iteration
    /// count of 0 is treated as 1, the RFC's minimum. The password is used as raw bytes (no
    /// SASLprep, see the module docs).
    pub fn from_password(password: &str, iterations: u32) -> Self {
        let mut salt = vec![0u8; SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::with_salt(password.as_bytes(), salt, iterations.max(1))
    }

    /// A stand-in secret for a user pgrelay does not know. Its salt and iteration count look
    /// like a configured user's (16 bytes, [`DEFAULT_ITERATIONS`]) and are the same at every
    /// attempt for one name, derived from `user` and `key` (a random secret of the process),
    /// so the exchange does not tell unknown users from known ones. Its keys are derived the
    /// same way and match no password; no PBKDF2 runs, so unknown users cost a login nothing.
    pub fn for_unknown_user(user: &str, key: &[u8; KEY_LEN]) -> Self {
        let derive = |purpose: &str| {
            let mut message = Vec::with_capacity(purpose.len() + 1 + user.len());
            message.extend_from_slice(purpose.as_bytes());
            message.push(0);
            message.extend_from_slice(user.as_bytes());
            hmac_sha256(key, &message)
        };
        let salt = derive("salt");
        Self {
            iterations: DEFAULT_ITERATIONS,
            salt: salt.get(..SALT_LEN).unwrap_or(&salt).to_vec(),
            stored_key: derive("stored key"),
            server_key: derive("server key"),
        }
    }

    fn with_salt(password: &[u8], salt: Vec<u8>, iterations: u32) -> Self {
        let keys = SaltedKeys::derive(password, &salt, iterations);
        Self {
            iterations,
            salt,
            stored_key: keys.stored_key(),
            server_key: keys.server_key,
        }
    }

    /// Parses Postgres's stored form
    /// `SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>`
    /// (`pg_authid.rolpassword`), so users can configure a hash instead of a plaintext.
    pub fn parse(stored: &str) -> Result<Self, AuthError> {
        let invalid = AuthError::InvalidSecret;
        let rest = stored
            .strip_prefix(Self::STORED_PREFIX)
            .ok_or(invalid("does not start with SCRAM-SHA-256$"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(invalid("missing '$' before the keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(invalid("missing ':' between iterations and salt"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(invalid("missing ':' between StoredKey and ServerKey"))?;
        let iterations = parse_iterations(iterations.as_bytes())
            .filter(|&i| i > 0)
            .ok_or(invalid("iteration count is not a positive integer"))?;
        let salt = decode_salt(salt.as_bytes()).ok_or(invalid("salt is not non-empty base64"))?;
        Ok(Self {
            iterations,
            salt,
            stored_key: decode_key(stored_key.as_bytes())
                .ok_or(invalid("StoredKey is not 32 bytes of base64"))?,
            server_key: decode_key(server_key.as_bytes())
                .ok_or(invalid("ServerKey is not 32 bytes of base64"))?,
        })
    }

    /// Formats the secret in Postgres's stored form; [`ScramSecret::parse`] reads it back.
    pub fn to_stored(&self) -> String {
        format!(
            "{}{}:{}${}:{}",
            Self::STORED_PREFIX,
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key),
        )
    }
}

/// Server side of the exchange, used toward clients.
pub struct ScramServer {
    secret: ScramSecret,
    /// Our part of the nonce, base64 of 18 random bytes.
    server_nonce: String,
    state: ServerState,
}

enum ServerState {
    AwaitingClientFirst,
    AwaitingClientFinal {
        /// `c=` the client must send: base64 of the GS2 header it sent (`n,,` or `y,,`).
        expected_cbind: &'static [u8],
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
        /// Client nonce followed by ours.
        nonce: Vec<u8>,
    },
    /// Finished, successfully or not; any further message is out of order.
    Done,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ServerState::AwaitingClientFirst => "awaiting client-first",
            ServerState::AwaitingClientFinal { .. } => "awaiting client-final",
            ServerState::Done => "done",
        };
        f.debug_struct("ScramServer")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// The SASL mechanism name to advertise in AuthenticationSASL.
    pub const MECHANISM: &'static str = "SCRAM-SHA-256";

    /// Starts an exchange with a fresh random 18-byte server nonce.
    pub fn new(secret: &ScramSecret) -> Self {
        Self::with_nonce(secret, random_nonce())
    }

    fn with_nonce(secret: &ScramSecret, server_nonce: String) -> Self {
        Self {
            secret: secret.clone(),
            server_nonce,
            state: ServerState::AwaitingClientFirst,
        }
    }

    /// client-first-message (the SASLInitialResponse payload) -> server-first-message.
    pub fn handle_client_first(&mut self, client_first: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(
            std::mem::replace(&mut self.state, ServerState::Done),
            ServerState::AwaitingClientFirst
        ) {
            return Err(AuthError::Malformed("unexpected client-first-message"));
        }
        let mut gs2 = client_first.splitn(3, |&b| b == b',');
        let expected_cbind: &'static [u8] = match gs2.next() {
            Some(b"n") => b"biws",
            // "y": the client could bind but believes we cannot. True while pgrelay has no TLS;
            // once it advertises SCRAM-SHA-256-PLUS, "y" means a downgrade and must be refused.
            Some(b"y") => b"eSws",
            Some([b'p', b'=', ..]) => {
                return Err(AuthError::Malformed(
                    "channel binding is not supported (SCRAM-SHA-256-PLUS was not offered)",
                ))
            }
            _ => return Err(AuthError::Malformed("invalid channel binding flag")),
        };
        match gs2.next() {
            Some([]) => {}
            Some(_) => {
                return Err(AuthError::Malformed(
                    "authorization identity is not supported",
                ))
            }
            None => return Err(AuthError::Malformed("incomplete GS2 header")),
        }
        let client_first_bare = gs2
            .next()
            .ok_or(AuthError::Malformed("incomplete GS2 header"))?;

        let mut attrs = client_first_bare.split(|&b| b == b',');
        let first = attrs.next();
        if matches!(first, Some([b'm', b'=', ..])) {
            return Err(AuthError::Malformed(
                "mandatory extensions are not supported",
            ));
        }
        // The username is ignored, as in Postgres: the startup packet already named the user.
        attribute(first, b'n', "expected username attribute (n=)")?;
        let client_nonce = attribute(attrs.next(), b'r', "expected nonce attribute (r=)")?;
        if !is_printable_nonce(client_nonce) {
            return Err(AuthError::Malformed("invalid characters in nonce"));
        }
        if !attrs.all(is_extension) {
            return Err(AuthError::Malformed(
                "invalid attribute in client-first-message",
            ));
        }

        let mut nonce = client_nonce.to_vec();
        nonce.extend_from_slice(self.server_nonce.as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(
            format!(
                ",s={},i={}",
                STANDARD.encode(&self.secret.salt),
                self.secret.iterations
            )
            .as_bytes(),
        );
        self.state = ServerState::AwaitingClientFinal {
            expected_cbind,
            client_first_bare: client_first_bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first)
    }

    /// client-final-message (the SASLResponse payload) -> server-final-message (`v=...`, sent in
    /// AuthenticationSASLFinal). `Err(WrongPassword)` when the proof does not verify; `Malformed`
    /// for a bad nonce, channel binding or format. Either way the exchange is over.
    pub fn handle_client_final(&mut self, client_final: &[u8]) -> Result<Vec<u8>, AuthError> {
        let ServerState::AwaitingClientFinal {
            expected_cbind,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(AuthError::Malformed("unexpected client-final-message"));
        };

        // The proof is the last attribute; everything before its comma is signed.
        let (without_proof, proof) = split_last_attribute(client_final)
            .ok_or(AuthError::Malformed("missing proof attribute (p=)"))?;
        let proof = attribute(Some(proof), b'p', "expected proof attribute (p=) last")?;
        let mut attrs = without_proof.split(|&b| b == b',');
        let cbind = attribute(
            attrs.next(),
            b'c',
            "expected channel binding attribute (c=)",
        )?;
        if cbind != expected_cbind {
            return Err(AuthError::Malformed(
                "channel binding data does not match the GS2 header",
            ));
        }
        let final_nonce = attribute(attrs.next(), b'r', "expected nonce attribute (r=)")?;
        if final_nonce != nonce.as_slice() {
            return Err(AuthError::Malformed("nonce does not match"));
        }
        if !attrs.all(|a| is_extension(a) && !a.starts_with(b"p=")) {
            return Err(AuthError::Malformed(
                "invalid attribute in client-final-message",
            ));
        }
        let proof = decode_key(proof).ok_or(AuthError::Malformed("invalid proof"))?;

        let auth_message = auth_message(&client_first_bare, &server_first, without_proof);
        let client_signature = hmac_sha256(&self.secret.stored_key, &auth_message);
        let client_key = xor(&proof, &client_signature);
        if !ct_eq(&Sha256::digest(client_key), &self.secret.stored_key) {
            return Err(AuthError::WrongPassword);
        }
        let server_signature = hmac_sha256(&self.secret.server_key, &auth_message);
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

/// Client side of the exchange, used toward Postgres nodes.
pub struct ScramClient {
    /// Emptied once the keys are derived, so a finished exchange no longer holds it
    /// (the freed memory is not zeroed: we have no zeroize dependency).
    password: Vec<u8>,
    client_nonce: String,
    client_first_bare: Vec<u8>,
    state: ClientState,
}

enum ClientState {
    AwaitingServerFirst,
    AwaitingServerFinal { server_signature: [u8; KEY_LEN] },
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ClientState::AwaitingServerFirst => "awaiting server-first",
            ClientState::AwaitingServerFinal { .. } => "awaiting server-final",
        };
        f.debug_struct("ScramClient")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// Starts an exchange with a fresh random nonce (base64 of 18 bytes, as libpq does).
    /// The password is used as raw bytes (no SASLprep, see the module docs).
    pub fn new(password: &str) -> Self {
        // Like libpq, send an empty username: Postgres takes it from the startup packet.
        Self::with_nonce(password, "", random_nonce())
    }

    fn with_nonce(password: &str, user: &str, client_nonce: String) -> Self {
        let user = user.replace('=', "=3D").replace(',', "=2C");
        Self {
            password: password.as_bytes().to_vec(),
            client_first_bare: format!("n={user},r={client_nonce}").into_bytes(),
            client_nonce,
            state: ClientState::AwaitingServerFirst,
        }
    }

    /// client-first-message for SASLInitialResponse: `n,,n=,r=<nonce>`.
    pub fn client_first(&self) -> Vec<u8> {
        let mut message = b"n,,".to_vec();
        message.extend_from_slice(&self.client_first_bare);
        message
    }

    /// server-first-message (AuthenticationSASLContinue payload) -> client-final-message.
    ///
    /// Checks that the server's nonce extends ours, the salt is non-empty base64 and the
    /// iteration count is in `1..=`[`MAX_CLIENT_ITERATIONS`]. Runs PBKDF2 with the server's
    /// iteration count (a few milliseconds at Postgres's default of 4096).
    pub fn handle_server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ClientState::AwaitingServerFirst) {
            return Err(AuthError::Malformed("unexpected server-first-message"));
        }
        let mut attrs = server_first.split(|&b| b == b',');
        let first = attrs.next();
        if matches!(first, Some([b'm', b'=', ..])) {
            return Err(AuthError::Malformed(
                "mandatory extensions are not supported",
            ));
        }
        let nonce = attribute(first, b'r', "expected nonce attribute (r=)")?;
        // A server that adds nothing to our nonce contributes no freshness of its own.
        if nonce.len() <= self.client_nonce.len()
            || !nonce.starts_with(self.client_nonce.as_bytes())
        {
            return Err(AuthError::Malformed("server nonce does not extend ours"));
        }
        if !is_printable_nonce(nonce) {
            return Err(AuthError::Malformed("invalid characters in nonce"));
        }
        let salt = attribute(attrs.next(), b's', "expected salt attribute (s=)")?;
        let salt = decode_salt(salt).ok_or(AuthError::Malformed("invalid salt"))?;
        let iterations = attribute(attrs.next(), b'i', "expected iteration attribute (i=)")?;
        let iterations = parse_iterations(iterations)
            .filter(|i| (1..=MAX_CLIENT_ITERATIONS).contains(i))
            .ok_or(AuthError::Malformed("iteration count out of range"))?;
        // Like libpq, accept nothing after the iteration count.
        if attrs.next().is_some() {
            return Err(AuthError::Malformed(
                "unexpected attribute in server-first-message",
            ));
        }

        let keys = SaltedKeys::derive(&self.password, &salt, iterations);
        self.password = Vec::new();
        let stored_key = keys.stored_key();
        let mut without_proof = b"c=biws,r=".to_vec();
        without_proof.extend_from_slice(nonce);
        let auth_message = auth_message(&self.client_first_bare, server_first, &without_proof);
        let client_signature = hmac_sha256(&stored_key, &auth_message);
        let proof = xor(&keys.client_key, &client_signature);
        self.state = ClientState::AwaitingServerFinal {
            server_signature: hmac_sha256(&keys.server_key, &auth_message),
        };

        let mut client_final = without_proof;
        client_final.extend_from_slice(b",p=");
        client_final.extend_from_slice(STANDARD.encode(proof).as_bytes());
        Ok(client_final)
    }

    /// Checks the server-final-message (AuthenticationSASLFinal payload): `v=<signature>` must
    /// match, proving the server knows the password; `e=<message>` becomes
    /// [`AuthError::ServerError`].
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), AuthError> {
        let ClientState::AwaitingServerFinal { server_signature } = &self.state else {
            return Err(AuthError::Malformed("unexpected server-final-message"));
        };
        match server_final {
            [b'e', b'=', message @ ..] => Err(AuthError::ServerError(
                String::from_utf8_lossy(message).into_owned(),
            )),
            [b'v', b'=', signature @ ..] => {
                let signature = decode_key(signature)
                    .ok_or(AuthError::Malformed("invalid server signature"))?;
                if ct_eq(&signature, server_signature) {
                    Ok(())
                } else {
                    Err(AuthError::ServerSignature)
                }
            }
            _ => Err(AuthError::Malformed(
                "expected verifier (v=) or error (e=) in server-final-message",
            )),
        }
    }
}

/// ClientKey and ServerKey derived from SaltedPassword := Hi(password, salt, i).
struct SaltedKeys {
    client_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl SaltedKeys {
    fn derive(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let salted = pbkdf2::pbkdf2_hmac_array::<Sha256, KEY_LEN>(password, salt, iterations);
        Self {
            client_key: hmac_sha256(&salted, b"Client Key"),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    fn stored_key(&self) -> [u8; KEY_LEN] {
        Sha256::digest(self.client_key).into()
    }
}

/// HMAC-SHA-256 keyed with a 32-byte key.
///
/// HMAC zero-pads keys shorter than the hash's 64-byte block (RFC 2104, section 2), so padding
/// here gives the same MAC while using the infallible fixed-size constructor.
fn hmac_sha256(key: &[u8; KEY_LEN], message: &[u8]) -> [u8; KEY_LEN] {
    let mut block = [0u8; 64];
    let (head, _) = block.split_at_mut(KEY_LEN);
    head.copy_from_slice(key);
    let mut mac = <HmacSha256 as KeyInit>::new(&block.into());
    mac.update(message);
    mac.finalize().into_bytes().into()
}

fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let mut out = *a;
    for (o, x) in out.iter_mut().zip(b) {
        *o ^= x;
    }
    out
}

/// AuthMessage := client-first-message-bare "," server-first-message "," client-final-message-without-proof
fn auth_message(client_first_bare: &[u8], server_first: &[u8], without_proof: &[u8]) -> Vec<u8> {
    let mut message =
        Vec::with_capacity(client_first_bare.len() + server_first.len() + without_proof.len() + 2);
    message.extend_from_slice(client_first_bare);
    message.push(b',');
    message.extend_from_slice(server_first);
    message.push(b',');
    message.extend_from_slice(without_proof);
    message
}

/// Base64 of 18 random bytes: 24 printable characters without padding or commas.
fn random_nonce() -> String {
    let mut raw = [0u8; RAW_NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut raw);
    STANDARD.encode(raw)
}

/// The value of `<name>=<value>`, or `Malformed(missing)`.
fn attribute<'a>(
    part: Option<&'a [u8]>,
    name: u8,
    missing: &'static str,
) -> Result<&'a [u8], AuthError> {
    match part {
        Some([n, b'=', value @ ..]) if *n == name => Ok(value),
        _ => Err(AuthError::Malformed(missing)),
    }
}

/// An RFC 5802 extension attribute: one letter, `=`, a value.
fn is_extension(part: &[u8]) -> bool {
    matches!(part, [name, b'=', ..] if name.is_ascii_alphabetic())
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
fn is_printable_nonce(nonce: &[u8]) -> bool {
    !nonce.is_empty()
        && nonce
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Splits `message` at its last comma: (before, after).
fn split_last_attribute(message: &[u8]) -> Option<(&[u8], &[u8])> {
    let comma = message.iter().rposition(|&b| b == b',')?;
    let (before, with_comma) = message.split_at_checked(comma)?;
    Some((before, with_comma.get(1..)?))
}

/// Decimal digits only (no sign, no spaces), fitting in a u32.
fn parse_iterations(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn decode_salt(b64: &[u8]) -> Option<Vec<u8>> {
    STANDARD.decode(b64).ok().filter(|salt| !salt.is_empty())
}

fn decode_key(b64: &[u8]) -> Option<[u8; KEY_LEN]> {
    STANDARD.decode(b64).ok()?.try_into().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    // RFC 7677, section 3.
    const RFC_PASSWORD: &str = "pencil";
    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const RFC_CLIENT_FIRST: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &[u8] =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
    /// The RFC's salt and password in Postgres's stored form, computed independently with
    /// Python's hashlib.pbkdf2_hmac / hmac.
    const RFC_STORED: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
    /// `SELECT rolpassword FROM pg_authid` on Postgres 15 after
    /// `CREATE ROLE alice LOGIN PASSWORD 'pencil'` with password_encryption = scram-sha-256.
    const POSTGRES15_PENCIL: &str = "SCRAM-SHA-256$4096:oFAdNlX8LJXoL7rX1jNpBA==$j7+8lzrqJWbYIaV+o9jPqEA8gJONTdPDNuzOMlfYf08=:U+ecTxS7NwlHaPV+/mAMxdkokjlp1yfHUEN7fw9MwlQ=";

    /// Derived once: PBKDF2 with 4096 iterations is slow in unoptimised test builds.
    fn rfc_secret() -> ScramSecret {
        static SECRET: std::sync::OnceLock<ScramSecret> = std::sync::OnceLock::new();
        SECRET
            .get_or_init(|| {
                ScramSecret::with_salt(
                    RFC_PASSWORD.as_bytes(),
                    STANDARD.decode(RFC_SALT).unwrap(),
                    4096,
                )
            })
            .clone()
    }

    fn rfc_server() -> ScramServer {
        ScramServer::with_nonce(&rfc_secret(), RFC_SERVER_NONCE.to_owned())
    }

    /// Runs a full exchange; returns the server's verdict on the client-final-message.
    fn exchange(client: &mut ScramClient, server: &mut ScramServer) -> Result<(), AuthError> {
        let server_first = server.handle_client_first(&client.client_first())?;
        let client_final = client.handle_server_first(&server_first)?;
        let server_final = server.handle_client_final(&client_final)?;
        client.verify_server_final(&server_final)
    }

    /// Server with the RFC secret, past client-first, and the client-final the RFC client sends.
    fn server_awaiting_final() -> ScramServer {
        let mut server = rfc_server();
        server.handle_client_first(RFC_CLIENT_FIRST).unwrap();
        server
    }

    fn with_client_final(client_final: &[u8]) -> Result<Vec<u8>, AuthError> {
        server_awaiting_final().handle_client_final(client_final)
    }

    #[test]
    fn rfc7677_server_side() {
        let mut server = rfc_server();
        assert_eq!(
            server.handle_client_first(RFC_CLIENT_FIRST).unwrap(),
            RFC_SERVER_FIRST
        );
        assert_eq!(
            server.handle_client_final(RFC_CLIENT_FINAL).unwrap(),
            RFC_SERVER_FINAL
        );
    }

    #[test]
    fn rfc7677_client_side() {
        let mut client = ScramClient::with_nonce(RFC_PASSWORD, "user", RFC_CLIENT_NONCE.into());
        assert_eq!(client.client_first(), RFC_CLIENT_FIRST);
        assert_eq!(
            client.handle_server_first(RFC_SERVER_FIRST).unwrap(),
            RFC_CLIENT_FINAL
        );
        client.verify_server_final(RFC_SERVER_FINAL).unwrap();
    }

    #[test]
    fn rfc7677_secret_in_stored_form() {
        assert_eq!(rfc_secret().to_stored(), RFC_STORED);
        assert_eq!(
            ScramSecret::parse(RFC_STORED).unwrap().to_stored(),
            RFC_STORED
        );
    }

    #[test]
    fn client_first_has_empty_username_and_fresh_nonce() {
        let a = ScramClient::new("pw").client_first();
        let b = ScramClient::new("pw").client_first();
        let nonce = a.strip_prefix(b"n,,n=,r=").unwrap();
        assert_eq!(nonce.len(), 24);
        assert!(is_printable_nonce(nonce));
        assert_ne!(a, b);
    }

    #[test]
    fn client_escapes_username() {
        let client = ScramClient::with_nonce("pw", "a=b,c", "nonce".into());
        assert_eq!(client.client_first(), b"n,,n=a=3Db=2Cc,r=nonce");
    }

    #[test]
    fn round_trip_with_right_password() {
        let secret = ScramSecret::from_password("s3cret", DEFAULT_ITERATIONS);
        exchange(
            &mut ScramClient::new("s3cret"),
            &mut ScramServer::new(&secret),
        )
        .unwrap();
    }

    #[test]
    fn round_trip_with_wrong_password_is_wrong_password() {
        let secret = ScramSecret::from_password("s3cret", DEFAULT_ITERATIONS);
        let mut server = ScramServer::new(&secret);
        assert_eq!(
            exchange(&mut ScramClient::new("s3cret!"), &mut server),
            Err(AuthError::WrongPassword)
        );
        // The exchange is over: retrying the final message is out of order.
        assert!(matches!(
            server.handle_client_final(b"c=biws,r=x,p=x"),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn empty_password_round_trip() {
        let secret = ScramSecret::from_password("", 1);
        exchange(&mut ScramClient::new(""), &mut ScramServer::new(&secret)).unwrap();
        let mut server = ScramServer::new(&secret);
        assert_eq!(
            exchange(&mut ScramClient::new("x"), &mut server),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn secret_from_postgres15_authenticates() {
        let secret = ScramSecret::parse(POSTGRES15_PENCIL).unwrap();
        assert_eq!(secret.to_stored(), POSTGRES15_PENCIL);
        exchange(
            &mut ScramClient::new("pencil"),
            &mut ScramServer::new(&secret),
        )
        .unwrap();
        assert_eq!(
            exchange(
                &mut ScramClient::new("Pencil"),
                &mut ScramServer::new(&secret)
            ),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn stored_form_round_trip() {
        let secret = ScramSecret::from_password("hunter2", 16);
        let stored = secret.to_stored();
        assert!(stored.starts_with("SCRAM-SHA-256$16:"));
        let parsed = ScramSecret::parse(&stored).unwrap();
        assert_eq!(parsed.to_stored(), stored);
        exchange(
            &mut ScramClient::new("hunter2"),
            &mut ScramServer::new(&parsed),
        )
        .unwrap();
    }

    #[test]
    fn zero_iterations_are_raised_to_one() {
        let secret = ScramSecret::from_password("pw", 0);
        assert!(secret.to_stored().starts_with("SCRAM-SHA-256$1:"));
        ScramSecret::parse(&secret.to_stored()).unwrap();
    }

    #[test]
    fn parse_rejects_bad_stored_forms() {
        let key = STANDARD.encode([0u8; 32]);
        let short = STANDARD.encode([0u8; 31]);
        let bad = [
            String::new(),
            "md5abcdef".into(),
            format!("SCRAM-SHA-1$4096:c2FsdA==${key}:{key}"),
            "SCRAM-SHA-256$".into(),
            format!("SCRAM-SHA-256$4096:c2FsdA=={key}:{key}"),
            format!("SCRAM-SHA-256$4096c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}{key}"),
            format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$-1:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$+5:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$99999999999:c2FsdA==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA=${key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${short}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{short}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}:{key}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}$"),
        ];
        for stored in &bad {
            assert!(
                matches!(ScramSecret::parse(stored), Err(AuthError::InvalidSecret(_))),
                "{stored:?}"
            );
        }
        ScramSecret::parse(&format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}")).unwrap();
    }

    #[test]
    fn debug_does_not_print_key_material() {
        let secret = rfc_secret();
        let debug = format!("{secret:?}");
        assert_eq!(debug, "ScramSecret { iterations: 4096, .. }");
        let client = ScramClient::new("pencil");
        assert!(!format!("{client:?}").contains("pencil"));
        assert!(!format!("{:?}", rfc_server()).contains("W22Z"));
    }

    #[test]
    fn tampered_nonce_is_malformed() {
        let tampered = String::from_utf8(RFC_CLIENT_FINAL.to_vec())
            .unwrap()
            .replace("hNlF$k0", "hNlF$k1");
        assert_eq!(
            with_client_final(tampered.as_bytes()),
            Err(AuthError::Malformed("nonce does not match"))
        );
        // Only the client's part, as if the server nonce were dropped.
        let truncated =
            format!("c=biws,r={RFC_CLIENT_NONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        assert!(matches!(
            with_client_final(truncated.as_bytes()),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn tampered_proof_is_wrong_password() {
        let mut tampered = RFC_CLIENT_FINAL.to_vec();
        let last = tampered.len() - 3; // a base64 digit of the proof, before "VQ="
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(with_client_final(&tampered), Err(AuthError::WrongPassword));
    }

    #[test]
    fn client_final_format_errors_are_malformed() {
        let nonce = format!("{RFC_CLIENT_NONCE}{RFC_SERVER_NONCE}");
        let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let bad = [
            String::new(),
            format!("c=biws,r={nonce}"),                     // no proof
            format!("c=biws,r={nonce},p="),                  // empty proof
            format!("c=biws,r={nonce},p=dHzbZapW"),          // short proof
            format!("c=biws,r={nonce},p={proof},x=1"),       // proof not last
            format!("c=biws,r={nonce},p={proof},p={proof}"), // two proofs
            format!("c=eSws,r={nonce},p={proof}"),           // GS2 flag changed
            format!("c=cD10bHMtdW5pcXVlLCw=,r={nonce},p={proof}"),
            format!("r={nonce},c=biws,p={proof}"), // wrong order
            format!("c=biws,p={proof}"),           // no nonce
            format!("c=biws,r={nonce},1=x,p={proof}"), // bad extension name
            format!("c=biws,r={nonce},garbage,p={proof}"),
        ];
        for message in &bad {
            assert!(
                matches!(
                    with_client_final(message.as_bytes()),
                    Err(AuthError::Malformed(_))
                ),
                "{message:?}"
            );
        }
        // Extensions between the nonce and the proof are signed and otherwise ignored. The RFC
        // proof no longer verifies, but that is a wrong password, not a format error.
        assert_eq!(
            with_client_final(format!("c=biws,r={nonce},x=ext,p={proof}").as_bytes()),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn gs2_y_flag_is_accepted_with_matching_binding_data() {
        let secret = rfc_secret();
        let mut server = ScramServer::new(&secret);
        let mut client = ScramClient::new(RFC_PASSWORD);
        let client_first = client.client_first();
        let y_first = [b"y".as_slice(), &client_first[1..]].concat();
        let server_first = server.handle_client_first(&y_first).unwrap();
        // Our client always signs "c=biws", so craft the final message by hand: rebuild the proof
        // over the y-flag AuthMessage.
        let nonce = server_first.split(|&b| b == b',').next().unwrap()[2..].to_vec();
        let without_proof = [b"c=eSws,r=".as_slice(), &nonce].concat();
        let auth = auth_message(&client_first[3..], &server_first, &without_proof);
        let keys = SaltedKeys::derive(RFC_PASSWORD.as_bytes(), &secret.salt, secret.iterations);
        let proof = xor(&keys.client_key, &hmac_sha256(&keys.stored_key(), &auth));
        let client_final = [
            without_proof.as_slice(),
            b",p=",
            STANDARD.encode(proof).as_bytes(),
        ]
        .concat();
        let server_final = server.handle_client_final(&client_final).unwrap();
        let expected = hmac_sha256(&keys.server_key, &auth);
        assert_eq!(
            server_final,
            format!("v={}", STANDARD.encode(expected)).into_bytes()
        );

        // With "y" the binding data must be "eSws"; "biws" is a mismatch.
        let mut server = ScramServer::new(&secret);
        let server_first = server.handle_client_first(&y_first).unwrap();
        let client_final = client.handle_server_first(&server_first).unwrap();
        assert!(matches!(
            server.handle_client_final(&client_final),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn client_first_format_errors_are_malformed() {
        let bad: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"n,,",
            b"p=tls-server-end-point,,n=,r=abc",
            b"p=tls-unique,,n=,r=abc",
            b"x,,n=,r=abc",
            b"N,,n=,r=abc",
            b"n,a=admin,n=,r=abc",
            b"n,,m=ext,n=,r=abc",
            b"n,,r=abc",
            b"n,,n=,r=",
            b"n,,n=,r=ab c",
            b"n,,n=,r=ab\x7fc",
            b"n,,n=,r=ab\xffc",
            b"n,,n=,x=abc",
            b"n,,n=,r=abc,junk",
            b"n,,n=,r=abc,=x",
        ];
        for message in bad {
            let mut server = rfc_server();
            assert!(
                matches!(
                    server.handle_client_first(message),
                    Err(AuthError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(message)
            );
        }
        // The username is ignored, whatever it is, and extensions after the nonce are allowed.
        for message in [
            b"n,,n=,r=abc".as_slice(),
            b"n,,n=someone else,r=abc",
            b"n,,n=\xff\x00,r=abc",
            b"y,,n=,r=abc",
            b"n,,n=,r=abc,x=ext",
        ] {
            rfc_server().handle_client_first(message).unwrap();
        }
    }

    #[test]
    fn server_messages_out_of_order_are_malformed() {
        let mut server = rfc_server();
        assert!(matches!(
            server.handle_client_final(RFC_CLIENT_FINAL),
            Err(AuthError::Malformed(_))
        ));
        let mut server = rfc_server();
        server.handle_client_first(RFC_CLIENT_FIRST).unwrap();
        assert!(matches!(
            server.handle_client_first(RFC_CLIENT_FIRST),
            Err(AuthError::Malformed(_))
        ));
        let mut server = server_awaiting_final();
        server.handle_client_final(RFC_CLIENT_FINAL).unwrap();
        assert!(matches!(
            server.handle_client_final(RFC_CLIENT_FINAL),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn server_first_validation() {
        let nonce = RFC_CLIENT_NONCE;
        let bad = [
            format!("r={nonce}%hv,s={RFC_SALT}"),           // no iterations
            format!("r={nonce},s={RFC_SALT},i=4096"),       // server added nothing
            format!("r=XXX{nonce}%hv,s={RFC_SALT},i=4096"), // not our prefix
            format!("r=rOprNGfwEbeRWgbNEkqX%hv,s={RFC_SALT},i=4096"), // tampered prefix
            format!("r={nonce}%h v,s={RFC_SALT},i=4096"),
            format!("r={nonce}%hv,s=,i=4096"),
            format!("r={nonce}%hv,s=not base64!,i=4096"),
            format!("r={nonce}%hv,s={RFC_SALT},i=0"),
            format!("r={nonce}%hv,s={RFC_SALT},i=-1"),
            format!("r={nonce}%hv,s={RFC_SALT},i=+4096"),
            format!("r={nonce}%hv,s={RFC_SALT},i=abc"),
            format!("r={nonce}%hv,s={RFC_SALT},i="),
            format!("r={nonce}%hv,s={RFC_SALT},i=1000001"),
            format!("r={nonce}%hv,s={RFC_SALT},i=4294967296"),
            format!("r={nonce}%hv,s={RFC_SALT},i=4096,x=1"),
            format!("m=ext,r={nonce}%hv,s={RFC_SALT},i=4096"),
            format!("s={RFC_SALT},r={nonce}%hv,i=4096"),
            String::new(),
        ];
        for message in &bad {
            let mut client = ScramClient::with_nonce(RFC_PASSWORD, "user", nonce.into());
            assert!(
                matches!(
                    client.handle_server_first(message.as_bytes()),
                    Err(AuthError::Malformed(_))
                ),
                "{message:?}"
            );
        }
    }

    #[test]
    fn server_final_validation() {
        let client = || {
            let mut client = ScramClient::with_nonce(RFC_PASSWORD, "user", RFC_CLIENT_NONCE.into());
            client.handle_server_first(RFC_SERVER_FIRST).unwrap();
            client
        };
        assert_eq!(
            client().verify_server_final(b"e=invalid-proof"),
            Err(AuthError::ServerError("invalid-proof".into()))
        );
        // A server that does not know the password signs with the wrong key.
        let impostor = format!("v={}", STANDARD.encode([7u8; 32]));
        assert_eq!(
            client().verify_server_final(impostor.as_bytes()),
            Err(AuthError::ServerSignature)
        );
        for bad in [
            b"".as_slice(),
            b"v=",
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4",
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=,x=1",
            b"x=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        ] {
            assert!(matches!(
                client().verify_server_final(bad),
                Err(AuthError::Malformed(_))
            ));
        }
        // Before server-first there is nothing to verify against.
        assert!(matches!(
            ScramClient::new("pw").verify_server_final(RFC_SERVER_FINAL),
            Err(AuthError::Malformed(_))
        ));
        let mut twice = client();
        assert!(matches!(
            twice.handle_server_first(RFC_SERVER_FIRST),
            Err(AuthError::Malformed(_))
        ));
    }

    /// Random bytes, every truncation and single-byte mutations of valid messages, fed to every
    /// entry point in every state: errors are fine, panics are not.
    #[test]
    fn garbage_never_panics() {
        let mut rng = StdRng::seed_from_u64(5802);
        let mut inputs: Vec<Vec<u8>> = vec![Vec::new(), b",".to_vec(), b",,,,".to_vec()];
        // One iteration, so that mutations which still parse do not each pay for PBKDF2.
        let cheap_server_first = String::from_utf8(RFC_SERVER_FIRST.to_vec())
            .unwrap()
            .replace("i=4096", "i=1");
        for valid in [
            RFC_CLIENT_FIRST,
            cheap_server_first.as_bytes(),
            RFC_CLIENT_FINAL,
            RFC_SERVER_FINAL,
        ] {
            for len in 0..=valid.len() {
                inputs.push(valid[..len].to_vec());
            }
            for _ in 0..200 {
                let mut mutated = valid.to_vec();
                let at = rng.gen_range(0..mutated.len());
                mutated[at] = rng.gen();
                inputs.push(mutated);
            }
        }
        for _ in 0..300 {
            let len = rng.gen_range(0..120);
            inputs.push((0..len).map(|_| rng.gen()).collect());
        }
        for _ in 0..300 {
            // Random strings over the SCRAM alphabet hit the parsers' interesting branches.
            let len = rng.gen_range(0..60);
            const ALPHABET: &[u8] = b"nypmrscvei=,+/0123456789aA";
            inputs.push(
                (0..len)
                    .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
                    .collect(),
            );
        }
        let mut awaiting_final =
            ScramClient::with_nonce(RFC_PASSWORD, "user", RFC_CLIENT_NONCE.into());
        awaiting_final
            .handle_server_first(cheap_server_first.as_bytes())
            .unwrap();
        for input in &inputs {
            let _ = rfc_server().handle_client_first(input);
            let _ = rfc_server().handle_client_final(input);
            let _ = server_awaiting_final().handle_client_final(input);
            let mut client = ScramClient::with_nonce(RFC_PASSWORD, "user", RFC_CLIENT_NONCE.into());
            let _ = client.verify_server_final(input);
            let _ = client.handle_server_first(input);
            let _ = awaiting_final.verify_server_final(input);
            if let Ok(stored) = std::str::from_utf8(input) {
                let _ = ScramSecret::parse(stored);
                let _ = ScramSecret::parse(&format!("SCRAM-SHA-256${stored}"));
            }
        }
    }
}
