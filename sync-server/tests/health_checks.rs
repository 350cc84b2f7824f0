//! The health-check engine against real in-process tonic servers serving
//! `grpc.health.v1.Health` on 127.0.0.1: states, timeouts, target changes,
//! the concurrency bound and the service name asked for. Every wait has a
//! deadline; every server started is stopped.

use etcd_mesh_wire::Health;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use sync_server::health::{run, CheckName, HealthConfig, Target, Transition};
use sync_server::metrics::HealthMetrics;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Generous: CI machines stall; the tests assert bounds separately.
const DEADLINE: Duration = Duration::from_secs(10);

fn config() -> HealthConfig {
    HealthConfig {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        unhealthy_threshold: 3,
        healthy_threshold: 3,
        max_concurrent: 16,
        max_connections: sync_server::health::DEFAULT_MAX_CONNECTIONS,
        check_name: CheckName::Empty,
    }
}

fn target(service: &str, addr: SocketAddr) -> Target {
    Target {
        service: Arc::from(service),
        addr: addr.to_string(),
    }
}

/// A tonic server with only the health service.
struct Backend {
    addr: SocketAddr,
    reporter: HealthReporter,
    stop: CancellationToken,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Serves `routes` on `listener` until the token is cancelled.
fn serve(
    listener: TcpListener,
    routes: tonic::service::Routes,
) -> (
    CancellationToken,
    JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    (stop, task)
}

impl Backend {
    /// Serving `""` (the reporter's default).
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (reporter, service) = tonic_health::server::health_reporter();
        let (stop, task) = serve(listener, tonic::service::Routes::new(service));
        Backend {
            addr,
            reporter,
            stop,
            task,
        }
    }

    /// Knows only `name`, serving: `""` and other names are NOT_FOUND.
    async fn start_knowing_only(name: &str) -> Backend {
        let mut backend = Backend::start().await;
        backend.reporter.clear_service_status("").await;
        backend
            .reporter
            .set_service_status(name, ServingStatus::Serving)
            .await;
        backend
    }

    /// Stops serving and closes the listener (so connects are refused)
    /// and the connections (the server sends GOAWAY).
    async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(DEADLINE, &mut task).await.is_err() {
            task.abort();
            panic!("backend {} did not stop", self.addr);
        }
    }
}

