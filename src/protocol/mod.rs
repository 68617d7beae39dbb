//! The PostgreSQL frontend/backend protocol, version 3, without I/O.
//! <https://www.postgresql.org/docs/current/protocol.html>
pub mod auth;
