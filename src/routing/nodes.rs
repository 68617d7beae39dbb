//! The nodes pgrelay routes to and whether each is available: a node that refused a connection
//! or dropped one is skipped for reads until its retry interval passed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Config, Role};

/// Availability of every configured node, shared by all sessions.
#[derive(Debug)]
pub struct NodeRegistry {
    leader: usize,
    followers: Vec<usize>,
    /// Per node: milliseconds since `epoch` until which the node is considered down (0: up).
    down_until_ms: Vec<AtomicU64>,
    epoch: Instant,
    retry: Duration,
    next_follower: AtomicUsize,
}

impl NodeRegistry {
    pub fn new(config: &Config) -> Self {
        NodeRegistry {
            leader: config.leader,
            followers: config
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.role == Role::Follower)
                .map(|(i, _)| i)
                .collect(),
            down_until_ms: config.nodes.iter().map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            retry: config.proxy.node_retry_interval,
            next_follower: AtomicUsize::new(0),
        }
    }

    pub fn leader(&self) -> usize {
        self.leader
    }

    pub fn followers(&self) -> &[usize] {
        &self.followers
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn is_up(&self, node: usize) -> bool {
        self.down_until_ms
            .get(node)
            .is_some_and(|d| d.load(Ordering::Relaxed) <= self.now_ms())
    }

    /// Records that `node` failed; it is skipped until the retry interval has passed.
    pub fn mark_down(&self, node: usize) {
        if let Some(d) = self.down_until_ms.get(node) {
            let until = self
                .now_ms()
                .saturating_add(u64::try_from(self.retry.as_millis()).unwrap_or(u64::MAX));
            d.store(until.max(1), Ordering::Relaxed);
        }
    }

    pub fn mark_up(&self, node: usize) {
        if let Some(d) = self.down_until_ms.get(node) {
            d.store(0, Ordering::Relaxed);
        }
    }

    /// The available followers, starting at the next one in round-robin order.
    pub fn followers_round_robin(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.followers.len();
        let start = if n == 0 {
            0
        } else {
            self.next_follower.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n)
            .filter_map(move |i| self.followers.get((start + i) % n).copied())
            .filter(|&f| self.is_up(f))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
[proxy]
node_retry_interval = "1h"
[[nodes]]
name = "l"
role = "leader"
host = "127.0.0.1"
[[nodes]]
name = "a"
role = "follower"
host = "127.0.0.1"
[[nodes]]
name = "b"
role = "follower"
host = "127.0.0.1"
[[users]]
name = "u"
password = "p"
"#,
        )
        .unwrap()
    }

    #[test]
    fn round_robin_alternates_and_skips_down_nodes() {
        let r = NodeRegistry::new(&config());
        let first: Vec<usize> = (0..4)
            .map(|_| r.followers_round_robin().next().unwrap())
            .collect();
        assert_eq!(first, vec![1, 2, 1, 2]);
        r.mark_down(2);
        assert!(!r.is_up(2));
        let picks: Vec<usize> = (0..3)
            .map(|_| r.followers_round_robin().next().unwrap())
            .collect();
        assert_eq!(picks, vec![1, 1, 1]);
        r.mark_up(2);
        assert!(r.is_up(2));
    }
}
