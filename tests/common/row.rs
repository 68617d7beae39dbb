//! Row-mode harness: a cluster whose followers are empty writable servers (pgrelay copies the
//! leader onto them), proxies that replicate one test database each, and the convergence
//! check: every table has the same rows on the leader and on each follower.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgrelay::cluster::{self, ClusterOptions, FollowerKind, LocalCluster, NodeInfo};

use super::{
    block_on_fresh, connect_direct, connect_proxy, metric, proxy_config, scrape, ClusterInfo,
    PASSWORD, SUPERUSER,
};

static ROW_CLUSTER: Mutex<Option<LocalCluster>> = Mutex::new(None);
static ROW_INFO: OnceLock<ClusterInfo> = OnceLock::new();

/// Starts a leader and `followers` empty followers, sized for many slots and walsenders.
pub fn start_row_cluster(followers: usize, prefix: &str) -> LocalCluster {
    let mut opts = ClusterOptions::new(cluster::test_dir(prefix));
    opts.followers = followers;
    opts.superuser = SUPERUSER.to_owned();
    opts.password = PASSWORD.to_owned();
    opts.follower_kind = FollowerKind::Empty;
    opts.remove_dir_on_drop = true;
    opts.extra_conf = vec![
        ("max_replication_slots".into(), "64".into()),
        ("max_wal_senders".into(), "64".into()),
        ("max_connections".into(), "300".into()),
    ];
    let c = LocalCluster::start(opts).expect("start the row-mode cluster");
    // Roles are not replicated: the test roles exist on every node.
    let nodes: Vec<NodeInfo> = std::iter::once(c.leader().clone())
        .chain(c.followers().iter().cloned())
        .collect();
    block_on_fresh(async move {
        for node in nodes {
            let client = connect_direct(&node, "postgres").await;
            for (role, pw) in [(super::MD5_USER, "md5-pw"), (super::TRUST_USER, "trust-pw")] {
                client
                    .batch_execute(&format!(
                        "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{pw}'"
                    ))
                    .await
                    .unwrap();
            }
        }
    });
    c
}

/// The binary's shared row-mode cluster, started on first use.
pub fn row_cluster() -> &'static ClusterInfo {
    ROW_INFO.get_or_init(|| {
        super::init_tracing();
        let c = start_row_cluster(2, "row");
        let info = ClusterInfo {
            leader: c.leader().clone(),
            followers: c.followers().to_vec(),
            bin_dir: c.bin_dir().to_path_buf(),
        };
        *ROW_CLUSTER.lock().unwrap() = Some(c);
        cluster::stop_at_exit(&ROW_CLUSTER);
        info
    })
}

/// A fresh database on the leader only (pgrelay creates it on the followers).
pub async fn leader_database(leader: &NodeInfo, prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!("r_{prefix}_{}", N.fetch_add(1, Ordering::Relaxed));
    let client = connect_direct(leader, "postgres").await;
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    name
}

/// A row-mode config that replicates `db` only; `extra` goes into `[proxy]` (then sections).
pub fn row_config(info: &ClusterInfo, db: &str, extra: &str) -> String {
    let mut sections = format!(
        "\n[replication]\nmode = \"row\"\nuser = \"{SUPERUSER}\"\ndatabases = [\"{db}\"]\n"
    );
    // A test may add its own [replication] keys after ours.
    if let Some(rest) = extra.strip_prefix("[replication]\n") {
        sections.push_str(rest);
    } else {
        sections.push_str(extra);
    }
    proxy_config(&info.leader, &info.followers, &sections)
}

/// The slot (and `pgrelay.applied` source) that streams `db` to `follower`.
pub fn slot(follower: &NodeInfo, db: &str) -> String {
    pgrelay::replication::row::setup::slot_name(&follower.name, db)
}

