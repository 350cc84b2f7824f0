//! Active gRPC health checks of registered endpoints.
//!
//! This module owns the checking: which endpoints are checked (the latest
//! set of [`Target`]s), when, over which connection, and what their answers
//! mean. It reports only changes, as [`Transition`]s, so the caller (the
//! registry) decides what a change does to the served snapshot; nothing here
//! touches etcd or HTTP.
//!
//! # States
//!
//! A target starts *Unknown* and takes calls meanwhile (registering is a
//! claim to be ready). Each check asks `grpc.health.v1.Health/Check` for the
//! name [`CheckName`] gives, and its answer is one of:
//!
//! - `SERVING`;
//! - `NOT_SERVING`: the application asks to be drained;
//! - a failure: no connection, any RPC error (`UNIMPLEMENTED`, `NOT_FOUND`
//!   for an unknown service name, ...), the timeout, or the status
//!   `UNKNOWN` / `SERVICE_UNKNOWN` (or one this code does not know).
//!
//! The rules ([`Tracker`]):
//!
//! - Unknown → Healthy on the first `SERVING`;
//! - Unknown, Healthy → Unhealthy after `unhealthy_threshold` failures in a
//!   row; so does NotServing (a drained application that then stops
//!   answering is gone, not draining);
//! - any → NotServing on one `NOT_SERVING`, with no threshold: the
//!   application said so;
//! - Unhealthy, NotServing → Healthy after `healthy_threshold` `SERVING`s in
//!   a row.
//!
//! A [`Transition`] is sent only when the state changes. A target that
//! leaves the set is forgotten without a transition (the registry dropped
//! it already) and its connection closed; if it comes back it starts
//! Unknown again.
//!
//! # Scheduling
//!
//! One scheduler task keeps a heap of next-due times; it spawns a task per
//! check, at most `max_concurrent` at once (a semaphore), so 10,000 targets
//! cost 10,000 heap entries, not 10,000 sleeping tasks. A target's first
//! check falls at a random offset within one interval, so targets added
//! together do not fire together; each next check is due one interval
//! (±10%, random) after the previous one ended, so one target never has two
//! checks in flight. When all permits are taken, due checks wait, oldest
//! first. A new target set is diffed against the current one: only
//! added and removed targets change.
//!
//! # Connections
//!
//! Each target keeps one lazily connected tonic [`Channel`] (HTTP/2) across
//! its checks. A failed check drops it, so the next check connects afresh
//! and finds a backend restarted on the same address. The connect timeout
//! is the check timeout, and the whole check (connect and RPC) is bounded by
//! it too. With [`HealthTls`] the channels speak TLS (the endpoints'
//! certificates checked against its CA, optionally presenting a client
//! certificate); its files are read once, at start.

use etcd_mesh_routing::rng::SplitMix64;
use etcd_mesh_wire::Health;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

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

/// TLS to the checked endpoints, as PEM bytes (read and checked at start).
#[derive(Debug, Clone)]
pub struct HealthTls {
    /// The CA(s) the endpoints' certificates must chain to.
    pub ca_pem: Vec<u8>,
    /// A client certificate and key, for endpoints that require one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name every endpoint's certificate is checked against; when
    /// `None`, the endpoint's own address (its certificate then needs that
    /// IP address as a subject alternative name).
    pub domain: Option<String>,
}

