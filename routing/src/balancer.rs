//! The picker of one service, with everything that shapes its weights:
//! health, ejection, zone and slow start.
//!
//! Each call is one [`SmoothPicker::pick`]; the work is done when the
//! inputs change (a new table, an ejection, a slow-start step), never per
//! call. The rules, in order:
//! 1. Weight 0 (draining) never takes calls.
//! 2. Endpoints whose health checks fail, and ejected endpoints, sit out;
//!    if that leaves none, all of them take calls (panic mode, as Envoy).
//! 3. With a local zone configured, calls stay in it while it has
//!    [`ZoneRouting::min_endpoints`] endpoints taking calls holding at least
//!    [`ZoneRouting::min_healthy_percent`] of its registered weight; when it
//!    has less, every zone takes calls in proportion to weight.
//! 4. An endpoint in slow start takes `weight × max(min, (t / window)^(1 /
//!    aggression))`, `t` counted from its `serving_since_ms`.
//!
//! Weights change without restarting the smooth sequence: the running
//! scores carry over, so a step of the ramp does not bunch calls.

use crate::policy::{Policy, SlowStart, ZoneRouting};
use crate::rng::SplitMix64;
use crate::wrr::SmoothPicker;
use etcd_mesh_wire::Service;

/// Effective weights are registered weights × this, so that a slow-start
/// factor keeps three digits; scaling every weight alike leaves the
/// sequence unchanged.
const SCALE: u64 = 1000;

#[derive(Debug, Clone)]
struct Member {
    addr: String,
    weight: u32,
    local: bool,
    checks_pass: bool,
    ejected: bool,
    serving_since_ms: Option<u64>,
}

/// One service's picker on one worker.
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    members: Vec<Member>,
    picker: SmoothPicker,
    /// Whether some member is still ramping up: the weights need steps.
    ramping: bool,
    /// Whether rule 3 keeps calls in the local zone now.
    zone_local: bool,
    panic: bool,
}

impl Balancer {
    /// A balancer whose sequence starts where nginx's does (the console's
    /// preview); the plugin shuffles the start with [`Balancer::randomised`].
    pub fn new(service: &Service, policy: &Policy, now_ms: u64) -> Self {
        let mut balancer = Balancer::default();
        balancer.set_members(service, policy);
        balancer.picker = SmoothPicker::new(balancer.weights(policy, now_ms));
        balancer
    }

    pub fn randomised(
        service: &Service,
        policy: &Policy,
        now_ms: u64,
        rng: &mut SplitMix64,
    ) -> Self {
        let mut balancer = Self::new(service, policy, now_ms);
        balancer.picker.shuffle_start(rng);
        balancer
    }

