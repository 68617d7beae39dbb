//! Row mode puts DDL into the leader's WAL as `pgrelay.ddl` logical messages, where the
//! followers' applier finds it. Each test reads what an applier would see through a
//! `test_decoding` slot on its own database, and what the client saw on the wire.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::raw::Raw;
use common::*;
use pgrelay::cluster::NodeInfo;
use pgrelay::protocol::backend::{all_error_fields, parse_command_complete};
use pgrelay::protocol::codec::{put_cstr, write_message, Frame};
use pgrelay::protocol::frontend as fe;

/// The schemas a DDL message of a new session names: what `"$user", public` resolves to on
/// the leader (the role before them is checked and left out by [`Slot::changes`]).
const PATH: &str = "public";

/// The row-mode cluster (empty followers that pgrelay fills) and one pgrelay that replicates
/// every database of it: the DDL these tests send reaches the followers too.
fn rc() -> &'static ClusterInfo {
    common::row::row_cluster()
}

async fn row_proxy() -> SocketAddr {
    row_proxy_and_metrics().await.0
}

/// [`row_proxy`] and where its metrics are served.
async fn row_proxy_and_metrics() -> (SocketAddr, SocketAddr) {
    static PROXY: tokio::sync::OnceCell<(SocketAddr, SocketAddr)> =
        tokio::sync::OnceCell::const_new();
    *PROXY
        .get_or_init(|| async {
            let info = rc();
            start_proxy_with_metrics(proxy_config(
                &info.leader,
                &info.followers,
                "\n[replication]\nmode = \"row\"\n",
            ))
            .await
        })
        .await
}

/// A database of its own on the row cluster's leader (pgrelay creates it on the followers).
async fn row_db(prefix: &str) -> String {
    common::row::leader_database(&rc().leader, prefix).await
}

/// A logical slot on the leader that decodes one test database with `test_decoding`.
struct Slot {
    name: String,
    client: tokio_postgres::Client,
}

impl Slot {
    async fn create(leader: &NodeInfo, db: &str) -> Slot {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{db}_slot_{}", N.fetch_add(1, Ordering::Relaxed));
        let client = connect_direct(leader, db).await;
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&name],
            )
            .await
            .unwrap();
        Slot { name, client }
    }

    /// Everything decoded since the last call: DDL messages as `ddl(<transactional>): <content>`,
    /// row changes and transaction boundaries as test_decoding prints them, without
    /// transactions that hold nothing (catalog changes only).
    async fn changes(&self) -> Vec<String> {
        let rows = self
            .client
            .query(
                "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL, \
                 'include-xids', '0')",
                &[&self.name],
            )
            .await
            .unwrap();
        let mut out: Vec<String> = Vec::new();
        for data in rows.iter().map(|r| r.get::<_, String>(0)) {
            if data == "COMMIT" && out.last().is_some_and(|l| l == "BEGIN") {
                out.pop();
            } else {
                out.push(data);
            }
        }
        out.into_iter()
            .map(|data| match data.strip_prefix("message: transactional: ") {
                Some(rest) => {
                    let (transactional, rest) = rest.split_once(' ').unwrap();
                    let content = rest.split_once("content:").unwrap().1;
                    assert!(rest.starts_with("prefix: pgrelay.ddl,"), "{data}");
                    // Signed, for the role the test's client logged in as, which ran it.
                    let mut parts = content.splitn(5, '\n');
                    let (version, signature, login, role) = (
                        parts.next().unwrap(),
                        parts.next().unwrap(),
                        parts.next().unwrap(),
                        parts.next().unwrap(),
                    );
                    assert_eq!(version, "v2", "{data}");
                    assert!(
                        signature.len() == 64 && signature.bytes().all(|b| b.is_ascii_hexdigit()),
                        "{data}"
                    );
                    assert!([SUPERUSER, TRUST_USER].contains(&login), "{data}");
                    assert_eq!(role, login, "{data}");
                    format!("ddl({transactional}): {}", parts.next().unwrap())
                }
                None => data,
            })
            .collect()
    }

    async fn drop(self) {
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&self.name])
            .await
            .unwrap();
    }
}

/// A transactional DDL message as [`Slot::changes`] shows it.
fn ddl(statement: &str) -> String {
    format!("ddl(1): {PATH}\n{statement}")
}

/// The DDL messages among the changes.
fn ddl_only(changes: &[String]) -> Vec<&str> {
    changes
        .iter()
        .filter(|c| c.starts_with("ddl("))
        .map(String::as_str)
        .collect()
}

