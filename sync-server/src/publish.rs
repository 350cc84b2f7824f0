//! What is being served, and the signal long-polls wait on.
//!
//! The etcd loop publishes the tables at each new revision together with
//! the change history ([`crate::history`]): which services and rejections
//! changed at each revision, bounded by count and bytes. A [`Published`] is
//! immutable; the persistent maps inside make each one cost O(change) to
//! make. Answers are encoded lazily and once: the full snapshot on first
//! request, each change-feed answer once per (since, scope), shared by
//! every response that sends it.
//!
//! Every replica over the same etcd cluster and `--watch` flags serves the
//! same content at the same revision under the same epoch, so its deltas
//! fit a client that last heard from another replica. What this process
//! observes itself (health checks, arrival stamps) is named by its
//! [`Publisher::observer`]: a client that held another observer's view
//! takes one full answer. Every change goes through one lock
//! ([`Publisher::update`]), so a stale mark cannot undo a concurrent
//! publication.

use crate::history::{Changed, History, HistoryLimits, Position};
use crate::tables::{Commit, Tables};
use axum::body::Bytes;
use axum::http::HeaderValue;
use etcd_mesh_wire::{Digest, Snapshot};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::watch;

/// What a change-feed client holds and wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The position it holds; `None` asks for everything.
    pub since: Option<Position>,
    /// The epoch of that revision, when the client knows it.
    pub epoch: Option<String>,
    /// The observer whose view the client holds, when it says.
    pub observer: Option<String>,
    /// The digest of the tables the client holds, when it says: with it,
    /// a client of another observer whose tables equal this replica's at
    /// its revision is continued with a delta instead of everything.
    pub digest: Option<u64>,
    /// Only these services (and no rejections), when set.
    pub scope: Option<Arc<BTreeSet<String>>>,
}

/// One encoded change-feed answer.
#[derive(Debug)]
pub struct Answer {
    pub body: Bytes,
    pub full: bool,
    /// A delta with no change (in scope): the revision moved on elsewhere.
    pub empty: bool,
    /// A delta that moves a client of another observer to this one: sent
    /// at once, even when empty.
    pub continued: bool,
}

/// The tables at one revision, ready to serve.
#[derive(Debug)]
pub struct Published {
    pub revision: u64,
    /// Health-check changes published so far by this process.
    pub health_seq: u64,
    /// Names the etcd cluster and watch configuration (empty when unknown,
    /// as for a snapshot loaded from file).
    pub epoch: Arc<str>,
    /// Names this process (see [`Publisher::observer`]).
    pub observer: Arc<str>,
    pub stale: bool,
    pub tables: Tables,
    pub history: History,
    /// `"<revision>"`, or `"<revision>.<health_seq>"` once health checks
    /// changed something: the ETag.
    pub etag: HeaderValue,
    full: OnceLock<Bytes>,
    answers: Mutex<VecDeque<(Cursor, Arc<Answer>)>>,
}

/// Change-feed answers kept per revision: clients mostly hold the same
/// revision and the same scope, so a few cover them all.
const ANSWERS_KEPT: usize = 16;

impl Published {
    pub fn new(
        position: Position,
        epoch: Arc<str>,
        observer: Arc<str>,
        stale: bool,
        tables: Tables,
        history: History,
    ) -> Self {
        let Position { revision, health } = position;
        let etag = match health {
            0 => format!("\"{revision}\""),
            _ => format!("\"{revision}.{health}\""),
        };
        Published {
            revision,
            health_seq: health,
            epoch,
            observer,
            stale,
            tables,
            history,
            etag: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\"")),
            full: OnceLock::new(),
            answers: Mutex::new(VecDeque::new()),
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn position(&self) -> Position {
        Position::new(self.revision, self.health_seq)
    }

    /// The body of `GET /v1/snapshot`, encoded on first use.
    pub fn snapshot_body(&self) -> Bytes {
        self.full
            .get_or_init(|| {
                let body = SnapshotOut {
                    revision: self.revision,
                    health_seq: self.health_seq,
                    stale: self.stale,
                    services: ServicesOut(
                        self.tables
                            .services
                            .iter()
                            .map(|(n, b)| (&**n, &*b.json))
                            .collect(),
                    ),
                    rejected: rejected_out(self.tables.rejected.iter()),
                };
                serde_json::to_vec(&body).unwrap_or_default().into()
            })
            .clone()
    }

