//! One client connection: its protocol state machine, from login to Terminate.
//!
//! Client messages are collected into units ([`unit::Unit`]) and each unit is routed to one
//! node; node replies are relayed back as they arrive, in order. pgrelay's own traffic to a
//! node (preparing a statement there, replaying `SET`s) travels in groups whose replies are
//! swallowed, so the client sees exactly the replies to what it sent.

mod client;
mod dispatch;
mod startup;
mod state;
mod unit;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn, Instrument};

use crate::backend::pool::ConnKey;
use crate::backend::BackendConn;
use crate::config::Config;
use crate::protocol::backend::{self as be, tag, Report, TxStatus};
use crate::protocol::codec::Frame;
use crate::protocol::sqlstate;
use crate::routing::classify::{Classifier, SessionChange, WRITING_FUNCTIONS_SQL};
use crate::server::{CancelTarget, Shared};

use client::{Client, ClientError};
use startup::{Login, Startup};
use state::SessionState;
use unit::{Statement, Unit};

/// Runs a session to its end. Errors end the session; they are reported to the client where
/// it can still hear them, and logged.
pub async fn run(stream: tokio::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let mut client = Client::new(stream);
    let login_timeout = shared.config.proxy.client_login_timeout;
    let startup =
        tokio::time::timeout(login_timeout, startup::handshake(&mut client, &shared)).await;
    let login = match startup {
        Ok(Ok(Startup::Login(login))) => login,
        Ok(Ok(Startup::Cancel)) => return,
        Ok(Err(err)) => {
            debug!(%peer, error = %err.message, "login failed");
            startup::write_fatal(&mut client.wbuf, &err);
            client.shutdown().await;
            return;
        }
        Err(_) => {
            debug!(%peer, "client did not log in in time");
            let err = startup::LoginError {
                code: sqlstate::PROTOCOL_VIOLATION,
                message: format!("client did not complete login within {login_timeout:?}"),
            };
            startup::write_fatal(&mut client.wbuf, &err);
            client.shutdown().await;
            return;
        }
    };
    let (pid, secret, cancel_slot) = shared.cancels.register();
    // The session span (opened at accept with the peer) gets the rest of its fields now.
    let span =
        tracing::info_span!("client", session_id = pid, user = %login.user, db = %login.database);
    async move {
        let mut session = Session::new(shared.clone(), client, &login, cancel_slot);
        match session.start(pid, secret).await {
            Ok(()) => {
                if let Err(err) = session.serve().await {
                    match err {
                        SessionEnd::Client(ClientError::Closed) | SessionEnd::Terminated => {}
                        SessionEnd::Client(e) => debug!(error = %e, "client connection ended"),
                        SessionEnd::Fatal(msg) => info!(error = %msg, "session ended"),
                    }
                }
            }
            Err(err) => debug!(error = %err, "session could not start"),
        }
        shared.cancels.unregister(pid);
        session.close().await;
    }
    .instrument(span)
    .await;
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("client sent Terminate")]
    Terminated,
    /// The client was sent a FATAL error with this message.
    #[error("{0}")]
    Fatal(String),
}

/// A group of messages sent to a node that ends in one ReadyForQuery.
#[derive(Debug, Default)]
struct Group {
    /// Relay the replies to the client (false: pgrelay's own traffic, replies swallowed).
    forward: bool,
    error: bool,
    committed: bool,
    rolled_back: bool,
    /// Session changes to record if the group succeeds.
    changes: Vec<SessionChange>,
    /// The group ends with a Sync that the node will skip if the group enters COPY IN mode.
    extended: bool,
    /// Replies to pgrelay's own Close and Parse messages in this group, still to come.
    swallow_close_completes: usize,
    swallow_parse_completes: usize,
    /// Statements pgrelay prepared in this group: in doubt if the group fails.
    injected: Vec<String>,
}

/// A node connection as the session uses it.
struct Backend {
    conn: BackendConn,
    groups: VecDeque<Group>,
    /// Protocol-level statements prepared on this connection: name -> statement id.
    prepared: HashMap<String, u64>,
    /// SQL to run before this connection is next used (session changes made elsewhere).
    pending_replay: Vec<String>,
    /// Statements to close before this connection is next used (closed by the client elsewhere).
    pending_closes: Vec<String>,
}

