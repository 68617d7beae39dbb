//! One client connection: its protocol state machine, from login to Terminate.
//!
//! Client messages are collected into units ([`unit::Unit`]) and each unit is routed to one
//! node; node replies are relayed back as they arrive, in order. pgrelay's own traffic to a
//! node (preparing a statement there, replaying `SET`s) travels in groups whose replies are
//! swallowed, so the client sees exactly the replies to what it sent.

pub(crate) mod admin;
mod client;
mod ddl;
mod dispatch;
mod mode;
mod overrides;
mod relay;
mod route;
mod startup;
mod state;
mod statement;
mod unit;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn, Instrument};

use crate::backend::pool::ConnKey;
use crate::backend::{BackendConn, ConnectError};
use crate::config::{Ack, Config};
use crate::protocol::backend::{self as be, Report, TxStatus};
use crate::protocol::codec::Frame;
use crate::protocol::sqlstate;
use crate::replication::positions::{Position, Positions};
use crate::routing::classify::{Classifier, SessionChange, WRITING_FUNCTIONS_SQL};
use crate::server::{CancelTarget, Shared};

use client::{Client, ClientError};
pub use startup::refuse_login;
use startup::{Login, Startup};
use state::SessionState;
use unit::{Statement, Unit};

/// Runs a session to its end. Errors end the session; they are reported to the client where
/// it can still hear them, and logged.
/// `logging_in` is the connection's place among the logins in progress, given back when the
/// login is over.
pub async fn run(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    logging_in: crate::server::Slot,
) {
    let mut client = Client::new(stream);
    let login_timeout = shared.config().proxy.client_login_timeout;
    let startup =
        tokio::time::timeout(login_timeout, startup::handshake(&mut client, &shared)).await;
    drop(logging_in);
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
    if login.database == admin::CONSOLE_DATABASE {
        let allowed = shared.config().user(&login.user).is_some_and(|u| u.admin);
        if !allowed {
            let err = startup::LoginError {
                code: sqlstate::INSUFFICIENT_PRIVILEGE,
                message: format!(
                    "user \"{}\" may not use the pgrelay console (set admin = true in its [[users]] entry)",
                    login.user
                ),
            };
            startup::write_fatal(&mut client.wbuf, &err);
            client.shutdown().await;
            return;
        }
        let (pid, secret, _) = shared.cancels.register();
        note_client(&shared, pid, &login, peer);
        admin::serve(&mut client, &shared, pid, secret).await;
        forget_client(&shared, pid);
        shared.cancels.unregister(pid);
        client.shutdown().await;
        return;
    }
    let (pid, secret, cancel_slot) = shared.cancels.register();
    note_client(&shared, pid, &login, peer);
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
        forget_client(&shared, pid);
        shared.cancels.unregister(pid);
        session.close().await;
    }
    .instrument(span)
    .await;
}

/// Records a logged-in client for the admin console.
fn note_client(shared: &Shared, pid: i32, login: &Login, peer: SocketAddr) {
    if let Ok(mut clients) = shared.clients.lock() {
        clients.insert(
            pid,
            crate::server::ClientInfo {
                user: login.user.clone(),
                database: login.database.clone(),
                peer,
                connected: std::time::Instant::now(),
            },
        );
    }
}

