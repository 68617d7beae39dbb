//! Which node a statement may run on.
pub mod classify;
