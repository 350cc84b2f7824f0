//! The plugin in Envoy (`--concurrency 2`): one poller, smooth weighted
//! picks, outlier ejection, and routing on through sync-server trouble.

use etcd_mesh_demo::client::{say, split};
use etcd_mesh_demo::proto::SayRequest;
use etcd_mesh_e2e::{assert_split, load, Backend, BackgroundLoad, Mesh, DEADLINE};
use etcd_mesh_testkit::{http_get, wait_for, Envoy, EnvoyOptions};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poller_per_envoy_whatever_the_concurrency() {
    let mesh = Mesh::start(2).await;
    let _backends = mesh.weighted_backends(&[1]).await;
    let clients = mesh.clients(4).await;
    split(&clients, 40)
        .await
        .expect("calls succeed on both workers");
    // Sampled over a while: never more than one long-poll from this Envoy.
    let mut samples = Vec::new();
    for _ in 0..10 {
        samples.push(
            mesh.sync_metric("sync_server_long_poll_waiters")
                .await
                .expect("metric"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(samples.iter().all(|n| *n <= 1), "{samples:?}");
    assert!(
        samples.contains(&1),
        "the poller holds a long-poll: {samples:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_thousand_calls_split_within_one_percent() {
    let mesh = Mesh::start(2).await;
    let backends = mesh.weighted_backends(&[1, 2, 3]).await;
    let counts = split(&mesh.clients(8).await, 6_000)
        .await
        .expect("every call succeeds");
    assert_split(&counts, &backends, &[1, 2, 3], 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_calls_after_a_change_spread_over_hosts() {
    let mesh = Mesh::start(2).await;
    let mut backends = mesh.weighted_backends(&[1, 2, 3]).await;
    let clients = mesh.clients(6).await;
    split(&clients, 60).await.expect("warm up both workers");
    // The change: a fourth, heavy backend joins.
    backends.push(Backend::registered(mesh.etcd_endpoints(), 3).await);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    mesh.settle(&addrs).await;
    let mut hosts = BTreeSet::new();
    for client in &clients {
        let mut client = client.clone();
        hosts.insert(say(&mut client, SayRequest::default()).await.expect("call"));
    }
    assert!(
        hosts.len() >= 3,
        "the first 6 calls after the change went to {hosts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_server_killed_and_restarted_under_load_fails_no_call() {
    let mut mesh = Mesh::start(2).await;
    let _backends = mesh.weighted_backends(&[1, 1]).await;
    let clients = mesh.clients(4).await;
    let under_load = BackgroundLoad::start(clients.clone(), 200_000);
    under_load.progress(20).await;
    mesh.stop_sync_server();
    let polls_failed = "wasmcustom.etcd_mesh.polls_failed";
    let failed_before = mesh.envoy.stat(polls_failed).await.unwrap_or(0);
    wait_for("the poller to notice", DEADLINE, || async {
        (mesh.envoy.stat(polls_failed).await? > failed_before).then_some(())
    })
    .await
    .expect("polls fail while sync-server is away");
    under_load.progress(20).await;
    mesh.restart_sync_server().await;
    // The restarted server's changes reach traffic again.
    let late = Backend::registered(mesh.etcd_endpoints(), 1).await;
    let wanted = late.addr.to_string();
    wait_for("the new backend to take calls", DEADLINE, || {
        let mut client = clients[0].clone();
        let wanted = wanted.clone();
        async move { (say(&mut client, SayRequest::default()).await.ok()? == wanted).then_some(()) }
    })
    .await
    .expect("routing follows the restarted sync-server");
    under_load.assert_no_failed_call().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_sync_server_keeps_the_last_tables() {
    bad_answers_keep_the_last_tables(b"{\"revision\": 999999, \"services\": ".to_vec()).await;
}

/// Envoy buffers at most 32 MiB of a plugin's HTTP call answer; a larger
/// one is drained and the call fails without headers (the SDK's header
/// reader panics on what the host returns then: the VM must not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_envoys_buffer_limit_keeps_the_last_tables() {
    let mut body = b"{\"revision\": 999999, \"services\": {}".to_vec();
    body.resize(33 << 20, b' ');
    body.push(b'}');
    bad_answers_keep_the_last_tables(body).await;
}

/// Something else answers on sync-server's port, 200 with `body`, over
/// and over: the poller keeps asking, counts failed polls, and the tables
/// held and the routing stay as they were.
async fn bad_answers_keep_the_last_tables(body: Vec<u8>) {
    let mut mesh = Mesh::start(2).await;
    let backends = mesh.weighted_backends(&[1]).await;
    let revision = "wasmcustom.etcd_mesh.table_revision";
    let digest = "wasmcustom.etcd_mesh.table_digest";
    let held = (
        mesh.envoy.stat(revision).await,
        mesh.envoy.stat(digest).await,
    );
    assert!(
        held.0.is_some() && held.1.is_some(),
        "tables held: {held:?}"
    );
    mesh.stop_sync_server();
    let impostor = std::net::TcpListener::bind(mesh.sync_addr).or_else(|_| {
        std::thread::sleep(Duration::from_millis(200));
        std::net::TcpListener::bind(mesh.sync_addr)
    });
    let impostor = impostor.expect("bind the impostor");
    impostor.set_nonblocking(true).expect("nonblocking");
    let stop = CancellationToken::new();
    let answered = Arc::new(AtomicUsize::new(0));
    let impostor = {
        let (stop, answered) = (stop.clone(), Arc::clone(&answered));
        std::thread::spawn(move || {
            while !stop.is_cancelled() && answered.load(Ordering::Relaxed) < 1_000 {
                match impostor.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut buf = [0u8; 4096];
                        let _ = conn.read(&mut buf);
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = conn.write_all(&body);
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let polls_failed = "wasmcustom.etcd_mesh.polls_failed";
    // A poller whose VM died would not ask again.
    wait_for("the bad answer to be served twice", DEADLINE, || async {
        (answered.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await
    .expect("the poller keeps asking");
    let failed = mesh.envoy.stat(polls_failed).await.unwrap_or(0);
    assert!(failed >= 1, "a bad answer counts as a failed poll");
    let mut client = mesh.clients(1).await.remove(0);
    for _ in 0..50 {
        let served_by = say(&mut client, SayRequest::default())
            .await
            .expect("still routes");
        assert_eq!(served_by, backends[0].addr.to_string());
    }
    assert_eq!(
        (
            mesh.envoy.stat(revision).await,
            mesh.envoy.stat(digest).await
        ),
        held,
        "the bad answer changed nothing held"
    );
    let log = mesh.envoy.log_tail(400);
    assert!(!log.contains("panicked"), "the plugin panicked:\n{log}");
    stop.cancel();
    impostor.join().expect("impostor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_still_registered_is_ejected() {
    let mesh = Mesh::start(2).await;
    let backends = mesh.weighted_backends(&[1, 1, 1]).await;
    let clients = mesh.clients(4).await;
    split(&clients, 30).await.expect("all up");
    backends[0].stop_serving();
    let never = CancellationToken::new();
    let (_, failures) = load(&clients, 300, &never, &AtomicUsize::new(0)).await;
    println!("failures while ejecting: {failures:?}");
    // Each worker needs 5 failures in a row to eject; a few more may be in
    // flight. Then nothing fails.
    assert!(
        failures.len() <= 12,
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(
        failures
            .iter()
            .all(|(i, code)| *i < 150 && *code == Code::Unavailable),
        "{failures:?}"
    );
    wait_for(
        "the ejection to show in Envoy's stats",
        DEADLINE,
        || async { (mesh.envoy.stat("wasmcustom.etcd_mesh.ejections").await? >= 1).then_some(()) },
    )
    .await
    .expect("counted");
    let (_, after) = load(&clients, 100, &never, &AtomicUsize::new(0)).await;
    assert!(after.is_empty(), "after ejection: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_named_by_a_header_through_a_name_map() {
    let mesh = Mesh::start_with(EnvoyOptions {
        router_config: Some(
            r#"{"role": "router", "service_from": {"header": "x-service"}, "service_names": {"echo": "demo.Echo"}}"#.into(),
        ),
        ..EnvoyOptions::default()
    })
    .await;
    let backend = Backend::registered(mesh.etcd_endpoints(), 1).await;
    mesh.settle(&[backend.addr]).await;
    let mut client = mesh.clients(1).await.remove(0);
    let mut request = tonic::Request::new(SayRequest::default());
    request
        .metadata_mut()
        .insert("x-service", "echo".parse().expect("ascii"));
    let response = client.say(request).await.expect("routed by the header");
    assert_eq!(
        etcd_mesh_demo::client::served_by(response.metadata()).expect("served by"),
        backend.addr.to_string()
    );
    let status = say(&mut client, SayRequest::default())
        .await
        .expect_err("no header, no service");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_plugin_configuration_fails_loading_and_names_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = EnvoyOptions {
        sync_servers: vec!["127.0.0.1:9".parse().expect("addr")],
        router_config: Some(r#"{"role": "router", "no_endpoint_status": 99}"#.into()),
        ..EnvoyOptions::default()
    };
    let err = Envoy::start(dir.path(), options)
        .await
        .expect_err("Envoy refuses the plugin");
    assert!(err.contains("no_endpoint_status"), "{err}");
    let _ = http_get; // (the admin interface never came up)
}

/// The shipped module is built without the benchmark's `noop` role: a
/// configuration that asks for it is refused, saying so, rather than
/// loaded (or crashing the VM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_module_refuses_the_noop_role() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = EnvoyOptions {
        sync_servers: vec!["127.0.0.1:9".parse().expect("addr")],
        router_config: Some(r#"{"role": "noop"}"#.into()),
        ..EnvoyOptions::default()
    };
    let err = Envoy::start(dir.path(), options)
        .await
        .expect_err("Envoy refuses the plugin");
    assert!(err.contains("bench-noop"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
