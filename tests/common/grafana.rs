//! Reading the Grafana dashboard (`grafana/dashboards/pgrelay.json`): its PromQL expressions,
//! the metric names and grouping labels they use, and the data sources they name. Shared by the
//! consistency test (`tests/deploy.rs`) and the test against a real Prometheus
//! (`tests/dashboard.rs`).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A path inside the repository.
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub const DASHBOARD: &str = "grafana/dashboards/pgrelay.json";

/// The dashboard, parsed.
pub fn dashboard() -> Value {
    let text = std::fs::read_to_string(repo_path(DASHBOARD)).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// One PromQL expression of the dashboard and where it is.
#[derive(Debug, Clone)]
pub struct Expr {
    /// Panel title and refId, or `variable NAME`.
    pub place: String,
    pub expr: String,
}

/// Every panel's (also inside collapsed rows) every target's expression.
pub fn panel_exprs(dashboard: &Value) -> Vec<Expr> {
    let mut out = Vec::new();
    fn walk(panels: &Value, out: &mut Vec<Expr>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(Expr {
                        place: format!(
                            "panel {:?} target {}",
                            p["title"].as_str().unwrap_or(""),
                            t["refId"].as_str().unwrap_or("?")
                        ),
                        expr: expr.to_owned(),
                    });
                }
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dashboard["panels"], &mut out);
    out
}

/// The queries of the dashboard's template variables (`label_values(METRIC, LABEL)` and such).
pub fn variable_queries(dashboard: &Value) -> Vec<Expr> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let q = v["query"]["query"].as_str().or(v["query"].as_str())?;
            Some(Expr {
                place: format!("variable {}", v["name"].as_str().unwrap_or("?")),
                expr: q.to_owned(),
            })
        })
        .collect()
}

/// The names of the dashboard's template variables.
pub fn variable_names(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect()
}

/// Every `uid` of a `datasource` object anywhere in the dashboard.
pub fn datasource_uids(dashboard: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if k == "datasource" {
                        match child {
                            Value::Object(ds) => {
                                out.insert(ds["uid"].as_str().unwrap_or("<no uid>").to_owned());
                            }
                            other => {
                                out.insert(format!("<not an object: {other}>"));
                            }
                        }
                    } else {
                        walk(child, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    walk(dashboard, &mut out);
    out
}

/// Identifiers in `expr` that start with `pgrelay_` (metric names, with any histogram suffix).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
        let starts_word = i == 0 || !is_ident(bytes[i - 1]);
        if starts_word && expr[i..].starts_with("pgrelay_") {
            let end = expr[i..]
                .bytes()
                .position(|b| !is_ident(b))
                .map_or(expr.len(), |n| i + n);
            out.insert(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Label names an expression groups by or matches on: `by (a, b)`, `without (a)` and the
/// names inside `{...}` selectors.
pub fn label_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(pos) = rest.find(['(', '{']) {
        let open = rest.as_bytes()[pos];
        let before = rest[..pos].trim_end();
        let after = &rest[pos + 1..];
        let close = if open == b'(' { ')' } else { '}' };
        let inside = after.split(close).next().unwrap_or("");
        if open == b'{' {
            for matcher in inside.split(',') {
                let name: String = matcher
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else if before.ends_with(" by") || before.ends_with(" without") || before == "by" {
            for name in inside.split(',') {
                out.insert(name.trim().to_owned());
            }
        }
        rest = after;
    }
    out
}

/// The expression with Grafana's macros and the dashboard's variables replaced by values
/// Prometheus can run: `$__rate_interval` by `rate_interval`, every variable by `.*` (they are
/// used only in `=~` matchers, where `.*` means "All").
pub fn substitute(expr: &str, variables: &[String], rate_interval: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", rate_interval)
        .replace("${__rate_interval}", rate_interval);
    for v in variables {
        out = out
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    out
}
