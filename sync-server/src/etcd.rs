//! The etcd side: list every watched prefix at one revision, then watch
//! from the next revision, so that no change between the two is lost.
//!
//! Any failure (etcd away, the watch cancelled by a compaction, the stream
//! closed, a member that lost its leader or stopped answering) ends the
//! round, and the next round lists afresh from the next member after a
//! jittered, growing pause.
//!
//! Freshness is proven, not assumed: a member cut from the majority still
//! answers pings and keeps a watch open that never moves again. So every
//! request requires a leader, and while watching, a quorum read every
//! second proves that the member still hears the majority; one not
//! answered within its deadline ends the round. With no proof for
//! `freshness_timeout`, what is served is marked stale (a log line and the
//! metrics say since when); the next proof marks it fresh again.

use crate::format::WatchSpec;
use crate::keyspace::{covering_range, epoch, prefix_end};
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::registry::{lock, Change, Registry};
use etcd_client::{EventType, GetOptions, WatchOptions};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use etcd_mesh_etcd_options::{Backoff, ConnectError, EtcdOptions, EtcdTls};

/// Keys in the first listing request, and the fewest in any: large
/// enough that a big registry pays few pages (each walks the whole range
/// left, see [`LIST_PAGE_BYTES`]), small enough in bytes for any
/// registration values (50,000 of 1 KiB is 50 MiB).
pub const LIST_PAGE_SIZE: i64 = 50_000;

/// About how many bytes of keys and values one listing request brings.
///
/// Large on purpose: etcd (3.4 and 3.5) walks every key left in the range
/// for each page, however small its limit, so listing n keys in pages of p
/// costs O(n²/p): 1,000,000 keys in pages of 5,000 took 40 s, in pages of
/// this size about 1 s.
pub const LIST_PAGE_BYTES: usize = 64 << 20;

const FIRST_RETRY: Duration = Duration::from_millis(100);
// Short: a failing round costs a connection attempt, and a replica must
// catch up within a couple of seconds of etcd coming back.
const MAX_RETRY: Duration = Duration::from_secs(1);

/// The default of `--freshness-timeout`.
pub const DEFAULT_FRESHNESS_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the watched member is asked for a quorum read.
const PROOF_INTERVAL: Duration = Duration::from_secs(1);

/// A key no registration uses: reading it is a quorum read that touches
/// nothing (a count over a large prefix would cost O(keys)).
const PROOF_KEY: &[u8] = b"\0etcd-mesh/freshness";

/// How sync-server talks to etcd: where, how pages are listed, and how
/// long tables may go without proof that they are current.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub etcd: EtcdOptions,
    /// Keys in the first listing request, and the fewest in any.
    pub page_size: i64,
    /// Later requests ask for as many keys as fit about this many bytes.
    pub page_bytes: usize,
    /// No proof of contact with the etcd majority for this long: stale.
    pub freshness_timeout: Duration,
}

impl SyncOptions {
    pub fn new(etcd: EtcdOptions) -> Self {
        SyncOptions {
            etcd,
            page_size: LIST_PAGE_SIZE,
            page_bytes: LIST_PAGE_BYTES,
            freshness_timeout: DEFAULT_FRESHNESS_TIMEOUT,
        }
    }

    /// How long one quorum read may take before the member counts as lost:
    /// well inside the freshness timeout, so that the next member can be
    /// listed before the tables turn stale.
    fn proof_deadline(&self) -> Duration {
        (self.freshness_timeout / 4)
            .min(self.etcd.request_timeout)
            .max(Duration::from_millis(200))
    }
}

