//! Bootstrap of an empty follower database, the textbook's way: take a consistent snapshot of
//! the leader (the one the slot's creation exports), copy the schema (`pg_dump --schema-only
//! --snapshot`), copy every table's rows in that snapshot (COPY, several tables at once), and
//! then stream from the slot's consistent point, where the snapshot ends.
//! <https://www.postgresql.org/docs/current/sql-set-transaction.html> (SET TRANSACTION SNAPSHOT)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use crate::backend::{connect_own_with, BackendConn};
use crate::config::Config;
use crate::metrics::FollowerMetrics;
use crate::protocol::backend::{self as be, tag};
use crate::protocol::frontend as fe;

use super::dump::SchemaCopy;
use super::setup::{ident, literal, APPLIED_TABLE_SQL};
use super::RowError;

/// One table to copy.
#[derive(Debug, Clone)]
struct CopyJob {
    qualified: String,
    /// The planner's row estimate, for progress in percent.
    estimate: u64,
}

/// What a bootstrap needs to know.
pub struct Bootstrap<'a> {
    pub config: &'a Arc<Config>,
    pub follower: usize,
    pub follower_name: &'a str,
    pub database: &'a str,
    pub source: &'a str,
    pub snapshot: &'a str,
    pub metrics: Option<Arc<FollowerMetrics>>,
}

impl Bootstrap<'_> {
    /// Copies schema and rows; on return the follower database holds the leader's data as of
    /// the snapshot, and `pgrelay.applied` still says "bootstrap in progress".
    pub async fn run(&self, follower_conn: &mut BackendConn) -> Result<u64, RowError> {
        let started = Instant::now();
        follower_conn
            .query(&format!(
                "{APPLIED_TABLE_SQL}; INSERT INTO pgrelay.applied (source, position) VALUES ({}, NULL) \
                 ON CONFLICT (source) DO UPDATE SET position = NULL",
                literal(self.source)
            ))
            .await
            .map_err(|e| RowError::Follower(format!("preparing the bootstrap: {}", e.message)))?;
        self.copy_schema().await?;
        let mut leader = self.in_snapshot().await?;
        let jobs = list_tables(&mut leader).await?;
        let total: u64 = jobs.iter().map(|j| j.estimate).sum();
        // Dropped when the last worker and this function are done, whichever way they end.
        let progress = Arc::new(Progress::start(self.metrics.clone(), jobs.len()));
        info!(follower = %self.follower_name, database = %self.database, tables = jobs.len(), estimated_rows = total, "copying tables");
        let queue = Arc::new(std::sync::Mutex::new(jobs));
        let copied = Arc::new(AtomicU64::new(0));
        let mut workers = tokio::task::JoinSet::new();
        // The connection that listed the tables is the first worker's.
        let mut first = Some(leader);
        for w in 0..self.config.replication.bootstrap_workers {
            let leader = match first.take() {
                Some(l) => l,
                None => self.in_snapshot().await?,
            };
            let follower = connect_own_with(
                self.config,
                self.follower,
                self.database,
                "pgrelay bootstrap",
                false,
                super::FOLLOWER_OPTIONS,
            )
            .await
            .map_err(RowError::Follower)?;
            let queue = queue.clone();
            let copied = copied.clone();
            let name = self.follower_name.to_owned();
            let progress = progress.clone();
            workers.spawn(async move {
                copy_worker(w, leader, follower, queue, copied, total, name, progress).await
            });
        }
        while let Some(done) = workers.join_next().await {
            done.map_err(|e| RowError::Follower(format!("copy worker failed: {e}")))??;
        }
        let rows = copied.load(Ordering::Relaxed);
        self.copy_sequences_and_views(follower_conn).await?;
        info!(follower = %self.follower_name, database = %self.database, rows, elapsed = ?started.elapsed(), "tables copied");
        Ok(rows)
    }

    /// A connection to the leader database whose transaction sees the slot's snapshot.
    async fn in_snapshot(&self) -> Result<BackendConn, RowError> {
        let mut leader = connect_own_with(
            self.config,
            self.config.leader,
            self.database,
            "pgrelay bootstrap",
            false,
            super::LEADER_OPTIONS,
        )
        .await
        .map_err(RowError::Leader)?;
        import_snapshot(&mut leader, self.snapshot).await?;
        Ok(leader)
    }

    /// The leader's schema as of the snapshot, restored on the follower in one transaction.
    async fn copy_schema(&self) -> Result<(), RowError> {
        let Some(follower) = self.config.nodes.get(self.follower) else {
            return Err(RowError::Follower("no such node".into()));
        };
        SchemaCopy {
            config: self.config,
            follower,
            follower_name: self.follower_name,
            database: self.database,
            snapshot: self.snapshot,
        }
        .run()
        .await
    }

    /// Sequence values and populated materialized views, as of the snapshot.
    async fn copy_sequences_and_views(&self, follower: &mut BackendConn) -> Result<(), RowError> {
        let mut leader = self.in_snapshot().await?;
        let sequences = leader
            .query(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value, \
                 last_value IS NOT NULL FROM pg_sequences \
                 WHERE schemaname NOT IN ('pgrelay') AND schemaname NOT LIKE 'pg\\_temp%'",
            )
            .await
            .map_err(|e| RowError::Leader(format!("reading sequences: {}", e.message)))?;
        let views = leader
            .query(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(matviewname) FROM pg_matviews \
                 WHERE ispopulated",
            )
            .await
            .map_err(|e| RowError::Leader(format!("reading materialized views: {}", e.message)))?;
        leader.terminate().await;
        let mut sql = String::new();
        for row in sequences {
            let mut it = row.into_iter();
            if let (Some(Some(name)), Some(Some(value)), Some(Some(called))) =
                (it.next(), it.next(), it.next())
            {
                sql.push_str(&format!(
                    "SELECT pg_catalog.setval({}, {}, {});",
                    literal(&name),
                    value,
                    called == "t"
                ));
            }
        }
        for row in views {
            if let Some(Some(name)) = row.into_iter().next() {
                sql.push_str(&format!("REFRESH MATERIALIZED VIEW {name};"));
            }
        }
        if !sql.is_empty() {
            follower.query(&sql).await.map_err(|e| {
                RowError::Follower(format!("copying sequences and views: {}", e.message))
            })?;
        }
        Ok(())
    }
}