fn forget_client(shared: &Shared, pid: i32) {
    if let Ok(mut clients) = shared.clients.lock() {
        clients.remove(&pid);
    }
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
    /// pgrelay's query for the leader position a commit reached; its value.
    capture: bool,
    /// Send that query when this group's ReadyForQuery arrives (after a COPY).
    capture_when_ready: bool,
    position: Option<crate::replication::positions::Position>,
    /// Some reply of this group reached the client already.
    forwarded: bool,
    /// A read that may run again on another node if this one dies before answering.
    retry: Option<Box<Unit>>,
    /// Replies of such a read that precede its rows (ParseComplete, RowDescription, ...), kept
    /// back until a row or the result arrives, so that a retry does not repeat them.
    preamble: bytes::BytesMut,
    error: bool,
    /// The client gets this error instead of the node's (a COPY pgrelay failed on purpose).
    error_instead: Option<Frame>,
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
    /// Messages of this group that complete (Execute, statements of a simple query), counted
    /// as they are sent and as their CommandComplete, EmptyQueryResponse or PortalSuspended
    /// arrives.
    completions_sent: usize,
    completions: usize,
    /// Row mode: replies to rewritten DDL still to come, in order.
    ddl: VecDeque<ddl::Expect>,
    /// Row mode: queries that emit DDL that succeeded outside a transaction block, to send
    /// when the group is over.
    ddl_emits: Vec<String>,
    /// Row mode: the group may end with such queries; the session's next unit waits for it.
    ddl_emit_pending: bool,
    /// pgrelay's own group that finishes a client's: the client's ReadyForQuery, sent on
    /// when this group is over.
    release: Option<bytes::Bytes>,
    /// Statement mode: completions (by index) of pgrelay's own Executes inside the client's
    /// unit: their rows and CommandComplete are swallowed.
    own_completions: Vec<usize>,
    /// Statement mode: BindComplete replies of pgrelay's own Binds at the unit's start.
    swallow_bind_completes: usize,
    /// Statement mode: the completion index of pgrelay's log insert at the unit's end; its
    /// CloseComplete (two), ParseComplete and BindComplete replies still to come are
    /// swallowed once every client statement before it completed.
    tail_at: Option<usize>,
    tail_replies: [usize; 3],
    /// Statement mode: pgrelay's statements joined the client's simple query string.
    own_statements: bool,
    /// Statement mode: the rows of one of pgrelay's statements in a simple query are arriving
    /// (Some(true): the log insert's, which carry the position).
    own_rows: Option<bool>,
    /// Statement mode: this group's commit logged an entry; its ReadyForQuery completes the
    /// capture of the position (from `position`, or from the log insert before it).
    log_capture: bool,
    position_from_pending: bool,
    /// Statement mode: pgrelay's own log insert before a client's COMMIT.
    log_insert: bool,
    /// When the client's unit was first written to the node: its ReadyForQuery (or the end
    /// of the group that releases it) gives `pgrelay_query_duration_seconds`. None for
    /// pgrelay's own groups, which the client did not ask for.
    started: Option<std::time::Instant>,
    /// The error such an insert failed with, for the client.
    error_frame: Option<bytes::Bytes>,
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
        self.groups.iter().any(|g| g.forward || g.release.is_some())
    }
}

pub(crate) struct Session {
    shared: Arc<Shared>,
    config: Arc<Config>,
    client: Client,
    key: ConnKey,
    /// Shared with the closures that pick followers (cheap to clone on the read path).
    database: Arc<str>,
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
    /// The consistency level of this session (`SET pgrelay.consistency`).
    consistency: crate::config::Consistency,
    /// The leader position the session's last committed write reached.
    last_write: Option<crate::replication::positions::Position>,
    /// A causal token from another session (`SET pgrelay.min_position`).
    min_position: Option<crate::replication::positions::Position>,
    /// The open transaction wrote.
    tx_wrote: bool,
    /// Position queries in flight on the leader.
    captures_in_flight: usize,
    /// Replies to the client are held until a commit is acknowledged by followers.
    holding: bool,
    held: bytes::BytesMut,
    /// The held commit waits for followers to apply this position.
    ack_wait: Option<AckWait>,
    /// Reads to run again after their follower died before answering.
    retries: VecDeque<Unit>,
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
    /// What `cancel_slot` holds, so it is locked only when the target changes.
    cancel_target: Option<CancelTarget>,
    /// Resolves when pgrelay shuts down; made once, polled in every turn of the main loop.
    shutdown: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Row mode: portals bound to rewritten DDL statements.
    ddl_portals: HashMap<String, Arc<ddl::StatementDdl>>,
    /// Row mode: groups whose end may send a DDL message before anything else.
    ddl_emits_pending: usize,
    /// Row mode: the unit being discarded was refused; the server raises the refusal at its Sync.
    refused_unit: Option<ddl::Raise>,
    /// Statement mode: the statements to log for the transaction that is open on the leader
    /// (a transaction block, or the implicit transaction of a unit sent in parts).
    stx: Option<statement::LoggedTx>,
    /// Statement mode: whether a transaction block is open once every unit sent has run.
    in_block: bool,
    /// Statement mode: portals bound to statements that are logged when they run.
    log_portals: HashMap<String, statement::TxOp>,
    /// Statement mode: the session's temporary tables (lowercase), whose writes are not logged.
    temp_tables: HashSet<String>,
    /// Statement mode: the seq of the entry pgrelay logged just before the client's COMMIT.
    pending_seq: Option<u64>,
    /// Statement mode: pgrelay's log insert failed: the error goes to the client with its COMMIT.
    log_failure: Option<bytes::Bytes>,
    /// Held from the first message of a transaction until the session is idle again (see
    /// [`crate::control`]).
    gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
    /// The config reload this session's config is from.
    generation: u64,
    /// After a mode switch, prepared statements could not be planned for the new mode yet
    /// (statement mode without the catalog): they raise an error until they are, which is
    /// tried again at the next transaction.
    replan: bool,
}

