//! Positions: the one currency in which every replication mode answers "what position did this
//! commit reach on the leader?" and "up to what position has follower F applied?". In
//! `physical` and `row` mode a position is a WAL LSN of the leader; in `statement` mode it is the
//! `seq` of a database's statement log, so there every database has positions of its own
//! ([`Positions::use_database_positions`]).
//!
//! Each follower's state is published through a `tokio::sync::watch` channel, so the router,
//! the metrics and the acknowledgement waiters read it without locks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// An ordered replication position (WAL LSN in physical and row mode).
pub type Position = u64;

/// Parses Postgres's LSN text form `X/Y` (both hexadecimal).
pub fn parse_lsn(text: &str) -> Option<Position> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// Formats a position as Postgres writes an LSN.
pub fn format_lsn(position: Position) -> String {
    format!("{:X}/{:X}", position >> 32, position & 0xffff_ffff)
}

/// What pgrelay knows of one follower.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FollowerState {
    /// The follower answered its last position poll.
    pub up: bool,
    /// The position it has applied (replayed), if known.
    pub applied: Option<Position>,
    pub lag_bytes: u64,
    pub lag: Duration,
}

impl Default for FollowerState {
    fn default() -> Self {
        FollowerState {
            up: false,
            applied: None,
            lag_bytes: 0,
            lag: Duration::ZERO,
        }
    }
}

impl FollowerState {
    /// Whether the follower has applied `position` (and is up).
    pub fn has_applied(&self, position: Position) -> bool {
        self.up && self.applied.is_some_and(|a| a >= position)
    }
}

/// The positions of the leader and every follower, shared by all sessions.
#[derive(Debug)]
pub struct Positions {
    /// Node index -> follower state channel (None for the leader).
    followers: Vec<Option<watch::Sender<FollowerState>>>,
    leader: AtomicU64,
    /// The highest commit position pgrelay acknowledged to any client ("global" reads wait
    /// for it).
    acknowledged: AtomicU64,
    /// Bumped on every follower update, so a waiter can sleep until anything changed.
    changed: watch::Sender<u64>,
    /// Node index -> a nudge for that follower's watcher to poll now rather than at its next
    /// tick: a read or a commit is waiting for it.
    poll_now: Vec<Notify>,
    /// Node index -> the databases the follower can serve; None: all of them (a physical
    /// standby). In row mode a database is served only once its bootstrap is done.
    databases: Vec<RwLock<Option<HashSet<String>>>>,
    /// Statement mode: positions are per database (each database has its own log).
    per_database: AtomicBool,
    /// Node index -> database -> applied position (statement mode).
    db_applied: Vec<RwLock<HashMap<String, Position>>>,
    /// Database -> the highest position acknowledged in it (statement mode).
    db_acknowledged: RwLock<HashMap<String, Position>>,
    /// Bumped by [`Positions::reset`]: a position from an earlier epoch is in another
    /// currency, and was applied everywhere before the reset.
    epoch: AtomicU64,
}

