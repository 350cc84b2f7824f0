//! Passive outlier ejection, after Envoy's outlier detection.
//!
//! Each worker counts the failures in a row of every endpoint it sends
//! calls to, per service (one `ip:port` may serve two services, and fail
//! for one only) (a connect failure, a reset or an upstream `UNAVAILABLE` all
//! reach the filter as gRPC status 14). At the threshold it ejects the
//! endpoint for every worker of the Envoy through shared data: the n-th
//! ejection of an endpoint lasts n times the base, up to a cap, and at most
//! a share of a service's endpoints is out at once. Successes cost nothing
//! beyond resetting a local counter.
//!
//! Some failures say more than others ([`failure_kind`]). A connect failure
//! (refused, or no answer within the cluster's `connect_timeout`) is
//! definitive: nothing listens there, or nothing is there. With
//! `eject_on_connect_failure` (the default) it ejects the endpoint at once,
//! under the same bounds, instead of counting towards the threshold. A
//! connection lost before the response (the backend died mid-call, or the
//! HTTP/2 keepalive found it unreachable) ejects at once only with
//! `eject_on_connection_loss` (off by default: a healthy backend can lose a
//! connection too). Any other failure — a backend's own `UNAVAILABLE`, a
//! reset stream — keeps counting.

use crate::config::OutlierConfig;
use std::collections::HashMap;

/// gRPC `UNAVAILABLE`: what Envoy answers for a connect failure or reset,
/// and what a backend that cannot serve says.
const UNAVAILABLE: &str = "14";

/// Envoy's response flag `UF` (`UpstreamConnectionFailure`), bit 5 of the
/// `response.flags` property: the upstream connection could not be made
/// (refused, reset while connecting, or `connect_timeout` passed).
pub const UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5;

/// Envoy's response flag `UC` (`UpstreamConnectionTermination`), bit 6 of
/// `response.flags`: the connection the call was on went away under it.
pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 1 << 6;

/// The response code details Envoy gives a call whose upstream failed
/// before any response: `upstream_reset_before_response_started{<reason>}`
/// (the reason may be followed by `|<transport failure reason>`).
const RESET_BEFORE_RESPONSE: &str = "upstream_reset_before_response_started{";

/// Whether a call failed in the outlier sense, from its `grpc-status`.
pub fn is_failure(grpc_status: &str) -> bool {
    grpc_status.trim() == UNAVAILABLE
}

/// How a finished call counts for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Anything but an `UNAVAILABLE`.
    Success,
    /// An `UNAVAILABLE` from the backend itself, or a reset that says
    /// nothing of the connection.
    Failure,
    /// The connection the call was on went away before any response: the
    /// backend died mid-call, or the HTTP/2 keepalive closed a connection
    /// that stopped answering (Envoy's `UC`).
    ConnectionLost,
    /// Envoy could not connect to the endpoint at all (Envoy's `UF`).
    ConnectFailure,
}

/// Classifies a failed call (`grpc-status` 14) from what Envoy says of it:
/// its `response.flags` bitmask and its `response.code_details`, either
/// of which may be missing.
///
/// A connect failure is `UF`, or a reset before the response whose reason
/// is a connection failure (`local_connection_failure`,
/// `remote_connection_failure`; `connection_failure` before Envoy 1.28) or
/// a connect timeout (`connection_timeout`). A lost connection is `UC`, or
/// the reason `connection_termination`. A reply that came from the backend
/// (`via_upstream`) is a plain failure, whatever its flags.
pub fn failure_kind(response_flags: Option<u64>, code_details: Option<&str>) -> Outcome {
    let details = code_details.map(str::trim);
    if details == Some("via_upstream") {
        return Outcome::Failure;
    }
    let flags = response_flags.unwrap_or(0);
    let reason = details
        .and_then(|d| d.strip_prefix(RESET_BEFORE_RESPONSE))
        .and_then(|rest| rest.split(['|', '}']).next())
        .unwrap_or_default();
    if flags & UPSTREAM_CONNECTION_FAILURE != 0
        || matches!(
            reason,
            "local_connection_failure"
                | "remote_connection_failure"
                | "connection_failure"
                | "connection_timeout"
        )
    {
        Outcome::ConnectFailure
    } else if flags & UPSTREAM_CONNECTION_TERMINATION != 0 || reason == "connection_termination" {
        Outcome::ConnectionLost
    } else {
        Outcome::Failure
    }
}

