//! The poller's side of the change feed, as pure logic: applying each
//! answer of `GET /v1/changes` to what the poller holds, and deciding what
//! to write to shared data so that workers re-read only what changed.
//!
//! Shared data layout (written by the poller only):
//! - [`service_key`]`(name)`: one service's canonical JSON, empty when
//!   removed;
//! - [`INDEX_KEY`]: every service name held, one per line, rewritten only
//!   when the set of names changes;
//! - [`CHANGES_KEY`]: the [`ChangeLog`], which names the services changed
//!   at each update sequence number, so a worker holding sequence `n`
//!   re-reads just those; a worker too far behind reloads everything;
//! - the `tables` half of [`crate::VERSION_KEY`]: the newest sequence.

use etcd_mesh_wire::feed::{fit, Cursor, Fit, Position};
use etcd_mesh_wire::{Changes, Digest};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, VecDeque};

/// Shared-data key prefix of the per-service values.
pub const SERVICE_KEY_PREFIX: &str = "etcd-mesh/svc/";
/// Shared-data key of the names of every service held.
pub const INDEX_KEY: &str = "etcd-mesh/services";
/// Shared-data key of the [`ChangeLog`].
pub const CHANGES_KEY: &str = "etcd-mesh/changes";

/// Shared-data key of the queues workers are notified on.
pub const QUEUES_KEY: &str = "etcd-mesh/queues";

/// Queues kept in [`QUEUES_KEY`]: a reloaded configuration leaves the old
/// workers' queues behind, and only the newest are notified.
const QUEUES_KEPT: usize = 64;

/// The queue ids in a [`QUEUES_KEY`] value (little-endian `u32`s).
pub fn queue_ids(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .filter_map(|c| c.try_into().ok().map(u32::from_le_bytes))
}

/// A [`QUEUES_KEY`] value with `id` added, the oldest dropped past the cap.
pub fn with_queue(bytes: Option<&[u8]>, id: u32) -> Vec<u8> {
    let mut ids: Vec<u32> = queue_ids(bytes.unwrap_or_default())
        .filter(|held| *held != id)
        .collect();
    ids.push(id);
    let skip = ids.len().saturating_sub(QUEUES_KEPT);
    ids[skip..].iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// A [`QUEUES_KEY`] value without `id` (a router root context that ends
/// after a configuration reload), or `None` when it is not listed.
pub fn without_queue(bytes: Option<&[u8]>, id: u32) -> Option<Vec<u8>> {
    let ids: Vec<u32> = queue_ids(bytes.unwrap_or_default()).collect();
    ids.contains(&id).then(|| {
        ids.iter()
            .filter(|held| **held != id)
            .flat_map(|id| id.to_le_bytes())
            .collect()
    })
}

/// Updates the log remembers; a worker further behind reloads everything.
const LOG_UPDATES: usize = 64;
/// Names the log holds at most; an update naming more makes workers reload.
const LOG_NAMES: usize = 4_096;

pub fn service_key(name: &str) -> String {
    format!("{SERVICE_KEY_PREFIX}{name}")
}

/// Which services changed at each recent update.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeLog {
    /// The sequence of the last update that replaced everything: a worker
    /// holding less reloads.
    reload_at: u64,
    /// (sequence, names changed), oldest first, consecutive sequences.
    updates: VecDeque<(u64, Vec<String>)>,
    /// The etcd revision of the tables as of the newest update.
    #[serde(default)]
    revision: u64,
}

impl ChangeLog {
    /// The etcd revision of the tables as of [`Self::latest`].
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The newest sequence the log knows.
    pub fn latest(&self) -> u64 {
        self.updates.back().map_or(self.reload_at, |(seq, _)| *seq)
    }

    fn names(&self) -> usize {
        self.updates.iter().map(|(_, n)| n.len()).sum()
    }