impl HealthTls {
    fn client_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
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

/// Counters and gauges of the checks, rendered into `/metrics`.
#[derive(Debug, Default)]
pub struct HealthMetrics {
    /// Checks finished, whatever their answer.
    pub checks_total: AtomicU64,
    /// Checks that failed (a `NOT_SERVING` answer is not a failure).
    pub failures_total: AtomicU64,
    /// Targets now Unhealthy or NotServing.
    pub unhealthy: AtomicU64,
    /// Targets being checked.
    pub targets: AtomicU64,
    /// Checks in flight now.
    pub in_flight: AtomicU64,
    /// The most checks ever in flight at once (for tuning
    /// `max_concurrent` and for tests).
    pub peak_in_flight: AtomicU64,
    /// Channels held: a target holds one from its check until a check
    /// fails (so refused targets count while their check is in flight).
    pub connections_open: AtomicU64,
}

impl HealthMetrics {
    /// Appends the health-check rows in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 7] = [
            (
                "sync_server_health_checks_total",
                "counter",
                "active health checks finished",
                load(&self.checks_total),
            ),
            (
                "sync_server_health_check_failures_total",
                "counter",
                "active health checks that failed (no connection, error, timeout, unknown status)",
                load(&self.failures_total),
            ),
            (
                "sync_server_health_unhealthy_endpoints",
                "gauge",
                "checked endpoints now unhealthy or not serving",
                load(&self.unhealthy),
            ),
            (
                "sync_server_health_targets",
                "gauge",
                "endpoints being health-checked",
                load(&self.targets),
            ),
            (
                "sync_server_health_checks_in_flight",
                "gauge",
                "health checks in flight",
                load(&self.in_flight),
            ),
            (
                "sync_server_health_checks_in_flight_peak",
                "gauge",
                "the most health checks in flight at once",
                load(&self.peak_in_flight),
            ),
            (
                "sync_server_health_connections",
                "gauge",
                "connections held to checked endpoints",
                load(&self.connections_open),
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Serving,
    NotServing,
    Failed,
}

/// A target's health state machine, without sockets or clocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    /// `None` until the first decisive answer.
    state: Option<Health>,
    successes_in_row: u32,
    failures_in_row: u32,
}

impl Tracker {
    pub fn new() -> Self {
        Tracker::default()
    }

    /// The current state; `None` is Unknown.
    pub fn state(&self) -> Option<Health> {
        self.state
    }

    /// Takes in one check's result; returns the new state if it changed.
    pub fn observe(
        &mut self,
        observation: Observation,
        unhealthy_threshold: u32,
        healthy_threshold: u32,
    ) -> Option<Health> {
        let next = match observation {
            Observation::Serving => {
                self.failures_in_row = 0;
                self.successes_in_row = self.successes_in_row.saturating_add(1);
                match self.state {
                    None => Some(Health::Healthy),
                    Some(Health::Healthy) => None,
                    Some(Health::Unhealthy | Health::NotServing) => (self.successes_in_row
                        >= healthy_threshold.max(1))
                    .then_some(Health::Healthy),
                }
            }
            Observation::NotServing => {
                self.failures_in_row = 0;
                self.successes_in_row = 0;
                Some(Health::NotServing)
            }
            Observation::Failed => {
                self.successes_in_row = 0;
                self.failures_in_row = self.failures_in_row.saturating_add(1);
                (self.failures_in_row >= unhealthy_threshold.max(1)).then_some(Health::Unhealthy)
            }
        };
        match next {
            Some(health) if self.state != Some(health) => {
                self.state = Some(health);
                Some(health)
            }
            _ => None,
        }
    }
}

/// Runs until `shutdown`; checks every target of the latest set in
/// `targets`; sends a [`Transition`] on every state change.
///
/// If the `targets` sender goes away the last set keeps being checked. When
/// this returns, every connection is closed and checks in flight are
/// abandoned.
pub async fn run(
    config: HealthConfig,
    targets: watch::Receiver<Arc<BTreeSet<Target>>>,
    out: mpsc::UnboundedSender<Transition>,
    metrics: Arc<HealthMetrics>,
    shutdown: CancellationToken,
) {
    run_with_tls(config, None, targets, out, metrics, shutdown).await;
}

/// [`run`], speaking TLS to the endpoints when `tls` is given.
pub async fn run_with_tls(
    config: HealthConfig,
    tls: Option<HealthTls>,
    mut targets: watch::Receiver<Arc<BTreeSet<Target>>>,
    out: mpsc::UnboundedSender<Transition>,
    metrics: Arc<HealthMetrics>,
    shutdown: CancellationToken,
) {
    let mut scheduler = Scheduler::new(config, out, Arc::clone(&metrics));
    scheduler.tls = tls.as_ref().map(HealthTls::client_config);
    let initial = Arc::clone(&targets.borrow_and_update());
    scheduler.set_targets(&initial);
    let mut targets_open = true;
    loop {
        scheduler.launch_due();
        let next_due = scheduler.next_due();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            changed = targets.changed(), if targets_open => match changed {
                Ok(()) => {
                    let latest = Arc::clone(&targets.borrow_and_update());
                    scheduler.set_targets(&latest);
                }
                Err(_) => targets_open = false,
            },
            Some(joined) = scheduler.checks.join_next_with_id(), if !scheduler.checks.is_empty() => {
                scheduler.finish(joined);
            }
            _ = sleep_until_or_never(next_due) => {}
        }
    }
    // Abort checks before forgetting targets, so no result arrives late.
    scheduler.checks.shutdown().await;
    scheduler.set_targets(&BTreeSet::new());
}

