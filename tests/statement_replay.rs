//! Statement mode's replayer end to end: log entries written by hand on the leader (as a
//! session will write them, in the same transaction as the data) are replayed on empty
//! followers that pgrelay bootstraps, and the followers converge to the leader's rows, through
//! restarts of pgrelay and of a follower; a statement that fails on a follower stops that
//! follower only.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::row::{
    assert_converged, leader_database, row_cluster, start_row_cluster, statement_applied,
    statement_config, value_on, ProxyProcess,
};
use common::{connect_direct, metric, scrape, start_proxy_with_metrics, ClusterInfo};
use pgrelay::cluster::{self, NodeInfo};
use pgrelay::replication::statement::log::{
    encode_copy_data, encode_settings, encode_statements, leader_setup_sql, Extended,
    LoggedStatement, ORDER_LOCK,
};

const CONVERGE: Duration = Duration::from_secs(60);

/// A fresh leader database with the statement log and `schema`.
async fn setup(info: &ClusterInfo, prefix: &str, schema: &str) -> String {
    let db = leader_database(&info.leader, prefix).await;
    let client = connect_direct(&info.leader, &db).await;
    client.batch_execute(&leader_setup_sql()).await.unwrap();
    // The test role is called pgrelay: without this, "$user" in the search path would put the
    // tables into pgrelay's own schema, which is not replicated.
    client
        .batch_execute(&format!("SET search_path = public; {schema}"))
        .await
        .unwrap();
    db
}

fn simple(sql: &str) -> LoggedStatement {
    LoggedStatement {
        sql: sql.into(),
        ..Default::default()
    }
}

/// One leader transaction as a session writes it: `data` runs, then the log entry for
/// `statements` goes in, with the values `pgrelay.*` functions produced. Returns its seq.
async fn log_tx(
    client: &mut tokio_postgres::Client,
    data: &str,
    settings: &[&str],
    statements: &[LoggedStatement],
    copy_data: &[Vec<u8>],
) -> i64 {
    let tx = client.transaction().await.unwrap();
    for s in settings {
        tx.batch_execute(s).await.unwrap();
    }
    tx.batch_execute(data).await.unwrap();
    tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({ORDER_LOCK})"))
        .await
        .unwrap();
    let settings: Vec<String> = settings.iter().map(|s| (*s).to_owned()).collect();
    let copy = (!copy_data.is_empty()).then(|| encode_copy_data(copy_data));
    let seq: i64 = tx
        .query_one(
            "INSERT INTO pgrelay.statement_log (seq, role, settings, statements, gen_values, copy_data) \
             VALUES (nextval('pgrelay.statement_seq'), session_user, $1::text::jsonb, $2::text::jsonb, \
             nullif(current_setting('pgrelay.values', true), ''), $3::text::bytea[]) RETURNING seq",
            &[&encode_settings(&settings), &encode_statements(statements), &copy],
        )
        .await
        .unwrap()
        .get(0);
    tx.commit().await.unwrap();
    seq
}

/// A transaction whose logged statement is the SQL that ran.
async fn log_sql(client: &mut tokio_postgres::Client, sql: &str) -> i64 {
    log_tx(client, sql, &[], &[simple(sql)], &[]).await
}

async fn wait_applied(followers: &[NodeInfo], db: &str, seq: i64) {
    for f in followers {
        common::wait_until(CONVERGE, || async {
            statement_applied(f, db).await.is_some_and(|s| s >= seq)
        })
        .await;
    }
}

