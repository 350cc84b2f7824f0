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
//! everything else happens only when something changed. A full load (or a
//! large delta) is read in slices on a short tick ([`crate::reload`]), never
//! in one go.
//!
//! A call that comes before the worker has its first tables is paused and
//! remembered by its context id ([`crate::hold::Hold`]); when the tables
//! arrive (the notice on the worker's queue, or its tick) the root context
//! routes each held call through that id (`set_effective_context`) and
//! resumes it, and a call held for `hold_until_tables_ms` is answered
//! `UNAVAILABLE`.
//!
//! One module per seam: [`host`] wraps the host calls every role makes
//! (log, clock, shared data, metrics); [`root`] is the root context, which
//! reads the plugin configuration and dispatches to a role; [`poller`] is
//! the singleton that follows the change feed; [`router`] is a worker's
//! state (tables, notices, counters) and [`call`] the HTTP context of one
//! call on it, held or routed; `noop` is the benchmark's floor, built
//! only with the `bench-noop` feature.

mod call;
mod host;
#[cfg(feature = "bench-noop")]
mod noop;
mod poller;
mod root;
mod router;