/// Why an endpoint is to be ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectReason {
    /// `consecutive_failures` failures in a row.
    Failures(u32),
    /// One connect failure, with `eject_on_connect_failure`.
    ConnectFailure,
    /// One connection lost before the response, with
    /// `eject_on_connection_loss`.
    ConnectionLost,
}

/// One worker's failure counts, by service and address.
#[derive(Debug, Default)]
pub struct FailureCounter {
    in_a_row: HashMap<String, HashMap<String, u32>>,
}

impl FailureCounter {
    /// Records a call's outcome; says why `addr` of `service` is to be
    /// ejected now, if it is: a connect failure (or a lost connection) at
    /// once when `config` says so, otherwise the failures in a row
    /// reaching `consecutive_failures`. Either starts the count over.
    pub fn record(
        &mut self,
        service: &str,
        addr: &str,
        outcome: Outcome,
        config: &OutlierConfig,
    ) -> Option<EjectReason> {
        if outcome == Outcome::Success {
            // Lookup first: the common path allocates nothing.
            if let Some(count) = self
                .in_a_row
                .get_mut(service)
                .and_then(|by_addr| by_addr.get_mut(addr))
            {
                *count = 0;
            }
            return None;
        }
        let by_addr = self.in_a_row.entry(service.to_owned()).or_default();
        let count = by_addr.entry(addr.to_owned()).or_insert(0);
        let at_once = match outcome {
            Outcome::ConnectFailure if config.eject_on_connect_failure => {
                Some(EjectReason::ConnectFailure)
            }
            Outcome::ConnectionLost if config.eject_on_connection_loss => {
                Some(EjectReason::ConnectionLost)
            }
            _ => None,
        };
        if at_once.is_some() {
            *count = 0;
            return at_once;
        }
        *count += 1;
        if *count >= config.consecutive_failures {
            *count = 0;
            return Some(EjectReason::Failures(config.consecutive_failures));
        }
        None
    }
}

/// An endpoint's ejection record, kept after it ends so that the next one
/// lasts longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    pub service: String,
    pub addr: String,
    /// Milliseconds since the epoch (host clock) when it ends.
    pub until_ms: u64,
    /// How many times in a row the endpoint has been ejected.
    pub times: u32,
}

/// All ejection records of one Envoy, as kept in shared data: one
/// `until_ms times service addr` line each (the service name may hold
/// spaces; an address never does). Lines that do not parse are skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ejections(pub Vec<Ejection>);

impl Ejections {
    pub fn decode(bytes: &[u8]) -> Ejections {
        let text = String::from_utf8_lossy(bytes);
        let records = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.splitn(3, ' ');
                let until_ms = fields.next()?.parse().ok()?;
                let times = fields.next()?.parse().ok()?;
                let (service, addr) = fields.next()?.rsplit_once(' ')?;
                Some(Ejection {
                    service: service.to_owned(),
                    addr: addr.to_owned(),
                    until_ms,
                    times,
                })
            })
            .collect();
        Ejections(records)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        for e in &self.0 {
            out.push_str(&format!(
                "{} {} {} {}\n",
                e.until_ms, e.times, e.service, e.addr
            ));
        }
        out.into_bytes()
    }

    /// The endpoints out at `now_ms`.
    pub fn active(&self, now_ms: u64) -> impl Iterator<Item = &Ejection> {
        self.0.iter().filter(move |e| e.until_ms > now_ms)
    }

    /// Ejects `addr` of `service` at `now_ms` if the rules allow: not
    /// already out, a name that fits a line, and fewer than the allowed
    /// share of the service's `live` endpoints out (`ejected_in_service` of
    /// them are). Returns the new record.
    pub fn eject(
        &mut self,
        service: &str,
        addr: &str,
        now_ms: u64,
        config: &OutlierConfig,
        live: usize,
        ejected_in_service: usize,
    ) -> Option<Ejection> {
        if ejected_in_service >= max_ejectable(live, config.max_ejection_percent)
            || service.contains('\n')
        {
            return None;
        }
        let previous = self
            .0
            .iter()
            .position(|e| e.addr == addr && e.service == service);
        let times = match previous.map(|i| &self.0[i]) {
            Some(e) if e.until_ms > now_ms => return None,
            // Healthy for a whole maximum ejection since: start over.
            Some(e) if now_ms.saturating_sub(e.until_ms) > config.max_ejection_ms => 1,
            Some(e) => e.times.saturating_add(1),
            None => 1,
        };
        let length = config
            .base_ejection_ms
            .saturating_mul(u64::from(times))
            .min(config.max_ejection_ms);
        let record = Ejection {
            service: service.to_owned(),
            addr: addr.to_owned(),
            until_ms: now_ms.saturating_add(length),
            times,
        };
        match previous {
            Some(i) => self.0[i] = record.clone(),
            None => self.0.push(record.clone()),
        }
        // Forget records long over, so the list stays small.
        let horizon = config.max_ejection_ms.saturating_mul(2);
        self.0
            .retain(|e| now_ms.saturating_sub(e.until_ms) <= horizon);
        Some(record)
    }
}