    /// Records an update that changed `names`.
    pub fn record(&mut self, seq: u64, names: Vec<String>) {
        if names.len() > LOG_NAMES {
            return self.record_reload(seq);
        }
        self.updates.push_back((seq, names));
        while self.updates.len() > LOG_UPDATES || self.names() > LOG_NAMES {
            self.updates.pop_front();
        }
    }

    /// Records an update after which every worker reloads everything.
    pub fn record_reload(&mut self, seq: u64) {
        self.reload_at = seq;
        self.updates.clear();
    }

    /// The services to re-read for a worker holding `held` (`None`:
    /// nothing yet); `None` when it must reload everything.
    pub fn since(&self, held: Option<u64>) -> Option<BTreeSet<&str>> {
        let held = held?;
        if held < self.reload_at {
            return None;
        }
        let oldest = self.updates.front().map_or(self.reload_at + 1, |(s, _)| *s);
        if held.saturating_add(1) < oldest {
            return None;
        }
        Some(
            self.updates
                .iter()
                .filter(|(seq, _)| *seq > held)
                .flat_map(|(_, names)| names.iter().map(String::as_str))
                .collect(),
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<ChangeLog, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("the change log does not decode: {e}"))
    }
}

/// Where the poller's tables stand, as the next request names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    pub position: Position,
    pub epoch: &'a str,
    pub observer: &'a str,
    /// The digest of the tables held, sent when the replica that sent them
    /// continues another observer's client that sends it (a restart or a
    /// move to another replica then costs a few bytes, not the tables).
    pub digest: Option<u64>,
}

/// What the poller holds: its [`Cursor`], and one digest per service, so
/// that each answer is checked before anything is written.
#[derive(Debug, Default)]
pub struct PollerTables {
    cursor: Option<Cursor>,
    /// Whether the last answer applied said its server reads `digest`.
    continues: bool,
    digests: HashMap<String, u64>,
    digest: Digest,
    seq: u64,
    log: ChangeLog,
}

/// What one accepted answer asks of shared data, in this order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Per-service values to write (empty: removed).
    pub services: Vec<(String, Vec<u8>)>,
    /// The new index, when the set of names changed.
    pub index: Option<Vec<u8>>,
    /// The new change log.
    pub log: Vec<u8>,
    /// The new sequence, for the version.
    pub seq: u64,
    /// Whether the answer replaced everything.
    pub full: bool,
}

impl PollerTables {
    /// Where the tables held stand, for the next request.
    pub fn cursor(&self) -> Option<Held<'_>> {
        self.cursor.as_ref().map(|c| Held {
            position: c.position,
            epoch: c.epoch.as_str(),
            observer: c.observer.as_str(),
            digest: self.continues.then(|| self.digest.value()),
        })
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn services(&self) -> usize {
        self.digests.len()
    }

    /// Forgets the revision held, so that the next answer is a full one.
    pub fn forget_cursor(&mut self) {
        self.cursor = None;
    }

