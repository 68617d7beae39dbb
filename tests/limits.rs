//! What one client may make pgrelay hold is bounded: message sizes per type before and after
//! login, logins in progress (which do not take the places of logged-in clients), connections
//! to the metrics endpoint; and an unknown user's SCRAM exchange looks like a known user's.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use pgrelay::protocol::backend::parse_authentication;
use pgrelay::protocol::frontend;

use common::raw::Raw;
use common::*;

/// A raw connection that started logging in as `user` (a SCRAM user) and was asked for SASL.
async fn asked_for_sasl(proxy: SocketAddr, user: &str, db: &str) -> Raw {
    let mut raw = Raw::connect(proxy).await;
    raw.startup(&[("user", user), ("database", db)]).await;
    let f = raw.next().await.unwrap();
    assert_eq!(f.tag(), b'R', "{f:?}");
    let body = f.body();
    let (code, _) = parse_authentication(&body).unwrap();
    assert_eq!(code, 10, "AuthenticationSASL");
    raw
}

#[tokio::test]
async fn a_password_message_over_the_login_cap_is_refused_at_its_header() {
    let db = new_database("authcap").await;
    let proxy = default_proxy().await;
    let mut raw = asked_for_sasl(proxy, SUPERUSER, &db).await;
    // 1 MiB announced, under the 1 GiB cap of a Query but far over a password's 64 KiB: the
    // error comes at once, not after 1 MiB arrived (or the login timeout).
    let mut msg = BytesMut::new();
    msg.put_u8(b'p');
    msg.put_i32(1 << 20);
    raw.send(&msg).await;
    let message = raw.expect_fatal("08P01").await;
    assert!(message.contains("65535"), "{message}");
    // A logged-in client still gets its large Query through.
    let client = connect_proxy(proxy, &db).await;
    let big = "x".repeat(2 << 20);
    let row = client
        .query_one(&format!("SELECT length('{big}')"), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2 << 20);
}

#[tokio::test]
async fn small_message_types_are_capped_after_login() {
    let db = new_database("smallcap").await;
    let proxy = default_proxy().await;
    let bystander = connect_proxy(proxy, &db).await;
    for tag in [b'S', b'H', b'D', b'C', b'E', b'X', b'c', b'f', b'p'] {
        let mut raw = Raw::login(proxy, &db).await;
        let mut msg = BytesMut::new();
        msg.put_u8(tag);
        msg.put_i32(1 << 20);
        raw.send(&msg).await;
        let message = raw.expect_fatal("08P01").await;
        assert!(
            message.contains("10240"),
            "'{}': {message}",
            char::from(tag)
        );
        bystander.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test]
async fn unauthenticated_connections_do_not_lock_out_clients() {
    let db = new_database("logins").await;
    let proxy = common::proxy("max_client_connections = 2\nmax_logins_in_progress = 5\n").await;
    // Four connections that never log in: more than max_client_connections.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(proxy).await.unwrap());
    }
    // A client still logs in (five logins in progress at most) and queries.
    let client = connect_proxy(proxy, &db).await;
    client.simple_query("SELECT 1").await.unwrap();
    let second = connect_proxy(proxy, &db).await;
    second.simple_query("SELECT 1").await.unwrap();
    // max_client_connections counts the logged-in ones.
    let mut third = Raw::connect(proxy).await;
    third
        .startup(&[("user", TRUST_USER), ("database", &db)])
        .await;
    third.expect_fatal("53300").await;
    // A fifth login in progress is taken, a sixth refused at once.
    idle.push(TcpStream::connect(proxy).await.unwrap());
    let mut sixth = Raw::connect(proxy).await;
    let message = sixth.expect_fatal("53300").await;
    assert!(message.contains("logins in progress"), "{message}");
    // Once they go away, logins are accepted again.
    drop(idle);
    drop(client);
    wait_until(Duration::from_secs(10), || {
        let db = db.clone();
        async move {
            tokio_postgres::connect(&proxy_conn_string(proxy, &db), tokio_postgres::NoTls)
                .await
                .is_ok()
        }
    })
    .await;
}

/// Reads what the server sends until it closes (at most `within`).
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut out))
        .await
        .expect("the server closes the connection in time")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_metrics_endpoint_serves_a_bounded_number_of_connections() {
    let (_, metrics) = start_proxy_with_metrics(proxy_config(
        &cluster().leader,
        &cluster().followers,
        "\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    ))
    .await;
    let mut idle = Vec::new();
    for _ in 0..pgrelay::metrics::MAX_HTTP_CONNECTIONS {
        idle.push(TcpStream::connect(metrics).await.unwrap());
    }
    // One more is turned away at once instead of waiting for a place.
    let mut extra = TcpStream::connect(metrics).await.unwrap();
    let answer = read_to_close(&mut extra, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    // The idle ones are closed by the server after its timeout, and scrapes work again.
    for stream in &mut idle {
        let answer = read_to_close(stream, pgrelay::metrics::HTTP_TIMEOUT * 3).await;
        assert_eq!(answer, "");
    }
    wait_until(Duration::from_secs(10), || async {
        let mut s = TcpStream::connect(metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        read_to_close(&mut s, Duration::from_secs(10))
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
}

/// The salt and iteration count of the server-first-message a login as `user` gets.
async fn scram_salt(proxy: SocketAddr, user: &str, db: &str) -> (Vec<u8>, u32) {
    let mut raw = asked_for_sasl(proxy, user, db).await;
    let mut out = BytesMut::new();
    frontend::sasl_initial_response(&mut out, "SCRAM-SHA-256", b"n,,n=,r=clientnonce123");
    raw.send(&out).await;
    let f = raw.next().await.unwrap();
    assert_eq!(f.tag(), b'R', "{f:?}");
    let body = f.body();
    let (code, data) = parse_authentication(&body).unwrap();
    assert_eq!(code, 11, "AuthenticationSASLContinue");
    let text = std::str::from_utf8(data).unwrap();
    let attr = |name: &str| {
        text.split(',')
            .find_map(|a| a.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let salt = base64::engine::general_purpose::STANDARD
        .decode(attr("s="))
        .unwrap();
    (salt, attr("i=").parse().unwrap())
}

#[tokio::test]
async fn unknown_users_get_a_stable_salt_like_known_users() {
    let db = new_database("salt").await;
    let proxy = default_proxy().await;
    let known = scram_salt(proxy, SUPERUSER, &db).await;
    assert_eq!(scram_salt(proxy, SUPERUSER, &db).await, known);
    let unknown = scram_salt(proxy, "nobody_here", &db).await;
    assert_eq!(
        scram_salt(proxy, "nobody_here", &db).await,
        unknown,
        "an unknown user's salt does not change between attempts"
    );
    assert_eq!(unknown.0.len(), known.0.len());
    assert_eq!(unknown.1, known.1);
    assert_ne!(unknown.0, known.0);
    let other = scram_salt(proxy, "nobody_else", &db).await;
    assert_ne!(other.0, unknown.0, "each unknown name has its own salt");
}
