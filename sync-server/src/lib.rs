//! sync-server: watches service registrations in etcd and serves them as
//! versioned endpoint snapshots over HTTP.
//!
//! - [`format`], [`registry`] and [`tables`]: pure parsing, the
//!   registrations seen and the tables built from them;
//! - [`keyspace`]: the key ranges a watch configuration covers, and its
//!   epoch;
//! - [`etcd`]: list + watch, reconnecting, proving freshness (stale
//!   without proof of contact with the etcd majority);
//! - [`publish`] and [`history`]: the snapshot being served, the long-poll
//!   signal, and what changed at each publication (for deltas);
//! - [`health`] and [`observe`]: active gRPC health checks (when on),
//!   their results put into what is served;
//! - [`http`]: the v1 HTTP contract;
//! - [`metrics`]: the counters and gauges of `/metrics`;
//! - [`ui`]: the browser console at `/ui/`;
//! - [`tls`]: HTTPS (certificate files, their reload, the listener).
//!
//! [`run`] wires them to a listener; the binary only parses its command line.

#![forbid(unsafe_code)]

pub mod etcd;
pub mod format;
pub mod health;
pub mod history;
pub mod http;
pub mod keyspace;
pub mod metrics;
pub mod observe;
pub mod publish;
pub mod registry;
pub mod snapshot_file;
pub mod tables;
pub mod tls;
pub mod ui;

use crate::etcd::EtcdOptions;
use crate::format::WatchSpec;
use crate::history::HistoryLimits;
use crate::http::{app, AppState};
use crate::metrics::{HealthMetrics, TlsMetrics};
use crate::publish::Publisher;
use crate::registry::Registry;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub etcd: EtcdOptions,
    pub watches: Vec<WatchSpec>,
    /// Where the last good snapshot is kept across restarts.
    pub snapshot_file: Option<PathBuf>,
    /// The bearer token `/v1/*` and `/metrics` require, if any.
    pub token: Option<String>,
    /// How much change history is kept for deltas.
    pub history: HistoryLimits,
    /// The most long-polls held at once.
    pub max_long_polls: usize,
    /// Keys in the first etcd listing request, and the fewest in any.
    pub list_page_size: i64,
    /// About how many bytes later listing requests bring.
    pub list_page_bytes: usize,
    /// No proof of contact with the etcd majority for this long: what is
    /// served is marked stale.
    pub freshness_timeout: Duration,
    /// How long arrival stamps (`serving_since_ms`) are kept.
    pub stamp_horizon: Duration,
    /// Active health checks of every endpoint; off when `None`.
    pub health: Option<health::HealthConfig>,
    /// Serve the console from this directory instead of the embedded files.
    pub ui_dir: Option<PathBuf>,
    /// Serve HTTPS with these files (re-read when they change); plain
    /// HTTP when `None`.
    pub tls: Option<tls::TlsFiles>,
    /// Health checks speak TLS to the endpoints; plain when `None`.
    pub health_tls: Option<health::HealthTls>,
}

impl Config {
    pub fn new(etcd: EtcdOptions, watches: Vec<WatchSpec>) -> Self {
        Config {
            etcd,
            watches,
            snapshot_file: None,
            token: None,
            history: HistoryLimits::default(),
            max_long_polls: http::DEFAULT_MAX_LONG_POLLS,
            list_page_size: etcd::LIST_PAGE_SIZE,
            list_page_bytes: etcd::LIST_PAGE_BYTES,
            freshness_timeout: etcd::DEFAULT_FRESHNESS_TIMEOUT,
            stamp_horizon: observe::DEFAULT_STAMP_HORIZON,
            health: None,
            ui_dir: None,
            tls: None,
            health_tls: None,
        }
    }
}

/// Where requests come from: plain TCP, or finished TLS handshakes.
enum Listening {
    Plain(TcpListener),
    Tls(tls::TlsListener),
}

