//! Connections from pgrelay to nodes: opening and authenticating them, and the pool that hands
//! them to sessions.
pub mod conn;
pub mod pool;

pub use conn::{BackendConn, ConnectError};
pub use pool::Pool;
