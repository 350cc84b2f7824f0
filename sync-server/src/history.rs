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
    /// An empty history of tables first published at `position`.
    pub fn new(position: Position, limits: HistoryLimits) -> Self {
        History {
            entries: imbl::Vector::new(),
            floor: position,
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

    pub(crate) fn push(&mut self, position: Position, commit: Commit) {
        let names = commit.services.iter().chain(&commit.rejections);
        let bytes = 64 + names.map(|n| n.len() + 16).sum::<usize>();
        self.entries.push_back(Arc::new(LogEntry {
            position,
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
        }
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
            HistoryLimits {
                changes: 100,
                bytes: 500,
            },
        );
        for revision in 2..50 {
            history.push(Position::new(revision, 0), commit(&["a-service-name"]));
        }
        assert!(history.len() < 10, "{}", history.len());
        assert!(history.since(history.floor()).is_some());
        let floor = history.floor();
        assert!(history
            .since(Position::new(floor.revision - 1, 0))
            .is_none());
    }
}
