//! One connection to one node, speaking the protocol as a client: startup, authentication
//! (SCRAM-SHA-256, md5, cleartext, trust), then framed reads and buffered writes.
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::NodeConfig;
use crate::protocol::auth::md5::md5_password;
use crate::protocol::auth::scram::ScramClient;
use crate::protocol::backend::{self as be, auth, tag};
use crate::protocol::codec::{announced_len, decode_frame, Frame, Reader, MAX_MESSAGE};
use crate::protocol::frontend as fe;
use crate::protocol::ProtocolError;

/// Why a connection to a node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("node \"{node}\" ({addr}) is unreachable: {source}")]
    Unreachable {
        node: String,
        addr: String,
        source: io::Error,
    },
    #[error("node \"{node}\" ({addr}) did not answer within {timeout:?}")]
    Timeout {
        node: String,
        addr: String,
        timeout: Duration,
    },
    /// The node refused the login with an ErrorResponse; the client gets it unchanged.
    #[error("node \"{node}\" refused the connection: {message}")]
    Refused {
        node: String,
        message: String,
        error: Frame,
    },
    #[error(
        "node \"{node}\" asks for authentication method {method}, which pgrelay does not support"
    )]
    UnsupportedAuth { node: String, method: i32 },
    #[error("node \"{node}\": {source}")]
    Protocol { node: String, source: ProtocolError },
    #[error("node \"{node}\": authentication failed: {message}")]
    Auth { node: String, message: String },
}

impl ConnectError {
    /// The node answered that the database does not exist (SQLSTATE 3D000).
    pub fn is_missing_database(&self) -> bool {
        match self {
            ConnectError::Refused { error, .. } => be::parse_error_fields(&error.body())
                .is_ok_and(|f| f.code == crate::protocol::sqlstate::INVALID_CATALOG_NAME.code()),
            _ => false,
        }
    }
}

/// A query of pgrelay's own that failed: the node's SQLSTATE (empty when the connection
/// failed) and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QueryError {
    pub code: String,
    pub message: String,
}

impl QueryError {
    fn io(e: io::Error) -> QueryError {
        QueryError {
            code: String::new(),
            message: e.to_string(),
        }
    }
}

/// The text values of one DataRow (NULL as None).
pub fn data_row_text(body: &[u8]) -> Result<Vec<Option<String>>, ProtocolError> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.count16()?;
    let mut row = Vec::with_capacity(n.min(r.remaining() / 4 + 1));
    for _ in 0..n {
        let len = r.i32()?;
        if len < 0 {
            row.push(None);
        } else {
            let v = r.bytes(len as usize)?;
            row.push(Some(String::from_utf8_lossy(v).into_owned()));
        }
    }
    Ok(row)
}

/// An open, authenticated connection to a node.
pub struct BackendConn {
    /// Index of the node in the config's node list.
    pub node: usize,
    pub node_name: String,
    pub addr: SocketAddr,
    stream: TcpStream,
    rbuf: BytesMut,
    /// Bytes queued for the node, sent by [`BackendConn::flush`].
    pub wbuf: BytesMut,
    /// The node's BackendKeyData, for cancel requests.
    pub pid: i32,
    pub secret: i32,
    /// ParameterStatus values the node reported at startup.
    pub params: Vec<(String, String)>,
    /// The role pgrelay logged in as.
    pub user: String,
    /// Keeps this connection in `pgrelay_backend_connections` while it lives (pool
    /// connections; pgrelay's own replication connections are not counted).
    pub counted: Option<super::pool::Counted>,
}

