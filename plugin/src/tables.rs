//! The decoded endpoint tables of one worker.
//!
//! A worker re-reads only the services the poller changed since the update
//! it holds (see [`crate::feed`]); applying one costs the size of that
//! service, whatever the size of the tables. Between changes a call costs
//! one hash lookup and one pick.

use crate::filter_state::original_dst_arguments;
use etcd_mesh_routing::rng::SplitMix64;
use etcd_mesh_routing::{Balancer, Policy};
use etcd_mesh_wire::{Digest, Service};
use std::collections::{HashMap, HashSet};

#[derive(Debug)]
pub struct WorkerTables {
    /// The poller's update sequence these tables hold.
    seq: Option<u64>,
    services: HashMap<String, Held>,
    /// The generation services read now are stamped with.
    generation: u64,
    /// Zone and slow start, from the router's configuration.
    policy: Policy,
    digest: Digest,
    rng: SplitMix64,
    /// Ejected endpoints by service and address, and when (host clock,
    /// ms) each comes back.
    ejected: HashMap<String, HashMap<String, u64>>,
    /// The filter-state override of each address, encoded once when the
    /// address arrives rather than on every call, with how many held
    /// services list it: an address no held service lists is dropped, so
    /// the map is bounded by the tables however long deltas run.
    overrides: HashMap<String, (Box<[u8]>, usize)>,
    /// The addresses each held service lists, to count them in and out.
    listed: HashMap<String, HashSet<String>>,
}

/// One service held: its picker, its digest hash, and the generation of
/// tables it was read in.
#[derive(Debug)]
struct Held {
    picker: Balancer,
    hash: u64,
    generation: u64,
}

/// What `pick` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick<'a> {
    Endpoint(&'a str),
    /// The service is unknown, or none of its endpoints takes calls.
    NoEndpoint,
}

impl WorkerTables {
    pub fn new(seed: u64, policy: Policy) -> Self {
        WorkerTables {
            seq: None,
            services: HashMap::new(),
            generation: 0,
            policy,
            digest: Digest::default(),
            rng: SplitMix64::new(seed),
            ejected: HashMap::new(),
            overrides: HashMap::new(),
            listed: HashMap::new(),
        }
    }

    /// The update sequence held, if any.
    pub fn seq(&self) -> Option<u64> {
        self.seq
    }

    pub fn set_seq(&mut self, seq: u64) {
        self.seq = Some(seq);
    }

    /// The digest of the services held, comparable with the poller's and
    /// sync-server's.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// Applies one service's shared-data value: its canonical JSON, or
    /// empty when it is gone. A value that does not decode or validate
    /// leaves the service as it was.
    pub fn apply_service(&mut self, name: &str, value: &[u8], now_ms: u64) -> Result<(), String> {
        if value.is_empty() {
            if let Some(held) = self.services.remove(name) {
                self.digest.remove(held.hash);
            }
            self.relist(name, HashSet::new());
            return Ok(());
        }
        let service: Service = serde_json::from_slice(value)
            .map_err(|e| format!("service {name:?} does not decode: {e}"))?;
        service.validate(name)?;
        let addrs = service.endpoints.iter().map(|e| e.addr.clone()).collect();
        self.relist(name, addrs);
        let hash = Digest::of_encoded(name, value);
        let policy = &self.policy;
        let mut picker = match self.services.remove(name) {
            Some(Held {
                mut picker, hash, ..
            }) => {
                self.digest.remove(hash);
                picker.update(&service, policy, now_ms);
                picker
            }
            None => Balancer::randomised(&service, policy, now_ms, &mut self.rng),
        };
        let out = self.ejected.get(name);
        picker.set_ejected(
            |addr| out.is_some_and(|out| out.contains_key(addr)),
            policy,
            now_ms,
        );
        self.digest.add(hash);
        let generation = self.generation;
        self.services.insert(
            name.to_owned(),
            Held {
                picker,
                hash,
                generation,
            },
        );
        Ok(())
    }

