//! The sync-server binary against a real etcd: its command line, the
//! snapshot it serves, and a clean exit on SIGTERM.

use etcd_mesh_testkit::{free_port, http_get, wait_for, Etcd, Proc};
use etcd_mesh_wire::Snapshot;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(20);

async fn etcd_put(etcd: &Etcd, key: &str, value: &str) {
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect etcd");
    client.put(key, value, None).await.expect("put");
}

#[tokio::test]
async fn serves_both_formats_and_rejects_garbage() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    etcd_put(
        &etcd,
        "svc/demo.Echo/a",
        r#"{"Op":0,"Addr":"127.0.0.1:5001","Metadata":{"weight":3}}"#,
    )
    .await;
    etcd_put(&etcd, "svc/demo.Echo/b", "not json").await;
    etcd_put(&etcd, "openim:///User/127.0.0.1:6001", "127.0.0.1:6001").await;

    let addr = SocketAddr::from(([127, 0, 0, 1], free_port().expect("port")));
    let mut command = Command::new(env!("CARGO_BIN_EXE_sync-server"));
    command
        .args(["--etcd", &etcd.endpoint(), "--listen", &addr.to_string()])
        .args([
            "--watch",
            "etcd-naming=svc/",
            "--watch",
            "openim-v2=openim:///",
        ]);
    let mut server =
        Proc::spawn("sync-server", command, dir.path().join("sync.log")).expect("spawn");
    let ready = wait_for("/readyz", DEADLINE, || async move {
        matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await;
    assert!(ready.is_ok(), "{ready:?}\n{}", server.log_tail(20));

    let (status, body) = http_get(addr, "/v1/snapshot").await.expect("GET");
    assert_eq!(status, 200, "{body}");
    let snapshot = Snapshot::decode(body.as_bytes()).expect("a valid snapshot");
    let echo = &snapshot.services["demo.Echo"].endpoints;
    assert_eq!(
        (echo.len(), echo[0].addr.as_str(), echo[0].weight),
        (1, "127.0.0.1:5001", 3)
    );
    assert_eq!(
        snapshot.services["User"].endpoints[0].addr,
        "127.0.0.1:6001"
    );
    assert_eq!(snapshot.rejected.len(), 1);
    assert_eq!(snapshot.rejected[0].key, "svc/demo.Echo/b");
    assert!(
        server.log_tail(50).contains("svc/demo.Echo/b"),
        "the rejection is logged"
    );

    let (status, body) = http_get(addr, "/v1/snapshot?since=x").await.expect("GET");
    assert_eq!(status, 400);
    assert!(body.contains("since"), "{body}");
    assert_eq!(http_get(addr, "/nope").await.expect("GET").0, 404);

    server.terminate(Duration::from_secs(5));
    assert!(server.exited());
    assert!(
        server.log_tail(5).contains("sync-server stopped"),
        "{}",
        server.log_tail(5)
    );
}

#[tokio::test]
async fn refuses_a_bad_command_line() {
    let output = Command::new(env!("CARGO_BIN_EXE_sync-server"))
        .args(["--etcd", "127.0.0.1:1", "--watch", "zookeeper=/x"])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown format"), "{stderr}");
}
