//! Lag tracking, read-your-writes by position and write acknowledgement, against a cluster
//! whose second follower lags on purpose (`recovery_min_apply_delay`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use pgrelay::cluster::{self, LocalCluster, NodeInfo};
use tokio_postgres::AsyncMessage;

use common::*;

const DELAY_MS: u64 = 400;

static OWN: Mutex<Option<LocalCluster>> = Mutex::new(None);

struct Env {
    leader: NodeInfo,
    fast: NodeInfo,
    slow: NodeInfo,
}

/// Leader, a follower that keeps up, and one that applies WAL `DELAY_MS` late.
fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let c = start_cluster(2, "lag");
        let slow = c.followers()[1].clone();
        c.set_setting(
            &slow.name,
            "recovery_min_apply_delay",
            &format!("{DELAY_MS}ms"),
        )
        .unwrap();
        let env = Env {
            leader: c.leader().clone(),
            fast: c.followers()[0].clone(),
            slow,
        };
        *OWN.lock().unwrap() = Some(c);
        cluster::stop_at_exit(&OWN);
        env
    })
}

/// A proxy in front of this binary's cluster.
async fn lag_proxy(extra: &str) -> (SocketAddr, SocketAddr) {
    let e = env();
    let config = proxy_config(&e.leader, &[e.fast.clone(), e.slow.clone()], extra);
    start_proxy_with_metrics(config).await
}

/// A fresh database, created directly on the leader and present on both followers.
async fn database(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let e = env();
    let name = format!(
        "lag_{prefix}_{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let leader = connect_direct(&e.leader, "postgres").await;
    leader
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let db = connect_direct(&e.leader, &name).await;
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    wait_replicated(&e.leader, &[e.fast.clone(), e.slow.clone()]).await;
    name
}

/// Write-then-read loops on `clients` connections; returns (stale reads, reads by port).
async fn write_then_read(
    proxy: SocketAddr,
    db: &str,
    clients: i32,
    rounds: i32,
) -> (usize, Vec<i32>) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let db = db.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = connect_proxy(proxy, &db).await;
            let mut stale = 0;
            let mut ports = Vec::new();
            for i in 0..rounds {
                let id = c * 100_000 + i;
                client
                    .execute("INSERT INTO t VALUES ($1, 'x')", &[&id])
                    .await
                    .unwrap();
                let row = client
                    .query_one(
                        "SELECT count(*), inet_server_port() FROM t WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap();
                if row.get::<_, i64>(0) != 1 {
                    stale += 1;
                }
                ports.push(row.get::<_, i32>(1));
            }
            (stale, ports)
        }));
    }
    let mut stale = 0;
    let mut ports = Vec::new();
    for t in tasks {
        let (s, p) = t.await.unwrap();
        stale += s;
        ports.extend(p);
    }
    (stale, ports)
}

#[tokio::test]
async fn session_consistency_never_reads_stale_data_yet_uses_followers() {
    let db = database("session").await;
    let (proxy, metrics) = lag_proxy("").await;
    let (stale, ports) = write_then_read(proxy, &db, 4, 50).await;
    assert_eq!(stale, 0, "a session read older data than it wrote");
    let e = env();
    let on_followers = ports
        .iter()
        .filter(|&&p| p != i32::from(e.leader.port))
        .count();
    assert!(
        on_followers * 2 > ports.len(),
        "most reads are served by followers: {on_followers} of {}",
        ports.len()
    );
    assert!(
        !ports.contains(&i32::from(e.slow.port)),
        "the lagging follower never had the row in time"
    );
    let text = scrape(metrics).await;
    let fast = metric(
        &text,
        &format!(
            "pgrelay_reads_total{{node=\"{}\",reason=\"consistency\"}}",
            e.fast.name
        ),
    )
    .unwrap();
    assert!(fast >= on_followers as f64, "{text}");
    assert!(metric(&text, "pgrelay_writes_total").unwrap() >= 200.0);
}

#[tokio::test]
async fn eventual_consistency_does_read_stale_data_from_the_lagging_follower() {
    let db = database("eventual").await;
    let (proxy, _) = lag_proxy("[routing]\nconsistency = \"eventual\"\nmax_lag = \"10s\"\n").await;
    let (stale, ports) = write_then_read(proxy, &db, 2, 30).await;
    assert!(stale > 0, "no stale read although reads went to {ports:?}");
}

