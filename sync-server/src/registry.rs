//! The registrations sync-server has seen, and the snapshot built from them.
//!
//! Pure state: the etcd loop feeds it a listing and then watch events, and
//! asks for a snapshot after each batch. Nothing here does I/O.
//!
//! Duplicates: when one service has the same address under two keys, the
//! most recently written key (highest `mod_revision`, then the greater key)
//! gives the endpoint and the other is listed under `rejected`.

use crate::format::{parse, Registration, WatchSpec};
use etcd_mesh_wire::{Endpoint, Rejected, Service, Snapshot};
use std::collections::{btree_map, BTreeMap, HashMap};

#[derive(Debug)]
struct Entry {
    mod_revision: i64,
    parsed: Result<Registration, String>,
}

/// What a change did, so the caller can log each rejection once.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Accepted,
    Rejected(String),
    Removed,
    Unchanged,
}

#[derive(Debug)]
pub struct Registry {
    specs: Vec<WatchSpec>,
    /// By (index of the spec, key): a key under two overlapping prefixes is
    /// read once per prefix.
    entries: BTreeMap<(usize, Vec<u8>), Entry>,
    revision: u64,
    /// The `mod_revision` of each rejected key already reported, so that a
    /// re-listing does not report (log, count) the same rejection again.
    reported: HashMap<(usize, Vec<u8>), i64>,
}

impl Registry {
    pub fn new(specs: Vec<WatchSpec>) -> Self {
        Registry {
            specs,
            entries: BTreeMap::new(),
            revision: 0,
            reported: HashMap::new(),
        }
    }

    pub fn specs(&self) -> &[WatchSpec] {
        &self.specs
    }

    /// Forgets everything, for a fresh listing at `revision`.
    pub fn reset(&mut self, revision: u64) {
        self.entries.clear();
        self.revision = revision;
    }

