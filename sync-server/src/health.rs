//! Active health checks: `grpc.health.v1.Health/Check` against every
//! endpoint, so that an instance killed without deregistering (SIGKILL, a
//! lost host) stops taking calls within `interval × unhealthy_threshold`
//! instead of when its lease expires.
//!
//! States, per endpoint ([`Tracker`], pure): it starts unknown and takes
//! calls; a `SERVING` answer makes it healthy; `unhealthy_threshold`
//! failures in a row (no connection, an error, a timeout, any other
//! status) make it unhealthy; a `NOT_SERVING` answer drains it at once
//! (the application asks for it); from unhealthy or not-serving,
//! `healthy_threshold` `SERVING` answers in a row make it healthy again.
//! Only changes are reported, as [`Transition`]s.
//!
//! Scheduling: one loop keeps every endpoint's next check time; the first
//! check of each comes at a random point of one interval, so that 100,000
//! endpoints are not checked all at once, and each later one after the
//! interval ±10%. A semaphore bounds the checks in flight. Each endpoint
//! keeps one HTTP/2 connection between checks, dropped after a failure so
//! that a backend restarted on the same address is found.

use etcd_mesh_routing::rng::SplitMix64;
use etcd_mesh_wire::Health;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Between two checks of one endpoint (jittered by up to 10%).
    pub interval: Duration,
    /// The most one check may take, connecting included.
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// Checks in flight at once, over all endpoints.
    pub max_concurrent: usize,
    pub check_name: CheckName,
}

/// What each check names in `HealthCheckRequest.service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckName {
    /// The endpoint's registry service name.
    Registry,
    /// The empty name: the server as a whole.
    Empty,
    Fixed(String),
}

/// One endpoint to check.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub service: Arc<str>,
    pub addr: String,
}

/// An endpoint's health changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub target: Target,
    pub health: Health,
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Serving,
    NotServing,
    Failed,
}

/// One endpoint's state machine (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    health: Option<Health>,
    failures: u32,
    passes: u32,
}

impl Tracker {
    /// Records one check; the new health when it changed.
    pub fn record(&mut self, outcome: Outcome, config: &HealthConfig) -> Option<Health> {
        let next = match outcome {
            Outcome::NotServing => {
                self.failures = 0;
                self.passes = 0;
                Health::NotServing
            }
            Outcome::Failed => {
                self.passes = 0;
                self.failures = self.failures.saturating_add(1);
                match self.health {
                    Some(Health::NotServing) | Some(Health::Unhealthy) => Health::Unhealthy,
                    _ if self.failures >= config.unhealthy_threshold => Health::Unhealthy,
                    _ => return None,
                }
            }
            Outcome::Serving => {
                self.failures = 0;
                self.passes = self.passes.saturating_add(1);
                match self.health {
                    None | Some(Health::Healthy) => Health::Healthy,
                    _ if self.passes >= config.healthy_threshold => Health::Healthy,
                    _ => return None,
                }
            }
        };
        if next != Health::Healthy {
            self.passes = 0;
        }
        (self.health != Some(next)).then(|| {
            self.health = Some(next);
            next
        })
    }

    pub fn health(&self) -> Option<Health> {
        self.health
    }
}

#[derive(Debug, Default)]
pub struct HealthMetrics {
    pub checks_total: AtomicU64,
    pub failures_total: AtomicU64,
    /// Endpoints now unhealthy or not serving.
    pub unhealthy: AtomicU64,
    pub targets: AtomicU64,
    pub in_flight: AtomicU64,
    pub peak_in_flight: AtomicU64,
    /// Connections kept to endpoints between checks.
    pub connections: AtomicU64,
}

