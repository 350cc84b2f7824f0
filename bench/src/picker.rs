//! The picker's update: what one slow-start step costs a worker, the
//! update as it was (a search of the old endpoints for every new one,
//! quadratic) beside the one the routing crate has now, in the same rounds.
//! Native, no Envoy: the same code the plugin runs on the worker threads.

use crate::util::median;
use etcd_mesh_routing::rng::SplitMix64;
use etcd_mesh_routing::wrr::SmoothPicker;
use serde_json::{json, Value};
use std::hint::black_box;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct PickerOptions {
    /// Rounds at 100 and 1,000 endpoints (fewer at 10,000, where the old
    /// update alone takes a large part of a second).
    pub rounds: usize,
}

/// The balancer's scale: registered weight × 1000.
const SCALE: u64 = 1000;

pub fn run(options: &PickerOptions) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for (endpoints, rounds, updates) in [
        (100, options.rounds, 200),
        (1_000, options.rounds, 20),
        (10_000, (options.rounds / 5).max(5) | 1, 1),
    ] {
        rows.push(one_size(endpoints, rounds, updates)?);
        eprintln!("picker: {endpoints} endpoints done");
    }
    Ok(json!({
        "scenario": "one service; a slow-start step: the same endpoints in the same order, \
                     a tenth of them ramping (their weights change at every update)",
        "rows": rows,
    }))
}

/// Two weight sets of one slow-start step and the next: every tenth
/// endpoint ramps, the others keep their weight.
fn step_weights(endpoints: usize, rng: &mut SplitMix64) -> (Vec<String>, [Vec<u64>; 2]) {
    let addrs: Vec<String> = (0..endpoints)
        .map(|i| format!("10.{}.{}.{}:8080", i >> 16, (i >> 8) & 0xff, i & 0xff))
        .collect();
    let full: Vec<u64> = (0..endpoints)
        .map(|_| (1 + rng.next_u64() % 10) * SCALE)
        .collect();
    let ramp = |factor: u64| -> Vec<u64> {
        full.iter()
            .enumerate()
            .map(|(i, w)| {
                if i % 10 == 0 {
                    (w * factor / 100).max(1)
                } else {
                    *w
                }
            })
            .collect()
    };
    (addrs, [ramp(40), ramp(45)])
}

fn one_size(endpoints: usize, rounds: usize, updates: usize) -> anyhow::Result<Value> {
    let mut rng = SplitMix64::new(endpoints as u64);
    let (addrs, weights) = step_weights(endpoints, &mut rng);
    let list = |w: &[u64]| -> Vec<(&str, u64)> {
        addrs
            .iter()
            .map(String::as_str)
            .zip(w.iter().copied())
            .collect()
    };
    let lists = [list(&weights[0]), list(&weights[1])];
    // Both start at the same random point of the same sequence, as a worker's.
    let start = rng.next_u64();
    let mut before =
        before::SmoothPicker::randomised(lists[0].iter().copied(), &mut SplitMix64::new(start));
    let mut after = SmoothPicker::randomised(lists[0].iter().copied(), &mut SplitMix64::new(start));
    let mut next = 1;
    // µs per update over `updates` updates, alternating the weight sets.
    let timed = |update: &mut dyn FnMut(usize), next: usize| {
        let began = Instant::now();
        for i in 0..updates {
            update((next + i) % 2);
        }
        began.elapsed().as_secs_f64() * 1e6 / updates as f64
    };
    let mut update_before = |k: usize| {
        before.update(lists[k].iter().copied());
        black_box(&before);
    };
    let mut update_after = |k: usize| {
        after.update(lists[k].iter().copied());
        black_box(&after);
    };
    // One warm-up round, not counted.
    timed(&mut update_before, next);
    timed(&mut update_after, next);
    next += updates;
    let (mut before_us, mut after_us, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Back to back in each round, which goes first alternating.
        let (b, a) = if round % 2 == 0 {
            let b = timed(&mut update_before, next);
            (b, timed(&mut update_after, next))
        } else {
            let a = timed(&mut update_after, next);
            (timed(&mut update_before, next), a)
        };
        next += updates;
        before_us.push(b);
        after_us.push(a);
        ratios.push(b / a);
    }
    // The two made the same updates: they must pick alike from here.
    for _ in 0..3 * endpoints {
        anyhow::ensure!(
            before.pick() == after.pick(),
            "the updates disagree at {endpoints} endpoints"
        );
    }
    Ok(json!({
        "endpoints": endpoints,
        "rounds": rounds,
        "updates_per_round": updates,
        "before_us_per_update_median": median(&before_us),
        "after_us_per_update_median": median(&after_us),
        "before_over_after": {
            "median": median(&ratios),
            "min": ratios.iter().copied().fold(f64::INFINITY, f64::min),
            "max": ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        },
    }))
}

/// The picker as it was before its update was made linear, kept to be
/// measured beside the new one (the routing crate's tests keep the same
/// update as their reference).
mod before {
    use etcd_mesh_routing::rng::SplitMix64;

    #[derive(Debug, Clone)]
    struct Slot {
        addr: String,
        weight: u64,
        score: i64,
    }

    #[derive(Debug, Clone, Default)]
    pub struct SmoothPicker {
        slots: Vec<Slot>,
        total: i64,
    }

    const MAX_START_SKIP: u64 = 64;

    impl SmoothPicker {
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

        pub fn randomised<'a>(
            endpoints: impl IntoIterator<Item = (&'a str, u64)>,
            rng: &mut SplitMix64,
        ) -> Self {
            let mut picker = Self::new(endpoints);
            picker.shuffle_start(rng);
            picker
        }

        fn shuffle_start(&mut self, rng: &mut SplitMix64) {
            if self.slots.is_empty() {
                return;
            }
            let rotate = (rng.next_u64() % self.slots.len() as u64) as usize;
            self.slots.rotate_left(rotate);
            let cycle = u64::try_from(self.total)
                .unwrap_or(1)
                .clamp(1, MAX_START_SKIP);
            for _ in 0..rng.next_u64() % cycle {
                self.pick();
            }
        }

        pub fn update<'a>(&mut self, endpoints: impl IntoIterator<Item = (&'a str, u64)>) {
            let mut next = Self::new(endpoints);
            for slot in &mut next.slots {
                if let Some(old) = self.slots.iter().find(|old| old.addr == slot.addr) {
                    slot.score = old.score;
                }
            }
            let drift: i64 = next.slots.iter().map(|s| s.score).sum();
            if let Some(first) = next.slots.first_mut() {
                first.score -= drift;
            }
            *self = next;
        }

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
    }

    fn weight_of(weight: u64) -> i64 {
        i64::try_from(weight).unwrap_or(i64::MAX >> 32)
    }
}
