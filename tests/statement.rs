//! Statement mode end to end: clients write through pgrelay, pgrelay logs their statements
//! (made deterministic) and replays them on empty followers it bootstrapped, and the followers
//! converge to exactly the leader's rows: with serial keys, time and random defaults, under
//! load, through a kill -9 of pgrelay, a follower outage and DDL; unsafe statements are
//! refused with 0A000 (or run with a warning when allowed).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::row::{
    assert_converged, leader_database, ledger_rows, load, reads_see_own_writes, row_cluster,
    start_row_cluster, statement_applied, statement_config, value_on, ProxyProcess,
};
use common::{
    connect_direct, connect_proxy, metric, pg_command, scrape, sqlstate, start_proxy_with_metrics,
    ClusterInfo,
};
use pgrelay::cluster::{self, NodeInfo};

const CONVERGE: Duration = Duration::from_secs(60);

async fn wait_bootstrapped(followers: &[NodeInfo], db: &str) {
    for f in followers {
        common::wait_until(Duration::from_secs(60), || async {
            statement_applied(f, db).await.is_some()
        })
        .await;
    }
}

/// Tables created on the leader before pgrelay starts (the bootstrap copies them).
const SCHEMA: &str = "
    CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text);
    CREATE TABLE ledger (account int, amount bigint, at timestamptz DEFAULT now());
    INSERT INTO accounts SELECT g, 1000, 'n' || g FROM generate_series(1, 2000) g;
    INSERT INTO ledger (account, amount) SELECT g % 50, g FROM generate_series(1, 500) g;
";