/// Makes `leader`'s transaction see the exported snapshot.
async fn import_snapshot(leader: &mut BackendConn, snapshot: &str) -> Result<(), RowError> {
    leader
        .query(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            literal(snapshot)
        ))
        .await
        .map(|_| ())
        .map_err(|e| RowError::Leader(format!("importing the slot's snapshot: {}", e.message)))
}

/// The tables whose rows logical replication carries: permanent ordinary tables (partitions
/// included, partitioned parents and unlogged tables not).
async fn list_tables(leader: &mut BackendConn) -> Result<Vec<CopyJob>, RowError> {
    let rows = leader
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
                    greatest(c.reltuples, 0)::bigint \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgrelay') \
               AND n.nspname NOT LIKE 'pg\\_toast%' \
             ORDER BY c.relpages DESC",
        )
        .await
        .map_err(|e| RowError::Leader(format!("listing tables: {}", e.message)))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let mut it = r.into_iter();
            Some(CopyJob {
                qualified: it.next().flatten()?,
                estimate: it.next().flatten()?.parse().unwrap_or(0),
            })
        })
        .collect())
}

/// One bootstrap's share of the follower's bootstrap gauges: the tables it copies and those it
/// copied. Several databases of one follower may bootstrap at once, so each adds its own and
/// takes them back out when dropped; the gauges read 0 when no bootstrap runs, even one that
/// failed half way.
struct Progress {
    metrics: Option<Arc<FollowerMetrics>>,
    tables: usize,
    copied: AtomicU64,
}

impl Progress {
    fn start(metrics: Option<Arc<FollowerMetrics>>, tables: usize) -> Progress {
        if let Some(m) = &metrics {
            m.bootstrap_tables.increment(tables as f64);
        }
        Progress {
            metrics,
            tables,
            copied: AtomicU64::new(0),
        }
    }

