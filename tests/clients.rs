//! Real client programs and drivers work through pgrelay unchanged: psql, pgbench in every
//! query mode, tokio-postgres with the extended protocol and pipelining, COPY, NOTIFY, errors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::AsyncMessage;

use common::*;

#[tokio::test]
async fn scripted_psql_session() {
    let db = new_database("psql").await;
    let proxy = default_proxy().await;
    let script = r#"
\set ON_ERROR_STOP 0
CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);
INSERT INTO items (name) VALUES ('apple'), ('pear');
SELECT count(*) AS n FROM items \gset
\echo count=:n
COPY items (name) FROM STDIN;
plum
fig
\.
SELECT string_agg(name, ',' ORDER BY id) FROM items;
SELECT 1/0;
SELECT 'still here';
BEGIN; INSERT INTO items (name) VALUES ('kiwi'); SELECT count(*) FROM items; COMMIT;
COPY (SELECT name FROM items ORDER BY id) TO STDOUT;
\copy items (name) from stdin
grape
\.
SELECT count(*) FROM items;
"#;
    // The same script, once straight to the leader and once through pgrelay, in two fresh
    // databases: the outputs must be identical.
    let direct_db = new_database("psql_direct").await;
    let leader = cluster().leader.clone();
    let run = |port: u16, db: &str| {
        let mut child = pg_command("psql", proxy, db)
            .env("PGPORT", port.to_string())
            .args(["-X", "-At", "-v", "VERBOSITY=verbose"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (stdout, stderr) = run(proxy.port(), &db);
    let (direct_stdout, direct_stderr) = run(leader.port, &direct_db);
    assert_eq!(stdout, direct_stdout, "stderr through pgrelay: {stderr}");
    assert_eq!(
        stderr.replace(&db, "DB"),
        direct_stderr.replace(&direct_db, "DB")
    );
    assert!(stdout.contains("apple,pear,plum,fig\n"), "{stdout}");
    assert!(stdout.ends_with("6\n"), "{stdout}");
    assert!(
        stderr.contains("22012"),
        "the error keeps its SQLSTATE: {stderr}"
    );
}

#[tokio::test]
async fn extended_protocol_with_pipelining() {
    let db = new_database("pipeline").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO kv VALUES ($1, $2)")
        .await
        .unwrap();
    // tokio-postgres pipelines requests that are in flight together.
    let inserts = (0..200).map(|i| {
        let client = &client;
        let insert = &insert;
        async move { client.execute(insert, &[&i, &format!("v{i}")]).await }
    });
    let counts = try_join_all(inserts).await.unwrap();
    assert!(counts.iter().all(|&n| n == 1));
    let select = client
        .prepare("SELECT v FROM kv WHERE k = $1")
        .await
        .unwrap();
    let reads = (0..200).map(|i| {
        let client = &client;
        let select = &select;
        async move { client.query_one(select, &[&i]).await }
    });
    let rows = try_join_all(reads).await.unwrap();
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, String>(0), format!("v{i}"));
    }
    // Unnamed statements, binary results, NULLs.
    let row = client
        .query_one(
            "SELECT $1::int8 * 2, NULL::text, $2::bytea",
            &[&21i64, &vec![0u8, 1, 2]],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(row.get::<_, Vec<u8>>(2), vec![0u8, 1, 2]);
    // An error in the middle of a pipeline fails only its own statement.
    let bad = client.prepare("SELECT 1 / $1").await.unwrap();
    let (ok, err) = tokio::join!(
        client.query_one(&select, &[&1]),
        client.query_one(&bad, &[&0])
    );
    assert_eq!(ok.unwrap().get::<_, String>(0), "v1");
    assert_eq!(sqlstate(&err.unwrap_err()), "22012");
}

#[tokio::test]
async fn prepared_statements_survive_reads_on_any_node() {
    let db = new_database("prepared").await;
    let proxy = proxy("[routing]\nconsistency = \"eventual\"\n").await;
    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    // Eventual reads may go to a follower at once: let the table reach them first.
    let c = cluster();
    wait_replicated(&c.leader, &c.followers).await;
    // Prepared on one node, executed on all of them, closed, prepared again under a new body.
    for round in 0..3 {
        let read = client
            .prepare(&format!("SELECT {round} + count(*) FROM t"))
            .await
            .unwrap();
        let write = client.prepare("INSERT INTO t VALUES (1)").await.unwrap();
        for _ in 0..6 {
            client.query_one(&read, &[]).await.unwrap();
            client.execute(&write, &[]).await.unwrap();
        }
        drop(read);
        drop(write);
    }
}

#[tokio::test]
async fn copy_in_and_out_with_the_driver() {
    let db = new_database("copy").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    client
        .batch_execute("CREATE TABLE c (id int, name text)")
        .await
        .unwrap();
    let sink = client
        .copy_in("COPY c FROM STDIN WITH (FORMAT csv)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i},name {i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 10_000);
    let stream = client
        .copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT WITH (FORMAT csv)")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.map(|r| r.unwrap()).collect().await;
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let expected: usize = (0..10_000).map(|i| format!("{i},name {i}\n").len()).sum();
    assert_eq!(total, expected);
    // A failed COPY leaves the session usable.
    let sink = client.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&err), "22P02");
    let n: i64 = client
        .query_one("SELECT count(*) FROM c", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 10_000);
}

