//! The proxy-wasm glue: thin contexts over the pure modules.
//!
//! Host calls go through `proxy_wasm::hostcalls`, whose `Result`s are
//! handled here, rather than the trait helpers, which panic on host errors.
//! A panic would take the VM, and every call of this worker, down with it.

use crate::config::{PluginConfig, PollerConfig};
use crate::filter_state::{original_dst_arguments, SET_FILTER_STATE};
use crate::naming::service_from_grpc_path;
use crate::poll::PollSchedule;
use crate::tables::{Pick, WorkerTables};
use crate::{REVISION_KEY, TABLES_KEY};
use etcd_mesh_wire::Snapshot;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{
    Action, BufferType, ContextType, GrpcStatusCode, LogLevel, MapType, MetricType,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(MeshRoot::default()) });
}}

/// How often the poller checks whether a poll is due (after a backoff).
const POLLER_TICK: Duration = Duration::from_millis(100);
/// How often workers flush their call counters into Envoy's stats.
const ROUTER_TICK: Duration = Duration::from_secs(1);

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
}

fn clock_seed() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
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

#[derive(Default)]
struct MeshRoot {
    role: Option<Role>,
}

enum Role {
    Poller(Poller),
    Router(Router),
    Noop,
}

impl Context for MeshRoot {
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
            PluginConfig::Poller(config) => (Role::Poller(Poller::new(config)), POLLER_TICK),
            PluginConfig::Router(_) => (Role::Router(Router::new()), ROUTER_TICK),
            PluginConfig::Noop => (Role::Noop, Duration::ZERO),
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
            Some(Role::Router(router)) => router.flush_counters(),
            Some(Role::Noop) | None => {}
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        match &self.role {
            Some(Role::Router(router)) => Some(Box::new(router.call())),
            Some(Role::Noop) => Some(Box::new(NoopCall)),
            // The poller is not a filter: a filter chain that loads it by
            // mistake gets no context, and Envoy passes calls through
            // without a host override to its default.
            _ => None,
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The singleton that keeps shared data up to date.
struct Poller {
    schedule: PollSchedule,
    in_flight: Option<u32>,
    next_poll_at: SystemTime,
    succeeded: Metric,
    failed: Metric,
    revision: Metric,
}

impl Poller {
    fn new(config: PollerConfig) -> Poller {
        Poller {
            schedule: PollSchedule::new(config, clock_seed()),
            in_flight: None,
            next_poll_at: UNIX_EPOCH,
            succeeded: Metric::define(MetricType::Counter, "etcd_mesh.polls_succeeded"),
            failed: Metric::define(MetricType::Counter, "etcd_mesh.polls_failed"),
            revision: Metric::define(MetricType::Gauge, "etcd_mesh.table_revision"),
        }
    }

    fn on_tick(&mut self) {
        if self.in_flight.is_none() && now() >= self.next_poll_at {
            self.poll();
        }
    }

    fn poll(&mut self) {
        let config = self.schedule.config();
        let path = self.schedule.path();
        let headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", config.authority.as_str()),
        ];
        match hostcalls::dispatch_http_call(
            &config.cluster,
            headers,
            None,
            vec![],
            self.schedule.timeout(),
        ) {
            Ok(token) => self.in_flight = Some(token),
            Err(status) => {
                let message = format!(
                    "etcd-mesh: cannot poll sync-server through cluster {:?}: {status:?}",
                    config.cluster
                );
                self.fail(&message);
            }
        }
    }

    fn on_response(&mut self, token: u32, body_size: usize) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten();
        match status.as_deref() {
            Some("200") => {
                let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                match self.store(&body) {
                    Ok(()) => self.succeed(),
                    Err(e) => self.fail(&format!("etcd-mesh: sync-server sent {e}")),
                }
            }
            Some("304") => self.succeed(),
            Some(other) => self.fail(&format!("etcd-mesh: sync-server answered {other}")),
            None => self.fail("etcd-mesh: sync-server did not answer (timeout or reset)"),
        }
    }

    /// Validates a snapshot body and publishes it if it is newer.
    fn store(&mut self, body: &[u8]) -> Result<(), String> {
        let snapshot = Snapshot::decode(body).map_err(|e| e.to_string())?;
        if !self.schedule.is_newer(snapshot.revision) {
            return Ok(());
        }
        hostcalls::set_shared_data(TABLES_KEY, Some(body), None)
            .and_then(|()| {
                hostcalls::set_shared_data(
                    REVISION_KEY,
                    Some(&snapshot.revision.to_le_bytes()),
                    None,
                )
            })
            .map_err(|status| format!("a snapshot that shared data refused: {status:?}"))?;
        self.schedule.accepted(snapshot.revision);
        self.revision.set(snapshot.revision);
        Ok(())
    }

