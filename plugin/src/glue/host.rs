//! The host calls every role makes: the log, the clock, shared data and
//! Envoy's stats. Each handles its `Result` here, so a host error never
//! panics (a panic would take the VM, and every call of this worker, down
//! with it); the roles call these rather than `proxy_wasm::hostcalls`
//! wherever one fits.

use crate::feed::{queue_ids, QUEUES_KEY};
use crate::filter_state::{support_probes, SET_FILTER_STATE};
use crate::{Version, VERSION_KEY};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{LogLevel, MetricType, Status};
use std::time::{SystemTime, UNIX_EPOCH};
pub(super) fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Whether this Envoy has what the filter-state override needs; when it
/// does not, says which piece is missing, and the plugin refuses to load
/// rather than let calls fail one by one.
pub(super) fn envoy_supports_override() -> bool {
    for (arguments, missing) in support_probes() {
        if let Err(Status::NotFound) =
            hostcalls::call_foreign_function(SET_FILTER_STATE, Some(&arguments))
        {
            log(
                LogLevel::Critical,
                &format!("etcd-mesh: {missing}; use an Envoy from 1.36 on, or \"host_override\": \"header\""),
            );
            return false;
        }
    }
    true
}

pub(super) fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
}

pub(super) fn now_ms() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The host clock in nanoseconds: the seed of each VM's randomness (the
/// wasm32-unknown-unknown target has no other source).
pub(super) fn clock_seed() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The host clock in microseconds, for measuring how long work took.
pub(super) fn now_us() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A shared-data value; `Ok(None)` when the key holds nothing yet.
pub(super) fn shared(key: &str) -> Result<Option<Vec<u8>>, String> {
    hostcalls::get_shared_data(key)
        .map(|(value, _)| value)
        .map_err(|status| format!("cannot read shared data {key:?}: {status:?}"))
}

pub(super) fn set_shared(key: &str, value: &[u8]) -> Result<(), String> {
    hostcalls::set_shared_data(key, Some(value), None)
        .map_err(|status| format!("shared data refused {key:?}: {status:?}"))
}

/// Reads, changes and writes a shared-data value, retrying when another
/// VM wrote in between. `change` returns `None` to leave it as it is.
pub(super) fn update_shared(
    key: &str,
    change: impl Fn(Option<&[u8]>) -> Option<Vec<u8>>,
) -> Result<bool, Status> {
    for _ in 0..16 {
        let (value, cas) = hostcalls::get_shared_data(key)?;
        let Some(new) = change(value.as_deref()) else {
            return Ok(false);
        };
        match hostcalls::set_shared_data(key, Some(&new), cas) {
            Ok(()) => return Ok(true),
            Err(Status::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Status::CasMismatch)
}

pub(super) fn read_version() -> Option<Version> {
    match hostcalls::get_shared_data(VERSION_KEY) {
        Ok((Some(bytes), _)) => Version::decode(&bytes),
        _ => None,
    }
}

pub(super) fn bump_version(change: impl Fn(&mut Version)) -> Result<bool, Status> {
    update_shared(VERSION_KEY, |bytes| {
        let mut version = bytes.and_then(Version::decode).unwrap_or_default();
        change(&mut version);
        Some(version.encode().to_vec())
    })
}

/// A stat in Envoy (`wasmcustom.<name>`), or nothing if the host refused it.
#[derive(Clone, Copy)]
pub(super) struct Metric(Option<u32>);

impl Metric {
    pub(super) fn define(kind: MetricType, name: &str) -> Metric {
        Metric(hostcalls::define_metric(kind, name).ok())
    }
    pub(super) fn add(self, delta: u64) {
        if let (Some(id), true) = (self.0, delta > 0) {
            let _ = hostcalls::increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX));
        }
    }
    pub(super) fn set(self, value: u64) {
        if let Some(id) = self.0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Tells every worker that the version moved (best effort: a worker that
/// misses it catches up on its tick).
pub(super) fn notify_workers() {
    if let Ok((Some(bytes), _)) = hostcalls::get_shared_data(QUEUES_KEY) {
        for id in queue_ids(&bytes) {
            let _ = hostcalls::enqueue_shared_queue(id, Some(&[]));
        }
    }
}
