//! A follower's bootstrap runs `pg_dump` and `psql` with the replication user's password. A
//! database name that reads like a connection string must reach them as a name, not send them
//! (and the password) to another server; and the schema dump must not go to a path that anyone
//! else could have prepared in the shared temporary directory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::row::{start_row_cluster, ProxyProcess};
use common::{proxy_config, wait_until, PASSWORD, SUPERUSER};
use pgrelay::cluster::{self, NodeInfo};
use pgrelay::replication::row::setup::slot_name;

/// A TCP listener on a loopback port that counts the connections it gets (and closes them).
struct Trap {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Trap {
    async fn start() -> Trap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        Trap { port, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A client of database `db` on the node or pgrelay at `port`, the name passed as a value.
async fn connect(port: u16, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user(SUPERUSER)
        .password(PASSWORD)
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Rows of table `t` in `db` on `node`, once the table is there.
async fn rows(node: &NodeInfo, db: &str) -> Option<i64> {
    let client = connect(node.port, db).await.ok()?;
    let row = client.query_one("SELECT count(*) FROM t", &[]).await.ok()?;
    row.get(0)
}

/// Database `db` on the leader, with a table of three rows.
async fn create_database(leader: &NodeInfo, db: &str) {
    let admin = connect(leader.port, "postgres").await.unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE \"{}\"", db.replace('"', "\"\"")))
        .await
        .unwrap();
    connect(leader.port, db)
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); \
             INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')",
        )
        .await
        .unwrap();
}

/// Starts its own leader and follower and a pgrelay in `mode` that replicates every database,
/// with its temporary directory in a test directory where the paths an earlier pgrelay wrote
/// its schema dumps to are symlinks to a file; then creates a database named like a connection
/// string that points at a [`Trap`], and a plainly named one. Both must be copied, the trap
/// never called, the file never written.
async fn bootstrap_by_name_and_private_dump(mode: &str) {
    let cluster = start_row_cluster(1, &format!("bootsec_{mode}"));
    let leader = cluster.leader().clone();
    let follower = cluster.followers()[0].clone();
    let trap = Trap::start().await;
    let evil = format!("host=127.0.0.1 port={} dbname={mode}", trap.port);
    let plain = format!("plain_{mode}");

    let tmp = cluster::test_dir(&format!("bootsec_{mode}_tmp"));
    std::fs::create_dir_all(&tmp).unwrap();
    let victim = tmp.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    for db in [&evil, &plain] {
        plant(&tmp, mode, &follower.name, db, &victim);
    }

    let config = proxy_config(
        &leader,
        std::slice::from_ref(&follower),
        &format!("\n[replication]\nmode = \"{mode}\"\nuser = \"{SUPERUSER}\"\n"),
    );
    let proxy =
        ProxyProcess::start_with_env(&config, &tmp, "pgrelay", &[("TMPDIR", tmp.as_os_str())]);
    // Created after pgrelay started: it finds them itself.
    create_database(&leader, &evil).await;
    create_database(&leader, &plain).await;
    for db in [&evil, &plain] {
        wait_until(Duration::from_secs(60), || async {
            rows(&follower, db).await == Some(3)
        })
        .await;
    }
    // And what is written through pgrelay after the bootstrap follows.
    connect(proxy.addr.port(), &evil)
        .await
        .unwrap()
        .batch_execute("INSERT INTO t VALUES (4, 'd')")
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), || async {
        rows(&follower, &evil).await == Some(4)
    })
    .await;
    assert_eq!(trap.connections(), 0, "a tool connected to the trap");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    // The dumps went to directories of their own, removed once restored.
    wait_until(Duration::from_secs(30), || async {
        dump_dirs(&tmp).is_empty()
    })
    .await;
    drop(proxy);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The directories under `tmp` that hold a schema dump.
fn dump_dirs(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pgrelay-bootstrap-"))
        .collect()
}

/// Symlinks to `victim` where pgrelay used to write the schema dump of `db` (row mode: a file
/// named after the slot; statement mode: a file in a directory named after it).
fn plant(tmp: &Path, mode: &str, follower: &str, db: &str, victim: &Path) {
    let slot = slot_name(follower, db);
    let link = if mode == "row" {
        tmp.join(format!("pgrelay-schema-{slot}.sql"))
    } else {
        let dir = tmp.join(format!("pgrelay-statement-{slot}"));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("pgrelay-schema-statement.sql")
    };
    std::os::unix::fs::symlink(victim, link).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_mode_bootstrap_passes_names_as_values_and_dumps_privately() {
    bootstrap_by_name_and_private_dump("row").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_mode_bootstrap_passes_names_as_values_and_dumps_privately() {
    bootstrap_by_name_and_private_dump("statement").await;
}