/// A commit whose reply waits until enough followers applied its position.
#[derive(Debug, Clone, Copy)]
struct AckWait {
    position: crate::replication::positions::Position,
    started: std::time::Instant,
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
        // The generation first: a reload in between is then picked up at the first transaction.
        let generation = shared.control.generation();
        let config = shared.config();
        let consistency = config.routing.consistency;
        let shared_shutdown = shared.shutdown.clone().cancelled_owned();
        Session {
            backends: config.nodes.iter().map(|_| None).collect(),
            config,
            client,
            key: ConnKey {
                user: login.user.clone(),
                params: login.params.clone(),
            },
            database: Arc::from(login.database.as_str()),
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
            consistency,
            last_write: None,
            min_position: None,
            tx_wrote: false,
            captures_in_flight: 0,
            holding: false,
            held: bytes::BytesMut::new(),
            ack_wait: None,
            retries: VecDeque::new(),
            unit: Unit::default(),
            open_unit: None,
            discard_until_sync: false,
            copy_node: None,
            copy_sync_pending: false,
            last_node: None,
            inbox: VecDeque::new(),
            cancel_slot,
            cancel_target: None,
            shutdown: Box::pin(shared_shutdown),
            ddl_portals: HashMap::new(),
            ddl_emits_pending: 0,
            refused_unit: None,
            stx: None,
            in_block: false,
            log_portals: HashMap::new(),
            temp_tables: HashSet::new(),
            pending_seq: None,
            log_failure: None,
            gate: None,
            generation,
            replan: false,
        }
    }

    /// Opens the first node connection (the leader, or a follower when the leader is down),
    /// relays its ParameterStatus messages, and sends BackendKeyData and ReadyForQuery.
    async fn start(&mut self, pid: i32, secret: i32) -> Result<(), String> {
        let leader = self.shared.nodes.leader();
        let mut failures = Vec::new();
        let mut opened = None;
        // The leader if it answers; otherwise any follower, so reads keep working.
        let shared = self.shared.clone();
        let candidates = std::iter::once(leader).chain(
            shared
                .nodes
                .followers()
                .iter()
                .copied()
                .filter(|&f| shared.nodes.is_up(f)),
        );
        for node in candidates {
            match self.connect(node).await {
                Ok(()) => {
                    opened = Some(node);
                    break;
                }
                Err(ConnectError::Refused { error, message, .. }) => {
                    // The node said no (unknown database, too many connections...): the
                    // client gets the node's own error.
                    self.client.wbuf.extend_from_slice(error.raw());
                    return Err(message);
                }
                Err(err) => failures.push(err.to_string()),
            }
        }
        let Some(node) = opened else {
            let message = format!("no node is available: {}", failures.join("; "));
            Report::fatal(sqlstate::CONNECTION_FAILURE, &message)
                .write_error(&mut self.client.wbuf);
            return Err(message);
        };
        if let Some(Some(b)) = self.backends.get(node) {
            for (k, v) in &b.conn.params {
                be::parameter_status(&mut self.client.wbuf, k, v);
            }
        }
        be::backend_key_data(&mut self.client.wbuf, pid, secret);
        self.load_classifier().await;
        be::ready_for_query(&mut self.client.wbuf, TxStatus::Idle);
        self.client.flush().await.map_err(|e| e.to_string())?;
        debug!(node, "session started");
        Ok(())
    }

    /// Loads the database's writing functions (cached across sessions), from the leader when
    /// no session loaded them yet. Needs an idle leader connection, so pgrelay's own query does
    /// not disturb the client's; without one it tries again before a later unit.
    pub(super) async fn load_classifier(&mut self) {
        self.reload_classifier = false;
        self.classifier_generation = self.shared.classifiers.generation();
        let statement_mode =
            self.config.replication.mode == crate::config::ReplicationMode::Statement;
        // Statement mode needs the catalog: a classifier cached without one (loaded by a session
        // that started just before a switch to statement mode) is loaded again.
        if let Some(c) = self
            .shared
            .classifiers
            .get(&self.database)
            .filter(|c| !statement_mode || c.has_catalog())
        {
            self.classifier = c;
            return;
        }
        let leader = self.shared.nodes.leader();
        if self.config.replication.mode == crate::config::ReplicationMode::Statement {
            // The catalog must be current before the next write is planned: loaded on a
            // connection of pgrelay's own, whatever the session's leader connection is doing.
            self.ensure_statement_log().await;
            self.load_statement_classifier().await;
            return;
        }
        let Some(mut b) = self.backends.get_mut(leader).and_then(|b| b.take()) else {
            // No leader connection yet (the session started on a follower): later.
            self.reload_classifier = true;
            return;
        };
        if b.groups.is_empty() && b.conn.wbuf.is_empty() {
            match b.conn.simple_query(WRITING_FUNCTIONS_SQL).await {
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
        } else {
            self.reload_classifier = true;
        }
        if let Some(slot) = self.backends.get_mut(leader) {
            *slot = Some(b);
        }
    }

    /// Statement mode: loads the database's writing functions and its catalog (column
    /// defaults, volatile functions) on a connection of pgrelay's own.
    async fn load_statement_classifier(&mut self) {
        use crate::routing::determinism::Catalog;
        let load = async {
            let mut conn = crate::backend::connect_own(
                &self.config,
                self.shared.nodes.leader(),
                &self.database,
                "pgrelay catalog",
                false,
            )
            .await?;
            let functions = conn.simple_query(WRITING_FUNCTIONS_SQL).await;
            let catalog = conn.simple_query(Catalog::LOAD_SQL).await;
            conn.terminate().await;
            Ok::<_, String>((functions?, catalog?))
        };
        match load.await {
            Ok((functions, catalog)) => {
                let names = functions
                    .into_iter()
                    .filter_map(|r| r.into_iter().next().flatten());
                let classifier =
                    Arc::new(Classifier::new(names).with_catalog(Catalog::from_rows(catalog)));
                self.shared
                    .classifiers
                    .insert(&self.database, classifier.clone());
                self.classifier = classifier;
            }
            Err(err) => {
                // Without the catalog, column defaults are not filled in: writes wait for it.
                warn!(error = %err, "cannot load the database's functions and column defaults");
                self.reload_classifier = true;
            }
        }
    }

    /// Statement mode: creates the database's statement log on the leader (as the
    /// replication user) unless this process did already.
    async fn ensure_statement_log(&mut self) {
        let ready = |shared: &Shared, db: &str| {
            shared
                .statement_logs
                .lock()
                .map(|s| s.contains(db))
                .unwrap_or(false)
        };
        if ready(&self.shared, &self.database) {
            return;
        }
        let setup = async {
            let mut conn = crate::backend::connect_own(
                &self.config,
                self.shared.nodes.leader(),
                &self.database,
                "pgrelay setup",
                false,
            )
            .await?;
            let result = conn
                .query(&crate::replication::statement::log::leader_setup_sql())
                .await
                .map_err(|e| e.message);
            conn.terminate().await;
            result
        };
        match setup.await {
            Ok(_) => {
                if let Ok(mut s) = self.shared.statement_logs.lock() {
                    s.insert(self.database.to_string());
                }
            }
            Err(err) => {
                warn!(error = %err, "cannot set up the statement log on the leader; writes will fail until it exists")
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
            // Reads whose follower died before answering run again first: they came before
            // anything still in the inbox.
            while let Some(unit) = self.retries.pop_front() {
                let saved = std::mem::replace(&mut self.unit, unit);
                if self.must_wait(self.decide()) {
                    let unit = std::mem::replace(&mut self.unit, saved);
                    self.retries.push_front(unit);
                    break;
                }
                self.dispatch_unit().await?;
                self.unit = saved;
            }
            while let Some(frame) = self.inbox.pop_front().filter(|_| self.retries.is_empty()) {
                if self.needs_gate(&frame) {
                    self.enter().await?;
                }
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
            self.leave_if_idle();
            let waiting = !self.inbox.is_empty() || !self.retries.is_empty();
            let ack = self.ack_future();
            tokio::select! {
                confirmed = ack => self.finish_ack(confirmed),
                (node, result) = next_backend_frame(&mut self.backends) => {
                    match result {
                        Ok(frame) => {
                            self.on_backend_message(node, frame)?;
                            // Relay whatever else is already buffered before writing to the client.
                            self.drain_buffered()?;
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
                _ = &mut self.shutdown => {
                    let message = "terminating connection because pgrelay is shutting down";
                    Report::fatal(sqlstate::ADMIN_SHUTDOWN, message).write_error(&mut self.client.wbuf);
                    return Err(SessionEnd::Fatal(message.to_owned()));
                }
            }
        }
    }

    /// Resolves when the held commit is acknowledged (true) or its time is up (false); never
    /// when nothing is held. Cancel-safe: it only watches positions.
    fn ack_future(&self) -> impl std::future::Future<Output = bool> + 'static {
        let positions = self.shared.positions.clone();
        let wait = self.ack_wait;
        let policy = self.config.replication.ack;
        let timeout = self.config.replication.ack_timeout;
        let database = self.database.clone();
        async move {
            let Some(wait) = wait else {
                return std::future::pending().await;
            };
            let remaining = timeout.saturating_sub(wait.started.elapsed());
            positions
                .wait_until(remaining, |p| {
                    ack_satisfied(p, policy, wait.position, &database)
                })
                .await
        }
    }

    /// Handles every whole message the node connections have already read, without I/O.
    fn drain_buffered(&mut self) -> Result<(), SessionEnd> {
        for node in 0..self.backends.len() {
            while let Some(b) = self.backends.get_mut(node).and_then(|b| b.as_mut()) {
                match b.conn.try_frame() {
                    Ok(Some(frame)) => self.on_backend_message(node, frame)?,
                    Ok(None) => break,
                    Err(err) => {
                        self.backend_lost(node, &err.to_string())?;
                        break;
                    }
                }
            }
        }
        Ok(())
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

/// Whether enough followers applied `position` for the acknowledgement policy.
fn ack_satisfied(p: &Positions, policy: Ack, position: Position, database: &str) -> bool {
    match policy {
        Ack::Async => true,
        Ack::Quorum(k) => p.applied_count(position, database) >= k,
        // Every follower that is up; with none up, nothing can confirm and the wait times out.
        Ack::All => p.applied_count(position, database) >= p.up_count().max(1),
    }
}
