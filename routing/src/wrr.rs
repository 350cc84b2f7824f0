//! Smooth weighted round-robin (the nginx algorithm).
//!
//! Each pick adds every weight to its endpoint's running score, takes the
//! highest score, and lowers it by the total weight. Over any `total`
//! consecutive picks every endpoint is chosen exactly `weight` times, and the
//! heavy ones are interleaved with the light ones instead of bunched.
//! Weight 0 endpoints are never picked. Which endpoints take calls, and
//! with what weight, is decided above it ([`crate::balancer`]).

use crate::rng::SplitMix64;

#[derive(Debug, Clone)]
struct Slot {
    addr: String,
    weight: u64,
    score: i64,
}

/// The picker of one service on one worker.
#[derive(Debug, Clone, Default)]
pub struct SmoothPicker {
    slots: Vec<Slot>,
    total: i64,
}

/// How many picks a randomised start may skip ahead: enough to spread the
/// workers over the first hosts, cheap even for large tables.
const MAX_START_SKIP: u64 = 64;

impl SmoothPicker {
    /// A picker that starts where nginx's does.
    pub fn new<'a>(endpoints: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let slots: Vec<Slot> = endpoints
            .into_iter()
            .filter(|(_, weight)| *weight > 0)
            .map(|(addr, weight)| Slot {
                addr: addr.to_owned(),
                weight,
                score: 0,
            })
            .collect();
        let total = slots.iter().map(|s| weight_of(s.weight)).sum();
        SmoothPicker { slots, total }
    }

    /// A picker whose sequence starts at a random point, so that the workers
    /// of one Envoy do not all send their first calls to the same host.
    pub fn randomised<'a>(
        endpoints: impl IntoIterator<Item = (&'a str, u64)>,
        rng: &mut SplitMix64,
    ) -> Self {
        let mut picker = Self::new(endpoints);
        picker.shuffle_start(rng);
        picker
    }

    /// Moves the start to a random point of the sequence.
    pub fn shuffle_start(&mut self, rng: &mut SplitMix64) {
        if self.slots.is_empty() {
            return;
        }
        // Rotating breaks ties differently; skipping moves along the cycle.
        let rotate = (rng.next_u64() % self.slots.len() as u64) as usize;
        self.slots.rotate_left(rotate);
        let cycle = u64::try_from(self.total)
            .unwrap_or(1)
            .clamp(1, MAX_START_SKIP);
        for _ in 0..rng.next_u64() % cycle {
            self.pick();
        }
    }

    /// Replaces the endpoints or their weights, keeping the running scores
    /// of those that stay so that an update does not restart (and re-bunch)
    /// the sequence.
    pub fn update<'a>(&mut self, endpoints: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut next = Self::new(endpoints);
        for slot in &mut next.slots {
            if let Some(old) = self.slots.iter().find(|old| old.addr == slot.addr) {
                slot.score = old.score;
            }
        }
        // Scores sum to zero in a running picker; keep it so after removals
        // and additions, or the survivors would carry a bias.
        let drift: i64 = next.slots.iter().map(|s| s.score).sum();
        if let Some(first) = next.slots.first_mut() {
            first.score -= drift;
        }
        *self = next;
    }

    /// The next endpoint, or `None` when no endpoint takes calls.
    pub fn pick(&mut self) -> Option<&str> {
        let mut best: Option<usize> = None;
        let mut best_score = i64::MIN;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.score += weight_of(slot.weight);
            if slot.score > best_score {
                best_score = slot.score;
                best = Some(i);
            }
        }
        let slot = &mut self.slots[best?];
        slot.score -= self.total;
        Some(&slot.addr)
    }

    /// Endpoints that take calls.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Weights are at most 10,000 × the balancer's scale: far inside i64.
fn weight_of(weight: u64) -> i64 {
    i64::try_from(weight).unwrap_or(i64::MAX >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn picks(picker: &mut SmoothPicker, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| picker.pick().expect("has endpoints").to_owned())
            .collect()
    }

    #[test]
    fn five_one_one_is_the_nginx_sequence() {
        let mut picker = SmoothPicker::new([("a", 5), ("b", 1), ("c", 1)]);
        assert_eq!(picks(&mut picker, 7).join(" "), "a a b a c a a");
    }

    #[test]
    fn every_window_of_total_picks_is_exact() {
        let weights = [("a", 1), ("b", 2), ("c", 3), ("d", 7)];
        let total = 13;
        for seed in 0..50 {
            let mut picker = SmoothPicker::randomised(weights, &mut SplitMix64::new(seed));
            let sequence = picks(&mut picker, total * 5);
            for window in sequence.windows(total) {
                let mut counts: HashMap<&str, u64> = HashMap::new();
                for addr in window {
                    *counts.entry(addr.as_str()).or_default() += 1;
                }
                for (addr, weight) in weights {
                    assert_eq!(
                        counts.get(addr).copied().unwrap_or(0),
                        weight,
                        "seed {seed}"
                    );
                }
            }
        }
    }

    #[test]
    fn draining_and_empty() {
        let mut picker = SmoothPicker::new([("a", 0), ("b", 2)]);
        assert_eq!(picks(&mut picker, 4), ["b", "b", "b", "b"]);
        let mut none = SmoothPicker::new([("a", 0)]);
        assert!(none.is_empty());
        assert_eq!(none.pick(), None);
    }

    #[test]
    fn randomised_starts_differ() {
        let weights = [("a", 1), ("b", 1), ("c", 1), ("d", 1)];
        let firsts: std::collections::HashSet<String> = (0..32)
            .map(|seed| {
                let mut picker = SmoothPicker::randomised(weights, &mut SplitMix64::new(seed));
                picks(&mut picker, 1).remove(0)
            })
            .collect();
        assert!(firsts.len() >= 3, "{firsts:?}");
    }

    #[test]
    fn property_any_weights_any_seed_exact_windows() {
        // A property test over random tables: the split is exact over every
        // window of `total` picks, whatever the weights and start.
        let mut rng = SplitMix64::new(42);
        for _ in 0..200 {
            let n = 1 + (rng.next_u64() % 8) as usize;
            let weights: Vec<(String, u64)> = (0..n)
                .map(|i| (format!("e{i}"), rng.next_u64() % 6))
                .collect();
            let total: usize = weights.iter().map(|(_, w)| *w as usize).sum();
            let mut picker =
                SmoothPicker::randomised(weights.iter().map(|(a, w)| (a.as_str(), *w)), &mut rng);
            if total == 0 {
                assert_eq!(picker.pick(), None);
                continue;
            }
            let sequence = picks(&mut picker, total * 3);
            for window in sequence.windows(total) {
                for (addr, weight) in &weights {
                    let got = window.iter().filter(|a| *a == addr).count();
                    assert_eq!(got, *weight as usize, "{weights:?}");
                }
            }
        }
    }

    #[test]
    fn update_keeps_the_split_exact() {
        let mut picker = SmoothPicker::new([("a", 1), ("b", 2), ("c", 3)]);
        picks(&mut picker, 4);
        picker.update([("a", 1), ("c", 3), ("d", 2)]);
        let after = picks(&mut picker, 600);
        let count = |x: &str| after.iter().filter(|a| a.as_str() == x).count();
        assert_eq!(
            (count("a"), count("c"), count("d"), count("b")),
            (100, 300, 200, 0)
        );
    }
}
