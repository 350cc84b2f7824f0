//! The proxy-wasm glue: thin contexts over the pure modules.
//!
//! Host calls go through `proxy_wasm::hostcalls`, whose `Result`s are
//! handled here, rather than the trait helpers, which panic on host errors.
//! A panic would take the VM, and every call of this worker, down with it.
//!
//! Per call the router makes two host calls: the header that names the
//! service and the override (filter state or header); a failed call
//! (a trailers-only reply) adds the read of its `grpc-status`, and an
//! `UNAVAILABLE` two property reads that tell a connect failure. New tables
//! reach a worker through a notice on its own shared queue (and a slow
//! tick catches a notice missed), never through a check per call, and
//! everything else happens only when something changed.
//!
//! A call that comes before the worker has its first tables is paused and
//! remembered by its context id ([`Hold`]); when the tables arrive (the
//! notice on the worker's queue, or its tick) the root context routes each
//! held call through that id (`set_effective_context`) and resumes it, and
//! a call held for `hold_until_tables_ms` is answered `UNAVAILABLE`.

use crate::config::{
    HostOverride, NoopCall as NoopCallKind, NoopConfig, OutlierConfig, PluginConfig, PollerConfig,
    RouterConfig, ServiceFrom,
};
use crate::feed::{
    index_names, queue_ids, service_key, with_queue, without_queue, ChangeLog, PollerTables,
    CHANGES_KEY, INDEX_KEY, QUEUES_KEY,
};
use crate::filter_state::{original_dst_arguments, support_probes, SET_FILTER_STATE};
use crate::hold::{decode_max_wait, raise_max_wait, Admit, Hold, HoldCounts, MAX_WAIT_KEY};
use crate::naming::{service_from_authority, service_from_grpc_path};
use crate::outlier::{failure_kind, is_failure, EjectReason, Ejections, FailureCounter, Outcome};
use crate::replicas::{Call, Replicas, Why};
use crate::tables::{Pick, WorkerTables};
use crate::{Version, EJECTIONS_KEY, VERSION_KEY};
use etcd_mesh_wire::{Changes, Status as ServerStatus};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{
    Action, BufferType, ContextType, GrpcStatusCode, LogLevel, MapType, MetricType, Status,
};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
        Box::new(MeshRoot { id, role: None })
    });
}}

/// How often the poller checks whether a poll (after a backoff) or a status
/// probe is due: probes every `probe_ms` go out within a tick of it.
const POLLER_TICK: Duration = Duration::from_millis(100);
/// The path of a sync-server replica's status.
const STATUS_PATH: &str = "/v1/status";
/// The most calls the poller sends at once.
const SENDS_PER_DRIVE: usize = 256;
/// How often workers flush their counters and let ejected endpoints back
/// (they check for new tables on every tick, `refresh_ms`).
const ROUTER_FLUSH: Duration = Duration::from_millis(500);
/// The header the ORIGINAL_DST cluster reads in `header` override mode.
const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Whether this Envoy has what the filter-state override needs; when it
/// does not, says which piece is missing, and the plugin refuses to load
/// rather than let calls fail one by one.
fn envoy_supports_override() -> bool {
    for (arguments, missing) in support_probes() {
        if let Err(Status::NotFound) =
            hostcalls::call_foreign_function(SET_FILTER_STATE, Some(&arguments))
        {
            log(
                LogLevel::Critical,
                &format!("etcd-mesh: {missing}; use an Envoy from 1.36 on, or \"host_override\": \"header\""),
            );
            return false;
        }
    }
    true
}

fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
}

fn now_ms() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The host clock in nanoseconds: the seed of each VM's randomness (the
/// wasm32-unknown-unknown target has no other source).
fn clock_seed() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The host clock in microseconds, for measuring how long work took.
fn now_us() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A shared-data value; `Ok(None)` when the key holds nothing yet.
fn shared(key: &str) -> Result<Option<Vec<u8>>, String> {
    hostcalls::get_shared_data(key)
        .map(|(value, _)| value)
        .map_err(|status| format!("cannot read shared data {key:?}: {status:?}"))
}

fn set_shared(key: &str, value: &[u8]) -> Result<(), String> {
    hostcalls::set_shared_data(key, Some(value), None)
        .map_err(|status| format!("shared data refused {key:?}: {status:?}"))
}

