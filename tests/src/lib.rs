//! The end-to-end harness: one [`Mesh`] per test, on free loopback ports
//! and its own temporary directory, torn down when dropped (even when the
//! test fails). etcd and Envoy are real processes; sync-server and the
//! backends run in the test's runtime through their own libraries, so a
//! test can stop and restart them.

#![forbid(unsafe_code)]

mod load;
mod processes;

pub use load::*;
pub use processes::*;

use etcd_mesh_demo::{backend, client, DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_registration::{Instance, Registration};
use etcd_mesh_testkit::{
    fetch_snapshot, http_get, prometheus_value, wait_for, wait_ready, Envoy, EnvoyOptions, Etcd,
};
use etcd_mesh_wire::Snapshot;
use std::net::SocketAddr;
use std::time::Duration;
use sync_server::etcd::EtcdOptions;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long any start-up or propagation may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// etcd + sync-server + Envoy, ready to route.
pub struct Mesh {
    pub envoy: Envoy,
    pub sync_addr: SocketAddr,
    pub etcd: Etcd,
    sync_stop: CancellationToken,
    _dir: TempDir,
}

impl Mesh {
    pub async fn start(concurrency: u32) -> Mesh {
        Self::start_with(EnvoyOptions {
            concurrency,
            ..EnvoyOptions::default()
        })
        .await
    }

    /// With these Envoy options (the sync-server address is filled in).
    pub async fn start_with(options: EnvoyOptions) -> Mesh {
        Self::start_configured(options, |_| {}).await
    }

    /// With these Envoy options and sync-server configured by `configure`.
    pub async fn start_configured(
        mut options: EnvoyOptions,
        configure: impl FnOnce(&mut sync_server::Config),
    ) -> Mesh {
        let dir = tempfile::tempdir().expect("temporary dir");
        let etcd = Etcd::start(dir.path()).await.expect("etcd starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (sync_addr, sync_stop) =
            start_sync_server_with(vec![etcd.endpoint()], listener, configure).await;
        options.sync_servers = vec![sync_addr];
        let envoy = Envoy::start(dir.path(), options)
            .await
            .expect("envoy starts");
        Mesh {
            envoy,
            sync_addr,
            etcd,
            sync_stop,
            _dir: dir,
        }
    }

    /// The snapshot sync-server serves now.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        fetch_snapshot(self.sync_addr).await
    }

    /// Waits until sync-server lists exactly `addrs` for the demo service
    /// and the plugin in Envoy holds that revision.
    pub async fn settle(&self, addrs: &[SocketAddr]) {
        settle_on(self.sync_addr, &self.envoy, addrs).await;
    }

    /// `n` clients of Envoy's gRPC listener, each on its own connection.
    pub async fn clients(&self, n: usize) -> Vec<client::Client> {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(
                client::connect(self.envoy.listen)
                    .await
                    .expect("connect to Envoy"),
            );
        }
        clients
    }

    pub fn etcd_endpoints(&self) -> Vec<String> {
        vec![self.etcd.endpoint()]
    }

    /// Stops sync-server (its long-polls end, its port closes).
    pub fn stop_sync_server(&mut self) {
        self.sync_stop.cancel();
    }

    /// Starts sync-server again on the same address.
    pub async fn restart_sync_server(&mut self) {
        self.restart_sync_server_with(|_| {}).await;
    }

    /// The same, configured further by `configure`.
    pub async fn restart_sync_server_with(
        &mut self,
        configure: impl FnOnce(&mut sync_server::Config),
    ) {
        self.sync_stop.cancel();
        let listener = wait_for("the sync-server port to be free", DEADLINE, || async {
            TcpListener::bind(self.sync_addr).await.ok()
        })
        .await
        .expect("port free again");
        let (_, stop) = start_sync_server_with(self.etcd_endpoints(), listener, configure).await;
        self.sync_stop = stop;
    }

    /// A number from sync-server's `/metrics`.
    pub async fn sync_metric(&self, name: &str) -> Option<u64> {
        let (_, body) = http_get(self.sync_addr, "/metrics").await.ok()?;
        prometheus_value(&body, name)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.sync_stop.cancel();
    }
}

/// Waits until the sync-server at `sync` lists exactly `want` for the demo
/// service (fresh, not stale) and `envoy`'s plugin holds that revision.
pub async fn settle_on(sync: SocketAddr, envoy: &Envoy, want: &[SocketAddr]) {
    let mut want: Vec<String> = want.iter().map(ToString::to_string).collect();
    want.sort();
    let revision = wait_for("sync-server to list the backends", DEADLINE, || async {
        let snapshot = fetch_snapshot(sync).await?;
        let listed: Vec<String> = snapshot
            .services
            .get(DEMO_SERVICE)
            .map(|s| s.endpoints.iter().map(|e| e.addr.clone()).collect())
            .unwrap_or_default();
        (listed == want && !snapshot.stale).then_some(snapshot.revision)
    })
    .await
    .expect("sync-server lists the backends");
    envoy
        .wait_for_revision(revision, DEADLINE)
        .await
        .expect("the plugin takes the snapshot");
}

