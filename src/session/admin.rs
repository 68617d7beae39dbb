//! The admin console: a client that connects to the virtual database `pgrelay` (as a user with
//! `admin = true`) talks to pgrelay itself, not to a node. Commands are simple queries and
//! their answers ordinary result sets, so psql and any driver can read them.
//!
//! - `SHOW NODES`: each node, its role, address, whether it is up, its applied position and
//!   lag.
//! - `SHOW MODE`: the replication mode and the policies that go with it.
//! - `SHOW CONFIG`: the effective config, every default filled in and secrets masked.
//! - `SHOW CLIENTS`: the logged-in client sessions.
//! - `SHOW STATS`: every sample of pgrelay's metrics, as `/metrics` would serve it.
//! - `RELOAD`: reads the config file again (a changed mode is switched live), like SIGHUP.
//! - `PAUSE` / `RESUME`: new transactions wait (once the open ones have finished) / go on.

use std::sync::Arc;

use bytes::BytesMut;

use crate::config::{Config, ReplicationMode, Role};
use crate::protocol::backend::{self as be, Report, TxStatus};
use crate::protocol::frontend::{self as fe, tag};
use crate::protocol::sqlstate;
use crate::replication::positions::format_lsn;
use crate::server::Shared;

use super::client::{Client, ClientError};

/// The database name that reaches the console.
pub const CONSOLE_DATABASE: &str = "pgrelay";

/// Serves an admin console session until the client leaves.
pub async fn serve(client: &mut Client, shared: &Arc<Shared>, pid: i32, secret: i32) {
    for (k, v) in [
        ("server_version", "15.0 (pgrelay console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        be::parameter_status(&mut client.wbuf, k, v);
    }
    be::backend_key_data(&mut client.wbuf, pid, secret);
    be::ready_for_query(&mut client.wbuf, TxStatus::Idle);
    // An extended-protocol message is answered with an error at its Sync.
    let mut failed_unit = false;
    loop {
        if client.flush().await.is_err() {
            return;
        }
        let read = tokio::select! {
            read = client.read_frame() => read,
            // Like every session, the console ends when pgrelay shuts down.
            _ = shared.shutdown.cancelled() => {
                Report::fatal(
                    sqlstate::ADMIN_SHUTDOWN,
                    "terminating connection because pgrelay is shutting down",
                )
                .write_error(&mut client.wbuf);
                let _ = client.flush().await;
                return;
            }
        };
        let frame = match read {
            Ok(f) => f,
            Err(ClientError::Closed) => return,
            Err(_) => return,
        };
        match frame.tag() {
            tag::QUERY => {
                let body = frame.body();
                match fe::parse_query(&body) {
                    Ok(sql) => answer(&mut client.wbuf, shared, sql).await,
                    Err(e) => {
                        Report::error(sqlstate::PROTOCOL_VIOLATION, &e.to_string())
                            .write_error(&mut client.wbuf);
                    }
                }
                be::ready_for_query(&mut client.wbuf, TxStatus::Idle);
            }
            tag::SYNC => {
                if failed_unit {
                    Report::error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the pgrelay console answers simple queries only",
                    )
                    .write_error(&mut client.wbuf);
                    failed_unit = false;
                }
                be::ready_for_query(&mut client.wbuf, TxStatus::Idle);
            }
            tag::TERMINATE => return,
            tag::FLUSH => {}
            _ => failed_unit = true,
        }
    }
}

/// Answers one query string.
async fn answer(out: &mut BytesMut, shared: &Arc<Shared>, sql: &str) {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] => be::empty_query_response(out),
        ["SHOW", "NODES"] => result(out, &NODE_COLUMNS, &nodes(shared), "SHOW"),
        ["SHOW", "MODE"] => result(out, &["key", "value"], &mode(shared), "SHOW"),
        ["SHOW", "CONFIG"] => result(out, &["key", "value"], &config(&shared.config()), "SHOW"),
        ["SHOW", "CLIENTS"] => result(out, &CLIENT_COLUMNS, &clients(shared), "SHOW"),
        ["SHOW", "STATS"] => result(out, &["metric", "value"], &stats(shared), "SHOW"),
        ["RELOAD"] => match crate::control::reload(shared).await {
            Ok(done) => {
                Report::notice(&done.summary()).write_notice(out);
                be::command_complete(out, "RELOAD");
            }
            Err(e) => Report::error(e.code, &e.message).write_error(out),
        },
        ["PAUSE"] => match crate::control::pause(shared).await {
            Ok(()) => be::command_complete(out, "PAUSE"),
            Err(e) => Report::error(e.code, &e.message).write_error(out),
        },
        ["RESUME"] => match crate::control::resume(shared).await {
            Ok(()) => be::command_complete(out, "RESUME"),
            Err(e) => Report::error(e.code, &e.message).write_error(out),
        },
        _ => {
            Report::error(
                sqlstate::SYNTAX_ERROR,
                &format!("unknown pgrelay console command: {}", sql.trim()),
            )
            .with_hint(
                "The console knows SHOW NODES, SHOW MODE, SHOW CONFIG, SHOW CLIENTS, SHOW STATS, RELOAD, PAUSE and RESUME.",
            )
            .write_error(out);
        }
    }
}

