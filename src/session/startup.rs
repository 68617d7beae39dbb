//! The start of a client connection: SSL/GSS negotiation (declined), cancel requests,
//! protocol version negotiation, and password authentication against pgrelay's user list.
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>

use bytes::BytesMut;
use tracing::{debug, info};

use crate::config::{AuthMethod, UserConfig};
use crate::protocol::auth::md5::verify_md5_response;
use crate::protocol::auth::scram::{ScramSecret, ScramServer};
use crate::protocol::auth::AuthError;
use crate::protocol::backend::{self as be, auth, Report};
use crate::protocol::frontend::{self as fe, tag, StartupRequest};
use crate::protocol::sqlstate::{self, SqlState};
use crate::protocol::ProtocolError;
use crate::server::{forward_cancel, Shared, Slot};

use super::client::{Client, ClientError};

/// A client that logged in.
#[derive(Debug)]
pub struct Login {
    /// Its place among `max_client_connections`, held (never read) while the session lasts.
    #[allow(dead_code)]
    pub slot: Slot,
    pub user: String,
    pub database: String,
    /// Startup parameters to pass to nodes (everything but `user`; includes `database`).
    pub params: Vec<(String, String)>,
}

/// How the startup phase ended.
pub enum Startup {
    Login(Login),
    /// The connection carried a CancelRequest and is done.
    Cancel,
}

/// Why a login failed; the client gets a FATAL ErrorResponse with this SQLSTATE.
#[derive(Debug)]
pub struct LoginError {
    pub code: SqlState,
    pub message: String,
}

impl LoginError {
    fn new(code: SqlState, message: impl Into<String>) -> Self {
        LoginError {
            code,
            message: message.into(),
        }
    }
}

impl From<ClientError> for LoginError {
    fn from(e: ClientError) -> Self {
        LoginError::new(sqlstate::PROTOCOL_VIOLATION, e.to_string())
    }
}

/// Runs the startup phase up to and including AuthenticationOk.
pub async fn handshake(client: &mut Client, shared: &Shared) -> Result<Startup, LoginError> {
    loop {
        let packet = client.read_startup().await?;
        let request = fe::parse_startup(&packet).map_err(|e| match e {
            ProtocolError::UnsupportedVersion { .. } => {
                LoginError::new(sqlstate::FEATURE_NOT_SUPPORTED, e.to_string())
            }
            other => LoginError::new(sqlstate::PROTOCOL_VIOLATION, other.to_string()),
        })?;
        match request {
            // pgrelay speaks no TLS or GSS encryption yet: 'N' makes clients go on in plain text.
            StartupRequest::Ssl | StartupRequest::GssEnc => client
                .write_now(b"N")
                .await
                .map_err(|e| LoginError::new(sqlstate::CONNECTION_FAILURE, e.to_string()))?,
            StartupRequest::Cancel { pid, secret } => {
                if let Some(target) = shared.cancels.lookup(pid, secret) {
                    if let Err(err) = forward_cancel(target).await {
                        debug!(error = %err, "forwarding a cancel request failed");
                    }
                }
                return Ok(Startup::Cancel);
            }
            StartupRequest::Startup { minor, params, .. } => {
                return login(client, shared, minor, params)
                    .await
                    .map(Startup::Login)
            }
        }
    }
}

async fn login(
    client: &mut Client,
    shared: &Shared,
    minor: u16,
    params: Vec<(String, String)>,
) -> Result<Login, LoginError> {
    let unrecognized: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if minor > 0 || !unrecognized.is_empty() {
        be::negotiate_protocol_version(&mut client.wbuf, 0, &unrecognized);
    }
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| {
            LoginError::new(
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            )
        })?;
    if params
        .iter()
        .any(|(k, v)| k == "replication" && v != "false" && v != "0" && v != "off")
    {
        return Err(LoginError::new(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported through pgrelay; connect to the leader directly",
        ));
    }
    let database = params
        .iter()
        .find(|(k, _)| k == "database")
        .map(|(_, v)| v.clone())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    let mut node_params: Vec<(String, String)> = params
        .into_iter()
        .filter(|(k, _)| k != "user" && k != "database" && !k.starts_with("_pq_."))
        .collect();
    node_params.insert(0, ("database".to_owned(), database.clone()));

    let config = shared.config();
    authenticate(client, &user, config.user(&user), &shared.unknown_user_key).await?;
    // Only clients that logged in count, so connections that never log in lock nobody out.
    let slot = Slot::take(
        &shared.client_connections,
        config.proxy.max_client_connections,
    )
    .ok_or_else(|| {
        LoginError::new(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        )
    })?;
    be::authentication(&mut client.wbuf, auth::OK, &[]);
    info!(user = %user, db = %database, "client logged in");
    Ok(Login {
        slot,
        user,
        database,
        params: node_params,
    })
}

