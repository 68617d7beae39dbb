//! Operating a running pgrelay: the replication mode switched live between statement and row
//! mode by a config reload (SIGHUP and the console's RELOAD) under a write load, with nothing
//! lost or applied twice; reloads that are refused or need a restart; PAUSE and RESUME.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::row::{
    assert_converged, leader_database, ledger_rows, load, row_cluster, slot, statement_applied,
    statement_config, ProxyProcess,
};
use common::{connect_direct, connect_proxy, metric, pg_command, scrape, sqlstate, wait_until};

const CONVERGE: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
    CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
    CREATE TABLE ledger (id serial, account int, amount bigint, at timestamptz DEFAULT now());
    INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 2000) g;
    INSERT INTO ledger (account, amount) SELECT g % 50, g FROM generate_series(1, 500) g;
";

/// A console session on the proxy at `addr`.
async fn console(addr: SocketAddr) -> tokio_postgres::Client {
    connect_proxy(addr, "pgrelay").await
}

/// The console's answer to a command: rows of text cells.
async fn ask(console: &tokio_postgres::Client, command: &str) -> Vec<Vec<String>> {
    common::text_rows(console.simple_query(command).await.unwrap())
}

/// The value of `key` in a two-column console answer.
async fn value(console: &tokio_postgres::Client, command: &str, key: &str) -> String {
    ask(console, command)
        .await
        .into_iter()
        .find(|r| r[0] == key)
        .map(|r| r[1].clone())
        .unwrap_or_else(|| panic!("{command} has no {key}"))
}

/// Rewrites the config file at `path` with `edit`.
fn edit_config(path: &Path, edit: impl Fn(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    let new = edit(text.clone());
    assert_ne!(new, text, "the edit changed nothing");
    std::fs::write(path, new).unwrap();
}

fn set_mode(text: String, from: &str, to: &str) -> String {
    text.replace(&format!("mode = \"{from}\""), &format!("mode = \"{to}\""))
}

/// Ledger rows committed through the proxy so far, as the leader has them.
async fn leader_ledger(db: &str) -> i64 {
    ledger_rows(&connect_direct(&row_cluster().leader, db).await).await
}

/// Waits until the leader's ledger grew by `n` rows from `from`: the load is writing.
async fn wait_progress(db: &str, from: i64, n: i64) -> i64 {
    wait_until(Duration::from_secs(60), || async {
        leader_ledger(db).await >= from + n
    })
    .await;
    leader_ledger(db).await
}

#[test]
fn a_live_switch_statement_row_statement_under_load_loses_nothing() {
    common::row::run(async {
        let info = row_cluster();
        let db = leader_database(&info.leader, "switch").await;
        connect_direct(&info.leader, &db)
            .await
            .batch_execute(SCHEMA)
            .await
            .unwrap();
        let dir = pgrelay::cluster::test_dir("switch");
        std::fs::create_dir_all(&dir).unwrap();
        let config = statement_config(info, &db, "[replication]\nswitch_timeout = \"20s\"\n");
        let proxy = ProxyProcess::start(&config, &dir, "switch");
        let path = dir.join("switch.toml");
        for f in &info.followers {
            wait_until(CONVERGE, || async {
                statement_applied(f, &db).await.is_some()
            })
            .await;
        }
        let admin = console(proxy.addr).await;
        assert_eq!(value(&admin, "SHOW MODE", "mode").await, "statement");

        // A session that prepared a statement with now() before the switches runs it after
        // each: the rows must still be equal everywhere (planned again for each mode).
        let prepared_session = connect_proxy(proxy.addr, &db).await;
        let insert_now = prepared_session
            .prepare("INSERT INTO ledger (account, amount, at) VALUES ($1, $2, now())")
            .await
            .unwrap();
        prepared_session
            .execute(&insert_now, &[&1i32, &-1i64])
            .await
            .unwrap();

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let loaders: Vec<_> = (0..3)
            .map(|_| tokio::spawn(load(proxy.addr, db.clone(), stop_rx.clone())))
            .collect();
        let start = leader_ledger(&db).await;
        let seen = wait_progress(&db, start, 50).await;

        // statement -> row, by SIGHUP.
        edit_config(&path, |t| set_mode(t, "statement", "row"));
        let pid = i32::try_from(proxy.child.id()).unwrap();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        wait_until(Duration::from_secs(60), || async {
            value(&admin, "SHOW MODE", "mode").await == "row"
        })
        .await;
        prepared_session
            .execute(&insert_now, &[&2i32, &-2i64])
            .await
            .unwrap();
        // Prepared under row mode, run under statement mode: it must be logged, rewritten.
        let insert_now_row = prepared_session
            .prepare("INSERT INTO ledger (account, amount, at) VALUES ($1, $2, now() - interval '1 day')")
            .await
            .unwrap();
        let seen = wait_progress(&db, seen, 50).await;
        for f in &info.followers {
            let slots: i64 = connect_direct(&info.leader, "postgres")
                .await
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot(f, &db)],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(slots, 1, "row mode streams to {} through its slot", f.name);
        }

        // row -> statement, by the console's RELOAD.
        edit_config(&path, |t| set_mode(t, "row", "statement"));
        admin.simple_query("RELOAD").await.unwrap();
        assert_eq!(value(&admin, "SHOW MODE", "mode").await, "statement");
        prepared_session
            .execute(&insert_now, &[&3i32, &-3i64])
            .await
            .unwrap();
        prepared_session
            .execute(&insert_now_row, &[&4i32, &-4i64])
            .await
            .unwrap();
        wait_progress(&db, seen, 50).await;
        stop_tx.send(true).unwrap();
        let mut committed = 0;
        for l in loaders {
            committed += l.await.unwrap();
        }

        // Every commit the load saw is on the leader exactly once, and the followers have
        // exactly the leader's rows.
        assert_eq!(
            leader_ledger(&db).await,
            500 + 4 + i64::try_from(committed).unwrap()
        );
        assert_converged(info, &info.followers, &db, CONVERGE).await;
        let sequence = |node| {
            let db = db.clone();
            async move {
                connect_direct(node, &db)
                    .await
                    .query_one("SELECT last_value FROM ledger_id_seq", &[])
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
            }
        };
        let leader_seq = sequence(&info.leader).await;
        for f in &info.followers {
            assert_eq!(sequence(f).await, leader_seq, "{}'s sequence", f.name);
        }
        let leftover: i64 = connect_direct(&info.leader, "postgres")
            .await
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE $1",
                &[&format!("pgrelay_%_{db}")],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(leftover, 0, "statement mode leaves no slot holding WAL");

        // Two switches, each pause bounded, exported.
        let text = scrape(proxy.metrics).await;
        assert_eq!(
            metric(&text, "pgrelay_mode_switches_total{result=\"done\"}"),
            Some(2.0)
        );
        assert_eq!(
            metric(&text, "pgrelay_mode_switch_pause_seconds_count"),
            Some(2.0)
        );
        let pause = metric(&text, "pgrelay_mode_switch_pause_seconds_sum").unwrap();
        assert!(pause > 0.0 && pause < 40.0, "pauses took {pause}s");
        assert_eq!(
            metric(&text, "pgrelay_replication_mode{mode=\"statement\"}"),
            Some(1.0)
        );
    });
}

