//! Which node a statement may run on.
pub mod classify;
pub mod functions;
pub mod lexer;
