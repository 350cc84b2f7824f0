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
        Ok(true)
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
}