    /// Takes a new version of the service; endpoints that stay keep their
    /// place in the sequence, and their ejection.
    pub fn update(&mut self, service: &Service, policy: &Policy, now_ms: u64) {
        let ejected: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.ejected)
            .map(|m| m.addr.clone())
            .collect();
        self.set_members(service, policy);
        for member in &mut self.members {
            member.ejected = ejected.contains(&member.addr);
        }
        self.reweigh(policy, now_ms);
    }

    /// Marks which endpoints are ejected.
    pub fn set_ejected(&mut self, is_ejected: impl Fn(&str) -> bool, policy: &Policy, now_ms: u64) {
        let mut changed = false;
        for member in &mut self.members {
            let ejected = is_ejected(&member.addr);
            changed |= member.ejected != ejected;
            member.ejected = ejected;
        }
        if changed {
            self.reweigh(policy, now_ms);
        }
    }

    /// Steps the slow-start ramp to `now_ms`; false when nothing ramped
    /// (since the last step, which took the last ramp to full weight).
    pub fn step(&mut self, policy: &Policy, now_ms: u64) -> bool {
        if !self.ramping {
            return false;
        }
        self.reweigh(policy, now_ms);
        true
    }

    pub fn pick(&mut self) -> Option<&str> {
        self.picker.pick()
    }

    /// Endpoints with weight above 0, and of them how many are ejected.
    pub fn ejection_room(&self) -> (usize, usize) {
        let live = self.members.iter().filter(|m| m.weight > 0);
        let ejected = live.clone().filter(|m| m.ejected).count();
        (live.count(), ejected)
    }

    /// Whether every endpoint sits out and all take calls regardless.
    pub fn in_panic(&self) -> bool {
        self.panic
    }

    /// Whether calls stay in the local zone now.
    pub fn zone_local(&self) -> bool {
        self.zone_local
    }

    fn set_members(&mut self, service: &Service, policy: &Policy) {
        let local_zone = policy.local_zone.as_deref();
        self.members = service
            .endpoints
            .iter()
            .map(|e| Member {
                addr: e.addr.clone(),
                weight: e.weight,
                local: local_zone.is_some() && e.zone() == local_zone,
                checks_pass: e.checks_pass(),
                ejected: false,
                serving_since_ms: e.serving_since_ms,
            })
            .collect();
    }

    /// Which members take calls (rules 1–3), whether the zone rule keeps
    /// calls local, and whether panic mode is on.
    fn admitted(&self, zone: &ZoneRouting) -> (Vec<bool>, bool, bool) {
        let up = |m: &Member| m.weight > 0 && m.checks_pass && !m.ejected;
        let mut panic = false;
        let mut admitted: Vec<bool> = self.members.iter().map(up).collect();
        if !admitted.contains(&true) {
            panic = true;
            admitted = self.members.iter().map(|m| m.weight > 0).collect();
        }
        let mut local = false;
        if !panic && self.members.iter().any(|m| m.local) {
            let registered: u64 = self
                .members
                .iter()
                .filter(|m| m.local)
                .map(|m| u64::from(m.weight))
                .sum();
            let (count, healthy) = self
                .members
                .iter()
                .zip(&admitted)
                .filter(|(m, a)| m.local && **a)
                .fold((0usize, 0u64), |(n, w), (m, _)| {
                    (n + 1, w + u64::from(m.weight))
                });
            local = count > 0
                && count >= zone.min_endpoints
                && healthy * 100 >= registered * u64::from(zone.min_healthy_percent);
            if local {
                for (member, admitted) in self.members.iter().zip(admitted.iter_mut()) {
                    *admitted &= member.local;
                }
            }
        }
        (admitted, local, panic)
    }

    fn weights(&mut self, policy: &Policy, now_ms: u64) -> Vec<(&str, u64)> {
        let (admitted, local, panic) = self.admitted(&policy.zone_routing);
        self.zone_local = local;
        self.panic = panic;
        let slow_start = policy.slow_start.as_ref();
        self.ramping = slow_start.is_some_and(|s| {
            self.members.iter().any(|m| {
                m.serving_since_ms
                    .is_some_and(|t| now_ms < t.saturating_add(s.window_ms))
            })
        });
        self.members
            .iter()
            .zip(admitted)
            .map(|(m, admitted)| {
                let weight = if admitted {
                    effective(m, slow_start, now_ms)
                } else {
                    0
                };
                (m.addr.as_str(), weight)
            })
            .collect()
    }

    fn reweigh(&mut self, policy: &Policy, now_ms: u64) {
        let mut picker = std::mem::take(&mut self.picker);
        picker.update(self.weights(policy, now_ms));
        self.picker = picker;
    }
}

/// A member's weight × [`SCALE`], ramped when it is in slow start.
fn effective(member: &Member, slow_start: Option<&SlowStart>, now_ms: u64) -> u64 {
    let full = u64::from(member.weight) * SCALE;
    let (Some(ramp), Some(since)) = (slow_start, member.serving_since_ms) else {
        return full;
    };
    let factor = ramp.factor(now_ms.saturating_sub(since));
    ((full as f64 * factor).round() as u64).clamp(1, full)
}

impl SlowStart {
    /// The share of its weight an endpoint `age_ms` into its window takes:
    /// Envoy's `max(min, (t / window)^(1 / aggression))`, 1 after the window.
    pub fn factor(&self, age_ms: u64) -> f64 {
        if self.window_ms == 0 || age_ms >= self.window_ms {
            return 1.0;
        }
        let time = age_ms.max(1) as f64 / self.window_ms as f64;
        let aggression = if self.aggression > 0.0 {
            self.aggression
        } else {
            1.0
        };
        let min = f64::from(self.min_weight_percent.min(100)) / 100.0;
        time.powf(1.0 / aggression).max(min).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::{Endpoint, Health};
    use std::collections::HashMap;

    fn endpoint(addr: &str, weight: u32, zone: Option<&str>) -> Endpoint {
        let mut endpoint = Endpoint::new(addr, weight);
        if let Some(zone) = zone {
            endpoint.metadata.insert("zone".into(), zone.into());
        }
        endpoint
    }

    fn service(endpoints: Vec<Endpoint>) -> Service {
        Service { endpoints }
    }

    fn counts(balancer: &mut Balancer, n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let addr = balancer.pick().expect("an endpoint").to_owned();
            *counts.entry(addr).or_default() += 1;
        }
        counts
    }

    #[test]
    fn plain_weights_are_the_nginx_sequence() {
        let s = service(vec![
            endpoint("a", 5, None),
            endpoint("b", 1, None),
            endpoint("c", 1, None),
        ]);
        let picks = crate::preview_picks(&s, &Policy::default(), 0, 7);
        assert_eq!(picks.join(" "), "a a b a c a a");
    }

