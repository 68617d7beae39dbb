//! Which node a statement may run on.
//!
//! - [`lexer`]: tokens of Postgres SQL text (strings, dollar quotes, comments), no allocation.
//! - [`classify`]: read / write / transaction control / session state of a query string.
//! - [`functions`]: the function calls that keep a statement on the leader.
pub mod classify;
pub mod functions;
pub mod lexer;
