//! The poller's schedule: when to poll sync-server next and with what.

use crate::config::PollerConfig;
use crate::rng::SplitMix64;
use std::time::Duration;

const FIRST_BACKOFF_MS: u64 = 100;

#[derive(Debug)]
pub struct PollSchedule {
    config: PollerConfig,
    /// The newest revision written to shared data.
    held: Option<u64>,
    failures: u32,
    rng: SplitMix64,
}

impl PollSchedule {
    pub fn new(config: PollerConfig, seed: u64) -> Self {
        PollSchedule {
            config,
            held: None,
            failures: 0,
            rng: SplitMix64::new(seed),
        }
    }

    pub fn config(&self) -> &PollerConfig {
        &self.config
    }

    /// The path of the next poll: a plain fetch until tables are held, then
    /// a long-poll for anything newer.
    pub fn path(&self) -> String {
        match self.held {
            None => "/v1/snapshot".to_owned(),
            Some(revision) => format!(
                "/v1/snapshot?since={revision}&wait={}",
                self.config.wait_seconds
            ),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.config.wait_seconds))
            + Duration::from_millis(u64::from(self.config.timeout_margin_ms))
    }

    /// Whether a snapshot at `revision` should replace the held one.
    pub fn is_newer(&self, revision: u64) -> bool {
        self.held.is_none_or(|held| revision > held)
    }

    pub fn accepted(&mut self, revision: u64) {
        self.held = Some(revision);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> PollSchedule {
        PollSchedule::new(
            PollerConfig {
                cluster: "sync".into(),
                authority: "sync-server".into(),
                wait_seconds: 30,
                timeout_margin_ms: 5000,
                max_backoff_ms: 2000,
                bearer_token: None,
            },
            7,
        )
    }

    #[test]
    fn long_polls_once_tables_are_held() {
        let mut s = schedule();
        assert_eq!(s.path(), "/v1/snapshot");
        assert!(s.is_newer(1));
        s.accepted(12);
        assert_eq!(s.path(), "/v1/snapshot?since=12&wait=30");
        assert!(!s.is_newer(12));
        assert!(!s.is_newer(3));
        assert!(s.is_newer(13));
        assert_eq!(s.timeout(), Duration::from_secs(35));
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
