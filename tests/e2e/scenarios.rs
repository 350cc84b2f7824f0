//! What production does to the mesh, each under a bounded load of calls
//! through Envoy that must not see a single failure.

use etcd_client::Client as EtcdClient;
use etcd_mesh_demo::client::say;
use etcd_mesh_demo::proto::SayRequest;
use etcd_mesh_demo::{DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_e2e::{settle_on, start_sync_server_on, Backend, BackgroundLoad, Mesh, DEADLINE};
use etcd_mesh_registration::{admin, Instance};
use etcd_mesh_testkit::{wait_for, Envoy, EnvoyOptions, EtcdCluster};
use etcd_mesh_wire::Snapshot;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// Up to this many calls per scenario; each ends well before.
const MAX_CALLS: usize = 200_000;

async fn listed(sync: SocketAddr) -> Option<Snapshot> {
    etcd_mesh_testkit::fetch_snapshot(sync).await
}

fn addrs(snapshot: &Snapshot) -> BTreeSet<String> {
    snapshot
        .services
        .get(DEMO_SERVICE)
        .map(|s| s.endpoints.iter().map(|e| e.addr.clone()).collect())
        .unwrap_or_default()
}

async fn wait_until_served(client: &etcd_mesh_demo::client::Client, addr: SocketAddr) {
    let wanted = addr.to_string();
    wait_for(&format!("{wanted} to take calls"), DEADLINE, || {
        let mut client = client.clone();
        let wanted = wanted.clone();
        async move { (say(&mut client, SayRequest::default()).await.ok()? == wanted).then_some(()) }
    })
    .await
    .expect("served");
}

/// Proves changes still reach traffic: a new backend registers, takes a
/// call, deregisters, and the tables are back to `base`.
async fn a_change_flows(
    etcd: Vec<String>,
    sync: SocketAddr,
    envoy: &Envoy,
    base: &[SocketAddr],
    client: &etcd_mesh_demo::client::Client,
) {
    let mut joined = Backend::registered(etcd, 1).await;
    let mut expected = base.to_vec();
    expected.push(joined.addr);
    settle_on(sync, envoy, &expected).await;
    wait_until_served(client, joined.addr).await;
    joined.deregister().await;
    settle_on(sync, envoy, base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_member_killed_and_restarted_under_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = EtcdCluster::start(dir.path(), 3)
        .await
        .expect("a 3-member cluster");
    let endpoints = cluster.endpoints();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (sync, _sync_stop) = start_sync_server_on(endpoints.clone(), listener).await;
    let options = EnvoyOptions {
        sync_servers: vec![sync],
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start(dir.path(), options).await.expect("envoy");
    let mut backends = Vec::new();
    for weight in [1, 2] {
        backends.push(Backend::registered(endpoints.clone(), weight).await);
    }
    let addrs_now: Vec<_> = backends.iter().map(|b| b.addr).collect();
    settle_on(sync, &envoy, &addrs_now).await;
    let clients = {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(
                etcd_mesh_demo::client::connect(envoy.listen)
                    .await
                    .expect("connect"),
            );
        }
        clients
    };
    let load = BackgroundLoad::start(clients.clone(), MAX_CALLS);

    for member in 0..3 {
        load.progress(20).await;
        cluster.members[member].kill();
        load.progress(20).await;
        // A registration made while a member is down is not lost.
        a_change_flows(endpoints.clone(), sync, &envoy, &addrs_now, &clients[0]).await;
        cluster.members[member]
            .restart()
            .await
            .expect("member restarts");
        load.progress(20).await;
    }
    load.assert_no_failed_call().await;
    let snapshot = listed(sync).await.expect("snapshot");
    for backend in &backends {
        assert!(
            addrs(&snapshot).contains(&backend.addr.to_string()),
            "lost {}",
            backend.addr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_server_replica_killed_under_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = etcd_mesh_testkit::Etcd::start(dir.path())
        .await
        .expect("etcd");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        replicas.push(start_sync_server_on(vec![etcd.endpoint()], listener).await);
    }
    let options = EnvoyOptions {
        sync_servers: replicas.iter().map(|(addr, _)| *addr).collect(),
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start(dir.path(), options).await.expect("envoy");
    let first = Backend::registered(vec![etcd.endpoint()], 1).await;
    settle_on(replicas[1].0, &envoy, &[first.addr]).await;
    let client = etcd_mesh_demo::client::connect(envoy.listen)
        .await
        .expect("connect");
    let load = BackgroundLoad::start(vec![client.clone(); 4], MAX_CALLS);

    // Kill one replica; changes keep reaching traffic through the other.
    let (survivor, _) = &replicas[1];
    load.progress(20).await;
    replicas[0].1.cancel();
    load.progress(20).await;
    for _ in 0..3 {
        a_change_flows(
            vec![etcd.endpoint()],
            *survivor,
            &envoy,
            &[first.addr],
            &client,
        )
        .await;
    }
    load.assert_no_failed_call().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_under_load() {
    let mut mesh = Mesh::start(2).await;
    let mut backends = Vec::new();
    for weight in [1, 3] {
        backends.push(Backend::registered(mesh.etcd_endpoints(), weight).await);
    }
    let addrs_now: Vec<_> = backends.iter().map(|b| b.addr).collect();
    mesh.settle(&addrs_now).await;
    let clients = mesh.clients(4).await;
    let load = BackgroundLoad::start(clients.clone(), MAX_CALLS);
    for _ in 0..2 {
        load.progress(20).await;
        mesh.etcd.restart().await.expect("etcd restarts");
        load.progress(20).await;
        // The registrations are back (or never left) and changes flow again.
        let etcd = mesh.etcd_endpoints();
        a_change_flows(etcd, mesh.sync_addr, &mesh.envoy, &addrs_now, &clients[0]).await;
    }
    load.assert_no_failed_call().await;
}

/// Sets a registration's weight in place, keeping its lease, as
/// `etcd-mesh-register set-weight` does.
async fn set_weight(etcd: &[String], addr: SocketAddr, weight: u32) {
    let mut client = EtcdClient::connect(etcd, None).await.expect("etcd");
    let key = Instance::new(DEMO_PREFIX, DEMO_SERVICE, &addr.to_string()).key();
    admin::set_weight(&mut client, &key, weight)
        .await
        .expect("set-weight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_through_graceful_drain() {
    let mesh = Mesh::start(2).await;
    let weights = [1, 2, 3];
    let mut backends = Vec::new();
    for weight in weights {
        backends.push(Backend::registered(mesh.etcd_endpoints(), weight).await);
    }
    mesh.settle(&backends.iter().map(|b| b.addr).collect::<Vec<_>>())
        .await;
    let clients = mesh.clients(4).await;
    let load = BackgroundLoad::start(clients.clone(), MAX_CALLS);
    for (i, weight) in weights.into_iter().enumerate() {
        // Drain: weight 0 until the plugin has it, then deregister, then stop.
        load.progress(20).await;
        let old = backends[i].addr;
        set_weight(&mesh.etcd_endpoints(), old, 0).await;
        wait_for("the drain to reach the plugin", DEADLINE, || async {
            let snapshot = listed(mesh.sync_addr).await?;
            let drained = snapshot
                .services
                .get(DEMO_SERVICE)?
                .endpoints
                .iter()
                .any(|e| e.addr == old.to_string() && e.weight == 0);
            let held = mesh
                .envoy
                .stat("wasmcustom.etcd_mesh.table_revision")
                .await?;
            (drained && held >= snapshot.revision).then_some(())
        })
        .await
        .expect("drained");
        backends[i].deregister().await;
        load.progress(20).await;
        backends[i].stop_serving();
        load.progress(20).await;
        // Its replacement comes up under a new address.
        backends[i] = Backend::registered(mesh.etcd_endpoints(), weight).await;
        mesh.settle(&backends.iter().map(|b| b.addr).collect::<Vec<_>>())
            .await;
        wait_until_served(&clients[0], backends[i].addr).await;
    }
    load.assert_no_failed_call().await;
}
