//! Which node a statement may run on.
//!
//! - [`lexer`]: tokens of Postgres SQL text (strings, dollar quotes, comments), no allocation.
//! - [`classify`]: read / write / transaction control / session state of a query string.
//! - [`ddl`]: which statements row-mode replication carries to the followers, and their tags.
//! - [`determinism`]: statement mode's rewrite of write statements into deterministic ones.
//! - [`functions`]: the function calls that keep a statement on the leader.
//! - [`classifiers`]: one classifier per database, with that database's writing functions.
//! - [`nodes`]: the nodes and whether each is available.
//! - [`own_schema`]: client statements that name pgrelay's own schema (refused).
pub mod classifiers;
pub mod classify;
pub mod ddl;
pub mod determinism;
pub mod functions;
pub mod lexer;
pub mod nodes;
pub mod own_schema;

pub use nodes::NodeRegistry;