    /// Starts a new generation: every service held is from before it
    /// until it is read again ([`Self::apply_service`]) or marked
    /// ([`Self::mark_current`]).
    pub fn begin_generation(&mut self) {
        self.generation += 1;
    }

    /// Whether `name` is held and was read in the current generation.
    pub fn is_current(&self, name: &str) -> bool {
        self.services
            .get(name)
            .is_some_and(|held| held.generation == self.generation)
    }

    /// Marks `name`, if held, as read in the current generation: what a
    /// value that does not decode leaves (the service as it was, not read
    /// again until it changes).
    pub fn mark_current(&mut self, name: &str) {
        if let Some(held) = self.services.get_mut(name) {
            held.generation = self.generation;
        }
    }

    /// Marks `name`, if held, as not read in the current generation: a
    /// delta changed it, and it is read again ([`crate::reload`]).
    pub fn mark_stale(&mut self, name: &str) {
        if let Some(held) = self.services.get_mut(name) {
            held.generation = self.generation.wrapping_sub(1);
        }
    }

    /// The names held that are not current: from before the current
    /// generation and not read in it since, or marked stale. One pass over
    /// the tables, cloning only those names.
    pub fn stale_names(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|(_, held)| held.generation != self.generation)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Replaces every service with `values` (name, value), all at once;
    /// pickers of the services that stay keep their place in the sequence.
    /// Values that do not decode are skipped and reported. Workers load in
    /// slices instead ([`crate::reload`]); this is the one-shot load those
    /// slices are checked against.
    pub fn reload<'a>(
        &mut self,
        values: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
        now_ms: u64,
    ) -> Vec<String> {
        let mut old = std::mem::take(&mut self.services);
        self.digest = Digest::default();
        let mut errors = Vec::new();
        for (name, value) in values {
            if let Some(kept) = old.remove(name) {
                self.digest.add(kept.hash);
                self.services.insert(name.to_owned(), kept);
            }
            if let Err(e) = self.apply_service(name, &value, now_ms) {
                errors.push(e);
            }
        }
        // The services not in `values` are gone, and their addresses with them.
        for name in old.keys() {
            self.relist(name, HashSet::new());
        }
        errors
    }

    /// Makes `addrs` the addresses `name` lists: an address it lists anew
    /// gets its override (encoded once, whichever service listed it first),
    /// and one that no held service lists any more loses it. Costs the size
    /// of the service, whatever the size of the tables.
    fn relist(&mut self, name: &str, addrs: HashSet<String>) {
        let old = self.listed.remove(name).unwrap_or_default();
        for addr in addrs.difference(&old) {
            self.overrides
                .entry(addr.clone())
                .or_insert_with(|| (original_dst_arguments(addr).into_boxed_slice(), 0))
                .1 += 1;
        }
        for addr in old.difference(&addrs) {
            if let Some((_, services)) = self.overrides.get_mut(addr) {
                *services -= 1;
                if *services == 0 {
                    self.overrides.remove(addr);
                }
            }
        }
        if !addrs.is_empty() {
            self.listed.insert(name.to_owned(), addrs);
        }
    }

    /// Replaces the set of ejected endpoints (service, addr, until).
    pub fn set_ejections(
        &mut self,
        ejected: impl IntoIterator<Item = (String, String, u64)>,
        now_ms: u64,
    ) {
        self.ejected.clear();
        for (service, addr, until) in ejected {
            self.ejected.entry(service).or_default().insert(addr, until);
        }
        self.mark_ejected(now_ms);
    }

    /// Lets back the endpoints whose ejection is over at `now_ms`; true if
    /// any came back.
    pub fn expire_ejections(&mut self, now_ms: u64) -> bool {
        let count =
            |e: &HashMap<String, HashMap<String, u64>>| e.values().map(HashMap::len).sum::<usize>();
        let before = count(&self.ejected);
        for out in self.ejected.values_mut() {
            out.retain(|_, until| *until > now_ms);
        }
        self.ejected.retain(|_, out| !out.is_empty());
        let changed = count(&self.ejected) != before;
        if changed {
            self.mark_ejected(now_ms);
        }
        changed
    }

    fn mark_ejected(&mut self, now_ms: u64) {
        for (name, held) in &mut self.services {
            let out = self.ejected.get(name);
            held.picker.set_ejected(
                |addr| out.is_some_and(|out| out.contains_key(addr)),
                &self.policy,
                now_ms,
            );
        }
    }

    /// Steps every slow-start ramp to `now_ms`; how many services moved.
    pub fn step_slow_start(&mut self, now_ms: u64) -> usize {
        if self.policy.slow_start.is_none() {
            return 0;
        }
        let policy = &self.policy;
        self.services
            .values_mut()
            .filter_map(|held| held.picker.step(policy, now_ms).then_some(()))
            .count()
    }

    /// (endpoints taking calls, of which ejected) for `service`.
    pub fn ejection_room(&self, service: &str) -> (usize, usize) {
        self.services
            .get(service)
            .map_or((0, 0), |held| held.picker.ejection_room())
    }

    /// The encoded filter-state override for `addr`, made when its
    /// service's table arrived.
    pub fn override_arguments(&self, addr: &str) -> Option<&[u8]> {
        self.overrides.get(addr).map(|(a, _)| &**a)
    }

    pub fn pick(&mut self, service: &str) -> Pick<'_> {
        match self
            .services
            .get_mut(service)
            .and_then(|held| held.picker.pick())
        {
            Some(addr) => Pick::Endpoint(addr),
            None => Pick::NoEndpoint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(endpoints: &[(&str, u32)]) -> Vec<u8> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|(a, w)| format!(r#"{{"addr":"{a}","weight":{w}}}"#))
            .collect();
        format!(r#"{{"endpoints":[{}]}}"#, endpoints.join(",")).into_bytes()
    }

    #[test]
    fn applies_services_one_by_one_and_keeps_them_on_garbage() {
        let mut tables = WorkerTables::new(1, Policy::default());
        assert_eq!(tables.pick("demo.Echo"), Pick::NoEndpoint);
        tables
            .apply_service("demo.Echo", &value(&[("127.0.0.1:1", 1)]), 0)
            .expect("valid");
        assert!(tables.apply_service("demo.Echo", b"{garbage", 0).is_err());
        assert!(tables
            .apply_service("demo.Echo", &value(&[("nohost", 1)]), 0)
            .is_err());
        assert_eq!(tables.pick("demo.Echo"), Pick::Endpoint("127.0.0.1:1"));
        assert_eq!(
            tables.override_arguments("127.0.0.1:1"),
            Some(&original_dst_arguments("127.0.0.1:1")[..])
        );
        assert_eq!(tables.pick("other"), Pick::NoEndpoint);
        tables
            .apply_service("demo.Echo", &value(&[("127.0.0.1:1", 0)]), 0)
            .expect("valid");
        assert_eq!(tables.pick("demo.Echo"), Pick::NoEndpoint);
        tables.apply_service("demo.Echo", b"", 0).expect("removal");
        assert!(tables.is_empty());
        assert_eq!(tables.digest(), Digest::default());
    }

    #[test]
    fn overrides_are_held_only_for_addresses_a_held_service_lists() {
        let one = "127.0.0.1:1";
        let two = "127.0.0.1:2";
        let three = "127.0.0.1:3";
        let held = |t: &WorkerTables| {
            let mut addrs: Vec<&str> = [one, two, three]
                .into_iter()
                .filter(|a| t.override_arguments(a).is_some())
                .collect();
            addrs.sort_unstable();
            addrs
        };
        let mut tables = WorkerTables::new(1, Policy::default());
        tables
            .apply_service("a", &value(&[(one, 1), (two, 1)]), 0)
            .expect("valid");
        tables
            .apply_service("b", &value(&[(two, 1)]), 0)
            .expect("valid");
        assert_eq!(held(&tables), [one, two]);
        // A delta that moves `a` from 1 to 3 drops 1's override.
        tables
            .apply_service("a", &value(&[(two, 1), (three, 1)]), 0)
            .expect("valid");
        assert_eq!(held(&tables), [two, three]);
        assert_eq!(tables.overrides.len(), 2);
        assert_eq!(
            tables.override_arguments(three),
            Some(&original_dst_arguments(three)[..])
        );
        // 2 stays while `b` still lists it.
        tables
            .apply_service("a", &value(&[(three, 1)]), 0)
            .expect("valid");
        assert_eq!(held(&tables), [two, three]);
        // A value refused changes nothing.
        assert!(tables.apply_service("b", b"{garbage", 0).is_err());
        assert_eq!(held(&tables), [two, three]);
        tables.apply_service("b", b"", 0).expect("removal");
        assert_eq!(held(&tables), [three]);
        // A reload drops the services it does not list, and their addresses.
        assert!(tables.reload([("c", value(&[(one, 1)]))], 0).is_empty());
        assert_eq!(held(&tables), [one]);
        tables.apply_service("c", b"", 0).expect("removal");
        assert!(tables.overrides.is_empty() && tables.listed.is_empty());
    }

    #[test]
    fn digests_match_however_the_tables_were_reached() {
        let a = value(&[("127.0.0.1:1", 1)]);
        let b = value(&[("127.0.0.1:2", 3)]);
        let mut stepwise = WorkerTables::new(1, Policy::default());
        stepwise.apply_service("a", &b, 0).expect("valid");
        stepwise.apply_service("b", &b, 0).expect("valid");
        stepwise.apply_service("a", &a, 0).expect("valid");
        stepwise.apply_service("c", &a, 0).expect("valid");
        stepwise.apply_service("c", b"", 0).expect("removal");
        let mut reloaded = WorkerTables::new(2, Policy::default());
        reloaded.apply_service("z", &a, 0).expect("valid");
        assert!(reloaded
            .reload([("a", a.clone()), ("b", b.clone())], 0)
            .is_empty());
        assert_eq!(stepwise.digest(), reloaded.digest());
        assert_eq!(reloaded.pick("z"), Pick::NoEndpoint);
        let mut direct = Digest::default();
        direct.add(Digest::of_encoded("a", &a));
        direct.add(Digest::of_encoded("b", &b));
        assert_eq!(stepwise.digest(), direct);
    }

    #[test]
    fn a_generation_tells_the_services_read_since_it_began() {
        let a = value(&[("127.0.0.1:1", 1)]);
        let mut tables = WorkerTables::new(1, Policy::default());
        tables.apply_service("a", &a, 0).expect("valid");
        tables.apply_service("b", &a, 0).expect("valid");
        assert!(tables.is_current("a") && !tables.is_current("none"));
        tables.begin_generation();
        assert!(!tables.is_current("a") && !tables.is_current("b"));
        let mut stale = tables.stale_names();
        stale.sort();
        assert_eq!(stale, ["a", "b"]);
        tables.apply_service("a", &a, 0).expect("valid");
        // A value refused keeps the service; marking it counts it as read.
        assert!(tables.apply_service("b", b"{garbage", 0).is_err());
        assert!(!tables.is_current("b"));
        tables.mark_current("b");
        tables.mark_current("none");
        assert!(tables.is_current("a") && tables.is_current("b"));
        assert!(tables.stale_names().is_empty());
        tables.mark_stale("a");
        tables.mark_stale("none");
        assert!(!tables.is_current("a") && tables.is_current("b"));
        assert_eq!(tables.stale_names(), ["a"]);
        assert_eq!(tables.len(), 2);
    }

    #[test]
    fn ejections_apply_across_updates_and_expire() {
        let mut tables = WorkerTables::new(3, Policy::default());
        tables
            .apply_service(
                "demo.Echo",
                &value(&[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)]),
                0,
            )
            .expect("valid");
        tables
            .apply_service("other", &value(&[("127.0.0.1:1", 1)]), 0)
            .expect("valid");
        tables.set_ejections(
            [("demo.Echo".to_owned(), "127.0.0.1:1".to_owned(), 1000)],
            0,
        );
        assert_eq!(tables.ejection_room("demo.Echo"), (2, 1));
        assert_eq!(
            tables.ejection_room("other"),
            (1, 0),
            "ejected for demo.Echo only"
        );
        assert_eq!(tables.pick("other"), Pick::Endpoint("127.0.0.1:1"));
        tables
            .apply_service(
                "demo.Echo",
                &value(&[("127.0.0.1:1", 1), ("127.0.0.1:2", 3)]),
                0,
            )
            .expect("valid");
        for _ in 0..8 {
            assert_eq!(tables.pick("demo.Echo"), Pick::Endpoint("127.0.0.1:2"));
        }
        assert!(!tables.expire_ejections(999));
        assert!(tables.expire_ejections(1000));
        let picks: Vec<_> = (0..4)
            .map(|_| format!("{:?}", tables.pick("demo.Echo")))
            .collect();
        assert!(picks.iter().any(|p| p.contains("127.0.0.1:1")), "{picks:?}");
    }

    #[test]
    fn hostile_values_never_panic_and_change_nothing() {
        // A fuzz-style property: random mutations of a valid value either
        // decode to a valid service or leave the tables untouched.
        let valid = value(&[("127.0.0.1:1", 1), ("127.0.0.1:2", 2)]);
        let mut rng = SplitMix64::new(9);
        let mut refused = 0;
        for _ in 0..5_000 {
            let mut mutated = valid.clone();
            for _ in 0..1 + rng.next_u64() % 4 {
                let at = (rng.next_u64() as usize) % mutated.len();
                match rng.next_u64() % 3 {
                    0 => mutated[at] = rng.next_u64() as u8,
                    1 => {
                        mutated.remove(at);
                    }
                    _ => mutated.truncate(at),
                }
                if mutated.is_empty() {
                    break;
                }
            }
            if mutated.is_empty() {
                continue;
            }
            let mut tables = WorkerTables::new(1, Policy::default());
            tables
                .apply_service("demo.Echo", &value(&[("127.0.0.1:9", 1)]), 0)
                .expect("valid");
            let before = tables.digest();
            match tables.apply_service("demo.Echo", &mutated, 0) {
                Ok(()) => assert_ne!(tables.digest(), before),
                Err(_) => {
                    refused += 1;
                    assert_eq!(tables.digest(), before);
                    assert_eq!(tables.pick("demo.Echo"), Pick::Endpoint("127.0.0.1:9"));
                }
            }
        }
        assert!(refused > 1_000, "the mutations were too mild: {refused}");
    }
}

