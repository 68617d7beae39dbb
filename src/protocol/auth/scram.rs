//! SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding, as Postgres uses it.
//! TO BE WRITTEN: see the task description.