    /// The change-feed answer for `cursor`, or `None` when the client
    /// already holds this revision (or, of another observer, a newer one:
    /// it waits for this replica to catch up rather than go back).
    pub fn changes(&self, cursor: &Cursor) -> Option<Arc<Answer>> {
        let same_epoch = cursor.epoch.as_deref().is_none_or(|e| e == &*self.epoch);
        let same_observer = cursor
            .observer
            .as_deref()
            .is_none_or(|o| o == &*self.observer);
        // (where the delta starts in this history, what changed since)
        let (from, changed) = match cursor.since {
            Some(since) if same_epoch && !same_observer => {
                if since.revision > self.revision {
                    return None;
                }
                match cursor
                    .digest
                    .and_then(|d| self.continuation(since, d, cursor))
                {
                    Some(from) => (Some(from), self.history.since(from)),
                    None => (None, None),
                }
            }
            Some(since) if same_epoch => match self.history.since(since) {
                Some(_) if since >= self.position() => return None,
                changed => (None, changed),
            },
            _ => (None, None),
        };
        let continued = from.is_some() && changed.is_some();
        let key = Cursor {
            since: changed.as_ref().and(cursor.since),
            epoch: None,
            observer: None,
            // A continued delta starts where this history matched the
            // client's digest: the digest is part of what it answers.
            digest: cursor.digest.filter(|_| continued),
            scope: cursor.scope.clone(),
        };
        if let Some(answer) = self.kept_answer(&key) {
            return Some(answer);
        }
        // Encoded without the lock, so that encoding a large answer holds
        // up no other request; two requests for the same answer may both
        // encode it, and share the one kept first.
        let mut answer = self.encode_changes(key.since, changed, key.scope.as_deref());
        answer.continued = continued;
        Some(self.keep_answer(key, Arc::new(answer)))
    }

    /// Where in this history a client of another observer, holding tables
    /// with `digest` at `since`, can be continued from: the same content,
    /// proven by the digest (which covers health and arrival stamps too).
    /// Scoped clients are continued only at the revision served.
    fn continuation(&self, since: Position, digest: u64, cursor: &Cursor) -> Option<Position> {
        match cursor.scope.as_deref() {
            Some(scope) => (since.revision == self.revision && self.scoped_digest(scope) == digest)
                .then(|| self.position()),
            None if since.revision == self.revision && self.tables.digest.value() == digest => {
                Some(self.position())
            }
            None => self.history.position_of(since.revision, digest),
        }
    }

    /// The digest of the services in `scope`.
    fn scoped_digest(&self, scope: &BTreeSet<String>) -> u64 {
        let mut digest = Digest::default();
        for name in scope {
            if let Some(built) = self.tables.services.get(name.as_str()) {
                digest.add(built.digest);
            }
        }
        digest.value()
    }

