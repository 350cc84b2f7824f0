//! A target's health state machine: what one check's answer does to the
//! target's state, given the thresholds. No sockets, no clocks: the
//! scheduler ([`super::scheduler`]) feeds it one [`Observation`] per check
//! and forwards the changes it returns.
//!
//! The rules:
//!
//! - Unknown → Healthy on the first `SERVING`;
//! - Unknown, Healthy → Unhealthy after `unhealthy_threshold` failures in a
//!   row; so does NotServing (a drained application that then stops
//!   answering is gone, not draining);
//! - any → NotServing on one `NOT_SERVING`, with no threshold: the
//!   application said so;
//! - Unhealthy, NotServing → Healthy after `healthy_threshold` `SERVING`s in
//!   a row.
//!
//! A threshold of 0 counts as 1.

use etcd_mesh_wire::Health;

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Serving,
    NotServing,
    Failed,
}

/// A target's health state machine, without sockets or clocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    /// `None` until the first decisive answer.
    state: Option<Health>,
    successes_in_row: u32,
    failures_in_row: u32,
}

impl Tracker {
    pub fn new() -> Self {
        Tracker::default()
    }

    /// The current state; `None` is Unknown.
    pub fn state(&self) -> Option<Health> {
        self.state
    }

    /// Takes in one check's result; returns the new state if it changed.
    pub fn observe(
        &mut self,
        observation: Observation,
        unhealthy_threshold: u32,
        healthy_threshold: u32,
    ) -> Option<Health> {
        let next = match observation {
            Observation::Serving => {
                self.failures_in_row = 0;
                self.successes_in_row = self.successes_in_row.saturating_add(1);
                match self.state {
                    None => Some(Health::Healthy),
                    Some(Health::Healthy) => None,
                    Some(Health::Unhealthy | Health::NotServing) => (self.successes_in_row
                        >= healthy_threshold.max(1))
                    .then_some(Health::Healthy),
                }
            }
            Observation::NotServing => {
                self.failures_in_row = 0;
                self.successes_in_row = 0;
                Some(Health::NotServing)
            }
            Observation::Failed => {
                self.successes_in_row = 0;
                self.failures_in_row = self.failures_in_row.saturating_add(1);
                (self.failures_in_row >= unhealthy_threshold.max(1)).then_some(Health::Unhealthy)
            }
        };
        match next {
            Some(health) if self.state != Some(health) => {
                self.state = Some(health);
                Some(health)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::{Failed, NotServing, Serving};

    /// Feeds `observations` with thresholds 3 (unhealthy) and 2 (healthy);
    /// returns the transitions.
    fn run_tracker(observations: &[Observation]) -> Vec<Option<Health>> {
        let mut tracker = Tracker::new();
        observations
            .iter()
            .map(|o| tracker.observe(*o, 3, 2))
            .collect()
    }

    #[test]
    fn first_serving_is_healthy_at_once() {
        assert_eq!(
            run_tracker(&[Serving, Serving]),
            [Some(Health::Healthy), None]
        );
    }

    #[test]
    fn failures_in_a_row_reach_unhealthy_once() {
        assert_eq!(
            run_tracker(&[Failed, Failed, Failed, Failed]),
            [None, None, Some(Health::Unhealthy), None]
        );
        assert_eq!(
            run_tracker(&[Serving, Failed, Failed, Failed]),
            [Some(Health::Healthy), None, None, Some(Health::Unhealthy)]
        );
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        assert_eq!(
            run_tracker(&[Serving, Failed, Failed, Serving, Failed, Failed]),
            [Some(Health::Healthy), None, None, None, None, None]
        );
    }

    #[test]
    fn not_serving_is_at_once_and_needs_the_healthy_threshold_back() {
        assert_eq!(
            run_tracker(&[Serving, NotServing, NotServing, Serving, Serving, Serving]),
            [
                Some(Health::Healthy),
                Some(Health::NotServing),
                None,
                None,
                Some(Health::Healthy),
                None
            ]
        );
        assert_eq!(run_tracker(&[NotServing]), [Some(Health::NotServing)]);
    }

    #[test]
    fn unhealthy_needs_successes_in_a_row() {
        assert_eq!(
            run_tracker(&[Failed, Failed, Failed, Serving, Failed, Serving, Serving]),
            [
                None,
                None,
                Some(Health::Unhealthy),
                None,
                None,
                None,
                Some(Health::Healthy)
            ]
        );
    }

    #[test]
    fn not_serving_then_silent_becomes_unhealthy() {
        assert_eq!(
            run_tracker(&[NotServing, Failed, Failed, Failed, NotServing]),
            [
                Some(Health::NotServing),
                None,
                None,
                Some(Health::Unhealthy),
                Some(Health::NotServing)
            ]
        );
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let mut tracker = Tracker::new();
        assert_eq!(tracker.observe(Failed, 0, 0), Some(Health::Unhealthy));
        assert_eq!(tracker.observe(Serving, 0, 0), Some(Health::Healthy));
    }
}
