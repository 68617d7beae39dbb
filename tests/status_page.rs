//! The status page on the metrics port, as a user sees it: `pgrelay demo` runs as a child
//! process, the page and its JSON are fetched over plain HTTP, and headless Chromium renders the
//! page (its script polls the JSON and draws a lag line per follower) and takes a screenshot,
//! kept as `target/test-artifacts/status-page.png`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Stops the demo as Ctrl-C would (and kills it if that does not work in time), so a failing
/// test leaves no pgrelay or Postgres running.
struct Demo {
    child: Child,
    dir: PathBuf,
    status_url: String,
    /// The connection string it prints.
    url: String,
    /// The follower that lags on purpose.
    lagging: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(self.child.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `pgrelay demo` (physical mode, two followers) and waits until it is ready.
fn start_demo() -> Demo {
    let dir = pgrelay::cluster::test_dir("statuspage");
    let port = pgrelay::cluster::free_port().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["demo", "--followers", "2", "--lag", "500ms"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut demo = Demo {
        child,
        dir,
        status_url: String::new(),
        url: String::new(),
        lagging: String::new(),
    };
    let stdout = demo.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo says it is ready");
        if line.trim_start().starts_with("status") {
            let url = line.split_whitespace().nth(1).unwrap();
            demo.status_url = url.to_owned();
        }
        if let Some(u) = line.split("psql \"").nth(1) {
            demo.url = u.trim_end_matches('"').to_owned();
        }
        if line.contains("lagging") {
            demo.lagging = line.split_whitespace().next().unwrap().to_owned();
        }
        if line.contains("press Ctrl-C") {
            break;
        }
    }
    assert!(
        !demo.url.is_empty() && !demo.lagging.is_empty(),
        "demo output"
    );
    assert!(
        demo.status_url.starts_with("http://"),
        "the demo prints the status page's URL"
    );
    demo
}

/// A plain HTTP/1.1 GET: (status code, headers, body).
fn get(url: &str, path: &str) -> (u16, String, String) {
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = TcpStream::connect(&host).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_owned(), body.to_owned())
}

/// Kills a Chromium run and every process it started (its own process group) if it is still
/// running when dropped, and removes its profile directory.
struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: the child leads a process group of its own (process_group(0)).
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn chromium_binary() -> String {
    let name = std::env::var("PGRELAY_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
    let found = Command::new(&name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} not found: install the Debian package `chromium` (or set PGRELAY_CHROMIUM)"
    );
    name
}

/// Runs headless Chromium on `url` with `extra` arguments; returns its standard output. The
/// page gets `budget` of virtual time, so its timers and fetches run before the DOM is dumped
/// or the screenshot taken.
fn chromium(url: &str, budget: Duration, extra: &[String]) -> String {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let profile = std::env::temp_dir().join(format!(
        "pgrelay-chromium-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let child = Command::new(chromium_binary())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut browser = Browser { child, profile };
    let mut stdout = browser.child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(90))
        .expect("chromium finishes within 90s");
    let status = browser.child.wait().unwrap();
    assert!(status.success(), "chromium failed: {status}");
    out
}

/// The attributes and content of the chart line marked as `follower`'s, if the DOM has one.
fn line_of<'a>(dom: &'a str, follower: &str) -> Option<&'a str> {
    dom.split("<polyline ")
        .skip(1)
        .map(|l| l.split("</polyline>").next().unwrap_or(l))
        .find(|l| l.contains(&format!("data-follower=\"{follower}\"")))
}

/// Inserts rows through the demo's pgrelay until `/status.json` has a sample in which the
/// lagging follower is behind.
fn write_until_lag_shows(demo: &Demo) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&demo.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("CREATE TABLE status_page_t (id int)")
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0.. {
            client
                .execute("INSERT INTO status_page_t VALUES ($1)", &[&i])
                .await
                .unwrap();
            if i % 10 == 0 {
                let (_, _, body) = get(&demo.status_url, "/status.json");
                let status: serde_json::Value = serde_json::from_str(&body).unwrap();
                let behind = status["history"].as_array().unwrap().iter().any(|s| {
                    s["lag"][&demo.lagging]["seconds"]
                        .as_f64()
                        .is_some_and(|v| v > 0.0)
                });
                if behind {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} never lagged in the history",
                demo.lagging
            );
        }
    });
}

