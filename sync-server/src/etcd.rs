//! The etcd side: list every watched prefix at one revision, then watch
//! from the next revision, so that no change between the two is lost.
//!
//! Any failure (etcd away, the watch cancelled by a compaction, the stream
//! closed) ends the round: the last snapshot is marked stale and served on,
//! and the next round lists afresh after a jittered, growing pause.

use crate::publish::Publisher;
use crate::registry::{Change, Registry};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `host:port` or URLs, one per member.
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    /// The deadline of each listing request.
    pub request_timeout: Duration,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }

    fn urls(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect()
    }

    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // HTTP/2 pings find a dead member even when no key changes.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        Client::connect(self.urls(), Some(options)).await
    }
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Keeps `publisher` in step with etcd until `shutdown`.
pub async fn sync(
    options: EtcdOptions,
    mut registry: Registry,
    publisher: Publisher,
    shutdown: CancellationToken,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let round = tokio::select! {
            _ = shutdown.cancelled() => return,
            round = sync_round(&options, &mut registry, &publisher, &mut retry) => round,
        };
        if let Err(e) = round {
            publisher.mark_stale();
            let pause = jitter(retry);
            warn!(error = %e, ?pause, "etcd sync interrupted; serving the last snapshot as stale");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            retry = (retry * 2).min(MAX_RETRY);
        }
    }
}

/// A pause between `d/2` and `d`, so replicas do not retry in step.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d / 2 + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the watch was cancelled: {0}")]
    Cancelled(String),
    #[error("the watch stream closed")]
    Closed,
}

async fn sync_round(
    options: &EtcdOptions,
    registry: &mut Registry,
    publisher: &Publisher,
    retry: &mut Duration,
) -> Result<(), RoundError> {
    let timeout = options.request_timeout;
    let mut client = tokio::time::timeout(timeout, options.connect())
        .await
        .map_err(|_| RoundError::Timeout(timeout))??;

    // List every prefix at the revision of the first listing.
    let mut revision = 0i64;
    let mut listed = Vec::new();
    for spec in registry.specs() {
        let mut get = GetOptions::new().with_prefix();
        if revision > 0 {
            get = get.with_revision(revision);
        }
        let response = tokio::time::timeout(timeout, client.get(spec.prefix.as_str(), Some(get)))
            .await
            .map_err(|_| RoundError::Timeout(timeout))??;
        if revision == 0 {
            revision = response.header().map(|h| h.revision()).unwrap_or(0);
        }
        listed.push(response);
    }
    registry.reset(u64::try_from(revision).unwrap_or(0));
    for (spec, response) in listed.iter().enumerate() {
        for kv in response.kvs() {
            if let Change::Rejected(reason) =
                registry.put(spec, kv.key(), kv.value(), kv.mod_revision())
            {
                warn!(key = %String::from_utf8_lossy(kv.key()), %reason, "registration rejected");
            }
        }
    }
    publisher.publish(registry.snapshot(false));
    info!(revision, "listed registrations from etcd");
    *retry = FIRST_RETRY;

    // Watch every prefix on one stream from the next revision: nothing
    // written after the listing is missed.
    let mut stream = None;
    for spec in registry.specs() {
        let watch = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        match &mut stream {
            None => stream = Some(client.watch(spec.prefix.as_str(), Some(watch)).await?),
            Some(stream) => stream.watch(spec.prefix.as_str(), Some(watch)).await?,
        }
    }
    let Some(mut stream) = stream else {
        return Err(RoundError::Closed);
    };
    while let Some(response) = stream.message().await? {
        if response.canceled() {
            let reason = match response.compact_revision() {
                0 => response.cancel_reason().to_owned(),
                compacted => format!("history compacted at revision {compacted}"),
            };
            return Err(RoundError::Cancelled(reason));
        }
        if response.events().is_empty() {
            continue;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let specs: Vec<usize> = registry.specs_for(kv.key()).collect();
            for spec in specs {
                let change = match event.event_type() {
                    EventType::Put => registry.put(spec, kv.key(), kv.value(), kv.mod_revision()),
                    EventType::Delete => registry.delete(spec, kv.key()),
                };
                if let Change::Rejected(reason) = change {
                    warn!(key = %String::from_utf8_lossy(kv.key()), %reason, "registration rejected");
                }
            }
            registry.advance(u64::try_from(kv.mod_revision()).unwrap_or(0));
        }
        publisher.publish(registry.snapshot(false));
    }
    Err(RoundError::Closed)
}
