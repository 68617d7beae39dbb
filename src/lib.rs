//! pgrelay: a PostgreSQL wire-protocol proxy that sends writes to a leader, reads to followers,
//! and never serves a session older data than it wrote.
//!
//! # Layout
//! - [`protocol`]: bytes <-> Postgres v3 messages, authentication exchanges, SQLSTATEs, the
//!   streaming-replication sub-protocol and pgoutput; no I/O.
//! - [`config`]: the TOML config, validated into [`config::Config`] at load.
//! - [`server`]: the listener, cancel requests, shutdown.
//! - [`status`]: `pgrelay status`, the node table read through the admin console.
//! - [`control`]: config reload, the live switch between row and statement mode, PAUSE.
//! - [`session`]: one client connection's state machine: units of messages, routed and relayed.
//! - [`routing`]: statement classification (and which DDL row mode replicates), and the registry
//!   of nodes and their health.
//! - [`backend`]: connections from pgrelay to nodes, and the pool that hands them out.
//! - [`replication`]: follower positions and lag, and per replication mode how followers get
//!   the leader's changes (physical standbys watched; row mode streamed and applied by pgrelay).
//! - [`metrics`]: Prometheus metric names, handles and the `/metrics` endpoint.
//! - [`status_page`]: the status page on the metrics port (`/`, `/status.json`) and its lag history.
//! - [`cluster`]: starts and stops a local leader + followers from the installed Postgres binaries.
//! - [`demo`]: `pgrelay demo`, a local cluster with pgrelay in front of it.
pub mod backend;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demo;
pub mod metrics;
pub mod protocol;
pub mod replication;
pub mod routing;
pub mod server;
mod session;
pub mod status;
pub mod status_page;
