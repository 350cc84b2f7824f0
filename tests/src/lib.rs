//! The end-to-end harness: one [`Mesh`] per test, on free loopback ports
//! and its own temporary directory, torn down when dropped (even when the
//! test fails). etcd and Envoy are real processes; sync-server and the
//! backends run in the test's runtime through their own libraries, so a
//! test can stop and restart them.

#![forbid(unsafe_code)]

use etcd_mesh_demo::{backend, client, DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_registration::{Instance, Registration};
use etcd_mesh_testkit::{
    fetch_snapshot, http_get, prometheus_value, wait_for, wait_ready, Envoy, EnvoyOptions, Etcd,
};
use etcd_mesh_wire::Snapshot;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
        self.sync_stop.cancel();
        let listener = wait_for("the sync-server port to be free", DEADLINE, || async {
            TcpListener::bind(self.sync_addr).await.ok()
        })
        .await
        .expect("port free again");
        let (_, stop) = start_sync_server_on(self.etcd_endpoints(), listener).await;
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

/// A `demo-backend` process (built by `make test`), registered in etcd by
/// itself: what a real instance is, so that a test can SIGKILL it.
pub struct BackendProcess {
    pub addr: SocketAddr,
    proc: etcd_mesh_demo::stack::Proc,
    _dir: TempDir,
}

impl BackendProcess {
    /// Starts one on a free port with `weight` and a lease of `ttl_s`
    /// seconds; the caller waits for it to be listed.
    pub fn start(etcd: &[String], weight: u32, ttl_s: u64) -> BackendProcess {
        let binary = etcd_mesh_demo::stack::workspace_root().join("target/debug/demo-backend");
        assert!(
            binary.exists(),
            "no {}: `make test` builds it (cargo build -p etcd-mesh-demo --bin demo-backend)",
            binary.display()
        );
        let port = etcd_mesh_demo::stack::free_port().expect("a free port");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = tempfile::tempdir().expect("temporary dir");
        let mut command = std::process::Command::new(binary);
        command
            .args(["--etcd", &etcd.join(","), "--listen", &addr.to_string()])
            .args(["--weight", &weight.to_string(), "--ttl", &ttl_s.to_string()]);
        let proc = etcd_mesh_demo::stack::Proc::spawn(
            "demo-backend",
            command,
            dir.path().join("backend.log"),
        )
        .expect("demo-backend starts");
        BackendProcess {
            addr,
            proc,
            _dir: dir,
        }
    }

    /// SIGKILL: no deregistration, the lease lives until its TTL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// The longest one call of a load run may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What a load run did: calls sent, and the failures (index, status).
pub type LoadReport = (usize, Vec<(usize, tonic::Code)>);

/// Sends up to `calls` calls one after another over `clients` until
/// `stop`, counting them in `sent`.
pub async fn load(
    clients: &[client::Client],
    calls: usize,
    stop: &CancellationToken,
    sent: &AtomicUsize,
) -> LoadReport {
    let mut failures = Vec::new();
    for i in 0..calls {
        if stop.is_cancelled() {
            break;
        }
        let mut client = clients[i % clients.len()].clone();
        let request = etcd_mesh_demo::proto::SayRequest::default();
        // A call that hangs is a failure too, and must not stall the load.
        let call = tokio::time::timeout(CALL_TIMEOUT, client::say(&mut client, request));
        match call.await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => failures.push((i, status.code())),
            Err(_) => failures.push((i, tonic::Code::DeadlineExceeded)),
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    (sent.load(Ordering::Relaxed), failures)
}

/// A [`load`] running in the background.
pub struct BackgroundLoad {
    stop: CancellationToken,
    sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<LoadReport>,
}

impl BackgroundLoad {
    pub fn start(clients: Vec<client::Client>, calls: usize) -> BackgroundLoad {
        let stop = CancellationToken::new();
        let sent = Arc::new(AtomicUsize::new(0));
        let task = {
            let (stop, sent) = (stop.clone(), Arc::clone(&sent));
            tokio::spawn(async move { load(&clients, calls, &stop, &sent).await })
        };
        BackgroundLoad { stop, sent, task }
    }

    /// Waits until `n` more calls have been sent, so that the load really
    /// spans the step that follows, however slow the machine is.
    pub async fn progress(&self, n: usize) {
        let target = self.sent.load(Ordering::Relaxed) + n;
        wait_for("the load to progress", DEADLINE, || async {
            (self.sent.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await
        .expect("the load makes progress");
    }

    /// Stops the load and asserts that no call failed.
    pub async fn assert_no_failed_call(self) {
        self.stop.cancel();
        let (sent, failures) = self.task.await.expect("load task");
        assert!(
            failures.is_empty(),
            "{} of {sent} calls failed: {failures:?}",
            failures.len()
        );
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

/// A `sync-server` process (built by `make test`): a replica a test can
/// SIGKILL, freeze with SIGSTOP, or cut off from its etcd member.
pub struct SyncServerProcess {
    pub addr: SocketAddr,
    proc: etcd_mesh_demo::stack::Proc,
    _dir: TempDir,
}

impl SyncServerProcess {
    /// Starts one on a free port over `etcd`, watching the demo prefix,
    /// with `extra` arguments, and waits until it is ready.
    pub async fn start(etcd: &[String], extra: &[&str]) -> SyncServerProcess {
        let binary = etcd_mesh_demo::stack::workspace_root().join("target/debug/sync-server");
        assert!(
            binary.exists(),
            "no {}: `make test` builds it (cargo build -p sync-server --bin sync-server)",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("temporary dir");
        for _ in 0..3 {
            let port = etcd_mesh_demo::stack::free_port().expect("a free port");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut command = std::process::Command::new(&binary);
            command
                .args(["--etcd", &etcd.join(","), "--listen", &addr.to_string()])
                .args(["--watch", &format!("etcd-naming={DEMO_PREFIX}")])
                .args(extra)
                .env("RUST_LOG", "info");
            let mut proc = etcd_mesh_demo::stack::Proc::spawn(
                "sync-server",
                command,
                dir.path().join(format!("sync-server-{port}.log")),
            )
            .expect("sync-server starts");
            let deadline = std::time::Instant::now() + DEADLINE;
            let ready = loop {
                if proc.exited() {
                    break Ok(false);
                }
                if matches!(http_get(addr, "/readyz").await, Ok((200, _))) {
                    break Ok(true);
                }
                if std::time::Instant::now() >= deadline {
                    break Err(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            match ready {
                Ok(true) => {
                    return SyncServerProcess {
                        addr,
                        proc,
                        _dir: dir,
                    }
                }
                // Its port was taken between the pick and the bind: again.
                Ok(false) if proc.log_tail(5).contains("in use") => continue,
                _ => panic!("sync-server did not start:\n{}", proc.log_tail(20)),
            }
        }
        panic!("no free port for sync-server after 3 tries");
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGKILL: its connections are reset at once.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// A number from its `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<u64> {
        let (_, body) = http_get(self.addr, "/metrics").await.ok()?;
        prometheus_value(&body, name)
    }

    /// Its `/v1/status`.
    pub async fn status(&self) -> Option<etcd_mesh_wire::Status> {
        let (status, body) = http_get(self.addr, "/v1/status").await.ok()?;
        (status == 200)
            .then(|| etcd_mesh_wire::Status::decode(body.as_bytes()).ok())
            .flatten()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

/// SIGSTOP until dropped (then SIGCONT): a process that hangs rather than
/// dies, with its sockets open.
pub struct Frozen(u32);

impl Frozen {
    pub fn freeze(pid: u32) -> Frozen {
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// A `demo-backend` process (built by `make test`) inside a network-namespace
/// host, listening on the host's own address and registered in etcd with
/// it: a backend whose packets a test can drop ([`stack::Net::cut`]).
///
/// [`stack::Net::cut`]: etcd_mesh_demo::stack::Net::cut
pub struct NetBackend {
    pub addr: SocketAddr,
    proc: etcd_mesh_demo::stack::Proc,
}

impl NetBackend {
    /// Starts one on `host`, port `port`, registering in `etcd` (addresses
    /// the host reaches) with `weight` and a lease of `ttl_s` seconds; its
    /// log goes to `dir`. The caller waits for it to be listed.
    pub fn start(
        host: &etcd_mesh_demo::stack::Host,
        port: u16,
        etcd: &[String],
        weight: u32,
        ttl_s: u64,
        dir: &std::path::Path,
    ) -> NetBackend {
        let binary = etcd_mesh_demo::stack::workspace_root().join("target/debug/demo-backend");
        assert!(
            binary.exists(),
            "no {}: `make test` builds it (cargo build -p etcd-mesh-demo --bin demo-backend)",
            binary.display()
        );
        let addr = host.socket_addr(port);
        let (listen, members) = (addr.to_string(), etcd.join(","));
        let (weight, ttl) = (weight.to_string(), ttl_s.to_string());
        let args = [
            "--etcd", &members, "--listen", &listen, "--weight", &weight, "--ttl", &ttl,
        ];
        let log = dir.join(format!("demo-backend-{}.log", host.name()));
        let proc = host
            .spawn(binary.to_str().expect("a UTF-8 path"), &args, log)
            .expect("demo-backend starts");
        NetBackend { addr, proc }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

/// Envoy from `envoy/etcd-mesh.yaml` with the router configured by
/// `router` and the rendered configuration changed by `edit` (to compare
/// the template with a variant of it), polling `sync`.
pub async fn start_envoy_edited(
    dir: &std::path::Path,
    sync: SocketAddr,
    router: &str,
    concurrency: u32,
    edit: impl Fn(String) -> String,
) -> Envoy {
    use etcd_mesh_testkit::{envoy_template_path, free_port, render_envoy_config, wasm_path};
    let template = std::fs::read_to_string(envoy_template_path()).expect("the Envoy template");
    let mut last = String::new();
    // A picked port may be taken before Envoy binds it: then fresh ones.
    for _ in 0..3 {
        let pick = || SocketAddr::from(([127, 0, 0, 1], free_port().expect("a free port")));
        let (listen, admin) = (pick(), pick());
        let rendered = render_envoy_config(&template, listen, admin, &[sync], &wasm_path())
            .replace(r#"'{"role": "router"}'"#, &format!("'{router}'"));
        let rendered = edit(rendered);
        match Envoy::start_rendered(dir, &rendered, listen, admin, concurrency).await {
            Ok(envoy) => return envoy,
            Err(e) if e.contains("Address already in use") => last = e,
            Err(e) => panic!("Envoy did not start: {e}"),
        }
    }
    panic!("Envoy did not start: {last}");
}

/// One call of a [`TimedLoad`]: when it started (from the load's start),
/// how long it took (retries included), who served it or how it failed,
/// and how many times it was retried.
#[derive(Debug, Clone)]
pub struct TimedCall {
    pub client: usize,
    pub started: Duration,
    pub took: Duration,
    pub outcome: Result<String, tonic::Code>,
    pub retries: u32,
}

/// One loop of calls per client, each call with a deadline (a call past it
/// is cancelled, as a gRPC client's deadline does, and counted as
/// `DeadlineExceeded`), every call timed; at most `max_calls` per loop.
/// With retries, an `UNAVAILABLE` is sent again at once, within the same
/// deadline, as a gRPC retry policy on `UNAVAILABLE` does (without its
/// backoff): a new call through Envoy, and a new pick.
pub struct TimedLoad {
    started: std::time::Instant,
    stop: CancellationToken,
    sent: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<TimedCall>>>,
}

impl TimedLoad {
    pub fn start(clients: Vec<client::Client>, deadline: Duration, max_calls: usize) -> TimedLoad {
        Self::start_retrying(clients, deadline, max_calls, 0)
    }

    /// The same, each `UNAVAILABLE` retried up to `retries` times.
    pub fn start_retrying(
        clients: Vec<client::Client>,
        deadline: Duration,
        max_calls: usize,
        retries: u32,
    ) -> TimedLoad {
        let started = std::time::Instant::now();
        let stop = CancellationToken::new();
        let sent = Arc::new(AtomicUsize::new(0));
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut client)| {
                let (stop, sent) = (stop.clone(), Arc::clone(&sent));
                tokio::spawn(async move {
                    let mut calls = Vec::new();
                    for _ in 0..max_calls {
                        if stop.is_cancelled() {
                            break;
                        }
                        let at = std::time::Instant::now();
                        let mut tries = 0;
                        let call = tokio::time::timeout(deadline, async {
                            loop {
                                let request = etcd_mesh_demo::proto::SayRequest::default();
                                match client::say(&mut client, request).await {
                                    Err(status)
                                        if status.code() == tonic::Code::Unavailable
                                            && tries < retries =>
                                    {
                                        tries += 1;
                                    }
                                    done => break done,
                                }
                            }
                        });
                        let outcome = match call.await {
                            Ok(Ok(by)) => Ok(by),
                            Ok(Err(status)) => Err(status.code()),
                            Err(_) => Err(tonic::Code::DeadlineExceeded),
                        };
                        calls.push(TimedCall {
                            client: i,
                            started: at.duration_since(started),
                            took: at.elapsed(),
                            outcome,
                            retries: tries,
                        });
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    calls
                })
            })
            .collect();
        TimedLoad {
            started,
            stop,
            sent,
            tasks,
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Calls finished so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the loops (a call under way finishes or meets its deadline)
    /// and returns every call, in the order they started.
    pub async fn finish(mut self) -> Vec<TimedCall> {
        self.stop.cancel();
        let mut calls = Vec::new();
        for task in std::mem::take(&mut self.tasks) {
            calls.extend(task.await.expect("load loop"));
        }
        calls.sort_by_key(|c| c.started);
        calls
    }
}

impl Drop for TimedLoad {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The `p`-th percentile (0..=100, nearest rank) of `values`; zero when empty.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
