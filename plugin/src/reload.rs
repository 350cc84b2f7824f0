//! How a worker's tables follow shared data, in bounded slices.
//!
//! A worker that holds nothing yet, or that fell too far behind the change
//! log ([`ChangeLog::since`] says `None`), must read every service. Read in
//! one go, that blocks its Envoy worker thread for the whole load (159 ms at
//! 10,000 services, ~350 ms at 100,000). Instead the load is *pending*: the
//! [`Loader`] takes the change-log sequence and then the index (the names)
//! at that moment, and each refresh step reads at most one slice
//! ([`SLICE`]) until every service is read. The services a delta names
//! (up to the log's 4,096 at once) go through the same slices, first, so
//! no refresh step blocks longer than one slice. Meanwhile:
//! - the worker answers calls: a call for a service not read yet reads just
//!   that one service ([`Loader::ensure`]);
//! - deltas are not lost: the services each names are marked stale and read
//!   first, each with its current value;
//! - a full load reads each service's *current* value when it reaches it
//!   (empty: removed), and skips those read since it began (by a delta or a
//!   call), so it never undoes a delta;
//! - once the index is done, the services held from before the load that
//!   nothing read since are read once more: their value is empty by then
//!   (they left the index), unless a delta brought them back, and then they
//!   were read already.
//!
//! Which services are read is the tables' generation
//! ([`WorkerTables::begin_generation`]): a full load is a new generation,
//! a delta marks its services stale ([`WorkerTables::mark_stale`]), and a
//! service is left to read until it is stamped with the current one. The
//! tables are whole (their digest the poller's) only when nothing is left
//! to read; until then [`Refreshed::current`] stays `None`, so a worker's
//! revision and digest gauges never claim tables half read.

use crate::feed::{service_key, ChangeLog, CHANGES_KEY, INDEX_KEY};
use crate::tables::WorkerTables;
use std::ops::Range;

/// Where the loader reads: proxy-wasm shared data in the plugin, a map in
/// the tests.
pub trait SharedData {
    /// The value under `key`; `Ok(None)` when the key holds nothing.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
}

/// How much one slice may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceLimit {
    /// The most services a slice visits (read, or skipped as read already).
    pub services: usize,
    /// The time after which a slice stops (µs), checked after each service
    /// it reads.
    pub budget_us: u64,
}

/// The slice of a worker's reads: 5 ms or 2,000 services, whichever comes
/// first. 5 ms is what a call may wait behind one slice on its worker, of
/// the order of an upstream call's own latency and far below the 159-350 ms
/// a full load in one go took; at the measured ~16 µs a service (10
/// endpoints each) the clock ends a slice after some 300 services, and a
/// load of 100,000 services takes ~70 slices. The count bounds a slice of
/// tiny services, or of services skipped as read already (a hash lookup
/// each).
pub const SLICE: SliceLimit = SliceLimit {
    services: 2_000,
    budget_us: 5_000,
};

/// What one refresh step did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Values that did not decode: each service is kept as it was, and not
    /// read again until it changes.
    pub errors: Vec<String>,
    /// When the tables are whole and current after this step: the etcd
    /// revision they hold (the worker's gauges may say so).
    pub current: Option<u64>,
    /// When a full load ended in this step: how long it took (ms, wall
    /// clock, from the step that began it, across slices).
    pub loaded_in_ms: Option<u64>,
    /// A full load began in this step (or began again: the worker fell
    /// behind the log while loading).
    pub load_started: bool,
    /// Services this step's slice read.
    pub read: usize,
}

/// What a worker has left to read: nothing, the services deltas named, a
/// full load, or both.
#[derive(Debug, Default)]
pub struct Loader {
    /// Services deltas named and not read yet, read first (from the end).
    changed: Vec<String>,
    /// The full load under way, if any.
    full: Option<FullLoad>,
    /// The etcd revision of the newest change log read.
    revision: u64,
    /// When the full load that ended in this step began (µs).
    ended_load_started_us: Option<u64>,
}