impl Backend {
    fn forwarding(&self) -> bool {
        self.groups.iter().any(|g| g.forward)
    }
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    config: Arc<Config>,
    client: Client,
    key: ConnKey,
    database: String,
    /// Indexed by node.
    backends: Vec<Option<Backend>>,
    classifier: Arc<Classifier>,
    classifier_generation: u64,
    /// The function list changed: reload it from the leader when the leader is idle.
    reload_classifier: bool,
    /// Statements prepared with Parse, by name ("" is the unnamed statement).
    statements: HashMap<String, Arc<Statement>>,
    next_statement_id: u64,
    /// SQL-level prepared statements (PREPARE): name -> is a read.
    sql_prepared: HashMap<String, bool>,
    state: SessionState,
    /// Session changes made inside the open transaction: recorded at COMMIT.
    tx_changes: Vec<SessionChange>,
    /// The node running the session's open transaction.
    pinned: Option<usize>,
    tx_status: TxStatus,
    /// Temp tables, LISTEN, session advisory locks: the session stays on the leader.
    leader_only: bool,
    has_written: bool,
    /// Client messages collected for the next routing decision.
    unit: Unit,
    /// After a Flush, the node the unfinished unit went to: the rest goes there too.
    open_unit: Option<usize>,
    /// pgrelay answered the current unit with an error itself: skip messages until Sync.
    discard_until_sync: bool,
    /// The node receiving the client's COPY data.
    copy_node: Option<usize>,
    /// An extended-protocol COPY IN swallowed the unit's Sync: the client's next Sync finishes it.
    copy_sync_pending: bool,
    /// The node the client last talked to.
    last_node: Option<usize>,
    /// Client messages read but not yet handled (waiting for another node to finish).
    inbox: VecDeque<Frame>,
    cancel_slot: Arc<Mutex<Option<CancelTarget>>>,
}

