//! The trust model, tried as an attacker with an ordinary role would: nothing a client sends
//! runs with more rights on a follower than the client has on the leader, replication input
//! pgrelay did not write is refused, and pgrelay's own schema is out of the clients' reach.
//! Row and statement mode, against real servers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::row::{
    leader_database, row_cluster, row_config, statement_applied, statement_config, value_on,
    wait_bootstrapped,
};
use common::{connect_direct, metric, scrape, sqlstate, start_proxy_with_metrics, ClusterInfo};
use pgrelay::cluster::NodeInfo;
use tokio::sync::OnceCell;

/// An ordinary role: no superuser, no CREATEROLE, no membership in anything.
const ROLE: &str = "sec_app";
const ROLE_PASSWORD: &str = "sec-pw";

const CONVERGE: Duration = Duration::from_secs(60);

/// The row cluster, with [`ROLE`] on every node (roles are not replicated).
async fn cluster() -> &'static ClusterInfo {
    static ROLES: OnceCell<()> = OnceCell::const_new();
    let info = row_cluster();
    ROLES
        .get_or_init(|| async {
            for node in std::iter::once(&info.leader).chain(&info.followers) {
                connect_direct(node, "postgres")
                    .await
                    .batch_execute(&format!(
                        "CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'"
                    ))
                    .await
                    .unwrap();
            }
        })
        .await;
    info
}

/// `[[users]]` for [`ROLE`], added to the harness's users.
fn users() -> String {
    format!("\n[[users]]\nname = \"{ROLE}\"\npassword = \"{ROLE_PASSWORD}\"\n")
}

/// A database owned by [`ROLE`] with a table `t`, and a proxy replicating it in `mode`.
async fn setup(mode: &str, prefix: &str) -> (&'static ClusterInfo, String, SocketAddr, SocketAddr) {
    let info = cluster().await;
    let db = leader_database(&info.leader, prefix).await;
    let admin = connect_direct(&info.leader, "postgres").await;
    admin
        .batch_execute(&format!("ALTER DATABASE {db} OWNER TO {ROLE}"))
        .await
        .unwrap();
    connect_direct(&info.leader, &db)
        .await
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY); ALTER TABLE t OWNER TO {ROLE}"
        ))
        .await
        .unwrap();
    let config = match mode {
        "row" => row_config(info, &db, &users()),
        _ => statement_config(info, &db, &users()),
    };
    let (addr, metrics) = start_proxy_with_metrics(config).await;
    match mode {
        "row" => wait_bootstrapped(info, &db).await,
        _ => {
            for f in &info.followers {
                common::wait_until(CONVERGE, || async {
                    statement_applied(f, &db).await.is_some()
                })
                .await;
            }
        }
    }
    (info, db, addr, metrics)
}

