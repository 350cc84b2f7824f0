//! When each target is checked: the one task that runs the checks.
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
//! Each target keeps one channel ([`super::check`]) across its checks, up
//! to `max_connections`. A failed check drops it, so the next check
//! connects afresh and finds a backend restarted on the same address. A
//! check task that panics counts as a failed check; the scheduler and the
//! other targets' checks go on.

use super::check::{check, connect_lazy, HealthTls};
use super::{HealthConfig, Observation, Target, Tracker, Transition};
use crate::metrics::HealthMetrics;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig};

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

/// A random duration in `[0, limit)`; zero when `limit` is.
fn random_below(limit: Duration) -> Duration {
    let nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(fastrand::u64(..nanos))
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
        Scheduler {
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            config,
            out,
            metrics,
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
            let first = now + random_below(self.config.interval);
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

    /// The interval, ±10% at random.
    fn jittered_interval(&self) -> Duration {
        let interval = self.config.interval;
        let tenth = interval / 10;
        (interval - tenth) + random_below(tenth * 2)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_intervals_are_held_in_range() {
        assert!(scheduler(Duration::ZERO).jittered_interval() >= Duration::from_micros(900));
        let mut huge = scheduler(Duration::MAX);
        assert!(huge.jittered_interval() <= Duration::from_secs(86_400 * 11 / 10));
        // The first check of a new target falls within one (held) interval,
        // without overflowing the clock.
        let before = Instant::now();
        huge.set_targets(&targets(["a".to_owned()]));
        let after = Instant::now();
        assert_eq!(huge.entries.len(), 1);
        let Reverse((first, id)) = *huge.due.peek().expect("the first check is scheduled");
        assert!(huge.entries.contains_key(&id));
        assert!(
            first >= before && first < after + Duration::from_secs(86_400),
            "first check {:?} from now",
            first.saturating_duration_since(before)
        );
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
        let scheduler = scheduler(Duration::from_millis(1000));
        for _ in 0..1000 {
            let d = scheduler.jittered_interval();
            assert!(
                d >= Duration::from_millis(900) && d < Duration::from_millis(1100),
                "{d:?}"
            );
            assert!(random_below(Duration::from_millis(1000)) < Duration::from_millis(1000));
        }
        assert_eq!(random_below(Duration::ZERO), Duration::ZERO);
    }
}