fn artifact(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn status_page_shows_nodes_and_a_lag_line_per_follower() {
    let demo = start_demo();
    let url = demo.status_url.clone();

    // The JSON the page polls: mode, pause state, SHOW NODES, and a lag history that already
    // has samples before any page asked for it.
    let status = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, head, body) = get(&url, "/status.json");
            assert_eq!(code, 200, "{head}");
            assert!(head.contains("application/json"), "{head}");
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            if status["history"].as_array().is_some_and(|h| !h.is_empty()) {
                break status;
            }
            assert!(Instant::now() < deadline, "no lag history: {body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(status["mode"], "physical");
    assert_eq!(status["paused"], false);
    let followers: Vec<String> = status["followers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(followers.len(), 2, "{status}");
    let columns = status["columns"].as_array().unwrap();
    assert_eq!(columns[0], "name");
    assert!(columns.iter().any(|c| c == "lag_seconds"));
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "a leader and two followers: {status}");
    assert_eq!(nodes[0][1], "leader");
    for f in &followers {
        assert!(
            nodes
                .iter()
                .any(|n| n[0] == f.as_str() && n[1] == "follower"),
            "{f} in {status}"
        );
        assert!(status["history"][0]["lag"][f]["seconds"].is_number());
    }
    // Asking for samples after the newest one gives none.
    let newest = status["history"].as_array().unwrap().last().unwrap()["t"]
        .as_u64()
        .unwrap();
    let (_, _, body) = get(&url, &format!("/status.json?since={}", newest + 60_000));
    let later: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(later["history"].as_array().map(Vec::len), Some(0));

    // Writes through pgrelay until the lagging follower's lag shows in the history.
    write_until_lag_shows(&demo);

    // The page itself: HTML that needs nothing from elsewhere.
    let (code, head, page) = get(&url, "/");
    assert_eq!(code, 200);
    assert!(head.contains("text/html"), "{head}");
    for outside in [
        "src=\"http",
        "href=\"http",
        "@import",
        "url(http",
        "src=\"//",
    ] {
        assert!(!page.contains(outside), "the page loads {outside}…");
    }
    // Unknown paths are not found; /metrics is still the Prometheus text.
    assert_eq!(get(&url, "/nope").0, 404);
    let (code, _, metrics) = get(&url, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("pgrelay_replication_lag_seconds{follower="));

    // Rendered by a browser: a line and a legend entry per follower, and the node table.
    let deadline = Instant::now() + Duration::from_secs(90);
    let dom = loop {
        let dom = chromium(&url, Duration::from_secs(5), &["--dump-dom".to_owned()]);
        let drawn = followers.iter().all(|f| line_of(&dom, f).is_some());
        if drawn {
            break dom;
        }
        assert!(
            Instant::now() < deadline,
            "the page drew no line per follower:\n{dom}"
        );
    };
    for f in &followers {
        let line = line_of(&dom, f).unwrap();
        let points = line.split("points=\"").nth(1).unwrap();
        assert!(
            points.starts_with(|c: char| c.is_ascii_digit()),
            "the line of {f} has points: {line}"
        );
        assert!(
            dom.contains(&format!("<span data-follower=\"{f}\"")),
            "legend entry for {f}:\n{dom}"
        );
        assert!(dom.contains(&format!("<td>{f}</td>")), "node row for {f}");
    }
    // The lagging follower's line rises above the zero line (y grows downwards).
    let line = line_of(&dom, &demo.lagging).unwrap();
    let points = line
        .split("points=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let ys: Vec<f64> = points
        .split_whitespace()
        .map(|p| p.split_once(',').unwrap().1.parse().unwrap())
        .collect();
    let baseline = ys.iter().copied().fold(f64::MIN, f64::max);
    assert!(
        ys.iter().any(|y| *y < baseline - 1.0),
        "the line of {} shows its lag: {points}",
        demo.lagging
    );
    assert!(
        dom.contains("id=\"mode\" class=\"badge\">physical<"),
        "{dom}"
    );
    assert!(dom.contains(">running<"), "{dom}");

    // A screenshot to look at, kept as a build artifact.
    let png = artifact("status-page.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &url,
        Duration::from_secs(5),
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,900".to_owned(),
            "--hide-scrollbars".to_owned(),
        ],
    );
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG file");
    // IHDR: width and height, big-endian, right after the signature and chunk header.
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 900));
    assert!(
        bytes.len() > 20_000,
        "a page with a table and charts, not a blank image ({} bytes)",
        bytes.len()
    );
    drop(demo);
}
