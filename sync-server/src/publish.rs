//! What is being served, and the signal long-polls wait on.
//!
//! The etcd loop publishes the tables at each new revision together with
//! the change history: which services and rejections changed at each
//! revision, bounded by count and bytes. A [`Published`] is immutable; the
//! persistent maps inside make each one cost O(change) to make. Answers are
//! encoded lazily and once: the full snapshot on first request, each
//! change-feed answer once per (since, scope), shared by every response
//! that sends it.

use crate::registry::{Commit, Tables};
use axum::body::Bytes;
use axum::http::HeaderValue;
use etcd_mesh_wire::{Digest, Snapshot};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::watch;

/// How much change history is kept to answer deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Revisions (one per etcd watch response).
    pub changes: usize,
    /// Bytes of names held by those revisions, approximately.
    pub bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            changes: 10_000,
            bytes: 64 << 20,
        }
    }
}

/// What changed at one revision (since the one published before it).
#[derive(Debug)]
struct LogEntry {
    revision: u64,
    services: Vec<Arc<str>>,
    rejections: Vec<Arc<str>>,
    bytes: usize,
}

/// The changes of the last revisions. Answers "what changed after
/// `since`" for any `since` from `floor` on.
#[derive(Debug, Clone)]
pub struct History {
    entries: imbl::Vector<Arc<LogEntry>>,
    floor: u64,
    bytes: usize,
    limits: HistoryLimits,
}

/// The names of what changed after some revision.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub services: BTreeSet<Arc<str>>,
    pub rejections: BTreeSet<Arc<str>>,
}

impl History {
    /// An empty history of tables first published at `revision`.
    pub fn new(revision: u64, limits: HistoryLimits) -> Self {
        History {
            entries: imbl::Vector::new(),
            floor: revision,
            bytes: 0,
            limits,
        }
    }

    /// The oldest revision a delta can start from.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push(&mut self, revision: u64, commit: Commit) {
        let names = commit.services.iter().chain(&commit.rejections);
        let bytes = 64 + names.map(|n| n.len() + 16).sum::<usize>();
        self.entries.push_back(Arc::new(LogEntry {
            revision,
            services: commit.services,
            rejections: commit.rejections,
            bytes,
        }));
        self.bytes += bytes;
        while self.entries.len() > self.limits.changes.max(1) || self.bytes > self.limits.bytes {
            let Some(oldest) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= oldest.bytes;
            self.floor = oldest.revision;
        }
    }

    /// What changed after `since`; `None` when `since` is older than the
    /// history kept.
    pub fn since(&self, since: u64) -> Option<Changed> {
        if since < self.floor {
            return None;
        }
        let mut changed = Changed::default();
        for entry in self.entries.iter().rev() {
            if entry.revision <= since {
                break;
            }
            changed.services.extend(entry.services.iter().cloned());
            changed.rejections.extend(entry.rejections.iter().cloned());
        }
        Some(changed)
    }
}

/// What a change-feed client holds and wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// The revision it holds; `None` asks for everything.
    pub since: Option<u64>,
    /// The epoch of that revision, when the client knows it.
    pub epoch: Option<String>,
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
}

/// The tables at one revision, ready to serve.
#[derive(Debug)]
pub struct Published {
    pub revision: u64,
    /// Names the etcd cluster and watch configuration (empty when unknown,
    /// as for a snapshot loaded from file).
    pub epoch: Arc<str>,
    pub stale: bool,
    pub tables: Tables,
    pub history: History,
    /// `"<revision>"`, the ETag.
    pub etag: HeaderValue,
    full: OnceLock<Bytes>,
    answers: Mutex<VecDeque<(Cursor, Arc<Answer>)>>,
}

/// Change-feed answers kept per revision: clients mostly hold the same
/// revision and the same scope, so a few cover them all.
const ANSWERS_KEPT: usize = 16;

