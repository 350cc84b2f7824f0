//! Freshness against a real 3-member etcd cluster on loopback, with faults
//! that hang rather than kill (SIGSTOP: sockets stay open, nothing
//! answers): a frozen member is left for a healthy one before the tables
//! turn stale, and a member that lost the majority makes them stale
//! instead of serving its frozen copy as fresh.

mod common;

use common::{naming, Server, DEADLINE};
use etcd_mesh_testkit::{fetch_snapshot, wait_for, EtcdCluster, Frozen};
use std::time::{Duration, Instant};
use sync_server::etcd::EtcdOptions;
use sync_server::Config;

fn config(endpoints: Vec<String>, first_member: usize, freshness: Duration) -> Config {
    let mut etcd = EtcdOptions::new(endpoints);
    etcd.first_member = first_member;
    let mut config = Config::new(etcd, vec!["etcd-naming=svc/".parse().expect("spec")]);
    config.freshness_timeout = freshness;
    config
}

/// A put through `endpoint`, retried until the cluster takes it; its revision.
async fn put(endpoint: &str, key: &str, addr: &str) -> u64 {
    wait_for(&format!("etcd to take {key}"), DEADLINE, || async {
        let mut client = etcd_client::Client::connect([endpoint], None).await.ok()?;
        let put = tokio::time::timeout(
            Duration::from_secs(2),
            client.put(key, naming(addr, 1), None),
        )
        .await
        .ok()?
        .ok()?;
        put.header().map(|h| h.revision() as u64)
    })
    .await
    .expect("put")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_is_left_and_a_change_arrives_within_four_seconds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = EtcdCluster::start(dir.path(), 3).await.expect("cluster");
    let endpoints = cluster.endpoints();
    // The server starts at member 0 (a random member in production).
    let server = Server::start(config(endpoints.clone(), 0, Duration::from_secs(6))).await;
    server.ready().await;
    let first = put(&endpoints[1], "svc/s/a", "127.0.0.1:30001").await;
    server.until("the first key", |s| s.revision >= first).await;

    let _frozen = Frozen::freeze(cluster.members[0].pid().expect("member 0 runs"));
    let frozen_at = Instant::now();
    let revision = put(&endpoints[1], "svc/s/b", "127.0.0.1:30002").await;
    let seen_stale = std::sync::atomic::AtomicBool::new(false);
    let arrived = wait_for(
        "the change made through a healthy member",
        DEADLINE,
        || async {
            let snapshot = fetch_snapshot(server.addr).await?;
            if snapshot.stale {
                seen_stale.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            (snapshot.revision >= revision).then(|| frozen_at.elapsed())
        },
    )
    .await
    .expect("the server moves to a healthy member");
    eprintln!("member frozen: the change arrived {arrived:?} after the freeze");
    assert!(arrived <= Duration::from_secs(4), "{arrived:?}");
    assert!(
        !seen_stale.load(std::sync::atomic::Ordering::Relaxed),
        "moved before the freshness timeout ran out"
    );
    assert!(server.metric("sync_server_sync_restarts_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_from_the_majority_makes_the_tables_stale_until_it_is_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = EtcdCluster::start(dir.path(), 3).await.expect("cluster");
    let endpoints = cluster.endpoints();
    // The server knows member 0 alone; freezing the two others leaves that
    // member alive, answering, and without a quorum.
    let freshness = Duration::from_secs(2);
    let server = Server::start(config(vec![endpoints[0].clone()], 0, freshness)).await;
    server.ready().await;
    let first = put(&endpoints[0], "svc/s/a", "127.0.0.1:30001").await;
    server
        .until("fresh with the first key", |s| {
            s.revision >= first && !s.stale
        })
        .await;

    let majority: Vec<Frozen> = [1, 2]
        .iter()
        .map(|&i| Frozen::freeze(cluster.members[i].pid().expect("member runs")))
        .collect();
    let cut_at = Instant::now();
    server.until("stale", |s| s.stale).await;
    let stale_after = cut_at.elapsed();
    eprintln!("majority lost: stale {stale_after:?} after the cut");
    assert!(stale_after <= Duration::from_secs(6), "{stale_after:?}");
    assert_eq!(server.metric("sync_server_stale").await, 1);
    let snapshot = server.snapshot().await;
    assert_eq!(snapshot.services["s"].endpoints.len(), 1, "the last tables");

    drop(majority);
    let healed_at = Instant::now();
    let revision = put(&endpoints[1], "svc/s/b", "127.0.0.1:30002").await;
    server
        .until("fresh again with the new key", |s| {
            !s.stale && s.revision >= revision
        })
        .await;
    eprintln!(
        "majority back: fresh with a new key {:?} after the heal",
        healed_at.elapsed()
    );
}