    /// The answer kept for `key`, if any.
    fn kept_answer(&self, key: &Cursor) -> Option<Arc<Answer>> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, answer)| Arc::clone(answer))
    }

    /// Keeps `answer` for `key` and returns it, or returns the one kept for
    /// `key` meanwhile.
    fn keep_answer(&self, key: Cursor, answer: Arc<Answer>) -> Arc<Answer> {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, kept)) = answers.iter().find(|(k, _)| *k == key) {
            return Arc::clone(kept);
        }
        if answers.len() == ANSWERS_KEPT {
            answers.pop_front();
        }
        answers.push_back((key, Arc::clone(&answer)));
        answer
    }

    fn encode_changes(
        &self,
        since: Option<Position>,
        changed: Option<Changed>,
        scope: Option<&BTreeSet<String>>,
    ) -> Answer {
        #[cfg(test)]
        tests::encoding(self);
        let in_scope = |name: &str| scope.is_none_or(|s| s.contains(name));
        let services = &self.tables.services;
        let mut out = ChangesOut {
            revision: self.revision,
            health_seq: self.health_seq,
            since: since.map_or(0, |s| s.revision),
            // A client that does not follow health changes sent none.
            since_health_seq: since.map_or(0, |s| if s.health == u64::MAX { 0 } else { s.health }),
            epoch: &self.epoch,
            observer: &self.observer,
            full: changed.is_none(),
            stale: self.stale,
            services: ServicesOut(Vec::new()),
            removed: Vec::new(),
            rejected: Vec::new(),
            unrejected: Vec::new(),
            digest: 0,
            continues: true,
        };
        match &changed {
            None => {
                let all: Box<dyn Iterator<Item = _>> = match scope {
                    Some(scope) => Box::new(
                        scope
                            .iter()
                            .filter_map(|n| services.get_key_value(n.as_str())),
                    ),
                    None => Box::new(services.iter()),
                };
                out.services.0 = all.map(|(n, b)| (&**n, &*b.json)).collect();
                if scope.is_none() {
                    out.rejected = rejected_out(self.tables.rejected.iter());
                }
            }
            Some(changed) => {
                for name in changed.services.iter().filter(|n| in_scope(n)) {
                    match services.get(name) {
                        Some(built) => out.services.0.push((name, &built.json)),
                        None => out.removed.push(name),
                    }
                }
                if scope.is_none() {
                    for key in &changed.rejections {
                        match self.tables.rejected.get_key_value(key) {
                            Some(pair) => out.rejected.extend(rejected_out([pair])),
                            None => out.unrejected.push(key),
                        }
                    }
                }
            }
        }
        out.digest = match scope {
            None => self.tables.digest.value(),
            Some(scope) => self.scoped_digest(scope),
        };
        let empty = !out.full
            && out.services.0.is_empty()
            && out.removed.is_empty()
            && out.rejected.is_empty()
            && out.unrejected.is_empty();
        Answer {
            body: serde_json::to_vec(&out).unwrap_or_default().into(),
            full: out.full,
            empty,
            continued: false,
        }
    }
}

/// Services as a JSON object of their pre-encoded bodies.
struct ServicesOut<'a>(Vec<(&'a str, &'a RawValue)>);

impl Serialize for ServicesOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, json) in &self.0 {
            map.serialize_entry(name, json)?;
        }
        map.end()
    }
}

#[derive(serde::Serialize)]
struct RejectedOut<'a> {
    key: &'a str,
    reason: &'a str,
}

fn rejected_out<'a>(
    rejected: impl IntoIterator<Item = (&'a Arc<str>, &'a Arc<str>)>,
) -> Vec<RejectedOut<'a>> {
    rejected
        .into_iter()
        .map(|(key, reason)| RejectedOut { key, reason })
        .collect()
}

#[derive(serde::Serialize)]
struct SnapshotOut<'a> {
    revision: u64,
    #[serde(skip_serializing_if = "is_zero")]
    health_seq: u64,
    stale: bool,
    services: ServicesOut<'a>,
    rejected: Vec<RejectedOut<'a>>,
}

#[derive(serde::Serialize)]
struct ChangesOut<'a> {
    revision: u64,
    #[serde(skip_serializing_if = "is_zero")]
    health_seq: u64,
    since: u64,
    #[serde(skip_serializing_if = "is_zero")]
    since_health_seq: u64,
    epoch: &'a str,
    observer: &'a str,
    full: bool,
    stale: bool,
    services: ServicesOut<'a>,
    removed: Vec<&'a str>,
    rejected: Vec<RejectedOut<'a>>,
    unrejected: Vec<&'a str>,
    digest: u64,
    continues: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Shared between the etcd loop and the HTTP side. `None` until the first
/// full sync or a loaded snapshot file: `/v1/snapshot` answers 503 until then.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: Arc<watch::Sender<Option<Arc<Published>>>>,
    /// Set by the first full listing from etcd (a snapshot loaded from file
    /// is served, but does not make the server ready).
    synced: Arc<AtomicBool>,
    limits: HistoryLimits,
    observer: Arc<str>,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new(HistoryLimits::default())
    }
}

