//! Row mode: pgrelay keeps ordinary writable followers equal to the leader by streaming the
//! leader's logical decoding (`pgoutput`, one slot per follower and database) and applying the
//! row changes itself.
//!
//! - [`setup`]: leader checks, the publication, slot names, what a follower database holds.
//! - [`stream`]: the replication connection (slot creation, CopyBoth, status updates).
//! - [`bootstrap`]: copying an empty follower database from the slot's snapshot.
//! - `dump`: its schema part, through `pg_dump` and `psql`.
//! - [`apply`]: applying the stream, exactly once, recording the position on the follower.
//! - [`relations`]: leader tables against follower tables, and the statements that apply rows.
//! - `follower`: the task per follower that finds the databases and publishes its state.
//! - [`message_key`]: the key that signs the DDL messages pgrelay writes into the WAL.
//!
//! One task per follower finds the databases to replicate and publishes the follower's
//! position: the lowest position any of its databases has applied (each database is its own
//! stream). A database is served to readers only once its bootstrap is done.
//! <https://www.postgresql.org/docs/current/logicaldecoding-explanation.html>

pub mod apply;
pub mod bootstrap;
mod dump;
pub(crate) mod follower;
pub mod message_key;
pub mod relations;
pub mod setup;
pub mod stream;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backend::{connect_own, connect_own_with, BackendConn};
use crate::config::Config;
use crate::metrics::{FollowerMetrics, Metrics};

use super::positions::{format_lsn, Position, Positions};
use apply::Applier;
use setup::{FollowerDb, APPLIED_TABLE_SQL};
use stream::{Event, ReplicationStream};

/// Why replicating one database to one follower stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RowError {
    /// Something on the leader or in the config must change first.
    #[error("{0}")]
    Setup(String),
    #[error("leader: {0}")]
    Leader(String),
    #[error("follower: {0}")]
    Follower(String),
    /// The follower's table no longer matches the leader's (DDL behind pgrelay's back).
    #[error("{0}")]
    Mismatch(String),
    /// The follower lacks a row the leader changed.
    #[error("{0}")]
    Diverged(String),
    #[error("change stream: {0}")]
    Decode(String),
}

impl RowError {
    /// Errors of applying (as opposed to reaching a node), counted in
    /// `pgrelay_apply_errors_total`.
    fn is_apply_error(&self) -> bool {
        matches!(
            self,
            RowError::Follower(_)
                | RowError::Mismatch(_)
                | RowError::Diverged(_)
                | RowError::Decode(_)
        )
    }
}

/// Settings of the connections that read the leader's rows (the stream, the bootstrap's COPY):
/// text forms that read back the same on any server, as Postgres's own subscriber does.
pub(crate) const LEADER_OPTIONS: &str =
    "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c TimeZone=UTC";
/// Settings of the connections that write on the follower: the same text forms; triggers and
/// foreign keys do not fire (the leader ran them already; its effects arrive as rows), and a
/// commit is on disk before its position is reported to the leader.
pub(crate) const FOLLOWER_OPTIONS: &str = "-c datestyle=ISO -c intervalstyle=postgres \
     -c extra_float_digits=3 -c TimeZone=UTC -c session_replication_role=replica \
     -c synchronous_commit=on";

/// How often the leader's database list is read again when `replication.databases` is empty.
pub(crate) const DISCOVER_INTERVAL: Duration = Duration::from_secs(2);
/// How often, at most, the leader is told what a follower committed (besides answering its
/// keepalives).
const CONFIRM_INTERVAL: Duration = Duration::from_millis(100);
/// How often lag is published for a follower whose position did not move.
const LAG_REFRESH: Duration = Duration::from_millis(200);
/// How long a stream that stopped on a mismatch or a setup problem waits before trying again.
pub(crate) const SLOW_RETRY: Duration = Duration::from_secs(5);

/// Where one database stands on one follower.
#[derive(Debug, Clone, Default)]
pub(crate) struct DbState {
    /// Bootstrapped and streaming.
    pub(crate) ready: bool,
    pub(crate) applied: Option<Position>,
    /// The last error, while it lasts (the follower is down for routing meanwhile).
    pub(crate) error: Option<String>,
    /// Statement mode, where each database measures its own lag (see
    /// [`follower::LagSource::Reported`]): when the oldest change not applied yet was made
    /// (None: none waits), ...
    pub(crate) oldest_pending: Option<std::time::Instant>,
    /// ... how many bytes are waiting, ...
    pub(crate) lag_bytes: u64,
    /// ... and how many leader transactions.
    pub(crate) backlog: u64,
}