#[tokio::test]
async fn global_consistency_sees_writes_acknowledged_to_other_sessions() {
    let db = database("global").await;
    let (proxy, _) = lag_proxy("[routing]\nconsistency = \"global\"\n").await;
    let writer = connect_proxy(proxy, &db).await;
    let reader = connect_proxy(proxy, &db).await;
    for id in 0..40 {
        writer
            .execute("INSERT INTO t VALUES ($1, 'g')", &[&id])
            .await
            .unwrap();
        let n: i64 = reader
            .query_one("SELECT count(*) FROM t WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "write {id} was acknowledged before this read began");
    }
}

#[tokio::test]
async fn a_causal_token_carries_read_your_writes_to_another_connection() {
    let db = database("token").await;
    let (proxy, _) = lag_proxy("").await;
    let writer = connect_proxy(proxy, &db).await;
    let reader = connect_proxy(proxy, &db).await;
    for id in 0..30 {
        writer
            .execute("INSERT INTO t VALUES ($1, 't')", &[&id])
            .await
            .unwrap();
        let rows = writer
            .simple_query("SHOW pgrelay.last_write_position")
            .await
            .unwrap();
        let token = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        assert!(token.contains('/'), "{token}");
        reader
            .batch_execute(&format!("SET pgrelay.min_position = '{token}'"))
            .await
            .unwrap();
        let n: i64 = reader
            .query_one("SELECT count(*) FROM t WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }
    let err = reader
        .batch_execute("SET pgrelay.min_position = 'yesterday'")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "22023");
    let err = reader
        .batch_execute("SHOW pgrelay.nonsense")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42704");
    // Per-session and per-statement overrides.
    reader
        .batch_execute("SET pgrelay.consistency = 'leader'")
        .await
        .unwrap();
    let port: i32 = reader
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(env().leader.port));
    reader
        .batch_execute("RESET pgrelay.consistency")
        .await
        .unwrap();
    // The same with the extended protocol (as JDBC and most drivers send everything).
    reader
        .execute("SET pgrelay.consistency = 'leader'", &[])
        .await
        .unwrap();
    for _ in 0..3 {
        let port: i32 = reader
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(port, i32::from(env().leader.port));
    }
    reader
        .execute("RESET pgrelay.consistency", &[])
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), || async {
        let port: i32 = reader
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        port != i32::from(env().leader.port)
    })
    .await;
    let hinted = connect_proxy(proxy, &db).await;
    for _ in 0..3 {
        let port: i32 = hinted
            .query_one("/* pgrelay: leader */ SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(port, i32::from(env().leader.port));
    }
}