/// Reads, changes and writes a shared-data value, retrying when another
/// VM wrote in between. `change` returns `None` to leave it as it is.
fn update_shared(
    key: &str,
    change: impl Fn(Option<&[u8]>) -> Option<Vec<u8>>,
) -> Result<bool, Status> {
    for _ in 0..16 {
        let (value, cas) = hostcalls::get_shared_data(key)?;
        let Some(new) = change(value.as_deref()) else {
            return Ok(false);
        };
        match hostcalls::set_shared_data(key, Some(&new), cas) {
            Ok(()) => return Ok(true),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Status::CasMismatch)
}

fn read_version() -> Option<Version> {
    match hostcalls::get_shared_data(VERSION_KEY) {
        Ok((Some(bytes), _)) => Version::decode(&bytes),
        _ => None,
    }
}

fn bump_version(change: impl Fn(&mut Version)) -> Result<bool, Status> {
    update_shared(VERSION_KEY, |bytes| {
        let mut version = bytes.and_then(Version::decode).unwrap_or_default();
        change(&mut version);
        Some(version.encode().to_vec())
    })
}

/// A stat in Envoy (`wasmcustom.<name>`), or nothing if the host refused it.
#[derive(Clone, Copy)]
struct Metric(Option<u32>);

impl Metric {
    fn define(kind: MetricType, name: &str) -> Metric {
        Metric(hostcalls::define_metric(kind, name).ok())
    }
    fn add(self, delta: u64) {
        if let (Some(id), true) = (self.0, delta > 0) {
            let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
        }
    }
    fn set(self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

struct MeshRoot {
    /// This root context's id: the effective context again after held
    /// calls were resumed through theirs.
    id: u32,
    role: Option<Role>,
}

enum Role {
    Poller(Box<Poller>),
    Router(Router),
    Noop(Rc<NoopCall>),
}

impl Context for MeshRoot {
    /// The root context ends: after a configuration reload, once the old
    /// filter chain has drained (the VM stays, with the new configuration's
    /// root context). A router's queue is unlisted, so the poller stops
    /// notifying a queue nobody reads.
    fn on_done(&mut self) -> bool {
        if let Some(Role::Router(router)) = &self.role {
            router.retire();
        }
        true
    }

    fn on_http_call_response(&mut self, token: u32, _: usize, body_size: usize, _: usize) {
        if let Some(Role::Poller(poller)) = &mut self.role {
            poller.on_response(token, body_size);
        }
    }
}

impl RootContext for MeshRoot {
    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let config = match PluginConfig::parse(&bytes) {
            Ok(config) => config,
            Err(e) => {
                log(LogLevel::Critical, &format!("etcd-mesh: {e}"));
                return false;
            }
        };
        let (role, tick) = match config {
            PluginConfig::Poller(config) => {
                (Role::Poller(Box::new(Poller::new(config))), POLLER_TICK)
            }
            PluginConfig::Router(config) => {
                if config.host_override == HostOverride::FilterState && !envoy_supports_override() {
                    return false;
                }
                let tick = Duration::from_millis(u64::from(config.refresh_ms));
                // The notification queue is registered on the first tick
                // (or held call), not here: see `WorkerState::ensure_queue`.
                (Role::Router(Router::new(config, self.id)), tick)
            }
            PluginConfig::Noop(config) => {
                (Role::Noop(Rc::new(NoopCall::new(config))), Duration::ZERO)
            }
        };
        self.role = Some(role);
        if tick > Duration::ZERO && hostcalls::set_tick_period(tick).is_err() {
            log(LogLevel::Critical, "etcd-mesh: cannot set the tick period");
            return false;
        }
        true
    }

    fn on_tick(&mut self) {
        match &mut self.role {
            Some(Role::Poller(poller)) => poller.on_tick(),
            Some(Role::Router(router)) => router.on_tick(),
            Some(Role::Noop(_)) | None => {}
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if let Some(Role::Router(router)) = &self.role {
            router.on_notice(queue_id);
        }
    }

    fn create_http_context(&self, id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.role {
            Some(Role::Router(router)) => Some(Box::new(router.call(id))),
            Some(Role::Noop(noop)) => Some(Box::new(NoopContext(Rc::clone(noop)))),
            // The poller is not a filter: a filter chain that loads it by
            // mistake gets no context.
            _ => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The singleton that keeps shared data up to date, following one
/// sync-server replica ([`Replicas`] decides which, and when to move).
struct Poller {
    replicas: Replicas,
    tables: PollerTables,
    /// When sync-server last answered (200 or 304).
    last_answer: Option<SystemTime>,
    /// (replica, stale) as the gauges last showed them.
    shown: Option<(usize, bool)>,
    succeeded: Metric,
    failed: Metric,
    revision: Metric,
    age: Metric,
    digest: Metric,
    services: Metric,
    apply_us: Metric,
    updates_full: Metric,
    updates_delta: Metric,
    replica: Metric,
    switches: Metric,
    stale: Metric,
    probes_failed: Metric,
}

impl Poller {
    fn new(config: PollerConfig) -> Poller {
        Poller {
            replicas: Replicas::new(config, clock_seed()),
            tables: PollerTables::default(),
            last_answer: None,
            shown: None,
            succeeded: Metric::define(MetricType::Counter, "etcd_mesh.polls_succeeded"),
            failed: Metric::define(MetricType::Counter, "etcd_mesh.polls_failed"),
            revision: Metric::define(MetricType::Gauge, "etcd_mesh.table_revision"),
            age: Metric::define(MetricType::Gauge, "etcd_mesh.table_age_ms"),
            digest: Metric::define(MetricType::Gauge, "etcd_mesh.table_digest"),
            services: Metric::define(MetricType::Gauge, "etcd_mesh.table_services"),
            apply_us: Metric::define(MetricType::Gauge, "etcd_mesh.poll_apply_us"),
            updates_full: Metric::define(MetricType::Counter, "etcd_mesh.updates_full"),
            updates_delta: Metric::define(MetricType::Counter, "etcd_mesh.updates_delta"),
            replica: Metric::define(MetricType::Gauge, "etcd_mesh.sync_replica"),
            switches: Metric::define(MetricType::Counter, "etcd_mesh.replica_switches"),
            stale: Metric::define(MetricType::Gauge, "etcd_mesh.sync_stale"),
            probes_failed: Metric::define(MetricType::Counter, "etcd_mesh.probes_failed"),
        }
    }

    fn on_tick(&mut self) {
        let now = now();
        if let Some(answered) = self.last_answer {
            let age = now.duration_since(answered).unwrap_or_default();
            self.age.set(age.as_millis() as u64);
        }
        let held_epoch = self.tables.cursor().map(|(_, epoch, _)| epoch);
        self.replicas.expire(now_ms(), held_epoch);
        self.drive();
    }

    /// Sends every call due, then shows where the poller stands.
    fn drive(&mut self) {
        let now_ms = now_ms();
        // The bound only guards a bug: a call not sent now stays due.
        for _ in 0..SENDS_PER_DRIVE {
            let Some(call) = self.replicas.next_call(now_ms) else {
                break;
            };
            self.send(call);
        }
        for switch in self.replicas.take_switches() {
            self.switches.add(1);
            // A failed poll's warning already names where the next goes.
            if switch.why != Why::Failed {
                log(
                    LogLevel::Info,
                    &format!(
                        "etcd-mesh: following sync-server replica {} ({}) instead of {} ({}): {}",
                        switch.to,
                        self.replicas.cluster(switch.to),
                        switch.from,
                        self.replicas.cluster(switch.from),
                        switch.why
                    ),
                );
            }
        }
        let shown = (self.replicas.current(), self.replicas.stale());
        if self.shown != Some(shown) {
            self.replica.set(shown.0 as u64);
            self.stale.set(u64::from(shown.1));
            self.shown = Some(shown);
        }
    }

    fn send(&mut self, call: Call) {
        let schedule = self.replicas.schedule();
        let config = schedule.config();
        let (path, timeout) = match call {
            Call::Poll { .. } => (schedule.path(self.tables.cursor()), schedule.timeout()),
            Call::Check { .. } | Call::Survey { .. } => (
                STATUS_PATH.to_owned(),
                Duration::from_millis(u64::from(config.probe_timeout_ms)),
            ),
        };
        let authorization = config.bearer_token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", config.authority.as_str()),
        ];
        if let Some(value) = &authorization {
            headers.push(("authorization", value.as_str()));
        }
        let cluster = self.replicas.cluster(call.replica());
        match hostcalls::dispatch_http_call(cluster, headers, None, vec![], timeout) {
            Ok(token) => self.replicas.sent(call, token),
            Err(status) => {
                let error = format!("cannot be called: {status:?}");
                match call {
                    Call::Poll { .. } => self.fail(call, &error),
                    Call::Check { .. } | Call::Survey { .. } => self.probe_failed(call, &error),
                }
            }
        }
    }

    fn on_response(&mut self, token: u32, body_size: usize) {
        // Answers of calls abandoned (a replica left) are not wanted.
        let Some(call) = self.replicas.take(token) else {
            return;
        };
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        let body = || {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        match call {
            Call::Poll { .. } => match status.as_deref() {
                Some("200") => match self.store(&body()) {
                    Ok(stale) => self.succeed(Some(stale)),
                    Err(e) => self.fail(call, &format!("sent {e}")),
                },
                Some("304") => self.succeed(None),
                Some(other) => self.fail(call, &format!("answered {other}")),
                None => self.fail(call, "did not answer (timeout or reset)"),
            },
            Call::Check { .. } | Call::Survey { .. } => {
                let outcome = match status.as_deref() {
                    Some("200") => ServerStatus::decode(&body()).map_err(|e| format!("sent {e}")),
                    Some(other) => Err(format!("answered {other}")),
                    None => Err("did not answer (timeout or reset)".into()),
                };
                match outcome {
                    Ok(server) => {
                        let held_epoch = self.tables.cursor().map(|(_, epoch, _)| epoch);
                        self.replicas
                            .probed(call, now_ms(), Some(&server), held_epoch);
                    }
                    Err(e) => self.probe_failed(call, &e),
                }
            }
        }
        self.drive();
    }

    /// Validates a change-feed answer and, if it is newer, writes what
    /// changed to shared data: the services, the index when names came or
    /// went, the change log, then the version workers watch. Returns
    /// whether the replica says it is stale.
    fn store(&mut self, body: &[u8]) -> Result<bool, String> {
        let started = now_us();
        let changes = Changes::decode(body).map_err(|e| e.to_string())?;
        let (revision, stale) = (changes.revision, changes.stale);
        // A stale answer is still applied when newer: it is the best known
        // until a fresher replica is found.
        let Some(update) = self.tables.apply(changes)? else {
            return Ok(stale);
        };
        let written = (|| {
            for (name, value) in &update.services {
                set_shared(&service_key(name), value)?;
            }
            if let Some(index) = &update.index {
                set_shared(INDEX_KEY, index)?;
            }
            set_shared(CHANGES_KEY, &update.log)?;
            bump_version(|v| v.tables = update.seq)
                .map(drop)
                .map_err(|status| format!("shared data refused the version: {status:?}"))
        })();
        if written.is_ok() {
            notify_workers();
        }
        if let Err(e) = written {
            // Start over from a full answer, which rewrites every service.
            self.tables.forget_cursor();
            return Err(e);
        }
        self.revision.set(revision);
        self.digest.set(self.tables.digest().value());
        self.services.set(self.tables.services() as u64);
        self.apply_us.set(now_us().saturating_sub(started));
        if update.full {
            self.updates_full.add(1);
        } else {
            self.updates_delta.add(1);
        }
        Ok(stale)
    }

    /// The poll answered; the next goes out at once (from [`Self::drive`]).
    fn succeed(&mut self, stale: Option<bool>) {
        self.succeeded.add(1);
        self.last_answer = Some(now());
        self.replicas.poll_answered(now_ms(), stale);
    }

    fn fail(&mut self, call: Call, error: &str) {
        self.failed.add(1);
        let now_ms = now_ms();
        self.replicas.poll_failed(now_ms);
        let delay = self.replicas.next_poll_in(now_ms);
        let when = if delay.is_zero() {
            "at once".to_owned()
        } else {
            format!("in {delay:?}")
        };
        log(
            LogLevel::Warn,
            &format!(
                "etcd-mesh: sync-server replica {} ({}) {error}; keeping the tables held, next poll to {} {when}",
                call.replica(),
                self.replicas.cluster(call.replica()),
                self.replicas.cluster(self.replicas.current()),
            ),
        );
    }

    /// A status probe failed: of the replica followed, it is hung (and
    /// left); of a search, that replica is not chosen.
    fn probe_failed(&mut self, call: Call, error: &str) {
        self.probes_failed.add(1);
        // A search's failures repeat every `probe_ms` while replicas are
        // down; the switch it leads to is logged on its own.
        let (level, what) = match call {
            Call::Check { .. } => (LogLevel::Warn, "; leaving it and its long-poll"),
            _ => (LogLevel::Debug, ""),
        };
        log(
            level,
            &format!(
                "etcd-mesh: the status probe of sync-server replica {} ({}) {error}{what}",
                call.replica(),
                self.replicas.cluster(call.replica()),
            ),
        );
        let held_epoch = self.tables.cursor().map(|(_, epoch, _)| epoch);
        self.replicas.probed(call, now_ms(), None, held_epoch);
    }
}

/// One worker's routing state, shared by its HTTP contexts.
struct Router {
    shared: Rc<WorkerState>,
    routed: Metric,
    no_endpoint: Metric,
    ejections: Metric,
    refresh_us: Metric,
    notices: Metric,
    held: Metric,
    held_timed_out: Metric,
    no_tables: Metric,
    held_max_wait: Metric,
    /// The root context's id.
    root_id: u32,
    /// When the counters were last flushed.
    flushed: SystemTime,
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

/// Tells every worker that the version moved (best effort: a worker that
/// misses it catches up on its tick).
fn notify_workers() {
    if let Ok((Some(bytes), _)) = hostcalls::get_shared_data(QUEUES_KEY) {
        for id in queue_ids(&bytes) {
            let _ = hostcalls::enqueue_shared_queue(id, Some(&[]));
        }
    }
}

/// What the calls of one worker share.
struct WorkerState {
    config: RouterConfig,
    tables: RefCell<WorkerTables>,
    /// The version last read from shared data, applied or not: a body that
    /// fails to decode is not decoded again on every call.
    seen: Cell<Version>,
    failures: RefCell<FailureCounter>,
    routed: Cell<u64>,
    no_endpoint: Cell<u64>,
    ejections: Cell<u64>,
    refresh_us: Cell<Option<u64>>,
    /// This worker's gauges, set when its tables change: the revision and
    /// digest it routes with. Made at the first refresh: a router root
    /// context that never ticks (Envoy keeps one on the main thread) gets
    /// none, so every gauge there is belongs to a worker that routes.
    /// Named by the VM's [`WORKER_NUMBER`].
    worker_gauges: Cell<Option<(Metric, Metric)>>,
    /// The last refresh error logged, so a lasting one is logged once.
    last_error: RefCell<Option<String>>,
    /// The queue the poller notifies this worker on.
    queue: Cell<QueueState>,
    /// The calls waiting for the first tables.
    hold: RefCell<Hold>,
    /// (service, endpoint) of each call that was held and then routed,
    /// by context id, for outlier detection: the root context routed it,
    /// so the call's own context does not have it.
    resumed: RefCell<HashMap<u32, (String, String)>>,
}

impl Router {
    fn new(config: RouterConfig, root_id: u32) -> Router {
        let policy = config.policy();
        let hold = Hold::new(config.hold_until_tables_ms);
        Router {
            shared: Rc::new(WorkerState {
                config,
                tables: RefCell::new(WorkerTables::new(clock_seed(), policy)),
                seen: Cell::new(Version::default()),
                failures: RefCell::default(),
                routed: Cell::new(0),
                no_endpoint: Cell::new(0),
                ejections: Cell::new(0),
                refresh_us: Cell::new(None),
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
            notices: Metric::define(MetricType::Counter, "etcd_mesh.table_notices"),
            held: Metric::define(MetricType::Counter, "etcd_mesh.calls_held"),
            held_timed_out: Metric::define(MetricType::Counter, "etcd_mesh.calls_held_timed_out"),
            no_tables: Metric::define(MetricType::Counter, "etcd_mesh.calls_no_tables"),
            held_max_wait: Metric::define(MetricType::Gauge, "etcd_mesh.calls_held_max_wait_ms"),
            root_id,
            flushed: UNIX_EPOCH,
        }
    }

    /// The poller (or an ejecting worker) says the version moved: drain
    /// the queue, then refresh at once.
    fn on_notice(&self, queue_id: u32) {
        if self.shared.queue.get() != QueueState::Listed(queue_id) {
            return;
        }
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        self.notices.add(1);
        self.shared.refresh();
        self.shared.settle_held(self.root_id);
    }

    /// Unlists and empties this root context's queue.
    fn retire(&self) {
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

    fn call(&self, id: u32) -> RouteCall {
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
    fn on_tick(&mut self) {
        let shared = &self.shared;
        shared.ensure_queue();
        shared.refresh();
        // Held calls go as soon as tables are in, or at their limit.
        shared.settle_held(self.root_id);
        // Slow start moves in steps of one tick (`refresh_ms`).
        shared.tables.borrow_mut().step_slow_start(now_ms());
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
    fn ensure_queue(&self) {
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
                let tick = Duration::from_millis(u64::from(self.config.refresh_ms));
                let _ = hostcalls::set_tick_period(tick.min(UNNOTIFIED_REFRESH));
            }
        }
    }

    /// Re-reads the tables or the ejections when, and only when, their
    /// part of the version changed. A part that could not be read is not
    /// marked seen, so the next call tries again.
    fn refresh(&self) {
        let Some(version) = read_version() else {
            return;
        };
        let mut seen = self.seen.get();
        if version.tables != seen.tables {
            match self.refresh_tables() {
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

    /// Re-reads the services changed since the update this worker holds,
    /// or all of them when it is too far behind.
    fn refresh_tables(&self) -> Result<(), String> {
        let started = now_us();
        let changes = match shared(CHANGES_KEY)? {
            Some(bytes) => ChangeLog::decode(&bytes)?,
            None => return Err("no change log in shared data yet".into()),
        };
        let mut tables = self.tables.borrow_mut();
        let now = now_ms();
        let mut bad = Vec::new();
        match changes.since(tables.seq()) {
            Some(names) => {
                for name in names {
                    let value = shared(&service_key(name))?.unwrap_or_default();
                    if let Err(e) = tables.apply_service(name, &value, now) {
                        bad.push(e);
                    }
                }
            }
            None => {
                let index = shared(INDEX_KEY)?.unwrap_or_default();
                let mut values = Vec::new();
                for name in index_names(&index) {
                    values.push((name, shared(&service_key(name))?.unwrap_or_default()));
                }
                bad = tables.reload(values, now);
            }
        }
        tables.set_seq(changes.latest());
        let (revision, digest) = self.worker_gauges.get().unwrap_or_else(|| {
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
        });
        revision.set(changes.revision());
        digest.set(tables.digest().value());
        // A value that does not decode keeps its service as it was; it is
        // not read again until it changes.
        for e in bad {
            log(LogLevel::Error, &format!("etcd-mesh: shared tables: {e}"));
        }
        self.refresh_us.set(Some(now_us().saturating_sub(started)));
        Ok(())
    }

    /// Picks the upstream of the call whose context is in effect and sets
    /// it (filter state or header), or answers the call.
    fn route(&self) -> Routed {
        let service = match self.service_name() {
            Ok(service) => service,
            Err(message) => {
                reply(GrpcStatusCode::Unimplemented, message);
                return Routed::Answered;
            }
        };
        let mut tables = self.tables.borrow_mut();
        let addr = match tables.pick(&service) {
            Pick::Endpoint(addr) => addr.to_owned(),
            Pick::NoEndpoint => {
                drop(tables);
                bump(&self.no_endpoint);
                reply(
                    grpc_status(self.config.no_endpoint_status),
                    &format!("etcd-mesh: no endpoint for service {service}"),
                );
                return Routed::Answered;
            }
        };
        let set = match self.config.host_override {
            HostOverride::FilterState => {
                hostcalls::call_foreign_function(SET_FILTER_STATE, tables.override_arguments(&addr))
                    .map(drop)
            }
            // Overwrites whatever the client sent.
            HostOverride::Header => hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                ORIGINAL_DST_HEADER,
                Some(&addr),
            ),
        };
        drop(tables);
        if let Err(status) = set {
            log(
                LogLevel::Error,
                &format!("etcd-mesh: cannot set the upstream address: {status:?}"),
            );
            reply(
                GrpcStatusCode::Unavailable,
                "etcd-mesh: cannot set the upstream",
            );
            return Routed::Answered;
        }
        bump(&self.routed);
        Routed::Upstream(
            self.config
                .outlier_detection
                .is_some()
                .then_some((service, addr)),
        )
    }

    /// The held calls: once this worker has tables, each is routed (or
    /// answered) through its own context and resumed; until then, those
    /// held for `hold_until_tables_ms` are answered. `back_to` is the
    /// context in effect again afterwards (the caller's).
    fn settle_held(&self, back_to: u32) {
        if self.hold.borrow().is_empty() {
            return;
        }
        let now = now_ms();
        if self.tables.borrow().seq().is_some() {
            let released = self.hold.borrow_mut().release(now);
            let mut resumed = 0;
            for id in &released {
                // A call whose context is gone was forgotten already; this
                // only guards against the host disagreeing.
                if hostcalls::set_effective_context(*id).is_err() {
                    continue;
                }
                if let Routed::Upstream(picked) = self.route() {
                    if let Some(picked) = picked {
                        self.resumed.borrow_mut().insert(*id, picked);
                    }
                    if hostcalls::resume_http_request().is_ok() {
                        resumed += 1;
                    }
                }
            }
            log(
                LogLevel::Info,
                &format!(
                    "etcd-mesh: the first tables are in; {} calls held for them go on ({resumed} routed)",
                    released.len()
                ),
            );
        } else {
            let expired = self.hold.borrow_mut().expire(now);
            if expired.is_empty() {
                return;
            }
            for (id, refusal) in &expired {
                if hostcalls::set_effective_context(*id).is_ok() {
                    reply(GrpcStatusCode::Unavailable, &refusal.message());
                }
            }
            log(
                LogLevel::Warn,
                &format!(
                    "etcd-mesh: {} calls answered UNAVAILABLE: no tables from sync-server within {} ms",
                    expired.len(),
                    self.config.hold_until_tables_ms
                ),
            );
        }
        let _ = hostcalls::set_effective_context(back_to);
    }

    /// The registry name of the call's service, if the request names one.
    fn service_name(&self) -> Result<String, &'static str> {
        let header = |name: &str| {
            hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
                .ok()
                .flatten()
        };
        let found = match &self.config.service_from {
            ServiceFrom::GrpcPath => header(":path")
                .and_then(|p| service_from_grpc_path(&p).map(str::to_owned))
                .ok_or("etcd-mesh: the request path names no gRPC service"),
            ServiceFrom::Authority => header(":authority")
                .and_then(|a| service_from_authority(&a).map(str::to_owned))
                .ok_or("etcd-mesh: the request has no :authority"),
            ServiceFrom::Header(name) => header(name)
                .filter(|v| !v.is_empty())
                .ok_or("etcd-mesh: the request lacks the header that names the service"),
        }?;
        Ok(match self.config.service_names.get(&found) {
            Some(mapped) => mapped.clone(),
            None => found,
        })
    }

    /// Counts a finished call; ejects its endpoint at the threshold, or at
    /// once for a connect failure (or a lost connection) when so configured.
    fn record(&self, outlier: &OutlierConfig, service: &str, addr: &str, outcome: Outcome) {
        let Some(reason) = self
            .failures
            .borrow_mut()
            .record(service, addr, outcome, outlier)
        else {
            return;
        };
        let (live, ejected) = self.tables.borrow().ejection_room(service);
        let now = now_ms();
        let made = RefCell::new(None);
        let written = update_shared(EJECTIONS_KEY, |bytes| {
            let mut list = bytes.map(Ejections::decode).unwrap_or_default();
            *made.borrow_mut() = list.eject(service, addr, now, outlier, live, ejected);
            made.borrow().as_ref().map(|_| list.encode())
        });
        let Some(record) = made.into_inner().filter(|_| matches!(written, Ok(true))) else {
            return;
        };
        let why = match reason {
            EjectReason::Failures(n) => format!("{n} failures in a row"),
            EjectReason::ConnectFailure => "a connect failure".to_owned(),
            EjectReason::ConnectionLost => "a connection lost before the response".to_owned(),
        };
        log(
            LogLevel::Warn,
            &format!(
                "etcd-mesh: ejecting {addr} of {service} for {} ms after {why} (ejection {})",
                record.until_ms.saturating_sub(now),
                record.times
            ),
        );
        self.ejections.set(self.ejections.get() + 1);
        match bump_version(|v| v.ejections = v.ejections.wrapping_add(1)) {
            Ok(_) => notify_workers(),
            Err(e) => log(
                LogLevel::Error,
                &format!("etcd-mesh: cannot publish an ejection: {e:?}"),
            ),
        }
    }
}

/// The benchmark floor: a filter that lets every call pass untouched.
/// The benchmark ladder: a filter that makes at most one named host call
/// per request and lets it pass.
struct NoopCall {
    call: NoopCallKind,
    addr: String,
    /// The filter-state arguments, encoded once.
    arguments: Vec<u8>,
}

impl NoopCall {
    fn new(config: NoopConfig) -> NoopCall {
        let addr = config.addr.unwrap_or_default();
        NoopCall {
            call: config.call,
            arguments: original_dst_arguments(&addr),
            addr,
        }
    }
}

struct NoopContext(Rc<NoopCall>);

impl Context for NoopContext {}

impl HttpContext for NoopContext {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let noop = &self.0;
        let _ = match noop.call {
            NoopCallKind::VersionRead => hostcalls::get_shared_data(VERSION_KEY).map(drop),
            NoopCallKind::PathRead => {
                hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path").map(drop)
            }
            NoopCallKind::FilterState => {
                hostcalls::call_foreign_function(SET_FILTER_STATE, Some(&noop.arguments)).map(drop)
            }
            NoopCallKind::HeaderOverride => hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                ORIGINAL_DST_HEADER,
                Some(&noop.addr),
            ),
            NoopCallKind::None | NoopCallKind::GrpcStatusRead => Ok(()),
        };
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _: usize) -> Action {
        if self.0.call == NoopCallKind::GrpcStatusRead {
            let _ = hostcalls::get_map_value(MapType::HttpResponseTrailers, "grpc-status");
        }
        Action::Continue
    }
}

/// The HTTP context of one call.
struct RouteCall {
    shared: Rc<WorkerState>,
    /// This context's id: what the worker resumes it by, if it was held.
    id: u32,
    /// Whether it was held for the first tables (it may be still).
    held: bool,
    /// (service, endpoint) of this call, kept for outlier detection.
    picked: Option<(String, String)>,
}

impl Context for RouteCall {}

impl Drop for RouteCall {
    /// A call that ends while held (its client gone) is held no more.
    fn drop(&mut self) {
        if self.held {
            if let Ok(mut hold) = self.shared.hold.try_borrow_mut() {
                hold.forget(self.id);
            }
            if let Ok(mut resumed) = self.shared.resumed.try_borrow_mut() {
                resumed.remove(&self.id);
            }
        }
    }
}

impl RouteCall {
    /// A held request stays paused, its body and trailers included.
    fn paused(&self) -> Action {
        if self.held && self.shared.hold.borrow().is_held(self.id) {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}

impl HttpContext for RouteCall {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let shared = &self.shared;
        // Before the first tick has loaded any tables.
        if shared.tables.borrow().seq().is_none() {
            shared.refresh();
            if shared.tables.borrow().seq().is_none() {
                // A request that names no service is answered now: no
                // tables would route it.
                if let Err(message) = shared.service_name() {
                    return reply(GrpcStatusCode::Unimplemented, message);
                }
                let admitted = shared.hold.borrow_mut().admit(self.id, now_ms());
                return match admitted {
                    Admit::Hold => {
                        self.held = true;
                        shared.ensure_queue();
                        Action::Pause
                    }
                    Admit::Refuse(refusal) => {
                        reply(GrpcStatusCode::Unavailable, &refusal.message())
                    }
                };
            }
            // The tables came with this call: the calls held go first.
            shared.settle_held(self.id);
        }
        match shared.route() {
            Routed::Upstream(picked) => {
                self.picked = picked;
                Action::Continue
            }
            Routed::Answered => Action::Pause,
        }
    }

    fn on_http_request_body(&mut self, _: usize, _: bool) -> Action {
        self.paused()
    }

    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        self.paused()
    }

    /// Settles the call for outlier detection. A failure (a connect
    /// failure, a reset, a backend's `UNAVAILABLE`) reaches the filter as a
    /// trailers-only reply, `end_of_stream` on the headers: only then is
    /// its `grpc-status` read, and for an `UNAVAILABLE`, what Envoy says of
    /// it (`response.flags`, `response.code_details`), to tell a connect
    /// failure or a lost connection ([`failure_kind`]) when either ejects at
    /// once. A reply with a body is a success, known without a host call.
    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let picked = match self.picked.take() {
            Some(picked) => Some(picked),
            None if self.held => self.shared.resumed.borrow_mut().remove(&self.id),
            None => None,
        };
        let Some((service, addr)) = picked else {
            return Action::Continue;
        };
        let Some(outlier) = &self.shared.config.outlier_detection else {
            return Action::Continue;
        };
        let failed = end_of_stream
            && hostcalls::get_map_value(MapType::HttpResponseHeaders, "grpc-status")
                .ok()
                .flatten()
                .as_deref()
                .is_some_and(is_failure);
        let classify = outlier.eject_on_connect_failure || outlier.eject_on_connection_loss;
        let outcome = if failed && classify {
            let property = |name: &str| {
                hostcalls::get_property(vec!["response", name])
                    .ok()
                    .flatten()
            };
            let flags = property("flags")
                .and_then(|b| b.get(..8).and_then(|b| b.try_into().ok()))
                .map(u64::from_le_bytes);
            let details =
                property("code_details").map(|b| String::from_utf8_lossy(&b).into_owned());
            failure_kind(flags, details.as_deref())
        } else if failed {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        self.shared.record(outlier, &service, &addr, outcome);
        Action::Continue
    }
}

/// What became of a call the worker routed.
enum Routed {
    /// Its upstream is set: the request goes on. With (service, endpoint)
    /// when outlier detection is on.
    Upstream(Option<(String, String)>),
    /// It was answered (a gRPC error): the request stops here.
    Answered,
}

fn bump(counter: &Cell<u64>) {
    counter.set(counter.get() + 1);
}

fn grpc_status(code: u32) -> GrpcStatusCode {
    use GrpcStatusCode::*;
    [
        Ok,
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    ]
    .get(code as usize)
    .copied()
    .unwrap_or(Unavailable)
}

/// Ends the call with a trailers-only gRPC reply.
fn reply(status: GrpcStatusCode, message: &str) -> Action {
    if let Err(e) = hostcalls::send_grpc_response(status, Some(message), vec![]) {
        log(LogLevel::Error, &format!("etcd-mesh: cannot reply: {e:?}"));
    }
    Action::Pause
}