    #[test]
    fn failing_checks_sit_out_until_all_fail() {
        let mut s = service(vec![
            endpoint("a", 1, None),
            endpoint("b", 2, None),
            endpoint("c", 3, None),
        ]);
        s.endpoints[2].health = Some(Health::Unhealthy);
        s.endpoints[1].health = Some(Health::Healthy);
        let policy = Policy::default();
        let mut b = Balancer::new(&s, &policy, 0);
        let got = counts(&mut b, 30);
        assert_eq!(
            (got.get("a"), got.get("b"), got.get("c")),
            (Some(&10), Some(&20), None)
        );
        for e in &mut s.endpoints {
            e.health = Some(Health::NotServing);
        }
        b.update(&s, &policy, 0);
        assert!(b.in_panic());
        let got = counts(&mut b, 60);
        assert_eq!(
            (got["a"], got["b"], got["c"]),
            (10, 20, 30),
            "panic mode uses all"
        );
        s.endpoints[0].weight = 0;
        b.update(&s, &policy, 0);
        assert!(
            !counts(&mut b, 50).contains_key("a"),
            "draining even in panic"
        );
    }

    #[test]
    fn ejections_and_health_combine_and_survive_updates() {
        let s = service(vec![endpoint("a", 1, None), endpoint("b", 1, None)]);
        let policy = Policy::default();
        let mut b = Balancer::new(&s, &policy, 0);
        b.set_ejected(|addr| addr == "a", &policy, 0);
        assert_eq!(b.ejection_room(), (2, 1));
        let mut next = s.clone();
        next.endpoints[1].weight = 3;
        b.update(&next, &policy, 0);
        assert_eq!(counts(&mut b, 9)["b"], 9, "still ejected after the update");
        next.endpoints[1].health = Some(Health::Unhealthy);
        b.update(&next, &policy, 0);
        assert!(b.in_panic());
        b.set_ejected(|_| false, &policy, 0);
        assert_eq!(counts(&mut b, 9)["a"], 9);
    }

    fn zoned() -> Service {
        service(vec![
            endpoint("a1", 1, Some("a")),
            endpoint("a2", 1, Some("a")),
            endpoint("b1", 1, Some("b")),
            endpoint("b2", 2, Some("b")),
            endpoint("c1", 1, Some("c")),
        ])
    }

    fn in_zone(policy_zone: &str) -> Policy {
        Policy {
            local_zone: Some(policy_zone.into()),
            ..Policy::default()
        }
    }

    #[test]
    fn calls_stay_in_the_zone_while_it_has_capacity() {
        let policy = in_zone("a");
        let mut b = Balancer::new(&zoned(), &policy, 0);
        assert!(b.zone_local());
        let got = counts(&mut b, 100);
        assert_eq!((got["a1"], got["a2"], got.len()), (50, 50, 2));
        // Half the zone's weight fails: 50% is still enough by default.
        let mut s = zoned();
        s.endpoints[0].health = Some(Health::Unhealthy);
        b.update(&s, &policy, 0);
        assert_eq!(counts(&mut b, 10)["a2"], 10);
        // Below the minimum share: every zone by weight.
        let strict = Policy {
            zone_routing: ZoneRouting {
                min_endpoints: 1,
                min_healthy_percent: 70,
            },
            ..policy.clone()
        };
        b.update(&s, &strict, 0);
        assert!(!b.zone_local());
        let got = counts(&mut b, 50);
        assert_eq!(
            (got["a2"], got["b1"], got["b2"], got["c1"], got.get("a1")),
            (10, 10, 20, 10, None)
        );
    }

    #[test]
    fn a_zone_cut_to_one_unhealthy_endpoint_spills_by_weight() {
        let mut s = zoned();
        s.endpoints.retain(|e| e.addr != "a2");
        s.endpoints[0].health = Some(Health::Unhealthy);
        let mut b = Balancer::new(&s, &in_zone("a"), 0);
        assert!(!b.zone_local() && !b.in_panic());
        let got = counts(&mut b, 40);
        assert_eq!(
            (got["b1"], got["b2"], got["c1"], got.get("a1")),
            (10, 20, 10, None)
        );
    }

    #[test]
    fn no_zone_configured_or_unknown_zone_is_zone_blind() {
        for policy in [Policy::default(), in_zone("nowhere")] {
            let mut b = Balancer::new(&zoned(), &policy, 0);
            assert!(!b.zone_local());
            assert_eq!(counts(&mut b, 60).len(), 5);
        }
        let min_two = Policy {
            zone_routing: ZoneRouting {
                min_endpoints: 3,
                min_healthy_percent: 0,
            },
            ..in_zone("a")
        };
        assert!(
            !Balancer::new(&zoned(), &min_two, 0).zone_local(),
            "2 < 3 endpoints"
        );
    }