#[tokio::test]
async fn quorum_ack_means_a_follower_has_the_commit_when_it_returns() {
    let db = database("quorum").await;
    let (proxy, metrics) = lag_proxy("[replication]\nack = \"quorum:1\"\n").await;
    let e = env();
    let client = connect_proxy(proxy, &db).await;
    let fast = connect_direct(&e.fast, &db).await;
    let slow = connect_direct(&e.slow, &db).await;
    for id in 0..20 {
        client
            .execute("INSERT INTO t VALUES ($1, 'q')", &[&id])
            .await
            .unwrap();
        let mut found = 0;
        for f in [&fast, &slow] {
            let n: i64 = f
                .query_one("SELECT count(*) FROM t WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            found += n;
        }
        assert!(found >= 1, "no follower had commit {id} when it returned");
    }
    let text = scrape(metrics).await;
    assert!(
        metric(&text, "pgrelay_ack_wait_seconds_count").unwrap() >= 20.0,
        "{text}"
    );
    assert_eq!(metric(&text, "pgrelay_ack_timeouts_total"), Some(0.0));
}

#[tokio::test]
async fn quorum_ack_holds_a_copy_until_a_follower_has_its_rows() {
    use futures_util::SinkExt;
    let db = database("quorumcopy").await;
    let (proxy, _) = lag_proxy("[replication]\nack = \"quorum:1\"\n").await;
    let e = env();
    let client = connect_proxy(proxy, &db).await;
    let sink = client
        .copy_in("COPY t FROM STDIN WITH (FORMAT csv)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let data: String = (1000..1100).map(|i| format!("{i},c\n")).collect();
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 100);
    let mut found = 0;
    for f in [&e.fast, &e.slow] {
        let n: i64 = connect_direct(f, &db)
            .await
            .query_one("SELECT count(*) FROM t WHERE id >= 1000", &[])
            .await
            .unwrap()
            .get(0);
        found = found.max(n);
    }
    assert_eq!(
        found, 100,
        "no follower had the copied rows when the COPY returned"
    );
}

#[tokio::test]
async fn ack_all_times_out_with_a_warning_when_a_follower_lags() {
    let db = database("ackall").await;
    let (proxy, metrics) =
        lag_proxy("[replication]\nack = \"all\"\nack_timeout = \"100ms\"\n").await;
    let (client, mut rx) = connect_proxy_with_messages(proxy, &db).await;
    client
        .execute("INSERT INTO t VALUES (1, 'a')", &[])
        .await
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let AsyncMessage::Notice(notice) = notice else {
        panic!("expected a notice, got {notice:?}");
    };
    let (code, message) = (notice.code().code().to_owned(), notice.message().to_owned());
    assert_eq!(code, "01000");
    assert!(
        message.contains("only 1 follower(s) applied it"),
        "{message}"
    );
    // The commit itself happened.
    let n: i64 = connect_direct(&env().leader, &db)
        .await
        .query_one("SELECT count(*) FROM t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let text = scrape(metrics).await;
    assert!(metric(&text, "pgrelay_ack_timeouts_total").unwrap() >= 1.0);
}

#[tokio::test]
async fn lag_metrics_show_the_delay_under_load_and_zero_when_idle() {
    let db = database("metrics").await;
    let (proxy, metrics) = lag_proxy("").await;
    let e = env();
    let slow_lag = format!(
        "pgrelay_replication_lag_seconds{{follower=\"{}\"}}",
        e.slow.name
    );
    let fast_lag = format!(
        "pgrelay_replication_lag_seconds{{follower=\"{}\"}}",
        e.fast.name
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let db = db.clone();
        tokio::spawn(async move {
            let client = connect_proxy(proxy, &db).await;
            let mut id = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .execute("INSERT INTO t VALUES ($1, 'load')", &[&id])
                    .await
                    .unwrap();
                id += 1;
            }
        })
    };
    let delay = DELAY_MS as f64 / 1000.0;
    let slow_bytes = format!(
        "pgrelay_replication_lag_bytes{{follower=\"{}\"}}",
        e.slow.name
    );
    // Seconds and bytes from one scrape: between two scrapes the leader may pause (a
    // checkpoint of another test's CREATE DATABASE) long enough for the follower to catch up.
    wait_until(Duration::from_secs(20), || async {
        let text = scrape(metrics).await;
        let lag = metric(&text, &slow_lag).unwrap_or(0.0);
        let fast = metric(&text, &fast_lag).unwrap_or(f64::MAX);
        let bytes = metric(&text, &slow_bytes).unwrap_or(0.0);
        lag >= delay * 0.75 && lag <= delay * 3.0 && fast < delay * 0.5 && bytes > 0.0
    })
    .await;
    let text = scrape(metrics).await;
    assert_eq!(
        metric(
            &text,
            &format!("pgrelay_follower_up{{follower=\"{}\"}}", e.slow.name)
        ),
        Some(1.0)
    );
    assert!(metric(&text, "pgrelay_leader_position").unwrap() > 0.0);
    assert!(metric(&text, "pgrelay_client_connections").unwrap() >= 1.0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.unwrap();
    wait_until(Duration::from_secs(20), || async {
        let text = scrape(metrics).await;
        metric(&text, &slow_lag) == Some(0.0) && metric(&text, &fast_lag) == Some(0.0)
    })
    .await;
}

/// The operator metrics: query durations by route, connections held to each node while a
/// session is open (and none after), and statements the classifier could not parse.
#[tokio::test]
async fn operator_metrics_show_durations_connections_and_parse_failures() {
    let db = database("operator").await;
    let (proxy, metrics) = lag_proxy("").await;
    let e = env();
    let leader_conns = format!("pgrelay_backend_connections{{node=\"{}\"}}", e.leader.name);
    let follower_conns =
        [&e.fast, &e.slow].map(|f| format!("pgrelay_backend_connections{{node=\"{}\"}}", f.name));
    let text = scrape(metrics).await;
    assert_eq!(metric(&text, &leader_conns), Some(0.0), "{text}");
    assert_eq!(metric(&text, "pgrelay_parse_failures_total"), Some(0.0));

    let client = connect_proxy(proxy, &db).await;
    // A session that has not written reads from a follower (once pgrelay knows one is up).
    wait_until(Duration::from_secs(10), || async {
        let port: i32 = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        port != i32::from(e.leader.port)
    })
    .await;
    client
        .execute("INSERT INTO t VALUES (1, 'x')", &[])
        .await
        .unwrap();
    // Valid Postgres that the classifier's parser does not know (ROWS FROM), with a word
    // that leaves it in doubt whether the query writes: it runs on the leader.
    let rows = client
        .query(
            "WITH a AS (SELECT 1 AS x) SELECT x AS update, g, inet_server_port() \
             FROM a, ROWS FROM (generate_series(1, 2)) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, i32>(2), i32::from(e.leader.port));

    let text = scrape(metrics).await;
    for route in ["leader", "follower"] {
        let count = metric(
            &text,
            &format!("pgrelay_query_duration_seconds_count{{route=\"{route}\"}}"),
        );
        assert!(count.is_some_and(|c| c >= 1.0), "{route}: {text}");
        let sum = metric(
            &text,
            &format!("pgrelay_query_duration_seconds_sum{{route=\"{route}\"}}"),
        );
        assert!(sum.is_some_and(|s| s > 0.0), "{route}: {text}");
    }
    assert!(metric(&text, &leader_conns).unwrap() >= 1.0, "{text}");
    let on_followers: f64 = follower_conns
        .iter()
        .map(|s| metric(&text, s).unwrap())
        .sum();
    assert!(on_followers >= 1.0, "{text}");
    // Only the one statement above (the client library's own queries parse fine).
    assert_eq!(
        metric(&text, "pgrelay_parse_failures_total"),
        Some(1.0),
        "{text}"
    );

    // The session ends: every connection it held is closed and counted out.
    drop(client);
    wait_until(Duration::from_secs(10), || async {
        let text = scrape(metrics).await;
        std::iter::once(&leader_conns)
            .chain(&follower_conns)
            .all(|s| metric(&text, s) == Some(0.0))
    })
    .await;
}