#[tokio::test]
async fn listen_notify_reaches_the_listener() {
    let db = new_database("notify").await;
    let proxy = default_proxy().await;
    let (listener, mut rx) = connect_proxy_with_messages(proxy, &db).await;
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let sender = connect_proxy(proxy, &db).await;
    sender.batch_execute("NOTIFY jobs, 'hello'").await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("notification within 10 s")
        .unwrap();
    let AsyncMessage::Notification(n) = message else {
        panic!("expected a notification, got {message:?}");
    };
    assert_eq!((n.channel(), n.payload()), ("jobs", "hello"));
}

#[tokio::test]
async fn node_errors_reach_the_client_unchanged() {
    let db = new_database("errors").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    let err = client
        .simple_query("SELECT nosuchcolumn FROM pg_class")
        .await
        .unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), "42703");
    assert!(db_err.position().is_some(), "position is kept");
    client
        .batch_execute("CREATE TABLE u (id int PRIMARY KEY)")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO u VALUES (1)")
        .await
        .unwrap();
    let err = client
        .batch_execute("INSERT INTO u VALUES (1)")
        .await
        .unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), "23505");
    assert!(db_err
        .detail()
        .unwrap_or_default()
        .contains("already exists"));
    // The session goes on, also after an error inside a transaction.
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute("SELECT 1/0").await.unwrap_err();
    let err = client.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02");
    client.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM u", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn md5_and_trust_users_log_in() {
    let db = new_database("auth").await;
    let proxy = default_proxy().await;
    for (user, password) in [(MD5_USER, "md5-pw"), (TRUST_USER, "whatever")] {
        let s = format!(
            "host={} port={} user={user} password={password} dbname={db}",
            proxy.ip(),
            proxy.port()
        );
        let (client, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
    }
    let s = format!(
        "host={} port={} user={MD5_USER} password=wrong dbname={db}",
        proxy.ip(),
        proxy.port()
    );
    let err = tokio_postgres::connect(&s, tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "28P01");
}

