//! Postgres md5 password hashing.
//! TO BE WRITTEN: see the task description.