impl Publisher {
    pub fn new(limits: HistoryLimits) -> Self {
        Publisher {
            tx: Arc::new(watch::channel(None).0),
            synced: Arc::default(),
            limits,
            observer: process_tag().into(),
        }
    }

    /// Names this process: what it serves carries its own observations
    /// (arrival stamps, health), which another replica, or this one
    /// restarted, does not share.
    pub fn observer(&self) -> &str {
        &self.observer
    }

    /// Replaces what is served by what `next` makes of it (`None`: keep
    /// it), under the channel's lock: two publishers never both build on
    /// the same current one and lose each other's change.
    fn update(&self, next: impl FnOnce(Option<&Published>) -> Option<Published>) {
        self.tx
            .send_if_modified(|slot| match next(slot.as_deref()) {
                Some(published) => {
                    *slot = Some(Arc::new(published));
                    true
                }
                None => false,
            });
    }

    fn make(
        &self,
        position: Position,
        epoch: Arc<str>,
        stale: bool,
        tables: Tables,
        history: History,
    ) -> Published {
        let observer = Arc::clone(&self.observer);
        Published::new(position, epoch, observer, stale, tables, history)
    }

    /// Publishes tables with no history before them: a client holding an
    /// older revision, or one of another epoch, gets everything. They are
    /// fresh: a listing from etcd is the proof.
    pub fn publish_reset(&self, epoch: &str, revision: u64, tables: Tables) {
        self.update(|current| {
            // The health count never goes back, so positions keep growing
            // across a re-listing.
            let position = Position::new(revision, current.map_or(0, |c| c.health_seq));
            let history = History::new(position, tables.digest.value(), self.limits);
            Some(self.make(position, epoch.into(), false, tables, history))
        });
    }

    /// Publishes the tables at a newer revision of the same epoch, with
    /// what changed since the revision published before.
    pub fn publish_change(&self, revision: u64, commit: Commit, tables: Tables) {
        self.update(|current| {
            let current = current?;
            let position = Position::new(revision, current.health_seq);
            let mut history = current.history.clone();
            history.push(position, commit, tables.digest.value());
            let epoch = Arc::clone(&current.epoch);
            Some(self.make(position, epoch, false, tables, history))
        });
    }

    /// Publishes tables whose health changed, at the same revision: the
    /// position's health count moves on instead.
    pub fn publish_health(&self, commit: Commit, tables: Tables) {
        self.update(|current| {
            let current = current?;
            let position = Position::new(current.revision, current.health_seq + 1);
            let mut history = current.history.clone();
            history.push(position, commit, tables.digest.value());
            let epoch = Arc::clone(&current.epoch);
            Some(self.make(position, epoch, current.stale, tables, history))
        });
    }

    /// Serves a snapshot loaded from file, stale, of no known epoch.
    pub fn publish_loaded(&self, snapshot: &Snapshot) {
        let position = Position::new(snapshot.revision, 0);
        let tables = Tables::from_snapshot(snapshot);
        let history = History::new(position, tables.digest.value(), self.limits);
        self.update(|_| Some(self.make(position, "".into(), true, tables, history)));
    }

    /// Marks the held tables stale (no proof that they are current) or
    /// fresh again, keeping their content and revision.
    pub fn set_stale(&self, stale: bool) {
        self.update(|current| {
            let current = current.filter(|c| c.stale != stale)?;
            Some(self.make(
                current.position(),
                Arc::clone(&current.epoch),
                stale,
                current.tables.clone(),
                current.history.clone(),
            ))
        });
    }

    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// Whether a full listing from etcd has been published.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn current(&self) -> Option<Arc<Published>> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.tx.subscribe()
    }
}

