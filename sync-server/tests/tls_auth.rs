//! The sync-server binary reaching etcd over TLS with a client
//! certificate, and as an etcd user.

mod common;

use common::DEADLINE;
use etcd_mesh_testkit::{free_port, http_get, wait_for, Etcd, EtcdTlsFiles, Proc};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

fn spawn_binary(dir: &Path, args: &[&str]) -> (SocketAddr, Proc) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port().expect("port")));
    let mut command = Command::new(env!("CARGO_BIN_EXE_sync-server"));
    command
        .args(["--listen", &addr.to_string(), "--watch", "etcd-naming=svc/"])
        .args(args);
    let log = dir.join(format!("sync-{}.log", addr.port()));
    (
        addr,
        Proc::spawn("sync-server", command, log).expect("spawn"),
    )
}

/// etcd refuses this sync-server: it says so in its log and is not ready.
async fn refused_by_etcd(addr: SocketAddr, proc: &Proc) {
    wait_for("the refusal to be logged", DEADLINE, || async {
        proc.log_tail(20)
            .contains("etcd sync interrupted")
            .then_some(())
    })
    .await
    .expect("logged");
    assert_eq!(http_get(addr, "/readyz").await.expect("GET").0, 503);
}

async fn binary_ready(addr: SocketAddr, proc: &Proc) {
    let ready = wait_for("/readyz", DEADLINE, || async move {
        matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await;
    assert!(ready.is_ok(), "{ready:?}\n{}", proc.log_tail(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = EtcdTlsFiles::make(dir.path()).expect("certificates");
    let etcd = Etcd::start_tls(dir.path(), tls.clone())
        .await
        .expect("etcd with TLS");
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (addr, server) = spawn_binary(
        dir.path(),
        &[
            "--etcd",
            &etcd.endpoint(),
            "--etcd-ca",
            &p("ca.pem"),
            "--etcd-cert",
            &p("client.pem"),
            "--etcd-key",
            &p("client.key"),
        ],
    );
    binary_ready(addr, &server).await;
    // Without the client certificate etcd refuses, and sync-server says so.
    let (plain_addr, plain) = spawn_binary(
        dir.path(),
        &["--etcd", &etcd.endpoint(), "--etcd-ca", &p("ca.pem")],
    );
    refused_by_etcd(plain_addr, &plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_auth() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let etcdctl = |args: &[&str]| {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.endpoint()])
            .args(args)
            .output()
            .expect("etcdctl runs");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    etcdctl(&["user", "add", "root:rootpw"]);
    etcdctl(&["auth", "enable"]);
    std::fs::write(dir.path().join("pw"), "rootpw\n").expect("write");
    std::fs::write(dir.path().join("wrong"), "nope\n").expect("write");
    let pw = dir.path().join("pw").display().to_string();
    let (addr, server) = spawn_binary(
        dir.path(),
        &[
            "--etcd",
            &etcd.endpoint(),
            "--etcd-user",
            "root",
            "--etcd-password-file",
            &pw,
        ],
    );
    binary_ready(addr, &server).await;
    let wrong = dir.path().join("wrong").display().to_string();
    let (bad_addr, bad) = spawn_binary(
        dir.path(),
        &[
            "--etcd",
            &etcd.endpoint(),
            "--etcd-user",
            "root",
            "--etcd-password-file",
            &wrong,
        ],
    );
    refused_by_etcd(bad_addr, &bad).await;
}
