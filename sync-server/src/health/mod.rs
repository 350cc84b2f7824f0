//! Active gRPC health checks of registered endpoints.
//!
//! This module owns the checking: which endpoints are checked (the latest
//! set of [`Target`]s), when, over which connection, and what their answers
//! mean. It reports only changes, as [`Transition`]s, so the caller (the
//! registry) decides what a change does to the served snapshot; nothing here
//! touches etcd or HTTP.
//!
//! A target starts *Unknown* and takes calls meanwhile (registering is a
//! claim to be ready). Each check asks `grpc.health.v1.Health/Check` for the
//! name [`CheckName`] gives. Three parts, each in its own file:
//!
//! - `tracker`: the state machine, thresholds and transitions, pure;
//! - `scheduler`: when each target is checked (jitter, the concurrency
//!   bound, the connections kept) and the task that runs the checks;
//! - `check`: one check over one channel, plain or TLS ([`HealthTls`]).
//!
//! A [`Transition`] is sent only when the state changes. A target that
//! leaves the set is forgotten without a transition (the registry dropped
//! it already) and its connection closed; if it comes back it starts
//! Unknown again. The counters the checks keep are
//! [`crate::metrics::HealthMetrics`].

mod check;
mod scheduler;
mod tracker;

pub use check::HealthTls;
pub use scheduler::{run, run_with_tls};
pub use tracker::{Observation, Tracker};

use etcd_mesh_wire::Health;
use std::sync::Arc;
use std::time::Duration;

/// How the checks are run.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Between checks of one endpoint, each jittered by up to ±10%
    /// (held within 1 ms ..= 1 day, so neither a spin nor an overflow).
    pub interval: Duration,
    /// Per check, connect and RPC together.
    pub timeout: Duration,
    /// Failures in a row that make an endpoint Unhealthy (0 counts as 1).
    pub unhealthy_threshold: u32,
    /// `SERVING`s in a row that make an Unhealthy or NotServing endpoint
    /// Healthy again (0 counts as 1).
    pub healthy_threshold: u32,
    /// Checks in flight at once, across all endpoints (0 counts as 1).
    pub max_concurrent: usize,
    /// Connections kept between checks; beyond it, an endpoint gets a new
    /// connection for each check, closed after it, so that a large
    /// registry cannot run sync-server out of file descriptors (which would
    /// fail checks and drain healthy endpoints).
    pub max_connections: usize,
    /// What goes in `HealthCheckRequest.service`.
    pub check_name: CheckName,
}

/// The default of [`HealthConfig::max_connections`]: well under the usual
/// descriptor limits once the HTTP side's own sockets are counted.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            max_concurrent: 256,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            check_name: CheckName::Registry,
        }
    }
}

/// The service name a check asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckName {
    /// The target's registry service name.
    Registry,
    /// `""`: the server as a whole.
    Empty,
    /// The same name for every target.
    Fixed(String),
}

impl CheckName {
    fn for_target<'a>(&'a self, target: &'a Target) -> &'a str {
        match self {
            CheckName::Registry => &target.service,
            CheckName::Empty => "",
            CheckName::Fixed(name) => name,
        }
    }
}

/// One endpoint to check.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The registry service name.
    pub service: Arc<str>,
    /// `ip:port` (IPv6 as `[ip]:port`).
    pub addr: String,
}

/// A target's state changed to `health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub target: Target,
    pub health: Health,
}