/// What a follower's database tasks share with the follower task.
#[derive(Default)]
pub(crate) struct FollowerShared {
    pub(crate) states: Mutex<HashMap<String, DbState>>,
    pub(crate) changed: Notify,
}

impl FollowerShared {
    pub(crate) fn update(&self, database: &str, f: impl FnOnce(&mut DbState)) {
        if let Ok(mut states) = self.states.lock() {
            f(states.entry(database.to_owned()).or_default());
        }
        self.changed.notify_one();
    }
}

/// Starts row-mode replication: the leader sampler and one task per follower.
pub fn spawn(
    config: Arc<Config>,
    positions: Arc<Positions>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let history =
        super::physical::spawn_leader_sampler(&config, &positions, &metrics, tracker, &stop);
    for node in 0..config.nodes.len() {
        if node == config.leader {
            continue;
        }
        positions.set_databases(node, Some(HashSet::new()));
        let shared = Arc::new(FollowerShared::default());
        let follower_metrics = metrics.follower(node).map(|m| Arc::new(m.clone()));
        let start: follower::StartDatabase = {
            let (config, shared, stop) = (config.clone(), shared.clone(), stop.clone());
            let follower_metrics = follower_metrics.clone();
            Box::new(move |db| {
                Box::pin(database_task(
                    config.clone(),
                    node,
                    db,
                    shared.clone(),
                    follower_metrics.clone(),
                    stop.clone(),
                ))
            })
        };
        tracker.spawn(follower::follower_task(
            follower::FollowerTask {
                config: config.clone(),
                node,
                positions: positions.clone(),
                metrics: metrics.clone(),
                shared,
                lag: follower::LagSource::LeaderHistory(history.clone()),
                start,
            },
            tracker.clone(),
            stop.clone(),
        ));
    }
}

