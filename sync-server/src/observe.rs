//! What this process observes of the endpoints, put into what it serves:
//! the health-check results ([`crate::health`]) become each endpoint's
//! `health`, published between etcd revisions (the position's health
//! count moves on, see [`crate::history::Position`]).
//!
//! Two tasks: one keeps the health checks' target list in step with the
//! published tables; the other applies the checks' results to the
//! registry and publishes the services they changed, in batches. A third
//! drops arrival stamps (`serving_since_ms`) past their horizon, the same
//! way, so that what every process serves converges.

use crate::health::{Target, Transition};
use crate::publish::Publisher;
use crate::registry::{lock, unix_ms, Registry};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Every endpoint of the registry's tables read through a watch with
/// health checks, as health-check targets.
pub fn targets_of(registry: &Registry) -> BTreeSet<Target> {
    registry
        .tables()
        .services
        .iter()
        .flat_map(|(name, built)| {
            built
                .service
                .endpoints
                .iter()
                .filter(|e| registry.checked(name, &e.addr))
                .map(|e| Target {
                    service: Arc::clone(name),
                    addr: e.addr.clone(),
                })
        })
        .collect()
}

/// Sends the target list anew whenever the published revision moves (a
/// health change alone does not change which endpoints exist).
pub async fn follow_targets(
    registry: Arc<Mutex<Registry>>,
    publisher: Publisher,
    targets: watch::Sender<Arc<BTreeSet<Target>>>,
    shutdown: CancellationToken,
) {
    let mut published = publisher.subscribe();
    let mut sent_revision = None;
    loop {
        let current = published.borrow_and_update().clone();
        if let Some(current) = current {
            if sent_revision != Some(current.revision) {
                sent_revision = Some(current.revision);
                let latest = targets_of(&lock(&registry));
                targets.send_replace(Arc::new(latest));
            }
        }
        tokio::select! {
            changed = published.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Applies health transitions as they come, all that are waiting at once,
/// and publishes the services they changed. Nothing is published before
/// the first etcd listing: a snapshot loaded from file is not rebuilt.
pub async fn apply_health(
    registry: Arc<Mutex<Registry>>,
    publisher: Publisher,
    mut transitions: mpsc::UnboundedReceiver<Transition>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            first = transitions.recv() => first,
            _ = shutdown.cancelled() => return,
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        while let Ok(next) = transitions.try_recv() {
            batch.push(next);
        }
        let now = unix_ms();
        let mut registry = lock(&registry);
        for Transition { target, health } in &batch {
            if registry.set_health(&target.service, &target.addr, *health, now) {
                info!(service = %target.service, addr = %target.addr, health = health.name(), "endpoint health changed");
            }
        }
        if !registry.primed() {
            continue;
        }
        let commit = registry.commit_health(now);
        if !commit.services.is_empty() {
            publisher.publish_health(commit, registry.tables().clone());
        }
    }
}

/// The default of `--stamp-horizon`: ten times a generous slow start.
pub const DEFAULT_STAMP_HORIZON: Duration = Duration::from_secs(600);

/// Every second, drops the arrival stamps older than `horizon` and
/// publishes the services that lose one (a health change: the revision
/// stays, the health count moves on).
pub async fn expire_stamps(
    registry: Arc<Mutex<Registry>>,
    publisher: Publisher,
    horizon: Duration,
    shutdown: CancellationToken,
) {
    let horizon_ms = u64::try_from(horizon.as_millis()).unwrap_or(u64::MAX);
    let mut tick =
        tokio::time::interval(Duration::from_secs(1).min(horizon.max(Duration::from_millis(10))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = unix_ms();
        let mut registry = lock(&registry);
        if !registry.expire_stamps(now, horizon_ms) || !registry.primed() {
            continue;
        }
        let commit = registry.commit_health(now);
        if !commit.services.is_empty() {
            publisher.publish_health(commit, registry.tables().clone());
        }
    }
}
