//! Choosing a unit's node: the transaction's node inside a transaction, the leader for
//! anything that is not a read, and for reads a follower that satisfies the consistency level
//! (read-your-writes by position), waiting up to `ryw_wait` for one to catch up before falling
//! back to the leader.

use std::time::{Duration, Instant};

use tracing::warn;

use crate::backend::ConnectError;
use crate::config::Consistency;
use crate::metrics::ReadReason;
use crate::replication::positions::{FollowerState, Position};

use super::overrides::Hint;
use super::{Flow, Session, SessionEnd};

/// What a follower must offer to serve a read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ReadNeeds {
    /// It has applied at least this position.
    pub position: Option<Position>,
    /// It lags by no more than this.
    pub max_lag: Option<Duration>,
}

impl ReadNeeds {
    pub fn satisfied_by(&self, state: &FollowerState) -> bool {
        state.up
            && self.position.is_none_or(|p| state.has_applied(p))
            && self.max_lag.is_none_or(|m| state.lag <= m)
    }
}

/// Where a unit goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Decision {
    Node(usize, ReadReason),
    Follower(ReadNeeds, ReadReason),
}

/// The read requirement for a consistency level, given what the session wrote and asked for.
pub(super) fn needs_for(
    consistency: Consistency,
    last_write: Option<Position>,
    min_position: Option<Position>,
    acknowledged: Position,
    max_lag: Duration,
) -> Option<ReadNeeds> {
    let at_least = |a: Option<Position>, b: Option<Position>| match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    match consistency {
        Consistency::Leader => None,
        Consistency::Eventual => Some(ReadNeeds {
            position: min_position,
            max_lag: Some(max_lag),
        }),
        Consistency::Session => {
            let position = at_least(last_write, min_position);
            Some(ReadNeeds {
                position,
                // Without a write to wait for, lag is what keeps a read reasonably fresh.
                max_lag: position.is_none().then_some(max_lag),
            })
        }
        Consistency::Global => Some(ReadNeeds {
            position: at_least(Some(acknowledged), min_position),
            max_lag: None,
        }),
    }
}

impl Session {
    /// Where the collected unit should go, before any waiting.
    pub(super) fn decide(&self) -> Decision {
        if let Some(node) = self.open_unit.or(self.pinned) {
            return Decision::Node(node, ReadReason::Transaction);
        }
        let unit = &self.unit;
        let leader = self.shared.nodes.leader();
        // BEGIN READ ONLY may run on a follower; any other BEGIN opens a transaction that may write.
        let read_only = !unit.pins_leader && unit.begin.unwrap_or(unit.read_only);
        if !read_only || self.leader_only || self.shared.nodes.followers().is_empty() {
            return Decision::Node(leader, ReadReason::Leader);
        }
        let (consistency, reason) = match unit.hint {
            Some(Hint::Leader) => return Decision::Node(leader, ReadReason::Hint),
            Some(Hint::Consistency(c)) => (c, ReadReason::Hint),
            None => (self.consistency, ReadReason::Consistency),
        };
        match needs_for(
            consistency,
            self.last_write,
            self.min_position,
            self.shared.positions.acknowledged(&self.database),
            self.config.routing.max_lag,
        ) {
            None => Decision::Node(
                leader,
                if reason == ReadReason::Hint {
                    reason
                } else {
                    ReadReason::Leader
                },
            ),
            Some(needs) => Decision::Follower(needs, reason),
        }
    }

    /// Sends the collected unit to its node, or asks to wait while replies that must reach
    /// the client first are still in flight.
    pub(super) async fn dispatch_unit(&mut self) -> Result<Flow, SessionEnd> {
        if self.reload_classifier && self.pinned.is_none() && self.open_unit.is_none() {
            self.load_classifier().await;
        }
        let decision = self.decide();
        if self.must_wait(decision) {
            return Ok(self.wait_for_last_frame());
        }
        let read = self.unit.read_only || self.unit.begin == Some(true);
        let writes = self.unit.writes;
        let (node, reason) = match decision {
            Decision::Node(node, reason) => match self.connect(node).await {
                Ok(()) => (node, reason),
                Err(err) => {
                    self.fail_unit(&err.to_string());
                    return Ok(Flow::Continue);
                }
            },
            Decision::Follower(needs, reason) => match self.choose_follower(needs).await {
                Some(node) => (node, reason),
                None => {
                    let leader = self.shared.nodes.leader();
                    if let Err(err) = self.connect(leader).await {
                        self.fail_unit(&err.to_string());
                        return Ok(Flow::Continue);
                    }
                    if needs.position.is_some() {
                        self.shared.metrics.ryw_fallbacks.increment(1);
                    }
                    (leader, ReadReason::Fallback)
                }
            },
        };
        if read {
            self.shared.metrics.read(node, reason);
        }
        if writes {
            self.shared.metrics.writes.increment(1);
        }
        self.send_unit(node);
        Ok(Flow::Continue)
    }

    /// Whether the unit must wait: replies are still coming from another node, a commit's
    /// reply is held for acknowledgement, or a read needs the session's last write position
    /// that is still on its way.
    pub(super) fn must_wait(&self, decision: Decision) -> bool {
        if self.holding || self.ack_wait.is_some() {
            return true;
        }
        // Row mode: a group that may end with a DDL message of pgrelay's is still out; the
        // message must reach the node before the next unit does (a unit's own rest goes on).
        if self.ddl_emits_pending > 0 && self.open_unit.is_none() {
            return true;
        }
        let busy = self.busy_node();
        match decision {
            Decision::Node(node, _) => busy.is_some_and(|b| b != node),
            Decision::Follower(..) => {
                self.captures_in_flight > 0
                    || busy.is_some_and(|b| !self.shared.nodes.followers().contains(&b))
            }
        }
    }