/// Sends a simple query and returns every reply up to ReadyForQuery.
async fn simple(raw: &mut Raw, sql: &str) -> Vec<Frame> {
    let mut out = BytesMut::new();
    fe::query(&mut out, sql);
    raw.send(&out).await;
    raw.until(b'Z').await
}

/// Parse, Bind, Execute and Sync of one statement without parameters.
async fn extended(raw: &mut Raw, sql: &str) -> Vec<Frame> {
    let mut out = BytesMut::new();
    fe::parse(&mut out, "", sql, &[]);
    write_message(&mut out, b'B', |b| {
        put_cstr(b, b"");
        put_cstr(b, b"");
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    write_message(&mut out, b'E', |b| {
        put_cstr(b, b"");
        b.put_i32(0);
    });
    fe::sync(&mut out);
    raw.send(&out).await;
    raw.until(b'Z').await
}

/// The command tags among the replies.
fn tags(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.tag() == b'C')
        .map(|f| parse_command_complete(&f.body()).unwrap().to_owned())
        .collect()
}

/// The fields of the first ErrorResponse (or NoticeResponse, with `tag`) among the replies.
fn report(frames: &[Frame], tag: u8) -> Vec<(char, String)> {
    let f = frames
        .iter()
        .find(|f| f.tag() == tag)
        .unwrap_or_else(|| panic!("no '{}' in {frames:?}", char::from(tag)));
    all_error_fields(&f.body())
        .unwrap()
        .into_iter()
        .map(|(k, v)| (char::from(k), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

fn field(fields: &[(char, String)], kind: char) -> Option<&str> {
    fields
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn simple_queries_put_ddl_into_the_wal_before_the_rows_that_need_it() {
    let db = row_db("rowddl_simple").await;
    let slot = Slot::create(&rc().leader, &db).await;
    let mut raw = Raw::login(row_proxy().await, &db).await;
    let create = "CREATE TABLE a (id int PRIMARY KEY)";
    let alter = "ALTER TABLE a ADD COLUMN c int";
    assert_eq!(
        tags(&simple(&mut raw, &format!("{create};")).await),
        ["CREATE TABLE"]
    );
    assert_eq!(tags(&simple(&mut raw, alter).await), ["ALTER TABLE"]);
    assert_eq!(
        tags(&simple(&mut raw, "INSERT INTO a VALUES (1, 2)").await),
        ["INSERT 0 1"]
    );
    assert_eq!(
        slot.changes().await,
        [
            "BEGIN".to_owned(),
            ddl(create),
            "COMMIT".to_owned(),
            "BEGIN".to_owned(),
            ddl(alter),
            "COMMIT".to_owned(),
            "BEGIN".to_owned(),
            "table public.a: INSERT: id[integer]:1 c[integer]:2".to_owned(),
            "COMMIT".to_owned(),
        ]
    );
    slot.drop().await;
}

#[tokio::test]
async fn extended_protocol_ddl_is_replicated_with_its_own_tag() {
    let db = row_db("rowddl_ext").await;
    let slot = Slot::create(&rc().leader, &db).await;
    let proxy = row_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    client
        .execute("CREATE TABLE b (id int)", &[])
        .await
        .unwrap();
    client
        .execute("ALTER TABLE b ADD COLUMN c text", &[])
        .await
        .unwrap();
    client
        .execute("INSERT INTO b VALUES ($1, $2)", &[&1i32, &"x"])
        .await
        .unwrap();
    // A prepared DDL statement is replicated each time it runs.
    let add = client
        .prepare("ALTER TABLE b ADD COLUMN IF NOT EXISTS d int")
        .await
        .unwrap();
    client.execute(&add, &[]).await.unwrap();
    client.execute(&add, &[]).await.unwrap();
    let mut raw = Raw::login(proxy, &db).await;
    let replies = extended(&mut raw, "COMMENT ON TABLE b IS 'bee'").await;
    assert_eq!(tags(&replies), ["COMMENT"]);
    let changes = slot.changes().await;
    let add_text = "ALTER TABLE b ADD COLUMN IF NOT EXISTS d int";
    assert_eq!(
        ddl_only(&changes),
        [
            ddl("CREATE TABLE b (id int)"),
            ddl("ALTER TABLE b ADD COLUMN c text"),
            ddl(add_text),
            ddl(add_text),
            ddl("COMMENT ON TABLE b IS 'bee'"),
        ]
    );
    let alter_at = changes
        .iter()
        .position(|c| *c == ddl("ALTER TABLE b ADD COLUMN c text"))
        .unwrap();
    let insert_at = changes
        .iter()
        .position(|c| c == "table public.b: INSERT: id[integer]:1 c[text]:'x'")
        .unwrap_or_else(|| panic!("{changes:?}"));
    assert!(alter_at < insert_at, "{changes:?}");
    slot.drop().await;
}

#[tokio::test]
async fn ddl_that_does_not_commit_emits_nothing() {
    let db = row_db("rowddl_rollback").await;
    let slot = Slot::create(&rc().leader, &db).await;
    let mut raw = Raw::login(row_proxy().await, &db).await;
    simple(&mut raw, "BEGIN").await;
    assert_eq!(
        tags(&simple(&mut raw, "CREATE TABLE r (a int)").await),
        ["CREATE TABLE"]
    );
    simple(&mut raw, "ROLLBACK").await;
    // A multi-statement query is one transaction: the failing statement undoes the first.
    let replies = simple(&mut raw, "CREATE TABLE r2 (a int); CREATE TABLE r2 (a int)").await;
    assert_eq!(field(&report(&replies, b'E'), 'C'), Some("42P07"));
    simple(&mut raw, "CREATE TABLE kept (a int)").await;
    assert_eq!(
        ddl_only(&slot.changes().await),
        [ddl("CREATE TABLE kept (a int)")]
    );
    slot.drop().await;
}

#[tokio::test]
async fn a_query_string_emits_only_its_ddl_statements() {
    let db = row_db("rowddl_multi").await;
    let slot = Slot::create(&rc().leader, &db).await;
    let mut raw = Raw::login(row_proxy().await, &db).await;
    let replies = simple(
        &mut raw,
        "CREATE TABLE m (a int); INSERT INTO m VALUES (1);\n\
         ALTER TABLE m ADD COLUMN b int; INSERT INTO m VALUES (2, 3)",
    )
    .await;
    assert_eq!(
        tags(&replies),
        ["CREATE TABLE", "INSERT 0 1", "ALTER TABLE", "INSERT 0 1"]
    );
    assert_eq!(
        slot.changes().await,
        [
            "BEGIN".to_owned(),
            ddl("CREATE TABLE m (a int)"),
            "table public.m: INSERT: a[integer]:1".to_owned(),
            ddl("ALTER TABLE m ADD COLUMN b int"),
            "table public.m: INSERT: a[integer]:2 b[integer]:3".to_owned(),
            "COMMIT".to_owned(),
        ]
    );
    slot.drop().await;
}

#[tokio::test]
async fn concurrently_emits_after_success_only() {
    let db = row_db("rowddl_cic").await;
    let slot = Slot::create(&rc().leader, &db).await;
    let proxy = row_proxy().await;
    let mut raw = Raw::login(proxy, &db).await;
    simple(
        &mut raw,
        "CREATE TABLE c (a int); INSERT INTO c VALUES (1), (1)",
    )
    .await;
    slot.changes().await;
    let failed = simple(&mut raw, "CREATE UNIQUE INDEX CONCURRENTLY cu ON c (a)").await;
    assert_eq!(field(&report(&failed, b'E'), 'C'), Some("23505"));
    let cic = "CREATE INDEX CONCURRENTLY ci ON c (a)";
    assert_eq!(tags(&simple(&mut raw, cic).await), ["CREATE INDEX"]);
    // The message lands before whatever the session does next, even when the client sends
    // that without waiting.
    let mut out = BytesMut::new();
    fe::query(&mut out, "CREATE INDEX CONCURRENTLY cp ON c (a)");
    fe::query(&mut out, "INSERT INTO c VALUES (2)");
    raw.send(&out).await;
    assert_eq!(tags(&raw.until(b'Z').await), ["CREATE INDEX"]);
    assert_eq!(tags(&raw.until(b'Z').await), ["INSERT 0 1"]);
    // The extended protocol too.
    let client = connect_proxy(proxy, &db).await;
    let drop = "DROP INDEX CONCURRENTLY ci";
    client.execute(drop, &[]).await.unwrap();
    // tokio-postgres returns at CommandComplete; the session's next reply comes after the
    // message is written.
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        slot.changes().await,
        [
            format!("ddl(0): {PATH}\n{cic}"),
            format!("ddl(0): {PATH}\nCREATE INDEX CONCURRENTLY cp ON c (a)"),
            "BEGIN".to_owned(),
            "table public.c: INSERT: a[integer]:2".to_owned(),
            "COMMIT".to_owned(),
            format!("ddl(0): {PATH}\n{drop}"),
        ]
    );
    slot.drop().await;
}

#[tokio::test]
async fn ctas_and_select_into_are_refused_and_the_session_goes_on() {
    let db = row_db("rowddl_ctas").await;
    let slot = Slot::create(&rc().leader, &db).await;
    let proxy = row_proxy().await;
    let mut raw = Raw::login(proxy, &db).await;
    let refused = report(&simple(&mut raw, "CREATE TABLE x AS SELECT 1").await, b'E');
    assert_eq!(field(&refused, 'C'), Some("0A000"));
    assert!(field(&refused, 'M')
        .unwrap()
        .contains("CREATE TABLE ... AS"));
    assert!(field(&refused, 'H')
        .unwrap()
        .contains("INSERT INTO ... SELECT"));
    assert_eq!(field(&refused, 'W'), None, "{refused:?}");
    assert_eq!(tags(&simple(&mut raw, "SELECT 1").await), ["SELECT 1"]);
    let client = connect_proxy(proxy, &db).await;
    for sql in ["SELECT 1 INTO y", "CREATE TABLE z AS SELECT 1"] {
        let err = client.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}");
        let err = client.execute(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "0A000", "{sql}");
    }
    // With a parameter, which a DO block cannot take.
    let err = client
        .execute("CREATE TABLE w AS SELECT $1::int AS a", &[&1i32])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "0A000");
    assert!(error_message(&err).contains("CREATE TABLE ... AS"));
    // The refusal fails the transaction as a server error would: nothing of it commits.
    client
        .batch_execute("CREATE TABLE t (a int)")
        .await
        .unwrap();
    for refused in ["SELECT 1 INTO v", "CREATE TABLE v AS SELECT $1::int AS a"] {
        client.batch_execute("BEGIN").await.unwrap();
        client
            .execute("INSERT INTO t VALUES (1)", &[])
            .await
            .unwrap();
        let err = if refused.contains("$1") {
            client.execute(refused, &[&1i32]).await.unwrap_err()
        } else {
            client.execute(refused, &[]).await.unwrap_err()
        };
        assert_eq!(sqlstate(&err), "0A000");
        let err = client.execute("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "25P02", "the transaction is aborted");
        client.batch_execute("COMMIT").await.unwrap();
    }
    // Temporary tables are nobody else's business.
    client
        .batch_execute("CREATE TEMP TABLE tt AS SELECT 1 AS a; SELECT * INTO TEMP tu FROM tt")
        .await
        .unwrap();
    let leader = connect_direct(&rc().leader, &db).await;
    let row = leader
        .query_one(
            "SELECT (SELECT count(*) FROM t), to_regclass('x') IS NULL AND to_regclass('y') \
             IS NULL AND to_regclass('z') IS NULL AND to_regclass('w') IS NULL \
             AND to_regclass('v') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    assert!(row.get::<_, bool>(1), "no refused table exists");
    assert_eq!(
        ddl_only(&slot.changes().await),
        [ddl("CREATE TABLE t (a int)")]
    );
    slot.drop().await;
}

#[tokio::test]
async fn physical_mode_rewrites_nothing() {
    let db = new_database("rowddl_physical").await;
    let slot = Slot::create(&cluster().leader, &db).await;
    let client = connect_proxy(default_proxy().await, &db).await;
    client
        .batch_execute("CREATE TABLE p (a int); ALTER TABLE p ADD COLUMN b int")
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE q AS SELECT 1 AS a")
        .await
        .unwrap();
    client.execute("CREATE INDEX ON p (a)", &[]).await.unwrap();
    let changes = slot.changes().await;
    assert!(ddl_only(&changes).is_empty(), "{changes:?}");
    // The slot decodes this database: the CTAS rows are there.
    assert!(
        changes
            .iter()
            .any(|c| c == "table public.q: INSERT: a[integer]:1"),
        "{changes:?}"
    );
    slot.drop().await;
}

#[tokio::test]
async fn ddl_on_temporary_relations_stays_in_the_session() {
    let db = row_db("rowddl_temp").await;
    let slot = Slot::create(&rc().leader, &db).await;
    let mut raw = Raw::login(row_proxy().await, &db).await;
    simple(&mut raw, "CREATE TEMP TABLE tt (a int)").await;
    for sql in [
        "ALTER TABLE tt ADD COLUMN b int",
        "CREATE INDEX ON tt (a)",
        "COMMENT ON COLUMN tt.a IS 'temporary'",
        "CREATE VIEW tv AS SELECT * FROM tt",
        "DROP VIEW tv",
        "DROP TABLE tt",
    ] {
        let replies = simple(&mut raw, sql).await;
        assert!(
            !replies.iter().any(|f| f.tag() == b'E'),
            "{sql}: {replies:?}"
        );
    }
    simple(
        &mut raw,
        "CREATE TABLE tt (a int); ALTER TABLE tt ADD COLUMN b int",
    )
    .await;
    assert_eq!(
        ddl_only(&slot.changes().await),
        [
            ddl("CREATE TABLE tt (a int)"),
            ddl("ALTER TABLE tt ADD COLUMN b int"),
        ]
    );
    slot.drop().await;
}

#[tokio::test]
async fn dollar_quoted_bodies_are_replicated_verbatim() {
    let db = row_db("rowddl_dollar").await;
    let slot = Slot::create(&rc().leader, &db).await;
    let client = connect_proxy(row_proxy().await, &db).await;
    let function = "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $ddl$\nBEGIN\n  \
                    RETURN '$$ $pgrelay$ $ddl';\nEND\n$ddl$";
    client.batch_execute(function).await.unwrap();
    let value: String = client.query_one("SELECT f()", &[]).await.unwrap().get(0);
    assert_eq!(value, "$$ $pgrelay$ $ddl");
    // A SQL-standard body holds semicolons of its own.
    let atomic =
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END";
    let rows = client
        .simple_query(&format!("{atomic}; SELECT g()"))
        .await
        .unwrap();
    assert!(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("2"))));
    client
        .batch_execute("SET search_path = pg_catalog, public; CREATE SCHEMA s")
        .await
        .unwrap();
    assert_eq!(
        ddl_only(&slot.changes().await),
        [
            ddl(function),
            ddl(atomic),
            "ddl(1): pg_catalog, public\nCREATE SCHEMA s".to_owned(),
        ]
    );
    slot.drop().await;
}

#[tokio::test]
async fn errors_and_notices_read_as_the_servers_own() {
    let db = row_db("rowddl_errors").await;
    let proxy = row_proxy().await;
    let mut raw = Raw::login(proxy, &db).await;
    let err = report(
        &simple(&mut raw, "ALTER TABLE nosuch ADD COLUMN c int").await,
        b'E',
    );
    assert_eq!(field(&err, 'C'), Some("42P01"));
    assert_eq!(field(&err, 'M'), Some("relation \"nosuch\" does not exist"));
    assert_eq!(field(&err, 'W'), None, "{err:?}");
    let err = report(
        &simple(&mut raw, "ALTER TABLE nosuch\n  ADD COLUMN c int").await,
        b'E',
    );
    assert_eq!(field(&err, 'C'), Some("42P01"));
    assert_eq!(field(&err, 'W'), None, "{err:?}");
    // A syntax error points into the text the client sent.
    let sql = "SELECT 1;\nALTER TABLE nosuch ADD COLUMN c int int";
    let err = report(&simple(&mut raw, sql).await, b'E');
    assert_eq!(field(&err, 'C'), Some("42601"));
    let direct = connect_direct(&rc().leader, &db).await;
    let expected = direct.simple_query(sql).await.unwrap_err();
    let expected = match expected.as_db_error().unwrap().position() {
        Some(tokio_postgres::error::ErrorPosition::Original(p)) => p.to_string(),
        other => panic!("{other:?}"),
    };
    assert_eq!(field(&err, 'P'), Some(expected.as_str()), "{err:?}");
    assert_eq!(field(&err, 'q'), None);
    // Notices too.
    let replies = simple(&mut raw, "DROP TABLE IF EXISTS nosuch").await;
    let notice = report(&replies, b'N');
    assert_eq!(
        field(&notice, 'M'),
        Some("table \"nosuch\" does not exist, skipping")
    );
    assert_eq!(field(&notice, 'W'), None, "{notice:?}");
    assert_eq!(tags(&replies), ["DROP TABLE"]);
    // The same through the extended protocol.
    let err = report(
        &extended(&mut raw, "ALTER TABLE nosuch ADD COLUMN c int").await,
        b'E',
    );
    assert_eq!(field(&err, 'C'), Some("42P01"));
    assert_eq!(field(&err, 'W'), None, "{err:?}");
}

#[tokio::test]
async fn an_invalid_index_left_on_a_follower_is_built_again() {
    let info = rc();
    let db = row_db("rowddl_invalid").await;
    let proxy = row_proxy().await;
    common::row::wait_bootstrapped(info, &db).await;
    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("CREATE TABLE c (a int); INSERT INTO c VALUES (1), (2)")
        .await
        .unwrap();
    let count = "SELECT count(*) FROM c";
    // What an interrupted CREATE INDEX CONCURRENTLY leaves behind: an INVALID index of that
    // name (here from a unique build over a duplicate that is then removed).
    for f in &info.followers {
        wait_until(Duration::from_secs(30), || async {
            rows_or_none(f, &db, count).await == Some(2)
        })
        .await;
        let direct = connect_direct(f, &db).await;
        direct
            .batch_execute("INSERT INTO c VALUES (1)")
            .await
            .unwrap();
        let err = direct
            .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY cu ON c (a)")
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), "23505");
        direct
            .batch_execute("DELETE FROM c WHERE ctid = (SELECT max(ctid) FROM c WHERE a = 1)")
            .await
            .unwrap();
    }
    let valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = 'cu'::regclass";
    assert!(!common::row::value_on::<bool>(info.followers.first().unwrap(), &db, valid).await);
    client
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY cu ON c (a)")
        .await
        .unwrap();
    // A row written after it arrives after the index is settled.
    client
        .batch_execute("INSERT INTO c VALUES (3)")
        .await
        .unwrap();
    for f in &info.followers {
        wait_until(Duration::from_secs(30), || async {
            rows_or_none(f, &db, count).await == Some(3)
        })
        .await;
        assert!(
            common::row::value_on::<bool>(f, &db, valid).await,
            "the index on {} is valid",
            f.name
        );
    }
}