/// A full load under way.
#[derive(Debug)]
struct FullLoad {
    /// The index as read when the load began: names, one per line.
    index: Vec<u8>,
    /// Byte offset in `index` of the next name to read.
    cursor: usize,
    /// Once `index` is done: the services held that are not current (from
    /// before the load, nothing has read them since), read last.
    leftovers: Option<Vec<String>>,
    /// When the load began (µs), kept when it begins again.
    started_us: u64,
}

impl Loader {
    /// Whether services are left to read: the worker answers calls
    /// meanwhile, reading those it needs one by one ([`Self::ensure`]).
    pub fn is_loading(&self) -> bool {
        !self.changed.is_empty() || self.full.is_some()
    }

    /// One refresh step: when the log moved (or nothing is held yet), the
    /// services it names are marked to read, or a full load begins when the
    /// worker is too far behind; then one slice of what is left to read. A
    /// read that fails ends the step with the error; whatever was read
    /// stays, and the next step goes on from there.
    pub fn refresh(
        &mut self,
        tables: &mut WorkerTables,
        shared: &impl SharedData,
        log_moved: bool,
        clock_us: &mut impl FnMut() -> u64,
        limit: SliceLimit,
    ) -> Result<Refreshed, String> {
        let mut out = Refreshed::default();
        let followed = log_moved || tables.seq().is_none();
        if followed {
            self.follow_log(tables, shared, clock_us, &mut out)?;
        }
        let sliced = self.is_loading();
        if sliced {
            self.slice(tables, shared, clock_us, limit, &mut out)?;
        }
        if (followed || sliced) && !self.is_loading() {
            out.current = Some(self.revision);
        }
        if let Some(started_us) = self.ended_load_started_us.take() {
            out.loaded_in_ms = Some(clock_us().saturating_sub(started_us) / 1_000);
        }
        Ok(out)
    }

    /// Reads the change log: the services it names since the sequence held
    /// are marked to read, or, too far behind, a full load begins.
    fn follow_log(
        &mut self,
        tables: &mut WorkerTables,
        shared: &impl SharedData,
        clock_us: &mut impl FnMut() -> u64,
        out: &mut Refreshed,
    ) -> Result<(), String> {
        let log = match shared.get(CHANGES_KEY)? {
            Some(bytes) => ChangeLog::decode(&bytes)?,
            None => return Err("no change log in shared data yet".into()),
        };
        match log.since(tables.seq()) {
            Some(names) => {
                for name in names {
                    tables.mark_stale(name);
                    self.changed.push(name.to_owned());
                }
            }
            None => {
                // The index is read after the log: the poller writes the
                // services, then the index, then the log, so every name
                // added up to the log's sequence is in this index.
                let index = shared.get(INDEX_KEY)?.unwrap_or_default();
                tables.begin_generation();
                let started_us = match &self.full {
                    Some(full) => full.started_us,
                    None => clock_us(),
                };
                // The load reads every service: what deltas named too.
                self.changed.clear();
                self.full = Some(FullLoad {
                    index,
                    cursor: 0,
                    leftovers: None,
                    started_us,
                });
                out.load_started = true;
            }
        }
        self.revision = log.revision();
        tables.set_seq(log.latest());
        Ok(())
    }

    /// Before a call picks from `name` while services are left to read:
    /// reads that one service if it is one of them (one service's cost,
    /// whatever the size of the tables). `Ok(true)` when it read it; an
    /// error leaves the service as it was (unknown if it was not held).
    pub fn ensure(
        &self,
        tables: &mut WorkerTables,
        shared: &impl SharedData,
        name: &str,
        now_ms: u64,
    ) -> Result<bool, String> {
        if !self.is_loading() || tables.is_current(name) {
            return Ok(false);
        }
        let mut errors = Vec::new();
        read_service(tables, shared, name, now_ms, &mut errors)?;
        errors.pop().map_or(Ok(true), Err)
    }

