//! The local cluster launcher against the real Postgres binaries: roles of the nodes, replication,
//! stopping and restarting a node, and nothing left running afterwards.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use pgrelay::cluster::{test_dir, ClusterOptions, FollowerKind, LocalCluster, NodeInfo};

fn options(prefix: &str, kind: FollowerKind) -> ClusterOptions {
    ClusterOptions {
        dir: test_dir(prefix),
        followers: 2,
        superuser: "pgrelay".to_string(),
        password: "secret pw".to_string(),
        follower_kind: kind,
        extra_conf: vec![("shared_buffers".to_string(), "16MB".to_string())],
        remove_dir_on_drop: true,
    }
}

/// Polls `check` until it returns true or `timeout` passes.
fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn postmaster_pid(data_dir: &Path) -> i32 {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn accepts_tcp(node: &NodeInfo) -> bool {
    TcpStream::connect((node.host.as_str(), node.port)).is_ok()
}

/// Does a postgres process still run for `data_dir`?
fn postgres_running_for(data_dir: &Path) -> bool {
    let out = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(data_dir.as_os_str())
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

#[test]
fn standby_cluster_replicates_and_survives_restart() {
    let started = Instant::now();
    let mut cluster = LocalCluster::start(options("standby", FollowerKind::Standby)).unwrap();
    eprintln!("standby cluster started in {:?}", started.elapsed());

    let leader = cluster.leader().clone();
    let followers = cluster.followers().to_vec();
    assert_eq!(followers.len(), 2);
    assert_eq!(leader.host, "127.0.0.1");

    // Roles.
    assert_eq!(
        cluster.psql(&leader, "SELECT pg_is_in_recovery()").unwrap(),
        "f"
    );
    for f in &followers {
        assert_eq!(cluster.psql(f, "SELECT pg_is_in_recovery()").unwrap(), "t");
    }
    // Settings reached the servers, including the extra one.
    assert_eq!(cluster.psql(&leader, "SHOW wal_level").unwrap(), "logical");
    assert_eq!(
        cluster.psql(&leader, "SHOW shared_buffers").unwrap(),
        "16MB"
    );
    assert_eq!(
        cluster.psql(&followers[0], "SHOW port").unwrap(),
        followers[0].port.to_string()
    );
    // Both standbys are streaming, named after themselves.
    let names = cluster
        .psql(&leader, "SELECT string_agg(application_name, ',' ORDER BY application_name) FROM pg_stat_replication WHERE state = 'streaming'")
        .unwrap();
    assert_eq!(names, "follower1,follower2");

    // A write on the leader shows up on the followers.
    cluster
        .psql(
            &leader,
            "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)",
        )
        .unwrap();
    for f in &followers {
        wait_for("row on follower", Duration::from_secs(30), || {
            cluster.psql(f, "SELECT count(*) FROM t").ok().as_deref() == Some("1")
        });
    }

    // Stopping a follower closes its port; writes go on meanwhile.
    let f1 = followers[0].clone();
    let old_pid = postmaster_pid(&f1.data_dir);
    cluster.stop_node(&f1.name).unwrap();
    assert!(!cluster.is_running(&f1.name).unwrap());
    assert!(
        !accepts_tcp(&f1),
        "stopped follower still accepts connections"
    );
    assert!(!alive(old_pid));
    cluster.psql(&leader, "INSERT INTO t VALUES (2)").unwrap();

    // Starting it again: same port, and it catches up.
    cluster.start_node(&f1.name).unwrap();
    assert!(accepts_tcp(&f1));
    assert_eq!(
        cluster.psql(&f1, "SELECT pg_is_in_recovery()").unwrap(),
        "t"
    );
    wait_for("follower catch-up", Duration::from_secs(30), || {
        cluster.psql(&f1, "SELECT count(*) FROM t").ok().as_deref() == Some("2")
    });
    assert!(cluster.stop_node("nope").is_err());

    // Dropping stops everything and removes the directory.
    let dir = cluster.dir().to_path_buf();
    let pids: Vec<i32> = std::iter::once(&leader)
        .chain(followers.iter())
        .map(|n| postmaster_pid(&n.data_dir))
        .collect();
    drop(cluster);
    for pid in pids {
        assert!(!alive(pid), "postmaster {pid} still alive after drop");
    }
    assert!(!postgres_running_for(&dir));
    assert!(!dir.exists(), "cluster dir not removed");
}

#[test]
fn empty_followers_are_writable() {
    let cluster = LocalCluster::start(options("empty", FollowerKind::Empty)).unwrap();
    assert_eq!(
        cluster
            .psql(cluster.leader(), "SELECT pg_is_in_recovery()")
            .unwrap(),
        "f"
    );
    for f in cluster.followers() {
        assert_eq!(cluster.psql(f, "SELECT pg_is_in_recovery()").unwrap(), "f");
        cluster
            .psql(
                f,
                "CREATE TABLE local_only (x int); INSERT INTO local_only VALUES (1)",
            )
            .unwrap();
        // Independent servers: nothing on the leader.
        assert_eq!(
            cluster
                .psql(
                    cluster.leader(),
                    "SELECT count(*) FROM pg_tables WHERE tablename = 'local_only'"
                )
                .unwrap(),
            "0"
        );
    }
    let ports: Vec<u16> = std::iter::once(cluster.leader())
        .chain(cluster.followers())
        .map(|n| n.port)
        .collect();
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "nodes share a port");
    let dir = cluster.dir().to_path_buf();
    drop(cluster);
    assert!(!postgres_running_for(&dir));
}

#[test]
fn wrong_password_is_rejected() {
    let mut opts = options("auth", FollowerKind::Standby);
    opts.followers = 0;
    let cluster = LocalCluster::start(opts).unwrap();
    let leader = cluster.leader();
    let bad = std::process::Command::new(cluster.bin_dir().join("psql"))
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &leader.port.to_string(),
            "-U",
            "pgrelay",
            "-d",
            "postgres",
            "-Atc",
            "SELECT 1",
        ])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("password authentication failed"));
}

