//! Counters and gauges for `/metrics`, in the Prometheus text format.
//!
//! Counters are atomics bumped where things happen; gauges about the
//! snapshot are read from what is published at scrape time, so they cannot
//! disagree with what `/v1/snapshot` serves.
//!
//! Three sets: [`Metrics`], always; [`HealthMetrics`], the active health
//! checks' own, while they run; [`TlsMetrics`], the HTTPS side's own, while
//! it serves HTTPS.

use crate::publish::Publisher;
use crate::registry::unix_ms;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Times the etcd sync started over (connect, list, watch).
    pub sync_restarts: AtomicU64,
    /// 1 while the watch on etcd is established.
    pub etcd_connected: AtomicU64,
    /// When this process last proved contact with the etcd majority (a
    /// listing or a quorum read answered), in Unix milliseconds; 0 never.
    pub last_proof_ms: AtomicU64,
    /// Times etcd's revision was seen going back (a restored backup).
    pub etcd_restores_total: AtomicU64,
    /// Registrations rejected (each counted once, when first seen).
    pub rejected_total: AtomicU64,
    /// Long-polls being held right now.
    pub long_poll_waiters: AtomicUsize,
    /// Requests refused for a missing or wrong bearer token.
    pub unauthorized_total: AtomicU64,
    /// Long-polls refused because the most allowed were held.
    pub long_polls_refused_total: AtomicU64,
    /// Change-feed answers by kind.
    pub changes_full_total: AtomicU64,
    pub changes_delta_total: AtomicU64,
    /// The health checks' own, when they run.
    pub health: std::sync::OnceLock<Arc<HealthMetrics>>,
    /// The HTTPS side's own, when it serves HTTPS.
    pub tls: std::sync::OnceLock<Arc<TlsMetrics>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// Counts one held long-poll for as long as the guard lives, unless
    /// `max` are held already.
    pub fn try_waiter(self: &Arc<Self>, max: usize) -> Option<WaiterGuard> {
        self.long_poll_waiters
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < max).then_some(held + 1)
            })
            .ok()?;
        Some(WaiterGuard(Arc::clone(self)))
    }

    /// Records a proof of contact with the etcd majority, now.
    pub fn proved(&self) {
        self.last_proof_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// How long ago contact with the etcd majority was last proven.
    pub fn proof_age(&self) -> Option<std::time::Duration> {
        match self.last_proof_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(std::time::Duration::from_millis(
                unix_ms().saturating_sub(at),
            )),
        }
    }

    pub fn render(&self, publisher: &Publisher, max_long_polls: usize) -> String {
        let current = publisher.current();
        let tables = current.as_ref().map(|p| &p.tables);
        let services = tables.map_or(0, |t| t.services.len());
        let endpoints = tables.map_or(0, |t| t.endpoints);
        let rejected = tables.map_or(0, |t| t.rejected.len());
        let digest = tables.map_or(0, |t| t.digest.value());
        let revision = current.as_ref().map_or(0, |p| p.revision);
        let stale = current.as_ref().is_some_and(|p| p.stale);
        let history = current.as_ref().map_or(0, |p| p.history.len());
        let floor = current.as_ref().map_or(0, |p| p.history.floor().revision);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 20] = [
            (
                "sync_server_ready",
                "gauge",
                "1 once a snapshot is held",
                u64::from(current.is_some()),
            ),
            (
                "sync_server_revision",
                "gauge",
                "etcd revision of the served snapshot",
                revision,
            ),
            (
                "sync_server_health_seq",
                "gauge",
                "health-check changes published (they move the tables between revisions)",
                current.as_ref().map_or(0, |p| p.health_seq),
            ),
            (
                "sync_server_stale",
                "gauge",
                "1 while no contact with the etcd majority was proven within --freshness-timeout (the last tables are served)",
                u64::from(stale),
            ),
            (
                "sync_server_services",
                "gauge",
                "services in the served snapshot",
                services as u64,
            ),
            (
                "sync_server_endpoints",
                "gauge",
                "endpoints in the served snapshot",
                endpoints as u64,
            ),
            (
                "sync_server_rejected",
                "gauge",
                "registrations rejected in the served snapshot",
                rejected as u64,
            ),
            (
                "sync_server_rejected_total",
                "counter",
                "registrations rejected since start",
                load(&self.rejected_total),
            ),
            (
                "sync_server_etcd_connected",
                "gauge",
                "1 while the etcd watch is established",
                load(&self.etcd_connected),
            ),
            (
                "sync_server_etcd_restores_total",
                "counter",
                "times etcd's revision went back (a restored backup): a new epoch was published",
                load(&self.etcd_restores_total),
            ),
            (
                "sync_server_sync_restarts_total",
                "counter",
                "times the etcd sync started over (reconnect, compaction, broken watch)",
                load(&self.sync_restarts),
            ),
            (
                "sync_server_long_poll_waiters",
                "gauge",
                "long-polls being held",
                self.long_poll_waiters.load(Ordering::Relaxed) as u64,
            ),
            (
                "sync_server_long_poll_limit",
                "gauge",
                "the most long-polls held at once (--max-long-polls)",
                max_long_polls as u64,
            ),
            (
                "sync_server_long_polls_refused_total",
                "counter",
                "long-polls answered 503 because the limit was reached",
                load(&self.long_polls_refused_total),
            ),
            (
                "sync_server_tables_digest",
                "gauge",
                "digest of the served services (the plugin's table_digest when it holds the same)",
                digest,
            ),
            (
                "sync_server_history_changes",
                "gauge",
                "revisions held in the change history",
                history as u64,
            ),
            (
                "sync_server_history_floor_revision",
                "gauge",
                "the oldest revision a delta can start from",
                floor,
            ),
            (
                "sync_server_changes_full_total",
                "counter",
                "change-feed answers that carried everything",
                load(&self.changes_full_total),
            ),
            (
                "sync_server_changes_delta_total",
                "counter",
                "change-feed answers that carried changes only",
                load(&self.changes_delta_total),
            ),
            (
                "sync_server_unauthorized_total",
                "counter",
                "requests refused for a missing or wrong bearer token",
                load(&self.unauthorized_total),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP sync_server_etcd_proof_age_seconds seconds since contact with the etcd majority was last proven (-1: never)\n\
             # TYPE sync_server_etcd_proof_age_seconds gauge\n\
             sync_server_etcd_proof_age_seconds {}",
            self.proof_age().map_or(-1.0, |age| age.as_secs_f64())
        );
        if let Some(health) = self.health.get() {
            health.render(&mut out);
        }
        if let Some(tls) = self.tls.get() {
            tls.render(&mut out);
        }
        out
    }
}

#[derive(Debug)]
pub struct WaiterGuard(Arc<Metrics>);

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.0.long_poll_waiters.fetch_sub(1, Ordering::Relaxed);
    }
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

/// Counters of the HTTPS side, rendered into `/metrics` when it is on.
#[derive(Debug, Default)]
pub struct TlsMetrics {
    /// Handshakes that failed or timed out (a client without the right
    /// certificate, a plain-HTTP client, a scanner).
    pub handshake_failures: AtomicU64,
    /// Times the files changed and were taken.
    pub reloads: AtomicU64,
    /// Times the files changed and could not be used (the previous
    /// configuration was kept).
    pub reload_failures: AtomicU64,
}

impl TlsMetrics {
    /// Appends the TLS rows in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let rows = [
            (
                "sync_server_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out",
                &self.handshake_failures,
            ),
            (
                "sync_server_tls_reloads_total",
                "times the TLS files changed and were taken for new connections",
                &self.reloads,
            ),
            (
                "sync_server_tls_reload_failures_total",
                "times the TLS files changed but could not be used (the previous ones are kept)",
                &self.reload_failures,
            ),
        ];
        for (name, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
