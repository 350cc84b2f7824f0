//! The in-process sync-server the integration tests share: started on a
//! free loopback port in the test's runtime, stopped when dropped.

#![allow(dead_code)] // each test binary uses its own part

use etcd_mesh_testkit::{fetch_snapshot, http_get, prometheus_value, wait_for, wait_ready};
use etcd_mesh_wire::Snapshot;
use std::net::SocketAddr;
use std::time::Duration;
use sync_server::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An etcd-naming registration value, as the registration library writes it.
pub fn naming(addr: &str, weight: u32) -> String {
    etcd_mesh_registration::Instance::new("", "", addr)
        .with_weight(weight)
        .value()
}

/// sync-server's configuration for the etcd at `etcd`, watching `watches`.
pub fn config(etcd: &etcd_mesh_testkit::Etcd, watches: &[&str]) -> Config {
    Config::new(
        sync_server::etcd::EtcdOptions::new(vec![etcd.endpoint()]),
        watches.iter().map(|w| w.parse().expect("spec")).collect(),
    )
}

/// A client of the etcd at `etcd`.
pub async fn client(etcd: &etcd_mesh_testkit::Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect etcd")
}

/// How long any start-up or change may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// sync-server running in this test's runtime.
pub struct Server {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub async fn start(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(sync_server::run(config, listener, stop.clone()));
        Server {
            addr,
            stop,
            task: Some(task),
        }
    }

    pub async fn ready(&self) {
        let addr = self.addr;
        wait_ready(addr, DEADLINE)
            .await
            .expect("sync-server becomes ready");
    }

    pub async fn snapshot(&self) -> Snapshot {
        let (status, body) = http_get(self.addr, "/v1/snapshot").await.expect("GET");
        assert_eq!(status, 200, "{body}");
        Snapshot::decode(body.as_bytes()).expect("valid snapshot")
    }

    /// Waits until the snapshot satisfies `test`.
    pub async fn until(&self, what: &str, test: impl Fn(&Snapshot) -> bool) -> Snapshot {
        wait_for(what, DEADLINE, || async {
            let snapshot = fetch_snapshot(self.addr).await?;
            test(&snapshot).then_some(snapshot)
        })
        .await
        .expect(what)
    }

    pub async fn metric(&self, name: &str) -> u64 {
        let (_, body) = http_get(self.addr, "/metrics").await.expect("GET /metrics");
        prometheus_value(&body, name).unwrap_or_else(|| panic!("no metric {name} in\n{body}"))
    }

    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let task = self.task.take().expect("running");
        let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(
            matches!(ended, Ok(Ok(Ok(())))),
            "run() ends cleanly: {ended:?}"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
