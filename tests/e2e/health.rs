//! Active health checks, slow start and zones, end to end: real etcd,
//! sync-server checking real tonic backends, and Envoy with the plugin
//! (two Envoys where each must see the same).

use etcd_mesh_demo::client::{self, split};
use etcd_mesh_demo::proto::SayRequest;
use etcd_mesh_demo::DEMO_SERVICE;
use etcd_mesh_e2e::{settle_on, Backend, BackendProcess, Mesh, DEADLINE};
use etcd_mesh_routing::SlowStart;
use etcd_mesh_testkit::{wait_for, Envoy, EnvoyOptions};
use etcd_mesh_wire::{Endpoint, Health};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use sync_server::health::{CheckName, HealthConfig};

const INTERVAL: Duration = Duration::from_millis(500);
const UNHEALTHY_THRESHOLD: u32 = 3;
/// Passive ejection off: what these tests see is the health checks' doing.
const NO_EJECTION: &str = r#"{"role":"router","outlier_detection":null}"#;

fn health_checked(config: &mut sync_server::Config) {
    config.health = Some(HealthConfig {
        interval: INTERVAL,
        timeout: Duration::from_millis(250),
        unhealthy_threshold: UNHEALTHY_THRESHOLD,
        healthy_threshold: 2,
        max_concurrent: 64,
        max_connections: sync_server::health::DEFAULT_MAX_CONNECTIONS,
        check_name: CheckName::Registry,
    });
}

fn options(router: &str) -> EnvoyOptions {
    EnvoyOptions {
        router_config: Some(router.into()),
        ..EnvoyOptions::default()
    }
}

/// The demo service's endpoints as sync-server serves them now.
async fn endpoints(mesh: &Mesh) -> Vec<Endpoint> {
    mesh.snapshot()
        .await
        .and_then(|s| s.services.get(DEMO_SERVICE).cloned())
        .map(|s| s.endpoints)
        .unwrap_or_default()
}

/// Waits until sync-server says `pred` of the demo endpoints, then until
/// every Envoy holds exactly what it serves.
async fn wait_served(
    mesh: &Mesh,
    envoys: &[&Envoy],
    what: &str,
    pred: impl Fn(&[Endpoint]) -> bool,
) {
    let digest = wait_for(what, DEADLINE, || async {
        let endpoints = endpoints(mesh).await;
        let digest = mesh.sync_metric("sync_server_tables_digest").await?;
        pred(&endpoints).then_some(digest)
    })
    .await
    .expect(what);
    for envoy in envoys {
        envoy
            .wait_for_digest(digest, DEADLINE)
            .await
            .expect("the plugin follows");
    }
}

fn health_of(endpoints: &[Endpoint], addr: &str) -> Option<Health> {
    endpoints.iter().find(|e| e.addr == addr)?.health
}