/// A client logged in to pgrelay as [`ROLE`].
async fn connect_as_role(addr: SocketAddr, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={ROLE} password={ROLE_PASSWORD} dbname={db}",
            addr.port()
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Waits until row `id` of `t` is on every follower: everything written before it was
/// replayed or applied (or refused) there.
async fn wait_for_row(info: &ClusterInfo, db: &str, id: i32) {
    for f in &info.followers {
        let c = connect_direct(f, db).await;
        common::wait_until(CONVERGE, || async {
            c.query_opt("SELECT 1 FROM t WHERE id = $1", &[&id])
                .await
                .is_ok_and(|r| r.is_some())
        })
        .await;
    }
}

/// What [`ROLE`] is on `node`: (superuser, may create roles, roles it is a member of).
async fn rights(node: &NodeInfo) -> (bool, bool, i64) {
    let row = connect_direct(node, "postgres")
        .await
        .query_one(
            "SELECT rolsuper, rolcreaterole, \
                    (SELECT count(*) FROM pg_auth_members m WHERE m.member = r.oid) \
             FROM pg_roles r WHERE rolname = $1",
            &[&ROLE],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// [`ROLE`] is as plain as it was created, on every node.
async fn assert_no_new_rights(info: &ClusterInfo) {
    for node in std::iter::once(&info.leader).chain(&info.followers) {
        assert_eq!(
            rights(node).await,
            (false, false, 0),
            "{ROLE} on {}",
            node.name
        );
    }
}

/// Ways back to the replaying connection's own role, each followed by a DO block that asks
/// for superuser and swallows the leader's refusal.
const ESCALATIONS: [&str; 4] = [
    "SET ROLE NONE",
    "RESET ROLE",
    "SELECT set_config('role', 'none', false)",
    "SELECT set_config('role', 'none', true)",
];

fn escalation(way_back: &str) -> String {
    format!(
        "{way_back}; DO $$BEGIN EXECUTE 'ALTER ROLE {ROLE} SUPERUSER'; \
         EXECUTE 'ALTER ROLE {ROLE} CREATEROLE'; \
         EXECUTE 'GRANT pg_execute_server_program TO {ROLE}'; \
         EXCEPTION WHEN insufficient_privilege THEN NULL; END$$"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_mode_replays_with_the_authors_rights_only() {
    let (info, db, addr, _) = setup("statement", "sec_stmt").await;
    let c = connect_as_role(addr, &db).await;
    for (i, way_back) in ESCALATIONS.iter().enumerate() {
        // In a transaction with a write, so that the whole string is logged and replayed.
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO t VALUES ({}); {}; COMMIT",
            i + 1,
            escalation(way_back)
        ))
        .await
        .unwrap();
    }
    c.batch_execute("INSERT INTO t VALUES (100)").await.unwrap();
    wait_for_row(info, &db, 100).await;
    assert_no_new_rights(info).await;
    // The replay ran: the rows are there.
    for f in &info.followers {
        let n: i64 = connect_direct(f, &db)
            .await
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, ESCALATIONS.len() as i64 + 1, "{}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_mode_superuser_ddl_still_replicates() {
    let (info, db, addr, _) = setup("statement", "sec_stmt_su").await;
    let su = common::connect_proxy(addr, &db).await;
    su.batch_execute(
        "CREATE TABLE owned_by_admin (a int); INSERT INTO owned_by_admin VALUES (1); \
         INSERT INTO t VALUES (7)",
    )
    .await
    .unwrap();
    wait_for_row(info, &db, 7).await;
    for f in &info.followers {
        let owner = value_on::<String>(
            f,
            &db,
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'owned_by_admin'",
        )
        .await;
        assert_eq!(owner, common::SUPERUSER, "{}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_log_is_written_only_through_pgrelay() {
    let (info, db, addr, _) = setup("statement", "sec_log").await;
    // Directly on the leader, as the ordinary role: the log, its sequence and the replay
    // bookkeeping are nobody else's.
    let (direct, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user={ROLE} password={ROLE_PASSWORD} dbname={db}",
            info.leader.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    for sql in [
        "INSERT INTO pgrelay.statement_log (seq, role, settings, statements) \
         VALUES (9000000000000000000, 'relay_admin', '[]', '[]')",
        "SELECT nextval('pgrelay.statement_seq')",
        "SELECT setval('pgrelay.statement_seq', 9000000000000000000)",
        "SELECT seq FROM pgrelay.statement_log",
    ] {
        let err = direct.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
    }
    // Through pgrelay, anything naming schema pgrelay is refused, with either protocol and
    // in a transaction too (which it fails, as a server error would).
    let c = connect_as_role(addr, &db).await;
    for sql in [
        "SELECT pgrelay.log_append('[]', '[]', NULL, NULL)",
        "INSERT INTO \"pgrelay\".statement_log VALUES (1)",
        "SELECT * FROM pgrelay.applied",
    ] {
        let err = c.batch_execute(sql).await.unwrap_err();
        assert_eq!(sqlstate(&err), "42501", "simple {sql}: {err}");
        let err = c.query(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "42501", "extended {sql}: {err}");
    }
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let err = c
        .batch_execute("SELECT pgrelay.log_append('[]', '[]', NULL, NULL)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
    let err = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02", "the transaction failed: {err}");
    c.batch_execute("ROLLBACK").await.unwrap();
    // pgrelay's own settings are not objects: they still work.
    c.batch_execute("SET pgrelay.consistency = 'leader'; RESET pgrelay.consistency")
        .await
        .unwrap();
    // And ordinary writes still replicate.
    c.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    wait_for_row(info, &db, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_mode_refuses_ddl_messages_pgrelay_did_not_write() {
    let (info, db, addr, metrics) = setup("row", "sec_row").await;
    let c = connect_as_role(addr, &db).await;
    // The original attack: a message in the old format claiming the superuser's role, and
    // one in the new format with a made-up signature.
    let forged = [
        format!("relay_admin\npublic\nALTER ROLE {ROLE} SUPERUSER"),
        format!(
            "v2\n{}\nrelay_admin\nrelay_admin\npublic\nALTER ROLE {ROLE} SUPERUSER",
            "00".repeat(32)
        ),
    ];
    for content in &forged {
        c.query(
            "SELECT pg_logical_emit_message(true, 'pgrelay.ddl', $1::text)",
            &[content],
        )
        .await
        .unwrap();
    }
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    wait_for_row(info, &db, 1).await;
    assert_no_new_rights(info).await;
    let text = scrape(metrics).await;
    let refused = |reason: &str| {
        metric(
            &text,
            &format!("pgrelay_replication_refused_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    // One of each per follower (or more, had an applier restarted before its commit and read
    // them again).
    assert!(refused("unsigned") >= info.followers.len() as f64, "{text}");
    assert!(
        refused("signature") >= info.followers.len() as f64,
        "{text}"
    );
    // Replication goes on, DDL through pgrelay included: as the role that ran it.
    c.batch_execute(
        "CREATE TABLE mine (a int); INSERT INTO mine VALUES (1); INSERT INTO t VALUES (2)",
    )
    .await
    .unwrap();
    wait_for_row(info, &db, 2).await;
    for f in &info.followers {
        let owner = value_on::<String>(
            f,
            &db,
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'mine'",
        )
        .await;
        assert_eq!(owner, ROLE, "{}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_mode_ddl_cannot_return_to_the_appliers_role() {
    let (info, db, addr, _) = setup("row", "sec_row_ddl").await;
    let c = connect_as_role(addr, &db).await;
    c.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    wait_for_row(info, &db, 1).await;
    // Genuine DDL through pgrelay that runs the author's code while it applies: a volatile
    // default is computed for every row. The code switches back to the session's own role;
    // on the leader that is the author, on the follower it must not be the applier's.
    c.batch_execute(&format!(
        "CREATE FUNCTION esc() RETURNS int LANGUAGE plpgsql AS $f$ BEGIN \
           PERFORM set_config('role', 'none', true); \
           EXECUTE 'ALTER ROLE {ROLE} SUPERUSER'; RETURN 1; \
         EXCEPTION WHEN insufficient_privilege THEN RETURN 2; END $f$; \
         ALTER TABLE t ADD COLUMN c int DEFAULT esc(); INSERT INTO t VALUES (3)"
    ))
    .await
    .unwrap();
    wait_for_row(info, &db, 3).await;
    assert_no_new_rights(info).await;
    for f in &info.followers {
        let owner = value_on::<String>(
            f,
            &db,
            "SELECT pg_get_userbyid(proowner)::text FROM pg_proc WHERE proname = 'esc'",
        )
        .await;
        assert_eq!(owner, ROLE, "{}", f.name);
    }
}
