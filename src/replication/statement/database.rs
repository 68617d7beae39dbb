//! The task that replays one database's log into one follower, starting over after every
//! failure: set the log up on the leader, open (or create) the follower database, take the
//! replayer lock (or, when another process holds it, only follow the seq it records), copy an
//! empty database, then fetch and apply entries until something fails.
//!
//! A statement that fails on the follower means it is no longer equal to the leader: the seq
//! and the error are recorded in `pgrelay.applied.diverged`, the database is no longer served
//! from this follower, and replay waits until someone clears the mark.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backend::{connect_own, BackendConn};
use crate::config::Config;
use crate::metrics::FollowerMetrics;

use super::super::positions::Positions;
use super::super::row::setup::{mark_diverged_sql, FollowerDb};
use super::super::row::{follower_database, FollowerShared, SLOW_RETRY};
use super::entry::{self, Backlog};
use super::log::{self, APPLIED_SOURCE};
use super::replay::Replayer;
use super::{setup, ReplayError};

/// Entries fetched (and applied in one round trip) at most at once.
const BATCH: usize = 100;
/// How often, at most, the backlog is counted while it is longer than a batch.
const BACKLOG_REFRESH: Duration = Duration::from_secs(1);

/// What the task for one follower database needs.
#[derive(Clone)]
pub(super) struct DatabaseTask {
    pub config: Arc<Config>,
    pub node: usize,
    pub database: String,
    pub positions: Arc<Positions>,
    pub shared: Arc<FollowerShared>,
    pub metrics: Option<Arc<FollowerMetrics>>,
    /// Changes when a read or a commit waits for this follower.
    pub poll: watch::Receiver<u64>,
    pub stop: CancellationToken,
}

impl DatabaseTask {
    /// Publishes where the database stands: served, applied up to `applied`.
    fn publish(&self, applied: u64) {
        self.positions
            .publish_database(self.node, &self.database, applied);
        self.shared.update(&self.database, |s| {
            s.ready = true;
            s.applied = Some(applied);
            s.error = None;
        });
    }

    /// Reports what waits: `oldest` is how long ago the oldest entry not applied yet was
    /// logged (None: nothing waits), so the lag keeps growing while it waits.
    fn pending(&self, oldest: Option<Duration>, backlog: Backlog) {
        let since = oldest.and_then(|age| Instant::now().checked_sub(age));
        self.shared.update(&self.database, |s| {
            s.oldest_pending = since;
            s.lag_bytes = backlog.bytes;
            s.backlog = backlog.entries;
        });
    }

    /// Not served from this follower (the last position stays known, for retention).
    fn unpublish(&self) {
        self.shared.update(&self.database, |s| {
            s.ready = false;
            s.oldest_pending = None;
            s.lag_bytes = 0;
        });
    }

