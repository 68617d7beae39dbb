//! Routing through pgrelay, proven by what the servers say: `pg_is_in_recovery()` is true on a
//! streaming standby and false on the leader, and `inet_server_port()` names the server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;

use common::*;

async fn in_recovery(client: &tokio_postgres::Client, sql: &str) -> bool {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn autocommit_reads_go_to_followers_and_writes_to_the_leader() {
    let db = new_database("reads").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    assert!(
        in_recovery(&client, "SELECT pg_is_in_recovery()").await,
        "a follower serves an autocommit read"
    );
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let n = client
        .execute("INSERT INTO t VALUES (1, 'a')", &[])
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_transaction_that_wrote_stays_on_the_leader() {
    let db = new_database("txn").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    assert!(!in_recovery(&client, "SELECT pg_is_in_recovery()").await);
    // The row the transaction wrote is visible to it: same node, same transaction.
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    client.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn a_session_reads_its_own_writes_from_followers_that_have_them() {
    let db = new_database("ryw").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    assert!(in_recovery(&client, "SELECT pg_is_in_recovery()").await);
    client
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    for i in 0..50 {
        client
            .execute("INSERT INTO t VALUES ($1)", &[&i])
            .await
            .unwrap();
        let n: i64 = client
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, i64::from(i) + 1, "the session reads its own write");
    }
    // Once a follower replayed the session's last write, reads go there again.
    wait_until(std::time::Duration::from_secs(10), || async {
        in_recovery(&client, "SELECT pg_is_in_recovery()").await
    })
    .await;
    // Eventual consistency keeps sending reads to followers after a write.
    let eventual = common::proxy("[routing]\nconsistency = \"eventual\"\n").await;
    let client = connect_proxy(eventual, &db).await;
    client
        .execute("INSERT INTO t VALUES (100)", &[])
        .await
        .unwrap();
    assert!(in_recovery(&client, "SELECT pg_is_in_recovery()").await);
}

#[tokio::test]
async fn leader_consistency_sends_everything_to_the_leader() {
    let db = new_database("leader").await;
    let proxy = common::proxy("[routing]\nconsistency = \"leader\"\n").await;
    let client = connect_proxy(proxy, &db).await;
    assert!(!in_recovery(&client, "SELECT pg_is_in_recovery()").await);
}

#[tokio::test]
async fn statements_that_write_or_lock_reach_the_leader() {
    let db = new_database("writers").await;
    let proxy = default_proxy().await;
    let setup = connect_direct(&cluster().leader, &db).await;
    setup
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v int);
             INSERT INTO t SELECT g, g FROM generate_series(1, 10) g;
             CREATE SEQUENCE s;
             CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS 'UPDATE t SET v = v + 1 WHERE id = 1 RETURNING v';",
        )
        .await
        .unwrap();
    wait_replicated(&cluster().leader, &cluster().followers).await;
    // Each one runs in a fresh session (sessions that wrote read from the leader anyway), and
    // each would fail on a read-only standby, or reports where it ran.
    let cases = [
        "WITH d AS (DELETE FROM t WHERE id = 10 RETURNING *) SELECT pg_is_in_recovery() FROM (SELECT 1) x LEFT JOIN d ON true LIMIT 1",
        "SELECT pg_is_in_recovery() FROM t WHERE id = 1 FOR UPDATE",
        "SELECT pg_is_in_recovery() FROM t WHERE id = 1 FOR NO KEY UPDATE",
        "SELECT pg_is_in_recovery() FROM t WHERE id = 1 FOR SHARE",
        "SELECT pg_is_in_recovery() FROM t WHERE id = 1 FOR KEY SHARE",
        "SELECT pg_is_in_recovery() FROM (SELECT nextval('s')) x",
        "SELECT pg_is_in_recovery() FROM (SELECT setval('s', 5)) x",
        "SELECT pg_is_in_recovery() FROM (SELECT pg_advisory_xact_lock(1)) x",
        "SELECT pg_is_in_recovery() FROM (SELECT set_config('work_mem', '8MB', false)) x",
        "SELECT pg_is_in_recovery() FROM (SELECT txid_current()) x",
        "SELECT pg_is_in_recovery() FROM (SELECT bump()) x",
    ];
    for sql in cases {
        let client = connect_proxy(proxy, &db).await;
        let on_standby = client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get::<_, bool>(0);
        assert!(!on_standby, "{sql} ran on a follower");
    }
    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("SELECT * INTO t_copy FROM t")
        .await
        .unwrap();
    client
        .batch_execute("DO $$ BEGIN PERFORM 1; END $$")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; LOCK TABLE t; COMMIT")
        .await
        .unwrap();
    client
        .batch_execute("SELEC garbage")
        .await
        .expect_err("garbage is an error, from the leader");
}

