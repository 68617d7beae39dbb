//! Prometheus metrics: names (with units) in one place, handles registered once per proxy and
//! passed to whoever updates them, and a small HTTP endpoint that serves `/metrics` (and the
//! status page of [`crate::status_page`] on `/` and `/status.json`).
//!
//! The recorder is per proxy rather than the `metrics` crate's global one, so several proxies
//! in one process (tests) keep their numbers apart.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{Config, Role};
use crate::server::Shared;
use crate::status_page::{self as status, History};

pub const REPLICATION_LAG_SECONDS: &str = "pgrelay_replication_lag_seconds";
pub const REPLICATION_LAG_BYTES: &str = "pgrelay_replication_lag_bytes";
pub const FOLLOWER_UP: &str = "pgrelay_follower_up";
pub const LEADER_POSITION: &str = "pgrelay_leader_position";
pub const FOLLOWER_APPLIED_POSITION: &str = "pgrelay_follower_applied_position";
pub const READS_TOTAL: &str = "pgrelay_reads_total";
pub const WRITES_TOTAL: &str = "pgrelay_writes_total";
pub const RYW_FALLBACKS_TOTAL: &str = "pgrelay_ryw_fallbacks_total";
pub const RYW_WAIT_SECONDS: &str = "pgrelay_ryw_wait_seconds";
pub const ACK_WAIT_SECONDS: &str = "pgrelay_ack_wait_seconds";
pub const ACK_TIMEOUTS_TOTAL: &str = "pgrelay_ack_timeouts_total";
pub const UNSAFE_STATEMENTS_TOTAL: &str = "pgrelay_unsafe_statements_total";
pub const CLIENT_CONNECTIONS: &str = "pgrelay_client_connections";
pub const APPLY_TRANSACTIONS_TOTAL: &str = "pgrelay_apply_transactions_total";
pub const APPLY_ROWS_TOTAL: &str = "pgrelay_apply_rows_total";
pub const APPLY_ERRORS_TOTAL: &str = "pgrelay_apply_errors_total";
pub const SLOT_RETAINED_BYTES: &str = "pgrelay_slot_retained_bytes";
pub const BOOTSTRAP_ROWS_TOTAL: &str = "pgrelay_bootstrap_rows_total";
pub const STATEMENT_LOG_BACKLOG: &str = "pgrelay_statement_log_backlog";
pub const QUERY_DURATION_SECONDS: &str = "pgrelay_query_duration_seconds";
pub const BACKEND_CONNECTIONS: &str = "pgrelay_backend_connections";
pub const PARSE_FAILURES_TOTAL: &str = "pgrelay_parse_failures_total";
pub const BOOTSTRAP_TABLES: &str = "pgrelay_bootstrap_tables";
pub const BOOTSTRAP_TABLES_COPIED: &str = "pgrelay_bootstrap_tables_copied";
pub const REPLICATION_MODE: &str = "pgrelay_replication_mode";
pub const MODE_SWITCH_PAUSE_SECONDS: &str = "pgrelay_mode_switch_pause_seconds";
pub const MODE_SWITCHES_TOTAL: &str = "pgrelay_mode_switches_total";
pub const CONFIG_RELOADS_TOTAL: &str = "pgrelay_config_reloads_total";
pub const PAUSED: &str = "pgrelay_paused";
pub const REPLICATION_REFUSED_TOTAL: &str = "pgrelay_replication_refused_total";

/// Why a read went where it went (the `reason` label of `pgrelay_reads_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadReason {
    /// A follower that satisfies the consistency level.
    Consistency,
    /// The leader, because no follower caught up within `ryw_wait` (or none was available).
    Fallback,
    /// A `/* pgrelay: ... */` comment decided.
    Hint,
    /// Inside a transaction: the transaction's node.
    Transaction,
    /// The session is pinned to the leader, or consistency is `leader`.
    Leader,
}

impl ReadReason {
    const ALL: [ReadReason; 5] = [
        ReadReason::Consistency,
        ReadReason::Fallback,
        ReadReason::Hint,
        ReadReason::Transaction,
        ReadReason::Leader,
    ];

    fn label(self) -> &'static str {
        match self {
            ReadReason::Consistency => "consistency",
            ReadReason::Fallback => "fallback",
            ReadReason::Hint => "hint",
            ReadReason::Transaction => "transaction",
            ReadReason::Leader => "leader",
        }
    }
}

