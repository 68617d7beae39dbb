//! Bad input gets a clear error with the right SQLSTATE and ends only the connection that sent
//! it; cancel requests reach the node running the statement.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncReadExt;

use pgrelay::protocol::frontend;

use common::raw::Raw;
use common::*;

/// A session that keeps working while another one misbehaves.
async fn bystander(proxy: SocketAddr, db: &str) -> tokio::task::JoinHandle<()> {
    let client = connect_proxy(proxy, db).await;
    tokio::spawn(async move {
        for i in 0..20 {
            let row = client.query_one("SELECT $1::int + 1", &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i + 1);
        }
    })
}

#[tokio::test]
async fn wrong_password_unknown_user_and_unknown_database() {
    let db = new_database("login").await;
    let proxy = default_proxy().await;
    let connect = |user: &str, password: &str, db: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
            proxy.port()
        )
    };
    let err = tokio_postgres::connect(&connect(SUPERUSER, "wrong", &db), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "28P01");
    let err = tokio_postgres::connect(&connect("nobody_here", "x", &db), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "28P01");
    let err = tokio_postgres::connect(
        &connect(SUPERUSER, PASSWORD, "no_such_db"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(sqlstate(&err), "3D000");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("no_such_db"), "{message}");
}

#[tokio::test]
async fn malformed_messages_end_only_their_connection() {
    let db = new_database("malformed").await;
    let proxy = default_proxy().await;
    let other = bystander(proxy, &db).await;

    // A message length below the minimum.
    let mut raw = Raw::login(proxy, &db).await;
    raw.send(&[b'Q', 0, 0, 0, 2]).await;
    raw.expect_fatal("08P01").await;

    // A length over the 1 GiB cap is refused before anything is allocated for it.
    let mut raw = Raw::login(proxy, &db).await;
    raw.send(&[b'Q', 0x7f, 0xff, 0xff, 0xff]).await;
    raw.expect_fatal("08P01").await;

    // A Parse whose parameter-type count runs past its end.
    let mut raw = Raw::login(proxy, &db).await;
    let mut msg = BytesMut::new();
    msg.put_u8(b'P');
    msg.put_i32(4 + 10 + 2);
    msg.put_slice(b"\0SELECT 1\0");
    msg.put_i16(1000);
    raw.send(&msg).await;
    raw.expect_fatal("08P01").await;

    // An unknown message type.
    let mut raw = Raw::login(proxy, &db).await;
    raw.send(&[b'!', 0, 0, 0, 4]).await;
    raw.expect_fatal("08P01").await;

    // A startup packet over 10 KiB.
    let mut raw = Raw::connect(proxy).await;
    let mut big = BytesMut::new();
    big.put_i32(20_000);
    big.put_i32(frontend::PROTOCOL_3_0);
    big.put_slice(&vec![b'a'; 19_992]);
    raw.send(&big).await;
    raw.expect_fatal("08P01").await;

    // Protocol version 2.
    let mut raw = Raw::connect(proxy).await;
    let mut v2 = BytesMut::new();
    v2.put_i32(8);
    v2.put_i32(2 << 16);
    raw.send(&v2).await;
    raw.expect_fatal("0A000").await;

    other.await.expect("the other session was not affected");
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_login_timeout() {
    let proxy = common::proxy("client_login_timeout = \"300ms\"\n").await;
    let started = Instant::now();
    let mut raw = Raw::connect(proxy).await;
    raw.expect_fatal("08P01").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}

#[tokio::test]
async fn ssl_is_declined_and_newer_protocol_versions_are_negotiated() {
    let db = new_database("negotiate").await;
    let proxy = default_proxy().await;
    let mut raw = Raw::connect(proxy).await;
    let mut ssl = BytesMut::new();
    ssl.put_i32(8);
    ssl.put_i32(frontend::SSL_REQUEST_CODE);
    raw.send(&ssl).await;
    let mut answer = [0u8; 1];
    raw.stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    // Protocol 3.2 with an option pgrelay does not know.
    let mut out = BytesMut::new();
    let body_params = [
        ("user", TRUST_USER),
        ("database", db.as_str()),
        ("_pq_.frobnicate", "1"),
    ];
    let mut body = BytesMut::new();
    body.put_i32((3 << 16) | 2);
    for (k, v) in body_params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    out.put_i32(i32::try_from(body.len() + 4).unwrap());
    out.put_slice(&body);
    raw.send(&out).await;
    let first = raw.next().await.unwrap();
    assert_eq!(first.tag(), b'v', "NegotiateProtocolVersion comes first");
    let body = first.body();
    assert_eq!(&body[..4], &0i32.to_be_bytes(), "newest minor version: 0");
    assert_eq!(&body[4..8], &1i32.to_be_bytes());
    assert_eq!(&body[8..], b"_pq_.frobnicate\0");
    let rest = raw.until(b'Z').await;
    assert!(
        rest.iter().any(|f| f.tag() == b'K'),
        "BackendKeyData is sent"
    );
}

#[tokio::test]
async fn cancel_reaches_the_node_running_the_statement() {
    let db = new_database("cancel").await;
    let proxy = default_proxy().await;
    let client = connect_proxy(proxy, &db).await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    // Wait until some node is running it.
    let c = cluster();
    let nodes: Vec<_> = std::iter::once(c.leader.clone())
        .chain(c.followers.clone())
        .collect();
    wait_until(Duration::from_secs(10), || {
        let nodes = nodes.clone();
        let db = db.clone();
        async move {
            for n in &nodes {
                let direct = connect_direct(n, &db).await;
                let running: i64 = direct
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if running > 0 {
                    return true;
                }
            }
            false
        }
    })
    .await;
    let cancelled_at = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .unwrap()
        .unwrap();
    let err = result.unwrap_err();
    assert_eq!(sqlstate(&err), "57014");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        cancelled_at.elapsed()
    );
    // A cancel request with a wrong key does nothing.
    let mut raw = Raw::connect(proxy).await;
    let mut out = BytesMut::new();
    frontend::cancel_request(&mut out, 1, 12345);
    raw.send(&out).await;
    assert!(raw.next().await.is_none());
}

#[tokio::test]
async fn connections_over_the_limit_are_refused() {
    let db = new_database("limit").await;
    let proxy = common::proxy("max_client_connections = 2\n").await;
    let first = connect_proxy(proxy, &db).await;
    let second = connect_proxy(proxy, &db).await;
    let mut third = Raw::connect(proxy).await;
    third
        .startup(&[("user", TRUST_USER), ("database", &db)])
        .await;
    third.expect_fatal("53300").await;
    first.simple_query("SELECT 1").await.unwrap();
    drop(first);
    // Once a session ended, a new client gets in.
    wait_until(Duration::from_secs(10), || {
        let db = db.clone();
        async move {
            tokio_postgres::connect(&proxy_conn_string(proxy, &db), tokio_postgres::NoTls)
                .await
                .is_ok()
        }
    })
    .await;
    second.simple_query("SELECT 1").await.unwrap();
}
