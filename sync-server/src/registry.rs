//! The registrations sync-server has seen, and the tables built from them.
//!
//! Pure state: the etcd loop feeds it a listing and then watch events, and
//! calls [`Registry::commit`] after each batch. A commit rebuilds only the
//! services whose keys changed and reports which services and rejections
//! really changed, so the cost of a change is the size of the change. What
//! it builds are [`Tables`] ([`crate::tables`]). Nothing here does I/O.
//!
//! Duplicates: when one service has the same address under two keys, the
//! most recently written key (highest `mod_revision`, then the greater key)
//! gives the endpoint and the other is listed under `rejected`.
//!
//! Besides what etcd holds, each endpoint carries what this process
//! observed of it: when it began serving (`serving_since_ms`: its arrival
//! after the first listing, or its return to health) and its health-check
//! result. Those are this process's own: another replica, or this one
//! after a restart, has its own (the epoch says so, see [`crate::keyspace`]).

use crate::format::{parse, Registration, WatchSpec};
use crate::tables::{Commit, Tables};
use etcd_mesh_wire::{Endpoint, Health, Service};
use std::collections::{btree_map, BTreeMap, BTreeSet, VecDeque};

// A fast hash: a million keys are hashed several times each while a
// listing is built (SipHash was a sixth of the start time at 1,000,000
// endpoints). The keys come from etcd, written by the registering
// services, and the seed is random per process.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
use std::sync::Mutex;

#[derive(Debug)]
struct Entry {
    mod_revision: i64,
    parsed: Result<Registration, String>,
}

/// A key under one spec: a key under two overlapping prefixes is read once
/// per prefix.
type Id = (usize, Vec<u8>);

/// What a change did, so the caller can log each rejection once.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Accepted,
    Rejected(String),
    Removed,
    Unchanged,
}

/// What this process observed of one endpoint.
#[derive(Debug, Default, Clone, Copy)]
struct Observed {
    serving_since_ms: Option<u64>,
    health: Option<Health>,
}

#[derive(Debug)]
pub struct Registry {
    specs: Vec<WatchSpec>,
    /// By service, then address.
    observed: HashMap<String, HashMap<String, Observed>>,
    /// Whether the first commit ran: endpoints it found are not new.
    primed: bool,
    /// Services whose health changed since the last health commit.
    health_touched: HashSet<String>,
    /// By service, the addresses read only through `health=off` watches.
    unchecked: HashMap<String, HashSet<String>>,
    entries: HashMap<Id, Entry>,
    /// The entries that parsed, by service.
    by_service: HashMap<String, BTreeSet<Id>>,
    /// Entries that lost a duplicate address to a newer key, with why.
    duplicates: HashMap<Id, String>,
    revision: u64,
    /// The `mod_revision` of each rejected key already reported, so that a
    /// re-listing does not report (log, count) the same rejection again.
    reported: HashMap<Id, i64>,
    /// Whether a re-listing is under way (since [`Registry::reset`]): its
    /// commit forgets the reports of keys it did not list again.
    relisting: bool,
    /// Arrival stamps in the order they were given: (stamp, service,
    /// address), so that stamps past the horizon are found without a scan.
    stamps: VecDeque<(u64, String, String)>,
    /// What changed since the last commit.
    touched_services: HashSet<String>,
    touched_keys: HashSet<Vec<u8>>,
    /// The tables as of the last commit.
    tables: Tables,
}

impl Registry {
    pub fn new(specs: Vec<WatchSpec>) -> Self {
        Registry {
            specs,
            observed: HashMap::default(),
            primed: false,
            health_touched: HashSet::default(),
            unchecked: HashMap::default(),
            entries: HashMap::default(),
            by_service: HashMap::default(),
            duplicates: HashMap::default(),
            revision: 0,
            reported: HashMap::default(),
            relisting: false,
            stamps: VecDeque::new(),
            touched_services: HashSet::default(),
            touched_keys: HashSet::default(),
            tables: Tables::default(),
        }
    }

    pub fn specs(&self) -> &[WatchSpec] {
        &self.specs
    }

