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

use crate::config::OutlierConfig;
use std::collections::HashMap;

/// gRPC `UNAVAILABLE`: what Envoy answers for a connect failure or reset,
/// and what a backend that cannot serve says.
const UNAVAILABLE: &str = "14";

/// Whether a call failed in the outlier sense, from its `grpc-status`.
pub fn is_failure(grpc_status: &str) -> bool {
    grpc_status.trim() == UNAVAILABLE
}

/// One worker's failure counts, by service and address.
#[derive(Debug, Default)]
pub struct FailureCounter {
    in_a_row: HashMap<String, HashMap<String, u32>>,
}

impl FailureCounter {
    /// Records a call's outcome; true when `addr` of `service` just reached
    /// `threshold`.
    pub fn record(&mut self, service: &str, addr: &str, failed: bool, threshold: u32) -> bool {
        if !failed {
            // Lookup first: the common path allocates nothing.
            if let Some(count) = self
                .in_a_row
                .get_mut(service)
                .and_then(|by_addr| by_addr.get_mut(addr))
            {
                *count = 0;
            }
            return false;
        }
        let by_addr = self.in_a_row.entry(service.to_owned()).or_default();
        let count = by_addr.entry(addr.to_owned()).or_insert(0);
        *count += 1;
        if *count >= threshold {
            *count = 0;
            return true;
        }
        false
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
        }
    }

    #[test]
    fn counts_failures_in_a_row() {
        let mut counter = FailureCounter::default();
        assert!(!counter.record("s", "a", true, 3));
        assert!(!counter.record("s", "a", true, 3));
        assert!(!counter.record("s", "a", false, 3));
        assert!(!counter.record("s", "a", true, 3));
        assert!(!counter.record("s", "a", true, 3));
        assert!(
            !counter.record("t", "a", true, 3),
            "another service's count"
        );
        assert!(counter.record("s", "a", true, 3));
        assert!(!counter.record("s", "a", true, 3), "counting starts over");
        assert!(is_failure("14") && !is_failure("0") && !is_failure("2"));
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