pub const NODE_COLUMNS: [&str; 8] = [
    "name",
    "role",
    "host_port",
    "up",
    "applied_position",
    "lag_bytes",
    "lag_seconds",
    "replication_state",
];

/// One row per node.
pub fn nodes(shared: &Shared) -> Vec<Vec<Option<String>>> {
    let config = shared.config();
    let statement = config.replication.mode == ReplicationMode::Statement;
    config
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let host_port = Some(format!("{}:{}", n.host, n.port));
            if n.role == Role::Leader {
                let position = shared.positions.leader();
                return vec![
                    Some(n.name.clone()),
                    Some("leader".into()),
                    host_port,
                    Some(shared.nodes.is_up(i).to_string()),
                    (!statement && position > 0).then(|| format_lsn(position)),
                    Some("0".into()),
                    Some("0.000".into()),
                    Some("leader".into()),
                ];
            }
            let state = shared.positions.follower(i);
            let up = state.up && shared.nodes.is_up(i);
            let applied = if statement {
                None
            } else {
                state.applied.map(format_lsn)
            };
            let replication = match (config.replication.mode, up) {
                (_, false) => "down",
                (ReplicationMode::Physical, true) => "streaming",
                (ReplicationMode::Row, true) => "applying rows",
                (ReplicationMode::Statement, true) => "replaying statements",
            };
            vec![
                Some(n.name.clone()),
                Some("follower".into()),
                host_port,
                Some(up.to_string()),
                applied,
                Some(state.lag_bytes.to_string()),
                Some(format!("{:.3}", state.lag.as_secs_f64())),
                Some(replication.into()),
            ]
        })
        .collect()
}

fn mode(shared: &Shared) -> Vec<Vec<Option<String>>> {
    let config = shared.config();
    let mut rows = vec![
        ("mode", config.replication.mode.name().to_owned()),
        ("paused", shared.control.is_paused().to_string()),
        ("ack", config.replication.ack.to_string()),
        ("consistency", config.routing.consistency.name().to_owned()),
    ];
    if config.replication.mode == ReplicationMode::Statement {
        rows.push((
            "serialize_writes",
            config.statement.serialize_writes.to_string(),
        ));
    }
    rows.into_iter()
        .map(|(k, v)| vec![Some(k.to_owned()), Some(v)])
        .collect()
}

/// The effective config as `section.key` / value rows (passwords masked).
fn config(config: &Config) -> Vec<Vec<Option<String>>> {
    let mut rows = Vec::new();
    let mut section = String::new();
    for line in config.to_masked_toml().lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            section = name.to_owned();
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((k, v)) = line.split_once(" = ") {
            rows.push(vec![
                Some(format!("{section}.{k}")),
                Some(v.trim_matches('"').to_owned()),
            ]);
        }
    }
    rows
}

const CLIENT_COLUMNS: [&str; 5] = ["pid", "user", "database", "peer", "connected_seconds"];

/// One row per logged-in client (this console session included), oldest first.
fn clients(shared: &Shared) -> Vec<Vec<Option<String>>> {
    let mut list: Vec<(i32, crate::server::ClientInfo)> = match shared.clients.lock() {
        Ok(c) => c.iter().map(|(pid, info)| (*pid, info.clone())).collect(),
        Err(_) => Vec::new(),
    };
    list.sort_by_key(|(pid, info)| (info.connected, *pid));
    list.into_iter()
        .map(|(pid, info)| {
            vec![
                Some(pid.to_string()),
                Some(info.user),
                Some(info.database),
                Some(info.peer.to_string()),
                Some(format!("{:.3}", info.connected.elapsed().as_secs_f64())),
            ]
        })
        .collect()
}

/// Every sample line of the metrics exposition: series (name and labels) and value.
fn stats(shared: &Shared) -> Vec<Vec<Option<String>>> {
    shared
        .metrics
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(series, value)| vec![Some(series.to_owned()), Some(value.to_owned())])
        .collect()
}

/// Writes a result set of text columns.
fn result(out: &mut BytesMut, columns: &[&str], rows: &[Vec<Option<String>>], command: &str) {
    be::row_description(out, columns);
    for row in rows {
        let values: Vec<Option<&str>> = row.iter().map(|v| v.as_deref()).collect();
        be::data_row(out, &values);
    }
    be::command_complete(out, &format!("{command} {}", rows.len()));
}