/// The position a follower recorded for `db`, once its bootstrap finished.
pub async fn applied(follower: &NodeInfo, db: &str) -> Option<String> {
    let Ok((client, conn)) = tokio_postgres::connect(
        &super::direct_conn_string(follower, db),
        tokio_postgres::NoTls,
    )
    .await
    else {
        return None;
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = client
        .query_opt(
            "SELECT position::text FROM pgrelay.applied WHERE source = $1 AND position IS NOT NULL",
            &[&slot(follower, db)],
        )
        .await
        .ok()??;
    row.get(0)
}

/// The first column of the one row `sql` returns on `node`.
pub async fn value_on<T>(node: &NodeInfo, db: &str, sql: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    connect_direct(node, db)
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until every follower finished copying `db`.
pub async fn wait_bootstrapped(info: &ClusterInfo, db: &str) {
    for f in &info.followers {
        super::wait_until(Duration::from_secs(60), || async {
            applied(f, db).await.is_some()
        })
        .await;
    }
}

/// Row count and an order-independent digest of every user table of `db` on `node`.
pub async fn digests(
    node: &NodeInfo,
    db: &str,
    tables: &[String],
) -> BTreeMap<String, (i64, String)> {
    let client = connect_direct(node, db).await;
    // Text forms that do not depend on the database's own settings.
    client
        .batch_execute(
            "SET datestyle = ISO; SET timezone = UTC; SET intervalstyle = postgres; \
             SET extra_float_digits = 3",
        )
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for t in tables {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), coalesce(md5(string_agg(md5(x::text), '' ORDER BY md5(x::text))), '') FROM {t} x"
                ),
                &[],
            )
            .await;
        let value = match row {
            Ok(r) => (r.get::<_, i64>(0), r.get::<_, String>(1)),
            Err(e) => (-1, super::error_message(&e)),
        };
        out.insert(t.clone(), value);
    }
    out
}