#[tokio::test]
async fn an_index_name_taken_by_another_relation_on_a_follower_is_an_apply_error() {
    let info = rc();
    let db = row_db("rowddl_taken").await;
    let (proxy, metrics) = row_proxy_and_metrics().await;
    common::row::wait_bootstrapped(info, &db).await;
    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("CREATE TABLE c (a int); INSERT INTO c VALUES (1)")
        .await
        .unwrap();
    let count = "SELECT count(*) FROM c";
    let errors = |f: &NodeInfo, text: &str| {
        metric(
            text,
            &format!("pgrelay_apply_errors_total{{follower=\"{}\"}}", f.name),
        )
        .unwrap_or(0.0)
    };
    let before = scrape(metrics).await;
    // On the followers only, a table holds the name the index is going to get.
    for f in &info.followers {
        wait_until(Duration::from_secs(30), || async {
            rows_or_none(f, &db, count).await == Some(1)
        })
        .await;
        connect_direct(f, &db)
            .await
            .batch_execute("CREATE TABLE ci (x int)")
            .await
            .unwrap();
    }
    client
        .batch_execute("CREATE INDEX CONCURRENTLY ci ON c (a)")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO c VALUES (2)")
        .await
        .unwrap();
    // Not taken as done: each follower reports it and stops there.
    for f in &info.followers {
        wait_until(Duration::from_secs(30), || async {
            errors(f, &scrape(metrics).await) > errors(f, &before)
        })
        .await;
        assert_eq!(common::row::value_on::<i64>(f, &db, count).await, 1);
    }
    // Once the follower is fixed, the retry builds the index and goes on.
    for f in &info.followers {
        connect_direct(f, &db)
            .await
            .batch_execute("DROP TABLE ci")
            .await
            .unwrap();
    }
    let index = "SELECT count(*) FROM pg_index WHERE indexrelid = 'ci'::regclass AND indisvalid";
    for f in &info.followers {
        wait_until(Duration::from_secs(60), || async {
            rows_or_none(f, &db, count).await == Some(2)
        })
        .await;
        assert_eq!(common::row::value_on::<i64>(f, &db, index).await, 1);
    }
}

/// `sql`'s single count on `node`, None while it fails (the table is not there yet: the
/// follower has not applied its DDL).
async fn rows_or_none(node: &pgrelay::cluster::NodeInfo, db: &str, sql: &str) -> Option<i64> {
    connect_direct(node, db)
        .await
        .query_one(sql, &[])
        .await
        .ok()
        .map(|r| r.get(0))
}
