//! Replication: where each follower stands relative to the leader, in one currency for every
//! mode ([`positions`]), and the mode-specific parts that produce those positions.
//!
//! - [`positions`]: the `u64` position, per-follower state published through `watch` channels.
//! - [`lag`]: lag in seconds from timestamped samples of the leader's position.
//! - [`physical`]: streaming standbys: polls the leader's WAL insert position and each
//!   follower's replay position.
//! - [`row`]: logical decoding streamed from the leader and applied by pgrelay to writable
//!   followers.
//! - [`statement`]: the statement log sessions write on the leader, replayed by pgrelay on
//!   writable followers (it shares row mode's follower task and bootstrap).
pub mod handover;
pub mod lag;
pub mod physical;
pub mod positions;
pub mod row;
pub mod statement;
