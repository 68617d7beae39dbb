//! Nodes going away: reads keep working while another node can serve them, and writes get an
//! error that names the leader while it is down. This binary has a cluster of its own, since it
//! stops nodes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::HashSet;
use std::sync::Mutex;

use pgrelay::cluster::{self, LocalCluster};

use common::*;

static OWN: Mutex<Option<LocalCluster>> = Mutex::new(None);

#[tokio::test]
async fn reads_survive_a_follower_and_the_leader_going_down() {
    let c = tokio::task::spawn_blocking(|| start_cluster(2, "down"))
        .await
        .unwrap();
    let leader = c.leader().clone();
    let followers = c.followers().to_vec();
    *OWN.lock().unwrap() = Some(c);
    cluster::stop_at_exit(&OWN);
    let (proxy, metrics) = start_proxy_with_metrics(proxy_config(&leader, &followers, "")).await;
    let setup = connect_direct(&leader, "postgres").await;
    setup
        .batch_execute("CREATE TABLE t (id int)")
        .await
        .unwrap();
    wait_replicated(&leader, &followers).await;

    let client = connect_proxy(proxy, "postgres").await;
    let read = "SELECT inet_server_port(), count(*) FROM t";
    let ports = |rows: &[i32]| rows.iter().copied().collect::<HashSet<i32>>();
    let mut served = Vec::new();
    for _ in 0..4 {
        served.push(client.query_one(read, &[]).await.unwrap().get::<_, i32>(0));
    }
    assert_eq!(ports(&served).len(), 2, "both followers serve reads");

    // One follower stops: every read still succeeds, served by the other, and the follower
    // leaves routing within a second.
    // A read is running on it when it stops: it runs again on the other follower.
    let stopped = followers[0].clone();
    let sleeper = connect_proxy(proxy, "postgres").await;
    let watcher = connect_direct(&stopped, "postgres").await;
    let slow_read = "SELECT inet_server_port(), pg_sleep(1)";
    let in_flight = loop {
        let sleeper = &sleeper;
        let mut read = Box::pin(async move { sleeper.query(slow_read, &[]).await });
        let running_there = tokio::select! {
            done = &mut read => { done.unwrap(); false }
            found = async {
                loop {
                    let n: i64 = watcher
                        .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(1)%' AND state = 'active' AND pid <> pg_backend_pid()", &[])
                        .await
                        .unwrap()
                        .get(0);
                    if n > 0 {
                        return true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            } => found,
        };
        if running_there {
            break read;
        }
    };
    drop(watcher);
    let name = stopped.name.clone();
    let stop = tokio::task::spawn_blocking(move || {
        OWN.lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .stop_node(&name)
            .unwrap()
    });
    let rows = in_flight.await.expect("the read was retried, not failed");
    assert_eq!(rows[0].get::<_, i32>(0), i32::from(followers[1].port));
    stop.await.unwrap();
    let up = format!("pgrelay_follower_up{{follower=\"{}\"}}", stopped.name);
    wait_until(std::time::Duration::from_secs(1), || async {
        metric(&scrape(metrics).await, &up) == Some(0.0)
    })
    .await;
    let mut served = Vec::new();
    for _ in 0..10 {
        let row = client.query_one(read, &[]).await.unwrap();
        served.push(row.get::<_, i32>(0));
    }
    assert!(!served.contains(&i32::from(followers[0].port)));
    // New sessions work too.
    let fresh = connect_proxy(proxy, "postgres").await;
    for _ in 0..4 {
        fresh
            .query_one(read, &[])
            .await
            .map_err(|e| format!("{e:?}"))
            .unwrap();
    }

    // The leader stops: reads still work, a write gets an error naming the leader.
    let leader_name = leader.name.clone();
    tokio::task::spawn_blocking(move || {
        OWN.lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .stop_node(&leader_name)
            .unwrap()
    })
    .await
    .unwrap();
    let reader = connect_proxy(proxy, "postgres").await;
    let row = reader.query_one(read, &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), i32::from(followers[1].port));
    let err = reader
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap_err();
    let message = error_message(&err);
    assert!(
        message.contains(&format!("\"{}\"", leader.name)),
        "{message}"
    );
    assert_eq!(sqlstate(&err), "08006");
    reader
        .query_one(read, &[])
        .await
        .expect("reads go on after a failed write");

    // Both come back; writes work again and the follower serves reads again.
    let (l, f) = (leader.name.clone(), followers[0].name.clone());
    tokio::task::spawn_blocking(move || {
        let mut guard = OWN.lock().unwrap();
        let c = guard.as_mut().unwrap();
        c.start_node(&l).unwrap();
        c.start_node(&f).unwrap();
    })
    .await
    .unwrap();
    wait_until(std::time::Duration::from_secs(10), || async {
        match connect_proxy_result(proxy).await {
            Some(c) => c.batch_execute("INSERT INTO t VALUES (2)").await.is_ok(),
            None => false,
        }
    })
    .await;
    wait_until(std::time::Duration::from_secs(10), || async {
        let c = connect_proxy(proxy, "postgres").await;
        let mut seen = HashSet::new();
        for _ in 0..4 {
            if let Ok(row) = c.query_one(read, &[]).await {
                seen.insert(row.get::<_, i32>(0));
            }
        }
        seen.contains(&i32::from(followers[0].port))
    })
    .await;
    assert_eq!(metric(&scrape(metrics).await, &up), Some(1.0));
}

async fn connect_proxy_result(proxy: std::net::SocketAddr) -> Option<tokio_postgres::Client> {
    let (client, conn) =
        tokio_postgres::connect(&proxy_conn_string(proxy, "postgres"), tokio_postgres::NoTls)
            .await
            .ok()?;
    tokio::spawn(conn);
    Some(client)
}
