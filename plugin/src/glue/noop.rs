//! The benchmark's noop role (`role: noop`, bench/src/cost.rs): a filter
//! that makes at most one named host call per request, to measure what
//! each host call costs. Built only with the `bench-noop` feature, so the
//! shipped module does not carry it.

use super::call::ORIGINAL_DST_HEADER;
use crate::config::{NoopCall as NoopCallKind, NoopConfig};
use crate::filter_state::{original_dst_arguments, SET_FILTER_STATE};
use crate::VERSION_KEY;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use std::rc::Rc;
/// The benchmark floor: a filter that lets every call pass untouched.
/// The benchmark ladder: a filter that makes at most one named host call
/// per request and lets it pass.
pub(super) struct NoopCall {
    call: NoopCallKind,
    addr: String,
    /// The filter-state arguments, encoded once.
    arguments: Vec<u8>,
}

impl NoopCall {
    pub(super) fn new(config: NoopConfig) -> NoopCall {
        let addr = config.addr.unwrap_or_default();
        NoopCall {
            call: config.call,
            arguments: original_dst_arguments(&addr),
            addr,
        }
    }
}

pub(super) struct NoopContext(pub(super) Rc<NoopCall>);

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