    /// The revision the registrations are consistent at.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The tables as of the last commit.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Forgets every registration, for a fresh listing at `revision`. The
    /// tables stay until the next commit, which reports what differs (and
    /// forgets the rejections of keys the listing no longer holds).
    pub fn reset(&mut self, revision: u64) {
        self.relisting = true;
        self.entries.clear();
        self.by_service.clear();
        self.duplicates.clear();
        self.touched_services
            .extend(self.tables.services.keys().map(|n| n.to_string()));
        self.touched_keys
            .extend(self.tables.rejected.keys().map(|k| k.as_bytes().to_vec()));
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
                if !self.reported.is_empty() {
                    self.reported.remove(&id);
                }
                Change::Accepted
            }
            Err(_) if self.reported.get(&id) == Some(&mod_revision) => Change::Unchanged,
            Err(reason) => {
                self.reported.insert(id.clone(), mod_revision);
                Change::Rejected(reason.clone())
            }
        };
        match &parsed {
            Ok(registration) => {
                // Owned names are made only for services not seen yet: a
                // listing puts ten or more endpoints per service.
                let service = &registration.service;
                if !self.touched_services.contains(service) {
                    self.touched_services.insert(service.clone());
                }
                match self.by_service.get_mut(service) {
                    Some(ids) => {
                        ids.insert(id.clone());
                    }
                    None => {
                        self.by_service
                            .insert(service.clone(), BTreeSet::from([id.clone()]));
                    }
                }
            }
            Err(_) => {
                self.touched_keys.insert(key.to_vec());
            }
        }
        let entry = Entry {
            mod_revision,
            parsed,
        };
        // The key is cloned again only when it replaces an entry.
        let replaced = match self.entries.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut slot) => {
                let old = slot.insert(entry);
                Some((slot.key().clone(), old))
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(entry);
                None
            }
        };
        if let Some((id, old)) = replaced {
            self.forget(&id, old, true);
        }
        change
    }

    pub fn delete(&mut self, spec: usize, key: &[u8]) -> Change {
        let id = (spec, key.to_vec());
        self.reported.remove(&id);
        match self.entries.remove(&id) {
            Some(old) => {
                self.forget(&id, old, false);
                Change::Removed
            }
            None => Change::Unchanged,
        }
    }

    /// Unlinks what `old` (the entry `id` held) contributed; `replaced`
    /// when a new entry already took its place.
    fn forget(&mut self, id: &Id, old: Entry, replaced: bool) {
        match old.parsed {
            Ok(registration) => {
                let still_there = replaced
                    && matches!(&self.entries.get(id).map(|e| &e.parsed),
                        Some(Ok(r)) if r.service == registration.service);
                if !still_there {
                    if let Some(ids) = self.by_service.get_mut(&registration.service) {
                        ids.remove(id);
                        if ids.is_empty() {
                            self.by_service.remove(&registration.service);
                        }
                    }
                }
                self.touched_services.insert(registration.service);
            }
            Err(_) => {
                self.touched_keys.insert(id.1.clone());
            }
        }
        if self.duplicates.remove(id).is_some() {
            self.touched_keys.insert(id.1.clone());
        }
    }

    /// Rebuilds what changed since the last commit and says what differs,
    /// stamping endpoints new since the first commit with the time now.
    pub fn commit(&mut self) -> Commit {
        self.commit_at(unix_ms())
    }

    pub fn commit_at(&mut self, now_ms: u64) -> Commit {
        let mut commit = Commit::default();
        let mut names: Vec<String> = self.touched_services.drain().collect();
        names.sort();
        for name in names {
            let service = self.build(&name, now_ms);
            if self.tables.set_service(&name, service) {
                commit.services.push(name.as_str().into());
            }
        }
        self.primed = true;
        if std::mem::take(&mut self.relisting) {
            // A key deleted while etcd was away: its report goes too, so
            // that the key is reported again if it comes back.
            let entries = &self.entries;
            self.reported.retain(|id, _| entries.contains_key(id));
        }
        let mut keys: Vec<Vec<u8>> = self.touched_keys.drain().collect();
        keys.sort();
        for key in keys {
            let reasons: Vec<&str> = (0..self.specs.len())
                .filter_map(|spec| {
                    let id = (spec, key.clone());
                    match self.entries.get(&id).map(|e| &e.parsed) {
                        Some(Err(reason)) => Some(reason.as_str()),
                        _ => self.duplicates.get(&id).map(String::as_str),
                    }
                })
                .collect();
            let reason = (!reasons.is_empty()).then(|| reasons.join("; "));
            let key = lossy(&key);
            if self.tables.set_rejection(&key, reason) {
                commit.rejections.push(key.into());
            }
        }
        commit
    }

    /// Records a health-check result; false when it changes nothing (the
    /// endpoint is gone, or its health was that already). A return to
    /// health starts the endpoint's slow start again.
    pub fn set_health(&mut self, service: &str, addr: &str, health: Health, now_ms: u64) -> bool {
        if !self.tables.lists(service, addr) {
            return false;
        }
        let seen = self
            .observed
            .entry(service.to_owned())
            .or_default()
            .entry(addr.to_owned())
            .or_default();
        if seen.health == Some(health) {
            return false;
        }
        let recovered = matches!(seen.health, Some(Health::Unhealthy | Health::NotServing));
        if recovered && health == Health::Healthy {
            seen.serving_since_ms = Some(now_ms);
            self.stamps
                .push_back((now_ms, service.to_owned(), addr.to_owned()));
        }
        seen.health = Some(health);
        self.health_touched.insert(service.to_owned());
        true
    }

    /// Drops the arrival stamps given before `now_ms - horizon_ms`: past
    /// any slow start, a stamp only tells this process from another (a
    /// replica, or this one restarted), which would make their tables
    /// differ for good. Their services are committed as health changes
    /// are ([`Registry::commit_health`]); true when one was dropped.
    pub fn expire_stamps(&mut self, now_ms: u64, horizon_ms: u64) -> bool {
        let mut expired = false;
        while let Some((stamp, _, _)) = self.stamps.front() {
            if now_ms.saturating_sub(*stamp) < horizon_ms {
                break;
            }
            let Some((stamp, service, addr)) = self.stamps.pop_front() else {
                break;
            };
            // A stamp given again since (a recovery) or an endpoint gone
            // left this one behind.
            let Some(seen) = self
                .observed
                .get_mut(&service)
                .and_then(|by_addr| by_addr.get_mut(&addr))
                .filter(|seen| seen.serving_since_ms == Some(stamp))
            else {
                continue;
            };
            seen.serving_since_ms = None;
            if seen.health.is_none() {
                // Nothing observed any more: not held (see `observe`).
                if let Some(by_addr) = self.observed.get_mut(&service) {
                    by_addr.remove(&addr);
                    if by_addr.is_empty() {
                        self.observed.remove(&service);
                    }
                }
            }
            self.health_touched.insert(service);
            expired = true;
        }
        expired
    }

    /// Rebuilds the services whose health changed, but not those with etcd
    /// changes still pending (those wait for their revision, and take their
    /// health with them): content never changes under a revision.
    pub fn commit_health(&mut self, now_ms: u64) -> Commit {
        let mut commit = Commit::default();
        let mut names: Vec<String> = self
            .health_touched
            .drain()
            .filter(|name| !self.touched_services.contains(name))
            .collect();
        names.sort();
        for name in names {
            let service = self.build(&name, now_ms);
            if self.tables.set_service(&name, service) {
                commit.services.push(name.as_str().into());
            }
        }
        commit
    }

    /// Whether the endpoint came through a watch with health checks.
    pub fn checked(&self, service: &str, addr: &str) -> bool {
        !self
            .unchecked
            .get(service)
            .is_some_and(|addrs| addrs.contains(addr))
    }

    /// Whether an etcd listing has been committed: what is built stands
    /// for etcd's content (and not nothing yet).
    pub fn primed(&self) -> bool {
        self.primed
    }

    /// The endpoints of one service from its entries, sorted by address;
    /// `None` when it has none. Records the duplicates it finds.
    fn build(&mut self, name: &str, now_ms: u64) -> Option<Service> {
        let Some(ids) = self.by_service.get(name) else {
            self.observed.remove(name);
            self.unchecked.remove(name);
            return None;
        };
        // addr → (mod_revision, id, endpoint) of the current winner.
        type Held<'a> = (i64, &'a Id, &'a Endpoint);
        let mut by_addr: BTreeMap<&str, Held<'_>> = BTreeMap::new();
        let mut losers = Vec::new();
        for id in ids {
            let Some(Entry {
                mod_revision,
                parsed: Ok(registration),
            }) = self.entries.get(id)
            else {
                continue;
            };
            let candidate: Held<'_> = (*mod_revision, id, &registration.endpoint);
            match by_addr.entry(&registration.endpoint.addr) {
                btree_map::Entry::Vacant(slot) => {
                    slot.insert(candidate);
                }
                btree_map::Entry::Occupied(mut slot) => {
                    let held = *slot.get();
                    let newer = (candidate.0, &candidate.1 .1) > (held.0, &held.1 .1);
                    let (winner, loser) = if newer {
                        (candidate, held)
                    } else {
                        (held, candidate)
                    };
                    slot.insert(winner);
                    losers.push((loser.1.clone(), winner.1 .1.clone(), loser.2.addr.clone()));
                }
            }
        }
        let unchecked: HashSet<String> = by_addr
            .values()
            .filter(|(_, id, _)| !self.specs.get(id.0).is_some_and(|s| s.health_checks))
            .map(|(_, _, e)| e.addr.clone())
            .collect();
        let mut endpoints: Vec<Endpoint> =
            by_addr.into_values().map(|(_, _, e)| e.clone()).collect();
        // Only the duplicates recorded need the keys again.
        let ids: Vec<Id> = if self.duplicates.is_empty() {
            Vec::new()
        } else {
            ids.iter().cloned().collect()
        };
        self.observe(name, &mut endpoints, now_ms);
        if unchecked.is_empty() {
            self.unchecked.remove(name);
        } else {
            self.unchecked.insert(name.to_owned(), unchecked);
        }
        for id in ids {
            if self.duplicates.remove(&id).is_some() {
                self.touched_keys.insert(id.1.clone());
            }
        }
        for (loser, winner_key, addr) in losers {
            let reason = format!(
                "address {addr} of service {name:?} is also registered by the newer key {:?}",
                lossy(&winner_key)
            );
            self.touched_keys.insert(loser.1.clone());
            self.duplicates.insert(loser, reason);
        }
        // The duplicates' rejections are settled in this same commit.
        (!endpoints.is_empty()).then_some(Service { endpoints })
    }
}