    /// Applies one answer; `Ok(None)` when it holds nothing newer. An answer
    /// that does not fit what is held (a delta from another revision or
    /// replica, a digest that does not match the result) is refused whole:
    /// nothing is written and the next request asks for everything. Whether
    /// it fits is the feed's one rule, [`fit`]: within an epoch the
    /// revision never goes back (one behind is ignored, it is not an error),
    /// a full answer replaces, a delta fits only the cursor it starts from.
    pub fn apply(&mut self, changes: Changes) -> Result<Option<Update>, String> {
        match fit(self.cursor.as_ref(), &changes) {
            Fit::Apply => {}
            Fit::Ignore => return Ok(None),
            Fit::Refuse(message) => {
                self.cursor = None;
                return Err(message);
            }
        }
        let mut digests: HashMap<String, Option<u64>> = HashMap::new();
        let mut encoded = Vec::with_capacity(changes.services.len());
        for (name, service) in &changes.services {
            let bytes = service.encode();
            digests.insert(name.clone(), Some(Digest::of_encoded(name, &bytes)));
            encoded.push((name.clone(), bytes));
        }
        if changes.full {
            for held in self.digests.keys() {
                digests.entry(held.clone()).or_insert(None);
            }
        } else {
            for name in &changes.removed {
                digests.insert(name.clone(), None);
            }
        }
        let mut digest = self.digest;
        let mut names_changed = false;
        for (name, new) in &digests {
            let old = self.digests.get(name);
            names_changed |= old.is_some() != new.is_some();
            if let Some(old) = old {
                digest.remove(*old);
            }
            if let Some(new) = new {
                digest.add(*new);
            }
        }
        if digest.value() != changes.digest {
            self.cursor = None;
            return Err(format!(
                "tables at revision {} would have digest {}, sync-server says {}",
                changes.revision,
                digest.value(),
                changes.digest
            ));
        }
        let mut update = Update::default();
        let mut changed: Vec<String> = Vec::with_capacity(digests.len());
        for (name, new) in digests {
            match new {
                Some(hash) => {
                    self.digests.insert(name.clone(), hash);
                }
                None => {
                    self.digests.remove(&name);
                    update.services.push((name.clone(), Vec::new()));
                }
            }
            changed.push(name);
        }
        update.services.extend(encoded);
        self.digest = digest;
        self.seq += 1;
        update.seq = self.seq;
        update.full = changes.full;
        self.log.revision = changes.revision;
        if changes.full {
            self.log.record_reload(self.seq);
        } else {
            changed.sort();
            self.log.record(self.seq, changed);
        }
        if names_changed {
            let mut names: Vec<&str> = self.digests.keys().map(String::as_str).collect();
            names.sort_unstable();
            update.index = Some(names.join("\n").into_bytes());
        }
        update.log = self.log.encode();
        self.cursor = Some(Cursor::of(&changes));
        self.continues = changes.continues;
        Ok(Some(update))
    }
}

