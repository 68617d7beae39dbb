//! Placeholder until the determinism rewriter lands (branch `determinism`).
use std::collections::HashSet;

#[derive(Debug, Default)]
pub struct Catalog {}

impl Catalog {
    pub const LOAD_SQL: &'static str = "SELECT 1 WHERE false";
    pub fn from_rows(_rows: Vec<Vec<Option<String>>>) -> Catalog {
        Catalog {}
    }
}

pub struct Context<'a> {
    pub catalog: &'a Catalog,
    pub search_path: &'a [String],
    pub serialize_writes: bool,
    pub temp_tables: &'a HashSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Keep,
    Rewrite(String),
    Local,
    Unsafe(Unsafe),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsafe {
    pub construct: String,
    pub reason: String,
}

pub fn make_deterministic(_sql: &str, _cx: &Context) -> Outcome {
    Outcome::Keep
}

pub fn temp_table_created(_sql: &str) -> Option<String> {
    None
}
