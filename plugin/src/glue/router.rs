//! One worker's routing state (`role: router`), shared by its HTTP
//! contexts: the decoded tables and how they stay current (the notice on
//! the worker's own queue, the tick, one 16-byte version read), the
//! worker's numbering and gauges, and the counters flushed every
//! [`ROUTER_FLUSH`]. Services are read in slices ([`crate::reload`]), one
//! per refresh, on a [`LOAD_TICK`] while any are left. What happens to one
//! call, routed or held, is in [`super::call`].

use super::call::RouteCall;
use super::host::{
    clock_seed, log, now, now_ms, now_us, read_version, shared, update_shared, Metric,
};
use crate::config::RouterConfig;
use crate::feed::{queue_ids, with_queue, without_queue, QUEUES_KEY};
use crate::hold::{decode_max_wait, raise_max_wait, Hold, HoldCounts, MAX_WAIT_KEY};
use crate::outlier::{Ejections, FailureCounter};
use crate::reload::{Loader, SharedData, SLICE};
use crate::tables::WorkerTables;
use crate::{Version, EJECTIONS_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// How often workers flush their counters and let ejected endpoints back
/// (they check for new tables on every tick, `refresh_ms`).
const ROUTER_FLUSH: Duration = Duration::from_millis(500);
/// The tick while services are left to read (a full load, or a delta
/// larger than a slice): one slice ([`SLICE`], at most 5 ms) a tick, so the
/// worker thread is free at least 1 ms between slices for the calls waiting
/// on it, and a load of 100,000 services (~70 slices) ends in well under a
/// second instead of ~70 `refresh_ms` ticks (7 s at the default 100 ms).
/// The tick goes back to `refresh_ms` when nothing is left.
const LOAD_TICK: Duration = Duration::from_millis(1);

/// One worker's routing state, shared by its HTTP contexts.
pub(super) struct Router {
    shared: Rc<WorkerState>,
    routed: Metric,
    no_endpoint: Metric,
    ejections: Metric,
    refresh_us: Metric,
    load_ms: Metric,
    notices: Metric,
    held: Metric,
    held_timed_out: Metric,
    no_tables: Metric,
    held_max_wait: Metric,
    /// The root context's id.
    root_id: u32,
    /// When the counters were last flushed.
    flushed: SystemTime,
    /// When slow start last stepped (host clock, ms).
    stepped_ms: u64,
}

thread_local! {
    /// This VM's worker number, for its gauges (a VM is one worker's).
    /// Kept in the VM, not the root context: the root context a reload
    /// makes in the same VM keeps the same gauges, and the old root
    /// context's gauges are not left behind, frozen, next to them.
    static WORKER_NUMBER: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Shared-data key counting the router VMs that route, so each has a
/// number for its gauges.
const WORKER_COUNT_KEY: &str = "etcd-mesh/workers";
/// Shared-data key counting the router VMs configured, so each has a queue
/// name of its own (registering a name twice replaces the first).
const QUEUE_COUNT_KEY: &str = "etcd-mesh/queue-names";
/// How often a worker whose notification queue could not be registered
/// checks for new tables.
const UNNOTIFIED_REFRESH: Duration = Duration::from_millis(5);

/// The next number of the counter under `key` (from 0).
fn next_number(key: &str) -> u64 {
    let taken = Cell::new(0);
    let counted = update_shared(key, |bytes| {
        let count = bytes
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        taken.set(count);
        Some((count + 1).to_le_bytes().to_vec())
    });
    if counted.is_err() {
        log(
            LogLevel::Warn,
            &format!("etcd-mesh: cannot count {key:?}; numbers may repeat"),
        );
    }
    taken.get()
}

/// Registers this worker's notification queue and lists it for the poller.
fn register_worker_queue() -> Result<u32, String> {
    let name = format!("etcd-mesh/queue/{}", next_number(QUEUE_COUNT_KEY));
    let id = hostcalls::register_shared_queue(&name)
        .map_err(|status| format!("cannot register the queue {name:?}: {status:?}"))?;
    update_shared(QUEUES_KEY, |bytes| Some(with_queue(bytes, id)))
        .map_err(|status| format!("cannot list the queue {name:?}: {status:?}"))?;
    show_queues();
    Ok(id)
}

/// Sets the gauge of the queues the poller notifies.
fn show_queues() {
    if let Ok((Some(bytes), _)) = hostcalls::get_shared_data(QUEUES_KEY) {
        Metric::define(MetricType::Gauge, "etcd_mesh.worker_queues")
            .set(queue_ids(&bytes).count() as u64);
    }
}

/// The loader's view of proxy-wasm shared data.
pub(super) struct HostShared;

impl SharedData for HostShared {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        shared(key)
    }
}

/// What the calls of one worker share.
pub(super) struct WorkerState {
    pub(super) config: RouterConfig,
    pub(super) tables: RefCell<WorkerTables>,
    /// What is left to read (a full load, a large delta): the tables answer
    /// calls meanwhile, a call reading the one service it needs
    /// ([`super::call`]).
    pub(super) loader: RefCell<Loader>,
    /// The version last read from shared data, applied or not: a body that
    /// fails to decode is not decoded again on every call.
    seen: Cell<Version>,
    pub(super) failures: RefCell<FailureCounter>,
    pub(super) routed: Cell<u64>,
    pub(super) no_endpoint: Cell<u64>,
    pub(super) ejections: Cell<u64>,
    /// The longest refresh step since the last flush (µs).
    refresh_us: Cell<Option<u64>>,
    /// How long the last full load took, start to end (ms), until flushed.
    load_ms: Cell<Option<u64>>,
    /// Whether the tick is [`LOAD_TICK`], for services left to read.
    fast_tick: Cell<bool>,
    /// This worker's gauges, set when its tables change and are whole (not
    /// while services are left to read): the revision and digest it routes
    /// with. Made at the first refresh that leaves them whole: a router
    /// root context that never ticks (Envoy keeps one on the main thread)
    /// gets none, so every gauge there is belongs to a worker that routes.
    /// Named by the VM's [`WORKER_NUMBER`].
    worker_gauges: Cell<Option<(Metric, Metric)>>,
    /// The last refresh error logged, so a lasting one is logged once.
    last_error: RefCell<Option<String>>,
    /// The queue the poller notifies this worker on.
    queue: Cell<QueueState>,
    /// The calls waiting for the first tables.
    pub(super) hold: RefCell<Hold>,
    /// (service, endpoint) of each call that was held and then routed,
    /// by context id, for outlier detection: the root context routed it,
    /// so the call's own context does not have it.
    pub(super) resumed: RefCell<HashMap<u32, (String, String)>>,
}

impl Router {
    pub(super) fn new(config: RouterConfig, root_id: u32) -> Router {
        let policy = config.policy();
        let hold = Hold::new(config.hold_until_tables_ms);
        Router {
            shared: Rc::new(WorkerState {
                config,
                tables: RefCell::new(WorkerTables::new(clock_seed(), policy)),
                loader: RefCell::default(),
                seen: Cell::new(Version::default()),
                failures: RefCell::default(),
                routed: Cell::new(0),
                no_endpoint: Cell::new(0),
                ejections: Cell::new(0),
                refresh_us: Cell::new(None),
                load_ms: Cell::new(None),
                fast_tick: Cell::new(false),
                worker_gauges: Cell::new(None),
                last_error: RefCell::new(None),
                queue: Cell::new(QueueState::Unregistered),
                hold: RefCell::new(hold),
                resumed: RefCell::default(),
            }),
            routed: Metric::define(MetricType::Counter, "etcd_mesh.calls_routed"),
            no_endpoint: Metric::define(MetricType::Counter, "etcd_mesh.calls_no_endpoint"),
            ejections: Metric::define(MetricType::Counter, "etcd_mesh.ejections"),
            refresh_us: Metric::define(MetricType::Gauge, "etcd_mesh.table_refresh_us"),
            load_ms: Metric::define(MetricType::Gauge, "etcd_mesh.table_load_ms"),
            notices: Metric::define(MetricType::Counter, "etcd_mesh.table_notices"),
            held: Metric::define(MetricType::Counter, "etcd_mesh.calls_held"),
            held_timed_out: Metric::define(MetricType::Counter, "etcd_mesh.calls_held_timed_out"),
            no_tables: Metric::define(MetricType::Counter, "etcd_mesh.calls_no_tables"),
            held_max_wait: Metric::define(MetricType::Gauge, "etcd_mesh.calls_held_max_wait_ms"),
            root_id,
            flushed: UNIX_EPOCH,
            stepped_ms: 0,
        }
    }

    /// The poller (or an ejecting worker) says the version moved: drain
    /// the queue, then refresh at once.
    pub(super) fn on_notice(&self, queue_id: u32) {
        if self.shared.queue.get() != QueueState::Listed(queue_id) {
            return;
        }
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        self.notices.add(1);
        self.shared.refresh();
        self.shared.settle_held(self.root_id);
    }

    /// Unlists and empties this root context's queue.
    pub(super) fn retire(&self) {
        let QueueState::Listed(id) = self.shared.queue.replace(QueueState::Unavailable) else {
            return;
        };
        if let Err(status) = update_shared(QUEUES_KEY, |bytes| without_queue(bytes, id)) {
            log(
                LogLevel::Warn,
                &format!("etcd-mesh: cannot unlist the notification queue {id}: {status:?}"),
            );
        }
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(id) {}
        show_queues();
    }

    pub(super) fn call(&self, id: u32) -> RouteCall {
        RouteCall {
            shared: Rc::clone(&self.shared),
            id,
            held: false,
            picked: None,
        }
    }

    /// Counts what was held; the longest wait is kept in shared data, so
    /// the gauge shows the longest over every worker.
    fn flush_hold(&self, counts: HoldCounts) {
        self.held.add(counts.held);
        self.held_timed_out.add(counts.timed_out);
        self.no_tables.add(counts.no_tables);
        if let Some(wait) = counts.max_wait_ms {
            let _ = update_shared(MAX_WAIT_KEY, |bytes| raise_max_wait(bytes, wait));
            let longest = hostcalls::get_shared_data(MAX_WAIT_KEY)
                .ok()
                .and_then(|(bytes, _)| bytes)
                .map_or(wait, |bytes| decode_max_wait(Some(&bytes)).max(wait));
            self.held_max_wait.set(longest);
        }
    }

    /// Every tick: new tables or ejections, if the version moved (one
    /// 16-byte read per tick instead of one per call). Every
    /// [`ROUTER_FLUSH`]: the per-call counters, kept in the VM because a
    /// stats host call on every request would cost as much as the pick.
    pub(super) fn on_tick(&mut self) {
        let shared = &self.shared;
        shared.ensure_queue();
        shared.refresh();
        // Held calls go as soon as tables are in, or at their limit.
        shared.settle_held(self.root_id);
        // Slow start moves in steps of one tick (`refresh_ms`), not of the
        // short tick of a load.
        let stepped = now_ms();
        let step_ms = u64::from(shared.config.refresh_ms);
        if !shared.fast_tick.get() || stepped.saturating_sub(self.stepped_ms) >= step_ms {
            self.stepped_ms = stepped;
            shared.tables.borrow_mut().step_slow_start(stepped);
        }
        let now = now();
        if now.duration_since(self.flushed).unwrap_or_default() < ROUTER_FLUSH {
            return;
        }
        self.flushed = now;
        self.routed.add(shared.routed.take());
        self.no_endpoint.add(shared.no_endpoint.take());
        self.ejections.add(shared.ejections.take());
        if let Some(us) = shared.refresh_us.take() {
            self.refresh_us.set(us);
        }
        if let Some(ms) = shared.load_ms.take() {
            self.load_ms.set(ms);
        }
        let counts = shared.hold.borrow_mut().take_counts();
        if counts != HoldCounts::default() {
            self.flush_hold(counts);
        }
        if shared.config.outlier_detection.is_some() {
            shared.tables.borrow_mut().expire_ejections(now_ms());
        }
    }
}

/// Where a worker's notification queue stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QueueState {
    /// Not registered yet.
    Unregistered,
    /// Registered, and listed for the poller.
    Listed(u32),
    /// Could not be registered, or unlisted: the tick checks instead.
    Unavailable,
}