/// What handling a client message asks of the main loop.
enum Flow {
    Continue,
    /// The message must wait until replies in flight on another node have arrived.
    Wait(Frame),
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        client: Client,
        login: &Login,
        cancel_slot: Arc<Mutex<Option<CancelTarget>>>,
    ) -> Self {
        let config = shared.config.clone();
        Session {
            backends: config.nodes.iter().map(|_| None).collect(),
            config,
            client,
            key: ConnKey {
                user: login.user.clone(),
                params: login.params.clone(),
            },
            database: login.database.clone(),
            classifier: Arc::new(Classifier::default()),
            classifier_generation: shared.classifiers.generation(),
            reload_classifier: false,
            shared,
            statements: HashMap::new(),
            next_statement_id: 1,
            sql_prepared: HashMap::new(),
            state: SessionState::default(),
            tx_changes: Vec::new(),
            pinned: None,
            tx_status: TxStatus::Idle,
            leader_only: false,
            has_written: false,
            unit: Unit::default(),
            open_unit: None,
            discard_until_sync: false,
            copy_node: None,
            copy_sync_pending: false,
            last_node: None,
            inbox: VecDeque::new(),
            cancel_slot,
        }
    }

    /// Opens the first node connection (the leader, or a follower when the leader is down),
    /// relays its ParameterStatus messages, and sends BackendKeyData and ReadyForQuery.
    async fn start(&mut self, pid: i32, secret: i32) -> Result<(), String> {
        let leader = self.shared.nodes.leader();
        let mut failures = Vec::new();
        let mut opened = None;
        // The leader if it answers; otherwise any follower, so reads keep working.
        let followers: Vec<usize> = self.shared.nodes.followers().to_vec();
        for node in std::iter::once(leader).chain(followers) {
            if node != leader && !self.shared.nodes.is_up(node) {
                continue;
            }
            match self
                .shared
                .pool
                .checkout(&self.config, node, &self.key)
                .await
            {
                Ok(conn) => {
                    self.shared.nodes.mark_up(node);
                    opened = Some(conn);
                    break;
                }
                Err(crate::backend::ConnectError::Refused { error, message, .. }) => {
                    // The node said no (unknown database, too many connections...): the
                    // client gets the node's own error.
                    self.client.wbuf.extend_from_slice(error.raw());
                    return Err(message);
                }
                Err(err) => {
                    warn!(error = %err, "cannot open a connection");
                    self.shared.nodes.mark_down(node);
                    failures.push(err.to_string());
                }
            }
        }
        let Some(mut conn) = opened else {
            let message = format!("no node is available: {}", failures.join("; "));
            Report::fatal(sqlstate::CONNECTION_FAILURE, &message)
                .write_error(&mut self.client.wbuf);
            return Err(message);
        };
        for (k, v) in &conn.params {
            be::parameter_status(&mut self.client.wbuf, k, v);
        }
        be::backend_key_data(&mut self.client.wbuf, pid, secret);
        if conn.node == leader {
            self.load_classifier(&mut conn).await;
        }
        be::ready_for_query(&mut self.client.wbuf, TxStatus::Idle);
        let node = conn.node;
        self.install_backend(conn);
        self.client.flush().await.map_err(|e| e.to_string())?;
        debug!(node, "session started");
        Ok(())
    }

    /// Loads the database's writing functions from the leader (cached across sessions).
    async fn load_classifier(&mut self, leader: &mut BackendConn) {
        self.classifier_generation = self.shared.classifiers.generation();
        if let Some(c) = self.shared.classifiers.get(&self.database) {
            self.classifier = c;
            return;
        }
        match leader.simple_query(WRITING_FUNCTIONS_SQL).await {
            Ok(rows) => {
                let names = rows
                    .into_iter()
                    .filter_map(|r| r.into_iter().next().flatten());
                let classifier = Arc::new(Classifier::new(names));
                self.shared
                    .classifiers
                    .insert(&self.database, classifier.clone());
                self.classifier = classifier;
            }
            Err(err) => {
                warn!(error = %err, "cannot load the database's functions; calls to user functions are treated as reads")
            }
        }
    }

    fn install_backend(&mut self, conn: BackendConn) {
        let node = conn.node;
        let backend = Backend {
            conn,
            groups: VecDeque::new(),
            prepared: HashMap::new(),
            pending_replay: self.state.replay(),
            pending_closes: Vec::new(),
        };
        if let Some(slot) = self.backends.get_mut(node) {
            *slot = Some(backend);
        }
    }

    /// The main loop: handle client messages, relay node replies, until the session ends.
    async fn serve(&mut self) -> Result<(), SessionEnd> {
        loop {
            while let Some(frame) = self.inbox.pop_front() {
                match self.on_client_message(frame).await? {
                    Flow::Continue => {}
                    Flow::Wait(frame) => {
                        self.inbox.push_front(frame);
                        break;
                    }
                }
            }
            self.flush_backends().await?;
            self.client.flush().await.map_err(ClientError::Io)?;
            let waiting = !self.inbox.is_empty();
            tokio::select! {
                (node, result) = next_backend_frame(&mut self.backends) => {
                    match result {
                        Ok(frame) => {
                            self.on_backend_message(node, frame).await?;
                            // Relay whatever else is already buffered before writing to the client.
                            self.drain_buffered().await?;
                        }
                        Err(err) => self.backend_lost(node, &err.to_string())?,
                    }
                }
                read = self.client.read_more(), if !waiting => {
                    read?;
                    loop {
                        match self.client.decode() {
                            Ok(Some(frame)) => self.inbox.push_back(frame),
                            Ok(None) => break,
                            Err(err) => {
                                let message = format!("invalid message from client: {err}");
                                Report::fatal(sqlstate::PROTOCOL_VIOLATION, &message).write_error(&mut self.client.wbuf);
                                return Err(SessionEnd::Fatal(message));
                            }
                        }
                    }
                }
                _ = self.shared.shutdown.cancelled() => {
                    let message = "terminating connection because pgrelay is shutting down";
                    Report::fatal(sqlstate::ADMIN_SHUTDOWN, message).write_error(&mut self.client.wbuf);
                    return Err(SessionEnd::Fatal(message.to_owned()));
                }
            }
        }
    }

    async fn drain_buffered(&mut self) -> Result<(), SessionEnd> {
        loop {
            let Some(node) = self
                .backends
                .iter()
                .position(|b| b.as_ref().is_some_and(|b| b.conn.has_buffered_frame()))
            else {
                return Ok(());
            };
            let frame = match self.backends.get_mut(node).and_then(|b| b.as_mut()) {
                Some(b) => b.conn.read_frame().await,
                None => return Ok(()),
            };
            match frame {
                Ok(frame) => self.on_backend_message(node, frame).await?,
                Err(err) => self.backend_lost(node, &err.to_string())?,
            }
        }
    }

    async fn flush_backends(&mut self) -> Result<(), SessionEnd> {
        for node in 0..self.backends.len() {
            let result = match self.backends.get_mut(node).and_then(|b| b.as_mut()) {
                Some(b) if !b.conn.wbuf.is_empty() => b.conn.flush().await,
                _ => continue,
            };
            if let Err(err) = result {
                self.backend_lost(node, &err.to_string())?;
            }
        }
        Ok(())
    }

    /// Handles one reply from a node: relays it or swallows it, and keeps track of transaction
    /// state, COPY mode and statements.
    async fn on_backend_message(&mut self, node: usize, frame: Frame) -> Result<(), SessionEnd> {
        let Some(backend) = self.backends.get_mut(node).and_then(|b| b.as_mut()) else {
            return Ok(());
        };
        let Some(group) = backend.groups.front_mut() else {
            // Idle connection: only asynchronous messages arrive here.
            match frame.tag() {
                tag::NOTIFICATION_RESPONSE | tag::NOTICE_RESPONSE | tag::PARAMETER_STATUS => {
                    self.client.wbuf.extend_from_slice(frame.raw());
                }
                tag::ERROR_RESPONSE => {
                    // A FATAL error on an idle connection (the node is shutting down): it will close.
                    let fields = be::parse_error_fields(&frame.body()).unwrap_or_default();
                    debug!(node, message = %fields.message, "idle node connection reported an error");
                }
                other => {
                    debug!(node, tag = %char::from(other), "unexpected message on an idle node connection")
                }
            }
            return Ok(());
        };
        match frame.tag() {
            tag::READY_FOR_QUERY => {
                let status = be::parse_ready_for_query(&frame.body())
                    .map_err(|e| SessionEnd::Fatal(format!("node sent {e}")))?;
                let group = backend.groups.pop_front().unwrap_or_default();
                let more_forwarding = backend.forwarding();
                // What pgrelay prepared in a failed group may not exist, so it is prepared
                // again (after a Close) when next needed.
                if group.error {
                    for name in &group.injected {
                        backend.prepared.remove(name);
                    }
                }
                if !group.forward {
                    return Ok(());
                }
                self.client.wbuf.extend_from_slice(frame.raw());
                self.tx_status = status;
                match status {
                    TxStatus::InTransaction | TxStatus::Failed => self.pinned = Some(node),
                    TxStatus::Idle if !more_forwarding && self.open_unit.is_none() => {
                        self.pinned = None
                    }
                    TxStatus::Idle => {}
                }
                self.record_changes(node, group, status);
                return Ok(());
            }
            tag::ERROR_RESPONSE => {
                group.error = true;
                if !group.forward {
                    // pgrelay's own statement failed (a replayed SET, a statement prepared
                    // again): the client's next statement on this node will show the effect.
                    let fields = be::parse_error_fields(&frame.body()).unwrap_or_default();
                    warn!(node = %backend.conn.node_name, code = %fields.code, message = %fields.message, "statement pgrelay ran on a node failed");
                }
            }
            tag::COMMAND_COMPLETE => {
                let body = frame.body();
                match body.first() {
                    Some(b'C') if body.starts_with(b"COMMIT\0") => group.committed = true,
                    Some(b'R') if body.starts_with(b"ROLLBACK\0") => group.rolled_back = true,
                    Some(b'C' | b'A' | b'D') if is_function_ddl(&body) => {
                        self.shared.classifiers.invalidate(&self.database);
                    }
                    _ => {}
                }
            }
            // ParseComplete and CloseComplete carry nothing, so which of them are swallowed
            // does not matter, only how many.
            tag::PARSE_COMPLETE if group.swallow_parse_completes > 0 => {
                group.swallow_parse_completes -= 1;
                return Ok(());
            }
            tag::CLOSE_COMPLETE if group.swallow_close_completes > 0 => {
                group.swallow_close_completes -= 1;
                return Ok(());
            }
            tag::COPY_IN_RESPONSE if group.forward => {
                self.copy_node = Some(node);
                if group.extended {
                    self.copy_sync_pending = true;
                }
            }
            _ => {}
        }
        if group.forward {
            self.client.wbuf.extend_from_slice(frame.raw());
        }
        Ok(())
    }

    /// Records a finished group's session changes once they are known to have taken effect:
    /// outside a transaction at once, inside one at its COMMIT.
    fn record_changes(&mut self, node: usize, group: Group, status: TxStatus) {
        match status {
            TxStatus::InTransaction => {
                if !group.error {
                    self.tx_changes.extend(group.changes);
                }
            }
            TxStatus::Failed => {}
            TxStatus::Idle => {
                let mut changes = std::mem::take(&mut self.tx_changes);
                if group.rolled_back || group.error {
                    changes.clear();
                } else {
                    changes.extend(group.changes);
                }
                for change in changes {
                    self.state.apply(&change);
                    let drops_prepared = state::drops_prepared_statements(&change);
                    for (i, b) in self.backends.iter_mut().enumerate() {
                        let Some(b) = b.as_mut() else { continue };
                        if drops_prepared {
                            b.prepared.clear();
                        }
                        if i != node {
                            b.pending_replay.push(change.text.clone());
                        }
                    }
                }
            }
        }
    }

    /// A node connection failed: the client gets an error for every reply it was waiting for
    /// from it; if its transaction was there, the session ends as Postgres would end it.
    fn backend_lost(&mut self, node: usize, reason: &str) -> Result<(), SessionEnd> {
        let Some(backend) = self.backends.get_mut(node).and_then(|b| b.take()) else {
            return Ok(());
        };
        self.shared.nodes.mark_down(node);
        let name = backend.conn.node_name.clone();
        warn!(node = %name, error = %reason, "lost connection to node");
        let message = format!("lost connection to node \"{name}\": {reason}");
        if self.pinned == Some(node) || self.open_unit == Some(node) || self.copy_node == Some(node)
        {
            Report::fatal(sqlstate::CONNECTION_FAILURE, &message)
                .write_error(&mut self.client.wbuf);
            return Err(SessionEnd::Fatal(message));
        }
        for group in backend.groups.iter().filter(|g| g.forward) {
            let _ = group;
            Report::error(sqlstate::CONNECTION_FAILURE, &message)
                .write_error(&mut self.client.wbuf);
            be::ready_for_query(&mut self.client.wbuf, TxStatus::Idle);
        }
        Ok(())
    }

    /// Closes node connections and the client connection.
    async fn close(mut self) {
        let _ = self.client.flush().await;
        for b in self.backends.iter_mut().filter_map(|b| b.take()) {
            self.shared.pool.checkin(b.conn).await;
        }
        self.client.shutdown().await;
    }
}

/// Waits for the next message from any node connection. Cancel-safe: each connection keeps
/// what it read in its own buffer.
async fn next_backend_frame(backends: &mut [Option<Backend>]) -> (usize, std::io::Result<Frame>) {
    std::future::poll_fn(|cx| {
        for (i, b) in backends.iter_mut().enumerate() {
            if let Some(b) = b {
                if let std::task::Poll::Ready(r) = b.conn.poll_frame(cx) {
                    return std::task::Poll::Ready((i, r));
                }
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// CommandComplete tags after which the database's function list may have changed.
fn is_function_ddl(body: &[u8]) -> bool {
    const TAGS: [&[u8]; 9] = [
        b"CREATE FUNCTION",
        b"ALTER FUNCTION",
        b"DROP FUNCTION",
        b"CREATE PROCEDURE",
        b"CREATE EXTENSION",
        b"ALTER EXTENSION",
        b"DROP EXTENSION",
        b"DROP SCHEMA",
        b"ALTER ROUTINE",
    ];
    TAGS.iter().any(|t| body.starts_with(t))
}
