//! Operating a running pgrelay: reloading the config (SIGHUP, the console's `RELOAD`), the
//! live switch between row and statement mode that a reload may ask for, and the console's
//! `PAUSE` / `RESUME`.
//!
//! All three rest on one gate: a session holds it (shared) from the first message of a
//! transaction until it is idle again, and `PAUSE` or a mode switch take it exclusively. A
//! waiting exclusive taker queues new sessions' transactions behind it (tokio's `RwLock` is
//! fair), so "new transactions wait, open ones finish" is the lock's own behaviour.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, ReplicationMode};
use crate::protocol::sqlstate::{self, SqlState};
use crate::replication::{handover, physical};
use crate::server::Shared;

/// The running replication mode's tasks.
struct Running {
    tracker: TaskTracker,
    stop: CancellationToken,
}

/// What sessions and the operator's commands share.
#[derive(Default)]
pub struct Control {
    gate: Arc<RwLock<()>>,
    /// Held while the console's PAUSE is in force.
    paused: Mutex<Option<OwnedRwLockWriteGuard<()>>>,
    /// One reload, PAUSE or RESUME at a time.
    busy: tokio::sync::Mutex<()>,
    replication: tokio::sync::Mutex<Option<Running>>,
    /// The file a reload reads (None: started from a config in memory).
    config_path: Mutex<Option<PathBuf>>,
    /// Bumped whenever a reload put a new config in force: sessions pick it up when they next
    /// start a transaction.
    generation: AtomicU64,
}

/// Why a reload, PAUSE or RESUME did not happen; `code` is the SQLSTATE the console answers.
#[derive(Debug, Clone)]
pub struct ControlError {
    pub code: SqlState,
    pub message: String,
}

impl ControlError {
    fn new(code: SqlState, message: impl Into<String>) -> Self {
        ControlError {
            code,
            message: message.into(),
        }
    }

    /// The state of pgrelay or its followers does not allow it now.
    fn state(message: impl Into<String>) -> Self {
        ControlError::new(sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, message)
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, Default)]
pub struct Reloaded {
    /// Options that changed in the file but need a restart (their old values stay).
    pub need_restart: Vec<&'static str>,
    /// The replication mode switched: from, to, and how long new transactions waited.
    pub switched: Option<(ReplicationMode, ReplicationMode, Duration)>,
}

impl Reloaded {
    /// One line for the log and the console.
    pub fn summary(&self) -> String {
        let mut text = match self.switched {
            Some((from, to, pause)) => format!(
                "config reloaded; replication mode switched from {} to {} (transactions waited {:.3}s)",
                from.name(),
                to.name(),
                pause.as_secs_f64()
            ),
            None => "config reloaded".to_owned(),
        };
        if !self.need_restart.is_empty() {
            text.push_str(&format!(
                "; changed but only applied by a restart: {}",
                self.need_restart.join(", ")
            ));
        }
        text
    }
}

impl Control {
    /// Where a reload reads the config.
    pub fn set_config_path(&self, path: &Path) {
        if let Ok(mut p) = self.config_path.lock() {
            *p = Some(path.to_owned());
        }
    }

    fn config_path(&self) -> Option<PathBuf> {
        self.config_path.lock().ok().and_then(|p| p.clone())
    }

    /// A session's pass for one transaction (waits while a switch or PAUSE holds the gate).
    pub async fn enter(&self) -> OwnedRwLockReadGuard<()> {
        self.gate.clone().read_owned().await
    }

    /// Counts the reloads that put a new config in force.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.lock().map(|p| p.is_some()).unwrap_or(false)
    }
}

/// Starts the replication tasks of the mode in force.
pub async fn start_replication(shared: &Arc<Shared>) {
    let config = shared.config();
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let (positions, metrics) = (shared.positions.clone(), shared.metrics.clone());
    match config.replication.mode {
        ReplicationMode::Row => {
            crate::replication::row::spawn(config, positions, metrics, &tracker, stop.clone())
        }
        ReplicationMode::Statement => {
            crate::replication::statement::spawn(config, positions, metrics, &tracker, stop.clone())
        }
        ReplicationMode::Physical => {
            physical::spawn(config, positions, metrics, &tracker, stop.clone())
        }
    }
    *shared.control.replication.lock().await = Some(Running { tracker, stop });
}

