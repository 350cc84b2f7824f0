//! Smooth weighted round-robin (the nginx algorithm).
//!
//! Each pick adds every weight to its endpoint's running score, takes the
//! highest score, and lowers it by the total weight. Over any `total`
//! consecutive picks every endpoint is chosen exactly `weight` times, and the
//! heavy ones are interleaved with the light ones instead of bunched.
//! Weight 0 endpoints are never picked. Which endpoints take calls, and
//! with what weight, is decided above it ([`crate::balancer`]).

use crate::rng::SplitMix64;
use std::collections::HashMap;

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
    /// the sequence. Linear in the endpoints, old and new: it runs on every
    /// slow-start step, on the worker threads.
    pub fn update<'a>(&mut self, endpoints: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut next = Self::new(endpoints);
        // The running score of each address that takes calls now. The slots
        // are in no particular order (the start may have been rotated), so
        // no merge: one pass to index them, one lookup per new endpoint. An
        // address listed twice keeps the score of its first slot.
        // (`RandomState` needs no entropy source on wasm32-unknown-unknown:
        // std seeds it from addresses there; only lookups depend on it, so
        // the result does not.)
        let mut scores: HashMap<&str, i64> = HashMap::with_capacity(self.slots.len());
        for old in &self.slots {
            scores.entry(old.addr.as_str()).or_insert(old.score);
        }
        for slot in &mut next.slots {
            if let Some(&score) = scores.get(slot.addr.as_str()) {
                slot.score = score;
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

    /// The update as it was before it was made linear: a search of the old
    /// slots for every new endpoint. The reference the new one must match.
    fn update_quadratic<'a>(
        picker: &mut SmoothPicker,
        endpoints: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        let mut next = SmoothPicker::new(endpoints);
        for slot in &mut next.slots {
            if let Some(old) = picker.slots.iter().find(|old| old.addr == slot.addr) {
                slot.score = old.score;
            }
        }
        let drift: i64 = next.slots.iter().map(|s| s.score).sum();
        if let Some(first) = next.slots.first_mut() {
            first.score -= drift;
        }
        *picker = next;
    }

    /// Everything a picker holds, to compare two of them.
    fn state(picker: &SmoothPicker) -> (Vec<(String, u64, i64)>, i64) {
        let slots = picker
            .slots
            .iter()
            .map(|s| (s.addr.clone(), s.weight, s.score))
            .collect();
        (slots, picker.total)
    }

    fn below(rng: &mut SplitMix64, n: usize) -> usize {
        (rng.next_u64() % n.max(1) as u64) as usize
    }

    /// The next endpoint list: some removed, some added from `pool`, some
    /// weights changed (to 0 too), sometimes reordered. With `duplicates`,
    /// an address may also be listed twice.
    fn mutate(
        rng: &mut SplitMix64,
        list: &[(String, u64)],
        pool: &[String],
        duplicates: bool,
    ) -> Vec<(String, u64)> {
        let weight = |rng: &mut SplitMix64| match rng.next_u64() % 4 {
            0 => 0,
            1 => 1 + rng.next_u64() % 5,
            // The balancer's scaled weights, slow start ramping.
            _ => 1 + rng.next_u64() % 5_000,
        };
        let mut next: Vec<(String, u64)> = Vec::new();
        for (addr, w) in list {
            match rng.next_u64() % 8 {
                0 => {} // removed
                1 | 2 => next.push((addr.clone(), weight(rng))),
                _ => next.push((addr.clone(), *w)),
            }
        }
        for _ in 0..below(rng, 6) {
            let addr = &pool[below(rng, pool.len())];
            if duplicates || !next.iter().any(|(a, _)| a == addr) {
                let at = below(rng, next.len() + 1);
                next.insert(at, (addr.clone(), weight(rng)));
            }
        }
        if below(rng, 4) == 0 {
            // Fisher-Yates with the seeded generator.
            for i in (1..next.len()).rev() {
                next.swap(i, below(rng, i + 1));
            }
        }
        next
    }

    /// Runs the linear update and the reference side by side over random
    /// update sequences: the same state and the same picks after each.
    fn same_as_the_quadratic_update(seed: u64, sequences: usize, duplicates: bool) {
        let mut rng = SplitMix64::new(seed);
        for sequence in 0..sequences {
            let pool_size = 1 + below(&mut rng, 80);
            let pool: Vec<String> = (0..pool_size)
                .map(|i| format!("10.0.{}.{}:8080", i / 7, i % 251))
                .collect();
            let mut list = mutate(&mut rng, &[], &pool, duplicates);
            let mut linear = SmoothPicker::randomised(
                list.iter().map(|(a, w)| (a.as_str(), *w)),
                &mut SplitMix64::new(sequence as u64),
            );
            let mut reference = linear.clone();
            for step in 0..20 {
                list = mutate(&mut rng, &list, &pool, duplicates);
                let endpoints = || list.iter().map(|(a, w)| (a.as_str(), *w));
                linear.update(endpoints());
                update_quadratic(&mut reference, endpoints());
                assert_eq!(state(&linear), state(&reference), "{sequence}/{step}");
                if below(&mut rng, 10) == 0 {
                    let start = rng.next_u64();
                    linear.shuffle_start(&mut SplitMix64::new(start));
                    reference.shuffle_start(&mut SplitMix64::new(start));
                }
                let n = below(&mut rng, 3 * list.len() + 2);
                for _ in 0..n {
                    assert_eq!(linear.pick(), reference.pick(), "{sequence}/{step}");
                }
                assert_eq!(state(&linear), state(&reference), "{sequence}/{step}");
            }
        }
    }

    #[test]
    fn update_is_the_quadratic_update_on_random_sequences() {
        same_as_the_quadratic_update(7, 400, false);
    }

    /// The balancer lists an address once; should a list hold one twice,
    /// both copies still take the score of its first slot, as before.
    #[test]
    fn update_is_the_quadratic_update_with_duplicates() {
        same_as_the_quadratic_update(11, 200, true);
    }

    #[test]
    fn update_carries_scores_over_by_address() {
        let mut picker = SmoothPicker::new([("a", 5), ("b", 1), ("c", 1)]);
        picks(&mut picker, 3);
        let before = state(&picker).0;
        // b goes, d comes, the order changes, a's weight changes.
        picker.update([("c", 1), ("d", 2), ("a", 4)]);
        let after = state(&picker).0;
        let score = |slots: &[(String, u64, i64)], addr: &str| {
            slots.iter().find(|s| s.0 == addr).map(|s| s.2)
        };
        let drift = score(&before, "a").unwrap_or(0) + score(&before, "c").unwrap_or(0);
        assert_eq!(score(&after, "a"), score(&before, "a"));
        assert_eq!(score(&after, "d"), Some(0));
        // The first slot absorbs what the survivors' scores add up to.
        assert_eq!(score(&after, "c"), score(&before, "c").map(|c| c - drift));
        assert_eq!(after.iter().map(|s| s.2).sum::<i64>(), 0);
        assert_eq!(after.len(), 3);
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