impl HealthMetrics {
    pub fn render(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows = [
            (
                "sync_server_health_checks_total",
                "counter",
                "health checks made",
                load(&self.checks_total),
            ),
            (
                "sync_server_health_check_failures_total",
                "counter",
                "health checks that failed or answered NOT_SERVING",
                load(&self.failures_total),
            ),
            (
                "sync_server_health_unhealthy_endpoints",
                "gauge",
                "endpoints unhealthy or not serving now",
                load(&self.unhealthy),
            ),
            (
                "sync_server_health_targets",
                "gauge",
                "endpoints being checked",
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
                "connections kept to endpoints for health checks",
                load(&self.connections),
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

/// A checked endpoint: its state, its connection between checks, and a
/// generation so that a result or a due time of a removed-and-re-added
/// endpoint is not taken for the new one's.
struct Checked {
    tracker: Tracker,
    channel: Option<Channel>,
    generation: u64,
}

/// One finished check.
struct Done {
    target: Target,
    generation: u64,
    outcome: Outcome,
    channel: Option<Channel>,
}

/// Checks every target of the latest set in `targets` until `shutdown`,
/// and sends a [`Transition`] on every change.
pub async fn run(
    config: HealthConfig,
    mut targets: watch::Receiver<Arc<BTreeSet<Target>>>,
    out: mpsc::UnboundedSender<Transition>,
    metrics: Arc<HealthMetrics>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_concurrent.max(1)));
    let mut rng = SplitMix64::new(Instant::now().elapsed().as_nanos() as u64 ^ 0x5eed);
    let mut checked: HashMap<Target, Checked> = HashMap::new();
    let mut due: BinaryHeap<Reverse<(Instant, u64, Target)>> = BinaryHeap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut generation = 0u64;
    let mut current: Arc<BTreeSet<Target>> = Arc::default();
    targets.mark_changed();
    loop {
        let next_due = due.peek().map(|Reverse((at, _, _))| *at);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = targets.changed() => {
                if changed.is_err() {
                    return;
                }
                let latest = targets.borrow_and_update().clone();
                for gone in current.difference(&latest) {
                    if let Some(old) = checked.remove(gone) {
                        forget(&old, &metrics);
                    }
                }
                for new in latest.difference(&current) {
                    generation += 1;
                    checked.insert(new.clone(), Checked { tracker: Tracker::default(), channel: None, generation });
                    let offset = jitter(&mut rng, config.interval, 0.0, 1.0);
                    due.push(Reverse((Instant::now() + offset, generation, new.clone())));
                }
                current = latest;
                metrics.targets.store(checked.len() as u64, Ordering::Relaxed);
            }
            _ = sleep_until(next_due) => {
                let now = Instant::now();
                while let Some(Reverse((at, _, _))) = due.peek() {
                    if *at > now {
                        break;
                    }
                    let Some(Reverse((_, generation, target))) = due.pop() else { break };
                    let Some(entry) = checked.get_mut(&target).filter(|c| c.generation == generation) else {
                        continue;
                    };
                    let channel = entry.channel.take();
                    tokio::spawn(check(
                        Arc::clone(&config),
                        Arc::clone(&permits),
                        Arc::clone(&metrics),
                        target,
                        generation,
                        channel,
                        done_tx.clone(),
                    ));
                }
            }
            Some(done) = done_rx.recv() => {
                let Some(entry) = checked.get_mut(&done.target).filter(|c| c.generation == done.generation) else {
                    // Removed while in flight: its connection goes with it.
                    if done.channel.is_some() {
                        metrics.connections.fetch_sub(1, Ordering::Relaxed);
                    }
                    continue;
                };
                entry.channel = done.channel;
                let before = entry.tracker.health();
                if let Some(health) = entry.tracker.record(done.outcome, &config) {
                    let was_out = before.is_some_and(|h| !h.takes_calls());
                    match (was_out, health.takes_calls()) {
                        (false, false) => { metrics.unhealthy.fetch_add(1, Ordering::Relaxed); }
                        (true, true) => { metrics.unhealthy.fetch_sub(1, Ordering::Relaxed); }
                        _ => {}
                    }
                    let _ = out.send(Transition { target: done.target.clone(), health });
                }
                let next = Instant::now() + jitter(&mut rng, config.interval, 0.9, 1.1);
                due.push(Reverse((next, done.generation, done.target)));
            }
        }
    }
}

/// Undoes what a removed endpoint counted.
fn forget(old: &Checked, metrics: &HealthMetrics) {
    if old.channel.is_some() {
        metrics.connections.fetch_sub(1, Ordering::Relaxed);
    }
    if old.tracker.health().is_some_and(|h| !h.takes_calls()) {
        metrics.unhealthy.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `interval` × a random factor in `[low, high)`.
fn jitter(rng: &mut SplitMix64, interval: Duration, low: f64, high: f64) -> Duration {
    let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    interval.mul_f64(low + (high - low) * unit)
}

/// Makes one check once a permit is free, and reports it.
async fn check(
    config: Arc<HealthConfig>,
    permits: Arc<Semaphore>,
    metrics: Arc<HealthMetrics>,
    target: Target,
    generation: u64,
    channel: Option<Channel>,
    done: mpsc::UnboundedSender<Done>,
) {
    let Ok(_permit) = permits.acquire_owned().await else {
        return;
    };
    let in_flight = metrics.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    metrics
        .peak_in_flight
        .fetch_max(in_flight, Ordering::Relaxed);
    let had_channel = channel.is_some();
    let channel = channel.or_else(|| connect(&target.addr, config.timeout));
    let name = match &config.check_name {
        CheckName::Registry => target.service.to_string(),
        CheckName::Empty => String::new(),
        CheckName::Fixed(name) => name.clone(),
    };
    let outcome = match &channel {
        Some(channel) => {
            let mut client = HealthClient::new(channel.clone());
            let request = HealthCheckRequest { service: name };
            match tokio::time::timeout(config.timeout, client.check(request)).await {
                Ok(Ok(answer)) => match ServingStatus::try_from(answer.get_ref().status) {
                    Ok(ServingStatus::Serving) => Outcome::Serving,
                    Ok(ServingStatus::NotServing) => Outcome::NotServing,
                    _ => Outcome::Failed,
                },
                _ => Outcome::Failed,
            }
        }
        None => Outcome::Failed,
    };
    metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    metrics.checks_total.fetch_add(1, Ordering::Relaxed);
    if outcome != Outcome::Serving {
        metrics.failures_total.fetch_add(1, Ordering::Relaxed);
    }
    // After a failure the connection is made afresh next time.
    let keep = (outcome != Outcome::Failed).then_some(channel).flatten();
    match (had_channel, keep.is_some()) {
        (false, true) => {
            metrics.connections.fetch_add(1, Ordering::Relaxed);
        }
        (true, false) => {
            metrics.connections.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
    let _ = done.send(Done {
        target,
        generation,
        outcome,
        channel: keep,
    });
}

/// A lazily connected HTTP/2 channel to `addr`; `None` if it is no address.
fn connect(addr: &str, timeout: Duration) -> Option<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).ok()?;
    Some(
        endpoint
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HealthConfig {
        HealthConfig {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            max_concurrent: 4,
            check_name: CheckName::Registry,
        }
    }

    #[test]
    fn thresholds_and_not_serving() {
        let c = config();
        let mut t = Tracker::default();
        assert_eq!(t.record(Outcome::Serving, &c), Some(Health::Healthy));
        assert_eq!(t.record(Outcome::Serving, &c), None);
        assert_eq!(t.record(Outcome::Failed, &c), None);
        assert_eq!(t.record(Outcome::Failed, &c), None);
        assert_eq!(
            t.record(Outcome::Serving, &c),
            None,
            "the run of failures ends"
        );
        for _ in 0..2 {
            assert_eq!(t.record(Outcome::Failed, &c), None);
        }
        assert_eq!(t.record(Outcome::Failed, &c), Some(Health::Unhealthy));
        assert_eq!(t.record(Outcome::Serving, &c), None);
        assert_eq!(t.record(Outcome::Serving, &c), Some(Health::Healthy));
        assert_eq!(
            t.record(Outcome::NotServing, &c),
            Some(Health::NotServing),
            "at once"
        );
        assert_eq!(t.record(Outcome::Serving, &c), None);
        assert_eq!(
            t.record(Outcome::NotServing, &c),
            None,
            "the run of passes ends"
        );
        assert_eq!(t.record(Outcome::Serving, &c), None);
        assert_eq!(t.record(Outcome::Serving, &c), Some(Health::Healthy));
        // Unknown: failures reach the threshold before it is out.
        let mut fresh = Tracker::default();
        assert_eq!(fresh.record(Outcome::Failed, &c), None);
        assert_eq!(fresh.record(Outcome::Failed, &c), None);
        assert_eq!(fresh.record(Outcome::Failed, &c), Some(Health::Unhealthy));
    }

    #[test]
    fn jitter_stays_in_its_band() {
        let mut rng = SplitMix64::new(1);
        for _ in 0..1000 {
            let d = jitter(&mut rng, Duration::from_millis(1000), 0.9, 1.1);
            assert!((900..1100).contains(&d.as_millis()), "{d:?}");
        }
    }
}