/// Keeps `publisher` in step with etcd until `shutdown`.
pub async fn sync(
    options: SyncOptions,
    registry: Arc<Mutex<Registry>>,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut retry = Backoff::new(FIRST_RETRY, MAX_RETRY);
    let specs = lock(&registry).specs().to_vec();
    let _watchdog = AbortOnDrop(tokio::spawn(mark_stale_without_proof(
        publisher.clone(),
        Arc::clone(&metrics),
        options.freshness_timeout,
    )));
    let mut sync = SyncRound {
        registry: &registry,
        specs: &specs,
        restored: String::new(),
        publisher: &publisher,
        metrics: &metrics,
        listed: false,
    };
    for round_number in 0u64.. {
        if round_number > 0 {
            metrics.sync_restarts.fetch_add(1, Ordering::Relaxed);
        }
        let round = tokio::select! {
            _ = shutdown.cancelled() => return,
            round = sync.round(&options, round_number as usize, &mut retry) => round,
        };
        metrics.etcd_connected.store(0, Ordering::Relaxed);
        if let Err(e) = round {
            let pause = retry.next();
            warn!(error = %e, ?pause, "etcd sync interrupted; trying the next member");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Marks what is served stale once no proof of contact with the etcd
/// majority is younger than `timeout` (fresh again comes with the next
/// proof, in the round).
async fn mark_stale_without_proof(publisher: Publisher, metrics: Arc<Metrics>, timeout: Duration) {
    let mut tick = tokio::time::interval(Duration::from_millis(100).min(timeout / 4));
    loop {
        tick.tick().await;
        let Some(current) = publisher.current() else {
            continue;
        };
        let age = metrics.proof_age();
        if !current.stale && age.is_none_or(|age| age > timeout) {
            warn!(
                ?age,
                ?timeout,
                "no proof of contact with the etcd majority; serving the last tables as stale"
            );
            publisher.set_stale(true);
        }
    }
}

/// How long a listing page of `limit` keys may take: the request timeout,
/// and 10 µs a key more, since etcd reads every key of a large page (a
/// loaded etcd took 3 s for 580,000) and a deadline missed on every try
/// would keep sync-server from ever being ready.
fn page_deadline(request_timeout: Duration, limit: i64) -> Duration {
    request_timeout + Duration::from_micros(10 * u64::try_from(limit).unwrap_or(0))
}

/// One listing request: the keys from `from` (at most `limit`) of the
/// range ending at `end`, at `revision` (0: the current one).
async fn list_page(
    mut kv: etcd_client::KvClient,
    from: Vec<u8>,
    end: Vec<u8>,
    limit: i64,
    revision: i64,
    timeout: Duration,
) -> Result<etcd_client::GetResponse, RoundError> {
    let mut get = GetOptions::new().with_range(end).with_limit(limit);
    if revision > 0 {
        get = get.with_revision(revision);
    }
    Ok(tokio::time::timeout(timeout, kv.get(from, Some(get)))
        .await
        .map_err(|_| RoundError::Timeout(timeout))??)
}

/// Sizes listing pages by what the earlier pages of the round weighed.
#[derive(Debug)]
struct PageSizer {
    fewest: i64,
    bytes: usize,
    limit: i64,
    keys: usize,
    listed_bytes: usize,
    pages: usize,
}

impl PageSizer {
    fn new(fewest: i64, bytes: usize) -> Self {
        let fewest = fewest.max(1);
        PageSizer {
            fewest,
            bytes,
            limit: fewest,
            keys: 0,
            listed_bytes: 0,
            pages: 0,
        }
    }

    /// Keys to ask for in the next page.
    fn limit(&self) -> i64 {
        self.limit
    }

    /// Counts a page; the next asks for as many keys of the average size
    /// so far as fit the byte budget.
    ///
    /// `left` (keys in the range after this page, from etcd's count) caps
    /// the next page at half of them: a page is put into the tables while
    /// etcd reads the next, so pages that halve hide each put behind the
    /// next read but the last, a small one. The extra pages cost little:
    /// each walks only what is left.
    fn listed(&mut self, keys: usize, bytes: usize, left: u64) {
        self.pages += 1;
        self.keys += keys;
        self.listed_bytes += bytes;
        let average = (self.listed_bytes / self.keys.max(1)).max(1);
        let fit = i64::try_from(self.bytes / average).unwrap_or(i64::MAX);
        let half = i64::try_from(left.div_ceil(2)).unwrap_or(i64::MAX);
        self.limit = fit.min(half).max(self.fewest);
    }

    /// Halves the next page after one passed the message limit; false
    /// when it is already the smallest.
    fn shrink(&mut self) -> bool {
        if self.limit <= self.fewest {
            return false;
        }
        self.limit = (self.limit / 2).max(self.fewest);
        self.bytes /= 2;
        true
    }
}

/// Aborts a background task when the owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records a proof of contact with the majority; fresh again if stale.
fn proved(metrics: &Metrics, publisher: &Publisher) {
    metrics.proved();
    if publisher
        .current()
        .is_some_and(|c| c.stale && !c.epoch.is_empty())
    {
        info!("contact with the etcd majority proven again; the tables are fresh");
        publisher.set_stale(false);
    }
}

/// Asks the member for a quorum read every [`PROOF_INTERVAL`]; returns
/// why the member cannot prove contact with the majority once one fails
/// or is not answered within `deadline`.
async fn prove_contact(
    mut client: etcd_client::Client,
    deadline: Duration,
    metrics: &Metrics,
    publisher: &Publisher,
) -> RoundError {
    let mut tick = tokio::time::interval(PROOF_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match tokio::time::timeout(deadline, client.get(PROOF_KEY, None)).await {
            Ok(Ok(_)) => proved(metrics, publisher),
            Ok(Err(e)) => return RoundError::NoQuorum(e.to_string()),
            Err(_) => return RoundError::NoQuorum(format!("a quorum read took over {deadline:?}")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the watch was cancelled: {0}")]
    Cancelled(String),
    #[error("the watch stream closed")]
    Closed,
    #[error("the member cannot prove contact with the etcd majority: {0}")]
    NoQuorum(String),
}

/// The state one sync round works on.
struct SyncRound<'a> {
    /// Shared with the health checks, which change what is served
    /// between revisions; held only between awaits.
    registry: &'a Mutex<Registry>,
    specs: &'a [WatchSpec],
    /// Added to the epoch once etcd's revision went back (a restored
    /// backup): the same revisions now name other content.
    restored: String,
    publisher: &'a Publisher,
    metrics: &'a Metrics,
    /// Whether this process has listed etcd before: its first listing
    /// starts a new history, later ones continue it.
    listed: bool,
}

impl SyncRound<'_> {
    /// Reports a new rejection: a log line and the counter.
    fn report_with(metrics: &Metrics, key: &[u8], change: Change) {
        if let Change::Rejected(reason) = change {
            metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
            warn!(key = %String::from_utf8_lossy(key), %reason, "registration rejected");
        }
    }

    /// Publishes the registry if its revision is newer than what is served.
    ///
    /// Content never changes under a revision a client may hold: a listing
    /// from a member that lags behind what was already served is not
    /// published; its changes wait, pending in the registry, until the
    /// watch passes the served revision.
    fn publish(&mut self, registry: &mut Registry, epoch: &str) {
        let revision = registry.revision();
        match self.publisher.current() {
            Some(current) if self.listed && *current.epoch == *epoch => {
                let commit = registry.commit();
                if revision > current.revision {
                    self.publisher
                        .publish_change(revision, commit, registry.tables().clone());
                } else if !commit.services.is_empty() || !commit.rejections.is_empty() {
                    // A re-listing at the revision served: the registrations
                    // are the same, so what differs is health observed
                    // meanwhile, published as such.
                    self.publisher
                        .publish_health(commit, registry.tables().clone());
                }
            }
            _ => {
                registry.commit();
                self.publisher
                    .publish_reset(epoch, revision, registry.tables().clone());
                self.listed = true;
            }
        }
    }

    async fn round(
        &mut self,
        options: &SyncOptions,
        turn: usize,
        retry: &mut Backoff,
    ) -> Result<(), RoundError> {
        let timeout = options.etcd.request_timeout;
        // One member per round, the next after a failure: a client over
        // all members keeps sending to a dead one.
        let mut client = options.etcd.connect_member(turn).await?;

        // List every prefix, page by page, at the revision of the first
        // page: pages at one revision are one consistent view.
        let listing = Instant::now();
        let kv = client
            .kv_client()
            .max_decoding_message_size(options.page_bytes.saturating_mul(4).max(4 << 20));
        let mut pages = PageSizer::new(options.page_size, options.page_bytes);
        let mut revision = 0i64;
        let mut cluster = 0u64;
        let mut building = Duration::ZERO;
        for (spec, watch) in self.specs.iter().enumerate() {
            let end = prefix_end(watch.prefix.as_bytes());
            let page = |from: Vec<u8>, limit: i64, revision: i64| {
                let request = list_page(
                    kv.clone(),
                    from,
                    end.clone(),
                    limit,
                    revision,
                    page_deadline(timeout, limit),
                );
                tokio::spawn(request)
            };
            let mut from = watch.prefix.as_bytes().to_vec();
            let mut next = page(from.clone(), pages.limit(), revision);
            loop {
                let response = match (&mut next).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(RoundError::Etcd(etcd_client::Error::GRpcStatus(status))))
                        if status.code() == tonic::Code::OutOfRange && pages.shrink() =>
                    {
                        // A page of unusually large values passed the
                        // message limit: the same page again, smaller.
                        next = page(from.clone(), pages.limit(), revision);
                        continue;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(RoundError::Cancelled(e.to_string())),
                };
                let first = revision == 0;
                if first {
                    revision = response.header().map(|h| h.revision()).unwrap_or(0);
                    cluster = response.header().map(|h| h.cluster_id()).unwrap_or(0);
                }
                let more = response.more() && !response.kvs().is_empty();
                let left = u64::try_from(response.count())
                    .unwrap_or(0)
                    .saturating_sub(response.kvs().len() as u64);
                pages.listed(
                    response.kvs().len(),
                    response
                        .kvs()
                        .iter()
                        .map(|kv| kv.key().len() + kv.value().len())
                        .sum(),
                    left,
                );
                if let Some(last) = response.kvs().last().filter(|_| more) {
                    // The next page starts just after the last key, and is
                    // asked for now: etcd reads it while this one is put.
                    from = last.key().to_vec();
                    from.push(0);
                    next = page(from.clone(), pages.limit(), revision);
                }
                // Put as it comes, so that the pages are not all held at
                // once. Nothing is published until the listing is whole
                // (health commits skip every service the listing touches),
                // and a round that fails half-way lists afresh.
                let started = Instant::now();
                let mut registry = lock(self.registry);
                if first {
                    registry.reset(u64::try_from(revision).unwrap_or(0));
                }
                for kv in response.kvs() {
                    let change = registry.put(spec, kv.key(), kv.value(), kv.mod_revision());
                    Self::report_with(self.metrics, kv.key(), change);
                }
                drop(registry);
                building += started.elapsed();
                if !more {
                    break;
                }
            }
        }
        let listed = Instant::now();
        // A linearizable listing is a proof of contact with the majority,
        // and reflects every revision committed before it: one older than
        // what was served means etcd's history went back.
        proved(self.metrics, self.publisher);
        let base = epoch(cluster, self.specs);
        let revision_now = u64::try_from(revision).unwrap_or(0);
        if let Some(current) = self.publisher.current().filter(|c| {
            self.listed && c.epoch.starts_with(base.as_str()) && revision_now < c.revision
        }) {
            self.metrics
                .etcd_restores_total
                .fetch_add(1, Ordering::Relaxed);
            self.restored = format!("-restored{revision_now}");
            tracing::error!(
                served = current.revision,
                listed = revision_now,
                "etcd's revision went back (a restored backup?): publishing the restored registry under a new epoch"
            );
        }
        let epoch = format!("{base}{}", self.restored);
        {
            let mut registry = lock(self.registry);
            if revision == 0 {
                // No page came back (no watch prefixes): an empty listing.
                registry.reset(0);
            }
            self.publish(&mut registry, &epoch);
            info!(
                revision,
                %epoch,
                keys = pages.keys,
                pages = pages.pages,
                list_ms = (listed - listing).as_millis() as u64,
                put_ms = building.as_millis() as u64,
                publish_ms = listed.elapsed().as_millis() as u64,
                "listed registrations from etcd"
            );
        }
        self.publisher.mark_synced();
        retry.reset();

        // One watcher over the one key range that covers every prefix:
        // etcd orders events per watcher, not across watchers, so with one
        // watcher per prefix a catching-up watcher could deliver revision 9
        // after another delivered 10, and 9's change would be published
        // under 10. Keys in the range but under no prefix are skipped.
        let (start, end) = covering_range(self.specs);
        let watch = WatchOptions::new()
            .with_range(end)
            .with_start_revision(revision + 1);
        let mut stream = client.watch(start, Some(watch)).await?;
        self.metrics.etcd_connected.store(1, Ordering::Relaxed);
        let proof = prove_contact(
            client.clone(),
            options.proof_deadline(),
            self.metrics,
            self.publisher,
        );
        let mut proof = std::pin::pin!(proof);
        loop {
            let message = tokio::select! {
                message = stream.message() => message?,
                lost = &mut proof => return Err(lost),
            };
            let Some(response) = message else { break };
            if response.canceled() {
                let reason = match response.compact_revision() {
                    0 => response.cancel_reason().to_owned(),
                    compacted => format!("history compacted at revision {compacted}"),
                };
                return Err(RoundError::Cancelled(reason));
            }
            let mut registry = lock(self.registry);
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let specs: Vec<usize> = registry.specs_for(kv.key()).collect();
                if specs.is_empty() {
                    continue;
                }
                for spec in specs {
                    let change = match event.event_type() {
                        EventType::Put => {
                            registry.put(spec, kv.key(), kv.value(), kv.mod_revision())
                        }
                        EventType::Delete => registry.delete(spec, kv.key()),
                    };
                    Self::report_with(self.metrics, kv.key(), change);
                }
                registry.advance(u64::try_from(kv.mod_revision()).unwrap_or(0));
            }
            // One watch response, one published revision.
            self.publish(&mut registry, &epoch);
        }
        Err(RoundError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::PageSizer;

    #[test]
    fn pages_grow_to_the_byte_budget_and_never_below_the_first() {
        let mut pages = PageSizer::new(5_000, 64 << 20);
        assert_eq!(pages.limit(), 5_000);
        // 5,000 keys of 128 bytes: the next page asks for 64 MiB of them.
        pages.listed(5_000, 5_000 * 128, u64::MAX);
        assert_eq!(pages.limit(), (64 << 20) / 128);
        // Half of what is left, when that is less.
        pages.listed(0, 0, 200_000);
        assert_eq!(pages.limit(), 100_000);
        pages.listed(0, 0, 20_001);
        assert_eq!(pages.limit(), 10_001);
        // Huge values: never fewer keys than the first page.
        pages.listed(1, 1 << 40, u64::MAX);
        assert_eq!(pages.limit(), 5_000);
        assert_eq!((pages.pages, pages.keys), (4, 5_001));
    }

    #[test]
    fn a_page_over_the_message_limit_shrinks_down_to_the_first_size() {
        let mut pages = PageSizer::new(1_000, 1 << 20);
        pages.listed(1_000, 1_000 * 64, u64::MAX);
        assert_eq!(pages.limit(), (1 << 20) / 64);
        assert!(pages.shrink());
        assert_eq!(pages.limit(), (1 << 20) / 128);
        while pages.shrink() {}
        assert_eq!(pages.limit(), 1_000);
        assert!(!pages.shrink(), "the first size is the floor");
        // The budget shrank with it.
        pages.listed(1_000, 1_000 * 64, u64::MAX);
        assert!(pages.limit() < (1 << 20) / 64);
    }

    #[test]
    fn a_large_page_gets_a_longer_deadline() {
        use super::page_deadline;
        use std::time::Duration;
        let timeout = Duration::from_secs(5);
        assert_eq!(page_deadline(timeout, 0), timeout);
        assert_eq!(page_deadline(timeout, 500_000), Duration::from_secs(10));
    }

    #[test]
    fn an_empty_listing_keeps_the_first_size() {
        let mut pages = PageSizer::new(0, 1 << 20);
        assert_eq!(pages.limit(), 1);
        pages.listed(0, 0, 0);
        assert!(pages.limit() >= 1);
    }
}