    /// Reads one slice: the services deltas named, then the full load's
    /// index, then its leftovers. A name moves on only once read: a read
    /// that fails is tried again by the next step.
    fn slice(
        &mut self,
        tables: &mut WorkerTables,
        shared: &impl SharedData,
        clock_us: &mut impl FnMut() -> u64,
        limit: SliceLimit,
        out: &mut Refreshed,
    ) -> Result<(), String> {
        let started = clock_us();
        let mut now_ms = started / 1_000;
        for _ in 0..limit.services.max(1) {
            let read = if let Some(name) = self.changed.last() {
                let read = !tables.is_current(name);
                if read {
                    read_service(tables, shared, name, now_ms, &mut out.errors)?;
                }
                self.changed.pop();
                read
            } else if let Some(full) = &mut self.full {
                match full.next(tables, shared, now_ms, &mut out.errors)? {
                    Some(read) => read,
                    None => break,
                }
            } else {
                break;
            };
            if read {
                out.read += 1;
                let now = clock_us();
                if now.saturating_sub(started) >= limit.budget_us {
                    break;
                }
                now_ms = now / 1_000;
            }
        }
        // Ended as soon as its last service is read, not a step later.
        if let Some(full) = self.full.take_if(|full| full.is_done()) {
            self.ended_load_started_us = Some(full.started_us);
        }
        Ok(())
    }
}

impl FullLoad {
    /// Whether every service of the load is read.
    fn is_done(&self) -> bool {
        self.leftovers.as_ref().is_some_and(Vec::is_empty)
    }

    /// Visits the next service of the load: `Some(true)` when it read it,
    /// `Some(false)` when it skipped it (read already), `None` when the
    /// load is done.
    fn next(
        &mut self,
        tables: &mut WorkerTables,
        shared: &impl SharedData,
        now_ms: u64,
        errors: &mut Vec<String>,
    ) -> Result<Option<bool>, String> {
        let Some(leftovers) = &mut self.leftovers else {
            let Some((name, next)) = next_name(&self.index, self.cursor) else {
                self.leftovers = Some(tables.stale_names());
                return Ok(Some(false));
            };
            let name = self
                .index
                .get(name)
                .and_then(|bytes| std::str::from_utf8(bytes).ok());
            let read = match name {
                Some(name) if !tables.is_current(name) => {
                    read_service(tables, shared, name, now_ms, errors)?;
                    true
                }
                _ => false,
            };
            self.cursor = next;
            return Ok(Some(read));
        };
        let Some(name) = leftovers.last() else {
            return Ok(None);
        };
        let read = !tables.is_current(name);
        if read {
            read_service(tables, shared, name, now_ms, errors)?;
        }
        leftovers.pop();
        Ok(Some(read))
    }
}

/// The byte range of the first name in `index` from `at`, and the offset
/// after it; empty lines are skipped.
fn next_name(index: &[u8], mut at: usize) -> Option<(Range<usize>, usize)> {
    while let Some(rest) = index.get(at..).filter(|rest| !rest.is_empty()) {
        let end = rest
            .iter()
            .position(|byte| *byte == b'\n')
            .map_or(index.len(), |length| at + length);
        if end > at {
            return Some((at..end, end + 1));
        }
        at = end + 1;
    }
    None
}

