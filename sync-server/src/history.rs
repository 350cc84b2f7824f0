//! The change history: what changed at each publication, so that a client
//! holding an older one gets only what differs (a delta) instead of
//! everything.
//!
//! A publication stands at a [`Position`]: the etcd revision, then the
//! count of health-check changes published at it. The [`History`] keeps,
//! for the last publications, the names of the services and rejection keys
//! each one changed, bounded by count and bytes ([`HistoryLimits`]); it
//! answers "what changed after `since`" ([`Changed`]) for any `since` from
//! its floor on, and `None` for older ones (the client then gets
//! everything). It is a persistent vector: each publication clones it in
//! O(1). Nothing here encodes or serves; [`crate::publish`] does.

use crate::tables::Commit;
use std::collections::BTreeSet;
use std::sync::Arc;

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

/// Where a publication stands: the etcd revision, then the count of
/// health-check changes (which move the tables without a new revision).
/// Both only grow within one process, so positions order publications.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub revision: u64,
    pub health: u64,
}

impl Position {
    pub fn new(revision: u64, health: u64) -> Self {
        Position { revision, health }
    }

    /// A client that names a revision but no health count (one that does
    /// not follow health changes) holds that revision's last publication.
    pub fn of_client(revision: u64, health: Option<u64>) -> Self {
        Position::new(revision, health.unwrap_or(u64::MAX))
    }
}

/// What changed at one position (since the one published before it).
#[derive(Debug)]
struct LogEntry {
    position: Position,
    /// The tables' digest once this publication applied.
    digest: u64,
    services: Vec<Arc<str>>,
    rejections: Vec<Arc<str>>,
    bytes: usize,
}

/// The changes of the last publications. Answers "what changed after
/// `since`" for any `since` from `floor` on.
#[derive(Debug, Clone)]
pub struct History {
    entries: imbl::Vector<Arc<LogEntry>>,
    floor: Position,
    /// The tables' digest at `floor`.
    floor_digest: u64,
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
    /// An empty history of tables with `digest` first published at
    /// `position`.
    pub fn new(position: Position, digest: u64, limits: HistoryLimits) -> Self {
        History {
            entries: imbl::Vector::new(),
            floor: position,
            floor_digest: digest,
            bytes: 0,
            limits,
        }
    }

    /// The oldest position a delta can start from.
    pub fn floor(&self) -> Position {
        self.floor
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records the publication at `position` of what `commit` changed,
    /// leaving the tables with `digest`.
    pub(crate) fn push(&mut self, position: Position, commit: Commit, digest: u64) {
        let names = commit.services.iter().chain(&commit.rejections);
        let bytes = 64 + names.map(|n| n.len() + 16).sum::<usize>();
        self.entries.push_back(Arc::new(LogEntry {
            position,
            digest,
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
            self.floor = oldest.position;
            self.floor_digest = oldest.digest;
        }
    }

    /// The position of this history where the tables stood at etcd
    /// revision `revision` with `digest`, if it keeps one: how a client
    /// that followed another replica (or this one before a restart) is
    /// continued with a delta. The tables at a revision are those of the
    /// last publication at or before it; health changes published at that
    /// revision are tried too, the digest tells which one the client holds.
    pub fn position_of(&self, revision: u64, digest: u64) -> Option<Position> {
        let at = self
            .entries
            .iter()
            .rev()
            .map(|e| (e.position, e.digest))
            .chain([(self.floor, self.floor_digest)])
            .skip_while(|(position, _)| position.revision > revision);
        let mut candidates = at.peekable();
        let held_revision = candidates.peek()?.0.revision;
        candidates
            .take_while(|(position, _)| position.revision == held_revision)
            .find(|(_, d)| *d == digest)
            .map(|(position, _)| position)
    }

    /// What changed after `since`; `None` when `since` is older than the
    /// history kept.
    pub fn since(&self, since: Position) -> Option<Changed> {
        if since < self.floor {
            return None;
        }
        let mut changed = Changed::default();
        for entry in self.entries.iter().rev() {
            if entry.position <= since {
                break;
            }
            changed.services.extend(entry.services.iter().cloned());
            changed.rejections.extend(entry.rejections.iter().cloned());
        }
        Some(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(services: &[&str]) -> Commit {
        Commit {
            services: services.iter().map(|s| Arc::from(*s)).collect(),
            rejections: vec![],
        }
    }

    #[test]
    fn history_is_bounded_by_bytes() {
        let mut history = History::new(
            Position::new(1, 0),
            0,
            HistoryLimits {
                changes: 100,
                bytes: 500,
            },
        );
        for revision in 2..50 {
            history.push(
                Position::new(revision, 0),
                commit(&["a-service-name"]),
                revision,
            );
        }
        assert!(history.len() < 10, "{}", history.len());
        assert!(history.since(history.floor()).is_some());
        let floor = history.floor();
        assert!(history
            .since(Position::new(floor.revision - 1, 0))
            .is_none());
    }

    #[test]
    fn a_position_is_found_by_revision_and_digest() {
        let mut history = History::new(Position::new(10, 0), 100, HistoryLimits::default());
        history.push(Position::new(12, 0), commit(&["a"]), 120);
        history.push(Position::new(12, 1), commit(&["a"]), 121);
        history.push(Position::new(15, 1), commit(&["b"]), 150);
        // The tables at a revision are those of the last publication at or
        // before it, whichever health change the client holds.
        assert_eq!(history.position_of(12, 120), Some(Position::new(12, 0)));
        assert_eq!(history.position_of(13, 121), Some(Position::new(12, 1)));
        assert_eq!(history.position_of(14, 120), Some(Position::new(12, 0)));
        assert_eq!(history.position_of(15, 150), Some(Position::new(15, 1)));
        assert_eq!(history.position_of(99, 150), Some(Position::new(15, 1)));
        assert_eq!(history.position_of(11, 100), Some(Position::new(10, 0)));
        // Other content at that revision, or a revision before the floor.
        assert_eq!(history.position_of(12, 100), None);
        assert_eq!(history.position_of(15, 121), None);
        assert_eq!(history.position_of(9, 100), None);
    }
}