impl WorkerState {
    /// Registers and lists this worker's notification queue, once. Not in
    /// `on_configure`: Envoy configures every new plugin configuration
    /// once in a throwaway VM first (its canary), which is destroyed
    /// without `on_done` and never ticks; a queue registered there would
    /// stay listed, notified and never read. So the queue comes with the
    /// first tick, or the first call held (which waits for the notice).
    pub(super) fn ensure_queue(&self) {
        if self.queue.get() != QueueState::Unregistered {
            return;
        }
        match register_worker_queue() {
            Ok(id) => self.queue.set(QueueState::Listed(id)),
            Err(e) => {
                self.queue.set(QueueState::Unavailable);
                log(
                    LogLevel::Warn,
                    &format!("etcd-mesh: {e}; checking for new tables every {UNNOTIFIED_REFRESH:?} instead"),
                );
                // A load under way keeps its shorter tick until it ends.
                if !self.fast_tick.get() {
                    let _ = hostcalls::set_tick_period(self.normal_tick());
                }
            }
        }
    }

    /// The tick without a load: `refresh_ms`, shorter when no notice comes.
    fn normal_tick(&self) -> Duration {
        let tick = Duration::from_millis(u64::from(self.config.refresh_ms));
        match self.queue.get() {
            QueueState::Unavailable => tick.min(UNNOTIFIED_REFRESH),
            _ => tick,
        }
    }

