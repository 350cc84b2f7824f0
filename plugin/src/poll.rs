//! The poller's schedule: when to poll sync-server's change feed next and
//! with what.

use crate::config::PollerConfig;
use crate::feed::Held;
use etcd_mesh_routing::rng::SplitMix64;
use std::time::Duration;

const FIRST_BACKOFF_MS: u64 = 100;

#[derive(Debug)]
pub struct PollSchedule {
    config: PollerConfig,
    /// `&services=...` when the poller is scoped, encoded once.
    scope: String,
    failures: u32,
    rng: SplitMix64,
}

impl PollSchedule {
    pub fn new(config: PollerConfig, seed: u64) -> Self {
        let scope = match &config.services {
            Some(names) => format!("services={}", percent_encode(&names.join(","))),
            None => String::new(),
        };
        PollSchedule {
            config,
            scope,
            failures: 0,
            rng: SplitMix64::new(seed),
        }
    }

    pub fn config(&self) -> &PollerConfig {
        &self.config
    }

    /// The path of the next poll: everything until tables are held, then
    /// a long-poll for the changes after them. The observer tells a
    /// replica whether the health view held is its own (deltas) or
    /// another's; with the digest, another's that equals its own is
    /// continued with a delta too, else it sends everything.
    pub fn path(&self, held: Option<Held<'_>>) -> String {
        let mut path = String::from("/v1/changes");
        let mut separator = '?';
        let mut add = |part: &str| {
            if !part.is_empty() {
                path.push(separator);
                path.push_str(part);
                separator = '&';
            }
        };
        if let Some(held) = held {
            add(&format!(
                "since={}&health_seq={}&epoch={}",
                held.position.revision,
                held.position.health_seq,
                percent_encode(held.epoch),
            ));
            // Empty from an older server, which does not read it.
            if !held.observer.is_empty() {
                add(&format!("observer={}", percent_encode(held.observer)));
            }
            if let Some(digest) = held.digest {
                add(&format!("digest={digest}"));
            }
            add(&format!("wait={}", self.config.wait_seconds));
        }
        add(&self.scope);
        path
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.wait_seconds))
            + Duration::from_millis(u64::from(self.config.timeout_margin_ms))
    }

    /// An index below `len` (at least 1), from the schedule's randomness:
    /// where Envoys started at different times begin.
    pub fn random_index(&mut self, len: usize) -> usize {
        (self.rng.next_u64() % len.max(1) as u64) as usize
    }

    /// A poll answered (200 or 304): poll again at once.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// A poll failed: how long to wait before the next one (exponential,
    /// with full jitter in the upper half, capped).
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let cap = u64::from(self.config.max_backoff_ms);
        let exp = FIRST_BACKOFF_MS
            .saturating_mul(1u64 << self.failures.min(20))
            .min(cap);
        let half = exp / 2;
        Duration::from_millis(half + self.rng.next_u64() % (half + 1))
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::feed::Position;

    fn held<'a>(revision: u64, health_seq: u64, epoch: &'a str, observer: &'a str) -> Held<'a> {
        Held {
            position: Position::new(revision, health_seq),
            epoch,
            observer,
            digest: None,
        }
    }

    fn schedule() -> PollSchedule {
        PollSchedule::new(
            PollerConfig {
                cluster: Some("sync".into()),
                clusters: None,
                authority: "sync-server".into(),
                wait_seconds: 30,
                timeout_margin_ms: 5000,
                max_backoff_ms: 2000,
                bearer_token: None,
                services: None,
                probe_ms: 2000,
                probe_timeout_ms: 1000,
            },
            7,
        )
    }

    #[test]
    fn long_polls_for_changes_once_tables_are_held() {
        let s = schedule();
        assert_eq!(s.path(None), "/v1/changes");
        assert_eq!(
            s.path(Some(held(12, 4, "ab-1", "sync-0/42"))),
            "/v1/changes?since=12&health_seq=4&epoch=ab-1&observer=sync-0%2F42&wait=30"
        );
        assert_eq!(
            s.path(Some(held(12, 4, "ab-1", ""))),
            "/v1/changes?since=12&health_seq=4&epoch=ab-1&wait=30",
            "no observer named: as before observers"
        );
        assert_eq!(s.timeout(), Duration::from_secs(35));
        let mut config = s.config().clone();
        config.services = Some(vec!["demo.Echo".into(), "a b&c".into()]);
        let scoped = PollSchedule::new(config, 1);
        assert_eq!(
            scoped.path(None),
            "/v1/changes?services=demo.Echo%2Ca%20b%26c"
        );
        assert_eq!(
            scoped.path(Some(held(3, 0, "e", "o"))),
            "/v1/changes?since=3&health_seq=0&epoch=e&observer=o&wait=30&services=demo.Echo%2Ca%20b%26c"
        );
        let with_digest = Held {
            digest: Some(77),
            ..held(3, 0, "e", "o")
        };
        assert_eq!(
            s.path(Some(with_digest)),
            "/v1/changes?since=3&health_seq=0&epoch=e&observer=o&digest=77&wait=30"
        );
    }

    #[test]
    fn random_indexes_stay_in_range_and_spread() {
        let mut seen = [0u32; 3];
        for seed in 0..300 {
            let index = PollSchedule::new(schedule().config().clone(), seed).random_index(3);
            seen[index] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
        assert_eq!(schedule().random_index(0), 0, "never a division by zero");
    }

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut s = schedule();
        let delays: Vec<Duration> = (0..10).map(|_| s.failed()).collect();
        assert!(delays[0] <= Duration::from_millis(200));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(2000)));
        assert!(delays[9] >= Duration::from_millis(1000));
        s.succeeded();
        assert!(s.failed() <= Duration::from_millis(200));
    }
}
