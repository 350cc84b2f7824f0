//! The decoded endpoint tables of one worker.
//!
//! A worker rebuilds them only when the revision in shared data changes;
//! between changes a call costs one hash lookup and one pick.

use crate::rng::SplitMix64;
use crate::wrr::SmoothPicker;
use etcd_mesh_wire::{DecodeError, Snapshot};
use std::collections::HashMap;

#[derive(Debug)]
pub struct WorkerTables {
    revision: Option<u64>,
    services: HashMap<String, SmoothPicker>,
    rng: SplitMix64,
    /// Ejected endpoints and when (host clock, ms) each comes back.
    ejected: HashMap<String, u64>,
}

/// What `pick` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick<'a> {
    Endpoint(&'a str),
    /// The service is unknown, or none of its endpoints takes calls.
    NoEndpoint,
}

impl WorkerTables {
    pub fn new(seed: u64) -> Self {
        WorkerTables {
            revision: None,
            services: HashMap::new(),
            rng: SplitMix64::new(seed),
            ejected: HashMap::new(),
        }
    }

    /// The revision of the tables in use, if any.
    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// Applies a snapshot body. An older revision, or a body that does not
    /// decode, leaves the tables as they were.
    pub fn apply(&mut self, body: &[u8]) -> Result<bool, DecodeError> {
        let snapshot = Snapshot::decode(body)?;
        if self.revision.is_some_and(|held| snapshot.revision <= held) {
            return Ok(false);
        }
        let mut services = HashMap::with_capacity(snapshot.services.len());
        for (name, service) in &snapshot.services {
            let endpoints = service
                .endpoints
                .iter()
                .map(|e| (e.addr.as_str(), e.weight));
            let picker = match self.services.remove(name) {
                Some(mut picker) => {
                    picker.update(endpoints);
                    picker
                }
                None => SmoothPicker::randomised(endpoints, &mut self.rng),
            };
            services.insert(name.clone(), picker);
        }
        self.services = services;
        self.revision = Some(snapshot.revision);
        self.mark_ejected();
        Ok(true)
    }

    /// Replaces the set of ejected endpoints (addr, until).
    pub fn set_ejections(&mut self, ejected: impl IntoIterator<Item = (String, u64)>) {
        self.ejected = ejected.into_iter().collect();
        self.mark_ejected();
    }

    /// Lets back the endpoints whose ejection is over at `now_ms`; true if
    /// any came back.
    pub fn expire_ejections(&mut self, now_ms: u64) -> bool {
        let before = self.ejected.len();
        self.ejected.retain(|_, until| *until > now_ms);
        let changed = self.ejected.len() != before;
        if changed {
            self.mark_ejected();
        }
        changed
    }

    fn mark_ejected(&mut self) {
        for picker in self.services.values_mut() {
            picker.set_ejected(|addr| self.ejected.contains_key(addr));
        }
    }

    /// (endpoints taking calls, of which ejected) for `service`.
    pub fn ejection_room(&self, service: &str) -> (usize, usize) {
        self.services
            .get(service)
            .map_or((0, 0), |p| (p.len(), p.ejected()))
    }

    pub fn pick(&mut self, service: &str) -> Pick<'_> {
        match self.services.get_mut(service).and_then(SmoothPicker::pick) {
            Some(addr) => Pick::Endpoint(addr),
            None => Pick::NoEndpoint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(revision: u64, endpoints: &[(&str, u32)]) -> Vec<u8> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|(a, w)| format!(r#"{{"addr":"{a}","weight":{w}}}"#))
            .collect();
        format!(
            r#"{{"revision":{revision},"services":{{"demo.Echo":{{"endpoints":[{}]}}}}}}"#,
            endpoints.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn never_goes_back_and_keeps_tables_on_garbage() {
        let mut tables = WorkerTables::new(1);
        assert_eq!(tables.pick("demo.Echo"), Pick::NoEndpoint);
        assert_eq!(tables.apply(&body(5, &[("127.0.0.1:1", 1)])), Ok(true));
        assert_eq!(tables.apply(&body(4, &[("127.0.0.1:2", 1)])), Ok(false));
        assert!(tables.apply(b"{garbage").is_err());
        assert_eq!(tables.revision(), Some(5));
        assert_eq!(tables.pick("demo.Echo"), Pick::Endpoint("127.0.0.1:1"));
        assert_eq!(tables.pick("other"), Pick::NoEndpoint);
        assert_eq!(tables.apply(&body(6, &[("127.0.0.1:1", 0)])), Ok(true));
        assert_eq!(tables.pick("demo.Echo"), Pick::NoEndpoint);
    }

    #[test]
    fn ejections_apply_across_updates_and_expire() {
        let mut tables = WorkerTables::new(3);
        tables
            .apply(&body(1, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)]))
            .expect("valid");
        tables.set_ejections([("127.0.0.1:1".to_owned(), 1000)]);
        assert_eq!(tables.ejection_room("demo.Echo"), (2, 1));
        tables
            .apply(&body(2, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 3)]))
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
    fn hostile_bodies_never_panic_and_change_nothing() {
        // A fuzz-style property: random mutations of a valid body either
        // decode to a valid snapshot or leave the tables untouched.
        let valid = body(10, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 2)]);
        let mut rng = SplitMix64::new(9);
        let mut tables = WorkerTables::new(1);
        tables
            .apply(&body(5, &[("127.0.0.1:9", 1)]))
            .expect("valid");
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
            let mut copy = WorkerTables::new(1);
            copy.apply(&body(5, &[("127.0.0.1:9", 1)])).expect("valid");
            match copy.apply(&mutated) {
                Ok(_) => assert!(copy.revision().is_some()),
                Err(_) => assert_eq!(copy.pick("demo.Echo"), Pick::Endpoint("127.0.0.1:9")),
            }
        }
        assert_eq!(tables.revision(), Some(5));
    }
}
