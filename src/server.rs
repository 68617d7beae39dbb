//! The listener: accepts client connections, runs one session task each, answers cancel
//! requests, and shuts down in order (stop accepting, let sessions finish up to a timeout).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::backend::Pool;
use crate::config::{Config, ReplicationMode};
use crate::metrics::{self, Metrics};
use crate::protocol::frontend as fe;
use crate::replication::positions::Positions;
use crate::routing::classifiers::ClassifierCache;
use crate::routing::NodeRegistry;
use crate::session;

/// Everything sessions share. Passed in, never global.
pub struct Shared {
    /// The config in force; replaced as a whole by a reload ([`Shared::config`] reads it).
    config: std::sync::RwLock<Arc<Config>>,
    pub nodes: NodeRegistry,
    pub pool: Pool,
    pub cancels: CancelRegistry,
    pub classifiers: ClassifierCache,
    /// Statement mode: databases whose statement log this process has set up on the leader.
    pub statement_logs: Mutex<std::collections::HashSet<String>>,
    /// Row mode: the key that signs the DDL messages sessions write into the leader's WAL.
    pub message_key: crate::replication::row::message_key::SharedKey,
    /// Logged-in client sessions by pgrelay pid, for the admin console's `SHOW CLIENTS`.
    pub clients: Mutex<HashMap<i32, ClientInfo>>,
    pub shutdown: CancellationToken,
    /// Logged-in clients (see [`Slot`]).
    pub client_connections: Arc<AtomicUsize>,
    /// Connections that have not logged in yet.
    pub logins_in_progress: Arc<AtomicUsize>,
    pub positions: Arc<Positions>,
    pub metrics: Arc<Metrics>,
    /// Reload, mode switch, PAUSE: see [`crate::control`].
    pub control: crate::control::Control,
    /// Random per process: what unknown users' SCRAM salts are derived from.
    pub unknown_user_key: [u8; 32],
}

impl Shared {
    /// The config in force now (a reload replaces it; holders of an older one keep theirs).
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `config` in force.
    pub fn set_config(&self, config: Arc<Config>) {
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

/// One of a limited number of places (a login in progress, a logged-in client), given back
/// when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place of `counter` if fewer than `max` are taken.
    pub fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot(counter.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A logged-in client, as the admin console shows it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub peer: SocketAddr,
    pub connected: std::time::Instant,
}

/// Where a session's running statement is, so a CancelRequest can be passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// Where a session keeps its current cancel target.
pub type CancelSlot = Arc<Mutex<Option<CancelTarget>>>;

/// pgrelay's own BackendKeyData per session, mapped to the node statement it may cancel.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    /// pid -> (secret, the session's current target).
    sessions: Mutex<HashMap<i32, (i32, CancelSlot)>>,
    next_pid: AtomicUsize,
}

impl CancelRegistry {
    /// Registers a new session; returns its (pid, secret) and the slot it keeps current.
    pub fn register(&self) -> (i32, i32, CancelSlot) {
        let slot = Arc::new(Mutex::new(None));
        let secret: i32 = rand::random();
        let mut sessions = match self.sessions.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        loop {
            // Positive, wrapping pids that are unique among live sessions.
            let pid = (self.next_pid.fetch_add(1, Ordering::Relaxed) % (i32::MAX as usize - 1))
                as i32
                + 1;
            if let std::collections::hash_map::Entry::Vacant(e) = sessions.entry(pid) {
                e.insert((secret, slot.clone()));
                return (pid, secret, slot);
            }
        }
    }

    pub fn unregister(&self, pid: i32) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(&pid);
        }
    }

    /// The node statement to cancel, if `pid`/`secret` name a live session.
    pub fn lookup(&self, pid: i32, secret: i32) -> Option<CancelTarget> {
        let sessions = self.sessions.lock().ok()?;
        let (expected, slot) = sessions.get(&pid)?;
        if *expected != secret {
            return None;
        }
        let target = slot.lock().ok()?;
        *target
    }
}

/// Sends a CancelRequest to a node on behalf of a client.
pub async fn forward_cancel(target: CancelTarget) -> io::Result<()> {
    let mut stream = TcpStream::connect(target.addr).await?;
    let mut buf = BytesMut::new();
    fe::cancel_request(&mut buf, target.pid, target.secret);
    stream.write_all(&buf).await?;
    stream.shutdown().await
}

