//! The change feed (`GET /v1/changes`) against a real etcd: deltas carry
//! only what changed, clients too far behind, from before a restart or of
//! another epoch get everything, and content never changes under a
//! revision, even with two prefixes, racing writers and reconnections.

use etcd_client::{Client, GetOptions};
mod common;

use common::{naming, Server, DEADLINE};
use etcd_mesh_testkit::{http_get, wait_for, Etcd};
use etcd_mesh_wire::{Changes, Digest, Service};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use sync_server::history::HistoryLimits;
use sync_server::Config;

/// One change-feed request: (status, answer if 200, body length).
async fn changes(server: &Server, query: &str) -> (u16, Option<Changes>, usize) {
    let (status, body) = http_get(server.addr, &format!("/v1/changes{query}"))
        .await
        .expect("GET /v1/changes");
    let changes =
        (status == 200).then(|| Changes::decode(body.as_bytes()).expect("a valid answer"));
    (status, changes, body.len())
}

/// Starts sync-server and waits until it is ready.
async fn ready_server(config: Config) -> Server {
    let server = Server::start(config).await;
    server.ready().await;
    server
}

fn config(etcd: &Etcd, watches: &[&str], history: usize) -> Config {
    let mut config = common::config(etcd, watches);
    config.history = HistoryLimits {
        changes: history,
        ..HistoryLimits::default()
    };
    config
}

/// What a change-feed client holds, applying answers as the README says.
#[derive(Debug, Default, Clone, PartialEq)]
struct Follower {
    revision: u64,
    epoch: String,
    observer: String,
    services: BTreeMap<String, Service>,
}

impl Follower {
    fn query(&self, wait: u32) -> String {
        format!(
            "?since={}&epoch={}&observer={}&wait={wait}",
            self.revision, self.epoch, self.observer
        )
    }

    fn apply(&mut self, changes: Changes) {
        if changes.full {
            self.services.clear();
        } else {
            assert_eq!(changes.since, self.revision, "a delta from what is held");
        }
        for name in &changes.removed {
            self.services.remove(name);
        }
        self.services.extend(changes.services);
        self.revision = changes.revision;
        self.epoch = changes.epoch;
        self.observer = changes.observer;
        let mut digest = Digest::default();
        for (name, service) in &self.services {
            digest.add(Digest::of(name, service));
        }
        assert_eq!(digest.value(), changes.digest, "the digest of what is held");
    }