/// A statement-mode proxy process on its own database, and its config file.
async fn statement_proxy(prefix: &str, extra: &str) -> (ProxyProcess, std::path::PathBuf, String) {
    let info = row_cluster();
    let db = leader_database(&info.leader, prefix).await;
    connect_direct(&info.leader, &db)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = pgrelay::cluster::test_dir(prefix);
    std::fs::create_dir_all(&dir).unwrap();
    let proxy = ProxyProcess::start(&statement_config(info, &db, extra), &dir, prefix);
    (proxy, dir.join(format!("{prefix}.toml")), db)
}

/// psql's stdout and stderr for one console command.
fn psql_console(addr: SocketAddr, command: &str) -> (bool, String, String) {
    let out = pg_command("psql", addr, "pgrelay")
        .args(["-X", "-A", "-t", "-c", command])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn reloads_apply_what_they_can_and_refuse_what_they_cannot() {
    common::row::run(async {
        let info = row_cluster();
        let (proxy, path, db) =
            statement_proxy("reload", "[routing]\nconsistency = \"eventual\"\n").await;
        let admin = console(proxy.addr).await;
        // A session opened before the reload reads from followers...
        let session = connect_proxy(proxy.addr, &db).await;
        let read_port = || async {
            session
                .query_one("SELECT inet_server_port()", &[])
                .await
                .unwrap()
                .get::<_, i32>(0)
        };
        let leader_port = i32::from(info.leader.port);
        wait_until(CONVERGE, || async { read_port().await != leader_port }).await;

        // ... and after a reload that sets consistency = "leader", from the leader, without
        // reconnecting. A changed listen address needs a restart, and says so.
        edit_config(&path, |t| {
            t.replace("consistency = \"eventual\"", "consistency = \"leader\"")
                .replace(
                    "node_retry_interval = \"200ms\"",
                    "node_retry_interval = \"300ms\"",
                )
                .replace("listen = \"127.0.0.1:", "listen = \"127.0.0.2:")
        });
        let (ok, _, stderr) = psql_console(proxy.addr, "RELOAD");
        assert!(ok, "{stderr}");
        assert!(stderr.contains("config reloaded"), "{stderr}");
        assert!(
            stderr.contains("only applied by a restart: proxy.listen, metrics.listen"),
            "{stderr}"
        );
        assert_eq!(read_port().await, leader_port);
        assert_eq!(
            value(&admin, "SHOW CONFIG", "routing.consistency").await,
            "leader"
        );
        assert_eq!(
            value(&admin, "SHOW CONFIG", "proxy.node_retry_interval").await,
            "300ms"
        );

        // A switch to physical mode is refused with what to do; nothing changes.
        edit_config(&path, |t| {
            set_mode(t, "statement", "physical")
                .replace("consistency = \"leader\"", "consistency = \"eventual\"")
        });
        let err = admin.simple_query("RELOAD").await.unwrap_err();
        assert_eq!(sqlstate(&err), "0A000");
        let message = common::error_message(&err);
        assert!(
            message.contains("cannot change from statement to physical")
                && message.contains("rebuild the followers"),
            "{message}"
        );
        assert_eq!(value(&admin, "SHOW MODE", "mode").await, "statement");
        assert_eq!(
            value(&admin, "SHOW CONFIG", "routing.consistency").await,
            "leader"
        );

        // A broken file is refused with F0000; the config in force stays.
        std::fs::write(&path, "[proxy]\nlisten = 5\n").unwrap();
        let err = admin.simple_query("RELOAD").await.unwrap_err();
        assert_eq!(sqlstate(&err), "F0000");
        assert_eq!(read_port().await, leader_port);
        let text = scrape(proxy.metrics).await;
        assert_eq!(
            metric(&text, "pgrelay_mode_switches_total{result=\"refused\"}"),
            Some(1.0)
        );
        assert_eq!(
            metric(&text, "pgrelay_config_reloads_total{result=\"error\"}"),
            Some(2.0)
        );
        assert_eq!(
            metric(&text, "pgrelay_config_reloads_total{result=\"ok\"}"),
            Some(1.0)
        );
    });
}

#[test]
fn pause_holds_new_transactions_until_resume() {
    common::row::run(async {
        let (proxy, _, db) =
            statement_proxy("pause", "[replication]\nswitch_timeout = \"1s\"\n").await;
        let admin = console(proxy.addr).await;
        // An open transaction keeps PAUSE from taking hold (within switch_timeout).
        let open = connect_proxy(proxy.addr, &db).await;
        open.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
            .await
            .unwrap();
        let err = admin.simple_query("PAUSE").await.unwrap_err();
        assert_eq!(sqlstate(&err), "55000");
        assert!(common::error_message(&err).contains("still open"));
        open.batch_execute("COMMIT").await.unwrap();
        let (ok, _, stderr) = psql_console(proxy.addr, "PAUSE");
        assert!(ok, "{stderr}");
        assert_eq!(value(&admin, "SHOW MODE", "paused").await, "true");
        assert_eq!(
            metric(&scrape(proxy.metrics).await, "pgrelay_paused"),
            Some(1.0)
        );
        let err = admin.simple_query("PAUSE").await.unwrap_err();
        assert_eq!(sqlstate(&err), "55000");

        // A new transaction waits...
        let writer = connect_proxy(proxy.addr, &db).await;
        let write = tokio::spawn(async move {
            writer
                .execute("INSERT INTO t VALUES (2)", &[])
                .await
                .unwrap()
        });
        let mut write = write;
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut write)
                .await
                .is_err(),
            "a transaction ran while paused"
        );
        let leader = connect_direct(&row_cluster().leader, &db).await;
        let count = |c: tokio_postgres::Row| c.get::<_, i64>(0);
        assert_eq!(
            count(
                leader
                    .query_one("SELECT count(*) FROM t", &[])
                    .await
                    .unwrap()
            ),
            1
        );
        // ... until RESUME (through psql; PAUSE above went both ways).
        let (ok, _, stderr) = psql_console(proxy.addr, "RESUME");
        assert!(ok, "{stderr}");
        assert_eq!(write.await.unwrap(), 1);
        assert_eq!(
            count(
                leader
                    .query_one("SELECT count(*) FROM t", &[])
                    .await
                    .unwrap()
            ),
            2
        );
        assert_eq!(value(&admin, "SHOW MODE", "paused").await, "false");
        let err = admin.simple_query("RESUME").await.unwrap_err();
        assert_eq!(sqlstate(&err), "55000");
    });
}

#[test]
fn pgrelay_status_prints_the_node_table() {
    common::row::run(async {
        let info = row_cluster();
        let (proxy, path, _) = statement_proxy("status", "").await;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .args(["status", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = text.lines();
        assert_eq!(
            lines
                .next()
                .unwrap()
                .split(" | ")
                .map(str::trim)
                .collect::<Vec<_>>(),
            pgrelay::status::NODE_COLUMNS
        );
        let rows: Vec<&str> = lines.skip(1).collect();
        assert_eq!(rows.len(), 1 + info.followers.len(), "{text}");
        assert!(rows[0].starts_with(&info.leader.name), "{text}");
        for f in &info.followers {
            assert!(rows.iter().any(|r| r.starts_with(&f.name)), "{text}");
        }
        drop(proxy);
        // With pgrelay gone, the command says where it looked.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .args(["status", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach pgrelay"));
    });
}
