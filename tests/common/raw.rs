//! A raw protocol connection, for sending what no driver would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use pgrelay::protocol::backend::parse_error_fields;
use pgrelay::protocol::codec::{decode_frame, Frame, MAX_MESSAGE};
use pgrelay::protocol::frontend;

use super::TRUST_USER;

/// A raw protocol connection, for sending what no driver would.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn startup(&mut self, params: &[(&str, &str)]) {
        let mut out = BytesMut::new();
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        frontend::startup_message(&mut out, &params);
        self.send(&out).await;
    }

    /// Logs in as the trust user and waits for ReadyForQuery.
    pub async fn login(addr: SocketAddr, db: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.startup(&[("user", TRUST_USER), ("database", db)]).await;
        raw.until(b'Z').await;
        raw
    }

    /// The next message, or None when the server closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, MAX_MESSAGE).unwrap() {
                return Some(f);
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("server answers within 10 s")
                    .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    pub async fn until(&mut self, tag: u8) -> Vec<Frame> {
        let mut seen = Vec::new();
        loop {
            let f = self
                .next()
                .await
                .unwrap_or_else(|| panic!("closed before '{}': {seen:?}", char::from(tag)));
            let done = f.tag() == tag;
            seen.push(f);
            if done {
                return seen;
            }
        }
    }

    /// Expects an ErrorResponse with `code`, then the connection closing; returns its message.
    pub async fn expect_fatal(&mut self, code: &str) -> String {
        let f = self
            .next()
            .await
            .expect("an ErrorResponse before the connection closes");
        assert_eq!(f.tag(), b'E', "{f:?}");
        let fields = parse_error_fields(&f.body()).unwrap();
        assert_eq!(fields.code, code, "{}", fields.message);
        assert!(self.next().await.is_none(), "the connection is closed");
        fields.message
    }
}