    /// Moves the revision forward (never back).
    pub fn advance(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// The indexes of the specs whose prefix holds `key`.
    pub fn specs_for(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        let key = key.to_vec();
        self.specs
            .iter()
            .enumerate()
            .filter(move |(_, spec)| key.starts_with(spec.prefix.as_bytes()))
            .map(|(i, _)| i)
    }

    pub fn put(&mut self, spec: usize, key: &[u8], value: &[u8], mod_revision: i64) -> Change {
        let Some(watch) = self.specs.get(spec) else {
            return Change::Unchanged;
        };
        let parsed = parse(watch, key, value);
        let id = (spec, key.to_vec());
        let change = match &parsed {
            Ok(_) => {
                self.reported.remove(&id);
                Change::Accepted
            }
            Err(_) if self.reported.get(&id) == Some(&mod_revision) => Change::Unchanged,
            Err(reason) => {
                self.reported.insert(id, mod_revision);
                Change::Rejected(reason.clone())
            }
        };
        self.entries.insert(
            (spec, key.to_vec()),
            Entry {
                mod_revision,
                parsed,
            },
        );
        change
    }

    pub fn delete(&mut self, spec: usize, key: &[u8]) -> Change {
        self.reported.remove(&(spec, key.to_vec()));
        match self.entries.remove(&(spec, key.to_vec())) {
            Some(_) => Change::Removed,
            None => Change::Unchanged,
        }
    }

    /// Builds the snapshot: services and endpoints sorted, so every replica
    /// serves the same bytes for the same revision.
    pub fn snapshot(&self, stale: bool) -> Snapshot {
        // service → addr → (mod_revision, key, endpoint) of the current winner.
        type Held<'a> = (i64, &'a [u8], &'a Endpoint);
        let mut services: BTreeMap<&str, BTreeMap<&str, Held<'_>>> = BTreeMap::new();
        let mut rejected = Vec::new();
        for ((_, key), entry) in &self.entries {
            let registration = match &entry.parsed {
                Ok(registration) => registration,
                Err(reason) => {
                    rejected.push(Rejected {
                        key: lossy(key),
                        reason: reason.clone(),
                    });
                    continue;
                }
            };
            let candidate: Held<'_> = (entry.mod_revision, key, &registration.endpoint);
            let by_addr = services.entry(&registration.service).or_default();
            match by_addr.entry(&registration.endpoint.addr) {
                btree_map::Entry::Vacant(slot) => {
                    slot.insert(candidate);
                }
                btree_map::Entry::Occupied(mut slot) => {
                    let held = *slot.get();
                    let (winner, loser) = if (candidate.0, candidate.1) > (held.0, held.1) {
                        (candidate, held)
                    } else {
                        (held, candidate)
                    };
                    slot.insert(winner);
                    rejected.push(Rejected {
                        key: lossy(loser.1),
                        reason: format!(
                            "address {} of service {:?} is also registered by the newer key {:?}",
                            registration.endpoint.addr,
                            registration.service,
                            lossy(winner.1)
                        ),
                    });
                }
            }
        }
        rejected.sort_by(|a, b| a.key.cmp(&b.key));
        let services = services
            .into_iter()
            .map(|(name, by_addr)| {
                let endpoints = by_addr.into_values().map(|(_, _, e)| e.clone()).collect();
                (name.to_owned(), Service { endpoints })
            })
            .collect();
        Snapshot {
            revision: self.revision,
            stale,
            services,
            rejected,
        }
    }
}

fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::new(vec![
            "etcd-naming=svc/".parse().expect("spec"),
            "openim-v2=openim:///".parse().expect("spec"),
        ])
    }

    fn naming(addr: &str, weight: u32) -> Vec<u8> {
        format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":{{"weight":{weight}}}}}"#).into_bytes()
    }

    #[test]
    fn builds_sorted_snapshots_from_both_formats() {
        let mut r = registry();
        r.reset(10);
        r.put(0, b"svc/demo.Echo/b", &naming("127.0.0.1:2", 2), 5);
        r.put(0, b"svc/demo.Echo/a", &naming("127.0.0.1:1", 1), 6);
        r.put(1, b"openim:///User/10.0.0.1:7", b"10.0.0.1:7", 7);
        let s = r.snapshot(false);
        assert_eq!(s.revision, 10);
        let echo: Vec<(&str, u32)> = s.services["demo.Echo"]
            .endpoints
            .iter()
            .map(|e| (e.addr.as_str(), e.weight))
            .collect();
        assert_eq!(echo, [("127.0.0.1:1", 1), ("127.0.0.1:2", 2)]);
        assert_eq!(s.services["User"].endpoints[0].weight, 1);
        assert!(s.rejected.is_empty());
        assert_eq!(r.delete(0, b"svc/demo.Echo/a"), Change::Removed);
        assert_eq!(r.delete(0, b"svc/demo.Echo/a"), Change::Unchanged);
        assert_eq!(r.snapshot(false).services["demo.Echo"].endpoints.len(), 1);
    }

    #[test]
    fn bad_registrations_are_listed_not_fatal() {
        let mut r = registry();
        assert!(matches!(r.put(0, b"svc/s/x", b"{", 3), Change::Rejected(_)));
        r.put(0, b"svc/s/y", &naming("127.0.0.1:1", 1), 4);
        let s = r.snapshot(true);
        assert!(s.stale);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(s.rejected[0].key, "svc/s/x");
        assert_eq!(s.services["s"].endpoints.len(), 1);
        // Listed again at the same revision: already reported.
        r.reset(4);
        assert_eq!(r.put(0, b"svc/s/x", b"{", 3), Change::Unchanged);
        assert!(matches!(
            r.put(0, b"svc/s/x", b"{{", 6),
            Change::Rejected(_)
        ));
        // Fixing the value clears the rejection.
        r.put(0, b"svc/s/x", &naming("127.0.0.1:2", 1), 5);
        assert!(r.snapshot(false).rejected.is_empty());
    }

    #[test]
    fn the_newest_key_wins_a_duplicate_address() {
        for order in [[0usize, 1], [1, 0]] {
            let mut r = registry();
            let puts = [
                (&b"svc/s/old"[..], naming("127.0.0.1:1", 1), 5),
                (&b"svc/s/new"[..], naming("127.0.0.1:1", 9), 8),
            ];
            for i in order {
                let (key, value, rev) = &puts[i];
                r.put(0, key, value, *rev);
            }
            let s = r.snapshot(false);
            assert_eq!(s.services["s"].endpoints.len(), 1);
            assert_eq!(s.services["s"].endpoints[0].weight, 9);
            assert_eq!(s.rejected.len(), 1);
            assert_eq!(s.rejected[0].key, "svc/s/old");
            assert!(
                s.rejected[0].reason.contains("svc/s/new"),
                "{}",
                s.rejected[0].reason
            );
        }
    }

    #[test]
    fn keys_under_overlapping_prefixes_match_each_spec() {
        let r = Registry::new(vec![
            "etcd-naming=a/".parse().expect("spec"),
            "etcd-naming=a/b/".parse().expect("spec"),
        ]);
        assert_eq!(r.specs_for(b"a/b/s/x").collect::<Vec<_>>(), [0, 1]);
        assert_eq!(r.specs_for(b"a/s/x").collect::<Vec<_>>(), [0]);
        assert_eq!(r.specs_for(b"z").count(), 0);
    }
}
