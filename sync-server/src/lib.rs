//! sync-server: watches service registrations in etcd and serves them as
//! versioned endpoint snapshots over HTTP.
//!
//! - [`format`] and [`registry`]: pure parsing and snapshot building;
//! - [`etcd`]: list + watch, reconnecting, marking the snapshot stale;
//! - [`publish`]: the snapshot being served and the long-poll signal;
//! - [`http`]: the v1 HTTP contract.
//!
//! [`run`] wires them to a listener; the binary only parses its command line.

#![forbid(unsafe_code)]

pub mod etcd;
pub mod format;
pub mod http;
pub mod publish;
pub mod registry;

use crate::etcd::EtcdOptions;
use crate::format::WatchSpec;
use crate::http::{app, AppState};
use crate::publish::Publisher;
use crate::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub etcd: EtcdOptions,
    pub watches: Vec<WatchSpec>,
}

/// Serves on `listener` until `shutdown` is cancelled, then ends held
/// long-polls and returns once in-flight requests have finished.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let publisher = Publisher::new();
    let sync = tokio::spawn(etcd::sync(
        config.etcd,
        Registry::new(config.watches),
        publisher.clone(),
        shutdown.clone(),
    ));
    let state = AppState {
        publisher,
        shutdown: shutdown.clone(),
    };
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    let _ = sync.await;
    served
}