/// A short random name for this process.
fn process_tag() -> String {
    format!("{:08x}", fastrand::u32(..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::{Changes, Endpoint, Service};
    use std::cell::Cell;

    thread_local! {
        /// Whether the answer cache was locked when this thread last began
        /// encoding a change-feed answer.
        static ENCODED_UNDER_LOCK: Cell<Option<bool>> = const { Cell::new(None) };
    }

    /// Called as each change-feed answer begins to be encoded.
    pub(super) fn encoding(published: &Published) {
        // This thread holds the lock if anyone does: each test has its own.
        let locked = published.answers.try_lock().is_err();
        ENCODED_UNDER_LOCK.with(|under| under.set(Some(locked)));
    }

    fn service(port: u16, weight: u32) -> Service {
        Service {
            endpoints: vec![Endpoint::new(format!("127.0.0.1:{port}"), weight)],
        }
    }

    fn snapshot(revision: u64, services: &[(&str, Service)]) -> Snapshot {
        Snapshot {
            revision,
            services: services
                .iter()
                .map(|(n, s)| (n.to_string(), s.clone()))
                .collect(),
            ..Snapshot::default()
        }
    }

    fn commit(services: &[&str]) -> Commit {
        Commit {
            services: services.iter().map(|s| Arc::from(*s)).collect(),
            rejections: vec![],
        }
    }

    fn changes(p: &Publisher, cursor: Cursor) -> Option<Changes> {
        let answer = p.current()?.changes(&cursor)?;
        Some(Changes::decode(&answer.body).expect("valid changes"))
    }

    fn since(revision: u64) -> Cursor {
        Cursor {
            since: Some(Position::of_client(revision, None)),
            epoch: Some("e".into()),
            observer: None,
            digest: None,
            scope: None,
        }
    }

    #[test]
    fn deltas_carry_what_changed_and_full_answers_everything() {
        let p = Publisher::new(HistoryLimits {
            changes: 2,
            bytes: 1 << 20,
        });
        let v1 = snapshot(10, &[("a", service(1, 1)), ("b", service(2, 1))]);
        p.publish_reset("e", 10, Tables::from_snapshot(&v1));
        let v2 = snapshot(11, &[("a", service(1, 5)), ("b", service(2, 1))]);
        p.publish_change(11, commit(&["a"]), Tables::from_snapshot(&v2));
        let v3 = snapshot(12, &[("a", service(1, 5))]);
        p.publish_change(12, commit(&["b"]), Tables::from_snapshot(&v3));

        let delta = changes(&p, since(10)).expect("newer");
        assert!(!delta.full);
        assert_eq!((delta.since, delta.revision), (10, 12));
        assert_eq!(delta.services.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(delta.removed, ["b"]);
        assert_eq!(delta.digest, Tables::from_snapshot(&v3).digest.value());
        assert_eq!(changes(&p, since(12)), None);

        // Another epoch, no revision, or older than the history: full.
        let full = |c: Cursor| changes(&p, c).expect("answer");
        let other = Cursor {
            epoch: Some("x".into()),
            ..since(11)
        };
        for cursor in [other, Cursor::default()] {
            let answer = full(cursor);
            assert!(answer.full);
            assert_eq!(answer.services, v3.services);
        }
        let v4 = snapshot(13, &[("a", service(1, 6))]);
        p.publish_change(13, commit(&["a"]), Tables::from_snapshot(&v4));
        assert!(full(since(10)).full, "history holds two revisions");
        assert!(!full(since(11)).full);
    }

    #[test]
    fn scoped_answers_hold_only_the_scope() {
        let p = Publisher::default();
        let v1 = snapshot(10, &[("a", service(1, 1)), ("b", service(2, 1))]);
        p.publish_reset("e", 10, Tables::from_snapshot(&v1));
        let v2 = snapshot(11, &[("a", service(1, 1)), ("b", service(2, 3))]);
        p.publish_change(11, commit(&["b"]), Tables::from_snapshot(&v2));
        let scope = Some(Arc::new(BTreeSet::from(["a".to_string()])));
        let cursor = Cursor {
            scope: scope.clone(),
            ..since(10)
        };
        let answer = p
            .current()
            .and_then(|c| c.changes(&cursor))
            .expect("answer");
        assert!(answer.empty);
        let full = changes(
            &p,
            Cursor {
                scope,
                ..Cursor::default()
            },
        )
        .expect("answer");
        assert_eq!(full.services.keys().collect::<Vec<_>>(), ["a"]);
        let mut digest = Digest::default();
        digest.add(Digest::of("a", &service(1, 1)));
        assert_eq!(full.digest, digest.value());
    }

    #[test]
    fn another_observer_gets_one_full_answer_and_never_an_older_one() {
        let p = Publisher::default();
        let v1 = snapshot(10, &[("a", service(1, 1))]);
        p.publish_reset("e", 10, Tables::from_snapshot(&v1));
        let observer = p.observer().to_owned();
        let mine = Cursor {
            observer: Some(observer.clone()),
            ..since(10)
        };
        assert_eq!(changes(&p, mine.clone()), None, "up to date");
        let theirs = |revision| Cursor {
            observer: Some("another".into()),
            ..since(revision)
        };
        let switch = changes(&p, theirs(10)).expect("an answer");
        assert!(switch.full, "another observer's view is replaced whole");
        assert_eq!(switch.observer, observer);
        assert_eq!(switch.services, v1.services);
        assert_eq!(
            changes(&p, theirs(11)),
            None,
            "a client ahead of this replica waits for it"
        );
        let v2 = snapshot(11, &[("a", service(1, 2))]);
        p.publish_change(11, commit(&["a"]), Tables::from_snapshot(&v2));
        let delta = changes(&p, mine).expect("newer");
        assert!(!delta.full, "the same observer gets deltas");
    }

    #[test]
    fn another_observer_holding_the_same_tables_is_continued_with_a_delta() {
        let p = Publisher::default();
        let v1 = snapshot(10, &[("a", service(1, 1)), ("b", service(2, 1))]);
        let d1 = Tables::from_snapshot(&v1).digest.value();
        p.publish_reset("e", 10, Tables::from_snapshot(&v1));
        let theirs = |revision, health, digest| Cursor {
            since: Some(Position::new(revision, health)),
            observer: Some("another".into()),
            digest: Some(digest),
            ..since(revision)
        };
        // Up to date with the same tables: an empty delta at once, from the
        // client's own position, naming this observer.
        let current = p.current().expect("published");
        let answer = current.changes(&theirs(10, 7, d1)).expect("an answer");
        assert!(answer.continued && answer.empty && !answer.full);
        let continued = changes(&p, theirs(10, 7, d1)).expect("an answer");
        assert_eq!((continued.since, continued.since_health_seq), (10, 7));
        assert_eq!(continued.observer, p.observer());
        assert_eq!(continued.digest, d1);
        assert!(continued.services.is_empty());
        // Other tables at that revision (another health view): everything.
        assert!(changes(&p, theirs(10, 7, d1 ^ 1)).expect("an answer").full);
        // The registry moved on: the delta since the matching position.
        let v2 = snapshot(12, &[("a", service(1, 1)), ("b", service(2, 4))]);
        p.publish_change(12, commit(&["b"]), Tables::from_snapshot(&v2));
        let delta = changes(&p, theirs(11, 7, d1)).expect("an answer");
        assert!(!delta.full);
        assert_eq!(delta.services.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!((delta.since, delta.since_health_seq), (11, 7));
        // Scoped clients are continued at the revision served only.
        let scope = Some(Arc::new(BTreeSet::from(["a".to_string()])));
        let mut scoped_digest = Digest::default();
        scoped_digest.add(Digest::of("a", &service(1, 1)));
        let scoped = |revision| Cursor {
            scope: scope.clone(),
            ..theirs(revision, 0, scoped_digest.value())
        };
        assert!(!changes(&p, scoped(12)).expect("an answer").full);
        assert!(changes(&p, scoped(10)).expect("an answer").full);
    }

    #[test]
    fn a_stale_mark_keeps_a_concurrent_health_publication() {
        let p = Publisher::default();
        let v1 = snapshot(10, &[("a", service(1, 1))]);
        p.publish_reset("e", 10, Tables::from_snapshot(&v1));
        let publishers: Vec<_> = (0..8)
            .map(|i| {
                let p = p.clone();
                let v1 = v1.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if i % 2 == 0 {
                            p.publish_health(commit(&["a"]), Tables::from_snapshot(&v1));
                        } else {
                            p.set_stale(true);
                            p.set_stale(false);
                        }
                    }
                })
            })
            .collect();
        for publisher in publishers {
            publisher.join().expect("no panic");
        }
        assert_eq!(
            p.current().expect("published").health_seq,
            4 * 200,
            "every health publication counted, none overwritten"
        );
    }

    #[test]
    fn answers_are_encoded_outside_the_cache_lock() {
        let p = Publisher::default();
        let v1 = snapshot(10, &[("a", service(1, 1))]);
        p.publish_reset("e", 10, Tables::from_snapshot(&v1));
        let v2 = snapshot(11, &[("a", service(1, 2))]);
        p.publish_change(11, commit(&["a"]), Tables::from_snapshot(&v2));
        for cursor in [since(10), Cursor::default()] {
            ENCODED_UNDER_LOCK.with(|under| under.set(None));
            assert!(changes(&p, cursor).is_some());
            assert_eq!(
                ENCODED_UNDER_LOCK.with(Cell::get),
                Some(false),
                "encoded, and not under the lock"
            );
        }
    }

    #[test]
    fn an_answer_encoded_twice_is_kept_once() {
        let p = Publisher::default();
        p.publish_reset("e", 10, Tables::default());
        let current = p.current().expect("published");
        let answer = || {
            Arc::new(Answer {
                body: Bytes::from_static(b"{}"),
                full: true,
                empty: false,
                continued: false,
            })
        };
        // Two requests for one answer both encoded it: the second gets the
        // first's, and one is kept.
        let (first, second) = (answer(), answer());
        let kept = current.keep_answer(Cursor::default(), Arc::clone(&first));
        assert!(Arc::ptr_eq(&kept, &first));
        let kept = current.keep_answer(Cursor::default(), second);
        assert!(Arc::ptr_eq(&kept, &first));
        assert_eq!(current.answers.lock().expect("not poisoned").len(), 1);
        let served = current.changes(&Cursor::default()).expect("an answer");
        assert!(Arc::ptr_eq(&served, &first));
    }

    #[test]
    fn health_changes_move_the_position_not_the_revision() {
        let p = Publisher::new(HistoryLimits::default());
        let v1 = snapshot(10, &[("a", service(1, 1)), ("b", service(2, 1))]);
        p.publish_reset("e", 10, Tables::from_snapshot(&v1));
        let mut v2 = v1.clone();
        v2.services.get_mut("a").expect("a").endpoints[0].health =
            Some(etcd_mesh_wire::Health::Unhealthy);
        p.publish_health(commit(&["a"]), Tables::from_snapshot(&v2));
        let current = p.current().expect("published");
        assert_eq!((current.revision, current.health_seq), (10, 1));
        assert_eq!(current.etag, "\"10.1\"");
        let follower = Cursor {
            since: Some(Position::new(10, 0)),
            epoch: Some("e".into()),
            observer: None,
            digest: None,
            scope: None,
        };
        let delta = changes(&p, follower).expect("the health change");
        assert_eq!(
            (
                delta.revision,
                delta.health_seq,
                delta.since,
                delta.since_health_seq
            ),
            (10, 1, 10, 0)
        );
        assert_eq!(delta.services.keys().collect::<Vec<_>>(), ["a"]);
        // A client that does not follow health is not woken by it.
        assert_eq!(changes(&p, since(10)), None);
        // The next revision carries the count on, and a re-listing too.
        p.publish_change(11, commit(&["b"]), Tables::from_snapshot(&v2));
        assert_eq!(
            p.current().expect("published").position(),
            Position::new(11, 1)
        );
        let delta = changes(&p, since(10)).expect("newer");
        assert_eq!(delta.services.keys().collect::<Vec<_>>(), ["b"]);
        p.publish_reset("e", 11, Tables::from_snapshot(&v2));
        assert_eq!(p.current().expect("published").health_seq, 1);
        let body: serde_json::Value =
            serde_json::from_slice(&p.current().expect("published").snapshot_body()).expect("json");
        assert_eq!(body["health_seq"], 1);
    }
}