/// How many of `live` endpoints may be out at once: the percentage, but at
/// least one when there are two or more, and never all of them.
pub fn max_ejectable(live: usize, percent: u32) -> usize {
    if live < 2 || percent == 0 {
        return 0;
    }
    (live * percent as usize / 100).clamp(1, live - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection_ms: 1000,
            max_ejection_ms: 5000,
            max_ejection_percent: 50,
            eject_on_connect_failure: true,
            eject_on_connection_loss: false,
        }
    }

    #[test]
    fn counts_failures_in_a_row() {
        use Outcome::{Failure, Success};
        let c = config();
        let mut counter = FailureCounter::default();
        assert_eq!(counter.record("s", "a", Failure, &c), None);
        assert_eq!(counter.record("s", "a", Failure, &c), None);
        assert_eq!(counter.record("s", "a", Success, &c), None);
        assert_eq!(counter.record("s", "a", Failure, &c), None);
        assert_eq!(counter.record("s", "a", Failure, &c), None);
        assert_eq!(
            counter.record("t", "a", Failure, &c),
            None,
            "another service's count"
        );
        assert_eq!(
            counter.record("s", "a", Failure, &c),
            Some(EjectReason::Failures(3))
        );
        assert_eq!(
            counter.record("s", "a", Failure, &c),
            None,
            "counting starts over"
        );
        assert!(is_failure("14") && is_failure(" 14") && !is_failure("0") && !is_failure("2"));
    }

    #[test]
    fn a_connect_failure_ejects_at_once_when_configured() {
        use Outcome::{ConnectFailure, ConnectionLost, Failure};
        let c = config();
        let mut counter = FailureCounter::default();
        assert_eq!(
            counter.record("s", "a", ConnectFailure, &c),
            Some(EjectReason::ConnectFailure)
        );
        // It starts the count over: two plain failures are not enough.
        assert_eq!(counter.record("s", "a", Failure, &c), None);
        assert_eq!(counter.record("s", "a", Failure, &c), None);
        assert_eq!(
            counter.record("s", "a", ConnectFailure, &c),
            Some(EjectReason::ConnectFailure)
        );
        // A lost connection counts, by default, like any failure.
        assert_eq!(counter.record("s", "a", ConnectionLost, &c), None);
        assert_eq!(counter.record("s", "a", ConnectionLost, &c), None);
        assert_eq!(
            counter.record("s", "a", Failure, &c),
            Some(EjectReason::Failures(3))
        );
        // Turned off, a connect failure is one more failure in a row.
        let off = OutlierConfig {
            eject_on_connect_failure: false,
            ..c
        };
        let mut counter = FailureCounter::default();
        assert_eq!(counter.record("s", "a", ConnectFailure, &off), None);
        assert_eq!(counter.record("s", "a", Failure, &off), None);
        assert_eq!(
            counter.record("s", "a", ConnectFailure, &off),
            Some(EjectReason::Failures(3))
        );
        // With `eject_on_connection_loss`, a lost connection ejects at once.
        let lost = OutlierConfig {
            eject_on_connection_loss: true,
            ..c
        };
        let mut counter = FailureCounter::default();
        assert_eq!(counter.record("s", "a", Failure, &lost), None);
        assert_eq!(
            counter.record("s", "a", ConnectionLost, &lost),
            Some(EjectReason::ConnectionLost)
        );
        assert_eq!(
            counter.record("s", "a", Failure, &lost),
            None,
            "counted from 0"
        );
        assert_eq!(counter.record("s", "a", Failure, &lost), None);
    }

    #[test]
    fn classifies_connect_failures_from_flags_and_details() {
        use Outcome::{ConnectFailure, ConnectionLost, Failure};
        const UF: u64 = UPSTREAM_CONNECTION_FAILURE;
        // Envoy 1.40, connection refused and connect timeout.
        let refused = "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}";
        assert_eq!(failure_kind(Some(UF), Some(refused)), ConnectFailure);
        assert_eq!(
            failure_kind(None, Some(refused)),
            ConnectFailure,
            "details alone"
        );
        assert_eq!(failure_kind(Some(UF), None), ConnectFailure, "flags alone");
        let timeout = "upstream_reset_before_response_started{connection_timeout}";
        assert_eq!(failure_kind(None, Some(timeout)), ConnectFailure);
        let local = "upstream_reset_before_response_started{local_connection_failure}";
        assert_eq!(failure_kind(None, Some(local)), ConnectFailure);
        let old = "upstream_reset_before_response_started{connection_failure}";
        assert_eq!(failure_kind(None, Some(old)), ConnectFailure, "before 1.28");
        assert_eq!(
            failure_kind(Some(UF | 1 << 4), None),
            ConnectFailure,
            "with other flags"
        );
        // A connection that was up and went away under the call.
        let termination = "upstream_reset_before_response_started{connection_termination}";
        assert_eq!(
            failure_kind(Some(1 << 6), Some(termination)),
            ConnectionLost,
            "UC"
        );
        assert_eq!(failure_kind(None, Some(termination)), ConnectionLost);
        assert_eq!(failure_kind(Some(1 << 6), None), ConnectionLost);
        assert_eq!(
            failure_kind(Some((1 << 6) | UF), None),
            ConnectFailure,
            "a connect failure says more"
        );
        let reset = "upstream_reset_before_response_started{remote_reset}";
        assert_eq!(failure_kind(Some(1 << 4), Some(reset)), Failure, "UR");
        let overflow = "upstream_reset_before_response_started{overflow}";
        assert_eq!(failure_kind(Some(1 << 7), Some(overflow)), Failure, "UO");
        // The backend's own UNAVAILABLE, whatever flags come with it.
        assert_eq!(failure_kind(Some(0), Some("via_upstream")), Failure);
        assert_eq!(failure_kind(Some(UF), Some("via_upstream")), Failure);
        // Nothing known: a plain failure.
        assert_eq!(failure_kind(None, None), Failure);
        assert_eq!(failure_kind(Some(0), Some("")), Failure);
        assert_eq!(
            failure_kind(
                None,
                Some("upstream_reset_before_response_started{connection_failures}")
            ),
            Failure,
            "a reason is matched whole"
        );
    }

    #[test]
    fn ejections_grow_cap_and_reset() {
        let c = config();
        let mut list = Ejections::default();
        let first = list.eject("s", "a", 10_000, &c, 4, 0).expect("ejected");
        assert_eq!((first.until_ms, first.times), (11_000, 1));
        assert_eq!(list.eject("s", "a", 10_500, &c, 4, 1), None, "already out");
        let second = list.eject("s", "a", 12_000, &c, 4, 0).expect("ejected");
        assert_eq!((second.until_ms, second.times), (14_000, 2));
        for _ in 0..5 {
            let until = list.0[0].until_ms;
            list.eject("s", "a", until, &c, 4, 0).expect("ejected");
        }
        let capped = list.0[0].clone();
        assert!(capped.times >= 5);
        let now = capped.until_ms;
        let again = list.eject("s", "a", now, &c, 4, 0).expect("ejected");
        assert_eq!(again.until_ms - now, 5000, "capped at the maximum");
        let later = again.until_ms + 5001;
        let fresh = list.eject("s", "a", later, &c, 4, 0).expect("ejected");
        assert_eq!(fresh.times, 1, "healthy for long enough: starts over");
    }

    #[test]
    fn never_ejects_too_many() {
        assert_eq!(max_ejectable(1, 50), 0);
        assert_eq!(max_ejectable(2, 50), 1);
        assert_eq!(max_ejectable(3, 10), 1, "at least one");
        assert_eq!(max_ejectable(10, 50), 5);
        assert_eq!(max_ejectable(4, 100), 3, "never all");
        assert_eq!(max_ejectable(4, 0), 0);
        let c = config();
        let mut list = Ejections::default();
        assert!(list.eject("s", "a", 0, &c, 2, 0).is_some());
        assert!(list.eject("s", "b", 0, &c, 2, 1).is_none());
        assert!(
            list.eject("t", "a", 0, &c, 2, 0).is_some(),
            "the same address in another service is its own endpoint"
        );
    }

    #[test]
    fn round_trips_and_skips_garbage() {
        let list = Ejections(vec![Ejection {
            service: "a service".into(),
            addr: "127.0.0.1:1".into(),
            until_ms: 5,
            times: 2,
        }]);
        assert_eq!(Ejections::decode(&list.encode()), list);
        let noisy = b"5 2 a service 127.0.0.1:1\ngarbage\nx 1 s 1.2.3.4:5\n\xff\xfe\n";
        assert_eq!(Ejections::decode(noisy), list);
    }
}
