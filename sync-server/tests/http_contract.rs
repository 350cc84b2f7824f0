//! sync-server over a real socket and a real etcd: a held long-poll
//! answered by a change written to etcd, shutdown ending a held long-poll,
//! the bearer token. The contract itself (ETags, 304s, errors, the change
//! feed) is tested in process, in `http_in_process.rs`.

mod common;

use common::{client, config, naming, Server, DEADLINE};
use etcd_mesh_testkit::{http_get, http_get_with, wait_for, Etcd};
use etcd_mesh_wire::Snapshot;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_is_answered_by_a_change_in_etcd_and_ended_by_shutdown() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let mut c = client(&etcd).await;
    c.put("svc/demo.Echo/a", naming("127.0.0.1:50001", 1), None)
        .await
        .expect("put");
    let server = Server::start(config(&etcd, &["etcd-naming=svc/"])).await;
    server.ready().await;
    let first = http_get_with(server.addr, "/v1/snapshot", &[])
        .await
        .expect("GET");
    let revision = Snapshot::decode(first.body.as_bytes())
        .expect("valid")
        .revision;
    // A held long-poll is answered by the next change.
    let addr = server.addr;
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let response = http_get(addr, &format!("/v1/snapshot?since={revision}&wait=30")).await;
        (response, started.elapsed())
    });
    wait_for("the long-poll to be held", DEADLINE, || async {
        (server.metric("sync_server_long_poll_waiters").await == 1).then_some(())
    })
    .await
    .expect("held");
    let put_at = Instant::now();
    c.put("svc/demo.Echo/b", naming("127.0.0.1:50002", 1), None)
        .await
        .expect("put");
    let ((status, body), _) = match poll.await.expect("poll task") {
        (Ok(response), elapsed) => (response, elapsed),
        (Err(e), _) => panic!("long-poll failed: {e}"),
    };
    let answered_after = put_at.elapsed();
    assert_eq!(status, 200);
    assert!(Snapshot::decode(body.as_bytes()).expect("valid").revision > revision);
    assert!(
        answered_after < Duration::from_secs(5),
        "answered {answered_after:?} after the put"
    );

    // Shutdown ends a held long-poll at once.
    let held = tokio::spawn(async move {
        http_get(
            addr,
            &format!("/v1/snapshot?since={}&wait=60", revision + 100),
        )
        .await
    });
    wait_for("the second long-poll to be held", DEADLINE, || async {
        (server.metric("sync_server_long_poll_waiters").await == 1).then_some(())
    })
    .await
    .expect("held");
    let stopping = Instant::now();
    server.shutdown().await;
    let answer = held.await.expect("task").expect("answered");
    assert_eq!(answer.0, 304);
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        stopping.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_guards_the_api_but_not_the_probes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let mut guarded = config(&etcd, &["etcd-naming=svc/"]);
    guarded.token = Some("s3cret".into());
    let server = Server::start(guarded).await;
    server.ready().await;
    for path in ["/v1/snapshot", "/metrics", "/v1/services/x"] {
        for headers in [
            &[][..],
            &[("Authorization", "Bearer wrong")],
            &[("Authorization", "s3cret")],
        ] {
            let response = http_get_with(server.addr, path, headers)
                .await
                .expect("GET");
            assert_eq!(response.status, 401, "{path} {headers:?}");
        }
    }
    let ok = http_get_with(
        server.addr,
        "/v1/snapshot",
        &[("Authorization", "Bearer s3cret")],
    )
    .await
    .expect("GET");
    assert_eq!(ok.status, 200);
    assert_eq!(http_get(server.addr, "/healthz").await.expect("GET").0, 200);
    server.shutdown().await;
}
