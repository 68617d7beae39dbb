//! The client side of a session: buffered reads of whole messages, buffered writes.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::codec::{
    decode_frame, decode_frame_capped, decode_startup, Frame, MAX_AUTH_MESSAGE,
};
use crate::protocol::frontend::max_message_len;
use crate::protocol::ProtocolError;

/// Why reading from the client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client closed the connection")]
    Closed,
    #[error("client connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("invalid message from client: {0}")]
    Protocol(#[from] ProtocolError),
}

pub struct Client {
    stream: TcpStream,
    rbuf: BytesMut,
    /// Bytes queued for the client, sent by [`Client::flush`].
    pub wbuf: BytesMut,
}

impl Client {
    pub fn new(stream: TcpStream) -> Self {
        Client {
            stream,
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Reads one startup-phase packet (capped at 10 KiB).
    pub async fn read_startup(&mut self) -> Result<Bytes, ClientError> {
        loop {
            if let Some(packet) = decode_startup(&mut self.rbuf)? {
                return Ok(packet);
            }
            self.read_more().await?;
        }
    }

    /// Reads one whole message before login (a password or SASL message), capped at
    /// [`MAX_AUTH_MESSAGE`] whatever its type.
    pub async fn read_login_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(frame) = decode_frame(&mut self.rbuf, MAX_AUTH_MESSAGE)? {
                return Ok(frame);
            }
            self.read_more().await?;
        }
    }

    /// Reads one whole message of a logged-in client, when nothing else can happen meanwhile
    /// (the admin console).
    pub async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(frame) = self.decode()? {
                return Ok(frame);
            }
            self.read_more().await?;
        }
    }

    /// Splits the next whole buffered message of a logged-in client off, without I/O; each
    /// message type has its cap ([`max_message_len`]).
    pub fn decode(&mut self) -> Result<Option<Frame>, ProtocolError> {
        decode_frame_capped(&mut self.rbuf, max_message_len)
    }

    /// Reads whatever the client sent next into the buffer. Cancel-safe: `read_buf` either
    /// reads into the buffer or does nothing. The buffer grows with what arrived (it at most
    /// doubles), never by what a message header announces.
    pub async fn read_more(&mut self) -> Result<(), ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(self.rbuf.len().max(8 * 1024));
        }
        match self.stream.read_buf(&mut self.rbuf).await? {
            0 => Err(ClientError::Closed),
            _ => Ok(()),
        }
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all_buf(&mut self.wbuf).await
    }

    /// Writes single bytes during the startup phase (the answer to SSLRequest).
    pub async fn write_now(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}
