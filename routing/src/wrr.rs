//! Smooth weighted round-robin (the nginx algorithm).
//!
//! Each pick adds every weight to its endpoint's running score, takes the
//! highest score, and lowers it by the total weight. Over any `total`
//! consecutive picks every endpoint is chosen exactly `weight` times, and the
//! heavy ones are interleaved with the light ones instead of bunched.
//! Weight 0 (draining) endpoints are never picked. Ejected endpoints sit
//! out; if every endpoint is ejected the picker ignores ejections (panic
//! mode, as Envoy does) rather than fail every call.

use crate::rng::SplitMix64;

#[derive(Debug, Clone)]
struct Slot {
    addr: String,
    weight: i64,
    score: i64,
    ejected: bool,
}

/// The picker of one service on one worker.
#[derive(Debug, Clone, Default)]
pub struct SmoothPicker {
    slots: Vec<Slot>,
    total: i64,
    /// The total weight of the endpoints not ejected.
    in_total: i64,
}

/// How many picks a randomised start may skip ahead: enough to spread the
/// workers over the first hosts, cheap even for large tables.
const MAX_START_SKIP: u64 = 64;

impl SmoothPicker {
    /// A picker that starts where nginx's does.
    pub fn new<'a>(endpoints: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let slots: Vec<Slot> = endpoints
            .into_iter()
            .filter(|(_, weight)| *weight > 0)
            .map(|(addr, weight)| Slot {
                addr: addr.to_owned(),
                weight: i64::from(weight),
                score: 0,
                ejected: false,
            })
            .collect();
        let total = slots.iter().map(|s| s.weight).sum();
        SmoothPicker {
            slots,
            total,
            in_total: total,
        }
    }

    /// A picker whose sequence starts at a random point, so that the workers
    /// of one Envoy do not all send their first calls to the same host.
    pub fn randomised<'a>(
        endpoints: impl IntoIterator<Item = (&'a str, u32)>,
        rng: &mut SplitMix64,
    ) -> Self {
        let mut picker = Self::new(endpoints);
        if !picker.slots.is_empty() {
            // Rotating breaks ties differently; skipping moves along the cycle.
            let rotate = (rng.next_u64() % picker.slots.len() as u64) as usize;
            picker.slots.rotate_left(rotate);
            let cycle = u64::try_from(picker.total).unwrap_or(1).min(MAX_START_SKIP);
            for _ in 0..rng.next_u64() % cycle {
                picker.pick();
            }
        }
        picker
    }

    /// Replaces the endpoints, keeping the running scores of those that stay
    /// so that a table update does not restart (and re-bunch) the sequence.
    pub fn update<'a>(&mut self, endpoints: impl IntoIterator<Item = (&'a str, u32)>) {
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
        let panic = self.in_total == 0;
        let total = if panic { self.total } else { self.in_total };
        let mut best: Option<usize> = None;
        let mut best_score = i64::MIN;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.ejected && !panic {
                continue;
            }
            slot.score += slot.weight;
            if slot.score > best_score {
                best_score = slot.score;
                best = Some(i);
            }
        }
        let slot = &mut self.slots[best?];
        slot.score -= total;
        Some(&slot.addr)
    }

    /// Marks which endpoints sit out; the others keep their place in the
    /// sequence.
    pub fn set_ejected(&mut self, is_ejected: impl Fn(&str) -> bool) {
        for slot in &mut self.slots {
            slot.ejected = is_ejected(&slot.addr);
        }
        self.in_total = self
            .slots
            .iter()
            .filter(|s| !s.ejected)
            .map(|s| s.weight)
            .sum();
    }

    /// How many endpoints are ejected now.
    pub fn ejected(&self) -> usize {
        self.slots.iter().filter(|s| s.ejected).count()
    }

    /// Endpoints that take calls.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
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
                let mut counts: HashMap<&str, u32> = HashMap::new();
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
    fn ejected_endpoints_sit_out_until_all_are() {
        let mut picker = SmoothPicker::new([("a", 1), ("b", 2), ("c", 3)]);
        picker.set_ejected(|addr| addr == "c");
        assert_eq!(picker.ejected(), 1);
        let out = picks(&mut picker, 30);
        assert!(!out.contains(&"c".to_owned()));
        assert_eq!(out.iter().filter(|a| *a == "b").count(), 20);
        picker.set_ejected(|_| true);
        let panic = picks(&mut picker, 60);
        assert_eq!(
            panic.iter().filter(|a| *a == "c").count(),
            30,
            "panic mode uses all"
        );
        picker.set_ejected(|_| false);
        assert_eq!(picker.ejected(), 0);
    }

    #[test]
    fn property_any_weights_any_seed_exact_windows() {
        // A property test over random tables: the split is exact over every
        // window of `total` picks, whatever the weights and start.
        let mut rng = SplitMix64::new(42);
        for _ in 0..200 {
            let n = 1 + (rng.next_u64() % 8) as usize;
            let weights: Vec<(String, u32)> = (0..n)
                .map(|i| (format!("e{i}"), (rng.next_u64() % 6) as u32))
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
