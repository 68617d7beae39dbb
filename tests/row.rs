//! Row mode end to end: pgrelay copies the leader onto empty followers and applies every
//! change, and the followers converge to exactly the leader's rows, through crashes of pgrelay
//! and of a follower.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::row::{
    assert_converged, leader_database, ledger_rows, load, reads_see_own_writes, row_cluster,
    row_config, start_row_cluster, value_on, wait_bootstrapped, ProxyProcess,
};
use common::{
    connect_direct, connect_proxy, metric, pg_command, scrape, sqlstate, start_proxy_with_metrics,
    ClusterInfo,
};
use pgrelay::cluster;

const CONVERGE: Duration = Duration::from_secs(60);

/// Tables that exercise what the applier must get right, created on the leader before pgrelay
/// starts (so the bootstrap copies them).
const SCHEMA: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text, mood mood);
    CREATE TABLE ledger (account int, amount bigint, at timestamptz DEFAULT now());
    CREATE TABLE docs (id serial PRIMARY KEY, title text, body text);
    CREATE TABLE full_ident (a int, b jsonb, c point);
    ALTER TABLE full_ident REPLICA IDENTITY FULL;
    CREATE TABLE by_index (code text NOT NULL, v int);
    CREATE UNIQUE INDEX by_index_code ON by_index (code);
    ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_code;
    CREATE TABLE parted (id int, region text, v int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
    CREATE TABLE parted_eu PARTITION OF parted FOR VALUES IN ('eu');
    CREATE TABLE parted_us PARTITION OF parted FOR VALUES IN ('us');
    CREATE TABLE gen (id int PRIMARY KEY, x int, doubled int GENERATED ALWAYS AS (x * 2) STORED);
    INSERT INTO accounts SELECT g, 1000, 'n' || g, 'ok' FROM generate_series(1, 2000) g;
    INSERT INTO ledger SELECT g % 50, g FROM generate_series(1, 500) g;
    INSERT INTO docs (title, body) VALUES ('big', repeat('lorem ipsum ', 20000)), ('small', 'x');
    INSERT INTO full_ident VALUES (1, '{\"k\": 1}', '(1,2)'), (1, '{\"k\": 1}', '(1,2)'), (2, NULL, NULL);
    INSERT INTO by_index VALUES ('a', 1), ('b', 2);
    INSERT INTO parted VALUES (1, 'eu', 1), (2, 'us', 2);
    INSERT INTO gen (id, x) VALUES (1, 10);
    CREATE MATERIALIZED VIEW rich AS SELECT id FROM accounts WHERE balance > 500;
    CREATE TABLE parent (id int PRIMARY KEY);
    CREATE TABLE child (id int PRIMARY KEY, parent int NOT NULL REFERENCES parent, pad text);
    INSERT INTO parent SELECT generate_series(1, 10);
    INSERT INTO child SELECT g, g % 10 + 1, repeat('p', 200) FROM generate_series(1, 3000) g;
    CREATE TABLE audit (id bigserial PRIMARY KEY, account int, at timestamptz DEFAULT now());
    CREATE FUNCTION audit_balance() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO audit (account) VALUES (NEW.id); RETURN NEW; END $$;
    CREATE TRIGGER accounts_audit AFTER UPDATE OF note ON accounts
        FOR EACH ROW EXECUTE FUNCTION audit_balance();
    CREATE TABLE days (d date PRIMARY KEY, at timestamptz, span interval, ratio float8);
    INSERT INTO days VALUES ('2020-01-02', '2020-01-02 03:04:05+06', '1 day 02:03:04', 0.1);
";

async fn setup(prefix: &str) -> (&'static ClusterInfo, String) {
    let info = row_cluster();
    let db = leader_database(&info.leader, prefix).await;
    // The leader's sessions print dates day first and in another time zone: the values must
    // still read back the same on the followers.
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
    (info, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_copies_the_leader_and_every_kind_of_change_follows() {
    let (info, db) = setup("kinds").await;
    let (addr, metrics) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    for f in &info.followers {
        let value: i64 = value_on(f, &db, "SELECT last_value FROM docs_id_seq").await;
        assert_eq!(value, 2, "sequence value copied to {}", f.name);
        let views: i64 = value_on(f, &db, "SELECT count(*) FROM rich").await;
        assert_eq!(views, 2000, "materialized view refreshed on {}", f.name);
    }

    let client = connect_proxy(addr, &db).await;
    // One statement per round trip: a BEGIN inside a multi-statement string would fold the
    // statements before it into its transaction.
    for sql in [
        "UPDATE accounts SET balance = balance - 1, mood = 'happy' WHERE id <= 100",
        "DELETE FROM accounts WHERE id BETWEEN 1900 AND 1950",
        "INSERT INTO ledger (account, amount) VALUES (1, 5), (1, 5), (NULL, NULL)",
        "UPDATE full_ident SET b = '{\"k\": 2}' WHERE a = 1 AND ctid = (SELECT min(ctid) FROM full_ident WHERE a = 1)",
        "DELETE FROM full_ident WHERE a = 2",
        "UPDATE by_index SET code = 'c' WHERE code = 'a'",
        "DELETE FROM by_index WHERE code = 'b'",
        "UPDATE parted SET v = v + 1",
        "INSERT INTO parted VALUES (3, 'eu', 3)",
        "UPDATE gen SET x = 21 WHERE id = 1",
        "UPDATE accounts SET note = NULL WHERE id = 7",
        "UPDATE accounts SET note = 'audited' WHERE id BETWEEN 10 AND 14",
        "INSERT INTO days VALUES ('2021-03-04', '2021-03-04 05:06:07+00', '-3 days', 1e-10)",
        "UPDATE days SET ratio = ratio * 3 WHERE d = '2020-01-02'",
        "DELETE FROM child WHERE id <= 100",
        "INSERT INTO child VALUES (5000, 3, 'x')",
        "BEGIN; INSERT INTO accounts VALUES (5000, 1, 'rolled back', 'sad'); ROLLBACK",
        "BEGIN; INSERT INTO accounts VALUES (5001, 1, 'kept', 'sad'); SAVEPOINT s; \
         INSERT INTO accounts VALUES (5002, 1, 'undone', 'sad'); ROLLBACK TO s; COMMIT",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    // A load with many small transactions, through pgrelay.
    let out = pg_command("pgbench", addr, &db)
        .args(["-n", "-c", "4", "-t", "200", "-f", "-"])
        .stdin_script(
            "\\set id random(1, 1800)\n\
             BEGIN;\n\
             UPDATE accounts SET balance = balance + 1 WHERE id = :id;\n\
             INSERT INTO ledger (account, amount) VALUES (:id, 1);\n\
             END;\n",
        );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    for f in &info.followers {
        let value: i32 = value_on(f, &db, "SELECT doubled FROM gen WHERE id = 1").await;
        assert_eq!(value, 42, "generated column computed on {}", f.name);
    }

    let text = scrape(metrics).await;
    for f in &info.followers {
        let l = format!("follower=\"{}\"", f.name);
        assert!(
            metric(&text, &format!("pgrelay_apply_transactions_total{{{l}}}")).unwrap() >= 800.0,
            "{text}"
        );
        assert!(
            metric(
                &text,
                &format!("pgrelay_apply_rows_total{{{l},op=\"insert\"}}")
            )
            .unwrap()
                >= 800.0
        );
        assert!(
            metric(
                &text,
                &format!("pgrelay_apply_rows_total{{{l},op=\"update\"}}")
            )
            .unwrap()
                >= 900.0
        );
        assert!(
            metric(
                &text,
                &format!("pgrelay_apply_rows_total{{{l},op=\"delete\"}}")
            )
            .unwrap()
                >= 53.0
        );
        assert_eq!(
            metric(&text, &format!("pgrelay_apply_errors_total{{{l}}}")),
            Some(0.0)
        );
        assert!(metric(&text, &format!("pgrelay_slot_retained_bytes{{{l}}}")).is_some());
        assert!(metric(&text, &format!("pgrelay_bootstrap_rows_total{{{l}}}")).unwrap() >= 2500.0);
        assert_eq!(
            metric(&text, &format!("pgrelay_follower_up{{{l}}}")),
            Some(1.0)
        );
    }
    // At rest the followers are at the leader's position: lag reads 0, as in physical mode.
    common::wait_until(Duration::from_secs(30), || async {
        let text = scrape(metrics).await;
        info.followers.iter().all(|f| {
            let l = format!("follower=\"{}\"", f.name);
            metric(&text, &format!("pgrelay_replication_lag_bytes{{{l}}}")) == Some(0.0)
                && metric(&text, &format!("pgrelay_replication_lag_seconds{{{l}}}")) == Some(0.0)
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_does_not_touch_a_toasted_value_keeps_it() {
    let (info, db) = setup("toast").await;
    let (addr, _) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    let client = connect_proxy(addr, &db).await;
    // A value large enough to be stored out of line, written after the bootstrap.
    client
        .batch_execute(
            "INSERT INTO docs (title, body) VALUES ('fresh', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 5000) g));
             UPDATE docs SET title = 'renamed' WHERE title IN ('big', 'fresh');",
        )
        .await
        .unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    for f in &info.followers {
        let c = connect_direct(f, &db).await;
        let rows = c
            .query(
                "SELECT length(body) FROM docs WHERE title = 'renamed' ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        let lengths: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(lengths, vec![240_000, 160_000], "bodies kept on {}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_is_replicated_and_a_table_without_identity_refuses_updates() {
    let (info, db) = setup("truncate").await;
    let (addr, _) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    let client = connect_proxy(addr, &db).await;
    client
        .batch_execute("TRUNCATE ledger; INSERT INTO ledger (account, amount) VALUES (9, 9)")
        .await
        .unwrap();
    // ledger has no primary key: inserts replicate, updates and deletes cannot identify rows.
    let err = client
        .batch_execute("UPDATE ledger SET amount = 10")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "55000");
    let hint = err
        .as_db_error()
        .and_then(|e| e.hint())
        .unwrap_or_default()
        .to_owned();
    assert!(hint.contains("REPLICA IDENTITY"), "hint: {hint}");
    client.batch_execute("SELECT 1").await.unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    for f in &info.followers {
        let c = connect_direct(f, &db).await;
        let n = ledger_rows(&c).await;
        assert_eq!(n, 1, "truncated on {}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_writes_see_them_in_row_mode() {
    let (info, db) = setup("ryw").await;
    let (addr, metrics) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    reads_see_own_writes(
        info,
        &db,
        addr,
        metrics,
        "INSERT INTO accounts VALUES ($1, 1, 'ryw', 'ok')",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_ack_returns_after_every_follower_applied() {
    let (info, db) = setup("quorum").await;
    let (addr, _) = start_proxy_with_metrics(row_config(
        info,
        &db,
        "[replication]\nack = \"quorum:2\"\nack_timeout = \"20s\"\n",
    ))
    .await;
    wait_bootstrapped(info, &db).await;
    let client = connect_proxy(addr, &db).await;
    let followers: Vec<_> = {
        let mut v = Vec::new();
        for f in &info.followers {
            v.push(connect_direct(f, &db).await);
        }
        v
    };
    for i in 0..20 {
        let id = 20_000 + i;
        client
            .execute("INSERT INTO accounts VALUES ($1, 1, 'acked', 'ok')", &[&id])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgrelay_killed_in_the_middle_of_a_load_loses_and_repeats_nothing() {
    let (info, db) = setup("kill").await;
    let dir = cluster::test_dir("rowkill");
    std::fs::create_dir_all(&dir).unwrap();
    let config = row_config(info, &db, "");
    let mut proxy = ProxyProcess::start(&config, &dir, "first");
    wait_bootstrapped(info, &db).await;
    let ledger_before: i64 = connect_direct(&info.leader, &db)
        .await
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let first = tokio::spawn(load(proxy.addr, db.clone(), stop_rx.clone()));
    // Kill it once the followers applied part of the load.
    let follower = connect_direct(&info.followers[0], &db).await;
    common::wait_until(Duration::from_secs(30), || async {
        let n = ledger_rows(&follower).await;
        n > ledger_before + 100
    })
    .await;
    proxy.kill();
    stop_tx.send(true).unwrap();
    let committed_first = first.await.unwrap();

    let proxy = ProxyProcess::start(&config, &dir, "second");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let second = tokio::spawn(load(proxy.addr, db.clone(), stop_rx));
    let leader = connect_direct(&info.leader, &db).await;
    common::wait_until(Duration::from_secs(30), || async {
        let n = ledger_rows(&leader).await;
        n as u64 > ledger_before as u64 + committed_first + 100
    })
    .await;
    stop_tx.send(true).unwrap();
    let committed_second = second.await.unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    // Every acknowledged commit is on the leader (one in flight at the kill may be too).
    let ledger_after = ledger_rows(&leader).await;
    let acked = committed_first + committed_second;
    let added = (ledger_after - ledger_before) as u64;
    assert!(
        added == acked || added == acked + 1,
        "added {added}, acknowledged {acked}"
    );
    // The restarted pgrelay resumed each follower from its recorded position: it copied nothing.
    let text = scrape(proxy.metrics).await;
    for f in &info.followers {
        let l = format!("follower=\"{}\"", f.name);
        assert_eq!(
            metric(&text, &format!("pgrelay_bootstrap_rows_total{{{l}}}")),
            Some(0.0),
            "{text}"
        );
        assert!(metric(&text, &format!("pgrelay_apply_transactions_total{{{l}}}")).unwrap() > 0.0);
    }
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_and_a_leader_crashed_during_the_load_catch_up() {
    // Its own cluster: stopping a follower must not disturb the other tests.
    let mut cluster = start_row_cluster(2, "rowdown");
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
    let proxy = common::start_running_proxy(row_config(&info, &db, "")).await;
    let (addr, metrics) = (proxy.addr, proxy.metrics_addr.unwrap());
    wait_bootstrapped(&info, &db).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(load(addr, db.clone(), stop_rx));
    let stopped = info.followers[1].name.clone();
    cluster.stop_node(&stopped).unwrap();
    common::wait_until(Duration::from_secs(10), || async {
        let text = scrape(metrics).await;
        metric(
            &text,
            &format!("pgrelay_follower_up{{follower=\"{stopped}\"}}"),
        ) == Some(0.0)
    })
    .await;
    // Writes go on while it is down; the other follower keeps up.
    let leader = connect_direct(&info.leader, &db).await;
    let before = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        let n = ledger_rows(&leader).await;
        n > before + 200
    })
    .await;
    cluster.start_node(&stopped).unwrap();
    common::wait_until(Duration::from_secs(30), || async {
        let text = scrape(metrics).await;
        metric(
            &text,
            &format!("pgrelay_follower_up{{follower=\"{stopped}\"}}"),
        ) == Some(1.0)
    })
    .await;
    // The leader crashes under the load (no checkpoint, so its slots forget how far the
    // followers confirmed and send those transactions again): the appliers skip what each
    // follower recorded, and resume after it.
    let leader_name = info.leader.name.clone();
    cluster.crash_node(&leader_name).unwrap();
    cluster.start_node(&leader_name).unwrap();
    let leader = connect_direct(&info.leader, &db).await;
    let before = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        let n = ledger_rows(&leader).await;
        n > before + 200
    })
    .await;
    stop_tx.send(true).unwrap();
    assert!(writer.await.unwrap() > 0);
    assert_converged(&info, &info.followers, &db, CONVERGE).await;
    proxy.stop().await;
    cluster.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_bootstrapped_while_writes_run_converges() {
    let (info, db) = setup("underload").await;
    // Writes straight to the leader while pgrelay copies it.
    let leader_addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", info.leader.port).parse().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(load(leader_addr, db.clone(), stop_rx));
    let leader = connect_direct(&info.leader, &db).await;
    common::wait_until(Duration::from_secs(30), || async {
        let n = ledger_rows(&leader).await;
        n > 600
    })
    .await;
    let (_addr, _) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    // Keep writing after the copy, then stop and compare.
    let at_copy = ledger_rows(&leader).await;
    common::wait_until(Duration::from_secs(30), || async {
        let n = ledger_rows(&leader).await;
        n > at_copy + 200
    })
    .await;
    stop_tx.send(true).unwrap();
    assert!(writer.await.unwrap() > 0);
    assert_converged(info, &info.followers, &db, CONVERGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_behind_pgrelays_back_stops_the_follower_with_a_clear_error() {
    let (info, db) = setup("behind").await;
    let (addr, metrics) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    // Straight on the leader, not through pgrelay; then a change that uses the new column.
    connect_direct(&info.leader, &db)
        .await
        .batch_execute("ALTER TABLE accounts ADD COLUMN sneaky int")
        .await
        .unwrap();
    // The operator fixes the second follower by hand; the first stays different.
    let fixed = &info.followers[1];
    connect_direct(fixed, &db)
        .await
        .batch_execute("ALTER TABLE accounts ADD COLUMN sneaky int")
        .await
        .unwrap();
    let client = connect_proxy(addr, &db).await;
    client
        .batch_execute("UPDATE accounts SET sneaky = 1 WHERE id = 1")
        .await
        .unwrap();
    let broken = &info.followers[0];
    common::wait_until(Duration::from_secs(30), || async {
        let text = scrape(metrics).await;
        metric(
            &text,
            &format!("pgrelay_follower_up{{follower=\"{}\"}}", broken.name),
        ) == Some(0.0)
            && metric(
                &text,
                &format!("pgrelay_apply_errors_total{{follower=\"{}\"}}", broken.name),
            )
            .unwrap_or(0.0)
                >= 1.0
    })
    .await;
    // The other follower goes on.
    assert_converged(info, std::slice::from_ref(fixed), &db, CONVERGE).await;
    let text = scrape(metrics).await;
    assert_eq!(
        metric(
            &text,
            &format!("pgrelay_follower_up{{follower=\"{}\"}}", fixed.name)
        ),
        Some(1.0)
    );
    // Reads no longer go to the broken follower.
    let before = metric(
        &text,
        &format!(
            "pgrelay_reads_total{{node=\"{}\",reason=\"consistency\"}}",
            broken.name
        ),
    )
    .unwrap_or(0.0);
    for _ in 0..10 {
        client
            .query("SELECT count(*) FROM accounts", &[])
            .await
            .unwrap();
    }
    let text = scrape(metrics).await;
    let after = metric(
        &text,
        &format!(
            "pgrelay_reads_total{{node=\"{}\",reason=\"consistency\"}}",
            broken.name
        ),
    )
    .unwrap_or(0.0);
    assert_eq!(
        before, after,
        "reads went to the follower that stopped applying"
    );
}

/// `Command::output` with a script on stdin.
trait StdinScript {
    fn stdin_script(&mut self, script: &str) -> std::process::Output;
}

impl StdinScript for std::process::Command {
    fn stdin_script(&mut self, script: &str) -> std::process::Output {
        use std::io::Write;
        let mut child = self
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

/// The applier against a real follower database, fed a stream by hand: a transaction the
/// leader sends again after a restart (its slot had not heard that the follower committed it)
/// is skipped, because the follower recorded its end position in the same transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_sent_again_is_not_applied_twice() {
    use pgrelay::protocol::pgoutput::{
        Begin, Column, Commit, Insert, Message, Relation, ReplicaIdentity, Tuple, Value,
    };
    use pgrelay::replication::row::{apply::Applier, setup};

    let info = row_cluster();
    let follower = &info.followers[0];
    let db = leader_database(follower, "resend").await;
    connect_direct(follower, &db)
        .await
        .batch_execute(&format!(
            "{}; INSERT INTO pgrelay.applied (source, position) VALUES ('src', '0/100'); \
             CREATE TABLE public.ledger (account int, amount bigint)",
            setup::APPLIED_TABLE_SQL
        ))
        .await
        .unwrap();
    let config = pgrelay::config::Config::parse(&row_config(info, &db, "")).unwrap();
    let stream = |begin: u64| {
        vec![
            Message::Relation(Relation {
                id: 42,
                namespace: "public".into(),
                name: "ledger".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![
                    Column {
                        key: false,
                        name: "account".into(),
                        type_oid: 23,
                        type_modifier: -1,
                    },
                    Column {
                        key: false,
                        name: "amount".into(),
                        type_oid: 20,
                        type_modifier: -1,
                    },
                ],
            }),
            Message::Begin(Begin {
                final_lsn: begin,
                commit_time: 0,
                xid: 7,
            }),
            Message::Insert(Insert {
                relation: 42,
                new: Tuple(vec![
                    Value::Text("1".into()),
                    Value::Text(begin.to_string().into()),
                ]),
            }),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: begin,
                end_lsn: begin + 0x10,
                commit_time: 0,
            }),
        ]
    };
    let count = || async {
        connect_direct(follower, &db)
            .await
            .query_one("SELECT count(*) FROM ledger", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let applied_on_follower = || async {
        connect_direct(follower, &db)
            .await
            .query_one(
                "SELECT position::text FROM pgrelay.applied WHERE source = 'src'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };

    let conn = pgrelay::backend::connect_own(&config, 1, &db, "test applier", false)
        .await
        .unwrap();
    let mut applier = Applier::new(conn, &follower.name, "src", 0x100, None);
    for m in stream(0x200) {
        applier.apply(0x200, m).await.unwrap();
    }
    applier.finish_group().await.unwrap();
    applier.wait_all().await.unwrap();
    assert_eq!(applier.applied(), 0x210);
    applier.close().await;
    assert_eq!(count().await, 1);
    assert_eq!(applied_on_follower().await, "0/210");

    // pgrelay restarts from the recorded position; the leader sends that transaction again,
    // then a new one.
    let conn = pgrelay::backend::connect_own(&config, 1, &db, "test applier", false)
        .await
        .unwrap();
    let mut applier = Applier::new(conn, &follower.name, "src", 0x210, None);
    for m in stream(0x200).into_iter().chain(stream(0x300)) {
        applier.apply(0x300, m).await.unwrap();
    }
    applier.finish_group().await.unwrap();
    applier.wait_all().await.unwrap();
    applier.close().await;
    assert_eq!(
        count().await,
        2,
        "the transaction sent again was applied again"
    );
    assert_eq!(applied_on_follower().await, "0/310");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_through_pgrelay_in_the_middle_of_the_stream_reaches_the_followers() {
    let (info, db) = setup("ddl").await;
    let (addr, metrics) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(load(addr, db.clone(), stop_rx));
    let client = connect_proxy(addr, &db).await;
    // A column added while writes run, and rows that use it at once.
    client
        .batch_execute("ALTER TABLE accounts ADD COLUMN tier int DEFAULT 0")
        .await
        .unwrap();
    for i in 0..20 {
        client
            .execute(
                "INSERT INTO accounts (id, balance, tier) VALUES ($1, 0, $2)",
                &[&(30_000 + i), &i],
            )
            .await
            .unwrap();
    }
    client
        .batch_execute(
            "CREATE TABLE notes (id bigserial PRIMARY KEY, what text NOT NULL); \
             CREATE FUNCTION audit_note(t text) RETURNS text LANGUAGE sql AS $$ SELECT 'note: ' || t $$; \
             INSERT INTO notes (what) SELECT audit_note('x' || g) FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    client
        .batch_execute("CREATE INDEX CONCURRENTLY accounts_tier ON accounts (tier)")
        .await
        .unwrap();
    client
        .batch_execute("UPDATE accounts SET tier = 2 WHERE id < 100")
        .await
        .unwrap();
    stop_tx.send(true).unwrap();
    assert!(writer.await.unwrap() > 0);
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    for f in &info.followers {
        let c = connect_direct(f, &db).await;
        let row = c
            .query_one(
                "SELECT audit_note('y'), (SELECT count(*) FROM pg_indexes WHERE indexname = 'accounts_tier'), \
                 (SELECT tableowner FROM pg_tables WHERE tablename = 'notes')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "note: y", "function on {}", f.name);
        assert_eq!(row.get::<_, i64>(1), 1, "index built on {}", f.name);
        assert_eq!(
            row.get::<_, String>(2),
            common::SUPERUSER,
            "owner on {}",
            f.name
        );
    }
    let text = scrape(metrics).await;
    for f in &info.followers {
        assert_eq!(
            metric(
                &text,
                &format!("pgrelay_apply_errors_total{{follower=\"{}\"}}", f.name)
            ),
            Some(0.0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_initialized_and_run_through_pgrelay_converges() {
    let info = row_cluster();
    let db = leader_database(&info.leader, "pgbench").await;
    let (addr, _) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    // pgbench -i is DDL (DROP, CREATE, ALTER ... ADD PRIMARY KEY), TRUNCATE and COPY.
    let out = pg_command("pgbench", addr, &db)
        .args(["-i", "-s", "1", "-q"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pg_command("pgbench", addr, &db)
        .args(["-n", "-c", "4", "-j", "2", "-t", "300"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    assert_converged(info, &info.followers, &db, CONVERGE).await;
}

/// What row mode needs on the leader is checked first, and each missing piece is named with what
/// to change: wal_level, a superuser, a free replication slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_row_mode_cannot_use_is_refused_with_what_to_change() {
    use pgrelay::replication::row::{setup, stream::ReplicationStream, RowError};

    // A leader without logical decoding, and one with a single replication slot.
    let mut plain = common::row::start_row_cluster(0, "rowplain");
    let mut narrow = common::row::start_row_cluster(0, "rownarrow");
    plain
        .set_setting(&plain.leader().name.clone(), "wal_level", "replica")
        .unwrap();
    narrow
        .set_setting(&narrow.leader().name.clone(), "max_replication_slots", "1")
        .unwrap();
    for c in [&mut plain, &mut narrow] {
        let name = c.leader().name.clone();
        c.stop_node(&name).unwrap();
        c.start_node(&name).unwrap();
    }
    let info = |c: &cluster::LocalCluster| ClusterInfo {
        leader: c.leader().clone(),
        followers: Vec::new(),
        bin_dir: c.bin_dir().to_path_buf(),
    };
    let config = |c: &cluster::LocalCluster, user: &str| {
        let mut text = row_config(&info(c), "postgres", "");
        text = text.replace(
            &format!("user = \"{}\"", common::SUPERUSER),
            &format!("user = \"{user}\""),
        );
        text.push_str(
            "
[[users]]
name = \"weak\"
password = \"weak-pw\"
",
        );
        pgrelay::config::Config::parse(&text).unwrap()
    };

    let cfg = config(&plain, common::SUPERUSER);
    let mut conn = pgrelay::backend::connect_own(&cfg, 0, "postgres", "test", false)
        .await
        .unwrap();
    match setup::prepare_leader(&mut conn, "postgres").await {
        Err(RowError::Setup(m)) => assert!(
            m.contains("wal_level = replica") && m.contains("wal_level = logical"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }

    connect_direct(narrow.leader(), "postgres")
        .await
        .batch_execute("CREATE ROLE weak LOGIN PASSWORD 'weak-pw'")
        .await
        .unwrap();
    let cfg = config(&narrow, "weak");
    let mut conn = pgrelay::backend::connect_own(&cfg, 0, "postgres", "test", false)
        .await
        .unwrap();
    match setup::prepare_leader(&mut conn, "postgres").await {
        Err(RowError::Setup(m)) => assert!(m.contains("is not a superuser"), "{m}"),
        other => panic!("{other:?}"),
    }

    let cfg = config(&narrow, common::SUPERUSER);
    let mut conn = pgrelay::backend::connect_own(&cfg, 0, "postgres", "test", false)
        .await
        .unwrap();
    setup::prepare_leader(&mut conn, "postgres").await.unwrap();
    // Idempotent: the publication exists now.
    setup::prepare_leader(&mut conn, "postgres").await.unwrap();
    let mut first = ReplicationStream::new(
        pgrelay::backend::connect_own(&cfg, 0, "postgres", "test", true)
            .await
            .unwrap(),
    );
    first.create_slot("pgrelay_one").await.unwrap();
    let mut second = ReplicationStream::new(
        pgrelay::backend::connect_own(&cfg, 0, "postgres", "test", true)
            .await
            .unwrap(),
    );
    match second.create_slot("pgrelay_two").await {
        Err(RowError::Setup(m)) => assert!(m.contains("raise max_replication_slots"), "{m}"),
        other => panic!("{other:?}"),
    }
    first.close().await;
    second.close().await;
    plain.shutdown();
    narrow.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_missing_a_row_stops_until_someone_fixes_it() {
    let (info, db) = setup("diverged").await;
    let (addr, metrics) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    wait_bootstrapped(info, &db).await;
    let broken = &info.followers[0];
    let healthy = &info.followers[1];
    // Someone deletes a row on the follower by hand; then the leader updates it.
    let on_broken = connect_direct(broken, &db).await;
    on_broken
        .batch_execute("DELETE FROM accounts WHERE id = 42")
        .await
        .unwrap();
    let client = connect_proxy(addr, &db).await;
    client
        .batch_execute("UPDATE accounts SET balance = 7 WHERE id = 42")
        .await
        .unwrap();
    common::wait_until(Duration::from_secs(30), || async {
        on_broken
            .query_opt(
                "SELECT diverged FROM pgrelay.applied WHERE diverged LIKE '%accounts%is missing%'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    // The mark is written before the follower's state is published: wait for the metric.
    let up = format!("pgrelay_follower_up{{follower=\"{}\"}}", broken.name);
    common::wait_until(Duration::from_secs(10), || async {
        metric(&scrape(metrics).await, &up) == Some(0.0)
    })
    .await;
    assert_converged(info, std::slice::from_ref(healthy), &db, CONVERGE).await;
    // Fixed by hand: the row as the leader has it, and the mark cleared. It catches up.
    on_broken
        .batch_execute(
            "INSERT INTO accounts SELECT 42, 7, 'n42', 'ok'; \
             UPDATE pgrelay.applied SET diverged = NULL",
        )
        .await
        .unwrap();
    client
        .batch_execute("UPDATE accounts SET balance = 8 WHERE id = 42")
        .await
        .unwrap();
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    common::wait_until(Duration::from_secs(30), || async {
        metric(&scrape(metrics).await, &up) == Some(1.0)
    })
    .await;
}

/// While a bootstrap copies, the follower's table gauges say how many tables it copies and how
/// many it has done; once it finished they read 0 again. One table's copy is held up on
/// purpose (a trigger that fires in replica mode too waits while the test keeps a connection
/// named `pgrelay-test-hold` open on the follower), so the middle of the copy can be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_gauges_count_tables_while_copying_and_read_zero_after() {
    const HOLD: &str = "pgrelay-test-hold";
    let info = row_cluster();
    let db = leader_database(&info.leader, "progress").await;
    connect_direct(&info.leader, &db)
        .await
        .batch_execute(&format!(
            "CREATE TABLE quick (id int PRIMARY KEY);
             INSERT INTO quick SELECT generate_series(1, 100);
             CREATE TABLE held (id int PRIMARY KEY);
             CREATE FUNCTION wait_for_release() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 LOOP
                     PERFORM pg_stat_clear_snapshot();
                     EXIT WHEN NOT EXISTS
                         (SELECT 1 FROM pg_stat_activity WHERE application_name = '{HOLD}');
                     PERFORM pg_sleep(0.02);
                 END LOOP;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER held_wait BEFORE INSERT ON held
                 FOR EACH ROW EXECUTE FUNCTION wait_for_release();
             ALTER TABLE held ENABLE ALWAYS TRIGGER held_wait;
             INSERT INTO held VALUES (1);"
        ))
        .await
        .unwrap();
    let mut holds = Vec::new();
    for f in &info.followers {
        let conninfo = format!(
            "{} application_name={HOLD}",
            common::direct_conn_string(f, "postgres")
        );
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap();
        holds.push((client, tokio::spawn(conn)));
    }
    let (_, metrics) = start_proxy_with_metrics(row_config(info, &db, "")).await;
    let gauges = |text: &str, f: &str| {
        let l = format!("follower=\"{f}\"");
        (
            metric(text, &format!("pgrelay_bootstrap_tables{{{l}}}")),
            metric(text, &format!("pgrelay_bootstrap_tables_copied{{{l}}}")),
        )
    };
    // Both tables to copy; `quick` is done, `held` waits.
    common::wait_until(Duration::from_secs(60), || async {
        let text = scrape(metrics).await;
        info.followers
            .iter()
            .all(|f| gauges(&text, &f.name) == (Some(2.0), Some(1.0)))
    })
    .await;
    for f in &info.followers {
        assert_eq!(common::row::applied(f, &db).await, None, "still copying");
    }
    for (client, conn) in holds {
        drop(client);
        conn.await.unwrap().unwrap();
    }
    wait_bootstrapped(info, &db).await;
    let text = scrape(metrics).await;
    for f in &info.followers {
        assert_eq!(gauges(&text, &f.name), (Some(0.0), Some(0.0)), "{text}");
        let l = format!("follower=\"{}\"", f.name);
        assert_eq!(
            metric(&text, &format!("pgrelay_bootstrap_rows_total{{{l}}}")),
            Some(101.0)
        );
        let held: i64 = value_on(f, &db, "SELECT count(*) FROM held").await;
        assert_eq!(held, 1);
    }
}