/// A database with [`SCHEMA`] and a pgrelay replicating it, bootstrapped.
async fn setup(
    prefix: &str,
    extra: &str,
) -> (&'static ClusterInfo, String, SocketAddr, SocketAddr) {
    let info = row_cluster();
    let db = leader_database(&info.leader, prefix).await;
    // The leader's sessions read dates day first and in another time zone: the replay must
    // read the logged text the same way.
    connect_direct(&info.leader, "postgres")
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET datestyle = 'SQL, DMY'; \
             ALTER DATABASE {db} SET timezone = 'Asia/Kolkata'; \
             ALTER DATABASE {db} SET intervalstyle = 'sql_standard'"
        ))
        .await
        .unwrap();
    connect_direct(&info.leader, &db)
        .await
        .batch_execute(SCHEMA)
        .await
        .unwrap();
    let (addr, metrics) = start_proxy_with_metrics(statement_config(info, &db, extra)).await;
    wait_bootstrapped(&info.followers, &db).await;
    (info, db, addr, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_keys_time_and_random_defaults_leave_identical_rows() {
    let (info, db, addr, _) = setup("determinism", "").await;
    let c = connect_proxy(addr, &db).await;
    c.batch_execute(
        "CREATE TABLE items (
            id serial PRIMARY KEY,
            created_at timestamptz DEFAULT now(),
            uid uuid DEFAULT gen_random_uuid(),
            ident bigint GENERATED ALWAYS AS IDENTITY,
            note text,
            r float8,
            day date DEFAULT CURRENT_DATE)",
    )
    .await
    .unwrap();
    // Simple protocol, one and many rows, DEFAULT keywords, explicit now() and random().
    c.batch_execute(
        "INSERT INTO items (note) VALUES ('simple');
         INSERT INTO items (note, r) VALUES ('many', 1), ('rows', 2), ('here', 3);
         INSERT INTO items VALUES (DEFAULT, DEFAULT, DEFAULT, DEFAULT, 'keywords', random());
         INSERT INTO items (note, created_at) VALUES ('clock', now() + interval '1 hour');
         INSERT INTO items DEFAULT VALUES",
    )
    .await
    .unwrap();
    // A transaction that rolls back still takes sequence values on the leader.
    c.batch_execute("BEGIN; INSERT INTO items (note) VALUES ('gone'); ROLLBACK")
        .await
        .unwrap();
    // Extended protocol (tokio-postgres prepares), the same statement run many times: each run
    // gets its own time and its own values.
    let insert = c
        .prepare("INSERT INTO items (note, r) VALUES ($1, random())")
        .await
        .unwrap();
    // What pgrelay adds is invisible: the client sees its one parameter.
    assert_eq!(insert.params().len(), 1);
    for i in 0..20 {
        c.execute(&insert, &[&format!("prepared {i}")])
            .await
            .unwrap();
    }
    let mut tx_client = connect_proxy(addr, &db).await;
    let tx = tx_client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO items (note) VALUES ($1)",
        &[&"in a transaction"],
    )
    .await
    .unwrap();
    tx.execute(
        "UPDATE items SET note = note || '!' WHERE id = $1",
        &[&1i32],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // Literals read with the leader database's date style, time zone and interval style.
    c.batch_execute(
        "CREATE TABLE days (d date, at timestamptz, span interval);
         INSERT INTO days VALUES ('02/01/2020', '2020-01-02 03:04:05', '1 2:03:04')",
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO days VALUES ($1::text::date, $2::text::timestamptz, $3::text::interval)",
        &[&"03/01/2020", &"2020-01-03 03:04:05", &"2 1:00:00"],
    )
    .await
    .unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    // Day first: 2 January.
    let d: String = value_on(
        &info.followers[0],
        &db,
        "SELECT to_char(min(d), 'YYYY-MM-DD') FROM days",
    )
    .await;
    assert_eq!(d, "2020-01-02");
    // The followers' sequences stand where the leader's does, so a promoted follower does
    // not hand out keys the leader already gave.
    let leader_seq: i64 = value_on(&info.leader, &db, "SELECT last_value FROM items_id_seq").await;
    assert!(leader_seq >= 29, "{leader_seq}");
    for f in &info.followers {
        let theirs: i64 = value_on(f, &db, "SELECT last_value FROM items_id_seq").await;
        assert_eq!(theirs, leader_seq, "sequence on {}", f.name);
    }
    // Each prepared run had fresh values.
    let distinct: i64 = value_on(
        &info.leader,
        &db,
        "SELECT count(DISTINCT uid) FROM items WHERE note LIKE 'prepared%'",
    )
    .await;
    assert_eq!(distinct, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_statements_are_refused_with_0a000_naming_the_construct() {
    let (info, db, addr, _) = setup("unsafe", "").await;
    let c = connect_proxy(addr, &db).await;
    c.batch_execute(
        "CREATE TABLE items (id serial PRIMARY KEY, note text, r float8, at timestamptz);
         CREATE FUNCTION pick() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 4';",
    )
    .await
    .unwrap();
    let cases = [
        (
            "UPDATE accounts SET balance = (random() * 10)::int",
            "random()",
        ),
        (
            "INSERT INTO items (note) SELECT 'x' FROM generate_series(1, 3)",
            "items.id",
        ),
        (
            "INSERT INTO items (at) VALUES (clock_timestamp())",
            "clock_timestamp",
        ),
        ("UPDATE accounts SET balance = pick() WHERE id = 1", "pick"),
    ];
    for (sql, construct) in cases {
        let err = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        let message = common::error_message(&err);
        assert!(message.contains(construct), "{sql}: {message}");
        // Extended protocol too.
        let err = c.execute(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql} (extended): {err:?}");
    }
    // In a transaction block the refusal fails the transaction like any error.
    let err = c
        .batch_execute("BEGIN; INSERT INTO items (note) VALUES ('kept?'); UPDATE accounts SET balance = pick()")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000");
    c.batch_execute("ROLLBACK").await.unwrap();
    // Nothing of it reached anyone; the session goes on.
    c.batch_execute("INSERT INTO items (note) VALUES ('after')")
        .await
        .unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    let n: i64 = value_on(&info.leader, &db, "SELECT count(*) FROM items").await;
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_statements_run_with_a_warning_when_allowed() {
    let (info, db, addr, metrics) = setup("allow", "[statement]\nunsafe = \"allow\"\n").await;
    let (c, mut notices) = common::connect_proxy_with_messages(addr, &db).await;
    c.batch_execute("UPDATE accounts SET note = 'seen at ' || clock_timestamp() WHERE id = 1")
        .await
        .unwrap();
    let warning = match notices.recv().await.unwrap() {
        tokio_postgres::AsyncMessage::Notice(n) => n.message().to_owned(),
        other => panic!("expected a warning, got {other:?}"),
    };
    assert!(warning.contains("clock_timestamp"), "{warning}");
    // The statement reached the followers (with their own clock: that is the warning).
    for f in &info.followers {
        common::wait_until(CONVERGE, || async {
            let note: String = value_on(f, &db, "SELECT note FROM accounts WHERE id = 1").await;
            note.starts_with("seen at")
        })
        .await;
    }
    let text = scrape(metrics).await;
    assert_eq!(
        metric(&text, "pgrelay_unsafe_statements_total"),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_rolled_back_to_a_savepoint_are_not_replayed() {
    let (info, db, addr, _) = setup("savepoint", "").await;
    let c = connect_proxy(addr, &db).await;
    c.batch_execute(
        "BEGIN;
         UPDATE accounts SET balance = balance + 1 WHERE id = 1;
         SAVEPOINT a;
         UPDATE accounts SET balance = balance + 100 WHERE id = 1;
         SAVEPOINT b;
         DELETE FROM accounts WHERE id = 2;
         ROLLBACK TO SAVEPOINT a;
         UPDATE accounts SET balance = balance + 10 WHERE id = 1;
         COMMIT",
    )
    .await
    .unwrap();
    // The same through the extended protocol, one statement per round trip.
    let mut c2 = connect_proxy(addr, &db).await;
    let mut tx = c2.transaction().await.unwrap();
    tx.execute(
        "UPDATE accounts SET balance = balance + 1 WHERE id = 3",
        &[],
    )
    .await
    .unwrap();
    let sp = tx.savepoint("sp_inner").await.unwrap();
    sp.execute("DELETE FROM accounts WHERE id = 3", &[])
        .await
        .unwrap();
    sp.rollback().await.unwrap();
    tx.commit().await.unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    let b: i64 = value_on(
        &info.followers[0],
        &db,
        "SELECT balance FROM accounts WHERE id = 1",
    )
    .await;
    assert_eq!(b, 1011);
    let n: i64 = value_on(
        &info.followers[1],
        &db,
        "SELECT count(*) FROM accounts WHERE id IN (2, 3)",
    )
    .await;
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgrelay_killed_in_the_middle_of_a_load_loses_and_repeats_nothing() {
    let info = row_cluster();
    let db = leader_database(&info.leader, "skill").await;
    connect_direct(&info.leader, &db)
        .await
        .batch_execute(SCHEMA)
        .await
        .unwrap();
    let dir = cluster::test_dir("stmtkill");
    std::fs::create_dir_all(&dir).unwrap();
    let config = statement_config(info, &db, "");
    let mut proxy = ProxyProcess::start(&config, &dir, "first");
    wait_bootstrapped(&info.followers, &db).await;
    let leader = connect_direct(&info.leader, &db).await;
    let ledger_before = ledger_rows(&leader).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let first = tokio::spawn(load(proxy.addr, db.clone(), stop_rx));
    let follower = connect_direct(&info.followers[0], &db).await;
    common::wait_until(Duration::from_secs(30), || async {
        ledger_rows(&follower).await > ledger_before + 100
    })
    .await;
    proxy.kill();
    stop_tx.send(true).unwrap();
    let committed_first = first.await.unwrap();

    let proxy = ProxyProcess::start(&config, &dir, "second");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let second = tokio::spawn(load(proxy.addr, db.clone(), stop_rx));
    common::wait_until(Duration::from_secs(30), || async {
        ledger_rows(&leader).await as u64 > ledger_before as u64 + committed_first + 100
    })
    .await;
    stop_tx.send(true).unwrap();
    let committed_second = second.await.unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    let added = (ledger_rows(&leader).await - ledger_before) as u64;
    let acked = committed_first + committed_second;
    assert!(
        added == acked || added == acked + 1,
        "added {added}, acknowledged {acked}"
    );
    // The restarted pgrelay resumed from the recorded positions: it copied nothing.
    let text = scrape(proxy.metrics).await;
    for f in &info.followers {
        let l = format!("follower=\"{}\"", f.name);
        assert_eq!(
            metric(&text, &format!("pgrelay_bootstrap_rows_total{{{l}}}")),
            Some(0.0),
            "{text}"
        );
    }
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_down_during_the_load_catches_up() {
    // Its own cluster: stopping a follower must not disturb the other tests.
    let mut cluster = start_row_cluster(2, "stmtdown");
    let info = ClusterInfo {
        leader: cluster.leader().clone(),
        followers: cluster.followers().to_vec(),
        bin_dir: cluster.bin_dir().to_path_buf(),
    };
    let db = leader_database(&info.leader, "down").await;
    connect_direct(&info.leader, &db)
        .await
        .batch_execute(SCHEMA)
        .await
        .unwrap();
    let (addr, _) = start_proxy_with_metrics(statement_config(&info, &db, "")).await;
    wait_bootstrapped(&info.followers, &db).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(load(addr, db.clone(), stop_rx));
    let leader = connect_direct(&info.leader, &db).await;
    let start = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        ledger_rows(&leader).await > start + 100
    })
    .await;
    let down = info.followers[1].name.clone();
    cluster.stop_node(&down).unwrap();
    let at_stop = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        ledger_rows(&leader).await > at_stop + 200
    })
    .await;
    cluster.start_node(&down).unwrap();
    let at_start = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        ledger_rows(&leader).await > at_start + 100
    })
    .await;
    stop_tx.send(true).unwrap();
    assert!(writer.await.unwrap() > 0);
    assert_converged(&info, &info.followers, &db, CONVERGE).await;
    cluster.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_bootstrapped_while_writes_run_through_pgrelay_converges() {
    let info = row_cluster();
    let db = leader_database(&info.leader, "sunderload").await;
    connect_direct(&info.leader, &db)
        .await
        .batch_execute(SCHEMA)
        .await
        .unwrap();
    // pgrelay starts with the load: the followers are copied while it runs.
    let (addr, _) = start_proxy_with_metrics(statement_config(info, &db, "")).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(load(addr, db.clone(), stop_rx));
    wait_bootstrapped(&info.followers, &db).await;
    let leader = connect_direct(&info.leader, &db).await;
    let at_copy = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        ledger_rows(&leader).await > at_copy + 200
    })
    .await;
    stop_tx.send(true).unwrap();
    assert!(writer.await.unwrap() > 0);
    assert_converged(info, &info.followers, &db, CONVERGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_in_the_middle_of_the_stream_replays_in_order() {
    let (info, db, addr, _) = setup("sddl", "").await;
    let c = connect_proxy(addr, &db).await;
    c.batch_execute(
        "INSERT INTO accounts VALUES (5000, 1, 'before');
         ALTER TABLE accounts ADD COLUMN tier int;
         UPDATE accounts SET tier = 2 WHERE id <= 10;
         CREATE INDEX accounts_tier ON accounts (tier);
         CREATE TABLE later (id bigserial PRIMARY KEY, v text);
         INSERT INTO later (v) VALUES ('a'), ('b');
         CREATE TEMP TABLE scratch (x int);
         INSERT INTO scratch VALUES (1);",
    )
    .await
    .unwrap();
    // Dropping the temporary table is the session's business too (a follower has none).
    c.batch_execute("UPDATE scratch SET x = 2; DROP TABLE scratch")
        .await
        .unwrap();
    c.batch_execute("CREATE INDEX CONCURRENTLY later_v ON later (v)")
        .await
        .unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    for f in &info.followers {
        common::wait_until(CONVERGE, || async {
            let n: i64 = value_on(
                f,
                &db,
                "SELECT count(*) FROM pg_indexes WHERE indexname IN ('accounts_tier', 'later_v')",
            )
            .await;
            n == 2
        })
        .await;
        // The session's temporary table stayed with the session.
        let temp: i64 = value_on(
            f,
            &db,
            "SELECT count(*) FROM pg_class WHERE relname = 'scratch'",
        )
        .await;
        assert_eq!(temp, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_writes_see_them_in_statement_mode() {
    let (info, db, addr, metrics) = setup("sryw", "").await;
    reads_see_own_writes(
        info,
        &db,
        addr,
        metrics,
        "INSERT INTO accounts VALUES ($1, 1, 'ryw')",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_initialized_and_run_through_pgrelay_converges() {
    let info = row_cluster();
    let db = leader_database(&info.leader, "spgbench").await;
    let (addr, _) = start_proxy_with_metrics(statement_config(info, &db, "")).await;
    wait_bootstrapped(&info.followers, &db).await;
    // pgbench -i: DDL, then TRUNCATE and COPY in one transaction, then VACUUM.
    let out = pg_command("pgbench", addr, &db)
        .args(["-i", "-s", "1", "-q"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for mode in ["simple", "extended", "prepared"] {
        let out = pg_command("pgbench", addr, &db)
            .args(["-n", "-c", "4", "-j", "2", "-t", "150", "-M", mode])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("number of failed transactions: 0"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_converged(info, &info.followers, &db, CONVERGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pgrelay_processes_writing_to_one_leader_converge() {
    let (info, db, first, _) = setup("stwo", "").await;
    let (second, _) = start_proxy_with_metrics(statement_config(info, &db, "")).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let a = tokio::spawn(load(first, db.clone(), stop_rx.clone()));
    let b = tokio::spawn(load(second, db.clone(), stop_rx));
    let leader = connect_direct(&info.leader, &db).await;
    let start = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        ledger_rows(&leader).await > start + 400
    })
    .await;
    stop_tx.send(true).unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(a > 0 && b > 0, "both wrote: {a} {b}");
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    // One log for both (applied entries are deleted by then).
    let entries: i64 = value_on(
        &info.leader,
        &db,
        "SELECT last_value FROM pgrelay.statement_seq",
    )
    .await;
    assert!(
        entries as u64 >= a + b,
        "{entries} entries for {} commits",
        a + b
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_serialized_writes_statements_that_read_other_rows_are_refused() {
    let (info, db, addr, _) = setup("snoser", "[statement]\nserialize_writes = false\n").await;
    let c = connect_proxy(addr, &db).await;
    let err = c
        .batch_execute(
            "INSERT INTO ledger (account, amount) SELECT id, balance FROM accounts WHERE id < 3",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    // Statements on one table's own rows still run, from concurrent sessions.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let a = tokio::spawn(load(addr, db.clone(), stop_rx.clone()));
    let b = tokio::spawn(load(addr, db.clone(), stop_rx));
    let leader = connect_direct(&info.leader, &db).await;
    let start = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        ledger_rows(&leader).await > start + 300
    })
    .await;
    stop_tx.send(true).unwrap();
    assert!(a.await.unwrap() > 0 && b.await.unwrap() > 0);
    assert_converged(info, &info.followers, &db, CONVERGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_ack_returns_after_every_follower_applied_the_entry() {
    let (info, db, addr, _) = setup(
        "squorum",
        "[replication]\nack = \"quorum:2\"\nack_timeout = \"20s\"\n",
    )
    .await;
    let client = connect_proxy(addr, &db).await;
    let followers = [
        connect_direct(&info.followers[0], &db).await,
        connect_direct(&info.followers[1], &db).await,
    ];
    for i in 0..20 {
        let id = 20_000 + i;
        client
            .execute("INSERT INTO accounts VALUES ($1, 1, 'acked')", &[&id])
            .await
            .unwrap();
        for f in &followers {
            let n: i64 = f
                .query_one("SELECT count(*) FROM accounts WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 1, "commit {i} returned before a follower applied it");
        }
    }
}

/// What JDBC does: BEGIN travels in the same extended-protocol batch as the transaction's first
/// statement, COMMIT in a batch of its own. The client sees Postgres's exact replies, and the
/// transaction is logged once, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_sent_with_the_first_statement_is_logged_with_it() {
    use pgrelay::protocol::frontend as fe;
    let (info, db, addr, _) = setup("sbatch", "").await;
    let mut raw = common::raw::Raw::login(addr, &db).await;
    let mut out = bytes::BytesMut::new();
    fe::parse(&mut out, "", "BEGIN", &[]);
    fe::bind_text(&mut out, "", std::iter::empty());
    fe::execute(&mut out);
    fe::parse(
        &mut out,
        "",
        "INSERT INTO accounts VALUES ($1, 7, 'batch')",
        &[23],
    );
    fe::bind_text(&mut out, "", [Some(&b"7001"[..])].into_iter());
    fe::execute(&mut out);
    fe::sync(&mut out);
    raw.send(&out).await;
    let replies = raw.until(b'Z').await;
    let tags: Vec<u8> = replies.iter().map(|f| f.tag()).collect();
    assert_eq!(tags, b"12C12CZ", "{replies:?}");
    assert_eq!(replies.last().unwrap().body().first(), Some(&b'T'));
    out.clear();
    fe::parse(&mut out, "", "COMMIT", &[]);
    fe::bind_text(&mut out, "", std::iter::empty());
    fe::execute(&mut out);
    fe::sync(&mut out);
    raw.send(&out).await;
    let replies = raw.until(b'Z').await;
    let tags: Vec<u8> = replies.iter().map(|f| f.tag()).collect();
    assert_eq!(tags, b"12CZ", "{replies:?}");
    assert_eq!(replies.last().unwrap().body().first(), Some(&b'I'));
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    let balance: i64 = value_on(
        &info.followers[1],
        &db,
        "SELECT balance FROM accounts WHERE id = 7001",
    )
    .await;
    assert_eq!(balance, 7);
}

/// COPY through the driver (extended protocol) of `rows`, in chunks of 8 KiB; the first
/// error, whether a send or the end saw it.
async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &str,
) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = tx
        .copy_in("COPY accounts (id, balance, note) FROM STDIN")
        .await?;
    futures_util::pin_mut!(sink);
    for chunk in rows.as_bytes().chunks(8 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
    }
    sink.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_past_max_copy_bytes_fails_the_transaction_with_54000() {
    let (info, db, addr, _) = setup("copylimit", "[statement]\nmax_copy_bytes = \"64KiB\"\n").await;
    let mut c = connect_proxy(addr, &db).await;
    let rows = |from: i32, n: i32, note: usize| -> String {
        (from..from + n)
            .map(|id| format!("{id}\t7\t{}\n", "n".repeat(note)))
            .collect()
    };
    // Under the limit (two COPYs of 20 KiB in one transaction): logged and replicated.
    let tx = c.transaction().await.unwrap();
    assert_eq!(copy_rows(&tx, &rows(10_001, 200, 100)).await.unwrap(), 200);
    assert_eq!(copy_rows(&tx, &rows(10_201, 200, 100)).await.unwrap(), 200);
    tx.commit().await.unwrap();
    // A third such COPY and a 60 KiB one take the transaction past 64 KiB.
    let tx = c.transaction().await.unwrap();
    assert_eq!(copy_rows(&tx, &rows(20_001, 200, 100)).await.unwrap(), 200);
    let err = copy_rows(&tx, &rows(20_201, 600, 100)).await.unwrap_err();
    assert_eq!(sqlstate(&err), "54000", "{err:?}");
    let message = common::error_message(&err);
    assert!(message.contains("statement.max_copy_bytes"), "{message}");
    assert!(message.contains("65536"), "{message}");
    tx.rollback().await.unwrap();
    // The session goes on, and what failed is nowhere.
    let n: i64 = c
        .query_one("SELECT count(*) FROM accounts WHERE id > 10000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 400);
    c.batch_execute("UPDATE accounts SET balance = 8 WHERE id = 10001")
        .await
        .unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    let n: i64 = value_on(
        &info.followers[0],
        &db,
        "SELECT count(*) FROM accounts WHERE id > 10000",
    )
    .await;
    assert_eq!(n, 400);
}