/// The leader's user tables in `db`.
pub async fn tables(leader: &NodeInfo, db: &str) -> Vec<String> {
    let client = connect_direct(leader, db).await;
    client
        .query(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pgrelay') \
             AND schemaname NOT LIKE 'pg\\_temp%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until every follower has exactly the leader's rows in every table of `db`; fails
/// with the differing tables at the deadline.
pub async fn assert_converged(
    info: &ClusterInfo,
    followers: &[NodeInfo],
    db: &str,
    deadline: Duration,
) {
    let end = Instant::now() + deadline;
    let tables = tables(&info.leader, db).await;
    assert!(!tables.is_empty(), "no tables to compare in {db}");
    loop {
        let leader = digests(&info.leader, db, &tables).await;
        let mut diff = Vec::new();
        for f in followers {
            let theirs = digests(f, db, &tables).await;
            for (t, v) in &leader {
                if theirs.get(t) != Some(v) {
                    diff.push(format!(
                        "{}: {t} leader {v:?} follower {:?}",
                        f.name,
                        theirs.get(t)
                    ));
                }
            }
        }
        if diff.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "not converged within {deadline:?}:\n{}",
            diff.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pgrelay process of its own (`pgrelay run`), killed when dropped.
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl ProxyProcess {
    /// Starts `pgrelay run --config` with `config` (listen and metrics on the given ports)
    /// and waits until it accepts connections.
    pub fn start(config: &str, dir: &std::path::Path, name: &str) -> ProxyProcess {
        ProxyProcess::start_with_env(config, dir, name, &[])
    }

    /// [`ProxyProcess::start`] with more environment variables for the process.
    pub fn start_with_env(
        config: &str,
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> ProxyProcess {
        use std::os::unix::process::CommandExt;
        let port = cluster::free_port().unwrap();
        let mport = cluster::free_port().unwrap();
        let text = config
            .replace(
                "listen = \"127.0.0.1:0\"\nnode_retry",
                &format!("listen = \"127.0.0.1:{port}\"\nnode_retry"),
            )
            .replace(
                "[metrics]\nlisten = \"127.0.0.1:0\"",
                &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
            );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl in the child between fork and exec only sets its parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < end, "pgrelay did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        ProxyProcess {
            child,
            addr,
            metrics: format!("127.0.0.1:{mport}").parse().unwrap(),
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `f` on the shared row cluster.
pub fn with_row_cluster<T>(f: impl FnOnce(&mut LocalCluster) -> T) -> T {
    let mut guard = ROW_CLUSTER.lock().unwrap();
    f(guard.as_mut().expect("row cluster started"))
}

/// Keeps `block_on_fresh` reachable for sync callers of this module.
pub fn run<F: std::future::Future + Send + 'static>(f: F) -> F::Output
where
    F::Output: Send + 'static,
{
    block_on_fresh(f)
}

/// A statement-mode config that replicates `db` only (as [`row_config`]).
pub fn statement_config(info: &ClusterInfo, db: &str, extra: &str) -> String {
    row_config(info, db, extra).replace("mode = \"row\"", "mode = \"statement\"")
}

/// The seq a statement-mode follower recorded for `db`, once its bootstrap finished.
pub async fn statement_applied(follower: &NodeInfo, db: &str) -> Option<i64> {
    let (client, conn) = tokio_postgres::connect(
        &super::direct_conn_string(follower, db),
        tokio_postgres::NoTls,
    )
    .await
    .ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .query_opt(
            "SELECT seq FROM pgrelay.applied WHERE source = 'statement' AND seq IS NOT NULL",
            &[],
        )
        .await
        .ok()??
        .get(0)
}

/// Rows in the ledger table, as `client`'s node has them.
pub async fn ledger_rows(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0)
}

/// Writes through pgrelay until told to stop: each transaction moves money and appends to the
/// ledger (no key, so a duplicated insert would show). Returns how many commits succeeded.
pub async fn load(
    addr: std::net::SocketAddr,
    db: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> u64 {
    let mut committed = 0;
    let mut client = None;
    let mut i: i32 = 0;
    while !*stop.borrow() {
        if client.is_none() {
            match tokio_postgres::connect(
                &super::proxy_conn_string(addr, &db),
                tokio_postgres::NoTls,
            )
            .await
            {
                Ok((c, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    client = Some(c);
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        i += 1;
        let id = i % 1800 + 1;
        let result = c
            .batch_execute(&format!(
                "BEGIN; UPDATE accounts SET balance = balance + 1 WHERE id = {id}; \
                 INSERT INTO ledger (account, amount) VALUES ({id}, {i}); COMMIT;"
            ))
            .await;
        match result {
            Ok(()) => committed += 1,
            Err(_) => client = None,
        }
    }
    committed
}

/// 4 sessions each insert 50 accounts through pgrelay with `insert` (`$1` is the id) and read
/// each back at once: none may miss its own write, and followers must serve most reads.
pub async fn reads_see_own_writes(
    info: &ClusterInfo,
    db: &str,
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    insert: &'static str,
) {
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let db = db.to_owned();
        tasks.push(tokio::spawn(async move {
            let c = connect_proxy(addr, &db).await;
            let mut stale = 0;
            for i in 0..50 {
                let id = 10_000 + worker * 1000 + i;
                c.execute(insert, &[&id]).await.unwrap();
                let n: i64 = c
                    .query_one("SELECT count(*) FROM accounts WHERE id = $1", &[&id])
                    .await
                    .unwrap()
                    .get(0);
                if n != 1 {
                    stale += 1;
                }
            }
            stale
        }));
    }
    let mut stale = 0;
    for t in tasks {
        stale += t.await.unwrap();
    }
    assert_eq!(stale, 0, "reads that missed the session's own write");
    let text = scrape(metrics).await;
    let follower_reads: f64 = info
        .followers
        .iter()
        .filter_map(|f| {
            metric(
                &text,
                &format!(
                    "pgrelay_reads_total{{node=\"{}\",reason=\"consistency\"}}",
                    f.name
                ),
            )
        })
        .sum();
    assert!(
        follower_reads >= 100.0,
        "most reads served by followers: {follower_reads}\n{text}"
    );
}