/// The names in an index value.
pub fn index_names(bytes: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(bytes)
        .unwrap_or("")
        .split('\n')
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::{Endpoint, Service};

    fn service(port: u16) -> Service {
        Service {
            endpoints: vec![Endpoint::new(format!("127.0.0.1:{port}"), 1)],
        }
    }

    fn digest_of(services: &[(&str, u16)]) -> u64 {
        let mut d = Digest::default();
        for (n, p) in services {
            d.add(Digest::of(n, &service(*p)));
        }
        d.value()
    }

    fn changes(
        revision: u64,
        since: u64,
        set: &[(&str, u16)],
        removed: &[&str],
        end: &[(&str, u16)],
    ) -> Changes {
        Changes {
            revision,
            since,
            epoch: "e".into(),
            full: since == 0,
            services: set
                .iter()
                .map(|(n, p)| (n.to_string(), service(*p)))
                .collect(),
            removed: removed.iter().map(|n| n.to_string()).collect(),
            digest: digest_of(end),
            ..Changes::default()
        }
    }

    #[test]
    fn deltas_write_only_what_changed() {
        let mut held = PollerTables::default();
        let full = held
            .apply(changes(
                10,
                0,
                &[("a", 1), ("b", 2)],
                &[],
                &[("a", 1), ("b", 2)],
            ))
            .expect("fits")
            .expect("newer");
        assert_eq!(full.services.len(), 2);
        assert!(full.index.is_some());
        let delta = held
            .apply(changes(12, 10, &[("a", 3)], &["b"], &[("a", 3)]))
            .expect("fits")
            .expect("newer");
        let written: Vec<(&str, bool)> = delta
            .services
            .iter()
            .map(|(n, v)| (n.as_str(), v.is_empty()))
            .collect();
        assert_eq!(written.len(), 2);
        assert!(written.contains(&("b", true)) && written.contains(&("a", false)));
        assert_eq!(delta.index, Some(b"a".to_vec()));
        assert_eq!(
            held.cursor().map(|h| (h.position, h.epoch, h.observer)),
            Some((Position::new(12, 0), "e", ""))
        );
        // A health change at the same revision moves the position on.
        let mut health = changes(12, 12, &[("a", 5)], &[], &[("a", 5)]);
        health.health_seq = 1;
        assert!(held.apply(health.clone()).expect("fits").is_some());
        assert_eq!(
            held.cursor().map(|h| (h.position, h.epoch, h.observer)),
            Some((Position::new(12, 1), "e", ""))
        );
        assert_eq!(held.apply(health), Ok(None), "held already");
        let mut back = changes(12, 12, &[("a", 3)], &[], &[("a", 3)]);
        (back.since_health_seq, back.health_seq) = (1, 2);
        assert!(held.apply(back).expect("fits").is_some());
        let log = ChangeLog::decode(&delta.log).expect("decodes");
        assert_eq!(log.since(Some(1)), Some(BTreeSet::from(["a", "b"])));
        assert_eq!(log.since(Some(0)), None, "before the full load");
        assert_eq!(log.revision(), 12);
        // Nothing newer, then a weight change that keeps the names.
        assert_eq!(held.apply(changes(12, 10, &[], &[], &[("a", 3)])), Ok(None));
        let mut next = changes(13, 12, &[("a", 4)], &[], &[("a", 4)]);
        (next.since_health_seq, next.health_seq) = (2, 2);
        let same_names = held.apply(next).expect("fits").expect("newer");
        assert_eq!(same_names.index, None);
    }

    #[test]
    fn answers_that_do_not_fit_are_refused_and_force_a_full_one() {
        let mut held = PollerTables::default();
        held.apply(changes(10, 0, &[("a", 1)], &[], &[("a", 1)]))
            .expect("fits");
        // From another revision than the one held.
        assert!(held
            .apply(changes(12, 11, &[("a", 2)], &[], &[("a", 2)]))
            .is_err());
        assert_eq!(held.cursor(), None);
        held.apply(changes(10, 0, &[("a", 1)], &[], &[("a", 1)]))
            .expect("fits");
        // A digest that does not match what applying it gives.
        assert!(held
            .apply(changes(11, 10, &[("a", 2)], &[], &[("a", 9)]))
            .is_err());
        assert_eq!(held.cursor(), None);
        assert_eq!(
            held.digest().value(),
            digest_of(&[("a", 1)]),
            "nothing applied"
        );
    }

    #[test]
    fn another_observer_continues_the_tables_held_and_the_digest_is_sent_only_to_servers_that_read_it(
    ) {
        let mut held = holding_s_at_10_from("a");
        assert_eq!(
            held.cursor().and_then(|h| h.digest),
            None,
            "an older server"
        );
        let mut full = from("e", "a", changes(11, 0, &[("s", 1)], &[], &[("s", 1)]));
        full.continues = true;
        held.apply(full).expect("fits");
        let digest = held.cursor().and_then(|h| h.digest);
        assert_eq!(digest, Some(digest_of(&[("s", 1)])));
        // A restarted replica continues from the position held, to its
        // own (lower) health count: nothing written but the log.
        let mut continued = from("e", "b", changes(11, 11, &[], &[], &[("s", 1)]));
        continued.since_health_seq = 0;
        continued.continues = true;
        let update = held.apply(continued).expect("fits").expect("applied");
        assert!(update.services.is_empty() && !update.full);
        assert_eq!(held.cursor().map(|h| h.observer), Some("b"));
        // One that does not start from what is held is refused whole.
        let wrong = from(
            "e",
            "c",
            changes(12, 11, &[("t", 2)], &[], &[("s", 2), ("t", 2)]),
        );
        assert!(held.apply(wrong).is_err());
        assert_eq!(held.cursor(), None);
    }

    /// A poller that applied a full answer of service `s` at revision 10
    /// of epoch `e`, from `observer`.
    fn holding_s_at_10_from(observer: &str) -> PollerTables {
        let mut held = PollerTables::default();
        held.apply(from(
            "e",
            observer,
            changes(10, 0, &[("s", 1)], &[], &[("s", 1)]),
        ))
        .expect("fits")
        .expect("newer");
        held
    }

    /// `changes` as answered by `observer` of `epoch`.
    fn from(epoch: &str, observer: &str, mut changes: Changes) -> Changes {
        changes.epoch = epoch.into();
        changes.observer = observer.into();
        changes
    }

    #[test]
    fn the_revision_never_goes_back_within_an_epoch() {
        let mut held = holding_s_at_10_from("a");
        // Another replica behind: ignored, not an error, cursor kept.
        let behind = from("e", "b", changes(9, 0, &[("s", 2)], &[], &[("s", 2)]));
        assert_eq!(held.apply(behind), Ok(None));
        // The same replica behind (a full answer or a delta) too.
        let full_behind = from("e", "a", changes(9, 0, &[("s", 2)], &[], &[("s", 2)]));
        assert_eq!(held.apply(full_behind), Ok(None));
        assert_eq!(
            held.cursor().map(|h| (h.position, h.epoch, h.observer)),
            Some((Position::new(10, 0), "e", "a"))
        );
        assert_eq!(held.digest().value(), digest_of(&[("s", 1)]));
    }

    #[test]
    fn answers_of_the_observer_held_apply_only_when_newer() {
        let mut held = holding_s_at_10_from("a");
        let again = from("e", "a", changes(10, 0, &[("s", 1)], &[], &[("s", 1)]));
        assert_eq!(
            held.apply(again),
            Ok(None),
            "a full answer at the position held"
        );
        let delta = from("e", "a", changes(11, 10, &[("s", 2)], &[], &[("s", 2)]));
        assert!(held.apply(delta).expect("fits").is_some());
        assert_eq!(
            held.cursor().map(|h| (h.position, h.epoch, h.observer)),
            Some((Position::new(11, 0), "e", "a"))
        );
    }

    #[test]
    fn a_full_answer_from_another_observer_is_the_one_load_of_a_switch() {
        let mut held = PollerTables::default();
        let mut first = from("e", "a", changes(10, 0, &[("s", 1)], &[], &[("s", 1)]));
        first.health_seq = 5;
        held.apply(first).expect("fits");
        // At the same revision and a lower health count: health counts of
        // two observers do not compare, so the other observer's view
        // replaces everything.
        let switched = from("e", "b", changes(10, 0, &[("s", 2)], &[], &[("s", 2)]));
        let update = held
            .apply(switched.clone())
            .expect("fits")
            .expect("applied");
        assert!(update.full);
        assert_eq!(
            held.cursor().map(|h| (h.position, h.epoch, h.observer)),
            Some((Position::new(10, 0), "e", "b"))
        );
        assert_eq!(held.apply(switched), Ok(None), "once");
        // Later, at a higher revision, from a third observer.
        let later = from("e", "c", changes(12, 0, &[("s", 3)], &[], &[("s", 3)]));
        assert!(held.apply(later).expect("fits").is_some());
        assert_eq!(
            held.cursor().map(|h| (h.position, h.epoch, h.observer)),
            Some((Position::new(12, 0), "e", "c"))
        );
    }

    #[test]
    fn a_full_answer_from_another_observer_at_a_lower_revision_is_ignored() {
        let mut held = holding_s_at_10_from("a");
        let behind = from("e", "b", changes(8, 0, &[("s", 2)], &[], &[("s", 2)]));
        assert_eq!(held.apply(behind), Ok(None));
        assert_eq!(
            held.cursor().map(|h| (h.position, h.epoch, h.observer)),
            Some((Position::new(10, 0), "e", "a"))
        );
    }

    #[test]
    fn a_full_answer_from_another_epoch_applies_at_any_revision() {
        let mut held = holding_s_at_10_from("a");
        let other = from("f", "a", changes(3, 0, &[("t", 2)], &[], &[("t", 2)]));
        let update = held.apply(other).expect("fits").expect("applied");
        assert!(update.full);
        assert_eq!(
            held.cursor().map(|h| (h.position, h.epoch, h.observer)),
            Some((Position::new(3, 0), "f", "a"))
        );
        assert_eq!(held.digest().value(), digest_of(&[("t", 2)]));
        // A delta of another epoch still does not fit.
        let delta = from("g", "a", changes(4, 3, &[("t", 3)], &[], &[("t", 3)]));
        assert!(held.apply(delta).is_err());
        assert_eq!(held.cursor(), None);
    }

    #[test]
    fn a_delta_of_another_observer_applies_only_when_the_digest_proves_it() {
        let mut held = PollerTables::default();
        held.apply(from(
            "e",
            "a",
            changes(10, 0, &[("s", 1), ("u", 1)], &[], &[("s", 1), ("u", 1)]),
        ))
        .expect("fits");
        // Fits the position and epoch, but the replica's view of `u` is
        // another: the result would not be its tables.
        let other = from(
            "e",
            "b",
            changes(11, 10, &[("s", 2)], &[], &[("s", 2), ("u", 7)]),
        );
        assert!(held.apply(other).is_err());
        assert_eq!(held.cursor(), None, "the next request asks for everything");
        held.apply(from(
            "e",
            "a",
            changes(10, 0, &[("s", 1)], &[], &[("s", 1)]),
        ))
        .expect("fits");
        // An answer that names no observer (an older server) fits.
        let unnamed = from("e", "", changes(11, 10, &[("s", 2)], &[], &[("s", 2)]));
        assert!(held.apply(unnamed).expect("fits").is_some());
    }

    #[test]
    fn queues_are_listed_once_and_capped() {
        let mut value = with_queue(None, 7);
        value = with_queue(Some(&value), 7);
        assert_eq!(queue_ids(&value).collect::<Vec<_>>(), [7]);
        for id in 0..100 {
            value = with_queue(Some(&value), id);
        }
        let ids: Vec<u32> = queue_ids(&value).collect();
        assert_eq!(ids.len(), QUEUES_KEPT);
        assert_eq!(ids.last(), Some(&99));
        assert_eq!(
            queue_ids(&[1, 2, 3]).count(),
            0,
            "a torn value names nothing"
        );
    }

    #[test]
    fn a_queue_ended_is_unlisted() {
        let mut value = with_queue(None, 1);
        for id in [2, 3] {
            value = with_queue(Some(&value), id);
        }
        let value = without_queue(Some(&value), 2).expect("listed");
        assert_eq!(queue_ids(&value).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(without_queue(Some(&value), 2), None, "not listed");
        assert_eq!(without_queue(None, 2), None);
        let last = without_queue(Some(&with_queue(None, 9)), 9).expect("listed");
        assert!(last.is_empty());
    }

    #[test]
    fn workers_far_behind_reload() {
        let mut log = ChangeLog::default();
        log.record_reload(1);
        for seq in 2..=(LOG_UPDATES as u64 + 10) {
            log.record(seq, vec![format!("s{seq}")]);
        }
        let latest = log.latest();
        assert_eq!(log.since(Some(latest)), Some(BTreeSet::new()));
        assert_eq!(log.since(Some(latest - 1)).map(|s| s.len()), Some(1));
        assert_eq!(log.since(Some(2)), None);
        assert_eq!(log.since(None), None);
        log.record(
            latest + 1,
            (0..LOG_NAMES + 1).map(|i| i.to_string()).collect(),
        );
        assert_eq!(log.since(Some(latest)), None, "too many names: reload");
    }
}
