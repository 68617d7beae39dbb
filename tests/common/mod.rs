//! Test harness shared by the integration tests: one local cluster per test binary (leader and
//! two streaming standbys, started from the installed Postgres binaries), pgrelay proxies
//! running in-process on a background runtime, and a fresh database per test.
//!
//! Nothing outlives the test binary: the cluster is stopped by an `atexit` hook, and its
//! servers also get a parent-death signal if the binary is killed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod grafana;
pub mod raw;
pub mod row;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgrelay::cluster::{self, ClusterOptions, FollowerKind, LocalCluster, NodeInfo};
use pgrelay::config::Config;
use pgrelay::server::RunningProxy;

pub const SUPERUSER: &str = "relay_admin";
pub const PASSWORD: &str = "relay-pw";
/// Roles that log in to pgrelay with md5 and trust authentication.
pub const MD5_USER: &str = "md5user";
pub const TRUST_USER: &str = "trustuser";

/// What the tests need to know about the shared cluster.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    pub leader: NodeInfo,
    pub followers: Vec<NodeInfo>,
    pub bin_dir: std::path::PathBuf,
}

static CLUSTER: Mutex<Option<LocalCluster>> = Mutex::new(None);
static INFO: OnceLock<ClusterInfo> = OnceLock::new();

/// The binary's shared cluster, started on first use.
pub fn cluster() -> &'static ClusterInfo {
    INFO.get_or_init(|| {
        init_tracing();
        let c = start_cluster(2, "shared");
        let info = ClusterInfo {
            leader: c.leader().clone(),
            followers: c.followers().to_vec(),
            bin_dir: c.bin_dir().to_path_buf(),
        };
        *CLUSTER.lock().unwrap() = Some(c);
        cluster::stop_at_exit(&CLUSTER);
        info
    })
}

/// Logs of pgrelay running in the test binary, at `RUST_LOG` (default: warnings).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Runs `f` on the shared cluster (to stop or start a node).
pub fn with_cluster<T>(f: impl FnOnce(&mut LocalCluster) -> T) -> T {
    let mut guard = CLUSTER.lock().unwrap();
    f(guard.as_mut().expect("cluster started"))
}

/// Starts a cluster of its own (for tests that stop nodes), with the test roles created.
pub fn start_cluster(followers: usize, prefix: &str) -> LocalCluster {
    let mut opts = ClusterOptions::new(cluster::test_dir(prefix));
    opts.followers = followers;
    opts.superuser = SUPERUSER.to_owned();
    opts.password = PASSWORD.to_owned();
    opts.follower_kind = FollowerKind::Standby;
    opts.remove_dir_on_drop = true;
    let c = LocalCluster::start(opts).expect("start the local cluster");
    let leader = c.leader().clone();
    block_on_fresh(async move {
        let client = connect_direct(&leader, "postgres").await;
        for (role, pw) in [(MD5_USER, "md5-pw"), (TRUST_USER, "trust-pw")] {
            client
                .batch_execute(&format!(
                    "CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{pw}'"
                ))
                .await
                .unwrap();
        }
    });
    c
}

/// Runs a future to completion on a runtime of its own (usable from sync and async code).
pub fn block_on_fresh<F: std::future::Future + Send + 'static>(f: F) -> F::Output
where
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

/// The runtime proxies run on: it lives as long as the test binary, unlike each test's own.
fn proxy_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("proxy")
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A pgrelay config for the given nodes; `extra` is appended (TOML sections).
pub fn proxy_config(leader: &NodeInfo, followers: &[NodeInfo], extra: &str) -> String {
    let mut text =
        String::from("[proxy]\nlisten = \"127.0.0.1:0\"\nnode_retry_interval = \"200ms\"\n");
    text.push_str(extra);
    text.push_str(&format!(
        "\n[[nodes]]\nname = \"{}\"\nrole = \"leader\"\nhost = \"127.0.0.1\"\nport = {}\n",
        leader.name, leader.port
    ));
    for f in followers {
        text.push_str(&format!(
            "\n[[nodes]]\nname = \"{}\"\nrole = \"follower\"\nhost = \"127.0.0.1\"\nport = {}\n",
            f.name, f.port
        ));
    }
    text.push_str(&format!(
        "\n[[users]]\nname = \"{SUPERUSER}\"\npassword = \"{PASSWORD}\"\nadmin = true\n\
         \n[[users]]\nname = \"{MD5_USER}\"\npassword = \"md5-pw\"\nauth = \"md5\"\n\
         \n[[users]]\nname = \"{TRUST_USER}\"\npassword = \"trust-pw\"\nauth = \"trust\"\n"
    ));
    if !extra.contains("[metrics]") {
        // Every in-process proxy gets a metrics endpoint of its own.
        text.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    }
    text
}

/// Starts a proxy in front of the shared cluster with `extra` config (cached per `extra`).
/// The `[proxy]` section is already open, so `extra` may add proxy keys first.
pub async fn proxy(extra: &str) -> SocketAddr {
    static PROXIES: Mutex<Option<HashMap<String, SocketAddr>>> = Mutex::new(None);
    if let Some(addr) = PROXIES
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(extra).copied())
    {
        return addr;
    }
    let c = cluster();
    let addr = start_proxy(proxy_config(&c.leader, &c.followers, extra)).await;
    PROXIES
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(extra.to_owned(), addr);
    addr
}