    /// (service → (addr, weight)) held, to compare with etcd.
    fn view(&self) -> BTreeMap<String, Vec<(String, u32)>> {
        self.services
            .iter()
            .map(|(name, s)| {
                let endpoints = s.endpoints.iter().map(|e| (e.addr.clone(), e.weight));
                (name.clone(), endpoints.collect())
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_carry_what_changed_and_old_revisions_get_everything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let mut c = Client::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    for i in 0..50 {
        let key = format!("svc/s{i}/a");
        c.put(key, naming(&format!("127.0.0.1:{}", 20_000 + i), 1), None)
            .await
            .expect("put");
    }
    let server = ready_server(config(&etcd, &["etcd-naming=svc/"], 3)).await;

    let (status, first, full_bytes) = changes(&server, "").await;
    assert_eq!(status, 200);
    let mut follower = Follower::default();
    let first = first.expect("answer");
    assert!(first.full && first.services.len() == 50);
    let first_digest = first.digest;
    follower.apply(first);
    // Follower::apply checked the answer's digest; /metrics shows the same.
    assert_eq!(
        server.metric("sync_server_tables_digest").await,
        first_digest
    );
    let start = follower.clone();

    // Nothing newer: 304 at once without wait.
    assert_eq!(changes(&server, &follower.query(0)).await.0, 304);

    // One weight change: a long-poll held from before it carries s7 alone.
    let poll = {
        let query = follower.query(30);
        let addr = server.addr;
        tokio::spawn(async move { http_get(addr, &format!("/v1/changes{query}")).await })
    };
    wait_for("the long-poll to be held", DEADLINE, || async {
        (server.metric("sync_server_long_poll_waiters").await == 1).then_some(())
    })
    .await
    .expect("held");
    c.put("svc/s7/a", naming("127.0.0.1:20007", 5), None)
        .await
        .expect("put");
    let (status, body) = poll.await.expect("joined").expect("answered");
    assert_eq!(status, 200);
    let delta = Changes::decode(body.as_bytes()).expect("valid");
    assert!(!delta.full);
    assert_eq!(delta.services.keys().collect::<Vec<_>>(), ["s7"]);
    assert!(
        body.len() * 10 < full_bytes,
        "a one-endpoint delta ({} bytes) is a small part of the whole ({full_bytes})",
        body.len()
    );
    follower.apply(delta);

    // A deleted service travels as removed.
    c.delete("svc/s9/a", None).await.expect("delete");
    let (_, delta, _) = changes(&server, &follower.query(30)).await;
    let delta = delta.expect("answer");
    assert_eq!(
        (delta.removed.as_slice(), delta.services.len()),
        (&["s9".to_owned()][..], 0)
    );
    follower.apply(delta);

    // Further back than the three revisions kept: everything.
    for i in 0..3 {
        c.put(
            format!("svc/s{i}/a"),
            naming(&format!("127.0.0.1:{}", 20_000 + i), 2),
            None,
        )
        .await
        .expect("put");
    }
    let latest = c
        .get(
            "svc/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision() as u64;
    wait_for("sync-server to reach etcd", DEADLINE, || async {
        (server.metric("sync_server_revision").await == latest).then_some(())
    })
    .await
    .expect("caught up");
    let (_, behind, _) = changes(&server, &start.query(0)).await;
    let behind = behind.expect("answer");
    assert!(behind.full, "older than the history: full");
    let mut from_start = start.clone();
    from_start.apply(behind);
    let (_, recent, _) = changes(&server, &follower.query(0)).await;
    follower.apply(recent.expect("answer"));
    assert_eq!(follower, from_start, "a delta and a full answer agree");
    assert!(server.metric("sync_server_changes_full_total").await >= 2);
    assert!(server.metric("sync_server_changes_delta_total").await >= 3);

    // Another epoch (another etcd cluster or prefixes): everything.
    let (_, foreign, _) = changes(
        &server,
        &format!("?since={}&epoch=0-0", follower.revision - 1),
    )
    .await;
    assert!(foreign.expect("answer").full);

    // A restarted sync-server serves the same epoch (the same etcd
    // cluster and prefixes) as another observer (its own arrival times
    // and health): a client of the old process gets everything once, even
    // at its revision, then nothing more until something changes; one
    // that follows no observer is up to date.
    drop(server);
    let restarted = ready_server(config(&etcd, &["etcd-naming=svc/"], 3)).await;
    let (_, after_restart, _) = changes(&restarted, &start.query(0)).await;
    assert!(after_restart.expect("answer").full);
    let (_, current, _) = changes(&restarted, &follower.query(0)).await;
    let current = current.expect("answer");
    assert!(current.full);
    assert_eq!(current.epoch, follower.epoch, "one epoch across processes");
    assert_ne!(current.observer, follower.observer);
    follower.apply(current);
    assert_eq!(changes(&restarted, &follower.query(0)).await.0, 304);
    let no_observer = format!("?since={}&epoch={}", follower.revision, follower.epoch);
    assert_eq!(changes(&restarted, &no_observer).await.0, 304);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_never_changes_under_a_revision_with_two_prefixes_and_reconnections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = Etcd::start(dir.path()).await.expect("etcd");
    let endpoint = etcd.endpoint();
    let server = ready_server(config(&etcd, &["etcd-naming=a/", "etcd-naming=b/"], 10_000)).await;

    // Two writers, one per prefix, racing each other through the etcd
    // restarts below; each write retries until etcd takes it.
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for prefix in ["a", "b"] {
        let writing = Arc::clone(&writing);
        let endpoint = endpoint.clone();
        writers.push(tokio::spawn(async move {
            let mut written = 0u32;
            for i in 0u32..100_000 {
                if !writing.load(Ordering::Relaxed) {
                    break;
                }
                let key = format!("{prefix}/{prefix}-svc{}/{}", i % 3, i % 7);
                let value = naming(&format!("127.0.0.1:{}", 21_000 + i % 7), 1 + i % 5);
                for _ in 0..200 {
                    let put = async {
                        let mut c = Client::connect([endpoint.as_str()], None).await?;
                        if i % 11 == 0 {
                            c.delete(key.as_str(), None).await.map(drop)
                        } else {
                            c.put(key.as_str(), value.as_str(), None).await.map(drop)
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(2), put).await {
                        Ok(Ok(())) => break,
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                written += 1;
            }
            written
        }));
    }

    // A follower applying every answer, recording what it held at each
    // revision it reached.
    let mut follower = Follower::default();
    let mut seen: BTreeMap<u64, BTreeMap<String, Vec<(String, u32)>>> = BTreeMap::new();
    let mut restarts = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline && (restarts < 2 || seen.len() < 40) {
        let (status, answer, _) = changes(&server, &follower.query(1)).await;
        if let Some(answer) = answer {
            follower.apply(answer);
            let view = follower.view();
            if let Some(earlier) = seen.get(&follower.revision) {
                assert_eq!(
                    earlier, &view,
                    "revision {} changed content",
                    follower.revision
                );
            }
            seen.insert(follower.revision, view);
        } else {
            assert_eq!(status, 304);
        }
        if seen.len() >= 10 * (restarts + 1) && restarts < 2 {
            etcd.kill();
            etcd.restart().await.expect("etcd restarts");
            restarts += 1;
        }
    }
    writing.store(false, Ordering::Relaxed);
    for writer in writers {
        assert!(writer.await.expect("writer") > 0);
    }
    assert_eq!(restarts, 2);
    assert!(seen.len() >= 40, "followed {} revisions", seen.len());
    assert!(server.metric("sync_server_sync_restarts_total").await >= 2);

    // Each revision held what etcd held at that revision.
    let mut c = Client::connect([endpoint.as_str()], None)
        .await
        .expect("etcd client");
    for (revision, view) in &seen {
        let mut expected: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
        for prefix in ["a/", "b/"] {
            let options = GetOptions::new()
                .with_prefix()
                .with_revision(*revision as i64);
            let listed = c.get(prefix, Some(options)).await.expect("get at revision");
            for kv in listed.kvs() {
                let key = kv.key_str().expect("utf-8");
                let service = key
                    .rsplit_once('/')
                    .expect("instance")
                    .0
                    .trim_start_matches(prefix);
                let value: serde_json::Value = serde_json::from_slice(kv.value()).expect("json");
                let addr = value["Addr"].as_str().expect("Addr").to_owned();
                let weight = value["Metadata"]["weight"].as_u64().expect("weight") as u32;
                expected
                    .entry(service.to_owned())
                    .or_default()
                    .push((addr, weight));
            }
        }
        for endpoints in expected.values_mut() {
            endpoints.sort();
        }
        assert_eq!(view, &expected, "content at revision {revision}");
    }
}