/// Runs sync-server in this runtime, watching the demo prefix.
pub async fn start_sync_server(etcd: &Etcd) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_sync_server_on(vec![etcd.endpoint()], listener).await
}

/// Runs sync-server on `listener`, watching the demo prefix.
pub async fn start_sync_server_on(
    etcd: Vec<String>,
    listener: TcpListener,
) -> (SocketAddr, CancellationToken) {
    start_sync_server_with(etcd, listener, |_| {}).await
}

/// The same, configured further by `configure`.
pub async fn start_sync_server_with(
    etcd: Vec<String>,
    listener: TcpListener,
    configure: impl FnOnce(&mut sync_server::Config),
) -> (SocketAddr, CancellationToken) {
    let addr = listener.local_addr().expect("local addr");
    let stop = CancellationToken::new();
    let mut config = sync_server::Config::new(
        EtcdOptions::new(etcd),
        vec![format!("etcd-naming={DEMO_PREFIX}").parse().expect("spec")],
    );
    configure(&mut config);
    tokio::spawn(sync_server::run(config, listener, stop.clone()));
    wait_ready(addr, DEADLINE)
        .await
        .expect("sync-server becomes ready");
    (addr, stop)
}

/// A live `demo.Echo` backend on a free port, registered or not.
pub struct Backend {
    pub addr: SocketAddr,
    stop: CancellationToken,
    /// What its gRPC health service answers for `demo.Echo`.
    serving: tokio::sync::watch::Sender<bool>,
    registration: Option<Registration>,
}

impl Backend {
    /// Serves, but is not registered anywhere.
    pub async fn unregistered() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let (serving, told) = tokio::sync::watch::channel(true);
        tokio::spawn(backend::serve_with_health(listener, stop.clone(), told));
        Backend {
            addr,
            stop,
            serving,
            registration: None,
        }
    }

    /// Serves and registers itself in etcd with `weight`.
    pub async fn registered(etcd: Vec<String>, weight: u32) -> Backend {
        let mut backend = Self::unregistered().await;
        backend.register(etcd, weight).await;
        backend
    }

    pub async fn register(&mut self, etcd: Vec<String>, weight: u32) {
        self.register_in(etcd, weight, None).await;
    }

    /// Registers with `weight`, in `zone` when given.
    pub async fn register_in(&mut self, etcd: Vec<String>, weight: u32, zone: Option<&str>) {
        let mut instance =
            Instance::new(DEMO_PREFIX, DEMO_SERVICE, &self.addr.to_string()).with_weight(weight);
        if let Some(zone) = zone {
            instance = instance.with_zone(zone);
        }
        let registration = Registration::start(etcd, instance).expect("valid instance");
        registration
            .registered(DEADLINE)
            .await
            .expect("registers in etcd");
        self.registration = Some(registration);
    }

    /// Stops serving, as a crashed process would, leaving the registration
    /// in etcd (its lease is still kept alive).
    pub fn stop_serving(&self) {
        self.stop.cancel();
    }

    /// Makes its health service answer `SERVING` or `NOT_SERVING`.
    pub fn set_serving(&self, serving: bool) {
        self.serving.send_replace(serving);
    }

    /// Deletes the registration (the server keeps serving).
    pub async fn deregister(&mut self) {
        if let Some(registration) = self.registration.take() {
            registration.deregister().await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Mesh {
    /// Registers one backend per weight and waits until Envoy has them.
    pub async fn weighted_backends(&self, weights: &[u32]) -> Vec<Backend> {
        let mut backends = Vec::new();
        for weight in weights {
            backends.push(Backend::registered(self.etcd_endpoints(), *weight).await);
        }
        let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
        self.settle(&addrs).await;
        backends
    }
}

/// Asserts that each backend's share of `counts` is within `tolerance`
/// percentage points of its weight's share.
pub fn assert_split(
    counts: &std::collections::BTreeMap<String, usize>,
    backends: &[Backend],
    weights: &[u32],
    tolerance: f64,
) {
    let total: usize = counts.values().sum();
    let total_weight: u32 = weights.iter().sum();
    for (backend, weight) in backends.iter().zip(weights) {
        let served = counts.get(&backend.addr.to_string()).copied().unwrap_or(0);
        let share = 100.0 * served as f64 / total.max(1) as f64;
        let ideal = 100.0 * f64::from(*weight) / f64::from(total_weight);
        assert!(
            (share - ideal).abs() <= tolerance,
            "{} took {share:.2}%, ideal {ideal:.2}% (±{tolerance}): {counts:?}",
            backend.addr
        );
    }
}
