//! The HTTP context of one call on a worker: the service it names, the
//! pick (reading that one service first while a load has not reached it) and the override that sends it there, the hold for a call that
//! comes before the worker's first tables (and its release or timeout),
//! and the outcome that feeds outlier detection.

use super::host::{bump_version, log, notify_workers, now_ms, update_shared};
use super::router::{HostShared, WorkerState};
use crate::config::{HostOverride, OutlierConfig, ServiceFrom};
use crate::filter_state::SET_FILTER_STATE;
use crate::hold::Admit;
use crate::naming::{service_from_authority, service_from_grpc_path};
use crate::outlier::{failure_kind, is_failure, EjectReason, Ejections, Outcome};
use crate::tables::Pick;
use crate::EJECTIONS_KEY;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, GrpcStatusCode, LogLevel, MapType};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
/// The header the ORIGINAL_DST cluster reads in `header` override mode.
pub(super) const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";

impl WorkerState {
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
        self.load_on_demand(&service);
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

    /// While services are left to read (a full load, a large delta), reads
    /// the call's service if it is one of them: one service's cost on the
    /// call path. A
    /// value that cannot be read or decoded leaves the service as it was
    /// (unknown if it was not held); the load reports it when it gets there.
    fn load_on_demand(&self, service: &str) {
        let loader = self.loader.borrow();
        if !loader.is_loading() {
            return;
        }
        let mut tables = self.tables.borrow_mut();
        let _ = loader.ensure(&mut tables, &HostShared, service, now_ms());
    }

    /// The held calls: once this worker has tables (whole, or a load under
    /// way that answers calls), each is routed (or answered) through its
    /// own context and resumed; until then, those held for
    /// `hold_until_tables_ms` are answered. `back_to` is the
    /// context in effect again afterwards (the caller's).
    pub(super) fn settle_held(&self, back_to: u32) {
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

/// The HTTP context of one call.
pub(super) struct RouteCall {
    pub(super) shared: Rc<WorkerState>,
    /// This context's id: what the worker resumes it by, if it was held.
    pub(super) id: u32,
    /// Whether it was held for the first tables (it may be still).
    pub(super) held: bool,
    /// (service, endpoint) of this call, kept for outlier detection.
    pub(super) picked: Option<(String, String)>,
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
        // Before the first tick has loaded any tables. A worker holds tables
        // (`seq`) from the step that begins its first load: calls go on
        // then, each reading its own service until the load reaches it.
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