impl BackendConn {
    /// Opens a connection, logs in as `user` and waits for the first ReadyForQuery.
    pub async fn connect(
        node: usize,
        cfg: &NodeConfig,
        startup_params: &[(String, String)],
        user: &str,
        password: &str,
        timeout: Duration,
    ) -> Result<BackendConn, ConnectError> {
        let addr_str = cfg.addr();
        match tokio::time::timeout(
            timeout,
            Self::connect_inner(node, cfg, startup_params, user, password),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout {
                node: cfg.name.clone(),
                addr: addr_str,
                timeout,
            }),
        }
    }

    async fn connect_inner(
        node: usize,
        cfg: &NodeConfig,
        startup_params: &[(String, String)],
        user: &str,
        password: &str,
    ) -> Result<BackendConn, ConnectError> {
        let unreachable = |source| ConnectError::Unreachable {
            node: cfg.name.clone(),
            addr: cfg.addr(),
            source,
        };
        let stream = TcpStream::connect((cfg.host.as_str(), cfg.port))
            .await
            .map_err(unreachable)?;
        stream.set_nodelay(true).map_err(unreachable)?;
        let addr = stream.peer_addr().map_err(unreachable)?;
        let mut conn = BackendConn {
            node,
            node_name: cfg.name.clone(),
            addr,
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
            pid: 0,
            secret: 0,
            params: Vec::new(),
            user: user.to_owned(),
            counted: None,
        };
        let mut params: Vec<(String, String)> = vec![("user".to_owned(), user.to_owned())];
        params.extend(startup_params.iter().filter(|(k, _)| k != "user").cloned());
        fe::startup_message(&mut conn.wbuf, &params);
        conn.flush().await.map_err(unreachable)?;
        conn.authenticate(password).await?;
        loop {
            let frame = conn.read_startup_frame().await?;
            let body = frame.body();
            match frame.tag() {
                tag::PARAMETER_STATUS => {
                    let (k, v) = be::parse_parameter_status(&body).map_err(|e| conn.protocol(e))?;
                    conn.params.push((k.to_owned(), v.to_owned()));
                }
                tag::BACKEND_KEY_DATA => {
                    let (pid, secret) =
                        be::parse_backend_key_data(&body).map_err(|e| conn.protocol(e))?;
                    conn.pid = pid;
                    conn.secret = secret;
                }
                tag::READY_FOR_QUERY => return Ok(conn),
                tag::ERROR_RESPONSE => return Err(conn.refused(frame)),
                // NoticeResponse during startup is informational.
                _ => {}
            }
        }
    }

    fn protocol(&self, source: ProtocolError) -> ConnectError {
        ConnectError::Protocol {
            node: self.node_name.clone(),
            source,
        }
    }

    fn refused(&self, frame: Frame) -> ConnectError {
        let message = be::parse_error_fields(&frame.body())
            .map(|f| f.message)
            .unwrap_or_default();
        ConnectError::Refused {
            node: self.node_name.clone(),
            message,
            error: frame,
        }
    }

    async fn read_startup_frame(&mut self) -> Result<Frame, ConnectError> {
        self.read_frame()
            .await
            .map_err(|source| ConnectError::Unreachable {
                node: self.node_name.clone(),
                addr: self.addr.to_string(),
                source,
            })
    }

    async fn authenticate(&mut self, password: &str) -> Result<(), ConnectError> {
        let mut scram: Option<ScramClient> = None;
        loop {
            let frame = self.read_startup_frame().await?;
            if frame.tag() == tag::ERROR_RESPONSE {
                return Err(self.refused(frame));
            }
            if frame.tag() != tag::AUTHENTICATION {
                return Err(self.protocol(ProtocolError::UnexpectedMessage(frame.tag())));
            }
            let body = frame.body();
            let (code, data) = be::parse_authentication(&body).map_err(|e| self.protocol(e))?;
            match code {
                auth::OK => return Ok(()),
                auth::CLEARTEXT => fe::password(&mut self.wbuf, password.as_bytes()),
                auth::MD5 => {
                    let salt: [u8; 4] =
                        data.get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| {
                                self.protocol(ProtocolError::malformed("AuthenticationMD5Password"))
                            })?;
                    // Postgres hashes with the role name the client logged in as.
                    let hashed = md5_password(&self.user, password, salt);
                    fe::password(&mut self.wbuf, hashed.as_bytes());
                }
                auth::SASL => {
                    let mut mechanisms = Reader::new(data, "AuthenticationSASL");
                    let mut found = false;
                    while let Ok(m) = mechanisms.cstr() {
                        if m.is_empty() {
                            break;
                        }
                        found |= m == "SCRAM-SHA-256";
                    }
                    if !found {
                        return Err(ConnectError::UnsupportedAuth {
                            node: self.node_name.clone(),
                            method: code,
                        });
                    }
                    let client = ScramClient::new(password);
                    fe::sasl_initial_response(
                        &mut self.wbuf,
                        "SCRAM-SHA-256",
                        &client.client_first(),
                    );
                    scram = Some(client);
                }
                auth::SASL_CONTINUE => {
                    let client = scram.as_mut().ok_or_else(|| {
                        self.protocol(ProtocolError::malformed("AuthenticationSASLContinue"))
                    })?;
                    let reply =
                        client
                            .handle_server_first(data)
                            .map_err(|e| ConnectError::Auth {
                                node: self.node_name.clone(),
                                message: e.to_string(),
                            })?;
                    fe::sasl_response(&mut self.wbuf, &reply);
                }
                auth::SASL_FINAL => {
                    let client = scram.as_ref().ok_or_else(|| {
                        self.protocol(ProtocolError::malformed("AuthenticationSASLFinal"))
                    })?;
                    client
                        .verify_server_final(data)
                        .map_err(|e| ConnectError::Auth {
                            node: self.node_name.clone(),
                            message: e.to_string(),
                        })?;
                    continue;
                }
                other => {
                    return Err(ConnectError::UnsupportedAuth {
                        node: self.node_name.clone(),
                        method: other,
                    })
                }
            }
            let node = self.node_name.clone();
            let addr = self.addr.to_string();
            self.flush()
                .await
                .map_err(|source| ConnectError::Unreachable { node, addr, source })?;
        }
    }

    /// Reads the next whole message. Cancel-safe: bytes already read stay in the buffer.
    pub async fn read_frame(&mut self) -> io::Result<Frame> {
        std::future::poll_fn(|cx| self.poll_frame(cx)).await
    }

    /// Polls for the next whole message from the node.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Frame>> {
        loop {
            match decode_frame(&mut self.rbuf, MAX_MESSAGE) {
                Ok(Some(frame)) => return Poll::Ready(Ok(frame)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
            }
            // A node is trusted with its lengths: room for the rest of a large message at
            // once, so it is read in few syscalls.
            let missing = announced_len(&self.rbuf)
                .ok()
                .flatten()
                .map_or(0, |total| total.saturating_sub(self.rbuf.len()));
            std::task::ready!(self.poll_fill(cx, missing.max(16 * 1024)))?;
        }
    }

    /// Reads what the node sent into the read buffer (growing it by `grow` when nearly full);
    /// the end of the connection is an error.
    fn poll_fill(&mut self, cx: &mut Context<'_>, grow: usize) -> Poll<io::Result<()>> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(grow);
        }
        match std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            cx,
            &mut self.rbuf
        ))? {
            0 => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            ))),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// The next whole message if it is already buffered (no I/O).
    pub fn try_frame(&mut self) -> io::Result<Option<Frame>> {
        decode_frame(&mut self.rbuf, MAX_MESSAGE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The next whole message if it is buffered or the socket already holds it: reads what
    /// the kernel has without waiting.
    pub fn try_frame_now(&mut self) -> io::Result<Option<Frame>> {
        if let Some(frame) = self.try_frame()? {
            return Ok(Some(frame));
        }
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(64 * 1024);
        }
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            )),
            Ok(_) => self.try_frame(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends everything queued in `wbuf`.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all_buf(&mut self.wbuf).await
    }

    /// Sends everything queued in `wbuf` while keeping what the node sends meanwhile in the
    /// read buffer (for [`BackendConn::read_frame`]): a long pipeline cannot deadlock on the
    /// node blocking to write replies nobody reads. Cancel-safe like `flush`.
    pub async fn flush_while_reading(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            while !self.wbuf.is_empty() {
                match Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the node stopped reading",
                        )))
                    }
                    Poll::Ready(Ok(n)) => {
                        let _ = self.wbuf.split_to(n);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Blocked writing: take in what the node has to say, then wait.
                        loop {
                            std::task::ready!(self.poll_fill(cx, 64 * 1024))?;
                        }
                    }
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Runs a query on an idle connection and returns the text values of its rows.
    /// Only for pgrelay's own queries (never client traffic).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        self.query(sql).await.map_err(|e| e.message)
    }

    /// Like [`BackendConn::simple_query`], with the SQLSTATE of a failure.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, QueryError> {
        fe::query(&mut self.wbuf, sql);
        self.flush().await.map_err(QueryError::io)?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await.map_err(QueryError::io)?;
            let body = frame.body();
            match frame.tag() {
                b'D' => rows.push(data_row_text(&body).map_err(|e| QueryError {
                    code: String::new(),
                    message: e.to_string(),
                })?),
                tag::ERROR_RESPONSE => {
                    let f = be::parse_error_fields(&body).unwrap_or_default();
                    error = Some(QueryError {
                        code: f.code,
                        message: f.message,
                    });
                }
                tag::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Says goodbye to the node; errors are irrelevant at that point.
    pub async fn terminate(mut self) {
        fe::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}
