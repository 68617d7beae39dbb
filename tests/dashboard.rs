//! The Grafana dashboard against a real Prometheus: two row-mode pgrelay proxies in front of
//! the row cluster serve traffic (writes, COPY, reads from followers, read-your-writes waits,
//! `quorum:1` acknowledgement waits), a Prometheus child process scrapes both every second,
//! and every PromQL expression of `grafana/dashboards/pgrelay.json` must return series through
//! Prometheus's HTTP API; the panels the traffic feeds must show values.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::grafana::{self, Expr};
use common::row::{leader_database, row_cluster, row_config, wait_bootstrapped};
use common::{connect_direct, connect_proxy, start_proxy_with_metrics};
use pgrelay::cluster;

/// What `$__rate_interval` becomes: several 1 s scrapes, as Grafana's would be.
const RATE_INTERVAL: &str = "15s";

/// Metrics the traffic below feeds: every expression that uses one of them must return a
/// sample above zero (a quantile: a number), not only a series.
const FED: &[&str] = &[
    "pgrelay_replication_mode",
    "pgrelay_follower_up",
    "pgrelay_client_connections",
    "pgrelay_reads_total",
    "pgrelay_writes_total",
    "pgrelay_ryw_wait_seconds_bucket",
    "pgrelay_ack_wait_seconds_bucket",
    "pgrelay_apply_transactions_total",
    "pgrelay_apply_rows_total",
    "pgrelay_query_duration_seconds_bucket",
    "pgrelay_backend_connections",
];

/// A Prometheus server of the test's own, scraping `targets` every second; killed (and its
/// storage removed) when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(targets: &[SocketAddr]) -> Prometheus {
        use std::os::unix::process::CommandExt;
        let binary = find_prometheus();
        let dir = cluster::test_dir("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: pgrelay\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = cluster::free_port().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let mut cmd = Command::new(binary);
        cmd.arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .current_dir(&dir);
        // SAFETY: prctl in the child between fork and exec only sets its parent-death signal,
        // so Prometheus also goes away if the test binary is killed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start prometheus");
        Prometheus {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The result of an instant query (`data.result`), or the error Prometheus gave.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = http_get(self.addr, &path).await?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}: not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}: {}", v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_prometheus() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .expect("no `prometheus` in PATH: install Debian's prometheus package (.ci/run does)")
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET (the server closes the connection after the body): (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header end: {response}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status: {head}"))?;
    Ok((status, body.to_owned()))
}

/// The sample values of an instant-query result.
fn values(result: &[Value]) -> Vec<f64> {
    result
        .iter()
        .filter_map(|s| s["value"][1].as_str()?.parse().ok())
        .collect()
}

/// Writes, COPY and reads through both proxies until `stop`: each round inserts a row, reads
/// it back at once (read-your-writes), updates and deletes older rows, and every tenth round
/// copies a few rows in.
async fn traffic(proxy: SocketAddr, db: String, stop: tokio::sync::watch::Receiver<bool>) {
    let client = connect_proxy(proxy, &db).await;
    let mut i: i32 = 0;
    while !*stop.borrow() {
        i += 1;
        client
            .execute("INSERT INTO items (id, v) VALUES ($1, 'new')", &[&i])
            .await
            .unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM items WHERE id = $1", &[&i])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "read-your-writes through pgrelay");
        client
            .execute("UPDATE items SET v = 'old' WHERE id = $1", &[&(i - 1)])
            .await
            .unwrap();
        client
            .execute("DELETE FROM items WHERE id = $1", &[&(i - 5)])
            .await
            .unwrap();
        if i % 10 == 0 {
            copy_in(&client, i).await;
        }
    }
}

