//! Memory a flood of unauthenticated connections makes pgrelay hold stays small. A test binary
//! of its own: the peak RSS measured is the whole process's, and pgrelay runs in it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use pgrelay::protocol::backend::parse_error_fields;
use pgrelay::protocol::codec::{decode_frame, MAX_MESSAGE};

use common::raw::Raw;
use common::*;

/// Peak resident memory of this process so far, in bytes (`VmHWM`).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    kib * 1024
}

const CONNECTIONS: usize = 200;
/// Bytes each connection sends after announcing a 1 GiB password message.
const SENT: usize = 512 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_password_messages_from_many_connections_take_no_memory() {
    let db = new_database("flood").await;
    let proxy = common::proxy("max_logins_in_progress = 1000\n").await;
    // Warm up: one login and query, so the baseline includes what any session needs.
    let client = connect_proxy(proxy, &db).await;
    client.simple_query("SELECT 1").await.unwrap();
    let before = peak_rss();

    let junk: Arc<Vec<u8>> = Arc::new(vec![b'x'; SENT]);
    let mut flood = Vec::new();
    for _ in 0..CONNECTIONS {
        let junk = junk.clone();
        let db = db.clone();
        flood.push(tokio::spawn(async move {
            let mut raw = Raw::connect(proxy).await;
            raw.startup(&[("user", SUPERUSER), ("database", &db)]).await;
            let asked = raw.next().await.unwrap();
            assert_eq!(asked.tag(), b'R');
            let mut msg = BytesMut::new();
            msg.put_u8(b'p');
            // Just under the 1 GiB that a Query may have.
            msg.put_i32((1 << 30) - 16);
            raw.send(&msg).await;
            // pgrelay may close before all of it arrived.
            let _ = raw.stream.write_all(&junk).await;
            // The connection ends (an ErrorResponse 08P01 first, unless a reset lost it).
            let mut buf = BytesMut::new();
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match raw.stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            assert!(ended.is_ok(), "pgrelay ended the connection");
            if let Some(f) = decode_frame(&mut buf, MAX_MESSAGE).unwrap() {
                assert_eq!(f.tag(), b'E');
                assert_eq!(parse_error_fields(&f.body()).unwrap().code, "08P01");
            }
        }));
    }
    // Meanwhile other clients log in and query.
    for i in 0..20 {
        let other = connect_proxy(proxy, &db).await;
        let row = other.query_one("SELECT $1::int + 1", &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
    for f in flood {
        f.await.unwrap();
    }
    let grown = peak_rss().saturating_sub(before);
    // Without per-type caps each connection would buffer what it sent: 100 MiB in all.
    assert!(grown < 16 << 20, "peak RSS grew by {} KiB", grown / 1024);
    client.simple_query("SELECT 1").await.unwrap();
}