    /// [`LOAD_TICK`] while services are left to read, the normal tick
    /// otherwise.
    /// From a call's context the host sets its root context's tick.
    fn set_load_tick(&self, loading: bool) {
        if self.fast_tick.get() == loading {
            return;
        }
        let tick = if loading {
            LOAD_TICK
        } else {
            self.normal_tick()
        };
        match hostcalls::set_tick_period(tick) {
            Ok(()) => self.fast_tick.set(loading),
            Err(status) => log(
                LogLevel::Warn,
                &format!("etcd-mesh: cannot set the tick to {tick:?}: {status:?}"),
            ),
        }
    }

    /// Re-reads the tables or the ejections when, and only when, their
    /// part of the version changed, and reads one slice of the services
    /// left to read. A part that could not be read is not marked seen, so the
    /// next call tries again.
    pub(super) fn refresh(&self) {
        let Some(version) = read_version() else {
            return;
        };
        let mut seen = self.seen.get();
        let moved = version.tables != seen.tables;
        if moved || self.loader.borrow().is_loading() {
            match self.refresh_tables(moved) {
                Ok(()) => {
                    seen.tables = version.tables;
                    self.last_error.replace(None);
                }
                Err(e) => {
                    if self.last_error.borrow().as_deref() != Some(e.as_str()) {
                        log(LogLevel::Error, &format!("etcd-mesh: shared tables: {e}"));
                        self.last_error.replace(Some(e));
                    }
                }
            }
        }
        if version.ejections != seen.ejections {
            let list = match hostcalls::get_shared_data(EJECTIONS_KEY) {
                Ok((Some(bytes), _)) => Ejections::decode(&bytes),
                _ => Ejections::default(),
            };
            let now = now_ms();
            let active = list
                .active(now)
                .map(|e| (e.service.clone(), e.addr.clone(), e.until_ms));
            self.tables.borrow_mut().set_ejections(active, now);
            seen.ejections = version.ejections;
        }
        self.seen.set(seen);
    }

