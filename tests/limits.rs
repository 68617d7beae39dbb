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

use bytes::{BufMut, BytesMut};

use pgrelay::protocol::backend::parse_authentication;

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