    fn succeed(&mut self) {
        self.succeeded.add(1);
        self.schedule.succeeded();
        self.poll();
    }

    fn fail(&mut self, message: &str) {
        self.failed.add(1);
        let delay = self.schedule.failed();
        log(
            LogLevel::Warn,
            &format!("{message}; keeping the tables held, next poll in {delay:?}"),
        );
        self.next_poll_at = now() + delay;
    }
}

/// One worker's routing state, shared by its HTTP contexts.
struct Router {
    tables: Rc<RefCell<WorkerTables>>,
    /// The revision last read from shared data, applied or not: a body that
    /// fails to decode is not decoded again on every call.
    seen: Rc<Cell<Option<u64>>>,
    counters: Rc<CallCounters>,
    routed: Metric,
    no_endpoint: Metric,
}

#[derive(Default)]
struct CallCounters {
    routed: Cell<u64>,
    no_endpoint: Cell<u64>,
}

impl Router {
    fn new() -> Router {
        Router {
            tables: Rc::new(RefCell::new(WorkerTables::new(clock_seed()))),
            seen: Rc::new(Cell::new(None)),
            counters: Rc::default(),
            routed: Metric::define(MetricType::Counter, "etcd_mesh.calls_routed"),
            no_endpoint: Metric::define(MetricType::Counter, "etcd_mesh.calls_no_endpoint"),
        }
    }

    fn call(&self) -> RouteCall {
        RouteCall {
            tables: Rc::clone(&self.tables),
            seen: Rc::clone(&self.seen),
            counters: Rc::clone(&self.counters),
        }
    }

    /// Per-call counters are kept in the VM and flushed once a second: a
    /// stats host call on every request would cost as much as the pick.
    fn flush_counters(&self) {
        self.routed.add(self.counters.routed.take());
        self.no_endpoint.add(self.counters.no_endpoint.take());
    }
}

/// The benchmark floor: a filter that lets every call pass untouched.
struct NoopCall;

impl Context for NoopCall {}
impl HttpContext for NoopCall {}

/// The HTTP context of one call.
struct RouteCall {
    tables: Rc<RefCell<WorkerTables>>,
    seen: Rc<Cell<Option<u64>>>,
    counters: Rc<CallCounters>,
}

impl Context for RouteCall {}

impl HttpContext for RouteCall {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.refresh_tables();
        let path = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path")
            .ok()
            .flatten()
            .unwrap_or_default();
        let Some(service) = service_from_grpc_path(&path) else {
            return reply(
                GrpcStatusCode::Unimplemented,
                "etcd-mesh: the request path names no gRPC service",
            );
        };
        let arguments = match self.tables.borrow_mut().pick(service) {
            Pick::Endpoint(addr) => original_dst_arguments(addr),
            Pick::NoEndpoint => {
                bump(&self.counters.no_endpoint);
                return reply(
                    GrpcStatusCode::Unavailable,
                    &format!("etcd-mesh: no endpoint for service {service}"),
                );
            }
        };
        match hostcalls::call_foreign_function(SET_FILTER_STATE, Some(&arguments)) {
            Ok(_) => {
                bump(&self.counters.routed);
                Action::Continue
            }
            Err(status) => {
                log(
                    LogLevel::Error,
                    &format!("etcd-mesh: cannot set the upstream address: {status:?}"),
                );
                reply(
                    GrpcStatusCode::Unavailable,
                    "etcd-mesh: cannot set the upstream",
                )
            }
        }
    }
}

impl RouteCall {
    /// Re-reads the tables when, and only when, their revision changed.
    fn refresh_tables(&self) {
        let Ok((Some(bytes), _)) = hostcalls::get_shared_data(REVISION_KEY) else {
            return;
        };
        let Ok(revision) = <[u8; 8]>::try_from(bytes.as_slice()).map(u64::from_le_bytes) else {
            return;
        };
        if self.seen.get() == Some(revision) {
            return;
        }
        self.seen.set(Some(revision));
        if let Ok((Some(body), _)) = hostcalls::get_shared_data(TABLES_KEY) {
            if let Err(e) = self.tables.borrow_mut().apply(&body) {
                log(LogLevel::Error, &format!("etcd-mesh: shared tables: {e}"));
            }
        }
    }
}

fn bump(counter: &Cell<u64>) {
    counter.set(counter.get() + 1);
}

/// Ends the call with a trailers-only gRPC reply.
fn reply(status: GrpcStatusCode, message: &str) -> Action {
    if let Err(e) = hostcalls::send_grpc_response(status, Some(message), vec![]) {
        log(LogLevel::Error, &format!("etcd-mesh: cannot reply: {e:?}"));
    }
    Action::Pause
}
