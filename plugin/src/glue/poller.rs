//! The poller: the singleton (`role: poller`) that follows one
//! sync-server replica's change feed ([`Replicas`] decides which, and when
//! to move), writes what changed to shared data and notifies the workers.
//! Its logic lives in [`crate::feed`] and [`crate::replicas`]; this is
//! the part that sends the calls and writes the results.

use super::host::{
    bump_version, clock_seed, log, notify_workers, now, now_ms, now_us, set_shared, Metric,
};
use crate::config::PollerConfig;
use crate::feed::{service_key, PollerTables, CHANGES_KEY, INDEX_KEY};
use crate::replicas::{Call, Replicas, Why};
use etcd_mesh_wire::{Changes, Status as ServerStatus};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};
use std::time::{Duration, SystemTime};
/// How often the poller checks whether a poll (after a backoff) or a status
/// probe is due: probes every `probe_ms` go out within a tick of it.
pub(super) const POLLER_TICK: Duration = Duration::from_millis(100);
/// The path of a sync-server replica's status.
const STATUS_PATH: &str = "/v1/status";
/// The most calls the poller sends at once.
const SENDS_PER_DRIVE: usize = 256;

/// The singleton that keeps shared data up to date, following one
/// sync-server replica ([`Replicas`] decides which, and when to move).
pub(super) struct Poller {
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
    pub(super) fn new(config: PollerConfig) -> Poller {
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

    pub(super) fn on_tick(&mut self) {
        let now = now();
        if let Some(answered) = self.last_answer {
            let age = now.duration_since(answered).unwrap_or_default();
            self.age.set(age.as_millis() as u64);
        }
        let held_epoch = self.tables.cursor().map(|held| held.epoch);
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

    pub(super) fn on_response(&mut self, token: u32, headers: usize, body_size: usize) {
        // Answers of calls abandoned (a replica left) are not wanted.
        let Some(call) = self.replicas.take(token) else {
            return;
        };
        // A call that failed (reset, timeout, or an answer over Envoy's
        // buffer limit, drained) has no response headers, and the SDK's
        // readers panic on the status the host then returns: read nothing.
        let status = (headers > 0)
            .then(|| {
                hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
                    .ok()
                    .flatten()
            })
            .flatten();
        let body = || {
            (body_size > 0)
                .then(|| {
                    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                        .ok()
                        .flatten()
                })
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
                None => self.fail(
                    call,
                    "did not answer (timeout, reset, or an answer over Envoy's 32 MiB limit for a plugin's call: scope the poller with `services`)",
                ),
            },
            Call::Check { .. } | Call::Survey { .. } => {
                let outcome = match status.as_deref() {
                    Some("200") => ServerStatus::decode(&body()).map_err(|e| format!("sent {e}")),
                    Some(other) => Err(format!("answered {other}")),
                    None => Err("did not answer (timeout or reset)".into()),
                };
                match outcome {
                    Ok(server) => {
                        let held_epoch = self.tables.cursor().map(|held| held.epoch);
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
        let held_epoch = self.tables.cursor().map(|held| held.epoch);
        self.replicas.probed(call, now_ms(), None, held_epoch);
    }
}