    /// The node whose replies the client is waiting for, if any.
    pub(super) fn busy_node(&self) -> Option<usize> {
        self.backends
            .iter()
            .position(|b| b.as_ref().is_some_and(|b| b.forwarding()))
    }

    /// A follower that satisfies `needs`, connected; waits up to `ryw_wait` for one to catch
    /// up. None: the read goes to the leader.
    async fn choose_follower(&mut self, needs: ReadNeeds) -> Option<usize> {
        if let Some(node) = self.try_followers(needs).await {
            return Some(node);
        }
        let wait = self.config.routing.ryw_wait;
        if wait.is_zero() {
            return None;
        }
        let started = Instant::now();
        let positions = self.shared.positions.clone();
        let followers = self.shared.nodes.followers().to_vec();
        let nodes = &self.shared.nodes;
        let database: &str = &self.database;
        let caught_up = positions
            .wait_until(wait, |p| {
                followers.iter().any(|&f| {
                    nodes.is_up(f)
                        && p.serves(f, database)
                        && needs.satisfied_by(&p.follower_in(f, database))
                })
            })
            .await;
        self.shared
            .metrics
            .ryw_wait
            .record(started.elapsed().as_secs_f64());
        if caught_up {
            self.try_followers(needs).await
        } else {
            None
        }
    }

    /// Connects to the first eligible follower, keeping pipelined reads on the follower
    /// already answering them.
    async fn try_followers(&mut self, needs: ReadNeeds) -> Option<usize> {
        let shared = self.shared.clone();
        let database = self.database.clone();
        let eligible = |node: usize| {
            shared.nodes.is_up(node)
                && shared.positions.serves(node, &database)
                && needs.satisfied_by(&shared.positions.follower_in(node, &database))
        };
        let busy = self.busy_node().filter(|&b| eligible(b));
        let rest = shared
            .nodes
            .followers_round_robin()
            .filter(|&f| eligible(f));
        for node in busy.into_iter().chain(rest) {
            if self.connect(node).await.is_ok() {
                return Some(node);
            }
        }
        None
    }

    /// Makes sure the session has a connection to `node`.
    pub(super) async fn connect(&mut self, node: usize) -> Result<(), ConnectError> {
        if self.backend_mut(node).is_some() {
            return Ok(());
        }
        match self
            .shared
            .pool
            .checkout(&self.config, node, &self.key)
            .await
        {
            Ok(conn) => {
                self.shared.nodes.mark_up(node);
                self.install_backend(conn);
                Ok(())
            }
            Err(err) => {
                warn!(error = %err, "cannot open a connection");
                // A database missing on one node says nothing about the node; any other
                // failure (unreachable, starting up, too many connections) does.
                if !err.is_missing_database() {
                    self.shared.nodes.mark_down(node);
                }
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAG: Duration = Duration::from_secs(1);

    fn follower(applied: Position, lag_ms: u64) -> FollowerState {
        FollowerState {
            up: true,
            applied: Some(applied),
            lag_bytes: 0,
            lag: Duration::from_millis(lag_ms),
        }
    }

    #[test]
    fn session_reads_need_the_last_write() {
        let needs = needs_for(Consistency::Session, Some(100), None, 0, LAG)
            .unwrap_or_else(|| unreachable!());
        assert!(
            needs.satisfied_by(&follower(100, 5_000)),
            "caught up, however laggy"
        );
        assert!(!needs.satisfied_by(&follower(99, 0)));
        let down = FollowerState {
            up: false,
            ..follower(200, 0)
        };
        assert!(!needs.satisfied_by(&down));
        // A causal token from another session raises the bar.
        let needs = needs_for(Consistency::Session, Some(100), Some(150), 0, LAG)
            .unwrap_or_else(|| unreachable!());
        assert!(!needs.satisfied_by(&follower(120, 0)));
        assert!(needs.satisfied_by(&follower(150, 0)));
    }

    #[test]
    fn a_session_without_writes_avoids_laggy_followers() {
        let needs =
            needs_for(Consistency::Session, None, None, 0, LAG).unwrap_or_else(|| unreachable!());
        assert!(needs.satisfied_by(&follower(1, 10)));
        assert!(!needs.satisfied_by(&follower(1, 2_000)));
    }

    #[test]
    fn eventual_ignores_own_writes_but_not_lag() {
        let needs = needs_for(Consistency::Eventual, Some(100), None, 0, LAG)
            .unwrap_or_else(|| unreachable!());
        assert!(needs.satisfied_by(&follower(1, 900)));
        assert!(!needs.satisfied_by(&follower(1_000, 1_001)));
    }

    #[test]
    fn global_needs_every_acknowledged_write() {
        let needs = needs_for(Consistency::Global, Some(10), None, 500, LAG)
            .unwrap_or_else(|| unreachable!());
        assert!(!needs.satisfied_by(&follower(499, 0)));
        assert!(needs.satisfied_by(&follower(500, 0)));
        assert_eq!(needs_for(Consistency::Leader, Some(1), None, 0, LAG), None);
    }
}
