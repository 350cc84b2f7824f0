//! Partitions across hosts (network namespaces, root only): the mesh tells
//! the truth when the network lies. Three etcd members and the sync-server
//! replicas each on their own host, Envoy and the backends in the test's
//! own namespace, faults that drop packets silently (no reset).
//!
//! - A sync-server beside an etcd member cut from the majority turns stale,
//!   the Envoy that follows it moves to the replica on the majority side,
//!   and calls to an endpoint deregistered there stop within 10 s; once
//!   healed, the cut replica catches up within 2 s.
//! - An Envoy cut from its sync-server routes on its tables, and after the
//!   heal resumes from the same replica with a delta.

use etcd_client::Client;
use etcd_mesh_demo::client::{connect, split};
use etcd_mesh_demo::{DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_e2e::{Backend, DEADLINE};
use etcd_mesh_registration::Instance;
use etcd_mesh_testkit::{
    fetch_snapshot, http_get, wait_for, workspace_root, Envoy, EnvoyOptions, Frozen, Host, Net,
    NetEtcd, Proc,
};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The port sync-server listens on in its own host.
const SYNC_PORT: u16 = 8090;

/// A sync-server process on `host`, over `etcd`, ready.
async fn sync_server_on(host: &Host, etcd: &[String], dir: &Path) -> (Proc, SocketAddr) {
    let binary = workspace_root().join("target/debug/sync-server");
    assert!(binary.exists(), "`make test` builds {}", binary.display());
    let addr = host.socket_addr(SYNC_PORT);
    let watch = format!("etcd-naming={DEMO_PREFIX}");
    let listen = addr.to_string();
    let members = etcd.join(",");
    // Defaults otherwise: `--freshness-timeout 5s` is what is tested.
    let args = ["--etcd", &members, "--listen", &listen, "--watch", &watch];
    let log = dir.join(format!("sync-server-{}.log", host.name()));
    let proc = host
        .spawn(binary.to_str().expect("utf-8 path"), &args, log)
        .expect("sync-server starts");
    wait_for("sync-server ready", DEADLINE, || async {
        matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_tail(20)));
    (proc, addr)
}

/// Puts (or with `None`, deletes) the demo registration of `addr` through
/// member `endpoint`, retried until the cluster takes it; the revision.
async fn write(endpoint: &str, addr: SocketAddr, put: bool) -> u64 {
    let instance = Instance::new(DEMO_PREFIX, DEMO_SERVICE, &addr.to_string());
    wait_for("etcd to take the write", DEADLINE, || async {
        let attempt = async {
            let mut client = Client::connect([endpoint], None).await.ok()?;
            let header = if put {
                client
                    .put(instance.key(), instance.value(), None)
                    .await
                    .ok()?
                    .header()
                    .cloned()
            } else {
                client
                    .delete(instance.key(), None)
                    .await
                    .ok()?
                    .header()
                    .cloned()
            };
            header.map(|h| h.revision() as u64)
        };
        tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .ok()
            .flatten()
    })
    .await
    .expect("write")
}

/// Envoy following `replicas`, its long-polls held `wait_seconds`, once
/// it holds `revision`.
async fn envoy_following(
    dir: &Path,
    replicas: Vec<SocketAddr>,
    wait_seconds: u32,
    revision: u64,
) -> Envoy {
    let poller = format!(
        r#"{{"role": "poller", "clusters": {{{{SYNC_CLUSTER_NAMES}}}}, "authority": "sync-server", "wait_seconds": {wait_seconds}, "timeout_margin_ms": 1000}}"#
    );
    let envoy = Envoy::start(
        dir,
        EnvoyOptions {
            sync_servers: replicas,
            poller_config: Some(poller),
            ..EnvoyOptions::default()
        },
    )
    .await
    .expect("envoy");
    envoy
        .wait_for_revision(revision, DEADLINE)
        .await
        .expect("tables");
    envoy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_beside_a_member_cut_from_the_majority_is_left_and_nothing_deregistered_is_called(
) {
    let net = Net::new().expect("network namespaces");
    let dir = tempfile::tempdir().expect("temporary dir");
    let etcd = NetEtcd::start(&net, dir.path(), 3).await.expect("etcd");
    let members = etcd.endpoints();
    // Replica 0 shares member 0's host; replica 1 has a host of its own.
    let (s0_proc, s0) = sync_server_on(etcd.member_host(0), &members, dir.path()).await;
    let sync1 = net.host("sync1").expect("host");
    let (s1_proc, s1) = sync_server_on(&sync1, &members, dir.path()).await;

    let kept = Backend::unregistered().await;
    let gone = Backend::unregistered().await;
    write(&members[1], kept.addr, true).await;
    let revision = write(&members[1], gone.addr, true).await;
    let envoy = envoy_following(dir.path(), vec![s0, s1], 30, revision).await;
    // Follow replica 0 first: the one that will be cut with its member.
    if envoy.plugin_stat("sync_replica").await != 0 {
        let _frozen = Frozen::freeze(s1_proc.pid());
        wait_for("the poller to follow replica 0", DEADLINE, || async {
            (envoy.plugin_stat("sync_replica").await == 0).then_some(())
        })
        .await
        .expect("on replica 0");
    }
    let clients = vec![connect(envoy.listen).await.expect("client")];
    let counts = split(&clients, 20).await.expect("calls");
    assert_eq!(counts.len(), 2, "both backends called: {counts:?}");

    // Member 0's host (with replica 0) loses the two other members.
    for other in 1..3 {
        net.cut_pair(etcd.member_host(0), etcd.member_host(other))
            .expect("cut");
    }
    let cut_at = Instant::now();
    let deregistered = write(&members[1], gone.addr, false).await;
    let deregistered_at = Instant::now();
    let stale_after = wait_for("replica 0 to say stale", DEADLINE, || async {
        let snapshot = fetch_snapshot(s0).await?;
        snapshot.stale.then(|| cut_at.elapsed())
    })
    .await
    .expect("replica 0 turns stale");
    // Calls until none reaches the deregistered endpoint for a whole second.
    let mut last_call_to_gone = None;
    let mut clean_since = Instant::now();
    let mut calls = 0;
    while clean_since.elapsed() < Duration::from_secs(1) {
        assert!(deregistered_at.elapsed() < DEADLINE, "calls never stopped");
        let counts = split(&clients, 4).await.expect("calls keep succeeding");
        calls += 4;
        if counts.contains_key(&gone.addr.to_string()) {
            last_call_to_gone = Some(deregistered_at.elapsed());
            clean_since = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = last_call_to_gone.unwrap_or_default();
    eprintln!(
        "member cut from the majority: replica 0 stale {stale_after:?} after the cut; \
         calls to the deregistered endpoint stopped {stopped:?} after the deregistration \
         ({calls} calls, none failed)"
    );
    assert!(stale_after <= Duration::from_secs(6), "{stale_after:?}");
    assert!(stopped <= Duration::from_secs(10), "{stopped:?}");
    assert_eq!(
        envoy.plugin_stat("sync_replica").await,
        1,
        "on the majority side"
    );

    for other in 1..3 {
        net.heal_pair(etcd.member_host(0), etcd.member_host(other))
            .expect("heal");
    }
    let healed_at = Instant::now();
    let caught_up = wait_for("replica 0 fresh and caught up", DEADLINE, || async {
        let snapshot = fetch_snapshot(s0).await?;
        (!snapshot.stale && snapshot.revision >= deregistered).then(|| healed_at.elapsed())
    })
    .await
    .expect("replica 0 catches up");
    eprintln!("member cut from the majority: replica 0 caught up {caught_up:?} after the heal");
    assert!(
        caught_up <= Duration::from_secs(2),
        "{caught_up:?}\n{}",
        s0_proc.log_tail(30)
    );
    drop(kept);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_cut_from_its_sync_server_routes_on_and_resumes_with_a_delta() {
    let net = Net::new().expect("network namespaces");
    let dir = tempfile::tempdir().expect("temporary dir");
    let etcd = NetEtcd::start(&net, dir.path(), 1).await.expect("etcd");
    let members = etcd.endpoints();
    let sync = net.host("sync").expect("host");
    let (_s, s) = sync_server_on(&sync, &members, dir.path()).await;
    let first = Backend::unregistered().await;
    let second = Backend::unregistered().await;
    let revision = write(&members[0], first.addr, true).await;
    // One replica, short long-polls: a poll hung by the cut ends in 6 s.
    let envoy = envoy_following(dir.path(), vec![s], 5, revision).await;
    let clients = vec![connect(envoy.listen).await.expect("client")];
    let full = envoy.plugin_stat("updates_full").await;
    let failed = envoy.plugin_stat("polls_failed").await;

    net.cut(&sync).expect("cut the sync-server's host");
    let cut_at = Instant::now();
    let revision = write(&members[0], second.addr, true).await;
    wait_for("a poll to fail while cut off", DEADLINE, || async {
        (envoy.plugin_stat("polls_failed").await > failed).then_some(())
    })
    .await
    .expect("polls fail");
    let counts = split(&clients, 10).await.expect("routing on held tables");
    assert_eq!(counts.get(&first.addr.to_string()), Some(&10), "{counts:?}");
    let failing_after = cut_at.elapsed();

    net.heal(&sync).expect("heal");
    let healed_at = Instant::now();
    envoy
        .wait_for_revision(revision, DEADLINE)
        .await
        .expect("the change made during the cut arrives");
    let resumed = healed_at.elapsed();
    eprintln!(
        "Envoy cut from sync-server: a poll failed {failing_after:?} after the cut, calls routed on; \
         the change made during the cut arrived {resumed:?} after the heal"
    );
    assert_eq!(
        envoy.plugin_stat("updates_full").await,
        full,
        "resumed with a delta, nothing reloaded"
    );
    let counts = split(&clients, 10).await.expect("calls");
    assert_eq!(counts.len(), 2, "the new backend takes calls: {counts:?}");
}