/// Replicates one database to one follower, starting over after every failure.
async fn database_task(
    config: Arc<Config>,
    node: usize,
    database: String,
    shared: Arc<FollowerShared>,
    metrics: Option<Arc<FollowerMetrics>>,
    stop: CancellationToken,
) {
    let follower = config.node_name(node);
    let mut last_error: Option<String> = None;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = replicate(&config, node, &follower, &database, &shared, metrics.clone(), &stop) => r,
        };
        let err = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        let text = err.to_string();
        if let RowError::Diverged(why) = &err {
            // Stays stopped across retries and restarts until someone looks.
            mark_diverged(&config, node, &database, why).await;
        }
        if err.is_apply_error() {
            if let Some(m) = &metrics {
                m.apply_errors.increment(1);
            }
        }
        if last_error.as_deref() != Some(text.as_str()) {
            match err {
                // Nothing changes by itself: someone has to act.
                RowError::Setup(_) | RowError::Mismatch(_) | RowError::Diverged(_) => {
                    error!(follower = %follower, database = %database, error = %text, "replication stopped; retrying every {SLOW_RETRY:?}")
                }
                _ => {
                    warn!(follower = %follower, database = %database, error = %text, "replication stopped; retrying")
                }
            }
        }
        // A follower the applier cannot keep equal to the leader is not read from; one that is
        // merely unreachable is caught by its own checks, but is not ready either.
        let marks_down = matches!(
            err,
            RowError::Mismatch(_)
                | RowError::Diverged(_)
                | RowError::Follower(_)
                | RowError::Decode(_)
        );
        shared.update(&database, |s| {
            s.ready = false;
            s.error = marks_down.then(|| text.clone());
        });
        last_error = Some(text);
        let wait = match err {
            RowError::Mismatch(_) | RowError::Setup(_) | RowError::Diverged(_) => SLOW_RETRY,
            _ => config.proxy.node_retry_interval,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Records on the follower that applying to `database` found it different from the leader.
async fn mark_diverged(config: &Config, node: usize, database: &str, why: &str) {
    let follower = config.node_name(node);
    let source = setup::slot_name(&follower, database);
    let marked = match connect_own(config, node, database, "pgrelay applier", false).await {
        Ok(mut conn) => {
            let r = conn.query(&setup::mark_diverged_sql(&source, why)).await;
            conn.terminate().await;
            r.map(|_| ()).map_err(|e| e.message)
        }
        Err(e) => Err(e),
    };
    if let Err(e) = marked {
        warn!(follower, database, error = %e, "cannot record the divergence on the follower");
    }
}

/// Opens a connection to the follower database with `options` (row mode:
/// [`FOLLOWER_OPTIONS`]), creating the database like the leader's when it is missing;
/// `recreate`: dropping it first (a partial copy).
pub(crate) async fn follower_database(
    config: &Config,
    node: usize,
    database: &str,
    leader: &mut BackendConn,
    recreate: bool,
    options: &str,
) -> Result<BackendConn, RowError> {
    let connect = || connect_own_with(config, node, database, "pgrelay applier", false, options);
    if !recreate {
        match connect().await {
            Ok(c) => return Ok(c),
            Err(e) if e.contains("does not exist") => {}
            Err(e) => return Err(RowError::Follower(e)),
        }
    }
    let admin_db = if database == "postgres" {
        "template1"
    } else {
        "postgres"
    };
    let mut admin = connect_own(config, node, admin_db, "pgrelay applier", false)
        .await
        .map_err(RowError::Follower)?;
    let rows = leader
        .query(&format!(
            "SELECT pg_encoding_to_char(encoding), datcollate, datctype, pg_get_userbyid(datdba) \
             FROM pg_database WHERE datname = {}",
            setup::literal(database)
        ))
        .await
        .map_err(|e| RowError::Leader(e.message))?;
    let row = rows.into_iter().next().unwrap_or_default();
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let name = bootstrap::database_ident(database);
    if recreate {
        admin
            .query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .map_err(|e| RowError::Follower(format!("dropping a partial copy: {}", e.message)))?;
    }
    let create = format!(
        "CREATE DATABASE {name} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
        setup::literal(&get(0)),
        setup::literal(&get(1)),
        setup::literal(&get(2))
    );
    // The leader's owner (statement mode replays as the statements' roles, who may need the
    // owner's rights), unless that role does not exist on the follower.
    let mut created = admin
        .query(&format!("{create} OWNER {}", setup::ident(&get(3))))
        .await;
    if created.as_ref().is_err_and(|e| e.code == "42704") {
        created = admin.query(&create).await;
    }
    admin.terminate().await;
    match created {
        Ok(_) => info!(node, database, "created the database on the follower"),
        Err(e) if e.code == "42P04" => {}
        Err(e) => {
            return Err(RowError::Follower(format!(
                "creating database {name}: {}",
                e.message
            )))
        }
    }
    connect().await.map_err(RowError::Follower)
}

/// One attempt: set up, bootstrap or resume, then stream and apply until something fails.
async fn replicate(
    config: &Arc<Config>,
    node: usize,
    follower: &str,
    database: &str,
    shared: &FollowerShared,
    metrics: Option<Arc<FollowerMetrics>>,
    stop: &CancellationToken,
) -> Result<(), RowError> {
    let slot = setup::slot_name(follower, database);
    let mut leader = connect_own(config, config.leader, database, "pgrelay row setup", false)
        .await
        .map_err(RowError::Leader)?;
    setup::prepare_leader(&mut leader, database).await?;
    let mut follower_conn =
        follower_database(config, node, database, &mut leader, false, FOLLOWER_OPTIONS).await?;
    let mut state = setup::inspect_follower(&mut follower_conn, &slot).await?;
    if state == FollowerDb::PartialBootstrap {
        info!(
            follower,
            database, "a bootstrap did not finish; copying again"
        );
        follower_conn.terminate().await;
        follower_conn =
            follower_database(config, node, database, &mut leader, true, FOLLOWER_OPTIONS).await?;
        state = FollowerDb::Empty;
    }
    let repl = connect_own_with(
        config,
        config.leader,
        database,
        "pgrelay row stream",
        true,
        LEADER_OPTIONS,
    )
    .await
    .map_err(RowError::Leader)?;
    let mut stream = ReplicationStream::new(repl);
    let start = match state {
        FollowerDb::Applied(position) => {
            match setup::slot_state(&mut leader, &slot).await? {
                Some(false) => {}
                Some(true) => {
                    return Err(RowError::Setup(format!(
                        "slot \"{slot}\" is in use by another process (is a second pgrelay \
                         replicating database \"{database}\" to follower \"{follower}\"?)"
                    )))
                }
                None => {
                    return Err(RowError::Setup(format!(
                        "follower \"{follower}\" database \"{database}\" was copied at {} but the \
                         leader has no slot \"{slot}\" any more, so the changes since are gone; \
                         drop the database on the follower and pgrelay copies it again",
                        format_lsn(position)
                    )))
                }
            }
            info!(follower, database, position = %format_lsn(position), "resuming");
            position
        }
        FollowerDb::Empty | FollowerDb::Missing | FollowerDb::PartialBootstrap => {
            if setup::slot_state(&mut leader, &slot).await?.is_some() {
                setup::drop_slot(&mut leader, &slot).await?;
            }
            let created = stream.create_slot(&slot).await?;
            info!(follower, database, consistent_point = %format_lsn(created.consistent_point), "bootstrapping from a snapshot");
            follower_conn.query(APPLIED_TABLE_SQL).await.map_err(|e| {
                RowError::Follower(format!("creating pgrelay.applied: {}", e.message))
            })?;
            let boot = bootstrap::Bootstrap {
                config,
                follower: node,
                follower_name: follower,
                database,
                source: &slot,
                snapshot: &created.snapshot,
                metrics: metrics.clone(),
            };
            boot.run(&mut follower_conn).await?;
            follower_conn
                .query(&bootstrap::finish_sql(
                    &slot,
                    &format_lsn(created.consistent_point),
                ))
                .await
                .map_err(|e| {
                    RowError::Follower(format!("finishing the bootstrap: {}", e.message))
                })?;
            created.consistent_point
        }
        FollowerDb::Diverged(why) => {
            return Err(RowError::Setup(format!(
                "{why} (pgrelay stopped applying to this database; make the follower equal to \
                 the leader and run UPDATE pgrelay.applied SET diverged = NULL, or drop the \
                 database on the follower to have it copied again)"
            )))
        }
        FollowerDb::Foreign { tables } => {
            return Err(RowError::Setup(format!(
            "database \"{database}\" on follower \"{follower}\" has {tables} tables that pgrelay \
                 did not copy; row mode copies the leader into an empty database (drop it, or list \
                 the databases to replicate in replication.databases)"
        )))
        }
    };
    leader.terminate().await;
    stream.start(&slot, start).await?;
    let key = message_key::load(config).await.map_err(RowError::Leader)?;
    let mut applier =
        Applier::new(follower_conn, follower, &slot, start, metrics).with_message_key(key);
    shared.update(database, |s| {
        s.ready = true;
        s.applied = Some(start);
        s.error = None;
    });
    let result = stream_loop(&mut stream, &mut applier, database, shared, stop).await;
    applier.close().await;
    stream.close().await;
    result
}

async fn stream_loop(
    stream: &mut ReplicationStream,
    applier: &mut Applier,
    database: &str,
    shared: &FollowerShared,
    stop: &CancellationToken,
) -> Result<(), RowError> {
    let mut reported = applier.applied();
    let mut status_tick = tokio::time::interval(CONFIRM_INTERVAL);
    loop {
        // While a group is open, more already-received transactions join it; when none is
        // waiting, the group commits at once.
        let event = if applier.has_open_group() && !applier.group_full() {
            stream.try_next()?
        } else {
            None
        };
        let event = match event {
            Some(e) => Some(e),
            None if applier.has_open_group() => {
                applier.finish_group().await?;
                None
            }
            None => tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                e = stream.next() => Some(e?),
                // The follower confirms groups sent earlier.
                r = applier.read_reply(), if applier.in_flight() => {
                    r?;
                    None
                }
                _ = status_tick.tick() => None,
            },
        };
        let mut confirm = false;
        match event {
            Some(Event::Change { at, message }) => applier.apply(at, message).await?,
            Some(Event::Keepalive { wal_end, .. }) => {
                // Everything before wal_end was sent: once the follower has it all, its
                // position is wal_end. The leader waits for an answer to each keepalive.
                if applier.has_open_group() {
                    applier.finish_group().await?;
                }
                applier.caught_up_to(wal_end);
                confirm = true;
            }
            None => {}
        }
        if applier.applied() != reported {
            reported = applier.applied();
            shared.update(database, |s| s.applied = Some(reported));
        }
        // The leader learns what the follower committed now and then (it only frees WAL by
        // it), and at once when it asked.
        if confirm || (stream.confirmed() != reported && stream.since_status() >= CONFIRM_INTERVAL)
        {
            stream.send_status(reported).await?;
        }
    }
}