impl Registry {
    /// Adds what this process observed to `endpoints` (sorted by address),
    /// and forgets what it observed of endpoints gone: one that comes back
    /// is new again.
    fn observe(&mut self, name: &str, endpoints: &mut [Endpoint], now_ms: u64) {
        // New is what the tables served so far do not list (a re-listing
        // keeps them until its commit). Only endpoints with something
        // observed are held: at a million endpoints, one entry each would
        // be another copy of every address.
        let mut by_addr = self.observed.remove(name).unwrap_or_default();
        for endpoint in endpoints.iter_mut() {
            if !by_addr.contains_key(&endpoint.addr)
                && self.primed
                && !self.tables.lists(name, &endpoint.addr)
            {
                self.stamps
                    .push_back((now_ms, name.to_owned(), endpoint.addr.clone()));
                by_addr.insert(
                    endpoint.addr.clone(),
                    Observed {
                        serving_since_ms: Some(now_ms),
                        health: None,
                    },
                );
            }
            let seen = by_addr.get(&endpoint.addr).copied().unwrap_or_default();
            endpoint.serving_since_ms = seen.serving_since_ms;
            endpoint.health = seen.health;
        }
        by_addr.retain(|addr, _| {
            endpoints
                .binary_search_by(|e| e.addr.as_str().cmp(addr))
                .is_ok()
        });
        if !by_addr.is_empty() {
            self.observed.insert(name.to_owned(), by_addr);
        }
    }
}

