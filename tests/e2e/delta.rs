//! Delta sync end to end (real etcd, sync-server, Envoy with two workers):
//! an Envoy that applied a thousand changes through compaction, etcd and
//! sync-server restarts holds exactly what a fresh full snapshot says, and
//! a scoped Envoy receives only its own services. An Envoy that is up to
//! date takes no full load when sync-server restarts with the same tables.

use etcd_client::{Client, CompactionOptions};
use etcd_mesh_demo::client::split;
use etcd_mesh_demo::{DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_e2e::{assert_split, Backend, Mesh, DEADLINE};
use etcd_mesh_registration::Instance;
use etcd_mesh_testkit::{http_get, wait_for, EnvoyOptions};
use etcd_mesh_wire::{Digest, Snapshot};
use std::time::Duration;

/// The digest of a full snapshot's services, as any client computes it.
fn digest_of(snapshot: &Snapshot) -> u64 {
    let mut digest = Digest::default();
    for (name, service) in &snapshot.services {
        digest.add(Digest::of(name, service));
    }
    digest.value()
}

/// A put or delete that retries while etcd is coming back.
async fn write(etcd: &[String], key: &str, value: Option<&str>) -> i64 {
    wait_for(
        &format!("etcd to take a write of {key}"),
        DEADLINE,
        || async {
            let mut client = Client::connect(etcd, None).await.ok()?;
            let header = match value {
                Some(value) => client.put(key, value, None).await.ok()?.header().cloned(),
                None => client.delete(key, None).await.ok()?.header().cloned(),
            };
            header.map(|h| h.revision())
        },
    )
    .await
    .expect("etcd takes the write")
}

/// Waits until sync-server serves etcd's `revision` (or newer) and the
/// plugin holds it too, and returns the digest of that snapshot.
async fn converged(mesh: &Mesh, revision: u64) -> u64 {
    let snapshot = wait_for("sync-server to reach etcd", DEADLINE, || async {
        mesh.snapshot().await.filter(|s| s.revision >= revision)
    })
    .await
    .expect("snapshot");
    mesh.envoy
        .wait_for_revision(snapshot.revision, DEADLINE)
        .await
        .expect("the plugin reaches sync-server's revision");
    digest_of(&snapshot)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_changes_through_restarts_end_with_the_tables_of_a_full_snapshot() {
    let mut mesh = Mesh::start(2).await;
    let backends = mesh.weighted_backends(&[1, 2, 3]).await;
    let etcd = mesh.etcd_endpoints();
    let mut rng = 0x5eed_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut last = 0;
    for op in 0..1_000 {
        // Endpoints nothing calls: services scale-0..19, 12 slots each.
        let (service, slot) = (next(20), next(12));
        let key = format!("{DEMO_PREFIX}scale-{service}/{slot}");
        let instance = Instance::new(
            DEMO_PREFIX,
            &format!("scale-{service}"),
            &format!("127.0.{service}.{}:9000", slot + 1),
        );
        match next(10) {
            0..=2 => last = write(&etcd, &key, None).await,
            _ => {
                let value = instance.with_weight(next(5) as u32).value();
                last = write(&etcd, &key, Some(&value)).await;
            }
        }
        match op {
            250 => {
                let revision = write(&etcd, &format!("{DEMO_PREFIX}scale-0/0"), None).await;
                let mut client = Client::connect(&etcd, None).await.expect("etcd client");
                client
                    .compact(revision, Some(CompactionOptions::new().with_physical()))
                    .await
                    .expect("compact");
            }
            500 => {
                mesh.etcd.kill();
                mesh.etcd.restart().await.expect("etcd restarts");
            }
            750 => {
                // A write while sync-server is down: the poller's revision
                // is then older than anything the new process knows.
                mesh.stop_sync_server();
                let moved = Instance::new(DEMO_PREFIX, "scale-0", "127.0.0.250:9000");
                write(&etcd, &moved.key(), Some(&moved.value())).await;
                mesh.restart_sync_server().await;
            }
            _ => {}
        }
    }
    let expected = converged(&mesh, last as u64).await;
    assert_eq!(
        mesh.sync_metric("sync_server_tables_digest").await,
        Some(expected),
        "sync-server's digest is that of its snapshot"
    );
    assert_eq!(
        mesh.envoy.stat("wasmcustom.etcd_mesh.table_digest").await,
        Some(expected),
        "the poller holds exactly the snapshot's tables"
    );
    let deltas = mesh
        .envoy
        .stat("wasmcustom.etcd_mesh.updates_delta")
        .await
        .unwrap_or(0);
    let fulls = mesh
        .envoy
        .stat("wasmcustom.etcd_mesh.updates_full")
        .await
        .unwrap_or(0);
    assert!(deltas >= 100, "{deltas} deltas applied");
    // Workers learn of updates from the poller's notices, not their tick.
    let notices = mesh
        .envoy
        .stat("wasmcustom.etcd_mesh.table_notices")
        .await
        .unwrap_or(0);
    assert!(notices >= 100, "{notices} notices taken by the workers");
    assert_eq!(
        fulls, 2,
        "the first load and the sync-server restart reload, nothing else"
    );

    // Both workers route with the snapshot's tables.
    let clients = mesh.clients(8).await;
    let counts = split(&clients, 1_200).await.expect("every call succeeds");
    assert_split(&counts, &backends, &[1, 2, 3], 2.0);
    let workers = mesh
        .envoy
        .stats_matching("^wasmcustom.etcd_mesh.worker_[0-9]*.table_digest$")
        .await;
    assert!(workers.len() >= 2, "a gauge per worker: {workers:?}");
    assert!(
        workers.iter().all(|(_, digest)| *digest == expected),
        "every worker holds the snapshot's tables: {workers:?}, expected {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_envoy_receives_only_its_services() {
    let poller = format!(
        r#"{{"role": "poller", "clusters": {{{{SYNC_CLUSTER_NAMES}}}}, "authority": "sync-server", "wait_seconds": 30, "services": ["{DEMO_SERVICE}"]}}"#
    );
    let mesh = Mesh::start_with(EnvoyOptions {
        poller_config: Some(poller),
        ..EnvoyOptions::default()
    })
    .await;
    let etcd = mesh.etcd_endpoints();
    for i in 0..5 {
        let other = Instance::new(DEMO_PREFIX, "other.Service", &format!("127.0.9.{i}:9000"));
        write(&etcd, &other.key(), Some(&other.value())).await;
    }
    let backends = mesh.weighted_backends(&[1, 3]).await;
    let snapshot = wait_for("sync-server to list both services", DEADLINE, || async {
        mesh.snapshot()
            .await
            .filter(|s| s.services.len() == 2 && s.services[DEMO_SERVICE].endpoints.len() == 2)
    })
    .await
    .expect("listed");
    // The poller holds only the demo service, and its digest is that
    // service's alone.
    let mut scoped = snapshot.clone();
    scoped.services.retain(|name, _| name == DEMO_SERVICE);
    let expected = digest_of(&scoped);
    wait_for("the scoped tables", DEADLINE, || async {
        let held = mesh.envoy.stat("wasmcustom.etcd_mesh.table_digest").await?;
        (held == expected).then_some(())
    })
    .await
    .expect("the poller holds the demo service only");
    assert_eq!(
        mesh.envoy.stat("wasmcustom.etcd_mesh.table_services").await,
        Some(1)
    );
    let counts = split(&mesh.clients(2).await, 400)
        .await
        .expect("calls succeed");
    assert_split(&counts, &backends, &[1, 3], 2.0);

    // A change outside the scope does not travel: the poller's revision
    // stays while sync-server's moves on.
    let held = mesh
        .envoy
        .stat("wasmcustom.etcd_mesh.table_revision")
        .await
        .expect("revision");
    let other = Instance::new(DEMO_PREFIX, "other.Service", "127.0.9.9:9000");
    let revision = write(&etcd, &other.key(), Some(&other.value())).await as u64;
    wait_for("sync-server to take it", DEADLINE, || async {
        (mesh.sync_metric("sync_server_revision").await? >= revision).then_some(())
    })
    .await
    .expect("sync-server moves on");
    // The poller's long-poll is still held (the change was not in scope).
    let (_, metrics) = http_get(mesh.sync_addr, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("\nsync_server_long_poll_waiters 1\n"),
        "{metrics}"
    );
    assert_eq!(
        mesh.envoy.stat("wasmcustom.etcd_mesh.table_revision").await,
        Some(held)
    );
}

/// Waits until the Envoy holds exactly what sync-server serves now, with
/// no arrival stamp left (the horizon passed), and returns the revision.
async fn holds_unstamped_tables(mesh: &Mesh) -> u64 {
    let snapshot = wait_for("the arrival stamps to expire", DEADLINE, || async {
        mesh.snapshot().await.filter(|s| {
            s.services
                .values()
                .flat_map(|service| &service.endpoints)
                .all(|e| e.serving_since_ms.is_none())
        })
    })
    .await
    .expect("stamps expire");
    let digest = digest_of(&snapshot);
    wait_for("the Envoy to hold those tables", DEADLINE, || async {
        let held = mesh.envoy.stat("wasmcustom.etcd_mesh.table_digest").await?;
        (held == digest).then_some(())
    })
    .await
    .expect("the Envoy holds sync-server's tables");
    snapshot.revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_up_to_date_envoy_takes_no_full_load_when_sync_server_restarts() {
    let horizon = |c: &mut sync_server::Config| c.stamp_horizon = Duration::from_millis(300);
    let mut mesh = Mesh::start_configured(
        EnvoyOptions {
            concurrency: 2,
            ..EnvoyOptions::default()
        },
        horizon,
    )
    .await;
    let mut backends = mesh.weighted_backends(&[1, 2]).await;
    holds_unstamped_tables(&mesh).await;
    let full = "wasmcustom.etcd_mesh.updates_full";
    let fulls = mesh.envoy.stat(full).await.expect("a full load to start");

    // The same tables after the restart: the Envoy is continued, and a
    // change made then arrives as a delta.
    mesh.restart_sync_server_with(horizon).await;
    backends.push(Backend::registered(mesh.etcd_endpoints(), 3).await);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    mesh.settle(&addrs).await;
    assert_eq!(mesh.envoy.stat(full).await, Some(fulls), "no full load");
    assert_eq!(
        mesh.sync_metric("sync_server_changes_full_total").await,
        Some(0),
        "the restarted sync-server sent no full answer"
    );
    let clients = mesh.clients(4).await;
    let counts = split(&clients, 600).await.expect("every call succeeds");
    assert_split(&counts, &backends, &[1, 2, 3], 2.0);

    // Tables that differ (an arrival stamp the restarted process cannot
    // know): one full load, as before.
    holds_unstamped_tables(&mesh).await;
    mesh.restart_sync_server().await;
    backends.push(Backend::registered(mesh.etcd_endpoints(), 1).await);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    mesh.settle(&addrs).await;
    let fulls = mesh.envoy.stat(full).await.unwrap_or(0);
    mesh.restart_sync_server().await;
    let revision = holds_stamped_change(&mesh).await;
    mesh.envoy
        .wait_for_revision(revision, DEADLINE)
        .await
        .expect("the Envoy follows the restarted sync-server");
    assert_eq!(
        mesh.envoy.stat(full).await,
        Some(fulls + 1),
        "one full load when the tables differ"
    );
}

/// Makes a change after a restart and returns its revision.
async fn holds_stamped_change(mesh: &Mesh) -> u64 {
    let instance = Instance::new(DEMO_PREFIX, "other.Service", "127.0.0.251:9000");
    write(
        &mesh.etcd_endpoints(),
        &instance.key(),
        Some(&instance.value()),
    )
    .await as u64
}