/// Reads `name`'s current value and applies it; a value that does not
/// decode keeps the service as it was, and counts as read.
fn read_service(
    tables: &mut WorkerTables,
    shared: &impl SharedData,
    name: &str,
    now_ms: u64,
    errors: &mut Vec<String>,
) -> Result<(), String> {
    let value = shared.get(&service_key(name))?.unwrap_or_default();
    if let Err(e) = tables.apply_service(name, &value, now_ms) {
        errors.push(e);
    }
    tables.mark_current(name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::{index_names, PollerTables, Update};
    use crate::tables::Pick;
    use etcd_mesh_routing::rng::SplitMix64;
    use etcd_mesh_routing::Policy;
    use etcd_mesh_wire::{Changes, Digest, Endpoint, Service};
    use std::cell::{Cell, RefCell};
    use std::collections::{BTreeMap, HashMap};

    /// Shared data as the poller leaves it, with a clock that moves on by
    /// `read_us` at each read (what reading and decoding a service costs).
    #[derive(Default)]
    struct Store {
        values: RefCell<HashMap<String, Vec<u8>>>,
        reads: Cell<usize>,
        clock_us: Cell<u64>,
        read_us: u64,
        /// Reads fail while set (a host refusing).
        failing: Cell<bool>,
    }

    impl SharedData for Store {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
            if self.failing.get() {
                return Err(format!("cannot read {key:?}"));
            }
            self.reads.set(self.reads.get() + 1);
            self.clock_us.set(self.clock_us.get() + self.read_us);
            Ok(self.values.borrow().get(key).cloned())
        }
    }

    impl Store {
        fn set(&self, key: &str, value: &[u8]) {
            self.values
                .borrow_mut()
                .insert(key.to_owned(), value.to_vec());
        }
    }

    /// A poller in front of a [`Store`]: what sync-server publishes goes
    /// through [`PollerTables`] and is written as the glue writes it.
    struct Source {
        poller: PollerTables,
        held: BTreeMap<String, Service>,
        revision: u64,
        store: Store,
    }

    fn service(port: u32, weight: u32) -> Service {
        Service {
            endpoints: vec![Endpoint::new(
                format!("127.0.{}.{}:{}", port / 250 % 250, port % 250, 1_000 + port),
                weight,
            )],
        }
    }

    fn addr(service: &Service) -> String {
        service.endpoints[0].addr.clone()
    }

    impl Source {
        fn new(read_us: u64) -> Source {
            Source {
                poller: PollerTables::default(),
                held: BTreeMap::new(),
                revision: 0,
                store: Store {
                    read_us,
                    ..Store::default()
                },
            }
        }

        /// The poller applies a change; nothing is written yet.
        fn change(&mut self, set: &[(String, Service)], removed: &[String], full: bool) -> Update {
            if full {
                self.held.clear();
            }
            for name in removed {
                self.held.remove(name);
            }
            for (name, service) in set {
                self.held.insert(name.clone(), service.clone());
            }
            let mut digest = Digest::default();
            for (name, service) in &self.held {
                digest.add(Digest::of(name, service));
            }
            let changes = Changes {
                revision: self.revision + 1,
                since: if full { 0 } else { self.revision },
                epoch: "e".into(),
                full,
                services: if full {
                    self.held.clone()
                } else {
                    set.iter().cloned().collect()
                },
                removed: if full { Vec::new() } else { removed.to_vec() },
                digest: digest.value(),
                ..Changes::default()
            };
            self.revision += 1;
            self.poller
                .apply(changes)
                .expect("fits")
                .expect("something new")
        }

        /// The poller's first half of a write: the services.
        fn write_services(&self, update: &Update) {
            for (name, value) in &update.services {
                self.store.set(&service_key(name), value);
            }
        }

        /// The second half: the index, then the log.
        fn write_rest(&self, update: &Update) {
            if let Some(index) = &update.index {
                self.store.set(INDEX_KEY, index);
            }
            self.store.set(CHANGES_KEY, &update.log);
        }

        fn publish(&mut self, set: &[(String, Service)], removed: &[String], full: bool) {
            let update = self.change(set, removed, full);
            self.write_services(&update);
            self.write_rest(&update);
        }

        fn digest(&self) -> Digest {
            self.poller.digest()
        }
    }

    fn name(i: u32) -> String {
        format!("svc.{i:05}")
    }

    /// A source publishing services 0..n in full.
    fn source_of(n: u32, read_us: u64) -> Source {
        let mut source = Source::new(read_us);
        let set: Vec<_> = (0..n).map(|i| (name(i), service(i, 1))).collect();
        source.publish(&set, &[], true);
        source
    }

    /// One refresh step, the log read again each time.
    fn step(
        loader: &mut Loader,
        tables: &mut WorkerTables,
        source: &Source,
        limit: SliceLimit,
    ) -> Refreshed {
        let store = &source.store;
        loader
            .refresh(tables, store, true, &mut || store.clock_us.get(), limit)
            .expect("reads")
    }

    fn by_count(services: usize) -> SliceLimit {
        SliceLimit {
            services,
            budget_us: u64::MAX,
        }
    }

    /// The tables a one-shot load of what `source` holds gives.
    fn one_shot(source: &Source) -> WorkerTables {
        let mut tables = WorkerTables::new(7, Policy::default());
        let index = source.store.values.borrow()[INDEX_KEY].clone();
        let values: Vec<(&str, Vec<u8>)> = index_names(&index)
            .map(|name| {
                let value = source.store.values.borrow()[&service_key(name)].clone();
                (name, value)
            })
            .collect();
        assert!(tables.reload(values, 0).is_empty());
        tables
    }

    #[test]
    fn a_load_in_slices_matches_a_one_shot_load() {
        let source = source_of(1_000, 1);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        let first = step(&mut loader, &mut tables, &source, by_count(64));
        assert!(first.load_started && first.current.is_none());
        assert!(loader.is_loading());
        // It answers calls from the first step on: the hold lets them go.
        assert!(tables.seq().is_some());
        let mut steps = 1;
        let mut reads = first.read;
        let done = loop {
            let refreshed = step(&mut loader, &mut tables, &source, by_count(64));
            assert!(refreshed.read <= 64, "{}", refreshed.read);
            assert!(!refreshed.load_started);
            reads += refreshed.read;
            steps += 1;
            if refreshed.current.is_some() {
                break refreshed;
            }
            assert!(loader.is_loading());
        };
        assert!(!loader.is_loading());
        assert_eq!(steps, 1_000 / 64 + 1, "every slice full but the last");
        assert_eq!(reads, 1_000, "each service read once");
        assert_eq!(done.current, Some(source.revision));
        assert!(done.loaded_in_ms.is_some() && done.errors.is_empty());
        assert_eq!(tables.digest(), source.digest());
        assert_eq!(tables.digest(), one_shot(&source).digest());
        assert_eq!(tables.len(), 1_000);
        // Later steps with nothing new do nothing.
        let idle = step(&mut loader, &mut tables, &source, by_count(64));
        assert_eq!((idle.read, idle.load_started), (0, false));
    }

    #[test]
    fn a_slice_stops_at_its_budget() {
        // 100 µs a read: a 5 ms slice reads 50 services, not 2,000.
        let source = source_of(3_000, 100);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        let mut slices = Vec::new();
        loop {
            let refreshed = step(&mut loader, &mut tables, &source, SLICE);
            slices.push(refreshed.read);
            if let Some(ms) = refreshed.loaded_in_ms {
                // 3,000 reads of 100 µs, and the log and index.
                assert!((300..310).contains(&ms), "{ms} ms");
                break;
            }
        }
        assert!(slices.iter().all(|read| *read <= 50), "{slices:?}");
        assert_eq!(slices.iter().sum::<usize>(), 3_000);
        assert_eq!(tables.digest(), source.digest());
    }

    #[test]
    fn a_call_reads_a_service_the_load_has_not_reached() {
        let source = source_of(500, 1);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        step(&mut loader, &mut tables, &source, by_count(10));
        let far = name(400);
        assert_eq!(tables.pick(&far), Pick::NoEndpoint, "not reached yet");
        let reads = source.store.reads.get();
        assert_eq!(loader.ensure(&mut tables, &source.store, &far, 0), Ok(true));
        assert_eq!(source.store.reads.get(), reads + 1, "one read");
        let expected = addr(&service(400, 1));
        assert_eq!(tables.pick(&far), Pick::Endpoint(&expected));
        // Read once: the next call, and the load when it gets there, skip it.
        assert_eq!(
            loader.ensure(&mut tables, &source.store, &far, 0),
            Ok(false)
        );
        // An unknown service stays unknown; one already read is not read.
        assert_eq!(
            loader.ensure(&mut tables, &source.store, "nope", 0),
            Ok(true)
        );
        assert_eq!(tables.pick("nope"), Pick::NoEndpoint);
        assert_eq!(
            loader.ensure(&mut tables, &source.store, &name(3), 0),
            Ok(false)
        );
        let mut reads = 0;
        while loader.is_loading() {
            reads += step(&mut loader, &mut tables, &source, by_count(10)).read;
        }
        assert_eq!(
            reads,
            500 - 10 - 1,
            "the service read by the call is skipped"
        );
        assert_eq!(tables.digest(), source.digest());
        // Without a load, nothing is read on the call path.
        let before = source.store.reads.get();
        assert_eq!(
            loader.ensure(&mut tables, &source.store, "nope", 0),
            Ok(false)
        );
        assert_eq!(source.store.reads.get(), before);
    }

    #[test]
    fn deltas_during_a_load_are_kept_and_not_undone() {
        let mut source = source_of(200, 1);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        step(&mut loader, &mut tables, &source, by_count(50));
        // Reached: 0..50. Change one reached and one not, remove one of
        // each, add two new ones.
        let (reached, unreached) = (name(10), name(150));
        let set = [
            (reached.clone(), service(1_010, 3)),
            (unreached.clone(), service(1_150, 3)),
            (name(900), service(900, 1)),
            (name(901), service(901, 1)),
        ];
        source.publish(&set, &[name(20), name(160)], false);
        let refreshed = step(&mut loader, &mut tables, &source, by_count(50));
        assert!(!refreshed.load_started, "a delta, not another load");
        assert_eq!(refreshed.current, None, "the load goes on");
        assert_eq!(tables.pick(&name(160)), Pick::NoEndpoint, "removed at once");
        let new = addr(&service(901, 1));
        assert_eq!(
            tables.pick(&name(901)),
            Pick::Endpoint(&new),
            "added at once"
        );
        // Removed, then back before the load reaches it.
        source.publish(&[(name(160), service(1_160, 2))], &[], false);
        // Another delta lands on a service the load has not reached.
        source.publish(&[(name(199), service(1_199, 1))], &[name(901)], false);
        let mut last = None;
        while loader.is_loading() {
            last = step(&mut loader, &mut tables, &source, by_count(50)).current;
        }
        assert_eq!(last, Some(source.revision));
        assert_eq!(tables.digest(), source.digest());
        assert_eq!(tables.digest(), one_shot(&source).digest());
        let changed = addr(&service(1_150, 3));
        assert_eq!(tables.pick(&unreached), Pick::Endpoint(&changed));
        let back = addr(&service(1_160, 2));
        assert_eq!(tables.pick(&name(160)), Pick::Endpoint(&back));
        assert_eq!(tables.pick(&name(20)), Pick::NoEndpoint);
        assert_eq!(tables.pick(&name(901)), Pick::NoEndpoint);
        let new = addr(&service(900, 1));
        assert_eq!(tables.pick(&name(900)), Pick::Endpoint(&new));
        // Without a load, deltas are current at once.
        source.publish(&[(name(902), service(902, 1))], &[], false);
        let refreshed = step(&mut loader, &mut tables, &source, by_count(50));
        assert_eq!(refreshed.current, Some(source.revision));
        assert_eq!(refreshed.read, 1);
        assert_eq!(tables.digest(), source.digest());
    }

    #[test]
    fn a_large_delta_is_read_in_slices_and_calls_read_what_they_need() {
        let mut source = source_of(400, 1);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        while step(&mut loader, &mut tables, &source, SLICE)
            .current
            .is_none()
        {}
        let before = source.revision;
        // 300 changed, 50 removed, 20 new: 370 names in one update.
        let mut set: Vec<_> = (0..300).map(|i| (name(i), service(2_000 + i, 2))).collect();
        set.extend((400..420).map(|i| (name(i), service(i, 1))));
        let removed: Vec<_> = (300..350).map(name).collect();
        source.publish(&set, &removed, false);
        let first = step(&mut loader, &mut tables, &source, by_count(50));
        assert!(!first.load_started, "a delta, not a full load");
        assert_eq!((first.read, first.current), (50, None));
        assert!(loader.is_loading());
        assert_ne!(before, source.revision);
        // Calls meanwhile see the new tables, reading each service the
        // slices have not (they go from the last name back: 419 is read).
        let reads = source.store.reads.get();
        for (called, want) in [
            (name(299), Some(addr(&service(2_299, 2)))),
            (name(0), Some(addr(&service(2_000, 2)))),
            (name(305), None),
            (name(419), Some(addr(&service(419, 1)))),
        ] {
            let _ = loader.ensure(&mut tables, &source.store, &called, 0);
            let got = match tables.pick(&called) {
                Pick::Endpoint(addr) => Some(addr.to_owned()),
                Pick::NoEndpoint => None,
            };
            assert_eq!(got, want, "{called}");
        }
        assert_eq!(source.store.reads.get(), reads + 3);
        // Untouched by the delta: current, not read.
        assert_eq!(
            loader.ensure(&mut tables, &source.store, &name(380), 0),
            Ok(false)
        );
        let mut steps = 1;
        let done = loop {
            let refreshed = step(&mut loader, &mut tables, &source, by_count(50));
            assert!(refreshed.read <= 50);
            steps += 1;
            if refreshed.current.is_some() {
                break refreshed;
            }
        };
        assert_eq!(done.current, Some(source.revision));
        assert_eq!(done.loaded_in_ms, None, "no full load");
        assert_eq!(steps, 8, "370 names, 3 read by calls, 50 a slice");
        assert_eq!(tables.digest(), source.digest());
        assert_eq!(tables.len(), 370);
    }

    #[test]
    fn a_worker_far_behind_drops_what_the_index_no_longer_lists() {
        let mut source = source_of(300, 1);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        while step(&mut loader, &mut tables, &source, SLICE)
            .current
            .is_none()
        {}
        assert_eq!(tables.digest(), source.digest());
        // A full answer: half the services gone, some changed, some new.
        let set: Vec<_> = (150..400)
            .map(|i| (name(i), service(i, 1 + u32::from(i % 7 == 0))))
            .collect();
        source.publish(&set, &[], true);
        let started = step(&mut loader, &mut tables, &source, by_count(40));
        assert!(started.load_started);
        // A call for a service gone from the index, before the load ends.
        assert_eq!(
            loader.ensure(&mut tables, &source.store, &name(5), 0),
            Ok(true)
        );
        assert_eq!(tables.pick(&name(5)), Pick::NoEndpoint);
        let mut last = None;
        while loader.is_loading() {
            last = step(&mut loader, &mut tables, &source, by_count(40)).current;
            if loader.is_loading() {
                assert_ne!(tables.digest(), source.digest());
            }
        }
        assert_eq!(last, Some(source.revision));
        assert_eq!(tables.len(), 250);
        assert_eq!(tables.digest(), source.digest());
        assert_eq!(tables.digest(), one_shot(&source).digest());
        for gone in [0, 149] {
            assert_eq!(tables.pick(&name(gone)), Pick::NoEndpoint);
            assert_eq!(tables.override_arguments(&addr(&service(gone, 1))), None);
        }
    }

    #[test]
    fn falling_behind_while_loading_begins_again_and_keeps_the_start() {
        let mut source = source_of(100, 1_000);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        step(&mut loader, &mut tables, &source, by_count(30));
        // More updates than the log keeps, while the worker loads.
        for i in 0..100 {
            source.publish(&[(name(i), service(i, 2))], &[], false);
        }
        source.publish(&[], &[name(99)], false);
        let again = step(&mut loader, &mut tables, &source, by_count(30));
        assert!(again.load_started, "too far behind: the load begins again");
        let mut done = None;
        while loader.is_loading() {
            done = step(&mut loader, &mut tables, &source, by_count(30)).loaded_in_ms;
        }
        // 30 reads before the worker fell behind, then 99 (1 ms each).
        let ms = done.expect("done");
        assert!(ms >= 129, "measured from the first step: {ms}");
        assert_eq!(tables.digest(), source.digest());
        assert_eq!(tables.len(), 99);
    }

    #[test]
    fn a_value_that_does_not_decode_does_not_stall_the_load() {
        let mut source = source_of(50, 1);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        while step(&mut loader, &mut tables, &source, SLICE)
            .current
            .is_none()
        {}
        // The worker falls behind; meanwhile a value turns to garbage.
        source.publish(&[], &[], true);
        source.publish(
            &(0..50)
                .map(|i| (name(i), service(i, 1)))
                .collect::<Vec<_>>(),
            &[],
            true,
        );
        source.store.set(&service_key(&name(7)), b"{garbage");
        source.store.set(&service_key("ghost"), b"{garbage");
        let mut errors = Vec::new();
        let mut steps = 0;
        loop {
            let refreshed = step(&mut loader, &mut tables, &source, by_count(8));
            errors.extend(refreshed.errors);
            steps += 1;
            if refreshed.current.is_some() {
                break;
            }
            assert!(steps < 20, "the load ends");
        }
        assert_eq!(errors.len(), 1, "{errors:?}");
        // Kept as it was: the digest is still the poller's.
        assert_eq!(tables.digest(), source.digest());
        // A call for an unlisted name with a garbage value: unknown.
        assert!(loader
            .ensure(&mut tables, &source.store, "ghost", 0)
            .is_ok());
        assert_eq!(tables.pick("ghost"), Pick::NoEndpoint);
    }

    #[test]
    fn a_read_that_fails_is_tried_again() {
        let source = source_of(40, 1);
        let mut tables = WorkerTables::new(1, Policy::default());
        let mut loader = Loader::default();
        step(&mut loader, &mut tables, &source, by_count(10));
        source.store.failing.set(true);
        let store = &source.store;
        let failed = loader.refresh(&mut tables, store, false, &mut || 0, by_count(10));
        assert!(failed.is_err());
        assert!(loader.ensure(&mut tables, store, &name(30), 0).is_err());
        source.store.failing.set(false);
        while loader.is_loading() {
            step(&mut loader, &mut tables, &source, by_count(10));
        }
        assert_eq!(tables.len(), 40);
        assert_eq!(tables.digest(), source.digest());
    }

    #[test]
    fn random_deltas_and_calls_between_slices_converge() {
        for seed in 0..16 {
            let mut rng = SplitMix64::new(seed);
            let mut below = |n: u64| rng.next_u64() % n;
            let mut source = source_of(300 + below(300) as u32, 1);
            let mut tables = WorkerTables::new(seed, Policy::default());
            let mut loader = Loader::default();
            let mut next_port = 10_000;
            let mut loads = 0;
            for round in 0..60 {
                let refreshed = step(
                    &mut loader,
                    &mut tables,
                    &source,
                    by_count(1 + below(60) as usize),
                );
                loads += usize::from(refreshed.load_started);
                if refreshed.current.is_some() {
                    assert_eq!(
                        tables.digest(),
                        source.digest(),
                        "seed {seed} round {round}"
                    );
                }
                // Calls for random names, listed or not.
                for _ in 0..below(4) {
                    let called = name(below(700) as u32);
                    let _ = loader.ensure(&mut tables, &source.store, &called, 0);
                    let want = source.held.get(&called).map(addr);
                    let got = match tables.pick(&called) {
                        Pick::Endpoint(addr) => Some(addr.to_owned()),
                        Pick::NoEndpoint => None,
                    };
                    if loader.is_loading() || refreshed.current.is_some() {
                        assert_eq!(got, want, "seed {seed}: a call for {called}");
                    }
                }
                // A change: sets and removals, now and then a full answer,
                // now and then half written when the worker looks.
                let mut set = Vec::new();
                let mut removed = Vec::new();
                for _ in 0..below(6) {
                    let i = below(700) as u32;
                    if below(3) == 0 {
                        removed.push(name(i));
                    } else {
                        next_port += 1;
                        set.push((name(i), service(next_port, 1 + below(3) as u32)));
                    }
                }
                removed.retain(|r| !set.iter().any(|(n, _)| n == r));
                let full = below(25) == 0;
                if full {
                    let mut all: BTreeMap<String, Service> = source.held.clone();
                    for r in &removed {
                        all.remove(r);
                    }
                    all.extend(set.iter().cloned());
                    set = all.into_iter().collect();
                    removed.clear();
                }
                let update = source.change(&set, &removed, full);
                source.write_services(&update);
                if below(4) == 0 {
                    step(
                        &mut loader,
                        &mut tables,
                        &source,
                        by_count(1 + below(30) as usize),
                    );
                }
                source.write_rest(&update);
            }
            while step(&mut loader, &mut tables, &source, by_count(50))
                .current
                .is_none()
            {}
            assert_eq!(tables.digest(), source.digest(), "seed {seed}");
            assert_eq!(tables.digest(), one_shot(&source).digest(), "seed {seed}");
            assert_eq!(tables.len(), source.held.len());
            for (held, service) in &source.held {
                let want = addr(service);
                assert_eq!(tables.pick(held), Pick::Endpoint(&want), "seed {seed}");
            }
            assert!(loads >= 1);
        }
    }
}