/// The registry, even if a panic poisoned its lock (its state is
/// consistent between calls: nothing panics half-way through one).
pub fn lock(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

/// The time now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::Snapshot;
    use std::sync::Arc;

    fn registry() -> Registry {
        Registry::new(vec![
            "etcd-naming=svc/".parse().expect("spec"),
            "openim-v2=openim:///".parse().expect("spec"),
        ])
    }

    fn naming(addr: &str, weight: u32) -> Vec<u8> {
        format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":{{"weight":{weight}}}}}"#).into_bytes()
    }

    fn snapshot(r: &mut Registry) -> Snapshot {
        r.commit();
        let tables = r.tables();
        Snapshot {
            revision: r.revision(),
            health_seq: 0,
            stale: false,
            services: tables
                .services
                .iter()
                .map(|(n, b)| (n.to_string(), b.service.clone()))
                .collect(),
            rejected: tables
                .rejected
                .iter()
                .map(|(k, reason)| etcd_mesh_wire::Rejected {
                    key: k.to_string(),
                    reason: reason.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn builds_sorted_tables_from_both_formats() {
        let mut r = registry();
        r.reset(10);
        r.put(0, b"svc/demo.Echo/b", &naming("127.0.0.1:2", 2), 5);
        r.put(0, b"svc/demo.Echo/a", &naming("127.0.0.1:1", 1), 6);
        r.put(1, b"openim:///User/10.0.0.1:7", b"10.0.0.1:7", 7);
        let s = snapshot(&mut r);
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
        assert_eq!(snapshot(&mut r).services["demo.Echo"].endpoints.len(), 1);
    }

    #[test]
    fn commits_report_only_what_really_changed() {
        let mut r = registry();
        r.put(0, b"svc/a/1", &naming("127.0.0.1:1", 1), 2);
        r.put(0, b"svc/b/1", &naming("127.0.0.1:2", 1), 3);
        r.put(0, b"svc/bad/1", b"{", 4);
        let first = r.commit();
        assert_eq!(first.services, [Arc::from("a"), Arc::from("b")]);
        assert_eq!(first.rejections, [Arc::from("svc/bad/1")]);
        // The same value again, and a weight change in one service.
        r.put(0, b"svc/a/1", &naming("127.0.0.1:1", 1), 5);
        r.put(0, b"svc/b/1", &naming("127.0.0.1:2", 4), 6);
        assert_eq!(r.commit().services, [Arc::from("b")]);
        // A re-listing with one service gone and the rejection fixed.
        r.reset(9);
        r.put(0, b"svc/a/1", &naming("127.0.0.1:1", 1), 5);
        r.put(0, b"svc/bad/1", &naming("127.0.0.1:3", 1), 8);
        let relisted = r.commit();
        assert_eq!(relisted.services, [Arc::from("b"), Arc::from("bad")]);
        assert_eq!(relisted.rejections, [Arc::from("svc/bad/1")]);
        assert!(r.tables().rejected.is_empty());
        assert_eq!(r.tables().endpoints, 2);
        assert_eq!(r.commit(), Commit::default());
    }

    #[test]
    fn digest_and_counts_match_a_fresh_build() {
        // Built change by change, or at once from the end state: the same.
        let mut r = registry();
        let mut rng = 7u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 33
        };
        for revision in 1..400i64 {
            let key = format!("svc/s{}/{}", next() % 5, next() % 6);
            let addr = format!("127.0.0.1:{}", 1 + next() % 8);
            match next() % 4 {
                0 => {
                    r.delete(0, key.as_bytes());
                }
                1 => {
                    r.put(0, key.as_bytes(), b"garbage", revision);
                }
                _ => {
                    r.put(
                        0,
                        key.as_bytes(),
                        &naming(&addr, (next() % 3) as u32),
                        revision,
                    );
                }
            }
            if next() % 3 == 0 {
                r.commit();
            }
        }
        let incremental = snapshot(&mut r);
        let fresh = Tables::from_snapshot(&incremental);
        assert_eq!(fresh.digest, r.tables().digest);
        assert_eq!(fresh.endpoints, r.tables().endpoints);
        let mut rebuilt = registry();
        for (id, entry) in &r.entries {
            let _ = entry;
            let value = match &r.entries[id].parsed {
                Ok(reg) => naming(&reg.endpoint.addr, reg.endpoint.weight),
                Err(_) => b"garbage".to_vec(),
            };
            rebuilt.put(id.0, &id.1, &value, r.entries[id].mod_revision);
        }
        rebuilt.advance(r.revision());
        // A one-shot build has seen nothing arrive: no start times.
        let mut unstamped = incremental.clone();
        for service in unstamped.services.values_mut() {
            for endpoint in &mut service.endpoints {
                endpoint.serving_since_ms = None;
            }
        }
        assert_eq!(snapshot(&mut rebuilt), unstamped);
    }

    #[test]
    fn arrivals_and_health_are_observed_per_endpoint() {
        let endpoint = |r: &Registry, addr: &str| {
            r.tables().services["s"]
                .service
                .endpoints
                .iter()
                .find(|e| e.addr == addr)
                .cloned()
                .expect("listed")
        };
        let mut r = registry();
        r.put(0, b"svc/s/a", &naming("127.0.0.1:1", 1), 2);
        r.commit_at(1_000);
        assert_eq!(
            endpoint(&r, "127.0.0.1:1").serving_since_ms,
            None,
            "listed at start"
        );
        r.put(0, b"svc/s/b", &naming("127.0.0.1:2", 1), 3);
        r.commit_at(2_000);
        assert_eq!(endpoint(&r, "127.0.0.1:2").serving_since_ms, Some(2_000));
        // A weight change is not an arrival.
        r.put(0, b"svc/s/b", &naming("127.0.0.1:2", 5), 4);
        r.commit_at(3_000);
        assert_eq!(endpoint(&r, "127.0.0.1:2").serving_since_ms, Some(2_000));

        assert!(r.set_health("s", "127.0.0.1:1", Health::Unhealthy, 4_000));
        assert!(!r.set_health("s", "127.0.0.1:1", Health::Unhealthy, 4_000));
        assert!(
            !r.set_health("s", "127.0.0.1:9", Health::Unhealthy, 4_000),
            "unknown"
        );
        let commit = r.commit_health(4_000);
        assert_eq!(commit.services, [Arc::from("s")]);
        assert_eq!(endpoint(&r, "127.0.0.1:1").health, Some(Health::Unhealthy));
        r.set_health("s", "127.0.0.1:1", Health::Healthy, 5_000);
        r.commit_health(5_000);
        let back = endpoint(&r, "127.0.0.1:1");
        assert_eq!(
            (back.health, back.serving_since_ms),
            (Some(Health::Healthy), Some(5_000))
        );

        // A health change waits while the service has an etcd change pending.
        r.put(0, b"svc/s/b", &naming("127.0.0.1:2", 7), 6);
        r.set_health("s", "127.0.0.1:2", Health::NotServing, 6_000);
        assert!(r.commit_health(6_000).services.is_empty());
        assert_eq!(endpoint(&r, "127.0.0.1:2").weight, 5);
        r.commit_at(6_000);
        let both = endpoint(&r, "127.0.0.1:2");
        assert_eq!((both.weight, both.health), (7, Some(Health::NotServing)));

        // Endpoints read through a `health=off` watch are not checked.
        let mut mixed = Registry::new(vec![
            "etcd-naming=svc/".parse().expect("spec"),
            "etcd-naming=quiet/,health=off".parse().expect("spec"),
        ]);
        mixed.put(0, b"svc/s/a", &naming("127.0.0.1:1", 1), 2);
        mixed.put(1, b"quiet/s/b", &naming("127.0.0.1:2", 1), 3);
        mixed.commit_at(1_000);
        assert!(mixed.checked("s", "127.0.0.1:1"));
        assert!(!mixed.checked("s", "127.0.0.1:2"));

        // Gone and back: new again, its health forgotten.
        r.delete(0, b"svc/s/b");
        r.commit_at(7_000);
        r.put(0, b"svc/s/b", &naming("127.0.0.1:2", 1), 8);
        r.commit_at(8_000);
        let again = endpoint(&r, "127.0.0.1:2");
        assert_eq!((again.health, again.serving_since_ms), (None, Some(8_000)));
    }

    #[test]
    fn arrival_stamps_are_dropped_past_the_horizon() {
        let stamp = |r: &Registry, addr: &str| {
            r.tables().services["s"]
                .service
                .endpoints
                .iter()
                .find(|e| e.addr == addr)
                .and_then(|e| e.serving_since_ms)
        };
        let mut r = registry();
        r.put(0, b"svc/s/a", &naming("127.0.0.1:1", 1), 2);
        r.commit_at(1_000);
        r.put(0, b"svc/s/b", &naming("127.0.0.1:2", 1), 3);
        r.commit_at(2_000);
        r.put(0, b"svc/s/c", &naming("127.0.0.1:3", 1), 4);
        r.commit_at(5_000);
        assert!(!r.expire_stamps(2_500, 1_000), "none past the horizon yet");
        assert!(r.expire_stamps(3_000, 1_000));
        assert_eq!(r.commit_health(3_000).services, [Arc::from("s")]);
        assert_eq!(stamp(&r, "127.0.0.1:2"), None);
        assert_eq!(stamp(&r, "127.0.0.1:3"), Some(5_000), "not yet");
        // Gone before its horizon: nothing to drop; back again: stamped
        // anew, and that stamp has its own horizon.
        r.delete(0, b"svc/s/c");
        r.commit_at(5_500);
        r.put(0, b"svc/s/c", &naming("127.0.0.1:3", 1), 6);
        r.commit_at(5_800);
        assert!(
            !r.expire_stamps(6_000, 1_000),
            "the old stamp is left behind"
        );
        assert_eq!(stamp(&r, "127.0.0.1:3"), Some(5_800));
        assert!(r.expire_stamps(6_800, 1_000));
        r.commit_health(6_800);
        assert_eq!(stamp(&r, "127.0.0.1:3"), None);
        // A recovery stamps too, and expires the same way.
        r.set_health("s", "127.0.0.1:1", Health::Unhealthy, 7_000);
        r.set_health("s", "127.0.0.1:1", Health::Healthy, 7_500);
        r.commit_health(7_500);
        assert_eq!(stamp(&r, "127.0.0.1:1"), Some(7_500));
        assert!(r.expire_stamps(8_500, 1_000));
        r.commit_health(8_500);
        assert_eq!(stamp(&r, "127.0.0.1:1"), None);
    }

    /// A re-listing at the revision already served (etcd restarted, no
    /// write) leaves every service "pending an etcd change", so health
    /// commits skip them all; the sync loop must commit such a listing
    /// itself, or health would wait for an unrelated write.
    #[test]
    fn a_relisting_at_the_same_revision_leaves_health_to_the_commit() {
        let mut r = registry();
        r.put(0, b"svc/s/a", &naming("127.0.0.1:1", 1), 2);
        r.put(0, b"svc/t/b", &naming("127.0.0.1:2", 1), 3);
        r.commit_at(1_000);
        r.reset(3);
        r.put(0, b"svc/s/a", &naming("127.0.0.1:1", 1), 2);
        r.put(0, b"svc/t/b", &naming("127.0.0.1:2", 1), 3);
        assert!(r.set_health("s", "127.0.0.1:1", Health::Unhealthy, 2_000));
        assert!(
            r.commit_health(2_000).services.is_empty(),
            "pending after the re-listing: skipped"
        );
        let commit = r.commit_at(2_000);
        assert_eq!(commit.services, [Arc::from("s")], "only health differs");
        let unhealthy = &r.tables().services["s"].service.endpoints[0];
        assert_eq!(unhealthy.health, Some(Health::Unhealthy));
    }

    #[test]
    fn bad_registrations_are_listed_not_fatal() {
        let mut r = registry();
        assert!(matches!(r.put(0, b"svc/s/x", b"{", 3), Change::Rejected(_)));
        r.put(0, b"svc/s/y", &naming("127.0.0.1:1", 1), 4);
        let s = snapshot(&mut r);
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
        assert!(snapshot(&mut r).rejected.is_empty());
    }

    /// A rejected key deleted while etcd was away is missing from the
    /// re-listing: its rejection goes from the tables, and its report too.
    #[test]
    fn a_rejected_key_gone_from_a_relisting_is_forgotten() {
        let mut r = registry();
        assert!(matches!(r.put(0, b"svc/s/x", b"{", 3), Change::Rejected(_)));
        r.put(0, b"svc/s/y", &naming("127.0.0.1:1", 1), 4);
        assert_eq!(r.commit().rejections, [Arc::from("svc/s/x")]);

        r.reset(6);
        r.put(0, b"svc/s/y", &naming("127.0.0.1:1", 1), 4);
        assert_eq!(r.commit().rejections, [Arc::from("svc/s/x")]);
        assert!(r.tables().rejected.is_empty());
        assert!(r.reported.is_empty(), "{:?}", r.reported);

        // Back with the same revision (etcd restored from a backup): a
        // rejection to report again.
        assert!(matches!(r.put(0, b"svc/s/x", b"{", 3), Change::Rejected(_)));
        // A key still listed stays reported across a re-listing.
        r.commit();
        r.reset(6);
        assert_eq!(r.put(0, b"svc/s/x", b"{", 3), Change::Unchanged);
        r.commit();
        assert_eq!(r.reported.len(), 1);
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
            let s = snapshot(&mut r);
            assert_eq!(s.services["s"].endpoints.len(), 1);
            assert_eq!(s.services["s"].endpoints[0].weight, 9);
            assert_eq!(s.rejected.len(), 1);
            assert_eq!(s.rejected[0].key, "svc/s/old");
            assert!(
                s.rejected[0].reason.contains("svc/s/new"),
                "{}",
                s.rejected[0].reason
            );
            // The newer key goes: the older one gives the endpoint again.
            r.delete(0, b"svc/s/new");
            let s = snapshot(&mut r);
            assert_eq!(s.services["s"].endpoints[0].weight, 1);
            assert!(s.rejected.is_empty(), "{:?}", s.rejected);
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
