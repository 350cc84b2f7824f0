//! No call fails while an Envoy starts, hot-restarts or reloads. Real etcd,
//! sync-server, two registered backends and Envoy with the plugin
//! (`envoy/etcd-mesh.yaml`), and two kinds of clients calling all along:
//! loops on long-lived connections, and loops that open a new connection
//! for every call (where a new process's first calls land).
//!
//! - Hot restart (Envoy's own: the same `--base-id`, `--restart-epoch 1`,
//!   the same configuration): the new process takes the listening sockets
//!   before its poller has fetched the tables (shared data starts empty in
//!   every process); its router holds those calls until the tables come,
//!   then routes them. The same with a changed router configuration.
//! - Cold start: clients connect as soon as the listener accepts.
//! - Tables late (sync-server starts after Envoy took calls): the calls
//!   held are routed when the tables come; held past
//!   `hold_until_tables_ms`, a call is answered `UNAVAILABLE` saying the
//!   tables never came, and a client that gives up is forgotten.
//! - Configuration reload through LDS (the listener's file changed, the
//!   filter's configuration with it, the old filter chain drained): the
//!   worker VMs stay, new root contexts take over; the poller (a bootstrap
//!   extension) is untouched.
//!
//! Calls name the Envoy epoch that routed them (a response header set from
//! `%ENVIRONMENT(ETCD_MESH_EPOCH)%`), so the time to the first call routed
//! by the new process is measured at the client. The `measure_*` tests
//! (ignored) run the same scenarios with holding off
//! (`"hold_until_tables_ms": 0`): what was lost before.

use etcd_mesh_demo::client::{self, Client};
use etcd_mesh_demo::proto::SayRequest;
use etcd_mesh_demo::DEMO_SERVICE;
use etcd_mesh_e2e::{settle_on, start_sync_server_on, Backend, DEADLINE};
use etcd_mesh_testkit::{
    envoy_template_path, fetch_snapshot, free_port, remove_hot_restart_memory, render_envoy_config,
    unique_base_id, wait_for, wasm_path, Envoy, EnvoyOptions, Etcd, HotRestart,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// The most any scenario may take.
const TEST_BOUND: Duration = Duration::from_secs(60);
/// The clients' deadline: above the default hold (5 s).
const CALL_DEADLINE: Duration = Duration::from_secs(8);
/// Client loops of each kind.
const LOOPS: usize = 2;
/// Calls of each kind that must succeed in a phase before the next step.
const PHASE_CALLS: usize = 100;
/// The response header that names the Envoy epoch that routed a call.
const EPOCH_HEADER: &str = "x-etcd-mesh-epoch";
/// The router as the template configures it (holding for 5 s).
const ROUTER: &str = r#"{"role": "router"}"#;
/// Holding off: a call that comes before the tables fails at once.
const ROUTER_HOLD_OFF: &str = r#"{"role": "router", "hold_until_tables_ms": 0}"#;

/// Runs a scenario within [`TEST_BOUND`]; what it started is dropped
/// (killed) when it ends or times out.
async fn bounded<T>(scenario: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_BOUND, scenario)
        .await
        .expect("the scenario ends within its bound")
}

/// etcd, sync-server and two registered backends.
struct Fixture {
    dir: TempDir,
    etcd: Etcd,
    sync: SocketAddr,
    sync_stop: CancellationToken,
    backends: Vec<Backend>,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().expect("temporary dir");
        let etcd = Etcd::start(dir.path()).await.expect("etcd starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (sync, sync_stop) = start_sync_server_on(vec![etcd.endpoint()], listener).await;
        let mut fixture = Fixture {
            dir,
            etcd,
            sync,
            sync_stop,
            backends: Vec::new(),
        };
        fixture.register_backends(2).await;
        fixture.listed().await;
        fixture
    }