fn all_healthy(endpoints: &[Endpoint]) -> bool {
    !endpoints.is_empty() && endpoints.iter().all(|e| e.health == Some(Health::Healthy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_backend_stops_taking_calls_from_two_envoys_within_the_thresholds() {
    let mesh = Mesh::start_configured(options(NO_EJECTION), health_checked).await;
    let dir = tempfile::tempdir().expect("temporary dir");
    let second = Envoy::start(
        dir.path(),
        EnvoyOptions {
            sync_servers: vec![mesh.sync_addr],
            ..options(NO_EJECTION)
        },
    )
    .await
    .expect("the second Envoy starts");
    // Real processes, so that one can be SIGKILLed; a lease longer than
    // the test, so that only the health checks can take it out.
    let mut backends: Vec<BackendProcess> = (0..3)
        .map(|_| BackendProcess::start(&mesh.etcd_endpoints(), 1, 60))
        .collect();
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    mesh.settle(&addrs).await;
    settle_on(mesh.sync_addr, &second, &addrs).await;
    wait_served(
        &mesh,
        &[&mesh.envoy, &second],
        "all checked healthy",
        all_healthy,
    )
    .await;
    let mut clients = Vec::new();
    for envoy in [&mesh.envoy, &second] {
        clients.push(client::connect(envoy.listen).await.expect("connect"));
    }

    // SIGKILL: no deregistration; its lease lives on in etcd.
    let health_seq = mesh.sync_metric("sync_server_health_seq").await;
    assert!(
        health_seq >= Some(1),
        "the first results are published as health changes"
    );
    let killed = backends[0].addr.to_string();
    let killed_at = Instant::now();
    backends[0].kill();
    let budget = INTERVAL * UNHEALTHY_THRESHOLD + Duration::from_millis(500);
    let mut failed = [0usize; 2];
    let mut last_failure = [Duration::ZERO; 2];
    let mut after_budget = 0;
    while killed_at.elapsed() < budget + Duration::from_secs(1) {
        for (i, client) in clients.iter_mut().enumerate() {
            let call = tokio::time::timeout(
                Duration::from_secs(2),
                client::say(client, SayRequest::default()),
            );
            match call.await {
                Ok(Ok(by)) => assert_ne!(by, killed, "a dead backend cannot answer"),
                _ => {
                    failed[i] += 1;
                    last_failure[i] = killed_at.elapsed();
                }
            }
            if killed_at.elapsed() > budget {
                after_budget += 1;
            }
        }
    }
    println!("failed calls per Envoy: {failed:?}; last failure after {last_failure:?}");
    let served = endpoints(&mesh).await;
    assert_eq!(health_of(&served, &killed), Some(Health::Unhealthy));
    for (i, last) in last_failure.iter().enumerate() {
        assert!(
            *last <= INTERVAL * UNHEALTHY_THRESHOLD + Duration::from_millis(300),
            "Envoy {i} still failed calls {last:?} after the kill"
        );
    }
    assert!(
        failed.iter().all(|f| *f > 0),
        "the dead backend was picked before: {failed:?}"
    );
    assert!(
        after_budget > 50,
        "too few calls after the budget: {after_budget}"
    );
    assert_eq!(
        mesh.sync_metric("sync_server_health_unhealthy_endpoints")
            .await,
        Some(1)
    );
    assert!(
        mesh.sync_metric("sync_server_health_check_failures_total")
            .await
            >= Some(3)
    );
    // The kill is published as a health change (how many the first
    // results made depends on how they were batched with the etcd changes).
    assert!(mesh.sync_metric("sync_server_health_seq").await > health_seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_drains_without_etcd_and_serving_brings_it_back() {
    let mesh = Mesh::start_configured(options(NO_EJECTION), health_checked).await;
    let backends = mesh.weighted_backends(&[1, 1, 1]).await;
    wait_served(&mesh, &[&mesh.envoy], "all checked healthy", all_healthy).await;
    let revision = mesh.snapshot().await.expect("snapshot").revision;
    let clients = mesh.clients(2).await;
    let drained = backends[1].addr.to_string();

    backends[1].set_serving(false);
    wait_served(&mesh, &[&mesh.envoy], "NOT_SERVING seen", |e| {
        health_of(e, &drained) == Some(Health::NotServing)
    })
    .await;
    let counts = split(&clients, 60).await.expect("no call fails");
    assert_eq!(counts.get(&drained), None, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 60);
    let snapshot = mesh.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.revision, revision, "etcd was not touched");

    backends[1].set_serving(true);
    wait_served(&mesh, &[&mesh.envoy], "SERVING again", |e| {
        health_of(e, &drained) == Some(Health::Healthy)
    })
    .await;
    let counts = split(&clients, 60).await.expect("no call fails");
    let back = counts.get(&drained).copied().unwrap_or(0);
    assert!((18..=22).contains(&back), "a third again: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_ramps_up_over_the_slow_start_window() {
    const WINDOW_MS: u64 = 4_000;
    let router = format!(r#"{{"role":"router","slow_start":{{"window_ms":{WINDOW_MS}}}}}"#);
    let mesh = Mesh::start_with(options(&router)).await;
    let mut backends = mesh.weighted_backends(&[1, 1]).await;
    let mut clients = mesh.clients(1).await;
    let mut newcomer = Backend::unregistered().await;
    newcomer.register(mesh.etcd_endpoints(), 1).await;
    let new_addr = newcomer.addr.to_string();
    let since = wait_for("sync-server to stamp the newcomer", DEADLINE, || async {
        endpoints(&mesh)
            .await
            .iter()
            .find(|e| e.addr == new_addr)?
            .serving_since_ms
    })
    .await
    .expect("stamped");
    // The first two arrived after sync-server started too: they may still
    // be ramping themselves, so the expected share uses every stamp.
    let stamps: Vec<Option<u64>> = endpoints(&mesh)
        .await
        .iter()
        .filter(|e| e.addr != new_addr)
        .map(|e| e.serving_since_ms)
        .collect();
    assert_eq!(stamps.len(), 2);
    backends.push(newcomer);
    let ramp = SlowStart {
        window_ms: WINDOW_MS,
        aggression: 1.0,
        min_weight_percent: 10,
    };
    let (mut got, mut expected, mut calls) = (0.0, 0.0, 0usize);
    let mut by_second: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    loop {
        let now = sync_server::registry::unix_ms();
        if now > since + WINDOW_MS {
            break;
        }
        let by = client::say(&mut clients[0], SayRequest::default())
            .await
            .expect("no call fails");
        let factor = |stamp: Option<u64>| stamp.map_or(1.0, |t| ramp.factor(now.saturating_sub(t)));
        let f = factor(Some(since));
        let others: f64 = stamps.iter().map(|t| factor(*t)).sum();
        expected += f / (others + f);
        let hit = by == new_addr;
        got += f64::from(u8::from(hit));
        calls += 1;
        let bucket = by_second.entry((now - since) / 1000).or_default();
        bucket.0 += usize::from(hit);
        bucket.1 += 1;
    }
    let (got_pp, expected_pp) = (100.0 * got / calls as f64, 100.0 * expected / calls as f64);
    println!("newcomer took {got_pp:.2}% of {calls} calls over the window, the ramp says {expected_pp:.2}%; per second: {by_second:?}");
    assert!(calls > 300, "too few calls to measure: {calls}");
    assert!(
        (got_pp - expected_pp).abs() <= 2.0,
        "{got_pp:.2}% vs {expected_pp:.2}%"
    );
    // After the window: its full share.
    let counts = split(&clients, 30).await.expect("no call fails");
    assert_eq!(counts.get(&new_addr), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stay_in_the_zone_and_spill_by_weight_when_it_has_none() {
    let router = r#"{"role":"router","zone":"a","outlier_detection":null}"#;
    let mesh = Mesh::start_configured(options(router), health_checked).await;
    let etcd = mesh.etcd_endpoints();
    let mut backends = Vec::new();
    for (zone, weight) in [("a", 1), ("a", 1), ("b", 1), ("b", 2)] {
        let mut backend = Backend::unregistered().await;
        backend.register_in(etcd.clone(), weight, Some(zone)).await;
        backends.push(backend);
    }
    mesh.settle(&backends.iter().map(|b| b.addr).collect::<Vec<_>>())
        .await;
    wait_served(&mesh, &[&mesh.envoy], "all checked healthy", all_healthy).await;
    let clients = mesh.clients(2).await;
    let names: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let name = |i: usize| names[i].clone();
    let counts = split(&clients, 60).await.expect("no call fails");
    let local = |i: usize| counts.get(&name(i)).copied().unwrap_or(0);
    // All local, over both local endpoints. (Evenness is the routing
    // tests' concern; a 32/28 split was seen once here, on Envoy 1.38.2.)
    assert_eq!(local(0) + local(1), 60, "all local: {counts:?}");
    assert!(local(0) >= 20 && local(1) >= 20, "{counts:?}");

    // The local zone is cut to one endpoint, and that one fails.
    backends[1].deregister().await;
    backends[0].stop_serving();
    let (gone, down) = (name(1), name(0));
    wait_served(&mesh, &[&mesh.envoy], "zone a down to one unhealthy", |e| {
        e.iter().all(|e| e.addr != gone) && health_of(e, &down) == Some(Health::Unhealthy)
    })
    .await;
    let counts = split(&clients, 60).await.expect("no call fails");
    let spilled = |i: usize| counts.get(&name(i)).copied().unwrap_or(0);
    assert_eq!(spilled(2) + spilled(3), 60, "spilled to zone b: {counts:?}");
    assert!(
        spilled(3).abs_diff(2 * spilled(2)) <= 3,
        "by weight 1:2: {counts:?}"
    );
}

/// After etcd restarts with no write, sync-server lists it again at the
/// revision it already serves; health seen after that is published at
/// once, not held back until some unrelated write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_changes_after_etcd_comes_back_without_a_write_are_published() {
    let mut mesh = Mesh::start_configured(options(NO_EJECTION), health_checked).await;
    let backends = mesh.weighted_backends(&[1, 1]).await;
    let envoys = [&mesh.envoy];
    wait_served(&mesh, &envoys, "both healthy", all_healthy).await;
    let revision = mesh.snapshot().await.expect("snapshot").revision;
    let restarts = mesh
        .sync_metric("sync_server_sync_restarts_total")
        .await
        .unwrap_or(0);

    mesh.etcd.kill();
    mesh.etcd.restart().await.expect("etcd restarts");
    wait_for("sync-server to list etcd again", DEADLINE, || async {
        let listed = mesh.sync_metric("sync_server_sync_restarts_total").await? > restarts
            && mesh.sync_metric("sync_server_etcd_connected").await? == 1;
        listed.then_some(())
    })
    .await
    .expect("listed again");

    let drained = backends[0].addr.to_string();
    backends[0].set_serving(false);
    let started = Instant::now();
    wait_served(&mesh, &envoys, "NOT_SERVING published", |e| {
        health_of(e, &drained) == Some(Health::NotServing)
    })
    .await;
    let took = started.elapsed();
    let snapshot = mesh.snapshot().await.expect("snapshot");
    assert_eq!(snapshot.revision, revision, "no etcd write happened");
    assert!(
        took < INTERVAL * 4,
        "published {took:?} after the change, within a few check intervals"
    );
}
