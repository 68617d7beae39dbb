//! Replication lag in seconds: how long ago the leader was where a follower is now. The leader's
//! position is sampled with timestamps; a follower at position P lags by the time since the
//! leader first went past P. On an idle cluster that is 0, under load it is the true delay.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::positions::Position;

/// Timestamped samples of the leader's position, oldest first, kept for `horizon`.
#[derive(Debug)]
pub struct LeaderHistory {
    samples: VecDeque<(Instant, Position)>,
    horizon: Duration,
}

impl LeaderHistory {
    pub fn new(horizon: Duration) -> Self {
        LeaderHistory {
            samples: VecDeque::new(),
            horizon,
        }
    }

    /// Records the leader's position at `at`. Only changes are kept: a sample says "from this
    /// moment the leader was at this position".
    pub fn record(&mut self, at: Instant, position: Position) {
        match self.samples.back() {
            Some(&(_, last)) if last >= position => {}
            _ => self.samples.push_back((at, position)),
        }
        while self.samples.len() > 1 {
            match self.samples.front() {
                Some(&(t, _)) if at.saturating_duration_since(t) > self.horizon => {
                    self.samples.pop_front();
                }
                _ => break,
            }
        }
    }

    pub fn latest(&self) -> Option<Position> {
        self.samples.back().map(|&(_, p)| p)
    }

    /// How long ago, as of `now`, the leader first went past `applied`; zero if it never did.
    /// Older than the history reaches counts as the history's full age.
    pub fn lag(&self, applied: Position, now: Instant) -> Duration {
        // The first sample beyond `applied` is when the leader moved past it.
        let idx = self.samples.partition_point(|&(_, p)| p <= applied);
        match self.samples.get(idx) {
            None => Duration::ZERO,
            Some(&(t, _)) => now.saturating_duration_since(t),
        }
    }

    /// Bytes between the leader's latest position and `applied`.
    pub fn lag_bytes(&self, applied: Position) -> u64 {
        self.latest().map_or(0, |l| l.saturating_sub(applied))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_cluster_has_no_lag() {
        let t0 = Instant::now();
        let mut h = LeaderHistory::new(Duration::from_secs(60));
        h.record(t0, 100);
        h.record(t0 + Duration::from_secs(5), 100);
        assert_eq!(h.lag(100, t0 + Duration::from_secs(10)), Duration::ZERO);
        assert_eq!(h.lag_bytes(100), 0);
    }

    #[test]
    fn lag_is_time_since_the_leader_passed_the_follower() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut h = LeaderHistory::new(Duration::from_secs(60));
        h.record(t0, 100);
        h.record(t0 + ms(100), 200);
        h.record(t0 + ms(200), 300);
        h.record(t0 + ms(300), 400);
        let now = t0 + ms(350);
        // At 250 the follower is where the leader was between 200 and 300 ms: the leader went
        // past 250 at 200 ms, 150 ms ago.
        assert_eq!(h.lag(250, now), ms(150));
        assert_eq!(h.lag(100, now), ms(250));
        assert_eq!(h.lag(400, now), Duration::ZERO);
        assert_eq!(h.lag(500, now), Duration::ZERO);
        assert_eq!(h.lag_bytes(250), 150);
    }

    #[test]
    fn history_is_bounded_by_its_horizon() {
        let t0 = Instant::now();
        let mut h = LeaderHistory::new(Duration::from_secs(1));
        for i in 0..100u64 {
            h.record(t0 + Duration::from_millis(i * 100), i);
        }
        assert!(h.samples.len() <= 12, "{}", h.samples.len());
        // A follower older than the history lags at least the history's age.
        assert!(h.lag(0, t0 + Duration::from_millis(9_900)) >= Duration::from_secs(1));
    }

    #[test]
    fn going_backwards_is_ignored() {
        let t0 = Instant::now();
        let mut h = LeaderHistory::new(Duration::from_secs(60));
        h.record(t0, 200);
        h.record(t0 + Duration::from_millis(10), 150);
        assert_eq!(h.latest(), Some(200));
    }
}