/// Starts a proxy with a full config text; it runs until the test binary exits.
pub async fn start_proxy(config_text: String) -> SocketAddr {
    start_proxy_with_metrics(config_text).await.0
}

/// Like [`start_proxy`], also returning where its metrics are served.
pub async fn start_proxy_with_metrics(config_text: String) -> (SocketAddr, SocketAddr) {
    let config = Config::parse(&config_text).expect("valid test config");
    proxy_runtime()
        .spawn(async move {
            let p = RunningProxy::start(config).await.expect("proxy starts");
            let addrs = (
                p.addr,
                p.metrics_addr.expect("the test config serves metrics"),
            );
            // Keep it running for the rest of the binary's life.
            std::mem::forget(p);
            addrs
        })
        .await
        .unwrap()
}

/// Starts a proxy that the test stops itself (`RunningProxy::stop`), for tests whose nodes do
/// not outlive them.
pub async fn start_running_proxy(config_text: String) -> RunningProxy {
    let config = Config::parse(&config_text).expect("valid test config");
    proxy_runtime()
        .spawn(async move { RunningProxy::start(config).await.expect("proxy starts") })
        .await
        .unwrap()
}

/// The Prometheus text a proxy serves on `/metrics`.
pub async fn scrape(metrics: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of one series (`name{labels}` exactly as exported), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The default proxy (session consistency).
pub async fn default_proxy() -> SocketAddr {
    proxy("").await
}

/// A fresh database for one test, created on the leader and replicated to every follower.
pub async fn new_database(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let c = cluster();
    let name = format!("t_{prefix}_{}", N.fetch_add(1, Ordering::Relaxed));
    let client = connect_direct(&c.leader, "postgres").await;
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    wait_replicated(&c.leader, &c.followers).await;
    name
}

/// Waits until every follower replayed the leader's WAL up to now.
pub async fn wait_replicated(leader: &NodeInfo, followers: &[NodeInfo]) {
    let l = connect_direct(leader, "postgres").await;
    let lsn: String = l
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for f in followers {
        let fc = connect_direct(f, "postgres").await;
        wait_until(Duration::from_secs(30), || async {
            let row = fc
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .await
                .unwrap();
            row.get::<_, bool>(0)
        })
        .await;
    }
}

/// Polls `cond` until it holds; fails the test at the deadline.
pub async fn wait_until<F, Fut>(deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < end,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn direct_conn_string(node: &NodeInfo, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={SUPERUSER} password={PASSWORD} dbname={db}",
        node.port
    )
}

pub fn proxy_conn_string(addr: SocketAddr, db: &str) -> String {
    format!(
        "host={} port={} user={SUPERUSER} password={PASSWORD} dbname={db}",
        addr.ip(),
        addr.port()
    )
}

async fn connect_str(s: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(s, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {s}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A tokio-postgres client straight to a node, bypassing pgrelay.
pub async fn connect_direct(node: &NodeInfo, db: &str) -> tokio_postgres::Client {
    connect_str(&direct_conn_string(node, db)).await
}

/// A tokio-postgres client through pgrelay.
pub async fn connect_proxy(addr: SocketAddr, db: &str) -> tokio_postgres::Client {
    connect_str(&proxy_conn_string(addr, db)).await
}

/// Runs a Postgres client program from the cluster's bin dir (psql, pgbench) against pgrelay.
pub fn pg_command(program: &str, addr: SocketAddr, db: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(cluster_bin(program));
    cmd.env("PGHOST", addr.ip().to_string())
        .env("PGPORT", addr.port().to_string())
        .env("PGUSER", SUPERUSER)
        .env("PGPASSWORD", PASSWORD)
        .env("PGDATABASE", db)
        .env("PGCONNECT_TIMEOUT", "10");
    cmd
}

fn cluster_bin(program: &str) -> std::path::PathBuf {
    match INFO.get() {
        Some(info) => info.bin_dir.join(program),
        None => cluster::find_pg_bin()
            .expect("postgres binaries")
            .join(program),
    }
}

/// The SQLSTATE of a tokio-postgres error.
pub fn sqlstate(err: &tokio_postgres::Error) -> String {
    err.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no SQLSTATE: {err}"))
}

/// The server's message of a tokio-postgres error (its Display says only "db error").
pub fn error_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

/// A tokio-postgres client through pgrelay whose asynchronous messages (notices,
/// notifications) arrive on the returned channel.
pub async fn connect_proxy_with_messages(
    addr: SocketAddr,
    db: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
) {
    use futures_util::StreamExt;
    let (client, mut conn) =
        tokio_postgres::connect(&proxy_conn_string(addr, db), tokio_postgres::NoTls)
            .await
            .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    (client, rx)
}

/// The rows of a simple query's answer as text (NULL as ""), e.g. the admin console's.
pub fn text_rows(messages: Vec<tokio_postgres::SimpleQueryMessage>) -> Vec<Vec<String>> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}