const SCHEMA: &str = "
    CREATE TABLE items (id int PRIMARY KEY, name text, data bytea);
    CREATE TABLE audit (id bigserial PRIMARY KEY, item int, what text);
    CREATE FUNCTION audit_item() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO audit (item, what) VALUES (NEW.id, TG_OP); RETURN NEW; END $$;
    CREATE TRIGGER items_audit AFTER INSERT OR UPDATE ON items
        FOR EACH ROW EXECUTE FUNCTION audit_item();
    CREATE TABLE keyless (v int, note text);
    INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 500) g;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_then_simple_extended_and_copy_entries_converge() {
    let info = row_cluster();
    let db = setup(info, "sboot", SCHEMA).await;
    let mut client = connect_direct(&info.leader, &db).await;
    // Logged before pgrelay starts: inside the bootstrap's snapshot, so not replayed twice.
    let first = log_sql(&mut client, "INSERT INTO items VALUES (1001, 'before')").await;
    let (_addr, metrics) = start_proxy_with_metrics(statement_config(
        info,
        &db,
        "[statement]\nlog_retention = \"0s\"\n",
    ))
    .await;
    wait_applied(&info.followers, &db, first).await;
    assert_converged(info, &info.followers, &db, CONVERGE).await;

    // Simple protocol, several statements in one string; triggers run on the follower too.
    log_sql(
        &mut client,
        "INSERT INTO items VALUES (1002, 'a'); UPDATE items SET name = 'renamed' WHERE id <= 10",
    )
    .await;
    // Extended protocol: a text parameter, a binary one (int4 42) and a NULL.
    log_tx(
        &mut client,
        "INSERT INTO items VALUES (42000, 'ext', NULL)",
        &[],
        &[LoggedStatement {
            sql: "INSERT INTO items VALUES ($1 * 1000, $2, $3)".into(),
            extended: Some(Extended {
                types: vec![23, 25, 17],
                formats: vec![1, 0, 0],
                params: vec![Some(vec![0, 0, 0, 42]), Some(b"ext".to_vec()), None],
            }),
            copy: None,
        }],
        &[],
    )
    .await;
    // COPY ... FROM STDIN with its data, next to a plain statement.
    log_tx(
        &mut client,
        "INSERT INTO items VALUES (2001, 'copied', '\\x00ff'), (2002, E'tab\\there', NULL); \
         INSERT INTO keyless VALUES (1, 'after copy')",
        &[],
        &[
            LoggedStatement {
                sql: "COPY items FROM STDIN".into(),
                extended: None,
                copy: Some(1),
            },
            simple("INSERT INTO keyless VALUES (1, 'after copy')"),
        ],
        &[b"2001\tcopied\t\\\\x00ff\n2002\ttab\\there\t\\N\n".to_vec()],
    )
    .await;
    let last = log_sql(
        &mut client,
        "DELETE FROM items WHERE id BETWEEN 400 AND 450",
    )
    .await;
    wait_applied(&info.followers, &db, last).await;
    assert_converged(info, &info.followers, &db, CONVERGE).await;

    let text = scrape(metrics).await;
    for f in &info.followers {
        let l = format!("{{follower=\"{}\"}}", f.name);
        assert!(metric(&text, &format!("pgrelay_bootstrap_rows_total{l}")).unwrap() >= 500.0);
        assert!(metric(&text, &format!("pgrelay_apply_transactions_total{l}")).unwrap() >= 4.0);
        assert_eq!(
            metric(&text, &format!("pgrelay_follower_up{l}")),
            Some(1.0),
            "{text}"
        );
        assert!(
            metric(&text, &format!("pgrelay_statement_log_backlog{l}")).is_some(),
            "{text}"
        );
    }
    // Every follower applied everything, and retention is 0s: the log empties.
    let leader = connect_direct(&info.leader, &db).await;
    common::wait_until(CONVERGE, || async {
        let n: i64 = leader
            .query_one("SELECT count(*) FROM pgrelay.statement_log", &[])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_values_replay_as_the_leader_recorded_them() {
    let info = row_cluster();
    let db = setup(
        info,
        "sgen",
        "CREATE SEQUENCE ids START 100;
         CREATE TABLE gen (id bigint PRIMARY KEY, r float8, u uuid, at timestamptz);",
    )
    .await;
    let (_addr, _metrics) = start_proxy_with_metrics(statement_config(info, &db, "")).await;
    common::wait_until(CONVERGE, || async {
        statement_applied(&info.followers[0], &db).await.is_some()
            && statement_applied(&info.followers[1], &db).await.is_some()
    })
    .await;
    let mut client = connect_direct(&info.leader, &db).await;
    let sql = "INSERT INTO gen VALUES (pgrelay.nextval('ids'), pgrelay.random(), pgrelay.uuid(), \
               pgrelay.now()), (pgrelay.nextval('ids'), pgrelay.random(), pgrelay.uuid(), pgrelay.now())";
    let mut last = 0;
    for _ in 0..3 {
        last = log_tx(
            &mut client,
            sql,
            &["SET LOCAL pgrelay.now = '2001-02-03 04:05:06+00'"],
            &[simple(sql)],
            &[],
        )
        .await;
    }
    wait_applied(&info.followers, &db, last).await;
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    let leader_seq: i64 = value_on(&info.leader, &db, "SELECT last_value FROM ids").await;
    assert_eq!(leader_seq, 105);
    for f in &info.followers {
        let seq: i64 = value_on(f, &db, "SELECT last_value FROM ids").await;
        assert_eq!(seq, leader_seq, "the sequence moved on {}", f.name);
        let at: i64 = value_on(
            f,
            &db,
            "SELECT count(*) FROM gen WHERE at = '2001-02-03 04:05:06+00'",
        )
        .await;
        assert_eq!(at, 6, "pgrelay.now() on {}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_that_fails_on_a_follower_stops_only_that_follower() {
    let info = row_cluster();
    let db = setup(info, "sdiv", SCHEMA).await;
    let (_addr, metrics) = start_proxy_with_metrics(statement_config(info, &db, "")).await;
    common::wait_until(CONVERGE, || async {
        statement_applied(&info.followers[0], &db).await.is_some()
            && statement_applied(&info.followers[1], &db).await.is_some()
    })
    .await;
    let broken = &info.followers[0];
    let healthy = &info.followers[1];
    // Someone writes on the follower by hand; the leader then inserts the same key.
    let on_broken = connect_direct(broken, &db).await;
    on_broken
        .batch_execute("INSERT INTO items VALUES (7000, 'by hand')")
        .await
        .unwrap();
    let mut client = connect_direct(&info.leader, &db).await;
    let failing = log_sql(&mut client, "INSERT INTO items VALUES (7000, 'leader')").await;
    let after = log_sql(&mut client, "INSERT INTO items VALUES (7001, 'after')").await;
    let pattern = format!("%seq {failing}%duplicate key%");
    common::wait_until(CONVERGE, || async {
        on_broken
            .query_opt(
                "SELECT 1 FROM pgrelay.applied WHERE diverged LIKE $1",
                &[&pattern],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    assert_eq!(statement_applied(broken, &db).await, Some(failing - 1));
    wait_applied(std::slice::from_ref(healthy), &db, after).await;
    assert_converged(info, std::slice::from_ref(healthy), &db, CONVERGE).await;
    let text = scrape(metrics).await;
    let l = format!("{{follower=\"{}\"}}", broken.name);
    assert_eq!(metric(&text, &format!("pgrelay_follower_up{l}")), Some(0.0));
    assert!(metric(&text, &format!("pgrelay_apply_errors_total{l}")).unwrap() >= 1.0);
    // Fixed by hand: the stray row goes, the mark is cleared; it catches up.
    on_broken
        .batch_execute(
            "DELETE FROM items WHERE id = 7000; DELETE FROM audit WHERE item = 7000; \
             UPDATE pgrelay.applied SET diverged = NULL",
        )
        .await
        .unwrap();
    wait_applied(std::slice::from_ref(broken), &db, after).await;
    // The audit rows' ids come from each node's own sequence: the hand-made insert used one
    // on the broken follower, so compare the items only.
    let items_leader = common::row::digests(&info.leader, &db, &["items".to_owned()]).await;
    let items_broken = common::row::digests(broken, &db, &["items".to_owned()]).await;
    assert_eq!(items_leader, items_broken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgrelay_restarted_and_a_second_pgrelay_apply_nothing_twice() {
    let info = row_cluster();
    let db = setup(info, "srestart", "CREATE TABLE keyless (v int, note text);").await;
    let dir = cluster::test_dir("stmtrestart");
    std::fs::create_dir_all(&dir).unwrap();
    let config = statement_config(info, &db, "");
    let mut first = ProxyProcess::start(&config, &dir, "first");
    // A second process on the same databases: it only follows the position the first records.
    let mut second = ProxyProcess::start(&config, &dir, "second");
    let mut client = connect_direct(&info.leader, &db).await;
    // Many small transactions, the first process killed while it replays them.
    let mut last = 0;
    for i in 0..300 {
        last = log_sql(
            &mut client,
            &format!("INSERT INTO keyless VALUES ({i}, 'row')"),
        )
        .await;
        if i == 150 {
            // Whichever of the two replays, both serve the followers: the other one follows
            // the seq the followers record.
            for proxy in [&first, &second] {
                common::wait_until(CONVERGE, || async {
                    let text = scrape(proxy.metrics).await;
                    info.followers.iter().all(|f| {
                        let up = format!("pgrelay_follower_up{{follower=\"{}\"}}", f.name);
                        metric(&text, &up) == Some(1.0)
                    })
                })
                .await;
            }
            first.kill();
        }
    }
    wait_applied(&info.followers, &db, last).await;
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    second.kill();
    for i in 300..400 {
        last = log_sql(
            &mut client,
            &format!("INSERT INTO keyless VALUES ({i}, 'row')"),
        )
        .await;
    }
    let third = ProxyProcess::start(&config, &dir, "third");
    wait_applied(&info.followers, &db, last).await;
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    for f in &info.followers {
        let n: i64 = value_on(f, &db, "SELECT count(*) FROM keyless").await;
        assert_eq!(n, 400, "rows on {}", f.name);
    }
    drop(third);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_stopped_and_restarted_catches_up() {
    // Its own cluster: stopping a follower must not disturb the other tests.
    let mut cluster = start_row_cluster(2, "stmtdown");
    let info = ClusterInfo {
        leader: cluster.leader().clone(),
        followers: cluster.followers().to_vec(),
        bin_dir: cluster.bin_dir().to_path_buf(),
    };
    let db = setup(&info, "sdown", SCHEMA).await;
    let proxy = common::start_running_proxy(statement_config(&info, &db, "")).await;
    let metrics = proxy.metrics_addr.unwrap();
    let mut client = connect_direct(&info.leader, &db).await;
    let seq = log_sql(&mut client, "UPDATE items SET name = 'one' WHERE id = 1").await;
    wait_applied(&info.followers, &db, seq).await;
    let stopped = info.followers[1].name.clone();
    cluster.stop_node(&stopped).unwrap();
    let up = format!("pgrelay_follower_up{{follower=\"{stopped}\"}}");
    common::wait_until(CONVERGE, || async {
        metric(&scrape(metrics).await, &up) == Some(0.0)
    })
    .await;
    let mut last = 0;
    for i in 0..100 {
        last = log_sql(
            &mut client,
            &format!("INSERT INTO items VALUES ({}, 'while down')", 10_000 + i),
        )
        .await;
    }
    wait_applied(&info.followers[..1], &db, last).await;
    let backlog = format!("pgrelay_statement_log_backlog{{follower=\"{stopped}\"}}");
    cluster.start_node(&stopped).unwrap();
    wait_applied(&info.followers, &db, last).await;
    assert_converged(&info, &info.followers, &db, CONVERGE).await;
    common::wait_until(CONVERGE, || async {
        let text = scrape(metrics).await;
        metric(&text, &up) == Some(1.0) && metric(&text, &backlog) == Some(0.0)
    })
    .await;
    proxy.stop().await;
    cluster.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_logged_while_the_bootstrap_runs_are_applied_once() {
    let info = row_cluster();
    let db = setup(
        info,
        "sbusy",
        "CREATE TABLE keyless (v int, note text);
         CREATE TABLE big (id int PRIMARY KEY, pad text);
         INSERT INTO big SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g;",
    )
    .await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let (leader, db) = (info.leader.clone(), db.clone());
        tokio::spawn(async move {
            let mut client = connect_direct(&leader, &db).await;
            let (mut last, mut n) = (0, 0);
            while !*stop_rx.borrow() || n < 50 {
                last = log_sql(
                    &mut client,
                    &format!("INSERT INTO keyless VALUES ({n}, 'busy')"),
                )
                .await;
                n += 1;
            }
            (last, n)
        })
    };
    let (_addr, _metrics) = start_proxy_with_metrics(statement_config(info, &db, "")).await;
    common::wait_until(CONVERGE, || async {
        statement_applied(&info.followers[0], &db).await.is_some()
            && statement_applied(&info.followers[1], &db).await.is_some()
    })
    .await;
    stop_tx.send(true).unwrap();
    let (last, n) = writer.await.unwrap();
    wait_applied(&info.followers, &db, last).await;
    assert_converged(info, &info.followers, &db, CONVERGE).await;
    for f in &info.followers {
        let rows: i64 = value_on(f, &db, "SELECT count(*) FROM keyless").await;
        assert_eq!(rows, n, "rows on {}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_grows_while_an_entry_waits_and_a_malformed_entry_stops_replay_until_it_goes() {
    let info = row_cluster();
    let db = setup(info, "slag", "CREATE TABLE t (id int PRIMARY KEY);").await;
    let (_addr, metrics) = start_proxy_with_metrics(statement_config(info, &db, "")).await;
    common::wait_until(CONVERGE, || async {
        statement_applied(&info.followers[0], &db).await.is_some()
            && statement_applied(&info.followers[1], &db).await.is_some()
    })
    .await;
    let mut client = connect_direct(&info.leader, &db).await;
    // A statement that is slow on the followers only: their lag grows while it runs.
    let slow = log_tx(
        &mut client,
        "INSERT INTO t VALUES (1)",
        &[],
        &[
            simple("INSERT INTO t VALUES (1)"),
            simple("SELECT pg_sleep(2)"),
        ],
        &[],
    )
    .await;
    let lag = |f: &NodeInfo| format!("pgrelay_replication_lag_seconds{{follower=\"{}\"}}", f.name);
    common::wait_until(CONVERGE, || async {
        metric(&scrape(metrics).await, &lag(&info.followers[0])).unwrap_or(0.0) >= 1.0
    })
    .await;
    wait_applied(&info.followers, &db, slow).await;
    common::wait_until(CONVERGE, || async {
        let text = scrape(metrics).await;
        info.followers
            .iter()
            .all(|f| metric(&text, &lag(f)) == Some(0.0))
    })
    .await;

    // An entry pgrelay cannot read: replay stops before it, and goes on once it is deleted
    // (a gap in seq is normal: a transaction that took a seq and rolled back leaves one).
    let before = log_sql(&mut client, "INSERT INTO t VALUES (2)").await;
    let bad: i64 = client
        .query_one(
            "INSERT INTO pgrelay.statement_log (seq, role, settings, statements) \
             VALUES (nextval('pgrelay.statement_seq'), session_user, '[]', '[{\"bogus\": 1}]') \
             RETURNING seq",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let after = log_sql(&mut client, "INSERT INTO t VALUES (3)").await;
    wait_applied(&info.followers, &db, before).await;
    common::wait_until(CONVERGE, || async {
        let text = scrape(metrics).await;
        info.followers.iter().all(|f| {
            metric(
                &text,
                &format!("pgrelay_apply_errors_total{{follower=\"{}\"}}", f.name),
            )
            .unwrap_or(0.0)
                >= 1.0
        })
    })
    .await;
    for f in &info.followers {
        assert_eq!(
            statement_applied(f, &db).await,
            Some(before),
            "on {}",
            f.name
        );
    }
    client
        .execute("DELETE FROM pgrelay.statement_log WHERE seq = $1", &[&bad])
        .await
        .unwrap();
    wait_applied(&info.followers, &db, after).await;
    assert_converged(info, &info.followers, &db, CONVERGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_ahead_of_the_leaders_log_is_refused_with_what_to_do() {
    let info = row_cluster();
    let db = setup(info, "sahead", "CREATE TABLE t (id int PRIMARY KEY);").await;
    let dir = cluster::test_dir("stmtahead");
    std::fs::create_dir_all(&dir).unwrap();
    let config = statement_config(info, &db, "");
    let mut first = ProxyProcess::start(&config, &dir, "first");
    let mut client = connect_direct(&info.leader, &db).await;
    let mut last = 0;
    for i in 0..3 {
        last = log_sql(&mut client, &format!("INSERT INTO t VALUES ({i})")).await;
    }
    wait_applied(&info.followers, &db, last).await;
    first.kill();
    // The leader's log starts again from scratch (as after restoring an old backup).
    client
        .batch_execute(&format!(
            "DROP SCHEMA pgrelay CASCADE; {}",
            leader_setup_sql()
        ))
        .await
        .unwrap();
    let second = ProxyProcess::start(&config, &dir, "second");
    let log = dir.join("second.log");
    common::wait_until(CONVERGE, || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("but the leader's log only reaches 0")
    })
    .await;
    let text = scrape(second.metrics).await;
    for f in &info.followers {
        let up = format!("pgrelay_follower_up{{follower=\"{}\"}}", f.name);
        assert_eq!(metric(&text, &up), Some(0.0), "{text}");
    }
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}