fn wrong_password(user: &str) -> LoginError {
    LoginError::new(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
}

async fn read_password_message(client: &mut Client) -> Result<bytes::Bytes, LoginError> {
    client
        .flush()
        .await
        .map_err(|e| LoginError::new(sqlstate::CONNECTION_FAILURE, e.to_string()))?;
    let frame = client.read_login_frame().await?;
    if frame.tag() != tag::PASSWORD {
        return Err(LoginError::new(
            sqlstate::PROTOCOL_VIOLATION,
            format!(
                "expected a password message, got message type '{}'",
                char::from(frame.tag())
            ),
        ));
    }
    Ok(frame.body())
}

/// Checks the client's password with the user's method. An unknown user goes through the
/// same SCRAM exchange against a stand-in secret derived from its name and `unknown_key`
/// (stable salt, like a known user's), so a client cannot tell unknown users from wrong
/// passwords.
async fn authenticate(
    client: &mut Client,
    user: &str,
    cfg: Option<&UserConfig>,
    unknown_key: &[u8; 32],
) -> Result<(), LoginError> {
    let method = cfg.map(|u| u.auth).unwrap_or(AuthMethod::ScramSha256);
    match method {
        AuthMethod::Trust => Ok(()),
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            be::authentication(&mut client.wbuf, auth::MD5, &salt);
            let body = read_password_message(client).await?;
            let response = body.strip_suffix(&[0]).unwrap_or(&body);
            match cfg {
                Some(u) if verify_md5_response(user, u.password.expose(), salt, response) => Ok(()),
                _ => Err(wrong_password(user)),
            }
        }
        AuthMethod::ScramSha256 => {
            let secret = match cfg {
                Some(u) => u.scram.clone(),
                None => ScramSecret::for_unknown_user(user, unknown_key),
            };
            let mut server = ScramServer::new(&secret);
            be::authentication_sasl(&mut client.wbuf, &[ScramServer::MECHANISM]);
            let body = read_password_message(client).await?;
            let (mechanism, first) = fe::parse_sasl_initial(&body)
                .map_err(|e| LoginError::new(sqlstate::PROTOCOL_VIOLATION, e.to_string()))?;
            if mechanism != ScramServer::MECHANISM {
                return Err(LoginError::new(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("SASL authentication mechanism {mechanism:?} is not supported; use SCRAM-SHA-256"),
                ));
            }
            let server_first = server
                .handle_client_first(first)
                .map_err(|e| scram_error(user, e))?;
            be::authentication(&mut client.wbuf, auth::SASL_CONTINUE, &server_first);
            let body = read_password_message(client).await?;
            let server_final = server
                .handle_client_final(&body)
                .map_err(|e| scram_error(user, e))?;
            if cfg.is_none() {
                return Err(wrong_password(user));
            }
            be::authentication(&mut client.wbuf, auth::SASL_FINAL, &server_final);
            Ok(())
        }
    }
}

fn scram_error(user: &str, e: AuthError) -> LoginError {
    match e {
        AuthError::WrongPassword => wrong_password(user),
        other => LoginError::new(sqlstate::PROTOCOL_VIOLATION, other.to_string()),
    }
}

/// Turns away a connection over `max_logins_in_progress`: a FATAL error and the end, without
/// waiting for anything from it. What it already sent (its startup packet) is read first, so
/// the close is orderly and the error is not lost to a reset.
pub async fn refuse_login(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut out = BytesMut::new();
    Report::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        "sorry, too many logins in progress; try again later",
    )
    .write_error(&mut out);
    let _ = stream.try_write(&out);
    let mut scratch = [0u8; 1024];
    let mut drained = 0;
    while drained < crate::protocol::codec::MAX_STARTUP_PACKET {
        match stream.try_read(&mut scratch) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
    let _ = stream.shutdown().await;
}

/// Sends a FATAL error to a client during login.
pub fn write_fatal(out: &mut BytesMut, err: &LoginError) {
    Report::fatal(err.code, &err.message).write_error(out);
}