/// Stops the replication tasks and waits until they are gone.
pub async fn stop_replication(shared: &Shared) {
    let running = shared.control.replication.lock().await.take();
    if let Some(r) = running {
        r.stop.cancel();
        r.tracker.close();
        r.tracker.wait().await;
    }
}

/// Reads the config file again and puts it in force: reloadable options at once (sessions
/// pick them up at their next transaction), a changed replication mode by a live switch.
pub async fn reload(shared: &Arc<Shared>) -> Result<Reloaded, ControlError> {
    let _busy = shared.control.busy.lock().await;
    let result = reload_locked(shared).await;
    match &result {
        Ok(done) => {
            shared.metrics.config_reload("ok");
            info!("{}", done.summary());
        }
        Err(e) => {
            shared.metrics.config_reload("error");
            error!(error = %e, "config reload failed; the previous config stays in force");
        }
    }
    result
}

async fn reload_locked(shared: &Arc<Shared>) -> Result<Reloaded, ControlError> {
    let path = shared.control.config_path().ok_or_else(|| {
        ControlError::state(
            "pgrelay was not started from a config file (pgrelay run --config FILE), so there is \
         nothing to reload",
        )
    })?;
    let new = Config::load(&path).map_err(|e| {
        ControlError::new(
            sqlstate::CONFIG_FILE_ERROR,
            format!("{}: {e}", path.display()),
        )
    })?;
    let old = shared.config();
    let (new, need_restart) = old.reloaded(new);
    let (from, to) = (old.replication.mode, new.replication.mode);
    let mut done = Reloaded {
        need_restart,
        switched: None,
    };
    if from == to {
        put_in_force(shared, new);
    } else {
        if from == ReplicationMode::Physical || to == ReplicationMode::Physical {
            shared.metrics.mode_switch("refused");
            return Err(ControlError::new(
                sqlstate::FEATURE_NOT_SUPPORTED,
                format!(
                    "replication.mode cannot change from {} to {} while pgrelay runs: physical \
                 followers are read-only streaming standbys that Postgres keeps equal to the \
                 leader, while row and statement followers are writable databases that pgrelay \
                 fills; neither kind can become the other in place. Set mode back to \"{}\" and \
                 reload, or rebuild the followers for the other kind and restart pgrelay",
                    from.name(),
                    to.name(),
                    from.name()
                ),
            ));
        }
        let pause = switch_mode(shared, &old, new)
            .await
            .map_err(ControlError::state)?;
        done.switched = Some((from, to, pause));
    }
    Ok(done)
}

/// Makes `config` the one in force, and tells sessions to take it at their next transaction.
/// In a mode switch this happens while the gate is held, so no session starts a transaction
/// under the new mode with the old config.
fn put_in_force(shared: &Shared, config: Config) {
    shared.set_config(Arc::new(config));
    shared.control.generation.fetch_add(1, Ordering::AcqRel);
}

