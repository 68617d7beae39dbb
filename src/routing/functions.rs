//! Which function calls make a statement leader-only.
//!
//! A read may go to a follower only if nothing it calls has side effects or depends on state
//! that lives on the leader. Postgres marks most built-in functions `immutable` or `stable`,
//! which guarantees they cannot write, but "volatile" (`provolatile = 'v'`) is far too broad a
//! test for the built-ins: `random()`, `clock_timestamp()`, `pg_sleep()`, `pg_is_in_recovery()`
//! and `pg_last_wal_replay_lsn()` are volatile yet harmless on a hot standby, and routing health
//! checks such as `SELECT pg_is_in_recovery()` to the leader would defeat their purpose. So the
//! side-effecting built-ins are listed here by name ([`BUILTIN_WRITING_FUNCTIONS`], checked
//! against `pg_proc` of Postgres 15 with `provolatile = 'v'` in `pg_catalog`), while every
//! user-defined volatile function may write and is loaded from the leader with
//! [`WRITING_FUNCTIONS_SQL`] (a `stable` or `immutable` function cannot modify the database:
//! Postgres refuses to run data-modifying SQL inside one).
//!
//! See <https://www.postgresql.org/docs/current/xfunc-volatility.html> and
//! <https://www.postgresql.org/docs/current/functions-admin.html>.

/// Returns the lowercase names of the user-defined volatile functions (and procedures) on the
/// leader; the caller passes them to [`super::classify::Classifier::new`]. Extensions installed
/// outside `pg_catalog` (dblink, uuid-ossp, …) are included, which errs on the leader's side.
pub const WRITING_FUNCTIONS_SQL: &str = include_str!("../../sql/writing_functions.sql");

/// Built-in functions that must run on the leader: they write, take locks or session state that
/// later statements rely on, act on one node's processes or files, or fail on a standby.
pub const BUILTIN_WRITING_FUNCTIONS: &[&str] = &[
    // Sequences. currval/lastval read state that nextval left in the leader session.
    "nextval",
    "setval",
    "currval",
    "lastval",
    // Session state a follower would not share.
    "set_config",
    "setseed",
    // Assign a transaction id, which a standby cannot.
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    // WAL positions and control: error on a standby.
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    // Immutable, but they refuse to run during recovery.
    "pg_walfile_name",
    "pg_walfile_name_offset",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_log_standby_snapshot",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_promote",
    // Replay control only makes sense on a chosen standby, never on a random one.
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    // Notifications are delivered from the leader.
    "pg_notify",
    "pg_logical_emit_message",
    // Large objects: writers, and the descriptor functions whose descriptor lo_open made on the
    // leader. lo_get (a pure read) is left to followers.
    "lo_create",
    "lo_creat",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lo_open",
    "lo_close",
    "lowrite",
    "loread",
    "lo_lseek",
    "lo_lseek64",
    "lo_tell",
    "lo_tell64",
    "lo_truncate",
    "lo_truncate64",
    // Replication slots (logical decoding does not run on a PG 15 standby, and get_changes
    // consumes the slot).
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_replication_slot_advance",
    "pg_logical_slot_get_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_slot_peek_changes",
    "pg_logical_slot_peek_binary_changes",
    // Act on a process or on the server configuration of one particular node.
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_rotate_logfile_old",
    "pg_log_backend_memory_contexts",
    // Write catalogs or indexes.
    "pg_import_system_collations",
    "pg_extension_config_dump",
    "pg_nextoid",
    "pg_stop_making_pinned_objects",
    "brin_summarize_new_values",
    "brin_summarize_range",
    "brin_desummarize_range",
    "gin_clean_pending_list",
    // Run SQL text (or a cursor) we cannot see.
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "ts_stat",
    "ts_rewrite",
    // Common extension: it is volatile outside pg_catalog, so WRITING_FUNCTIONS_SQL finds it
    // too; listed for clusters where the caller could not load the list.
    "dblink_exec",
];

/// Families matched by prefix, so that new members in later Postgres versions are covered too.
pub const WRITING_FUNCTION_PREFIXES: &[&str] = &[
    "pg_advisory_",
    "pg_try_advisory_",
    "pg_stat_reset",
    "pg_replication_origin_",
    "binary_upgrade_",
];

/// Functions that leave session-level state on the leader which later statements depend on:
/// session advisory locks (the `_xact_` variants end with the transaction) and a replication
/// origin bound to the session.
pub const PINNING_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_replication_origin_session_setup",
];