    /// Waits for the next poll: `replication.poll_interval`, or sooner when asked. False when
    /// the task must stop. `idle`: a follower connection with nothing in flight, watched so
    /// that a follower that shuts down (FATAL, then EOF) is noticed without an entry to apply.
    async fn wait(&mut self, idle: Option<&mut BackendConn>) -> Result<bool, ReplayError> {
        let tick = tokio::time::sleep(self.config.replication.poll_interval);
        let closed = async {
            match idle {
                Some(conn) => idle_failure(conn).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.stop.cancelled() => Ok(false),
            _ = tick => Ok(true),
            e = closed => Err(e),
            changed = self.poll.changed() => {
                if changed.is_err() {
                    // The fan-out stopped: only the tick is left.
                    tokio::time::sleep(self.config.replication.poll_interval).await;
                }
                Ok(true)
            }
        }
    }
}

/// Resolves when an idle connection fails: an ErrorResponse (the server shutting down) or a
/// lost connection; notices and the like are skipped. Cancel-safe (`read_frame` is).
async fn idle_failure(conn: &mut BackendConn) -> ReplayError {
    loop {
        match conn.read_frame().await {
            Ok(frame) if frame.tag() == crate::protocol::backend::tag::ERROR_RESPONSE => {
                let f =
                    crate::protocol::backend::parse_error_fields(&frame.body()).unwrap_or_default();
                return ReplayError::Follower(format!("{} (SQLSTATE {})", f.message, f.code));
            }
            Ok(_) => {}
            Err(e) => return ReplayError::Follower(format!("connection lost: {e}")),
        }
    }
}

/// Replays one database to one follower until `stop`.
pub(super) async fn run(mut task: DatabaseTask) {
    let follower = task.config.node_name(task.node);
    let mut last_error: Option<String> = None;
    loop {
        let stop = task.stop.clone();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = replicate(&mut task, &follower) => r,
        };
        let err = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        let text = err.to_string();
        if last_error.as_deref() != Some(text.as_str()) {
            // Counted once per problem, not once per retry.
            if matches!(err, ReplayError::Diverged { .. } | ReplayError::BadEntry(_)) {
                if let Some(m) = &task.metrics {
                    m.apply_errors.increment(1);
                }
            }
            match err {
                ReplayError::Setup(_) | ReplayError::Diverged { .. } | ReplayError::BadEntry(_) => {
                    error!(follower = %follower, database = %task.database, error = %text, "replay stopped; retrying every {SLOW_RETRY:?}")
                }
                ReplayError::Leader(_) | ReplayError::Follower(_) => {
                    warn!(follower = %follower, database = %task.database, error = %text, "replay stopped; retrying in {SLOW_RETRY:?}")
                }
            }
        }
        task.unpublish();
        last_error = Some(text);
        tokio::select! {
            _ = task.stop.cancelled() => return,
            _ = tokio::time::sleep(SLOW_RETRY) => {}
        }
    }
}

/// One attempt: set up, bootstrap or resume, then replay until something fails (Ok: stopped).
async fn replicate(task: &mut DatabaseTask, follower: &str) -> Result<(), ReplayError> {
    let config = task.config.clone();
    let database = task.database.clone();
    let mut leader = connect_own(&config, config.leader, &database, "pgrelay replayer", false)
        .await
        .map_err(ReplayError::Leader)?;
    leader
        .query(&log::leader_setup_sql())
        .await
        .map_err(|e| ReplayError::Leader(format!("creating the statement log: {}", e.message)))?;
    let mut conn = open_follower(&config, task.node, &database, &mut leader, false).await?;
    if !setup::try_lock(&mut conn).await? {
        info!(
            follower,
            database, "another process replays into this database; following its position"
        );
        if !observe(task, &mut leader, &mut conn).await? {
            return Ok(());
        }
        info!(follower, database, "took over replaying");
    }
    setup::ensure_bookkeeping(&mut conn).await?;
    let state = setup::inspect(&mut conn).await?;
    let applied = match state {
        FollowerDb::Applied(seq) => {
            let end = setup::leader_log_end(&mut leader).await?;
            if seq > end {
                return Err(ReplayError::Setup(format!(
                    "follower \"{follower}\" database \"{database}\" has applied the statement \
                     log up to seq {seq}, but the leader's log only reaches {end} (was the leader \
                     restored from a backup, or its log recreated?); drop the database on the \
                     follower to have it copied again"
                )));
            }
            info!(follower, database, seq, "resuming");
            seq
        }
        FollowerDb::Empty | FollowerDb::Missing => {
            setup::bootstrap(
                &config,
                task.node,
                &database,
                &mut conn,
                task.metrics.clone(),
            )
            .await?
        }
        FollowerDb::PartialBootstrap => {
            info!(
                follower,
                database, "a bootstrap did not finish; copying again"
            );
            conn.terminate().await;
            conn = open_follower(&config, task.node, &database, &mut leader, true).await?;
            if !setup::try_lock(&mut conn).await? {
                return Err(ReplayError::Follower(
                    "another process took the replayer lock while the database was recreated"
                        .into(),
                ));
            }
            setup::ensure_bookkeeping(&mut conn).await?;
            setup::bootstrap(
                &config,
                task.node,
                &database,
                &mut conn,
                task.metrics.clone(),
            )
            .await?
        }
        FollowerDb::Diverged(why) => {
            return Err(ReplayError::Setup(format!(
                "follower \"{follower}\" database \"{database}\": {why} (pgrelay stopped \
                 replaying into this database; make the follower equal to the leader and run \
                 UPDATE pgrelay.applied SET diverged = NULL, or drop the database on the \
                 follower to have it copied again)"
            )))
        }
        FollowerDb::Foreign { tables } => {
            return Err(ReplayError::Setup(format!(
                "database \"{database}\" on follower \"{follower}\" has {tables} tables that \
                 pgrelay did not copy; statement mode copies the leader into an empty database \
                 (drop it, or list the databases to replicate in replication.databases)"
            )))
        }
    };
    let mut replayer = Replayer::new(
        conn,
        config.clone(),
        task.node,
        &database,
        applied,
        task.metrics.clone(),
    );
    let result = replay_loop(task, &mut leader, &mut replayer).await;
    if let Err(ReplayError::Diverged { message, .. }) = &result {
        // Stays stopped across retries and restarts until someone looks.
        let marked = replayer
            .conn()
            .query(&mark_diverged_sql(APPLIED_SOURCE, message))
            .await;
        if let Err(e) = marked {
            warn!(follower, database, error = %e, "cannot record the divergence on the follower");
        }
    }
    replayer.close().await;
    leader.terminate().await;
    result
}