async fn copy_in(client: &tokio_postgres::Client, round: i32) {
    use futures_util::SinkExt;
    let sink = client
        .copy_in("COPY copied (round, v) FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let rows: String = (0..5).map(|k| format!("{round}\trow {k}\n")).collect();
    sink.send(bytes::Bytes::from(rows)).await.unwrap();
    sink.close().await.unwrap();
}

/// Evaluates every expression; returns the problems (none: the dashboard works).
async fn check(prom: &Prometheus, exprs: &[Expr], variables: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    for e in exprs {
        let promql = grafana::substitute(&e.expr, variables, RATE_INTERVAL);
        let result = match prom.query(&promql).await {
            Ok(r) => r,
            Err(err) => {
                problems.push(format!("{}: {promql}: error: {err}", e.place));
                continue;
            }
        };
        if result.is_empty() {
            problems.push(format!("{}: no series: {promql}", e.place));
            continue;
        }
        let fed = grafana::metric_names(&e.expr)
            .iter()
            .any(|m| FED.contains(&m.as_str()));
        if fed && !values(&result).iter().any(|v| v.is_finite() && *v > 0.0) {
            problems.push(format!(
                "{}: no value above zero although the traffic feeds it: {promql} = {:?}",
                e.place,
                values(&result)
            ));
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_expression_returns_series_from_a_real_prometheus() {
    let info = row_cluster();
    let dashboard = grafana::dashboard();
    let exprs = grafana::panel_exprs(&dashboard);
    let variables = grafana::variable_names(&dashboard);
    assert!(exprs.len() >= 20, "the dashboard has its panels");

    // Two databases, one per proxy (one pgrelay replicates a database at a time), with rows to
    // bootstrap.
    let mut proxies = Vec::new();
    for (name, extra) in [
        // Commits wait for one follower: acknowledgement waits.
        ("dash_ack", "[replication]\nack = \"quorum:1\"\n"),
        // Commits return at once, so a read right after a write waits for a follower.
        ("dash_ryw", ""),
    ] {
        let db = leader_database(&info.leader, name).await;
        connect_direct(&info.leader, &db)
            .await
            .batch_execute(
                "CREATE TABLE items (id int PRIMARY KEY, v text);
                 CREATE TABLE copied (round int, v text);
                 INSERT INTO items SELECT -g, 'seed' FROM generate_series(1, 1000) g;",
            )
            .await
            .unwrap();
        let (addr, metrics) = start_proxy_with_metrics(row_config(info, &db, extra)).await;
        proxies.push((addr, metrics, db));
    }
    let prom = Prometheus::start(&proxies.iter().map(|p| p.1).collect::<Vec<_>>());
    for (_, _, db) in &proxies {
        wait_bootstrapped(info, db).await;
    }

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let load: Vec<_> = proxies
        .iter()
        .map(|(addr, _, db)| tokio::spawn(traffic(*addr, db.clone(), stop.clone())))
        .collect();

    // Both targets scraped, then enough samples for rate() over RATE_INTERVAL.
    let ready = "min(count_over_time(pgrelay_client_connections[1m]))";
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let up = prom.query("sum(up)").await.map(|r| values(&r));
        let samples = prom.query(ready).await.map(|r| values(&r));
        if up.as_deref() == Ok(&[2.0][..])
            && samples
                .as_ref()
                .is_ok_and(|s| s.first().is_some_and(|n| *n >= 6.0))
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "Prometheus did not scrape both proxies: up = {up:?}, samples = {samples:?}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The instance variable lists both proxies.
    for v in grafana::variable_queries(&dashboard) {
        let (metric, label) = v
            .expr
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.split_once(','))
            .unwrap_or_else(|| panic!("{}: not label_values(METRIC, LABEL): {}", v.place, v.expr));
        let result = prom
            .query(&format!("group by ({}) ({})", label.trim(), metric.trim()))
            .await
            .unwrap();
        let instances: BTreeSet<String> = result
            .iter()
            .filter_map(|s| s["metric"][label.trim()].as_str().map(str::to_owned))
            .collect();
        let expected: BTreeSet<String> = proxies.iter().map(|p| p.1.to_string()).collect();
        assert_eq!(instances, expected, "{}", v.place);
    }

    // Samples arrive every second: retry until every expression answers, or the deadline.
    let end = Instant::now() + Duration::from_secs(60);
    let problems = loop {
        let problems = check(&prom, &exprs, &variables).await;
        if problems.is_empty() || Instant::now() >= end {
            break problems;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop_tx.send(true).unwrap();
    for l in load {
        l.await.unwrap();
    }
    assert!(
        problems.is_empty(),
        "{} of {} dashboard expressions fail:\n{}",
        problems.len(),
        exprs.len(),
        problems.join("\n")
    );
}

#[test]
fn queries_are_percent_encoded() {
    assert_eq!(
        url_encode("sum by (le) (rate(x{a=~\".*\"}[15s]))"),
        "sum%20by%20%28le%29%20%28rate%28x%7Ba%3D~%22.%2A%22%7D%5B15s%5D%29%29"
    );
}