    fn slow(window_ms: u64, aggression: f64, min: u32) -> Policy {
        Policy {
            slow_start: Some(SlowStart {
                window_ms,
                aggression,
                min_weight_percent: min,
            }),
            ..Policy::default()
        }
    }

    #[test]
    fn the_ramp_is_envoys() {
        let ramp = SlowStart {
            window_ms: 10_000,
            aggression: 1.0,
            min_weight_percent: 10,
        };
        assert_eq!(ramp.factor(0), 0.1);
        assert!((ramp.factor(5_000) - 0.5).abs() < 1e-9);
        assert_eq!(ramp.factor(10_000), 1.0);
        let steep = SlowStart {
            aggression: 2.0,
            ..ramp
        };
        assert!((steep.factor(2_500) - 0.5).abs() < 1e-9, "sqrt(0.25)");
    }

    #[test]
    fn a_new_endpoint_ramps_over_the_window_within_two_points() {
        // a and b were there; c arrives at t = 1,000 with a 10 s window.
        // Each 100 ms tick steps the ramp, then 50 calls are made; c's
        // share per tick is compared with the ramp's.
        let policy = slow(10_000, 1.0, 10);
        let mut s = service(vec![endpoint("a", 1, None), endpoint("b", 1, None)]);
        let mut b = Balancer::randomised(&s, &policy, 1_000, &mut SplitMix64::new(7));
        let mut c = endpoint("c", 1, None);
        c.serving_since_ms = Some(1_000);
        s.endpoints.push(c);
        b.update(&s, &policy, 1_000);
        let ramp = policy.slow_start.expect("set");
        let (mut got, mut expected, mut total) = (0.0, 0.0, 0.0);
        for tick in 0..100u64 {
            let now = 1_000 + tick * 100;
            assert!(b.step(&policy, now));
            let f = ramp.factor(now - 1_000);
            let picks = counts(&mut b, 50);
            let share = *picks.get("c").unwrap_or(&0) as f64 / 50.0;
            assert!(
                (share - f / (2.0 + f)).abs() <= 0.02 + 1.0 / 50.0,
                "tick {tick}"
            );
            got += share * 50.0;
            expected += f / (2.0 + f) * 50.0;
            total += 50.0;
        }
        assert!(
            ((got - expected) / total).abs() <= 0.02,
            "{got} vs {expected}"
        );
        assert!(b.step(&policy, 11_000), "the last step, to full weight");
        assert!(!b.step(&policy, 11_100), "the ramp is over");
        assert_eq!(counts(&mut b, 30)["c"], 10);
    }

    #[test]
    fn ramp_steps_keep_the_sequence_smooth() {
        // Three endpoints new together: at every step of their ramp, the
        // next 6 calls still reach all 3.
        let policy = slow(1_000, 1.0, 10);
        let endpoints: Vec<Endpoint> = ["a", "b", "c"]
            .iter()
            .map(|addr| {
                let mut e = endpoint(addr, 1, None);
                e.serving_since_ms = Some(0);
                e
            })
            .collect();
        let mut b = Balancer::randomised(&service(endpoints), &policy, 0, &mut SplitMix64::new(3));
        for now in (0..1_200).step_by(100) {
            b.step(&policy, now);
            assert_eq!(counts(&mut b, 6).len(), 3, "at {now} ms");
        }
        // Two that stay, one ramping: the two still alternate.
        let mut s = service(vec![endpoint("a", 1, None), endpoint("b", 1, None)]);
        let mut b = Balancer::new(&s, &policy, 0);
        let mut c = endpoint("c", 1, None);
        c.serving_since_ms = Some(0);
        s.endpoints.push(c);
        b.update(&s, &policy, 0);
        for now in (0..1_000).step_by(100) {
            b.step(&policy, now);
            let got = counts(&mut b, 6);
            assert!(got["a"] >= 2 && got["b"] >= 2, "at {now} ms: {got:?}");
        }
    }

    #[test]
    fn slow_start_off_or_old_endpoints_take_full_weight() {
        let mut c = endpoint("c", 1, None);
        c.serving_since_ms = Some(0);
        let s = service(vec![endpoint("a", 1, None), c]);
        let mut b = Balancer::new(&s, &Policy::default(), 0);
        assert!(!b.step(&Policy::default(), 0));
        assert_eq!(counts(&mut b, 10)["c"], 5);
    }
}