/// The follower database, created like the leader's when missing (`recreate`: dropped first).
async fn open_follower(
    config: &Config,
    node: usize,
    database: &str,
    leader: &mut BackendConn,
    recreate: bool,
) -> Result<BackendConn, ReplayError> {
    Ok(follower_database(
        config,
        node,
        database,
        leader,
        recreate,
        setup::FOLLOWER_OPTIONS,
    )
    .await?)
}

/// While another process holds the replayer lock: publishes the seq the follower records,
/// until this process gets the lock (true) or must stop (false).
async fn observe(
    task: &mut DatabaseTask,
    leader: &mut BackendConn,
    conn: &mut BackendConn,
) -> Result<bool, ReplayError> {
    let mut backlog_at: Option<Instant> = None;
    loop {
        if setup::try_lock(conn).await? {
            return Ok(true);
        }
        match setup::recorded_seq(conn).await? {
            Some(seq) => {
                if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_REFRESH) {
                    let backlog = entry::backlog(leader, seq).await?;
                    backlog_at = Some(Instant::now());
                    task.pending((backlog.entries > 0).then_some(backlog.oldest), backlog);
                }
                task.publish(seq);
            }
            None => task.unpublish(),
        }
        if !task.wait(Some(&mut *conn)).await? {
            return Ok(false);
        }
    }
}

/// Fetches and applies entries, publishing the position after every batch, until an error
/// or `stop` (Ok).
async fn replay_loop(
    task: &mut DatabaseTask,
    leader: &mut BackendConn,
    replayer: &mut Replayer,
) -> Result<(), ReplayError> {
    task.publish(replayer.applied());
    let mut backlog_at: Option<Instant> = None;
    loop {
        let fetched = entry::fetch(leader, replayer.applied(), BATCH).await?;
        let entries = fetched.entries;
        let more = entries.len() == BATCH;
        if let Some(first) = entries.first() {
            if backlog_at.is_none() {
                // Within a batch: what the batch holds (a longer backlog is counted below).
                let backlog = Backlog {
                    entries: entries.len() as u64,
                    bytes: entries.iter().map(|e| e.size_bytes).sum(),
                    oldest: first.age,
                };
                task.pending(Some(first.age), backlog);
            }
            let before = replayer.applied();
            let applied = replayer.apply(&entries).await;
            if replayer.applied() != before {
                task.publish(replayer.applied());
            }
            applied?;
        }
        if let Some(unreadable) = fetched.unreadable {
            return Err(unreadable);
        }
        if more {
            // Behind by more than a batch: count what waits now and then, and go on at once.
            if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_REFRESH) {
                let backlog = entry::backlog(leader, replayer.applied()).await?;
                backlog_at = Some(Instant::now());
                task.pending(Some(backlog.oldest), backlog);
            }
            if task.stop.is_cancelled() {
                return Ok(());
            }
            continue;
        }
        // Everything fetched is applied: nothing waits (until the next fetch says otherwise).
        if backlog_at.is_some() || !entries.is_empty() {
            backlog_at = None;
            task.pending(None, Backlog::default());
        }
        if !task.wait(Some(replayer.conn())).await? {
            return Ok(());
        }
    }
}