async fn sleep_until_or_never(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// One target the scheduler knows, under an id that is new each time the
/// target joins, so results and heap entries of an earlier membership miss.
struct Entry {
    target: Target,
    tracker: Tracker,
    channel: Option<HeldChannel>,
    /// The check in flight, aborted if the target leaves.
    check: Option<AbortHandle>,
}

/// A channel counted in `connections_open` for as long as it is held.
struct HeldChannel {
    channel: Channel,
    metrics: Arc<HealthMetrics>,
}

impl HeldChannel {
    fn new(channel: Channel, metrics: &Arc<HealthMetrics>) -> Self {
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        HeldChannel {
            channel,
            metrics: Arc::clone(metrics),
        }
    }
}

impl Drop for HeldChannel {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a check in `in_flight` until it ends or is aborted.
struct InFlight(Arc<HealthMetrics>);

impl InFlight {
    fn start(metrics: &Arc<HealthMetrics>) -> Self {
        let now = metrics.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        metrics.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(Arc::clone(metrics))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Scheduler {
    config: HealthConfig,
    out: mpsc::UnboundedSender<Transition>,
    metrics: Arc<HealthMetrics>,
    permits: Arc<Semaphore>,
    rng: SplitMix64,
    next_id: u64,
    entries: HashMap<u64, Entry>,
    ids: HashMap<Target, u64>,
    /// Next-due times; entries of forgotten ids are skipped when popped.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    checks: JoinSet<(u64, Observation)>,
    /// Which entry each running check task is for (to learn of a panic).
    running: HashMap<tokio::task::Id, u64>,
    /// TLS to the endpoints, when on.
    tls: Option<ClientTlsConfig>,
}

impl Scheduler {
    fn new(
        mut config: HealthConfig,
        out: mpsc::UnboundedSender<Transition>,
        metrics: Arc<HealthMetrics>,
    ) -> Self {
        config.interval = config
            .interval
            .clamp(Duration::from_millis(1), Duration::from_secs(86_400));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Scheduler {
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            config,
            out,
            metrics,
            rng: SplitMix64::new(seed),
            next_id: 0,
            entries: HashMap::new(),
            ids: HashMap::new(),
            due: BinaryHeap::new(),
            checks: JoinSet::new(),
            running: HashMap::new(),
            tls: None,
        }
    }

    /// Forgets targets not in `latest` and schedules the new ones.
    fn set_targets(&mut self, latest: &BTreeSet<Target>) {
        let gone: Vec<Target> = self
            .ids
            .keys()
            .filter(|t| !latest.contains(*t))
            .cloned()
            .collect();
        for target in gone {
            if let Some(entry) = self
                .ids
                .remove(&target)
                .and_then(|id| self.entries.remove(&id))
            {
                if entry.tracker.state().is_some_and(|h| !h.takes_calls()) {
                    self.metrics.unhealthy.fetch_sub(1, Ordering::Relaxed);
                }
                // Frees its permit and its connection now, not at the timeout.
                if let Some(check) = entry.check {
                    check.abort();
                }
            }
        }
        let now = Instant::now();
        for target in latest {
            if self.ids.contains_key(target) {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let first = now + self.random_below(self.config.interval);
            self.due.push(Reverse((first, id)));
            self.ids.insert(target.clone(), id);
            self.entries.insert(
                id,
                Entry {
                    target: target.clone(),
                    tracker: Tracker::new(),
                    channel: None,
                    check: None,
                },
            );
        }
        self.metrics
            .targets
            .store(self.entries.len() as u64, Ordering::Relaxed);
    }

    fn random_below(&mut self, limit: Duration) -> Duration {
        let nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.rng.next_u64() % nanos)
    }

    /// The interval, ±10% at random.
    fn jittered_interval(&mut self) -> Duration {
        let interval = self.config.interval;
        let tenth = interval / 10;
        (interval - tenth) + self.random_below(tenth * 2)
    }

    /// When the earliest live entry is due, if a permit is free to run it;
    /// otherwise the next finished check wakes the scheduler.
    fn next_due(&mut self) -> Option<Instant> {
        if self.permits.available_permits() == 0 {
            return None;
        }
        while let Some(&Reverse((due, id))) = self.due.peek() {
            if self.entries.contains_key(&id) {
                return Some(due);
            }
            self.due.pop();
        }
        None
    }

    /// Spawns every check that is due, as far as permits allow.
    fn launch_due(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((due, id))) = self.due.peek() {
            if due > now {
                break;
            }
            if !self.entries.contains_key(&id) {
                self.due.pop();
                continue;
            }
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                break;
            };
            self.due.pop();
            self.launch(id, permit);
        }
    }

    fn launch(&mut self, id: u64, permit: OwnedSemaphorePermit) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let timeout = self.config.timeout;
        // Over the cap, a connection for this check only, closed with it.
        let mut one_off = None;
        if entry.channel.is_none() {
            let fresh = connect_lazy(&entry.target.addr, timeout, self.tls.as_ref())
                .map(|channel| HeldChannel::new(channel, &self.metrics));
            let held = self.metrics.connections_open.load(Ordering::Relaxed);
            if held <= self.config.max_connections as u64 {
                entry.channel = fresh;
            } else {
                one_off = fresh;
            }
        }
        let channel = entry
            .channel
            .as_ref()
            .or(one_off.as_ref())
            .map(|held| held.channel.clone());
        let service = self.config.check_name.for_target(&entry.target).to_owned();
        let in_flight = InFlight::start(&self.metrics);
        let handle = self.checks.spawn(async move {
            let observation = match channel {
                Some(channel) => check(channel, service, timeout).await,
                None => Observation::Failed,
            };
            // Free the permit before the scheduler sees the result, so it
            // can launch the next check at once.
            drop(one_off);
            drop(in_flight);
            drop(permit);
            (id, observation)
        });
        self.running.insert(handle.id(), id);
        entry.check = Some(handle);
    }

    fn finish(
        &mut self,
        joined: Result<(tokio::task::Id, (u64, Observation)), tokio::task::JoinError>,
    ) {
        let (id, observation) = match joined {
            Ok((task, result)) => {
                self.running.remove(&task);
                result
            }
            Err(error) => {
                let Some(id) = self.running.remove(&error.id()) else {
                    return;
                };
                if error.is_cancelled() {
                    // Aborted because its target left.
                    return;
                }
                tracing::error!(%error, "a health check task ended without a result");
                (id, Observation::Failed)
            }
        };
        self.metrics.checks_total.fetch_add(1, Ordering::Relaxed);
        if observation == Observation::Failed {
            self.metrics.failures_total.fetch_add(1, Ordering::Relaxed);
        }
        let next = Instant::now() + self.jittered_interval();
        // The target may have left while its check ran.
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        entry.check = None;
        if observation == Observation::Failed {
            // Reconnect next time: the backend may have restarted.
            entry.channel = None;
        }
        let was_unhealthy = entry.tracker.state().is_some_and(|h| !h.takes_calls());
        if let Some(health) = entry.tracker.observe(
            observation,
            self.config.unhealthy_threshold,
            self.config.healthy_threshold,
        ) {
            match (was_unhealthy, health.takes_calls()) {
                (false, false) => self.metrics.unhealthy.fetch_add(1, Ordering::Relaxed),
                (true, true) => self.metrics.unhealthy.fetch_sub(1, Ordering::Relaxed),
                _ => 0,
            };
            tracing::info!(service = %entry.target.service, addr = %entry.target.addr, health = health.name(), "health changed");
            let _ = self.out.send(Transition {
                target: entry.target.clone(),
                health,
            });
        }
        self.due.push(Reverse((next, id)));
    }
}

/// A channel that connects on first use, over TLS when `tls` is given;
/// `None` if `addr` is no URI authority (every check of it then fails).
fn connect_lazy(addr: &str, timeout: Duration, tls: Option<&ClientTlsConfig>) -> Option<Channel> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).and_then(|endpoint| match tls {
            Some(tls) => endpoint.tls_config(tls.clone()),
            None => Ok(endpoint),
        });
    match endpoint {
        Ok(endpoint) => Some(
            endpoint
                .connect_timeout(timeout)
                .timeout(timeout)
                .tcp_nodelay(true)
                .connect_lazy(),
        ),
        Err(error) => {
            // Debug: it recurs every interval; the registry validates addresses.
            tracing::debug!(%addr, %error, "cannot health-check this address");
            None
        }
    }
}

