//! `pgrelay status`: the node table of a running pgrelay, read through its admin console with
//! the address and an admin user from the same config file.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use crate::backend::BackendConn;
use crate::config::{Config, NodeConfig, Role};

/// The columns of the node table (the console's `SHOW NODES`).
pub use crate::session::admin::NODE_COLUMNS;

/// Connects to the pgrelay `config` describes, runs `SHOW NODES` and formats the answer as an
/// aligned table. `user`: the console user (default: the first with `admin = true`).
pub async fn node_table(config: &Config, user: Option<&str>) -> anyhow::Result<String> {
    let user = match user {
        Some(name) => config
            .user(name)
            .ok_or_else(|| anyhow::anyhow!("no [[users]] entry named {name:?} in the config"))?,
        None => config.users.iter().find(|u| u.admin).ok_or_else(|| {
            anyhow::anyhow!(
                "no user with admin = true in the config; mark one (see README, \"Admin console\") or pass --user"
            )
        })?,
    };
    let listen = config.proxy.listen;
    // A wildcard listen address is reached on loopback.
    let host: IpAddr = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => IpAddr::from([127, 0, 0, 1]),
        ip if ip.is_unspecified() => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let target = NodeConfig {
        name: "pgrelay".into(),
        role: Role::Leader,
        host: host.to_string(),
        port: listen.port(),
    };
    let params = vec![
        ("database".to_owned(), "pgrelay".to_owned()),
        ("application_name".to_owned(), "pgrelay status".to_owned()),
    ];
    let mut conn = BackendConn::connect(
        0,
        &target,
        &params,
        &user.name,
        user.password.expose(),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot reach pgrelay at {host}:{}: {e}", listen.port()))?;
    let rows = conn
        .query("SHOW NODES")
        .await
        .map_err(|e| anyhow::anyhow!("SHOW NODES: {}", e.message))?;
    conn.terminate().await;
    Ok(format_table(&NODE_COLUMNS, &rows))
}

/// Columns padded to their widest cell, a header and a rule, NULL shown as empty.
pub fn format_table(columns: &[&str], rows: &[Vec<Option<String>>]) -> String {
    let cell = |row: &Vec<Option<String>>, i: usize| -> String {
        row.get(i).cloned().flatten().unwrap_or_default()
    };
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| cell(r, i).chars().count())
                .chain(std::iter::once(c.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join(" | ").trim_end());
    };
    line(columns.iter().map(|c| (*c).to_owned()).collect(), &mut out);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(out, "{}", rule.join("-+-"));
    for row in rows {
        line((0..columns.len()).map(|i| cell(row, i)).collect(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_aligned() {
        let rows = vec![
            vec![Some("leader".into()), None],
            vec![Some("f1".into()), Some("0.250".into())],
        ];
        let text = format_table(&["name", "lag_seconds"], &rows);
        assert_eq!(
            text,
            "name   | lag_seconds\n-------+------------\nleader |\nf1     | 0.250\n"
        );
    }
}