impl Positions {
    /// `followers`: the node indexes of the followers; `nodes`: how many nodes there are.
    pub fn new(nodes: usize, followers: &[usize]) -> Self {
        let mut chans: Vec<Option<watch::Sender<FollowerState>>> =
            (0..nodes).map(|_| None).collect();
        for &f in followers {
            if let Some(slot) = chans.get_mut(f) {
                *slot = Some(watch::Sender::new(FollowerState::default()));
            }
        }
        Positions {
            followers: chans,
            leader: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            changed: watch::Sender::new(0),
            poll_now: (0..nodes).map(|_| Notify::new()).collect(),
            databases: (0..nodes).map(|_| RwLock::new(None)).collect(),
            per_database: AtomicBool::new(false),
            db_applied: (0..nodes).map(|_| RwLock::new(HashMap::new())).collect(),
            db_acknowledged: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    /// A live mode switch: every follower applied everything under the old mode, whose
    /// positions mean nothing to the new one. Forgets them all (followers count as down until
    /// the new mode publishes them), keeps positions per database when `per_database`, and
    /// starts a new epoch.
    pub fn reset(&self, per_database: bool) {
        self.per_database.store(per_database, Ordering::Release);
        self.leader.store(0, Ordering::Release);
        self.acknowledged.store(0, Ordering::Release);
        if let Ok(mut map) = self.db_acknowledged.write() {
            map.clear();
        }
        for map in &self.db_applied {
            if let Ok(mut map) = map.write() {
                map.clear();
            }
        }
        for tx in self.followers.iter().flatten() {
            tx.send_replace(FollowerState::default());
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The epoch positions are counted in now (see [`Positions::reset`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Statement mode: from now on a follower's applied position and the acknowledged
    /// position are kept per database ([`Positions::publish_database`]).
    pub fn use_database_positions(&self) {
        self.per_database.store(true, Ordering::Release);
    }

    fn per_database(&self) -> bool {
        self.per_database.load(Ordering::Acquire)
    }

    /// Statement mode: `node` has applied `database`'s log up to `applied`.
    pub fn publish_database(&self, node: usize, database: &str, applied: Position) {
        if let Some(Ok(mut map)) = self.db_applied.get(node).map(|l| l.write()) {
            match map.get_mut(database) {
                Some(p) => *p = applied,
                None => {
                    map.insert(database.to_owned(), applied);
                }
            }
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Statement mode: the position `node` has applied in `database`, if known.
    pub fn database_applied(&self, node: usize, database: &str) -> Option<Position> {
        match self.db_applied.get(node).map(|l| l.read()) {
            Some(Ok(map)) => map.get(database).copied(),
            _ => None,
        }
    }

    /// The follower's state as a reader of `database` sees it: in statement mode its applied
    /// position is that database's.
    pub fn follower_in(&self, node: usize, database: &str) -> FollowerState {
        let mut state = self.follower(node);
        if self.per_database() {
            state.applied = self.database_applied(node, database);
        }
        state
    }

    /// Asks every follower watcher to poll at once.
    pub fn request_poll(&self) {
        for n in &self.poll_now {
            n.notify_one();
        }
    }

    /// Resolves when someone asked `node`'s watcher to poll now.
    pub async fn poll_requested(&self, node: usize) {
        match self.poll_now.get(node) {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    }

    pub fn follower(&self, node: usize) -> FollowerState {
        match self.followers.get(node) {
            Some(Some(tx)) => *tx.borrow(),
            _ => FollowerState::default(),
        }
    }

    pub fn subscribe(&self, node: usize) -> Option<watch::Receiver<FollowerState>> {
        match self.followers.get(node) {
            Some(Some(tx)) => Some(tx.subscribe()),
            _ => None,
        }
    }

    pub fn publish(&self, node: usize, state: FollowerState) {
        if let Some(Some(tx)) = self.followers.get(node) {
            tx.send_replace(state);
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Says which databases `node` can serve (None: every database).
    pub fn set_databases(&self, node: usize, databases: Option<HashSet<String>>) {
        if let Some(Ok(mut slot)) = self.databases.get(node).map(|l| l.write()) {
            *slot = databases;
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Whether `node` has `database` (in row mode: copied and being applied).
    pub fn serves(&self, node: usize, database: &str) -> bool {
        match self.databases.get(node).map(|l| l.read()) {
            Some(Ok(slot)) => slot.as_ref().is_none_or(|d| d.contains(database)),
            _ => false,
        }
    }

    pub fn set_leader(&self, position: Position) {
        self.leader.fetch_max(position, Ordering::AcqRel);
    }

    pub fn leader(&self) -> Position {
        self.leader.load(Ordering::Acquire)
    }

    /// pgrelay told a client that a commit at `position` in `database` is done.
    pub fn acknowledge(&self, position: Position, database: &str) {
        if self.per_database() {
            if let Ok(mut map) = self.db_acknowledged.write() {
                let p = map.entry(database.to_owned()).or_insert(0);
                *p = (*p).max(position);
            }
            return;
        }
        self.acknowledged.fetch_max(position, Ordering::AcqRel);
    }

    /// The highest position acknowledged to any client (in `database`, in statement mode).
    pub fn acknowledged(&self, database: &str) -> Position {
        if self.per_database() {
            return match self.db_acknowledged.read() {
                Ok(map) => map.get(database).copied().unwrap_or(0),
                Err(_) => 0,
            };
        }
        self.acknowledged.load(Ordering::Acquire)
    }

    /// A receiver that changes whenever any follower's state does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// How many followers have applied `position` in `database` (a row-mode follower counts
    /// only for the databases it has copied).
    pub fn applied_count(&self, position: Position, database: &str) -> usize {
        self.followers
            .iter()
            .enumerate()
            .filter(|(node, tx)| {
                tx.is_some()
                    && self.follower_in(*node, database).has_applied(position)
                    && self.serves(*node, database)
            })
            .count()
    }

    /// How many followers are up.
    pub fn up_count(&self) -> usize {
        self.followers
            .iter()
            .flatten()
            .filter(|tx| tx.borrow().up)
            .count()
    }

    /// Waits until `enough` says the followers' states suffice, or `timeout` passed; returns
    /// whether they did.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut enough: impl FnMut(&Positions) -> bool,
    ) -> bool {
        let mut changes = self.changes();
        let wait = async {
            loop {
                if enough(self) {
                    return;
                }
                // While someone waits, the watchers poll without waiting for their tick.
                self.request_poll();
                if changes.changed().await.is_err() {
                    // The sender lives as long as `self`; unreachable in practice.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(parse_lsn("1/"), None);
        assert_eq!(parse_lsn("100000000/0"), None);
    }

    #[test]
    fn a_follower_counts_only_for_the_databases_it_serves() {
        let p = Positions::new(3, &[1, 2]);
        for node in [1, 2] {
            p.publish(
                node,
                FollowerState {
                    up: true,
                    applied: Some(50),
                    ..FollowerState::default()
                },
            );
        }
        // Node 1 is a row-mode follower that has copied only "app"; node 2 a standby.
        p.set_databases(1, Some(HashSet::from(["app".to_owned()])));
        assert!(p.serves(1, "app") && !p.serves(1, "other"));
        assert!(p.serves(2, "other"));
        assert_eq!(p.applied_count(40, "app"), 2);
        assert_eq!(p.applied_count(40, "other"), 1);
        assert_eq!(p.applied_count(60, "app"), 0);
    }

    #[tokio::test]
    async fn waiters_wake_when_a_follower_catches_up() {
        let p = std::sync::Arc::new(Positions::new(3, &[1, 2]));
        assert_eq!(p.applied_count(10, "db"), 0);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move {
                p.wait_until(Duration::from_secs(10), |p| p.applied_count(10, "db") >= 1)
                    .await
            })
        };
        p.publish(
            2,
            FollowerState {
                up: true,
                applied: Some(12),
                ..FollowerState::default()
            },
        );
        assert!(waiter.await.unwrap());
        assert!(
            !p.wait_until(Duration::from_millis(10), |p| p.applied_count(10, "db")
                >= 2)
                .await
        );
        assert_eq!(p.up_count(), 1);
    }
}
