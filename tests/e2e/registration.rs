//! Registration changes made with the admin commands reach sync-server's
//! snapshot and the traffic; a drained instance whose process still runs
//! stays in the snapshot at weight 0 until that process deregisters.

use etcd_mesh_demo::{DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_e2e::{Mesh, DEADLINE};
use etcd_mesh_registration::{admin, Instance};
use etcd_mesh_testkit::wait_for;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_weight_and_drain_show_in_the_snapshot() {
    let mesh = Mesh::start(1).await;
    let mut backends = mesh.weighted_backends(&[1, 1]).await;
    let key = Instance::new(DEMO_PREFIX, DEMO_SERVICE, &backends[0].addr.to_string()).key();
    let mut etcd = etcd_client::Client::connect(mesh.etcd_endpoints(), None)
        .await
        .expect("etcd");
    let addr = backends[0].addr.to_string();
    let weight_of = |snapshot: &etcd_mesh_wire::Snapshot| {
        snapshot
            .services
            .get(DEMO_SERVICE)?
            .endpoints
            .iter()
            .find(|e| e.addr == addr)
            .map(|e| e.weight)
    };

    admin::set_weight(&mut etcd, &key, 5)
        .await
        .expect("set-weight");
    let revision = wait_for("weight 5 in the snapshot", DEADLINE, || async {
        let snapshot = mesh.snapshot().await?;
        (weight_of(&snapshot) == Some(5)).then_some(snapshot.revision)
    })
    .await
    .expect("shown");
    mesh.envoy
        .wait_for_revision(revision, DEADLINE)
        .await
        .expect("in Envoy");
    let counts = etcd_mesh_demo::client::split(&mesh.clients(1).await, 600)
        .await
        .expect("calls");
    assert_eq!(
        counts.get(&backends[0].addr.to_string()),
        Some(&500),
        "{counts:?}"
    );

    // Drain: weight 0 first (no new calls), then the key is deleted.
    let drain = tokio::spawn({
        let mut etcd = etcd.clone();
        let key = key.clone();
        async move { admin::drain(&mut etcd, &key, Duration::from_secs(1)).await }
    });
    wait_for("weight 0 in the snapshot", DEADLINE, || async {
        (weight_of(&mesh.snapshot().await?) == Some(0)).then_some(())
    })
    .await
    .expect("draining");
    drain.await.expect("task").expect("drained");
    // The backend's own registration puts the key back, still at weight 0.
    let put_back = wait_for("the key put back", DEADLINE, || {
        let mut etcd = etcd.clone();
        let key = key.clone();
        async move {
            let response = etcd.get(key, None).await.ok()?;
            let kv = response.kvs().first()?;
            (admin::weight_of(kv.value()).ok()? == 0).then_some(kv.mod_revision())
        }
    })
    .await
    .expect("put back");
    let put_back = u64::try_from(put_back).expect("a revision");
    wait_for(
        "weight 0 in the snapshot after the put-back",
        DEADLINE,
        || async {
            let snapshot = mesh.snapshot().await?;
            (snapshot.revision >= put_back && weight_of(&snapshot) == Some(0)).then_some(())
        },
    )
    .await
    .expect("still drained");
    backends[0].deregister().await;
    wait_for("the deregistered endpoint to leave", DEADLINE, || async {
        weight_of(&mesh.snapshot().await?).is_none().then_some(())
    })
    .await
    .expect("gone");
}