/// Per-follower gauges and counters (handles: clones update the same series).
#[derive(Clone)]
pub struct FollowerMetrics {
    pub lag_seconds: Gauge,
    pub lag_bytes: Gauge,
    pub up: Gauge,
    pub applied_position: Gauge,
    /// Row and statement mode: leader transactions applied on this follower.
    pub apply_transactions: Counter,
    /// Row mode: rows applied, by operation.
    pub apply_inserts: Counter,
    pub apply_updates: Counter,
    pub apply_deletes: Counter,
    pub apply_truncates: Counter,
    /// Row and statement mode: times applying on this follower failed (it stops and is
    /// retried).
    pub apply_errors: Counter,
    /// Row mode: WAL the leader keeps for this follower's slots.
    pub slot_retained_bytes: Gauge,
    /// Rows copied by bootstraps of this follower.
    pub bootstrap_rows: Counter,
    /// Statement mode: log entries (leader transactions) this follower has yet to apply,
    /// summed over its databases.
    pub statement_log_backlog: Gauge,
    /// Tables the running bootstrap of this follower copies (0 when none runs).
    pub bootstrap_tables: Gauge,
    /// Tables the running bootstrap has copied so far.
    pub bootstrap_tables_copied: Gauge,
    /// Replication input refused, by reason (shared by every follower: the label is only
    /// `reason`).
    refused: Vec<(&'static str, Counter)>,
}

impl FollowerMetrics {
    /// Counts replication input refused for `reason` (one of [`REFUSED_REASONS`]).
    pub fn refused(&self, reason: &str) {
        if let Some((_, c)) = self.refused.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
    }
}

/// The `reason` label values of `pgrelay_replication_refused_total`.
pub const REFUSED_REASONS: [&str; 4] = ["unsigned", "signature", "role", "statement"];

/// Every metric pgrelay exports, registered once.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Node index -> follower gauges (None for the leader).
    followers: Vec<Option<FollowerMetrics>>,
    /// Node index -> one counter per [`ReadReason`].
    reads: Vec<Vec<Counter>>,
    pub leader_position: Gauge,
    pub writes: Counter,
    pub ryw_fallbacks: Counter,
    pub ryw_wait: Histogram,
    pub ack_wait: Histogram,
    pub ack_timeouts: Counter,
    /// Statement mode: unsafe statements run anyway (`unsafe = "allow"`).
    pub unsafe_statements: Counter,
    pub client_connections: Gauge,
    /// Node index -> open connections to that node (sessions' and pooled).
    backend_connections: Vec<Gauge>,
    /// Time from a unit's first message sent to a node to its last reply, by route.
    query_duration_leader: Histogram,
    query_duration_follower: Histogram,
    /// Statements the classifier could not parse (they go to the leader).
    pub parse_failures: Counter,
    /// Mode name -> 1 for the replication mode in force, 0 for the others.
    replication_mode: Vec<(&'static str, Gauge)>,
    /// How long writes waited while the replication mode switched.
    pub mode_switch_pause: Histogram,
    /// Mode switches by result (`done`, `refused`, `failed`).
    mode_switches: Vec<(&'static str, Counter)>,
    /// Config reloads by result (`ok`, `error`).
    config_reloads: Vec<(&'static str, Counter)>,
    /// 1 while the admin console's PAUSE holds new transactions.
    pub paused: Gauge,
}

const WAIT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

impl Metrics {
    pub fn new(config: &Config) -> Metrics {
        let recorder: PrometheusRecorder = PrometheusBuilder::new()
            .set_buckets(&WAIT_BUCKETS)
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let meta = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &meta)
        };
        let gauge = |name: &'static str, labels: Vec<Label>| {
            recorder.register_gauge(&Key::from_parts(name, labels), &meta)
        };
        let histogram =
            |name: &'static str| recorder.register_histogram(&Key::from_name(name), &meta);
        let route = |route: &'static str| {
            recorder.register_histogram(
                &Key::from_parts(QUERY_DURATION_SECONDS, vec![Label::new("route", route)]),
                &meta,
            )
        };
        let by = |name: &'static str, label: &'static str, values: &[&'static str]| {
            values
                .iter()
                .map(|v| (*v, counter(name, vec![Label::new(label, *v)])))
                .collect::<Vec<_>>()
        };
        let followers = config
            .nodes
            .iter()
            .map(|n| {
                (n.role == Role::Follower).then(|| {
                    let l = || vec![Label::new("follower", n.name.clone())];
                    let op = |name: &'static str, op: &'static str| {
                        counter(
                            name,
                            vec![Label::new("follower", n.name.clone()), Label::new("op", op)],
                        )
                    };
                    FollowerMetrics {
                        lag_seconds: gauge(REPLICATION_LAG_SECONDS, l()),
                        lag_bytes: gauge(REPLICATION_LAG_BYTES, l()),
                        up: gauge(FOLLOWER_UP, l()),
                        applied_position: gauge(FOLLOWER_APPLIED_POSITION, l()),
                        apply_transactions: counter(APPLY_TRANSACTIONS_TOTAL, l()),
                        apply_inserts: op(APPLY_ROWS_TOTAL, "insert"),
                        apply_updates: op(APPLY_ROWS_TOTAL, "update"),
                        apply_deletes: op(APPLY_ROWS_TOTAL, "delete"),
                        apply_truncates: op(APPLY_ROWS_TOTAL, "truncate"),
                        apply_errors: counter(APPLY_ERRORS_TOTAL, l()),
                        slot_retained_bytes: gauge(SLOT_RETAINED_BYTES, l()),
                        bootstrap_rows: counter(BOOTSTRAP_ROWS_TOTAL, l()),
                        statement_log_backlog: gauge(STATEMENT_LOG_BACKLOG, l()),
                        bootstrap_tables: gauge(BOOTSTRAP_TABLES, l()),
                        bootstrap_tables_copied: gauge(BOOTSTRAP_TABLES_COPIED, l()),
                        refused: by(REPLICATION_REFUSED_TOTAL, "reason", &REFUSED_REASONS),
                    }
                })
            })
            .collect();
        let reads = config
            .nodes
            .iter()
            .map(|n| {
                ReadReason::ALL
                    .iter()
                    .map(|r| {
                        counter(
                            READS_TOTAL,
                            vec![
                                Label::new("node", n.name.clone()),
                                Label::new("reason", r.label()),
                            ],
                        )
                    })
                    .collect()
            })
            .collect();
        let metrics = Metrics {
            followers,
            reads,
            leader_position: gauge(LEADER_POSITION, vec![]),
            writes: counter(WRITES_TOTAL, vec![]),
            ryw_fallbacks: counter(RYW_FALLBACKS_TOTAL, vec![]),
            ryw_wait: histogram(RYW_WAIT_SECONDS),
            ack_wait: histogram(ACK_WAIT_SECONDS),
            ack_timeouts: counter(ACK_TIMEOUTS_TOTAL, vec![]),
            unsafe_statements: counter(UNSAFE_STATEMENTS_TOTAL, vec![]),
            client_connections: gauge(CLIENT_CONNECTIONS, vec![]),
            backend_connections: config
                .nodes
                .iter()
                .map(|n| {
                    gauge(
                        BACKEND_CONNECTIONS,
                        vec![Label::new("node", n.name.clone())],
                    )
                })
                .collect(),
            query_duration_leader: route("leader"),
            query_duration_follower: route("follower"),
            parse_failures: counter(PARSE_FAILURES_TOTAL, vec![]),
            replication_mode: ["physical", "row", "statement"]
                .iter()
                .map(|m| (*m, gauge(REPLICATION_MODE, vec![Label::new("mode", *m)])))
                .collect(),
            mode_switch_pause: histogram(MODE_SWITCH_PAUSE_SECONDS),
            mode_switches: by(
                MODE_SWITCHES_TOTAL,
                "result",
                &["done", "refused", "failed"],
            ),
            config_reloads: by(CONFIG_RELOADS_TOTAL, "result", &["ok", "error"]),
            paused: gauge(PAUSED, vec![]),
            handle: recorder.handle(),
        };
        // Counters and histograms appear in the output from the start, not at first use.
        metrics.writes.increment(0);
        metrics.ryw_fallbacks.increment(0);
        metrics.ack_timeouts.increment(0);
        metrics.unsafe_statements.increment(0);
        metrics.parse_failures.increment(0);
        for (_, c) in metrics.mode_switches.iter().chain(&metrics.config_reloads) {
            c.increment(0);
        }
        for reason in REFUSED_REASONS {
            by(REPLICATION_REFUSED_TOTAL, "reason", &[reason])
                .iter()
                .for_each(|(_, c)| c.increment(0));
        }
        metrics.set_mode(config.replication.mode.name());
        metrics.paused.set(0.0);
        metrics
    }

    /// The gauge of open connections to `node`.
    pub fn backend_connections(&self, node: usize) -> Option<&Gauge> {
        self.backend_connections.get(node)
    }

    /// Records how long a unit took on the leader (`leader`) or a follower.
    pub fn query_duration(&self, leader: bool, seconds: f64) {
        match leader {
            true => self.query_duration_leader.record(seconds),
            false => self.query_duration_follower.record(seconds),
        }
    }

    /// Marks `mode` as the replication mode in force.
    pub fn set_mode(&self, mode: &str) {
        for (m, g) in &self.replication_mode {
            g.set(if *m == mode { 1.0 } else { 0.0 });
        }
    }

    /// Counts a mode switch that ended with `result` (`done`, `refused`, `failed`).
    pub fn mode_switch(&self, result: &str) {
        if let Some((_, c)) = self.mode_switches.iter().find(|(r, _)| *r == result) {
            c.increment(1);
        }
    }

    /// Counts a config reload that ended with `result` (`ok`, `error`).
    pub fn config_reload(&self, result: &str) {
        if let Some((_, c)) = self.config_reloads.iter().find(|(r, _)| *r == result) {
            c.increment(1);
        }
    }

    pub fn follower(&self, node: usize) -> Option<&FollowerMetrics> {
        self.followers.get(node).and_then(|f| f.as_ref())
    }

    pub fn read(&self, node: usize, reason: ReadReason) {
        let idx = ReadReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        if let Some(c) = self.reads.get(node).and_then(|r| r.get(idx)) {
            c.increment(1);
        }
    }

    /// Folds recorded histogram samples into their buckets. Until then every sample is held
    /// in memory, so this runs on a timer ([`upkeep`]) whether anyone scrapes or not.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// How often [`upkeep`] folds histogram samples into buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs [`Metrics::run_upkeep`] every [`UPKEEP_INTERVAL`] until `stop` (the per-query latency
