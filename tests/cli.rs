//! The `pgrelay` command as a user runs it: check-config, and the demo from start to Ctrl-C.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pgrelay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgrelay"))
}

#[test]
fn check_config_prints_the_effective_config_with_passwords_masked() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("pgrelay.example.toml");
    let out = pgrelay()
        .arg("check-config")
        .arg("--config")
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("listen = \"127.0.0.1:6432\""), "{stdout}");
    assert!(stdout.contains("consistency = \"session\""), "{stdout}");
    assert!(!stdout.contains("secret"), "passwords are masked: {stdout}");
}

#[test]
fn every_config_key_is_documented_in_readme() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(root.join("pgrelay.example.toml")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for line in example.lines() {
        let line = line.trim();
        if line.starts_with('#') || !line.contains('=') {
            continue;
        }
        let key = line.split('=').next().unwrap().trim();
        assert!(
            readme.contains(&format!("`{key}`")),
            "README does not document `{key}`"
        );
    }
    // password_env is only mentioned in a comment of the example.
    assert!(readme.contains("`password_env`"));
}

#[test]
fn config_errors_name_the_problem() {
    let dir = std::env::temp_dir().join(format!("pgrelay-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[proxy]\nlisten = \"127.0.0.1:6432\"\nlisten_port = 1\n[[nodes]]\nname = \"l\"\nrole = \"leader\"\nhost = \"127.0.0.1\"\n[[users]]\nname = \"u\"\npassword = \"p\"\n",
    )
    .unwrap();
    let out = pgrelay()
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_port"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_warns_about_trust_users() {
    let dir = std::env::temp_dir().join(format!("pgrelay-cli-trust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("trust.toml");
    std::fs::write(
        &file,
        "[[nodes]]\nname = \"l\"\nrole = \"leader\"\nhost = \"127.0.0.1\"\n\
         [[users]]\nname = \"careful\"\npassword = \"p\"\n\
         [[users]]\nname = \"open_door\"\npassword = \"p\"\nauth = \"trust\"\n",
    )
    .unwrap();
    let out = pgrelay()
        .arg("check-config")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let warning = stdout
        .lines()
        .find(|l| l.starts_with("# warning:"))
        .unwrap_or_else(|| panic!("no warning in {stdout}"));
    assert!(
        warning.contains("\"open_door\"") && warning.contains("trust"),
        "{warning}"
    );
    assert!(!warning.contains("careful"), "{warning}");
    // The log says it too.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("open_door"), "{stderr}");
    // The output is still a config.
    assert!(toml::from_str::<toml::Value>(&stdout).is_ok(), "{stdout}");
}

#[test]
fn demo_lag_needs_standbys() {
    let out = pgrelay()
        .args(["demo", "--mode", "statement", "--lag", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs --mode physical"), "{stderr}");
}

/// Postmaster pids recorded under a demo directory.
fn postmaster_pids(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let pid_file = entry.path().join("postmaster.pid");
        if let Ok(text) = std::fs::read_to_string(pid_file) {
            if let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Stops the demo as Ctrl-C would if the test fails before it does (and kills it if that does
/// not work), so a failing test leaves nothing running.
struct StopOnDrop(std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.0.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn demo_serves_clients_and_leaves_nothing_running_after_ctrl_c() {
    let dir = pgrelay::cluster::test_dir("demo");
    let port = pgrelay::cluster::free_port().unwrap();
    let mut child = pgrelay()
        .args([
            "demo",
            "--lag",
            "200ms",
            "--metrics-listen",
            "127.0.0.1:0",
            "--followers",
            "1",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
        ])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = StopOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut url = None;
    let mut metrics_url = None;
    let mut lagging = false;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo says it is ready");
        if let Some(u) = line.split("psql \"").nth(1) {
            url = Some(u.trim_end_matches('"').to_owned());
        }
        if let Some(u) = line.split("http://").nth(1) {
            metrics_url = Some(u.trim().to_owned());
        }
        lagging |= line.contains("lagging 200ms on purpose");
        if line.contains("press Ctrl-C") {
            break;
        }
    }
    let url = url.expect("the demo prints a connection string");
    assert!(lagging, "the demo says which follower lags");
    let metrics_url = metrics_url.expect("the demo prints its metrics URL");
    assert!(
        url.starts_with(&format!("postgres://app:app@127.0.0.1:{port}/app")),
        "{url}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let on_follower: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(on_follower);
        client
            .batch_execute("CREATE TABLE demo_t (id int); INSERT INTO demo_t VALUES (1)")
            .await
            .unwrap();
        // The metrics endpoint it printed answers, with the follower's lag.
        let (host, path) = metrics_url.split_once('/').unwrap();
        let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(format!("GET /{path} HTTP/1.1\r\nHost: demo\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        assert!(
            body.contains("pgrelay_replication_lag_seconds{follower=\"follower1\"}"),
            "{body}"
        );
    });
    // The config it wrote is valid and names the servers it runs.
    let out = pgrelay()
        .arg("check-config")
        .arg("--config")
        .arg(dir.join("pgrelay.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("127.0.0.1:{port}")));

    let pids = postmaster_pids(&dir);
    assert_eq!(pids.len(), 2, "a leader and one follower");
    // SAFETY: sending SIGINT to our own child, as Ctrl-C would.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
    for pid in pids {
        assert!(
            !alive(pid),
            "postgres {pid} still running after the demo stopped"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn row_mode_demo_copies_the_leader_and_follows_every_change() {
    demo_with_writable_followers("row");
}

#[test]
fn statement_mode_demo_copies_the_leader_and_replays_every_write() {
    demo_with_writable_followers("statement");
}

/// `pgrelay demo --mode <mode>` with followers pgrelay fills itself: DDL and rows written
/// through pgrelay reach both followers, SIGHUP switches to the other mode (the demo reloads
/// the config it wrote) and rows keep arriving, and Ctrl-C stops everything.
fn demo_with_writable_followers(mode: &str) {
    let dir = pgrelay::cluster::test_dir(&format!("demo{mode}"));
    let port = pgrelay::cluster::free_port().unwrap();
    let child = pgrelay()
        .args(["demo", "--mode", mode, "--metrics-listen", "", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = StopOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut url = None;
    let mut followers = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the demo says it is ready");
        if let Some(u) = line.split("psql \"").nth(1) {
            url = Some(u.trim_end_matches('"').to_owned());
        }
        if line.contains("writable follower, filled by pgrelay") {
            let addr = line.split_whitespace().nth(1).unwrap().to_owned();
            followers.push(addr);
        }
        if line.contains("press Ctrl-C") {
            break;
        }
    }
    let url = url.expect("the demo prints a connection string");
    assert_eq!(followers.len(), 2, "two writable followers");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        // DDL and rows through pgrelay, as an application would.
        client
            .batch_execute(
                "CREATE TABLE demo_t (id int PRIMARY KEY, v text); \
                 INSERT INTO demo_t SELECT g, 'v' || g FROM generate_series(1, 100) g",
            )
            .await
            .unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM demo_t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 100, "the session reads its own writes");
        for addr in &followers {
            let (host, port) = addr.split_once(':').unwrap();
            let conninfo = format!("host={host} port={port} user=app password=app dbname=app");
            // The follower gets the database once pgrelay copied it, then the rows.
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let copied = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                    Ok((f, conn)) => {
                        tokio::spawn(conn);
                        f.query_one("SELECT count(*) FROM demo_t", &[])
                            .await
                            .is_ok_and(|r| r.get::<_, i64>(0) == 100)
                    }
                    Err(_) => false,
                };
                if copied {
                    break;
                }
                assert!(Instant::now() < end, "follower {addr} did not get the rows");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        // The demo reloads the config it wrote on SIGHUP: switch to the other mode live, and
        // the followers keep getting every row.
        let path = dir.join("pgrelay.toml");
        let other = if mode == "row" { "statement" } else { "row" };
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replace(
                &format!("mode = \"{mode}\""),
                &format!("mode = \"{other}\""),
            ),
        )
        .unwrap();
        let config = pgrelay::config::Config::load(&path).unwrap();
        let admin = config
            .users
            .iter()
            .find(|u| u.admin)
            .expect("the demo has an admin");
        let (console, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={port} user={} password={} dbname=pgrelay",
                admin.name,
                admin.password.expose()
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        let console_conn = tokio::spawn(conn);
        // SAFETY: a signal to our own child.
        assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGHUP) }, 0);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = console.simple_query("SHOW MODE").await.unwrap();
            let now = rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("mode") => {
                    r.get(1).map(str::to_owned)
                }
                _ => None,
            });
            if now.as_deref() == Some(other) {
                break;
            }
            assert!(
                Instant::now() < end,
                "the demo did not switch to {other} mode"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client
            .batch_execute("INSERT INTO demo_t SELECT g, 'w' || g FROM generate_series(101, 110) g")
            .await
            .unwrap();
        for addr in &followers {
            let (host, fport) = addr.split_once(':').unwrap();
            let conninfo = format!("host={host} port={fport} user=app password=app dbname=app");
            let (f, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let end = Instant::now() + Duration::from_secs(30);
            while f
                .query_one("SELECT count(*) FROM demo_t", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
                != 110
            {
                assert!(
                    Instant::now() < end,
                    "follower {addr} missed rows after the switch"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Log out of the console, as psql would when it quits.
        drop(console);
        let _ = console_conn.await;
    });
    let pids = postmaster_pids(&dir);
    assert_eq!(pids.len(), 3, "a leader and two followers");
    // SAFETY: sending SIGINT to our own child, as Ctrl-C would.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status}");
    for pid in pids {
        assert!(
            !alive(pid),
            "postgres {pid} still running after the demo stopped"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