#[test]
fn existing_dir_with_running_cluster_is_refused_then_reused_after_stop() {
    let mut opts = options("reuse", FollowerKind::Standby);
    opts.followers = 0;
    opts.remove_dir_on_drop = false;
    let dir = opts.dir.clone();
    let first = LocalCluster::start(opts.clone()).unwrap();
    let err = LocalCluster::start(opts.clone()).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    drop(first);
    assert!(dir.join("leader").exists(), "kept dir should survive drop");
    // Stale node directories of a stopped cluster are wiped and the cluster starts again.
    opts.remove_dir_on_drop = true;
    let second = LocalCluster::start(opts).unwrap();
    assert_eq!(second.psql(second.leader(), "SELECT 1").unwrap(), "1");
    drop(second);
    assert!(!dir.exists());
}

/// Set in a child copy of this test binary that plays the cluster's owner.
const HOLDER_ENV: &str = "PGRELAY_TEST_CLUSTER_HOLDER";

/// Runs one (ignored) holder test of this binary in a child process and returns it with its stdout.
fn spawn_holder(test_name: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            test_name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

type HolderOutput = std::io::BufReader<std::process::ChildStdout>;

/// Reads the holder's "dir <path> pids <p1> <p2>..." line; the rest of its output stays in the reader.
fn read_holder_report(
    child: &mut std::process::Child,
) -> (std::path::PathBuf, Vec<i32>, HolderOutput) {
    use std::io::BufRead;
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        // The harness may have printed "test holder_x ... " on the same line first.
        if let Some((_, rest)) = line.trim_end().split_once("holder: dir ") {
            let (dir, pids) = rest.split_once(" pids ").unwrap();
            let pids = pids.split(' ').map(|p| p.parse().unwrap()).collect();
            return (dir.into(), pids, reader);
        }
        line.clear();
    }
    panic!("holder exited without reporting its cluster");
}

fn report_cluster(cluster: &LocalCluster) {
    let pids: Vec<String> = std::iter::once(cluster.leader())
        .chain(cluster.followers())
        .map(|n| postmaster_pid(&n.data_dir).to_string())
        .collect();
    // Straight to fd 1: the test harness captures `println!` even with --nocapture in some versions.
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "holder: dir {} pids {}",
        cluster.dir().display(),
        pids.join(" ")
    )
    .unwrap();
    out.flush().unwrap();
}

#[test]
#[ignore = "helper: run by servers_die_when_owner_is_killed in a child process"]
fn holder_killed() {
    if std::env::var_os(HOLDER_ENV).is_none() {
        return;
    }
    let mut opts = options("killed", FollowerKind::Standby);
    opts.followers = 1;
    let cluster = LocalCluster::start(opts).unwrap();
    report_cluster(&cluster);
    // Wait to be killed; the test thread that started the cluster must stay alive meanwhile only
    // because we want the kill to be the thing that ends the process.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn servers_die_when_owner_is_killed() {
    let mut holder = spawn_holder("holder_killed");
    let (dir, pids, _output) = read_holder_report(&mut holder);
    assert_eq!(pids.len(), 2);
    holder.kill().unwrap(); // SIGKILL: no destructor, no atexit
    holder.wait().unwrap();
    wait_for(
        "postmasters to die with their owner",
        Duration::from_secs(30),
        || pids.iter().all(|p| !alive(*p)),
    );
    wait_for("backends to exit", Duration::from_secs(30), || {
        !postgres_running_for(&dir)
    });
    // The owner could not clean up; a later test_dir() call would (and one running in parallel
    // may already have), but do it now.
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", dir.display()),
    }
}

static SHARED: std::sync::Mutex<Option<LocalCluster>> = std::sync::Mutex::new(None);

#[test]
#[ignore = "helper: run by static_cluster_is_stopped_at_exit in a child process"]
fn holder_static() {
    if std::env::var_os(HOLDER_ENV).is_none() {
        return;
    }
    let mut opts = options("static", FollowerKind::Standby);
    opts.followers = 1;
    let cluster = LocalCluster::start(opts).unwrap();
    report_cluster(&cluster);
    *SHARED.lock().unwrap() = Some(cluster);
    pgrelay::cluster::stop_at_exit(&SHARED);
    // Returning ends the test; the harness exits with the cluster still in the static.
}

#[test]
fn static_cluster_is_stopped_at_exit() {
    let mut holder = spawn_holder("holder_static");
    let (dir, pids, mut output) = read_holder_report(&mut holder);
    // Drain the holder's remaining output so it never blocks or fails writing it.
    std::io::copy(&mut output, &mut std::io::sink()).unwrap();
    let status = holder.wait().unwrap();
    assert!(status.success());
    // atexit ran before the process ended, so everything is already gone.
    for pid in pids {
        assert!(!alive(pid), "postmaster {pid} survived exit");
    }
    assert!(!postgres_running_for(&dir));
    assert!(!dir.exists(), "cluster dir left behind");
}