impl Published {
    pub fn new(
        revision: u64,
        epoch: Arc<str>,
        stale: bool,
        tables: Tables,
        history: History,
    ) -> Self {
        Published {
            revision,
            epoch,
            stale,
            tables,
            history,
            etag: HeaderValue::from_str(&format!("\"{revision}\""))
                .unwrap_or(HeaderValue::from_static("\"0\"")),
            full: OnceLock::new(),
            answers: Mutex::new(VecDeque::new()),
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The body of `GET /v1/snapshot`, encoded on first use.
    pub fn snapshot_body(&self) -> Bytes {
        self.full
            .get_or_init(|| {
                let body = SnapshotOut {
                    revision: self.revision,
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
    /// already holds this revision.
    pub fn changes(&self, cursor: &Cursor) -> Option<Arc<Answer>> {
        let same_epoch = cursor.epoch.as_deref().is_none_or(|e| e == &*self.epoch);
        let changed = match cursor.since {
            Some(since) if same_epoch => match self.history.since(since) {
                Some(_) if since >= self.revision => return None,
                changed => changed,
            },
            _ => None,
        };
        let key = Cursor {
            since: changed.as_ref().and(cursor.since),
            epoch: None,
            scope: cursor.scope.clone(),
        };
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, answer)) = answers.iter().find(|(k, _)| *k == key) {
            return Some(Arc::clone(answer));
        }
        let answer = Arc::new(self.encode_changes(key.since, changed, key.scope.as_deref()));
        if answers.len() == ANSWERS_KEPT {
            answers.pop_front();
        }
        answers.push_back((key, Arc::clone(&answer)));
        Some(answer)
    }

    fn encode_changes(
        &self,
        since: Option<u64>,
        changed: Option<Changed>,
        scope: Option<&BTreeSet<String>>,
    ) -> Answer {
        let in_scope = |name: &str| scope.is_none_or(|s| s.contains(name));
        let services = &self.tables.services;
        let mut out = ChangesOut {
            revision: self.revision,
            since: since.unwrap_or(0),
            epoch: &self.epoch,
            full: changed.is_none(),
            stale: self.stale,
            services: ServicesOut(Vec::new()),
            removed: Vec::new(),
            rejected: Vec::new(),
            unrejected: Vec::new(),
            digest: 0,
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
            Some(scope) => {
                let mut digest = Digest::default();
                for name in scope {
                    if let Some(built) = services.get(name.as_str()) {
                        digest.add(built.digest);
                    }
                }
                digest.value()
            }
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
    stale: bool,
    services: ServicesOut<'a>,
    rejected: Vec<RejectedOut<'a>>,
}

#[derive(serde::Serialize)]
struct ChangesOut<'a> {
    revision: u64,
    since: u64,
    epoch: &'a str,
    full: bool,
    stale: bool,
    services: ServicesOut<'a>,
    removed: Vec<&'a str>,
    rejected: Vec<RejectedOut<'a>>,
    unrejected: Vec<&'a str>,
    digest: u64,
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
        }
    }

    fn send(&self, published: Published) {
        self.tx.send_replace(Some(Arc::new(published)));
    }

    /// Publishes tables with no history before them: a client holding an
    /// older revision, or one of another epoch, gets everything.
    pub fn publish_reset(&self, epoch: &str, revision: u64, tables: Tables) {
        let history = History::new(revision, self.limits);
        self.send(Published::new(
            revision,
            epoch.into(),
            false,
            tables,
            history,
        ));
    }

    /// Publishes the tables at a newer revision of the same epoch, with
    /// what changed since the revision published before.
    pub fn publish_change(&self, revision: u64, commit: Commit, tables: Tables) {
        let Some(current) = self.current() else {
            return;
        };
        let mut history = current.history.clone();
        history.push(revision, commit);
        let epoch = Arc::clone(&current.epoch);
        self.send(Published::new(revision, epoch, false, tables, history));
    }

    /// Serves a snapshot loaded from file, stale, of no known epoch.
    pub fn publish_loaded(&self, snapshot: &Snapshot) {
        let history = History::new(snapshot.revision, self.limits);
        let tables = Tables::from_snapshot(snapshot);
        self.send(Published::new(
            snapshot.revision,
            "".into(),
            true,
            tables,
            history,
        ));
    }

    /// Marks the held tables stale (etcd unreachable) or fresh again,
    /// keeping their content and revision.
    pub fn set_stale(&self, stale: bool) {
        if let Some(current) = self.current().filter(|c| c.stale != stale) {
            self.send(Published::new(
                current.revision,
                Arc::clone(&current.epoch),
                stale,
                current.tables.clone(),
                current.history.clone(),
            ));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::{Changes, Endpoint, Service};

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
            since: Some(revision),
            epoch: Some("e".into()),
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
    fn history_is_bounded_by_bytes() {
        let mut history = History::new(
            1,
            HistoryLimits {
                changes: 100,
                bytes: 500,
            },
        );
        for revision in 2..50 {
            history.push(revision, commit(&["a-service-name"]));
        }
        assert!(history.len() < 10, "{}", history.len());
        assert!(history.since(history.floor()).is_some());
        assert!(history.since(history.floor() - 1).is_none());
    }
}