#[cfg(test)]
mod slow_start_tests {
    use super::*;
    use etcd_mesh_routing::SlowStart;

    #[test]
    fn a_stamped_newcomer_ramps() {
        let policy = Policy {
            slow_start: Some(SlowStart {
                window_ms: 4_000,
                aggression: 1.0,
                min_weight_percent: 10,
            }),
            ..Policy::default()
        };
        let mut tables = WorkerTables::new(1, policy);
        let two = br#"{"endpoints":[{"addr":"127.0.0.1:1","weight":1},{"addr":"127.0.0.1:2","weight":1}]}"#;
        tables.apply_service("s", two, 1_000).expect("valid");
        let three = br#"{"endpoints":[{"addr":"127.0.0.1:1","weight":1},{"addr":"127.0.0.1:2","weight":1},{"addr":"127.0.0.1:3","weight":1,"serving_since_ms":1000}]}"#;
        tables.apply_service("s", three, 1_000).expect("valid");
        let new = (0..210)
            .filter(|_| tables.pick("s") == Pick::Endpoint("127.0.0.1:3"))
            .count();
        assert_eq!(new, 10, "10% of weight 1 against 2 × 1");
        // Stepped between calls, as the router's tick does.
        let mut new = 0;
        for i in 0..2_000u64 {
            if i % 20 == 0 {
                tables.step_slow_start(1_000 + i / 10);
            }
            new += usize::from(tables.pick("s") == Pick::Endpoint("127.0.0.1:3"));
        }
        assert!(
            (80..160).contains(&new),
            "{new} of 2000 in the ramp's first 200 ms"
        );
    }
}
