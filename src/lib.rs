//! pgrelay: a PostgreSQL wire-protocol proxy that sends writes to a leader, reads to followers,
//! and knows how far each follower is behind.
//!
//! # Layout
//! - [`protocol`]: bytes <-> Postgres v3 messages, authentication exchanges, SQLSTATEs; no I/O.
//! - [`routing`]: statement classification (read, write, transaction control, session state).
//! - [`cluster`]: starts and stops a local leader + followers from the installed Postgres binaries.
pub mod cluster;
pub mod protocol;
pub mod routing;