    /// Marks the services changed since the update this worker holds when
    /// `moved`, or begins a full load when it is too far behind; then reads
    /// one slice of what is left. The worker's gauges say the
    /// revision and digest held only when the tables are whole.
    fn refresh_tables(&self, moved: bool) -> Result<(), String> {
        let started = now_us();
        let mut tables = self.tables.borrow_mut();
        let mut loader = self.loader.borrow_mut();
        let result = loader.refresh(&mut tables, &HostShared, moved, &mut now_us, SLICE);
        let loading = loader.is_loading();
        drop(loader);
        let took = now_us().saturating_sub(started);
        let longest = self.refresh_us.get().map_or(took, |us| us.max(took));
        self.refresh_us.set(Some(longest));
        self.set_load_tick(loading);
        let refreshed = result?;
        if let Some(revision) = refreshed.current {
            let (revision_gauge, digest_gauge) = self.worker_gauges();
            revision_gauge.set(revision);
            digest_gauge.set(tables.digest().value());
        }
        if let Some(ms) = refreshed.loaded_in_ms {
            self.load_ms.set(Some(ms));
        }
        // Said only of a load that took more than one slice.
        if let (Some(ms), false) = (refreshed.loaded_in_ms, refreshed.load_started) {
            log(
                LogLevel::Info,
                &format!(
                    "etcd-mesh: worker loaded {} services in {ms} ms, in slices",
                    tables.len()
                ),
            );
        }
        // A value that does not decode keeps its service as it was; it is
        // not read again until it changes.
        for e in refreshed.errors {
            log(LogLevel::Error, &format!("etcd-mesh: shared tables: {e}"));
        }
        Ok(())
    }

    /// This worker's (revision, digest) gauges, made the first time.
    fn worker_gauges(&self) -> (Metric, Metric) {
        self.worker_gauges.get().unwrap_or_else(|| {
            let worker = WORKER_NUMBER.with(|number| {
                let worker = number
                    .get()
                    .unwrap_or_else(|| next_number(WORKER_COUNT_KEY));
                number.set(Some(worker));
                worker
            });
            let gauge = |what: &str| {
                Metric::define(
                    MetricType::Gauge,
                    &format!("etcd_mesh.worker_{worker}.{what}"),
                )
            };
            let gauges = (gauge("table_revision"), gauge("table_digest"));
            self.worker_gauges.set(Some(gauges));
            gauges
        })
    }
}