/// The async runtime pgrelay runs on: `threads` worker threads (0: one per core); a single
/// thread runs everything on the calling thread.
pub fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}

/// A bound listener, ready to run.
pub struct Server {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shared: Arc<Shared>,
}

impl Server {
    pub async fn bind(config: Config) -> io::Result<Server> {
        let listener = TcpListener::bind(config.proxy.listen).await?;
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen for metrics on {addr}: {e}"),
                )
            })?),
            None => None,
        };
        let nodes = NodeRegistry::new(&config);
        let positions = Positions::new(config.nodes.len(), nodes.followers());
        if config.replication.mode == ReplicationMode::Statement {
            positions.use_database_positions();
        }
        let metrics = Arc::new(Metrics::new(&config));
        let shared = Arc::new(Shared {
            positions: Arc::new(positions),
            pool: Pool::new(metrics.clone()),
            metrics,
            nodes,
            config: std::sync::RwLock::new(Arc::new(config)),
            cancels: CancelRegistry::default(),
            classifiers: ClassifierCache::default(),
            statement_logs: Mutex::new(std::collections::HashSet::new()),
            message_key: Default::default(),
            clients: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            client_connections: Arc::default(),
            logins_in_progress: Arc::default(),
            control: crate::control::Control::default(),
            unknown_user_key: rand::random(),
        });
        Ok(Server {
            listener,
            metrics_listener,
            shared,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/metrics` is served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Accepts clients until `shutdown` is cancelled, then waits for sessions to finish
    /// (up to `shutdown_timeout`, after which they are told the server is shutting down).
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let shared = self.shared;
        // Position watchers and the metrics endpoint outlive the sessions, which use them.
        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();
        crate::control::start_replication(&shared).await;
        background.spawn(metrics::upkeep(
            shared.metrics.clone(),
            stop_background.clone(),
        ));
        background.spawn(crate::control::reload_on_sighup(
            shared.clone(),
            stop_background.clone(),
        ));
        if let Some(listener) = self.metrics_listener {
            info!(listen = ?listener.local_addr().ok(), "serving metrics");
            background.spawn(metrics::serve(
                listener,
                shared.clone(),
                stop_background.clone(),
            ));
        }
        info!(listen = %shared.config().proxy.listen, "accepting connections");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(err) => {
                            // Out of file descriptors and the like: keep serving existing sessions.
                            warn!(error = %err, "accept failed");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let span = tracing::info_span!("session", %peer);
                    // Taken in accept order, so the oldest logins in progress are the ones served.
                    let login = Slot::take(
                        &shared.logins_in_progress,
                        shared.config().proxy.max_logins_in_progress,
                    );
                    shared.metrics.client_connections.increment(1.0);
                    tracker.spawn(async move {
                        match login {
                            Some(login) => session::run(stream, peer, shared.clone(), login).await,
                            None => session::refuse_login(stream).await,
                        }
                        shared.metrics.client_connections.decrement(1.0);
                    }.instrument(span));
                }
            }
        }
        drop(self.listener);
        tracker.close();
        info!(
            sessions = tracker.len(),
            "stopped accepting; waiting for sessions to finish"
        );
        if tokio::time::timeout(shared.config().proxy.shutdown_timeout, tracker.wait())
            .await
            .is_err()
        {
            shared.shutdown.cancel();
            tracker.wait().await;
        }
        info!("all sessions closed");
        crate::control::stop_replication(&shared).await;
        stop_background.cancel();
        background.close();
        background.wait().await;
    }
}

/// A proxy running in the background of the current tokio runtime (demo and tests).
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningProxy {
    pub async fn start(config: Config) -> io::Result<RunningProxy> {
        let server = Server::bind(config).await?;
        let addr = server.local_addr()?;
        let metrics_addr = server.metrics_addr();
        let shared = server.shared();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        Ok(RunningProxy {
            addr,
            metrics_addr,
            shared,
            stop,
            task,
        })
    }

    /// Stops accepting and waits until every session ended.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