#[tokio::test]
async fn a_read_only_transaction_may_use_a_follower() {
    let db = new_database("rotx").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert!(in_recovery(&client, "SELECT pg_is_in_recovery()").await);
    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    let again: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, again, "a transaction stays on one node");
    client.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn a_prepared_read_alternates_between_followers() {
    let db = new_database("prep").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    let stmt = client
        .prepare("SELECT inet_server_port(), pg_is_in_recovery()")
        .await
        .unwrap();
    let mut ports = HashSet::new();
    for _ in 0..20 {
        let row = client.query_one(&stmt, &[]).await.unwrap();
        assert!(row.get::<_, bool>(1));
        ports.insert(row.get::<_, i32>(0));
    }
    let followers: HashSet<i32> = cluster()
        .followers
        .iter()
        .map(|f| i32::from(f.port))
        .collect();
    assert_eq!(ports, followers, "both followers served the statement");
}

#[tokio::test]
async fn session_settings_follow_the_session_to_every_node() {
    let db = new_database("set").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    // Open connections to the followers first, so the SET must reach existing ones too.
    for _ in 0..4 {
        assert!(in_recovery(&client, "SELECT pg_is_in_recovery()").await);
    }
    client.batch_execute("SET work_mem = '7MB'").await.unwrap();
    client
        .batch_execute("SET application_name = 'relay-test'")
        .await
        .unwrap();
    client
        .batch_execute("SET LOCAL work_mem = '9MB'")
        .await
        .unwrap();
    for _ in 0..4 {
        let row = client
            .query_one(
                "SELECT current_setting('work_mem'), current_setting('application_name'), pg_is_in_recovery()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "7MB");
        assert_eq!(row.get::<_, String>(1), "relay-test");
        assert!(row.get::<_, bool>(2));
    }
    // A SET rolled back with its transaction does not follow.
    client
        .batch_execute("BEGIN; SET work_mem = '11MB'; ROLLBACK")
        .await
        .unwrap();
    client
        .batch_execute("RESET application_name")
        .await
        .unwrap();
    for _ in 0..4 {
        let row = client
            .query_one(
                "SELECT current_setting('work_mem'), current_setting('application_name')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "7MB");
        assert_eq!(row.get::<_, String>(1), "");
    }
    // SQL-level prepared statements exist wherever EXECUTE runs.
    client
        .batch_execute("PREPARE q AS SELECT pg_is_in_recovery()")
        .await
        .unwrap();
    for _ in 0..4 {
        let rows = client.simple_query("EXECUTE q").await.unwrap();
        assert!(rows.iter().any(
            |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("t"))
        ));
    }
}

#[tokio::test]
async fn temp_tables_and_listen_pin_the_session_to_the_leader() {
    let db = new_database("pin").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("CREATE TEMP TABLE scratch (id int)")
        .await
        .unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert!(!in_recovery(&client, "SELECT pg_is_in_recovery()").await);

    let client = connect_proxy(proxy, &db).await;
    client.batch_execute("LISTEN chan").await.unwrap();
    assert!(!in_recovery(&client, "SELECT pg_is_in_recovery()").await);

    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("DECLARE c CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g")
        .await
        .unwrap();
    let rows = client.simple_query("FETCH ALL FROM c").await.unwrap();
    let fetched = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(fetched, 3, "the cursor is where FETCH runs");
    assert!(!in_recovery(&client, "SELECT pg_is_in_recovery()").await);

    let client = connect_proxy(proxy, &db).await;
    client
        .query_one("SELECT pg_advisory_lock(42)", &[])
        .await
        .unwrap();
    assert!(!in_recovery(&client, "SELECT pg_is_in_recovery()").await);
}

#[tokio::test]
async fn a_function_created_through_pgrelay_that_writes_runs_on_the_leader() {
    let db = new_database("newfn").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    // Load the database's (empty) function list first, so the new function must be picked up.
    assert!(in_recovery(&client, "SELECT pg_is_in_recovery()").await);
    client
        .batch_execute(
            "CREATE TABLE log (id serial, at timestamptz DEFAULT now());
             CREATE FUNCTION note() RETURNS bigint LANGUAGE sql VOLATILE
               AS 'INSERT INTO log DEFAULT VALUES; SELECT count(*) FROM log';",
        )
        .await
        .unwrap();
    for session in [&client, &connect_proxy(proxy, &db).await] {
        let n: i64 = session
            .query_one("SELECT note()", &[])
            .await
            .expect("a writing function runs on the leader")
            .get(0);
        assert!(n >= 1);
    }
}