/// The engine under test, with its inputs and outputs.
struct Checker {
    targets: watch::Sender<Arc<BTreeSet<Target>>>,
    transitions: mpsc::UnboundedReceiver<Transition>,
    metrics: Arc<HealthMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Checker {
    fn start(config: HealthConfig, targets: impl IntoIterator<Item = Target>) -> Checker {
        let (targets_tx, targets_rx) = watch::channel(Arc::new(targets.into_iter().collect()));
        let (out, transitions) = mpsc::unbounded_channel();
        let metrics = Arc::new(HealthMetrics::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            config,
            targets_rx,
            out,
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
        Checker {
            targets: targets_tx,
            transitions,
            metrics,
            shutdown,
            task,
        }
    }

    fn set_targets(&self, targets: impl IntoIterator<Item = Target>) {
        self.targets
            .send_replace(Arc::new(targets.into_iter().collect()));
    }

    async fn next(&mut self) -> Transition {
        tokio::time::timeout(DEADLINE, self.transitions.recv())
            .await
            .expect("a transition before the deadline")
            .expect("the engine is running")
    }

    fn load(&self, pick: fn(&HealthMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(&self.metrics).load(Ordering::Relaxed)
    }

    /// Waits until `metric` reaches at least `at_least`.
    async fn wait_metric(
        &self,
        what: &str,
        pick: fn(&HealthMetrics) -> &std::sync::atomic::AtomicU64,
        condition: impl Fn(u64) -> bool,
    ) {
        let deadline = Instant::now() + DEADLINE;
        while !condition(self.load(pick)) {
            assert!(
                Instant::now() < deadline,
                "{what}: still {} at the deadline",
                self.load(pick)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the engine; it must return promptly and let go of everything.
    async fn stop(self) -> mpsc::UnboundedReceiver<Transition> {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("run returns on shutdown")
            .expect("run does not panic");
        assert_eq!(self.metrics.connections_open.load(Ordering::Relaxed), 0);
        assert_eq!(self.metrics.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(self.metrics.targets.load(Ordering::Relaxed), 0);
        self.transitions
    }
}

fn checks(m: &HealthMetrics) -> &std::sync::atomic::AtomicU64 {
    &m.checks_total
}
fn failures(m: &HealthMetrics) -> &std::sync::atomic::AtomicU64 {
    &m.failures_total
}
fn connections(m: &HealthMetrics) -> &std::sync::atomic::AtomicU64 {
    &m.connections_open
}
fn targets(m: &HealthMetrics) -> &std::sync::atomic::AtomicU64 {
    &m.targets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_backend_becomes_healthy_once() {
    let backend = Backend::start().await;
    let mut checker = Checker::start(config(), [target("svc.a", backend.addr)]);

    let first = checker.next().await;
    assert_eq!(
        first,
        Transition {
            target: target("svc.a", backend.addr),
            health: Health::Healthy
        }
    );
    checker.wait_metric("checks", checks, |n| n >= 5).await;
    assert_eq!(checker.load(failures), 0);
    assert_eq!(checker.load(connections), 1, "one channel, reused");
    assert_eq!(checker.metrics.unhealthy.load(Ordering::Relaxed), 0);

    let mut transitions = checker.stop().await;
    assert!(transitions.try_recv().is_err(), "no second transition");
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_cap_each_check_connects_anew() {
    let backend = Backend::start().await;
    let config = HealthConfig {
        max_connections: 2,
        max_concurrent: 1,
        ..config()
    };
    let names: Vec<Target> = (0..6)
        .map(|n| target(&format!("svc.{n}"), backend.addr))
        .collect();
    let mut checker = Checker::start(config, names);
    for _ in 0..6 {
        assert_eq!(checker.next().await.health, Health::Healthy);
    }
    checker.wait_metric("checks", checks, |n| n >= 30).await;
    // Two kept, and at most the one check in flight holding its own.
    assert!(
        checker.load(connections) <= 3,
        "{}",
        checker.load(connections)
    );
    assert_eq!(checker.load(failures), 0);
    let mut transitions = checker.stop().await;
    assert!(transitions.try_recv().is_err(), "all stayed healthy");
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_backend_becomes_unhealthy_within_the_threshold() {
    let backend = Backend::start().await;
    let addr = backend.addr;
    let config = config();
    let mut checker = Checker::start(config.clone(), [target("svc.a", addr)]);
    assert_eq!(checker.next().await.health, Health::Healthy);

    backend.stop().await;
    let stopped = Instant::now();
    let transition = checker.next().await;
    let took = stopped.elapsed();
    assert_eq!(
        transition,
        Transition {
            target: target("svc.a", addr),
            health: Health::Unhealthy
        }
    );
    // Refused connects fail at once: the threshold's intervals (+10%
    // jitter) plus one check, plus slack for a loaded machine.
    let bound = config.interval.mul_f64(1.1) * config.unhealthy_threshold + Duration::from_secs(1);
    assert!(took < bound, "took {took:?}, bound {bound:?}");
    assert!(checker.load(failures) >= u64::from(config.unhealthy_threshold));
    assert_eq!(checker.metrics.unhealthy.load(Ordering::Relaxed), 1);

    let mut transitions = checker.stop().await;
    assert!(transitions.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_drains_at_once_and_serving_needs_the_healthy_threshold() {
    let backend = Backend::start().await;
    let config = config();
    let mut checker = Checker::start(config.clone(), [target("svc.a", backend.addr)]);
    assert_eq!(checker.next().await.health, Health::Healthy);

    backend
        .reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let asked = Instant::now();
    assert_eq!(checker.next().await.health, Health::NotServing);
    // The next check, not a threshold of them.
    let took = asked.elapsed();
    assert!(
        took < config.interval * 2 + Duration::from_secs(1),
        "took {took:?}"
    );
    assert_eq!(checker.metrics.unhealthy.load(Ordering::Relaxed), 1);
    assert_eq!(
        checker.load(failures),
        0,
        "NOT_SERVING is an answer, not a failure"
    );

    let checks_before = checker.load(checks);
    backend
        .reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    assert_eq!(checker.next().await.health, Health::Healthy);
    let checks_seen = checker.load(checks) - checks_before;
    assert!(
        checks_seen >= u64::from(config.healthy_threshold),
        "Healthy after {checks_seen} checks"
    );
    assert_eq!(checker.metrics.unhealthy.load(Ordering::Relaxed), 0);

    checker.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_times_out_to_unhealthy() {
    let (addr, _open, silent) = silent_listener().await;
    let config = HealthConfig {
        timeout: Duration::from_millis(150),
        unhealthy_threshold: 2,
        ..config()
    };
    let started = Instant::now();
    let mut checker = Checker::start(config.clone(), [target("svc.a", addr)]);

    let transition = checker.next().await;
    let took = started.elapsed();
    assert_eq!(
        transition,
        Transition {
            target: target("svc.a", addr),
            health: Health::Unhealthy
        }
    );
    // Each failure waited out the whole timeout.
    assert!(
        took >= config.timeout * config.unhealthy_threshold,
        "took {took:?}"
    );
    assert!(checker.load(failures) >= 2);

    checker.stop().await;
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_target_is_forgotten_silently() {
    let backend = Backend::start().await;
    let kept = target("svc.kept", backend.addr);
    let removed = target("svc.removed", backend.addr);
    let mut checker = Checker::start(config(), [kept.clone(), removed.clone()]);
    let mut healthy: Vec<Target> = vec![checker.next().await.target, checker.next().await.target];
    healthy.sort();
    assert_eq!(healthy, [kept.clone(), removed.clone()]);
    assert_eq!(checker.load(connections), 2);

    checker.set_targets([kept.clone()]);
    checker
        .wait_metric("connections", connections, |n| n == 1)
        .await;
    assert_eq!(checker.load(targets), 1);
    // Checks go on (for the kept one) and nothing is said of the removed.
    let checks_now = checker.load(checks);
    checker
        .wait_metric("checks", checks, |n| n >= checks_now + 5)
        .await;
    assert!(checker.transitions.try_recv().is_err());

    // Back again, it starts Unknown: a new Healthy transition.
    checker.set_targets([kept.clone(), removed.clone()]);
    assert_eq!(
        checker.next().await,
        Transition {
            target: removed,
            health: Health::Healthy
        }
    );
    checker
        .wait_metric("connections", connections, |n| n == 2)
        .await;

    checker.stop().await;
    backend.stop().await;
}

/// Accepts connections and reads them, never answering; counts those the
/// client has not closed yet. Aborting the task closes them all.
async fn silent_listener() -> (SocketAddr, Arc<AtomicU64>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let open = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&open);
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let counted = Arc::clone(&counted);
            connections.spawn(async move {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut socket, &mut sink).await;
                counted.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_target_aborts_its_check_in_flight() {
    let (addr, open, silent) = silent_listener().await;
    let config = HealthConfig {
        timeout: Duration::from_secs(30),
        ..config()
    };
    let mut checker = Checker::start(config, [target("svc.a", addr)]);
    checker
        .wait_metric("in flight", |m| &m.in_flight, |n| n == 1)
        .await;
    let deadline = Instant::now() + DEADLINE;
    while open.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the check never connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    checker.set_targets([]);
    let removed = Instant::now();
    checker
        .wait_metric("in flight", |m| &m.in_flight, |n| n == 0)
        .await;
    assert!(
        removed.elapsed() < Duration::from_secs(5),
        "not at the timeout"
    );
    assert_eq!(checker.load(connections), 0);
    assert_eq!(checker.load(checks), 0, "an aborted check is not counted");
    // The socket itself is closed, not only the count.
    let deadline = Instant::now() + DEADLINE;
    while open.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "the connection stays open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(checker.transitions.try_recv().is_err());

    checker.stop().await;
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_in_flight_never_exceed_max_concurrent() {
    const SERVERS: usize = 20;
    const NAMES_PER_SERVER: usize = 5;
    const REFUSED: usize = 100;
    let mut backends = Vec::new();
    for _ in 0..SERVERS {
        backends.push(Backend::start().await);
    }
    // Bound but not listening: the ports stay ours and connects are refused.
    let mut refused_sockets = Vec::new();
    for _ in 0..REFUSED {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        refused_sockets.push(socket);
    }
    let refused: Vec<SocketAddr> = refused_sockets
        .iter()
        .map(|s| s.local_addr().expect("local addr"))
        .collect();
    let mut all = BTreeSet::new();
    for backend in &backends {
        for name in 0..NAMES_PER_SERVER {
            all.insert(target(&format!("svc.{name}"), backend.addr));
        }
    }
    for (n, addr) in refused.iter().enumerate() {
        all.insert(target(&format!("svc.refused.{n}"), *addr));
    }
    assert_eq!(all.len(), 200);
    let config = HealthConfig {
        interval: Duration::from_millis(20),
        unhealthy_threshold: 1,
        max_concurrent: 8,
        ..config()
    };
    let mut checker = Checker::start(config.clone(), all.iter().cloned());

    let mut seen = BTreeSet::new();
    while seen.len() < all.len() {
        let transition = checker.next().await;
        let expected = if transition.target.service.starts_with("svc.refused.") {
            Health::Unhealthy
        } else {
            Health::Healthy
        };
        assert_eq!(transition.health, expected, "{transition:?}");
        assert!(seen.insert(transition.target), "one transition per target");
    }
    checker.wait_metric("checks", checks, |n| n >= 2_000).await;
    let peak = checker.load(|m| &m.peak_in_flight);
    assert!(peak <= config.max_concurrent as u64, "peak {peak}");
    assert!(peak >= 2, "the checks ran concurrently (peak {peak})");
    assert_eq!(checker.load(targets), 200);

    checker.stop().await;
    for backend in backends {
        backend.stop().await;
    }
    drop(refused_sockets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_name_registry_asks_for_the_registry_name() {
    let backend = Backend::start_knowing_only("svc.registered").await;
    let registered = target("svc.registered", backend.addr);
    let other = target("svc.other", backend.addr);
    let config = HealthConfig {
        check_name: CheckName::Registry,
        unhealthy_threshold: 2,
        ..config()
    };
    let mut checker = Checker::start(config, [registered.clone(), other.clone()]);

    let mut got = vec![checker.next().await, checker.next().await];
    got.sort_by(|a, b| a.target.cmp(&b.target));
    assert_eq!(
        got,
        [
            // NOT_FOUND for a name the backend does not know.
            Transition {
                target: other,
                health: Health::Unhealthy
            },
            Transition {
                target: registered,
                health: Health::Healthy
            },
        ]
    );

    checker.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_name_fixed_and_empty_ignore_the_registry_name() {
    let backend = Backend::start_knowing_only("grpc.fixed").await;
    let fixed = Checker::start(
        HealthConfig {
            check_name: CheckName::Fixed("grpc.fixed".to_owned()),
            ..config()
        },
        [target("svc.anything", backend.addr)],
    );
    let empty = Checker::start(
        HealthConfig {
            check_name: CheckName::Empty,
            unhealthy_threshold: 1,
            ..config()
        },
        [target("grpc.fixed", backend.addr)],
    );
    let (mut fixed, mut empty) = (fixed, empty);
    assert_eq!(fixed.next().await.health, Health::Healthy);
    // `""` was cleared from this backend: NOT_FOUND.
    assert_eq!(empty.next().await.health, Health::Unhealthy);

    fixed.stop().await;
    empty.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_backend_on_the_same_address_is_found_again() {
    let backend = Backend::start().await;
    let addr = backend.addr;
    let config = HealthConfig {
        healthy_threshold: 2,
        ..config()
    };
    let mut checker = Checker::start(config, [target("svc.a", addr)]);
    assert_eq!(checker.next().await.health, Health::Healthy);
    backend.stop().await;
    assert_eq!(checker.next().await.health, Health::Unhealthy);

    // Same port, new server: a fresh connection finds it.
    let listener = TcpListener::bind(addr).await.expect("rebind the same port");
    let (_reporter, service) = tonic_health::server::health_reporter();
    let (stop, restarted) = serve(listener, tonic::service::Routes::new(service));
    assert_eq!(checker.next().await.health, Health::Healthy);

    checker.stop().await;
    stop.cancel();
    let _ = tokio::time::timeout(DEADLINE, restarted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_is_no_uri_fails_without_panicking() {
    let bad = Target {
        service: Arc::from("svc.a"),
        addr: "not an address/%%".to_owned(),
    };
    let mut checker = Checker::start(
        HealthConfig {
            unhealthy_threshold: 1,
            ..config()
        },
        [bad.clone()],
    );
    assert_eq!(
        checker.next().await,
        Transition {
            target: bad,
            health: Health::Unhealthy
        }
    );
    assert_eq!(checker.load(connections), 0);
    checker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_status_counts_as_a_failure() {
    let backend = Backend::start().await;
    backend
        .reporter
        .set_service_status("", ServingStatus::Unknown)
        .await;
    let config = HealthConfig {
        unhealthy_threshold: 2,
        ..config()
    };
    let mut checker = Checker::start(config, [target("svc.a", backend.addr)]);
    assert_eq!(checker.next().await.health, Health::Unhealthy);
    assert!(checker.load(failures) >= 2);

    checker.stop().await;
    backend.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_health_service_is_unhealthy() {
    // Every method answers UNIMPLEMENTED.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, server) = serve(listener, tonic::service::Routes::default());
    let config = HealthConfig {
        unhealthy_threshold: 2,
        ..config()
    };
    let mut checker = Checker::start(config, [target("svc.a", addr)]);
    assert_eq!(checker.next().await.health, Health::Unhealthy);

    checker.stop().await;
    stop.cancel();
    let _ = tokio::time::timeout(DEADLINE, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_sending_garbage_is_unhealthy_without_a_panic() {
    use tokio::io::AsyncWriteExt;
    // Answers every connection with bytes that are no HTTP/2, then closes.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let garbage = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nhi\x00\xff\xfe")
                .await;
        }
    });
    let config = HealthConfig {
        unhealthy_threshold: 2,
        ..config()
    };
    let mut checker = Checker::start(config, [target("svc.a", addr)]);
    assert_eq!(checker.next().await.health, Health::Unhealthy);

    checker.stop().await;
    garbage.abort();
}