    async fn register_backends(&mut self, n: usize) {
        for _ in 0..n {
            self.backends
                .push(Backend::registered(vec![self.etcd.endpoint()], 1).await);
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.backends.iter().map(|b| b.addr).collect()
    }

    /// Waits until sync-server lists every backend; returns its revision.
    async fn listed(&self) -> u64 {
        listed(self.sync, &self.addrs()).await
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.sync_stop.cancel();
    }
}

/// Waits until the sync-server at `sync` lists exactly `addrs` for the demo
/// service; returns its revision.
async fn listed(sync: SocketAddr, addrs: &[SocketAddr]) -> u64 {
    let mut want: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    want.sort();
    wait_for("sync-server to list the backends", DEADLINE, || async {
        let snapshot = fetch_snapshot(sync).await?;
        let mut listed: Vec<String> = snapshot
            .services
            .get(DEMO_SERVICE)
            .map(|s| s.endpoints.iter().map(|e| e.addr.clone()).collect())
            .unwrap_or_default();
        listed.sort();
        (listed == want && !snapshot.stale).then_some(snapshot.revision)
    })
    .await
    .expect("sync-server lists the backends")
}

/// `envoy/etcd-mesh.yaml` rendered for one replica at `sync`, the router
/// configured by `router`, and every routed call's response naming the
/// epoch of the Envoy that routed it.
fn render(listen: SocketAddr, admin: SocketAddr, sync: SocketAddr, router: &str) -> String {
    const ROUTE: &str = "route: { cluster: etcd_mesh_upstream, timeout: 0s }";
    let template = std::fs::read_to_string(envoy_template_path()).expect("the Envoy template");
    let rendered = render_envoy_config(&template, listen, admin, &[sync], &wasm_path())
        .replace(r#"'{"role": "router"}'"#, &format!("'{router}'"))
        .replace(
            ROUTE,
            &format!(
                "{ROUTE}\n                response_headers_to_add: \
                 [{{header: {{key: {EPOCH_HEADER}, value: \"%ENVIRONMENT(ETCD_MESH_EPOCH)%\"}}}}]"
            ),
        );
    assert!(rendered.contains(EPOCH_HEADER), "the route is where it was");
    assert!(rendered.contains(router), "the router is where it was");
    rendered
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether a call went over a long-lived connection or a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Conn {
    Kept,
    Fresh,
}

/// One call: when it started and ended, and the epoch that routed it (the
/// header, when the configuration sets it) or how it failed.
#[derive(Debug, Clone)]
struct Call {
    conn: Conn,
    started: Instant,
    ended: Instant,
    outcome: Result<Option<u32>, (Code, String)>,
    /// Times it was sent again because the client had not sent it.
    retries: u32,
}

impl Call {
    fn took(&self) -> Duration {
        self.ended.duration_since(self.started)
    }
}

/// Successful calls so far, by kind and epoch.
type Served = Arc<Mutex<BTreeMap<(Conn, Option<u32>), usize>>>;

/// Client loops calling `demo.Echo/Say` through Envoy until stopped.
struct Load {
    stop: CancellationToken,
    served: Served,
    tasks: Vec<tokio::task::JoinHandle<Vec<Call>>>,
}

impl Load {
    /// `LOOPS` loops on long-lived connections and `LOOPS` that connect for
    /// every call, to `target`. A loop waits for the listener to accept its
    /// first connection (before that nothing is a call); after that, a
    /// connection refused or not made is a failed call.
    fn start(target: SocketAddr) -> Load {
        let stop = CancellationToken::new();
        let served = Served::default();
        let mut tasks = Vec::new();
        for conn in [Conn::Kept, Conn::Fresh] {
            for _ in 0..LOOPS {
                let (stop, served) = (stop.clone(), Arc::clone(&served));
                tasks.push(tokio::spawn(run_loop(conn, target, stop, served)));
            }
        }
        Load {
            stop,
            served,
            tasks,
        }
    }

    fn served(&self, conn: Conn, epoch: Option<u32>) -> usize {
        let served = self.served.lock().expect("not poisoned");
        served.get(&(conn, epoch)).copied().unwrap_or(0)
    }

    /// Waits until `n` more calls of each kind have been routed by `epoch`.
    async fn progress(&self, epoch: Option<u32>, n: usize) {
        let from = [Conn::Kept, Conn::Fresh].map(|conn| self.served(conn, epoch));
        wait_for(
            &format!("{n} more calls of each kind routed by epoch {epoch:?}"),
            DEADLINE,
            || async {
                [Conn::Kept, Conn::Fresh]
                    .iter()
                    .zip(from)
                    .all(|(conn, from)| self.served(*conn, epoch) >= from + n)
                    .then_some(())
            },
        )
        .await
        .expect("the load makes progress");
    }

    /// Stops the loops and returns every call, in the order they started.
    async fn finish(mut self) -> Vec<Call> {
        self.stop.cancel();
        let mut calls = Vec::new();
        for task in std::mem::take(&mut self.tasks) {
            calls.extend(task.await.expect("load loop"));
        }
        calls.sort_by_key(|c| c.started);
        calls
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn connect(target: SocketAddr) -> Result<Client, String> {
    match tokio::time::timeout(CALL_DEADLINE, client::connect(target)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: no connection within the deadline".into()),
    }
}

/// How many times a call the client never sent is sent again.
const TRANSPARENT_RETRIES: u32 = 3;

/// Whether the client cancelled the request before it was sent: hyper's
/// "operation was canceled" is a request still queued on a connection that
/// closed (one that had been sent a GOAWAY and had no stream left). Envoy
/// never saw it; gRPC clients send such a call again (gRPC's transparent
/// retry), tonic does not, so the loops do.
fn never_sent(status: &tonic::Status) -> bool {
    status.code() == Code::Cancelled && status.message() == "operation was canceled"
}

/// One call with the deadline: the epoch header of the answer, or the
/// error; and how many times it was sent again because the client had not
/// sent it.
async fn call(client: &mut Client) -> (Result<Option<u32>, (Code, String)>, u32) {
    let mut retries = 0;
    let answer = tokio::time::timeout(CALL_DEADLINE, async {
        loop {
            match client.say(SayRequest::default()).await {
                Err(status) if never_sent(&status) && retries < TRANSPARENT_RETRIES => {
                    retries += 1;
                }
                answer => break answer,
            }
        }
    });
    let outcome = match answer.await {
        Ok(Ok(response)) => Ok(response
            .metadata()
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())),
        Ok(Err(status)) => Err((status.code(), status.message().to_owned())),
        Err(_) => Err((
            Code::DeadlineExceeded,
            "no answer within the deadline".into(),
        )),
    };
    (outcome, retries)
}

async fn run_loop(
    conn: Conn,
    target: SocketAddr,
    stop: CancellationToken,
    served: Served,
) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut kept: Option<Client> = None;
    let mut accepted = false;
    while !stop.is_cancelled() {
        let started = Instant::now();
        let mut client = match (&kept, conn) {
            (Some(client), Conn::Kept) => client.clone(),
            _ => match connect(target).await {
                Ok(client) => {
                    accepted = true;
                    if conn == Conn::Kept {
                        kept = Some(client.clone());
                    }
                    client
                }
                // The listener is not there yet: no call was made.
                Err(_) if !accepted => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                Err(e) => {
                    calls.push(Call {
                        conn,
                        started,
                        ended: Instant::now(),
                        outcome: Err((Code::Unavailable, e)),
                        retries: 0,
                    });
                    continue;
                }
            },
        };
        let (outcome, retries) = call(&mut client).await;
        if let Ok(epoch) = &outcome {
            *served
                .lock()
                .expect("not poisoned")
                .entry((conn, *epoch))
                .or_insert(0) += 1;
        }
        calls.push(Call {
            conn,
            started,
            ended: Instant::now(),
            outcome,
            retries,
        });
    }
    calls
}

/// What a run of calls shows, printed and checked.
#[derive(Debug)]
struct Summary {
    /// (calls, failed) by kind.
    counts: BTreeMap<Conn, (usize, usize)>,
    /// Successful calls by kind and epoch.
    by_epoch: BTreeMap<(Conn, Option<u32>), usize>,
    /// The first few failures: kind, code, message.
    failures: Vec<(Conn, Code, String)>,
    /// The longest call (a held call waited that long at most).
    longest: Duration,
    /// From `since` to the end of the first call routed by `epoch`.
    first_routed: Option<Duration>,
    /// Calls sent again because the client had not sent them.
    retried: usize,
}

impl Summary {
    /// `calls` summed up; the first call routed by `epoch` (any call, when
    /// `None`) is timed from `since`.
    fn of(calls: &[Call], since: Instant, epoch: Option<u32>) -> Summary {
        let mut counts = BTreeMap::new();
        let mut by_epoch = BTreeMap::new();
        let mut failures = Vec::new();
        for c in calls {
            let entry = counts.entry(c.conn).or_insert((0, 0));
            entry.0 += 1;
            match &c.outcome {
                Ok(e) => *by_epoch.entry((c.conn, *e)).or_insert(0) += 1,
                Err((code, message)) => {
                    entry.1 += 1;
                    if failures.len() < 10 {
                        failures.push((c.conn, *code, message.clone()));
                    }
                }
            }
        }
        let first_routed = calls
            .iter()
            .filter(|c| c.ended >= since)
            .filter(|c| match (&c.outcome, epoch) {
                (Ok(_), None) => true,
                (Ok(e), Some(want)) => *e == Some(want),
                (Err(_), _) => false,
            })
            .map(|c| c.ended.duration_since(since))
            .min();
        Summary {
            counts,
            by_epoch,
            failures,
            longest: calls.iter().map(Call::took).max().unwrap_or_default(),
            first_routed,
            retried: calls.iter().filter(|c| c.retries > 0).count(),
        }
    }

    fn failed(&self, conn: Conn) -> usize {
        self.counts.get(&conn).map_or(0, |c| c.1)
    }

    fn print(&self, name: &str) {
        for (conn, (calls, failed)) in &self.counts {
            println!("{name}: {conn:?} connections: {calls} calls, {failed} failed");
        }
        println!("{name}: routed by epoch: {:?}", self.by_epoch);
        println!(
            "{name}: {} calls sent again because the client had not sent them (a GOAWAY race)",
            self.retried
        );
        println!(
            "{name}: longest call {:?}, first routed call {:?} after the start",
            self.longest, self.first_routed
        );
        for (conn, code, message) in &self.failures {
            println!("{name}: failed ({conn:?}): {code:?} {message}");
        }
    }

    fn assert_no_failed_call(&self) {
        for conn in [Conn::Kept, Conn::Fresh] {
            assert_eq!(
                self.failed(conn),
                0,
                "{conn:?} connections lost calls: {:?}",
                self.failures
            );
        }
    }
}

/// The plugin's hold stats of one Envoy.
#[derive(Debug, Default, Clone, Copy)]
struct HoldStats {
    held: u64,
    timed_out: u64,
    no_tables: u64,
    max_wait_ms: u64,
    routed: u64,
}

impl HoldStats {
    async fn of(envoy: &Envoy) -> HoldStats {
        let stat = |name: &'static str| async move {
            envoy
                .stat(&format!("wasmcustom.etcd_mesh.{name}"))
                .await
                .unwrap_or(0)
        };
        HoldStats {
            held: stat("calls_held").await,
            timed_out: stat("calls_held_timed_out").await,
            no_tables: stat("calls_no_tables").await,
            max_wait_ms: stat("calls_held_max_wait_ms").await,
            routed: stat("calls_routed").await,
        }
    }

    /// Once the workers have flushed their counters (every 500 ms): at
    /// least `routed` calls counted.
    async fn flushed(envoy: &Envoy, routed: u64) -> HoldStats {
        wait_for("the plugin's counters to be flushed", DEADLINE, || async {
            let stats = HoldStats::of(envoy).await;
            (stats.routed >= routed).then_some(stats)
        })
        .await
        .expect("counters flushed")
    }
}

/// The shared memory of a hot-restart chain, removed (after the Envoys,
/// declared after it, are dropped and so killed).
struct ChainMemory(u32);

impl Drop for ChainMemory {
    fn drop(&mut self) {
        remove_hot_restart_memory(self.0);
    }
}

/// Starts epoch `hot.epoch` of a hot-restart chain on `listen` and `admin`;
/// epoch 0 picks fresh ports again if one was taken meanwhile.
async fn start_epoch(
    dir: &Path,
    sync: SocketAddr,
    router: &str,
    hot: &HotRestart,
    ports: Option<(SocketAddr, SocketAddr)>,
) -> Envoy {
    let mut hot = hot.clone();
    hot.env = vec![("ETCD_MESH_EPOCH".into(), hot.epoch.to_string())];
    let mut last = String::new();
    for _ in 0..3 {
        let (listen, admin) = ports.unwrap_or_else(|| {
            let pick = || loopback(free_port().expect("a free port"));
            (pick(), pick())
        });
        let rendered = render(listen, admin, sync, router);
        match Envoy::start_hot_restart_epoch(dir, &rendered, listen, admin, 2, &hot, &[]).await {
            Ok(envoy) => return envoy,
            Err(e) if ports.is_none() && e.contains("Address already in use") => last = e,
            Err(e) => panic!("Envoy epoch {} did not start: {e}", hot.epoch),
        }
    }
    panic!("Envoy epoch 0 did not start: {last}");
}

/// What a hot restart under load showed.
struct Restarted {
    summary: Summary,
    /// The new process's hold stats.
    stats: HoldStats,
    /// From starting the new process to its being live.
    live_after: Duration,
}

/// Envoy epoch 0 with `router`, load of both kinds, then epoch 1 with
/// `new_router` (the same configuration when equal) while the load goes
/// on; once epoch 0 has exited and epoch 1 has routed `PHASE_CALLS` more
/// calls of each kind, the load stops.
async fn hot_restart_under_load(name: &str, router: &str, new_router: &str) -> Restarted {
    let fixture = Fixture::start().await;
    let dir = fixture.dir.path();
    let chain = HotRestart::new(unique_base_id());
    let _memory = ChainMemory(chain.base_id);
    let mut parent = start_epoch(dir, fixture.sync, router, &chain, None).await;
    settle_on(fixture.sync, &parent, &fixture.addrs()).await;
    let load = Load::start(parent.listen);
    load.progress(Some(0), PHASE_CALLS).await;

    let restart = Instant::now();
    let ports = Some((parent.listen, parent.admin));
    let child = start_epoch(dir, fixture.sync, new_router, &chain.next(), ports).await;
    let live_after = restart.elapsed();
    let bound = Duration::from_secs(u64::from(chain.parent_shutdown_time_s) + 10);
    let deadline = Instant::now() + bound;
    while !parent.exited() {
        assert!(
            Instant::now() < deadline,
            "epoch 0 still runs {bound:?} after epoch 1 started\n{}",
            parent.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exited_after = restart.elapsed();
    load.progress(Some(1), PHASE_CALLS).await;
    let calls = load.finish().await;
    // When the long-lived connections left the old process.
    let kept = |epoch: u32| {
        calls
            .iter()
            .filter(move |c| c.conn == Conn::Kept && c.outcome == Ok(Some(epoch)))
            .map(|c| c.ended.duration_since(restart))
    };
    let (last_old, first_new) = (kept(0).max(), kept(1).min());
    let summary = Summary::of(&calls, restart, Some(1));
    let routed = summary
        .by_epoch
        .iter()
        .filter(|((_, epoch), _)| *epoch == Some(1))
        .map(|(_, n)| *n as u64)
        .sum();
    let stats = HoldStats::flushed(&child, routed).await;
    summary.print(name);
    println!(
        "{name}: epoch 1 live {live_after:?} after it was started, epoch 0 gone by {exited_after:?}; \
         long-lived connections: last call routed by epoch 0 at {last_old:?}, first by epoch 1 at \
         {first_new:?}; epoch 1's hold stats: {stats:?}"
    );
    Restarted {
        summary,
        stats,
        live_after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_restart_under_load_fails_no_call() {
    let run = bounded(hot_restart_under_load("hot restart", ROUTER, ROUTER)).await;
    run.summary.assert_no_failed_call();
    for conn in [Conn::Kept, Conn::Fresh] {
        assert!(run.summary.by_epoch.get(&(conn, Some(1))) >= Some(&PHASE_CALLS));
    }
    assert!(run.summary.first_routed.is_some());
    assert_eq!(run.stats.timed_out, 0, "{:?}", run.stats);
    assert_eq!(run.stats.no_tables, 0, "{:?}", run.stats);
    assert!(
        run.stats.max_wait_ms < 5_000,
        "held within the limit: {:?}",
        run.stats
    );
    assert!(run.live_after < DEADLINE);
}

/// A reload by hot restart: the new process has another router
/// configuration (holding 4 s, refreshing every 50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_restart_with_a_changed_configuration_fails_no_call() {
    let changed = r#"{"role": "router", "hold_until_tables_ms": 4000, "refresh_ms": 50}"#;
    let run = bounded(hot_restart_under_load(
        "changed by hot restart",
        ROUTER,
        changed,
    ))
    .await;
    run.summary.assert_no_failed_call();
    for conn in [Conn::Kept, Conn::Fresh] {
        assert!(run.summary.by_epoch.get(&(conn, Some(1))) >= Some(&PHASE_CALLS));
    }
    assert_eq!(run.stats.no_tables, 0, "{:?}", run.stats);
}

/// The same hot restart with holding off: what was lost before. Every
/// call lost is one the new process took before its tables came.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: `-- --ignored --nocapture measure_`"]
async fn measure_hot_restart_with_holding_off() {
    let run = bounded(hot_restart_under_load(
        "hot restart, holding off",
        ROUTER_HOLD_OFF,
        ROUTER_HOLD_OFF,
    ))
    .await;
    for (_, code, message) in &run.summary.failures {
        assert_eq!(*code, Code::Unavailable);
        assert!(message.contains("no endpoint tables yet"), "{message}");
    }
    assert_eq!(run.stats.held, 0);
}

/// A cold Envoy whose clients connect as soon as its listener accepts.
async fn cold_start(name: &str, router: &str) -> (Summary, HoldStats) {
    let fixture = Fixture::start().await;
    let revision = fixture.listed().await;
    let (listen, admin) = (free_port().expect("port"), free_port().expect("port"));
    // The clients try before Envoy is there.
    let load = Load::start(loopback(listen));
    let started = Instant::now();
    let envoy = Envoy::start(
        fixture.dir.path(),
        EnvoyOptions {
            listen_port: listen,
            admin_port: admin,
            sync_servers: vec![fixture.sync],
            router_config: Some(router.to_owned()),
            ..EnvoyOptions::default()
        },
    )
    .await
    .expect("Envoy starts");
    println!(
        "{name}: Envoy ready {:?} after it was started",
        started.elapsed()
    );
    envoy
        .wait_for_revision(revision, DEADLINE)
        .await
        .expect("the plugin takes the tables");
    load.progress(None, PHASE_CALLS).await;
    let calls = load.finish().await;
    let summary = Summary::of(&calls, started, None);
    let routed = summary.by_epoch.values().sum::<usize>() as u64;
    let stats = HoldStats::flushed(&envoy, routed).await;
    summary.print(name);
    println!("{name}: hold stats: {stats:?}");
    (summary, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_envoy_called_from_its_first_second_fails_no_call() {
    let (summary, stats) = bounded(cold_start("cold start", ROUTER)).await;
    summary.assert_no_failed_call();
    assert_eq!(stats.no_tables, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement: `-- --ignored --nocapture measure_`"]
async fn measure_cold_start_with_holding_off() {
    let (summary, stats) = bounded(cold_start("cold start, holding off", ROUTER_HOLD_OFF)).await;
    for (_, code, message) in &summary.failures {
        assert_eq!(*code, Code::Unavailable);
        assert!(message.contains("no endpoint tables yet"), "{message}");
    }
    assert_eq!(stats.held, 0);
}

/// Envoy polling a sync-server address that accepts connections but
/// answers nothing until `serve` is called: no tables until then.
struct LateTables {
    listener: Option<TcpListener>,
    addr: SocketAddr,
}

impl LateTables {
    async fn bind() -> LateTables {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        LateTables {
            addr: listener.local_addr().expect("local addr"),
            listener: Some(listener),
        }
    }

    /// sync-server starts on the address bound (the poll waiting there is
    /// answered).
    async fn serve(&mut self, etcd: &Etcd) -> CancellationToken {
        let listener = self.listener.take().expect("served once");
        start_sync_server_on(vec![etcd.endpoint()], listener)
            .await
            .1
    }
}

/// Calls that come before the tables are held until they come, then
/// routed; the waits are the time the tables took.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_held_for_late_tables_are_routed_when_they_come() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary dir");
        let etcd = Etcd::start(dir.path()).await.expect("etcd starts");
        let backends = [
            Backend::registered(vec![etcd.endpoint()], 1).await,
            Backend::registered(vec![etcd.endpoint()], 1).await,
        ];
        let mut late = LateTables::bind().await;
        let envoy = Envoy::start(
            dir.path(),
            EnvoyOptions {
                sync_servers: vec![late.addr],
                ..EnvoyOptions::default()
            },
        )
        .await
        .expect("Envoy starts");
        let load = Load::start(envoy.listen);
        let held = wait_for("calls to be held", DEADLINE, || async {
            let stats = HoldStats::of(&envoy).await;
            // Every loop has one call held: none is answered.
            (stats.held >= (2 * LOOPS) as u64).then_some(stats)
        })
        .await
        .expect("calls are held while there are no tables");
        assert_eq!(held.routed, 0, "nothing routed without tables: {held:?}");
        let tables_asked = Instant::now();
        let _sync = late.serve(&etcd).await;
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        settle_on(late.addr, &envoy, &addrs).await;
        let tables_in = tables_asked.elapsed();
        load.progress(None, PHASE_CALLS).await;
        let calls = load.finish().await;
        let summary = Summary::of(&calls, tables_asked, None);
        let routed = summary.by_epoch.values().sum::<usize>() as u64;
        let stats = HoldStats::flushed(&envoy, routed).await;
        summary.print("late tables");
        println!("late tables: tables in {tables_in:?} after sync-server was started; hold stats: {stats:?}");
        summary.assert_no_failed_call();
        assert!(stats.held >= held.held, "{stats:?}");
        assert_eq!((stats.timed_out, stats.no_tables), (0, 0), "{stats:?}");
        // The first calls waited from before sync-server was started.
        assert!(stats.max_wait_ms > 0, "{stats:?}");
        assert!(
            summary.longest >= Duration::from_millis(stats.max_wait_ms),
            "{summary:?} {stats:?}"
        );
        assert!(stats.max_wait_ms < 5_000, "{stats:?}");
    })
    .await;
}

/// No tables within `hold_until_tables_ms`: the call is answered
/// `UNAVAILABLE` saying so, after the hold; with holding off, at once. A
/// client that gives up while its call is held is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_held_past_the_limit_are_answered_that_the_tables_never_came() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temporary dir");
        let late = LateTables::bind().await;
        let start = |router: &'static str, sub: &'static str| {
            let path = dir.path().join(sub);
            let sync = late.addr;
            async move {
                std::fs::create_dir_all(&path).expect("dir");
                Envoy::start(
                    &path,
                    EnvoyOptions {
                        sync_servers: vec![sync],
                        router_config: Some(router.to_owned()),
                        concurrency: 1,
                        ..EnvoyOptions::default()
                    },
                )
                .await
                .expect("Envoy starts")
            }
        };
        let held = start(
            r#"{"role": "router", "hold_until_tables_ms": 1000}"#,
            "held",
        )
        .await;
        let off = start(ROUTER_HOLD_OFF, "off").await;

        let mut client = client::connect(held.listen).await.expect("connect");
        // A client that gives up while held.
        let mut quitter = client.clone();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(200),
            quitter.say(SayRequest::default()),
        )
        .await;
        assert!(gave_up.is_err(), "held, not answered: {gave_up:?}");
        let mut waits = Vec::new();
        for _ in 0..3 {
            let at = Instant::now();
            let status = client
                .say(SayRequest::default())
                .await
                .expect_err("no tables");
            waits.push(at.elapsed());
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(
                status.message().contains("no endpoint tables yet")
                    && status.message().contains("ms"),
                "says why: {status:?}"
            );
            assert!(!status.message().contains("no endpoint for service"));
        }
        println!("held 1000 ms, then answered after {waits:?}");
        for wait in &waits {
            // Answered on the worker's tick (`refresh_ms`, 100 ms) after
            // the limit.
            assert!(
                (Duration::from_millis(1000)..Duration::from_millis(2500)).contains(wait),
                "{waits:?}"
            );
        }
        let stats = wait_for("the counters to be flushed", DEADLINE, || async {
            let stats = HoldStats::of(&held).await;
            (stats.timed_out >= 3).then_some(stats)
        })
        .await
        .expect("counted");
        println!("held: {stats:?}");
        assert_eq!(
            stats.timed_out, 3,
            "the call given up is not answered: {stats:?}"
        );
        assert_eq!(stats.held, 4, "{stats:?}");
        assert_eq!(stats.no_tables, 3, "{stats:?}");

        let mut client = client::connect(off.listen).await.expect("connect");
        let at = Instant::now();
        let status = client
            .say(SayRequest::default())
            .await
            .expect_err("no tables");
        let took = at.elapsed();
        println!("holding off: answered after {took:?}: {}", status.message());
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("no endpoint tables yet"),
            "{status:?}"
        );
        assert!(took < Duration::from_millis(500), "at once: {took:?}");
        let stats = wait_for("the counters to be flushed", DEADLINE, || async {
            let stats = HoldStats::of(&off).await;
            (stats.no_tables >= 1).then_some(stats)
        })
        .await
        .expect("counted");
        assert_eq!((stats.held, stats.timed_out), (0, 0), "{stats:?}");
    })
    .await;
}

/// The rendered configuration with its listener moved to a file that
/// Envoy watches (LDS): (bootstrap, listener resources for `router`).
fn lds_split(rendered: &str, lds: &Path) -> (String, impl Fn(&str) -> String) {
    let (head, rest) = rendered
        .split_once("  listeners:\n")
        .expect("the template's listeners");
    let (listeners, tail) = rest
        .split_once("\n  clusters:\n")
        .expect("the template's clusters");
    let dir = lds.parent().expect("a directory").display().to_string();
    // A file-based LDS needs the node named.
    let bootstrap = format!(
        "node: {{ id: etcd-mesh-test, cluster: etcd-mesh }}\n{head}  clusters:\n{tail}\ndynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    \
         path_config_source:\n      path: {}\n      watched_directory: {{ path: {dir} }}\n",
        lds.display()
    );
    let listener: String = listeners
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
        .collect();
    let listener = listener.replacen(
        "- name: etcd_mesh_grpc",
        "- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: etcd_mesh_grpc",
        1,
    );
    assert!(listener.contains(r#"'{"role": "router"}'"#));
    let resources = move |router: &str| {
        format!(
            "resources:\n{}",
            listener.replace(r#"'{"role": "router"}'"#, &format!("'{router}'"))
        )
    };
    (bootstrap, resources)
}

/// Writes the LDS file as Envoy wants it: a new file moved into place.
fn write_lds(lds: &Path, text: &str) {
    let tmp = lds.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the listeners");
    std::fs::rename(&tmp, lds).expect("move the listeners into place");
}

/// A number from the admin `/stats`, 0 when absent.
async fn admin_stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(name).await.unwrap_or(0)
}

/// Reloads of the filter's configuration through LDS under load: the
/// listener's filter chain is replaced and the old one drained each time.
/// No call fails, the notification queues of the old root contexts are
/// unlisted, and a change made after the reloads reaches every worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configuration_reloads_through_lds_fail_no_call() {
    bounded(async {
        let mut fixture = Fixture::start().await;
        let dir = fixture.dir.path().to_path_buf();
        let lds = dir.join("lds.yaml");
        let (listen, admin) = (
            loopback(free_port().expect("port")),
            loopback(free_port().expect("port")),
        );
        let rendered = render(listen, admin, fixture.sync, ROUTER);
        let (bootstrap, resources) = lds_split(&rendered, &lds);
        write_lds(&lds, &resources(ROUTER));
        let envoy = Envoy::start_rendered_with_args(
            &dir,
            &bootstrap,
            listen,
            admin,
            2,
            &["--drain-time-s".to_owned(), "3".to_owned()],
        )
        .await
        .expect("Envoy starts");
        settle_on(fixture.sync, &envoy, &fixture.addrs()).await;
        let load = Load::start(listen);
        load.progress(None, PHASE_CALLS).await;
        let queues = admin_stat(&envoy, "wasmcustom.etcd_mesh.worker_queues").await;
        let workers = envoy
            .stats_matching("^wasmcustom.etcd_mesh.worker_[0-9]*.table_revision$")
            .await
            .len();
        println!("reload: before: {queues} queues listed, {workers} worker gauges");

        const RELOADS: u64 = 3;
        let updates = admin_stat(&envoy, "listener_manager.lds.update_success").await;
        for i in 1..=RELOADS {
            let router = format!(r#"{{"role": "router", "hold_until_tables_ms": {}}}"#, 5000 - i);
            write_lds(&lds, &resources(&router));
            wait_for("Envoy to take the new listener", DEADLINE, || async {
                (admin_stat(&envoy, "listener_manager.lds.update_success").await > updates + i - 1)
                    .then_some(())
            })
            .await
            .expect("the listener is updated");
            wait_for("the old filter chain to drain", DEADLINE, || async {
                (admin_stat(&envoy, "listener_manager.total_filter_chains_draining").await == 0)
                    .then_some(())
            })
            .await
            .expect("the old filter chain drains");
            load.progress(None, PHASE_CALLS / 2).await;
        }
        let queues_after = admin_stat(&envoy, "wasmcustom.etcd_mesh.worker_queues").await;
        let workers_after = envoy
            .stats_matching("^wasmcustom.etcd_mesh.worker_[0-9]*.table_revision$")
            .await
            .len();
        println!(
            "reload: after {RELOADS} reloads: {queues_after} queues listed, {workers_after} worker gauges"
        );

        // A change after the reloads reaches every worker that routes.
        fixture.register_backends(1).await;
        let revision = fixture.listed().await;
        let reached = envoy.wait_for_revision(revision, DEADLINE).await;
        load.progress(None, PHASE_CALLS).await;
        let calls = load.finish().await;
        let summary = Summary::of(&calls, Instant::now(), None);
        summary.print("reload");
        summary.assert_no_failed_call();
        reached.expect("every worker gauge reaches the change");
        assert_eq!(queues_after, queues, "the old root contexts' queues are unlisted");
        assert_eq!(workers_after, workers, "one gauge per worker, reload or not");
    })
    .await;
}