fn pgbench(proxy: std::net::SocketAddr, db: &str, args: &[&str]) -> String {
    let out = pg_command("pgbench", proxy, db)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pgbench {args:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

#[tokio::test]
async fn pgbench_in_every_query_mode() {
    let db = new_database("pgbench").await;
    let proxy = default_proxy().await;
    pgbench(proxy, &db, &["-i", "-s", "1", "-q"]);
    for mode in ["simple", "extended", "prepared"] {
        for script in [&[][..], &["-S"][..], &["-N"][..]] {
            let mut args = vec!["-M", mode, "-c", "4", "-j", "2", "-t", "200"];
            args.extend_from_slice(script);
            let started = Instant::now();
            let out = pgbench(proxy, &db, &args);
            assert!(
                out.contains("number of failed transactions: 0 (0.000%)"),
                "pgbench {args:?}: {out}"
            );
            assert!(
                out.contains("number of transactions actually processed: 800/800"),
                "pgbench {args:?}: {out}"
            );
            eprintln!("pgbench {args:?} took {:?}", started.elapsed());
        }
    }
    // Every committed transaction is on the leader: pgbench empties pgbench_history before each
    // run, and the last run (simple-update) adds one row per transaction.
    let leader = connect_direct(&cluster().leader, &db).await;
    let n: i64 = leader
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 800);
}

#[tokio::test]
async fn function_call_messages_are_answered() {
    let db = new_database("fastpath").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    let oid: u32 = client
        .query_one("SELECT 'abs(int4)'::regprocedure::oid", &[])
        .await
        .unwrap()
        .get(0);
    let mut raw = common::raw::Raw::login(proxy, &db).await;
    // FunctionCall: oid, argument formats (none: text), one argument "-5", result in text.
    let mut body = bytes::BytesMut::new();
    use bytes::BufMut;
    body.put_u32(oid);
    body.put_i16(0);
    body.put_i16(1);
    body.put_i32(2);
    body.put_slice(b"-5");
    body.put_i16(0);
    let frame = pgrelay::protocol::codec::Frame::new(b'F', &body);
    raw.send(frame.raw()).await;
    let replies = raw.until(b'Z').await;
    let result = replies
        .iter()
        .find(|f| f.tag() == b'V')
        .expect("FunctionCallResponse");
    assert_eq!(&result.body()[..], b"\0\0\0\x015");
}

/// Tags of the replies up to and including the first one with tag `until`.
async fn reply_tags(raw: &mut common::raw::Raw, until: u8) -> String {
    raw.until(until)
        .await
        .iter()
        .map(|f| char::from(f.tag()))
        .collect()
}

#[tokio::test]
async fn flush_before_sync_gets_replies_and_prepares_where_needed() {
    use bytes::BufMut;
    use pgrelay::protocol::codec::Frame;
    let db = new_database("flush").await;
    let proxy = common::proxy("[routing]\nconsistency = \"eventual\"\n").await;
    let mut raw = common::raw::Raw::login(proxy, &db).await;
    let msg = |tag: u8, fill: &dyn Fn(&mut bytes::BytesMut)| {
        let mut body = bytes::BytesMut::new();
        fill(&mut body);
        Frame::new(tag, &body).into_raw()
    };
    let parse = msg(b'P', &|b| {
        b.put_slice(b"s1\0SELECT inet_server_port()\0");
        b.put_i16(0);
    });
    let bind = msg(b'B', &|b| {
        b.put_slice(b"\0s1\0");
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    let execute = msg(b'E', &|b| {
        b.put_slice(b"\0");
        b.put_i32(0);
    });
    let flush = msg(b'H', &|_| {});
    let sync = msg(b'S', &|_| {});
    raw.send(&[parse, sync.clone()].concat()).await;
    assert_eq!(reply_tags(&mut raw, b'Z').await, "1Z");
    // Each unit may land on another follower, where s1 must be prepared first; the client sees
    // exactly the replies to what it sent, the first part before it sends the Sync.
    let mut ports = std::collections::HashSet::new();
    for _ in 0..6 {
        raw.send(&[bind.clone(), execute.clone(), flush.clone()].concat())
            .await;
        let replies = raw.until(b'C').await;
        let tags: String = replies.iter().map(|f| char::from(f.tag())).collect();
        assert_eq!(tags, "2DC");
        ports.insert(replies[1].body().to_vec());
        raw.send(&sync).await;
        assert_eq!(reply_tags(&mut raw, b'Z').await, "Z");
    }
    assert_eq!(ports.len(), 2, "both followers ran the statement");
}

#[tokio::test]
async fn a_long_pipeline_without_sync_streams_instead_of_piling_up() {
    use bytes::BufMut;
    use pgrelay::protocol::codec::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = new_database("bigpipe").await;
    let proxy = default_proxy().await;
    let mut raw = common::raw::Raw::login(proxy, &db).await;
    let parse = {
        let mut b = bytes::BytesMut::new();
        b.put_slice(b"big\0SELECT repeat('x', 100)\0");
        b.put_i16(0);
        Frame::new(b'P', &b).into_raw()
    };
    raw.send(&[parse, Frame::new(b'S', b"").into_raw()].concat())
        .await;
    assert_eq!(reply_tags(&mut raw, b'Z').await, "1Z");
    // 2 MiB of Bind + Execute and no Sync: Postgres answers as messages arrive, so must pgrelay.
    let mut batch = bytes::BytesMut::new();
    let bind = {
        let mut b = bytes::BytesMut::new();
        b.put_slice(b"\0big\0");
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
        Frame::new(b'B', &b).into_raw()
    };
    let execute = Frame::new(b'E', b"\0\0\0\0\0").into_raw();
    while batch.len() < 2 << 20 {
        batch.put_slice(&bind);
        batch.put_slice(&execute);
    }
    let pairs = batch.len() / (bind.len() + execute.len());
    let (mut reader, mut writer) = raw.stream.into_split();
    let write = tokio::spawn(async move {
        writer.write_all(&batch).await.unwrap();
        writer
    });
    // Rows arrive while the client has not sent a Sync.
    let mut rest = bytes::BytesMut::new();
    let (mut completes, mut rows, mut ready) = (0usize, 0usize, false);
    let read_some =
        |rest: &mut bytes::BytesMut, completes: &mut usize, rows: &mut usize, ready: &mut bool| {
            while let Some(f) = pgrelay::protocol::codec::decode_frame(rest, 1 << 30).unwrap() {
                match f.tag() {
                    b'C' => *completes += 1,
                    b'D' => *rows += 1,
                    b'Z' => *ready = true,
                    b'E' => panic!("error: {f:?}"),
                    _ => {}
                }
            }
        };
    while rows == 0 {
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            reader.read_buf(&mut rest),
        )
        .await
        .expect("rows arrive before the Sync")
        .unwrap();
        assert!(n > 0, "connection closed");
        read_some(&mut rest, &mut completes, &mut rows, &mut ready);
    }
    assert!(!ready);
    // Then the Sync ends it; every Execute was answered.
    let mut writer = write.await.unwrap();
    writer
        .write_all(&Frame::new(b'S', b"").into_raw())
        .await
        .unwrap();
    while !ready {
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            reader.read_buf(&mut rest),
        )
        .await
        .expect("the pipeline finishes")
        .unwrap();
        assert!(n > 0, "connection closed");
        read_some(&mut rest, &mut completes, &mut rows, &mut ready);
    }
    assert_eq!(completes, pairs, "every Execute got its CommandComplete");
    assert_eq!(rows, pairs);
}

/// The virtual database `pgrelay` is pgrelay's own console: ordinary result sets for psql and
/// drivers, for admin users only.
#[tokio::test]
async fn the_admin_console_answers_show_commands_for_admins_only() {
    let addr = default_proxy().await;
    let c = connect_proxy(addr, "pgrelay").await;
    let rows = text_rows;
    // The followers show up once pgrelay has polled them.
    wait_until(Duration::from_secs(10), || async {
        rows(c.simple_query("SHOW NODES").await.unwrap())
            .iter()
            .all(|r| r[3] == "true")
    })
    .await;
    let nodes = rows(c.simple_query("SHOW NODES").await.unwrap());
    let info = cluster();
    assert_eq!(nodes.len(), 1 + info.followers.len(), "{nodes:?}");
    assert_eq!(nodes[0][0], info.leader.name);
    assert_eq!(nodes[0][1], "leader");
    assert_eq!(nodes[0][2], format!("127.0.0.1:{}", info.leader.port));
    for (row, f) in nodes[1..].iter().zip(&info.followers) {
        assert_eq!(row[0], f.name);
        assert_eq!(row[1], "follower");
        assert_eq!(row[3], "true", "{row:?}");
        assert!(row[4].contains('/'), "an LSN: {row:?}");
        assert_eq!(row[7], "streaming");
    }
    let mode = rows(c.simple_query("show mode;").await.unwrap());
    assert!(
        mode.contains(&vec!["mode".to_owned(), "physical".to_owned()]),
        "{mode:?}"
    );
    let config = rows(c.simple_query("SHOW CONFIG").await.unwrap());
    assert!(config
        .iter()
        .any(|r| r[0] == "users.password" && r[1] == "********"));
    assert!(!config.iter().any(|r| r[1] == PASSWORD), "no secret shown");
    // Another client, in a database of its own, is listed with the console session.
    let db = new_database("console").await;
    let _other = connect_proxy(addr, &db).await;
    let clients = rows(c.simple_query("SHOW CLIENTS").await.unwrap());
    assert!(
        clients.iter().any(|r| r[1] == SUPERUSER && r[2] == db),
        "{clients:?}"
    );
    assert!(clients.iter().any(|r| r[2] == "pgrelay"), "{clients:?}");
    let stats = rows(c.simple_query("SHOW STATS").await.unwrap());
    let connections = stats
        .iter()
        .find(|r| r[0] == "pgrelay_client_connections")
        .map(|r| r[1].parse::<f64>().unwrap());
    assert!(connections.is_some_and(|n| n >= 2.0), "{stats:?}");
    // This proxy runs from a config in memory: there is no file to reload.
    let err = c.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(sqlstate(&err), "55000");
    assert!(error_message(&err).contains("not started from a config file"));
    let err = c.simple_query("SHOW EVERYTHING").await.unwrap_err();
    assert_eq!(sqlstate(&err), "42601");
    // The session goes on after an error.
    assert_eq!(rows(c.simple_query("SHOW MODE").await.unwrap()), mode);
    // psql reads it like any result.
    let out = pg_command("psql", addr, "pgrelay")
        .args(["-X", "-A", "-t", "-c", "SHOW NODES"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("|leader|"),
        "{stdout}"
    );
    // A user without admin = true is refused at login.
    let err = tokio_postgres::connect(
        &format!(
            "host={} port={} user={MD5_USER} password=md5-pw dbname=pgrelay",
            addr.ip(),
            addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(sqlstate(&err), "42501", "{err:?}");
}

#[tokio::test]
async fn an_open_console_session_does_not_keep_pgrelay_from_stopping() {
    let c = cluster();
    let proxy = start_running_proxy(proxy_config(
        &c.leader,
        &c.followers,
        "shutdown_timeout = \"200ms\"\n",
    ))
    .await;
    let console = connect_proxy(proxy.addr, "pgrelay").await;
    console.simple_query("SHOW MODE").await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), proxy.stop())
        .await
        .expect("pgrelay stops although a console session is open");
    let err = console.simple_query("SHOW MODE").await.unwrap_err();
    assert!(
        err.is_closed() || sqlstate(&err) == "57P01",
        "the console was told: {err:?}"
    );
}
