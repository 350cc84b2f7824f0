//! A health check that panics (a bug in it, or in a library it calls):
//! that check counts as failed, and the server keeps serving, syncing
//! and checking the other endpoints. Native binaries unwind on a panic
//! (the root Cargo.toml's release profile), so what holds here holds in
//! production.
//!
//! The panic is injected without a hook in the server: the test's tracing
//! subscriber panics on the check's own "health check failed" event,
//! which it emits inside the check task. The runtime is single-threaded,
//! so every task of the server runs under that subscriber.

mod common;

use common::{naming, Server, DEADLINE};
use etcd_mesh_testkit::{http_get, wait_for, Etcd};
use etcd_mesh_wire::{Health, Snapshot};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use sync_server::health::{CheckName, HealthConfig};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata};

/// Where the check logs a failed RPC, and what it says.
const CHECK_MODULE: &str = "sync_server::health::check";
const CHECK_FAILED: &str = "health check failed";

/// A subscriber that panics inside each failed health check (counting
/// them) and ignores everything else.
struct PanicInFailedChecks {
    panics: Arc<AtomicU64>,
}

/// An event's messages (the check also has a field named `message`).
struct Messages(Vec<String>);

impl Visit for Messages {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.push(format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for PanicInFailedChecks {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && metadata.target() == CHECK_MODULE
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut messages = Messages(Vec::new());
        event.record(&mut messages);
        if messages.0.iter().any(|m| m == CHECK_FAILED) {
            self.panics.fetch_add(1, Ordering::Relaxed);
            panic!("injected: a health check panics");
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// A gRPC server answering health checks for `serving` only: any other
/// name is NOT_FOUND, a failed check.
async fn backend(serving: &str, stop: &CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (mut reporter, service) = tonic_health::server::health_reporter();
    reporter.clear_service_status("").await;
    reporter
        .set_service_status(serving, ServingStatus::Serving)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::new(service))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    addr
}

fn health(snapshot: &Snapshot, service: &str, addr: SocketAddr) -> Option<Health> {
    snapshot
        .services
        .get(service)?
        .endpoints
        .iter()
        .find(|e| e.addr == addr.to_string())?
        .health
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_check_fails_that_check_and_nothing_else() {
    let panics = Arc::new(AtomicU64::new(0));
    let _subscriber = tracing::subscriber::set_default(PanicInFailedChecks {
        panics: Arc::clone(&panics),
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let backends = CancellationToken::new();
    let good = backend("svc.good", &backends).await;
    // Asked for "svc.bad", it answers NOT_FOUND: each of its checks panics.
    let bad = backend("svc.good", &backends).await;
    let mut client = common::client(&etcd).await;
    client
        .put("svc/svc.good/1", naming(&good.to_string(), 1), None)
        .await
        .expect("put");
    client
        .put("svc/svc.bad/1", naming(&bad.to_string(), 1), None)
        .await
        .expect("put");

    let mut config = common::config(&etcd, &["etcd-naming=svc/"]);
    config.health = Some(HealthConfig {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        unhealthy_threshold: 2,
        healthy_threshold: 1,
        check_name: CheckName::Registry,
        ..HealthConfig::default()
    });
    let server = Server::start(config).await;
    server.ready().await;
    server
        .until("svc.good healthy, svc.bad unhealthy", |s| {
            health(s, "svc.good", good) == Some(Health::Healthy)
                && health(s, "svc.bad", bad) == Some(Health::Unhealthy)
        })
        .await;
    assert!(
        panics.load(Ordering::Relaxed) >= 2,
        "svc.bad went unhealthy through panicking checks"
    );

    // Panicking on: the checks go on, svc.bad's too.
    let (checks, panicked) = (
        server.metric("sync_server_health_checks_total").await,
        panics.load(Ordering::Relaxed),
    );
    wait_for("more checks, and more panics", DEADLINE, || async {
        let now = server.metric("sync_server_health_checks_total").await;
        (now >= checks + 20 && panics.load(Ordering::Relaxed) >= panicked + 5).then_some(())
    })
    .await
    .expect("the checks go on");
    assert_eq!(
        server
            .metric("sync_server_health_unhealthy_endpoints")
            .await,
        1
    );

    // The server still serves, follows etcd and checks what arrives.
    let (status, _) = http_get(server.addr, "/healthz").await.expect("GET");
    assert_eq!(status, 200);
    let newcomer = backend("svc.good", &backends).await;
    client
        .put("svc/svc.good/2", naming(&newcomer.to_string(), 1), None)
        .await
        .expect("put");
    let snapshot = server
        .until("the newcomer listed and healthy", |s| {
            health(s, "svc.good", newcomer) == Some(Health::Healthy)
        })
        .await;
    assert_eq!(health(&snapshot, "svc.good", good), Some(Health::Healthy));
    assert_eq!(health(&snapshot, "svc.bad", bad), Some(Health::Unhealthy));

    server.shutdown().await;
    backends.cancel();
}

/// A subscriber that panics on the etcd sync's "listed" event.
struct PanicInTheSync;

impl tracing::Subscriber for PanicInTheSync {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && metadata.target() == "sync_server::etcd"
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut messages = Messages(Vec::new());
        event.record(&mut messages);
        if messages
            .0
            .iter()
            .any(|m| m.contains("listed registrations"))
        {
            panic!("injected: the etcd sync panics");
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// A task the server cannot do without (here the etcd sync) that panics
/// stops the server with an error naming it, rather than leaving it to
/// serve tables that no longer follow etcd.
#[tokio::test(flavor = "current_thread")]
async fn a_panicking_essential_task_stops_the_server_naming_it() {
    let _subscriber = tracing::subscriber::set_default(PanicInTheSync);
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let run = sync_server::run(
        common::config(&etcd, &["etcd-naming=svc/"]),
        listener,
        CancellationToken::new(),
    );
    let ended = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("run() returns on its own");
    let error = ended.expect_err("an error, not a clean stop").to_string();
    assert!(
        error.contains("the etcd sync") && error.contains("panicked"),
        "{error}"
    );
}