    /// A table is copied, with `rows` rows.
    fn table_done(&self, rows: u64) {
        self.copied.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.bootstrap_rows.increment(rows);
            m.bootstrap_tables_copied.increment(1.0);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.bootstrap_tables.decrement(self.tables as f64);
            m.bootstrap_tables_copied
                .decrement(self.copied.load(Ordering::Relaxed) as f64);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_worker(
    worker: usize,
    mut leader: BackendConn,
    mut follower: BackendConn,
    queue: Arc<std::sync::Mutex<Vec<CopyJob>>>,
    copied: Arc<AtomicU64>,
    total: u64,
    follower_name: String,
    progress: Arc<Progress>,
) -> Result<(), RowError> {
    loop {
        let job = match queue.lock() {
            Ok(mut q) => {
                if q.is_empty() {
                    None
                } else {
                    Some(q.remove(0))
                }
            }
            Err(_) => None,
        };
        let Some(job) = job else { break };
        let started = Instant::now();
        let rows = copy_table(&mut leader, &mut follower, &job.qualified).await?;
        let done = copied.fetch_add(rows, Ordering::Relaxed) + rows;
        progress.table_done(rows);
        let percent = if total == 0 {
            100.0
        } else {
            (done as f64 * 100.0 / total as f64).min(100.0)
        };
        info!(follower = %follower_name, worker, table = %job.qualified, rows, elapsed = ?started.elapsed(), "copied table ({percent:.0}% of the estimated rows)");
    }
    let _ = leader.query("COMMIT").await;
    leader.terminate().await;
    follower.terminate().await;
    Ok(())
}

/// Streams `COPY table TO STDOUT` from the leader into `COPY table FROM STDIN` on the follower,
/// passing the CopyData messages through unchanged. Returns the rows copied.
async fn copy_table(
    leader: &mut BackendConn,
    follower: &mut BackendConn,
    table: &str,
) -> Result<u64, RowError> {
    let leader_err = |e: std::io::Error| RowError::Leader(format!("copying {table}: {e}"));
    let follower_err = |e: std::io::Error| RowError::Follower(format!("copying {table}: {e}"));
    fe::query(&mut follower.wbuf, &format!("COPY {table} FROM STDIN"));
    follower.flush().await.map_err(follower_err)?;
    loop {
        let frame = follower.read_frame().await.map_err(follower_err)?;
        match frame.tag() {
            tag::COPY_IN_RESPONSE => break,
            tag::ERROR_RESPONSE => {
                let f = be::parse_error_fields(&frame.body()).unwrap_or_default();
                let _ = follower.read_frame().await;
                return Err(RowError::Follower(format!(
                    "COPY {table} FROM STDIN: {}",
                    f.message
                )));
            }
            _ => {}
        }
    }
    fe::query(&mut leader.wbuf, &format!("COPY {table} TO STDOUT"));
    leader.flush().await.map_err(leader_err)?;
    let mut leader_error = None;
    loop {
        let frame = leader.read_frame().await.map_err(leader_err)?;
        match frame.tag() {
            fe::tag::COPY_DATA => {
                follower.wbuf.extend_from_slice(frame.raw());
                if follower.wbuf.len() >= 256 * 1024 {
                    follower.flush().await.map_err(follower_err)?;
                }
            }
            tag::ERROR_RESPONSE => {
                let f = be::parse_error_fields(&frame.body()).unwrap_or_default();
                leader_error = Some(f.message);
            }
            tag::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    if let Some(e) = leader_error {
        fe::copy_fail(&mut follower.wbuf, "the leader's COPY failed");
        let _ = follower.flush().await;
        return Err(RowError::Leader(format!("COPY {table} TO STDOUT: {e}")));
    }
    fe::copy_done(&mut follower.wbuf);
    follower.flush().await.map_err(follower_err)?;
    let mut rows = 0;
    let mut error = None;
    loop {
        let frame = follower.read_frame().await.map_err(follower_err)?;
        match frame.tag() {
            tag::COMMAND_COMPLETE => {
                let body = frame.body();
                rows = be::parse_command_complete(&body)
                    .ok()
                    .and_then(|c| c.rsplit(' ').next().and_then(|n| n.parse().ok()))
                    .unwrap_or(0);
            }
            tag::ERROR_RESPONSE => {
                error = Some(
                    be::parse_error_fields(&frame.body())
                        .unwrap_or_default()
                        .message,
                );
            }
            tag::READY_FOR_QUERY => break,
            _ => {}
        }
    }
    match error {
        Some(e) => Err(RowError::Follower(format!("COPY {table} FROM STDIN: {e}"))),
        None => Ok(rows),
    }
}

/// The SQL that makes a finished bootstrap count: the follower holds the snapshot and applies
/// from `position` on.
pub fn finish_sql(source: &str, position: &str) -> String {
    format!(
        "UPDATE pgrelay.applied SET position = {}::pg_lsn, updated_at = now() WHERE source = {}",
        literal(position),
        literal(source)
    )
}

/// Quoted name of a database, for CREATE / DROP DATABASE.
pub fn database_ident(name: &str) -> String {
    ident(name)
}