async fn check(channel: Channel, service: String, timeout: Duration) -> Observation {
    let mut client = HealthClient::new(channel);
    let answer = tokio::time::timeout(timeout, client.check(HealthCheckRequest { service })).await;
    match answer {
        Ok(Ok(response)) => match ServingStatus::try_from(response.get_ref().status) {
            Ok(ServingStatus::Serving) => Observation::Serving,
            Ok(ServingStatus::NotServing) => Observation::NotServing,
            Ok(ServingStatus::Unknown | ServingStatus::ServiceUnknown) | Err(_) => {
                Observation::Failed
            }
        },
        Ok(Err(status)) => {
            tracing::debug!(code = ?status.code(), message = status.message(), "health check failed");
            Observation::Failed
        }
        Err(_) => Observation::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::{Failed, NotServing, Serving};

    /// Feeds `observations` with thresholds 3 (unhealthy) and 2 (healthy);
    /// returns the transitions.
    fn run_tracker(observations: &[Observation]) -> Vec<Option<Health>> {
        let mut tracker = Tracker::new();
        observations
            .iter()
            .map(|o| tracker.observe(*o, 3, 2))
            .collect()
    }

    #[test]
    fn first_serving_is_healthy_at_once() {
        assert_eq!(
            run_tracker(&[Serving, Serving]),
            [Some(Health::Healthy), None]
        );
    }

    #[test]
    fn failures_in_a_row_reach_unhealthy_once() {
        assert_eq!(
            run_tracker(&[Failed, Failed, Failed, Failed]),
            [None, None, Some(Health::Unhealthy), None]
        );
        assert_eq!(
            run_tracker(&[Serving, Failed, Failed, Failed]),
            [Some(Health::Healthy), None, None, Some(Health::Unhealthy)]
        );
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        assert_eq!(
            run_tracker(&[Serving, Failed, Failed, Serving, Failed, Failed]),
            [Some(Health::Healthy), None, None, None, None, None]
        );
    }

    #[test]
    fn not_serving_is_at_once_and_needs_the_healthy_threshold_back() {
        assert_eq!(
            run_tracker(&[Serving, NotServing, NotServing, Serving, Serving, Serving]),
            [
                Some(Health::Healthy),
                Some(Health::NotServing),
                None,
                None,
                Some(Health::Healthy),
                None
            ]
        );
        assert_eq!(run_tracker(&[NotServing]), [Some(Health::NotServing)]);
    }

    #[test]
    fn unhealthy_needs_successes_in_a_row() {
        assert_eq!(
            run_tracker(&[Failed, Failed, Failed, Serving, Failed, Serving, Serving]),
            [
                None,
                None,
                Some(Health::Unhealthy),
                None,
                None,
                None,
                Some(Health::Healthy)
            ]
        );
    }

    #[test]
    fn not_serving_then_silent_becomes_unhealthy() {
        assert_eq!(
            run_tracker(&[NotServing, Failed, Failed, Failed, NotServing]),
            [
                Some(Health::NotServing),
                None,
                None,
                Some(Health::Unhealthy),
                Some(Health::NotServing)
            ]
        );
    }

    #[test]
    fn extreme_intervals_are_held_in_range() {
        assert!(scheduler(Duration::ZERO).jittered_interval() >= Duration::from_micros(900));
        let mut huge = scheduler(Duration::MAX);
        assert!(huge.jittered_interval() <= Duration::from_secs(86_400 * 11 / 10));
        huge.set_targets(&targets(["a".to_owned()]));
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let mut tracker = Tracker::new();
        assert_eq!(tracker.observe(Failed, 0, 0), Some(Health::Unhealthy));
        assert_eq!(tracker.observe(Serving, 0, 0), Some(Health::Healthy));
    }

    #[test]
    fn metrics_render_help_type_and_value() {
        let metrics = HealthMetrics::default();
        metrics.checks_total.store(7, Ordering::Relaxed);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(out.contains(
            "# HELP sync_server_health_checks_total active health checks finished\n\
             # TYPE sync_server_health_checks_total counter\n\
             sync_server_health_checks_total 7\n"
        ));
        for name in [
            "sync_server_health_check_failures_total",
            "sync_server_health_unhealthy_endpoints",
            "sync_server_health_targets",
            "sync_server_health_checks_in_flight",
            "sync_server_health_connections",
        ] {
            assert!(out.contains(&format!("\n{name} 0\n")), "{name} in {out}");
        }
    }

    fn scheduler(interval: Duration) -> Scheduler {
        let (out, _transitions) = mpsc::unbounded_channel();
        let config = HealthConfig {
            interval,
            ..HealthConfig::default()
        };
        Scheduler::new(config, out, Arc::default())
    }

    fn targets(names: impl IntoIterator<Item = String>) -> BTreeSet<Target> {
        names
            .into_iter()
            .map(|name| Target {
                service: Arc::from(name.as_str()),
                addr: "127.0.0.1:1".to_owned(),
            })
            .collect()
    }

    #[test]
    fn first_checks_spread_over_one_interval() {
        let interval = Duration::from_secs(10);
        let mut scheduler = scheduler(interval);
        let before = Instant::now();
        scheduler.set_targets(&targets((0..1000).map(|n| format!("svc.{n}"))));
        let mut per_second = [0u32; 10];
        for Reverse((due, _)) in &scheduler.due {
            let offset = due.duration_since(before);
            assert!(offset < interval + Duration::from_secs(1), "{offset:?}");
            per_second[(offset.as_secs() as usize).min(9)] += 1;
        }
        // About 100 each; all at once would be 1000 in one.
        assert!(
            per_second.iter().all(|n| (50..=150).contains(n)),
            "{per_second:?}"
        );
    }

    #[test]
    fn a_new_set_changes_only_what_differs() {
        let mut scheduler = scheduler(Duration::from_secs(1));
        let first = targets(["a", "b"].map(String::from));
        scheduler.set_targets(&first);
        let b = first.iter().nth(1).cloned().expect("b");
        let id_of_b = scheduler.ids[&b];

        scheduler.set_targets(&targets(["b", "c"].map(String::from)));
        assert_eq!(scheduler.ids[&b], id_of_b, "b keeps its state");
        let mut names: Vec<&str> = scheduler.ids.keys().map(|t| &*t.service).collect();
        names.sort_unstable();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(scheduler.entries.len(), 2);
        assert_eq!(scheduler.metrics.targets.load(Ordering::Relaxed), 2);

        // Back again: a new id, so it starts Unknown.
        scheduler.set_targets(&first);
        let a = first.iter().next().cloned().expect("a");
        assert!(scheduler.ids[&a] > id_of_b);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let mut scheduler = scheduler(Duration::from_millis(1000));
        for _ in 0..1000 {
            let d = scheduler.jittered_interval();
            assert!(
                d >= Duration::from_millis(900) && d < Duration::from_millis(1100),
                "{d:?}"
            );
            assert!(
                scheduler.random_below(Duration::from_millis(1000)) < Duration::from_millis(1000)
            );
        }
        assert_eq!(scheduler.random_below(Duration::ZERO), Duration::ZERO);
    }
}