/// Switches between row and statement mode: holds new transactions, lets open ones finish,
/// waits until every follower applied everything under the old mode, stops it, records on
/// every follower where the new mode starts, and starts it. Returns how long transactions
/// waited. On any error before the new mode started, the old one goes on.
async fn switch_mode(shared: &Arc<Shared>, old: &Config, new: Config) -> Result<Duration, String> {
    let started = Instant::now();
    let timeout = new.replication.switch_timeout;
    let deadline = started + timeout;
    let (from, to) = (old.replication.mode, new.replication.mode);
    info!(
        from = from.name(),
        to = to.name(),
        "switching replication mode: new transactions wait"
    );
    let paused = shared.control.paused.lock().ok().and_then(|mut p| p.take());
    let was_paused = paused.is_some();
    let guard = match paused {
        Some(g) => g,
        None => match tokio::time::timeout_at(
            deadline.into(),
            shared.control.gate.clone().write_owned(),
        )
        .await
        {
            Ok(g) => g,
            Err(_) => {
                shared.metrics.mode_switch("failed");
                return Err(format!(
                    "transactions still open after switch_timeout ({}); the mode stays {}",
                    humantime::format_duration(timeout),
                    from.name()
                ));
            }
        },
    };
    let result = carry_out(shared, old, new, deadline).await;
    let pause = started.elapsed();
    if was_paused {
        if let Ok(mut p) = shared.control.paused.lock() {
            *p = Some(guard);
        }
    } else {
        drop(guard);
    }
    match &result {
        Ok(()) => {
            shared.metrics.mode_switch_pause.record(pause.as_secs_f64());
            shared.metrics.mode_switch("done");
            info!(
                from = from.name(),
                to = to.name(),
                pause_seconds = pause.as_secs_f64(),
                "replication mode switched; transactions resume"
            );
        }
        Err(e) => {
            shared.metrics.mode_switch("failed");
            warn!(error = %e, "mode switch abandoned; transactions resume in {} mode", from.name());
        }
    }
    result.map(|()| pause)
}

/// The switch proper, with the gate held.
async fn carry_out(
    shared: &Arc<Shared>,
    old: &Config,
    new: Config,
    deadline: Instant,
) -> Result<(), String> {
    let (from, to) = (old.replication.mode, new.replication.mode);
    let databases = handover::databases(old).await?;
    handover::drain(old, &shared.positions, from, &databases, deadline)
        .await
        .map_err(|e| format!("{e}; the mode stays {}", from.name()))?;
    stop_replication(shared).await;
    let recorded = match to {
        ReplicationMode::Row => handover::to_row(&new, &databases).await,
        ReplicationMode::Statement => handover::to_statement(&new, &databases).await,
        ReplicationMode::Physical => Err("cannot switch to physical mode".to_owned()),
    };
    if let Err(e) = recorded {
        start_replication(shared).await;
        return Err(format!("{e}; the mode stays {}", from.name()));
    }
    shared.positions.reset(to == ReplicationMode::Statement);
    shared.metrics.set_mode(to.name());
    put_in_force(shared, new);
    // After the new config: a classifier loaded from now on is for the new mode.
    shared.classifiers.invalidate_all();
    start_replication(shared).await;
    Ok(())
}

/// The console's PAUSE: new transactions wait from now on; returns once the open ones have
/// finished (at most `switch_timeout`, after which nothing is paused).
pub async fn pause(shared: &Shared) -> Result<(), ControlError> {
    let _busy = shared.control.busy.lock().await;
    if shared.control.is_paused() {
        return Err(ControlError::state("pgrelay is paused already"));
    }
    let timeout = shared.config().replication.switch_timeout;
    let guard = tokio::time::timeout(timeout, shared.control.gate.clone().write_owned())
        .await
        .map_err(|_| {
            ControlError::state(format!(
                "transactions still open after switch_timeout ({}); nothing is paused",
                humantime::format_duration(timeout)
            ))
        })?;
    if let Ok(mut p) = shared.control.paused.lock() {
        *p = Some(guard);
    }
    shared.metrics.paused.set(1.0);
    info!("paused: new transactions wait until RESUME");
    Ok(())
}

/// The console's RESUME: transactions held by PAUSE go on.
pub async fn resume(shared: &Shared) -> Result<(), ControlError> {
    let _busy = shared.control.busy.lock().await;
    let guard = shared.control.paused.lock().ok().and_then(|mut p| p.take());
    match guard {
        Some(g) => {
            drop(g);
            shared.metrics.paused.set(0.0);
            info!("resumed");
            Ok(())
        }
        None => Err(ControlError::state("pgrelay is not paused")),
    }
}

/// Reloads on every SIGHUP until `stop`.
pub async fn reload_on_sighup(shared: Arc<Shared>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP; reload with the console's RELOAD");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                info!("SIGHUP: reloading the config");
                // The outcome is logged by reload itself.
                let _ = reload(&shared).await;
            }
        }
    }
}