/// histogram would otherwise keep every sample until the next scrape, and forever without one).
pub async fn upkeep(metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => metrics.run_upkeep(),
        }
    }
}

/// Connections the metrics endpoint serves at once; more get `503` and are closed, so idle
/// or slow connections cannot pile up.
pub const MAX_HTTP_CONNECTIONS: usize = 64;
/// How long one request may take, from accept to the last byte of the response.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_REQUEST_HEAD: usize = 8192;

/// Serves `GET /metrics`, the status page and its JSON on `listener` until `stop` is
/// cancelled, and samples the followers' lag for the page's history meanwhile. At most
/// [`MAX_HTTP_CONNECTIONS`] at once, each for at most [`HTTP_TIMEOUT`].
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let history = Arc::new(History::default());
    let mut ticks = tokio::time::interval(status::SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {
                history.sample(&shared);
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    warn!(error = %err, "metrics endpoint: accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Without waiting: a full socket buffer just loses the answer.
            let _ = stream.try_write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            debug!("metrics endpoint: too many connections, one refused");
            continue;
        };
        let shared = shared.clone();
        let history = history.clone();
        tracker.spawn(async move {
            if tokio::time::timeout(HTTP_TIMEOUT, answer(stream, &shared, &history))
                .await
                .is_err()
            {
                debug!("metrics endpoint: request timed out");
            }
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Reads one request head and answers it.
async fn answer(mut stream: tokio::net::TcpStream, shared: &Shared, history: &History) {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST_HEAD {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
    }
    let line = String::from_utf8_lossy(&request);
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let (status, content_type, body) = respond(target, shared, history);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(err) = stream.write_all(response.as_bytes()).await {
        debug!(error = %err, "metrics endpoint: write failed");
    }
    let _ = stream.shutdown().await;
}

/// Status line, content type and body for a request target.
fn respond(
    target: &str,
    shared: &Shared,
    history: &History,
) -> (&'static str, &'static str, String) {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            shared.metrics.render(),
        ),
        "/" => (
            "200 OK",
            "text/html; charset=utf-8",
            status::PAGE.to_owned(),
        ),
        "/status.json" => (
            "200 OK",
            "application/json",
            status::status_json(shared, history, status::since_param(target)),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found; try /metrics, / or /status.json\n".to_owned(),
        ),
    }
}
