//! sync-server against a real etcd: a correct view through races,
//! compactions, outages and restarts, and bad registrations listed.

mod common;

use common::{client, config, naming, Server, DEADLINE};
use etcd_client::{Client, CompactionOptions};
use etcd_mesh_testkit::{http_get, wait_for, Etcd};
use etcd_mesh_wire::Snapshot;
use std::collections::BTreeSet;

/// Puts a key, then compacts all history up to that write.
async fn put_then_compact(c: &mut Client, key: &str, value: &str) -> i64 {
    let revision = c
        .put(key, value, None)
        .await
        .expect("put")
        .header()
        .expect("header")
        .revision();
    c.compact(revision, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    revision
}

fn addrs(snapshot: &Snapshot, service: &str) -> BTreeSet<String> {
    snapshot
        .services
        .get(service)
        .map(|s| s.endpoints.iter().map(|e| e.addr.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_the_first_listing_lose_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    // Four writers put 100 keys each and delete every third one, while
    // sync-server starts, lists and begins to watch.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4u16 {
        let mut etcd_client = client(&etcd).await;
        writers.spawn(async move {
            for i in 0..100u16 {
                let addr = format!("127.0.0.1:{}", 10_000 + w * 100 + i);
                let key = format!("svc/race/{addr}");
                etcd_client
                    .put(key.as_str(), naming(&addr, 1), None)
                    .await
                    .expect("put");
                if i % 3 == 0 {
                    etcd_client
                        .delete(key.as_str(), None)
                        .await
                        .expect("delete");
                }
            }
        });
    }
    // Small pages: the listing spans many requests while the writers run.
    let mut paged = config(&etcd, &["etcd-naming=svc/"]);
    paged.list_page_size = 7;
    paged.list_page_bytes = 1;
    let server = Server::start(paged).await;
    while let Some(joined) = writers.join_next().await {
        joined.expect("writer");
    }
    let expected: BTreeSet<String> = (0..4u16)
        .flat_map(|w| {
            (0..100u16)
                .filter(|i| i % 3 != 0)
                .map(move |i| format!("127.0.0.1:{}", 10_000 + w * 100 + i))
        })
        .collect();
    let last_revision = client(&etcd)
        .await
        .get("x", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    let snapshot = server
        .until("the snapshot to reach etcd's revision", |s| {
            s.revision >= last_revision as u64
        })
        .await;
    assert_eq!(addrs(&snapshot, "race"), expected);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_during_the_watch_and_while_away_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = Etcd::start(dir.path()).await.expect("etcd");
    let mut c = client(&etcd).await;
    for i in 1..=5 {
        let addr = format!("127.0.0.1:{}", 20_000 + i);
        c.put(format!("svc/s/{addr}"), naming(&addr, 1), None)
            .await
            .expect("put");
    }
    let server = Server::start(config(&etcd, &["etcd-naming=svc/", "openim-v2=openim:///"])).await;
    server.ready().await;

    // Compact everything while the watch runs; changes keep flowing.
    put_then_compact(
        &mut c,
        "svc/s/127.0.0.1:20006",
        &naming("127.0.0.1:20006", 1),
    )
    .await;
    c.delete("svc/s/127.0.0.1:20001", None)
        .await
        .expect("delete");
    c.put("openim:///User/127.0.0.1:20100", "127.0.0.1:20100", None)
        .await
        .expect("put");
    server
        .until("changes after the compaction", |s| {
            addrs(s, "s").len() == 5
                && !addrs(s, "s").contains("127.0.0.1:20001")
                && addrs(s, "User").len() == 1
        })
        .await;

    // Away: etcd restarts, takes writes and compacts before sync-server is
    // back. A resolver that resumed its old watch would stop here.
    etcd.restart().await.expect("etcd restarts");
    let mut c = client(&etcd).await;
    c.delete("svc/s/127.0.0.1:20002", None)
        .await
        .expect("delete");
    let revision = put_then_compact(
        &mut c,
        "svc/s/127.0.0.1:20007",
        &naming("127.0.0.1:20007", 2),
    )
    .await;
    let snapshot = server
        .until("the view after restart and compaction", |s| {
            s.revision >= revision as u64 && !s.stale
        })
        .await;
    let expected: BTreeSet<String> = [3, 4, 5, 6, 7]
        .iter()
        .map(|i| format!("127.0.0.1:{}", 20_000 + i))
        .collect();
    assert_eq!(
        addrs(&snapshot, "s"),
        expected,
        "no lost and no phantom endpoints"
    );
    assert!(server.metric("sync_server_sync_restarts_total").await >= 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_away_serves_the_last_snapshot_as_stale() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = Etcd::start(dir.path()).await.expect("etcd");
    client(&etcd)
        .await
        .put("svc/s/a", naming("127.0.0.1:30001", 4), None)
        .await
        .expect("put");
    let server = Server::start(config(&etcd, &["etcd-naming=svc/"])).await;
    server.ready().await;
    server
        .until("etcd connected", |s| !s.stale && addrs(s, "s").len() == 1)
        .await;
    assert_eq!(server.metric("sync_server_etcd_connected").await, 1);

    etcd.kill();
    let stale = server
        .until("the snapshot to turn stale", |s| s.stale)
        .await;
    assert_eq!(
        addrs(&stale, "s"),
        BTreeSet::from(["127.0.0.1:30001".to_owned()])
    );
    assert_eq!(
        http_get(server.addr, "/readyz").await.expect("GET").0,
        200,
        "still ready"
    );
    assert_eq!(server.metric("sync_server_etcd_connected").await, 0);
    assert_eq!(server.metric("sync_server_stale").await, 1);

    etcd.restart().await.expect("etcd restarts");
    client(&etcd)
        .await
        .put("svc/s/b", naming("127.0.0.1:30002", 1), None)
        .await
        .expect("put");
    server
        .until("fresh again with the new key", |s| {
            !s.stale && addrs(s, "s").len() == 2
        })
        .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_etcd_is_down_serves_the_snapshot_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("last-snapshot.json");
    let mut etcd = Etcd::start(dir.path()).await.expect("etcd");
    client(&etcd)
        .await
        .put("svc/s/a", naming("127.0.0.1:40001", 2), None)
        .await
        .expect("put");
    let mut with_file = config(&etcd, &["etcd-naming=svc/"]);
    with_file.snapshot_file = Some(file.clone());

    let first = Server::start(with_file.clone()).await;
    first.ready().await;
    let held = first.snapshot().await;
    wait_for("the snapshot file", DEADLINE, || async {
        let on_disk = Snapshot::decode(&std::fs::read(&file).ok()?).ok()?;
        (on_disk.revision == held.revision).then_some(())
    })
    .await
    .expect("written");
    first.shutdown().await;
    etcd.kill();

    let second = Server::start(with_file).await;
    let served = second
        .until("the file's snapshot", |s| s.revision == held.revision)
        .await;
    assert!(served.stale, "marked stale until etcd answers");
    assert_eq!(served.services, held.services);
    assert_eq!(
        http_get(second.addr, "/readyz").await.expect("GET").0,
        503,
        "not synced yet"
    );

    etcd.restart().await.expect("etcd restarts");
    second.ready().await;
    second.until("fresh from etcd", |s| !s.stale).await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_registrations_are_rejected_listed_and_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let bad: &[(&str, &str)] = &[
        ("svc/s/not-json", "not json"),
        ("svc/s/no-addr", r#"{"Op":0,"Metadata":{}}"#),
        ("svc/s/hostname", r#"{"Addr":"backend.local:80"}"#),
        ("svc/s/port-zero", r#"{"Addr":"127.0.0.1:0"}"#),
        ("svc/s/op-delete", r#"{"Op":1,"Addr":"127.0.0.1:5"}"#),
        (
            "svc/s/heavy",
            r#"{"Addr":"127.0.0.1:6","Metadata":{"weight":10001}}"#,
        ),
        (
            "svc/s/negative",
            r#"{"Addr":"127.0.0.1:7","Metadata":{"weight":-1}}"#,
        ),
        (
            "svc/s/fraction",
            r#"{"Addr":"127.0.0.1:8","Metadata":{"weight":0.5}}"#,
        ),
        (
            "svc/s/word",
            r#"{"Addr":"127.0.0.1:9","Metadata":{"weight":"lots"}}"#,
        ),
        (
            "svc/s/meta-string",
            r#"{"Addr":"127.0.0.1:10","Metadata":"weight=1"}"#,
        ),
        ("svc/no-instance", r#"{"Addr":"127.0.0.1:11"}"#),
        ("svc//empty-service", r#"{"Addr":"127.0.0.1:12"}"#),
        ("openim:///User/bad", "not-an-address"),
    ];
    let mut c = client(&etcd).await;
    for (key, value) in bad {
        c.put(*key, *value, None).await.expect("put");
    }
    c.put(
        "svc/s/draining",
        r#"{"Addr":"127.0.0.1:13","Metadata":{"weight":0}}"#,
        None,
    )
    .await
    .expect("put");
    c.put("svc/s/good", naming("127.0.0.1:14", 7), None)
        .await
        .expect("put");
    let server = Server::start(config(&etcd, &["etcd-naming=svc/", "openim-v2=openim:///"])).await;
    server.ready().await;
    let snapshot = server.snapshot().await;
    let rejected: BTreeSet<&str> = snapshot.rejected.iter().map(|r| r.key.as_str()).collect();
    let expected: BTreeSet<&str> = bad.iter().map(|(k, _)| *k).collect();
    assert_eq!(rejected, expected);
    assert!(snapshot.rejected.iter().all(|r| !r.reason.is_empty()));
    let weights: Vec<(&str, u32)> = snapshot.services["s"]
        .endpoints
        .iter()
        .map(|e| (e.addr.as_str(), e.weight))
        .collect();
    assert_eq!(
        weights,
        [("127.0.0.1:13", 0), ("127.0.0.1:14", 7)],
        "draining is kept, weights untouched"
    );
    assert_eq!(
        server.metric("sync_server_rejected").await,
        bad.len() as u64
    );
    assert_eq!(
        server.metric("sync_server_rejected_total").await,
        bad.len() as u64
    );

    // A rejected key that is fixed joins; a new bad one is counted once.
    c.put("svc/s/not-json", naming("127.0.0.1:15", 1), None)
        .await
        .expect("put");
    c.put("svc/s/new-bad", "{", None).await.expect("put");
    server
        .until("the fix and the new rejection", |s| {
            addrs(s, "s").contains("127.0.0.1:15")
                && s.rejected.iter().any(|r| r.key == "svc/s/new-bad")
        })
        .await;
    assert_eq!(
        server.metric("sync_server_rejected_total").await,
        bad.len() as u64 + 1
    );
    server.shutdown().await;
}

/// The epoch and revision of `/v1/status`.
async fn status(server: &Server) -> etcd_mesh_wire::Status {
    let (code, body) = http_get(server.addr, "/v1/status").await.expect("GET");
    assert_eq!(code, 200, "{body}");
    etcd_mesh_wire::Status::decode(body.as_bytes()).expect("a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_is_served_under_a_new_epoch_not_as_the_old_tables() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = Etcd::start(dir.path()).await.expect("etcd");
    let mut c = client(&etcd).await;
    c.put("svc/s/a", naming("127.0.0.1:40001", 1), None)
        .await
        .expect("put");
    let backup = dir.path().join("backup.db");
    etcd.save_snapshot(&backup).expect("backup");
    for port in 40002..40006 {
        let addr = format!("127.0.0.1:{port}");
        c.put(format!("svc/s/{addr}"), naming(&addr, 1), None)
            .await
            .expect("put");
    }
    let running = Server::start(config(&etcd, &["etcd-naming=svc/"])).await;
    running.ready().await;
    let before = running
        .until("every key", |s| addrs(s, "s").len() == 5)
        .await;
    let epoch = status(&running).await.epoch;

    etcd.restore(&backup).await.expect("restored");
    let restored = running
        .until("the restored registry", |s| {
            addrs(s, "s").len() == 1 && !s.stale
        })
        .await;
    assert!(restored.revision < before.revision, "revisions went back");
    let now = status(&running).await;
    assert_eq!(
        now.epoch,
        format!("{epoch}-restored{}", restored.revision),
        "a new epoch: the old revisions name other content"
    );
    assert_eq!(running.metric("sync_server_etcd_restores_total").await, 1);

    // A replica started after the restore serves the same registry.
    let fresh = Server::start(config(&etcd, &["etcd-naming=svc/"])).await;
    fresh.ready().await;
    let served = fresh.snapshot().await;
    assert_eq!(served.services, restored.services);
    assert_eq!(status(&fresh).await.epoch, epoch, "it cannot tell");
}