/// How long in-flight requests get to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves on `listener` until `shutdown` is cancelled, then ends held
/// long-polls and returns once in-flight requests have finished (or after
/// a short grace period, so a stuck client cannot hold the process).
///
/// With [`Config::tls`], serves HTTPS; a TLS file that cannot be used
/// fails this at once, before anything else starts, naming the file.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tls_metrics = Arc::new(TlsMetrics::default());
    // The tasks the server cannot do without: each ends only on shutdown,
    // and one that ends before (a panic: native code unwinds) stops the
    // server, so that it is restarted rather than serving on half-dead.
    let mut essential = Essential::default();
    let listener = match config.tls.clone() {
        Some(files) => {
            let (reloader, configs) = tls::Reloader::start(files, Arc::clone(&tls_metrics))?;
            let listener = tls::TlsListener::new(listener, configs, Arc::clone(&tls_metrics))?;
            essential.spawn(
                "the TLS file reloader",
                reloader.run(tls::RELOAD_CHECK_PERIOD, shutdown.clone()),
            );
            Listening::Tls(listener)
        }
        None => Listening::Plain(listener),
    };
    let publisher = Publisher::new(config.history);
    if let Some(snapshot) = config
        .snapshot_file
        .as_deref()
        .and_then(snapshot_file::load)
    {
        publisher.publish_loaded(&snapshot);
    }
    let mut state = AppState::new(publisher.clone(), shutdown.clone());
    state.token = config.token.map(Arc::from);
    state.max_long_polls = config.max_long_polls;
    if matches!(listener, Listening::Tls(_)) {
        let _ = state.metrics.tls.set(tls_metrics);
    }
    let registry = Arc::new(Mutex::new(Registry::new(config.watches)));
    essential.spawn(
        "the arrival-stamp expiry",
        observe::expire_stamps(
            Arc::clone(&registry),
            publisher.clone(),
            config.stamp_horizon,
            shutdown.clone(),
        ),
    );
    if let Some(checks) = config.health {
        let health_metrics = Arc::new(HealthMetrics::default());
        let _ = state.metrics.health.set(Arc::clone(&health_metrics));
        let (targets_tx, targets_rx) = tokio::sync::watch::channel(Arc::default());
        let (results_tx, results_rx) = tokio::sync::mpsc::unbounded_channel();
        essential.spawn(
            "the health-check target follower",
            observe::follow_targets(
                Arc::clone(&registry),
                publisher.clone(),
                targets_tx,
                shutdown.clone(),
            ),
        );
        essential.spawn(
            "the health-check result publisher",
            observe::apply_health(
                Arc::clone(&registry),
                publisher.clone(),
                results_rx,
                shutdown.clone(),
            ),
        );
        essential.spawn(
            "the health-check scheduler",
            health::run_with_tls(
                checks,
                config.health_tls,
                targets_rx,
                results_tx,
                health_metrics,
                shutdown.clone(),
            ),
        );
    }
    let sync_options = etcd::SyncOptions {
        etcd: config.etcd,
        page_size: config.list_page_size,
        page_bytes: config.list_page_bytes,
        freshness_timeout: config.freshness_timeout,
    };
    essential.spawn(
        "the etcd sync",
        etcd::sync(
            sync_options,
            registry,
            publisher.clone(),
            Arc::clone(&state.metrics),
            shutdown.clone(),
        ),
    );
    let persist = config
        .snapshot_file
        .map(|path| tokio::spawn(snapshot_file::persist(publisher, path, shutdown.clone())));
    let mut app = app(state);
    if let Some(dir) = config.ui_dir {
        app = app.layer(axum::Extension(ui::UiDir(dir)));
    }
    // The routes are made once, not per connection (what `serve` does with
    // a plain router): 6 KiB less for each of thousands of held long-polls.
    let app = app.into_make_service();
    let graceful = shutdown.clone().cancelled_owned();
    let mut serve: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
        match listener {
            Listening::Tls(listener) => Box::pin(std::future::IntoFuture::into_future(
                axum::serve(listener, app).with_graceful_shutdown(graceful),
            )),
            Listening::Plain(listener) => Box::pin(std::future::IntoFuture::into_future(
                axum::serve(listener, app).with_graceful_shutdown(graceful),
            )),
        };
    let served = tokio::select! {
        served = &mut serve => served,
        Some((task, ended)) = essential.next_ended() => {
            if shutdown.is_cancelled() && ended.is_ok() {
                // Shutting down: in-flight requests get the grace period.
                tokio::time::timeout(SHUTDOWN_GRACE, &mut serve).await.unwrap_or(Ok(()))
            } else {
                // Ending before shutdown means a bug (a panic); serving on
                // would serve stale tables as fresh, or no health at all.
                let why = match ended {
                    Err(e) if e.is_panic() => "it panicked".to_owned(),
                    Err(e) => e.to_string(),
                    Ok(()) => "it returned".to_owned(),
                };
                tracing::error!(%task, %why, "an essential task ended; stopping");
                Err(std::io::Error::other(format!("{task} ended: {why}")))
            }
        }
        _ = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
    };
    shutdown.cancel();
    // Every essential task ends on shutdown; a stuck one cannot hold the
    // process past the grace period.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while essential.next_ended().await.is_some() {}
    })
    .await;
    finish(served, persist).await
}

/// The essential tasks, each with its name; a task's panic is its result,
/// not the join set's.
#[derive(Default)]
struct Essential {
    tasks: tokio::task::JoinSet<(&'static str, Result<(), tokio::task::JoinError>)>,
}

impl Essential {
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.tasks.spawn(async move { (name, handle.await) });
    }

    /// The next task to end, and how; `None` once all have.
    async fn next_ended(&mut self) -> Option<(&'static str, Result<(), tokio::task::JoinError>)> {
        match self.tasks.join_next().await? {
            Ok(ended) => Some(ended),
            // The watcher itself only awaits; it ends early only if aborted.
            Err(e) => Some(("an essential task", Err(e))),
        }
    }
}

/// Waits for the snapshot file's last write, then returns `served`.
async fn finish(
    served: std::io::Result<()>,
    persist: Option<tokio::task::JoinHandle<()>>,
) -> std::io::Result<()> {
    if let Some(persist) = persist {
        let _ = persist.await;
    }
    served
}
