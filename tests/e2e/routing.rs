//! The whole path, end to end: registrations in etcd → sync-server → the
//! plugin in Envoy → weighted gRPC routing.

use etcd_mesh_demo::client::{say, split};
use etcd_mesh_demo::proto::SayRequest;
use etcd_mesh_e2e::{assert_split, Backend, Mesh, DEADLINE};
use etcd_mesh_testkit::wait_for;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_splits_600_calls_exactly_by_weight() {
    let mesh = Mesh::start(1).await;
    let backends = mesh.weighted_backends(&[1, 2, 3]).await;
    let counts = split(&mesh.clients(4).await, 600)
        .await
        .expect("every call succeeds");
    let expected: BTreeMap<String, usize> = backends
        .iter()
        .zip([100, 200, 300])
        .map(|(b, n)| (b.addr.to_string(), n))
        .collect();
    assert_eq!(counts, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_split_within_two_percent() {
    let mesh = Mesh::start(2).await;
    let backends = mesh.weighted_backends(&[1, 2, 3]).await;
    // Several connections, so that both workers take calls.
    let counts = split(&mesh.clients(8).await, 600)
        .await
        .expect("every call succeeds");
    assert_eq!(counts.values().sum::<usize>(), 600);
    assert_split(&counts, &backends, &[1, 2, 3], 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_reach_traffic_within_a_second() {
    let mesh = Mesh::start(2).await;
    let first = Backend::registered(mesh.etcd_endpoints(), 1).await;
    mesh.settle(&[first.addr]).await;
    let mut client = mesh.clients(1).await.remove(0);

    let mut second = Backend::unregistered().await;
    let registered_at = Instant::now();
    second.register(mesh.etcd_endpoints(), 1).await;
    let wanted = second.addr.to_string();
    wait_for("a call to land on the new backend", DEADLINE, || {
        let mut client = client.clone();
        let wanted = wanted.clone();
        async move { (say(&mut client, SayRequest::default()).await.ok()? == wanted).then_some(()) }
    })
    .await
    .expect("the new backend takes calls");
    let added_after = registered_at.elapsed();

    let deregistered_at = Instant::now();
    second.deregister().await;
    // After the last call that lands on it, ten in a row must avoid it.
    let mut clean_streak = 0;
    let mut last_hit = deregistered_at;
    while clean_streak < 10 {
        assert!(
            deregistered_at.elapsed() < DEADLINE,
            "the removed backend still takes calls"
        );
        let served_by = say(&mut client, SayRequest::default())
            .await
            .expect("call succeeds");
        if served_by == wanted {
            clean_streak = 0;
            last_hit = Instant::now();
        } else {
            clean_streak += 1;
        }
    }
    let removed_after = last_hit.duration_since(deregistered_at);
    println!("added after {added_after:?}, removed after {removed_after:?}");
    assert!(
        added_after < Duration::from_secs(1),
        "added after {added_after:?}"
    );
    assert!(
        removed_after < Duration::from_secs(1),
        "removed after {removed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_choose_the_upstream() {
    let mesh = Mesh::start(2).await;
    let registered = Backend::registered(mesh.etcd_endpoints(), 1).await;
    let bystander = Backend::unregistered().await;
    mesh.settle(&[registered.addr]).await;
    let mut client = mesh.clients(1).await.remove(0);
    for _ in 0..20 {
        let mut request = tonic::Request::new(SayRequest::default());
        request.metadata_mut().insert(
            "x-envoy-original-dst-host",
            bystander.addr.to_string().parse().expect("ascii"),
        );
        let response = client.say(request).await.expect("call succeeds");
        let served_by = etcd_mesh_demo::client::served_by(response.metadata()).expect("served by");
        assert_eq!(served_by, registered.addr.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_registrations_is_unavailable() {
    let mesh = Mesh::start(2).await;
    let backend = Backend::registered(mesh.etcd_endpoints(), 1).await;
    mesh.settle(&[backend.addr]).await;
    // The backend serves grpc.health.v1.Health too, but nothing registers it.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", mesh.envoy.listen))
        .expect("uri")
        .connect()
        .await
        .expect("connect to Envoy");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("no endpoint for the health service");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("grpc.health.v1.Health"),
        "the message names the service: {status:?}"
    );
    // The registered service still routes.
    let mut client = mesh.clients(1).await.remove(0);
    assert_eq!(
        say(&mut client, SayRequest::default())
            .await
            .expect("routes"),
        backend.addr.to_string()
    );
}
