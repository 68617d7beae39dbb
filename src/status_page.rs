//! The status page, for users without Prometheus and Grafana: `GET /` on the metrics port
//! serves one self-contained HTML page (inline CSS and JS, charts drawn as SVG by the page's
//! own script, nothing loaded from the internet) that polls `GET /status.json` every second.
//! It shows the replication mode, whether pgrelay is paused, the nodes as the admin console's
//! `SHOW NODES` lists them, and each follower's lag over the last ten minutes.
//!
//! The lag history lives here, sampled once a second by the metrics server, so that a page
//! opened just now already draws the last minutes instead of starting from nothing.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::config::Role;
use crate::server::Shared;
use crate::session::admin::{nodes, NODE_COLUMNS};

/// The page; its script fetches `status.json` relative to itself.
pub const PAGE: &str = include_str!("status.html");

/// How often the history takes a sample.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Ten minutes of samples.
const HISTORY_SAMPLES: usize = 600;

/// One follower's lag at one instant.
#[derive(Debug, Clone)]
struct FollowerLag {
    name: String,
    seconds: f64,
    bytes: u64,
    up: bool,
}

#[derive(Debug, Clone)]
struct Sample {
    /// Milliseconds since the Unix epoch, by pgrelay's clock (the page draws against it, so a
    /// browser with another clock still draws the right window).
    at_ms: u64,
    followers: Vec<FollowerLag>,
}

/// The followers' recent lag, oldest first, at most [`HISTORY_SAMPLES`] samples.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Records every follower's lag now. Followers are read from the config in force, so a
    /// reload that changes them shows in the next sample.
    pub fn sample(&self, shared: &Shared) {
        let config = shared.config();
        let followers = config
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.role == Role::Follower)
            .map(|(i, n)| {
                let state = shared.positions.follower(i);
                FollowerLag {
                    name: n.name.clone(),
                    seconds: state.lag.as_secs_f64(),
                    bytes: state.lag_bytes,
                    up: state.up && shared.nodes.is_up(i),
                }
            })
            .collect();
        let sample = Sample {
            at_ms: unix_ms(),
            followers,
        };
        let mut samples = match self.samples.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        samples.push_back(sample);
        while samples.len() > HISTORY_SAMPLES {
            samples.pop_front();
        }
    }

    /// The samples taken after `after_ms` (0: all), as JSON objects.
    fn since(&self, after_ms: u64) -> Vec<Value> {
        let samples = match self.samples.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        samples
            .iter()
            .filter(|s| s.at_ms > after_ms)
            .map(|s| {
                let lag: Map<String, Value> = s
                    .followers
                    .iter()
                    .map(|f| {
                        let v = json!({"seconds": f.seconds, "bytes": f.bytes, "up": f.up});
                        (f.name.clone(), v)
                    })
                    .collect();
                json!({"t": s.at_ms, "lag": lag})
            })
            .collect()
    }
}

/// The body of `/status.json`: what the page shows, with the history after `since_ms`.
pub fn status_json(shared: &Shared, history: &History, since_ms: u64) -> String {
    // Read on every request: the mode can change at runtime (a reload).
    let config = shared.config();
    let followers: Vec<&str> = config
        .nodes
        .iter()
        .filter(|n| n.role == Role::Follower)
        .map(|n| n.name.as_str())
        .collect();
    let body = json!({
        "mode": config.replication.mode.name(),
        "paused": paused(shared),
        "now": unix_ms(),
        "interval_ms": SAMPLE_INTERVAL.as_millis() as u64,
        "window_ms": (SAMPLE_INTERVAL * HISTORY_SAMPLES as u32).as_millis() as u64,
        "followers": followers,
        "columns": NODE_COLUMNS,
        "nodes": nodes(shared),
        "history": history.since(since_ms),
    });
    body.to_string()
}

/// The `since` parameter of a request target such as `/status.json?since=1700000000000`.
pub fn since_param(target: &str) -> u64 {
    target
        .split_once('?')
        .map(|(_, query)| query)
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("since="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Whether the admin console's PAUSE holds new transactions, as `pgrelay_paused` says; the
/// gauge is the one place every way of pausing reports to.
fn paused(shared: &Shared) -> bool {
    let prefix = format!("{} ", crate::metrics::PAUSED);
    shared
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .is_some_and(|v| v > 0.0)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_read_from_the_query_string() {
        assert_eq!(since_param("/status.json"), 0);
        assert_eq!(since_param("/status.json?since=1234"), 1234);
        assert_eq!(since_param("/status.json?x=1&since=99&y=2"), 99);
        assert_eq!(since_param("/status.json?since=nope"), 0);
    }
}
