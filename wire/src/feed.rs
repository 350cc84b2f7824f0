//! The change feed as its followers hold it: where the tables held stand
//! ([`Cursor`]) and whether an answer fits them ([`fit`]).
//!
//! The plugin's poller and the browser console both follow
//! `/v1/changes`; both decide with this one rule, so they cannot drift
//! apart on what an answer means. What each does with a [`Fit`] is its own
//! (the console tells an older answer from no news, see its `Tables`).

use crate::Changes;

/// Where tables stand in sync-server's feed: the etcd revision, then the
/// health-check changes published at it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub revision: u64,
    pub health_seq: u64,
}

impl Position {
    pub fn new(revision: u64, health_seq: u64) -> Self {
        Position {
            revision,
            health_seq,
        }
    }

    /// Where `changes` leaves the tables once applied.
    pub fn of(changes: &Changes) -> Self {
        Position::new(changes.revision, changes.health_seq)
    }

    /// Where a delta in `changes` starts from.
    pub fn since(changes: &Changes) -> Self {
        Position::new(changes.since, changes.since_health_seq)
    }
}

/// Where the tables held come from: the position, the epoch it belongs
/// to, and the replica whose observations they carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub position: Position,
    pub epoch: String,
    pub observer: String,
}

impl Cursor {
    /// The cursor `changes` leaves once applied.
    pub fn of(changes: &Changes) -> Self {
        Cursor {
            position: Position::of(changes),
            epoch: changes.epoch.clone(),
            observer: changes.observer.clone(),
        }
    }

    /// Whether `observer` is the one held. An older server names no
    /// observer: its answers are taken as coming from the one held, as
    /// before observers existed.
    fn same_observer(&self, observer: &str) -> bool {
        observer.is_empty() || observer == self.observer
    }
}

/// Whether an answer fits the tables held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    /// It is newer and fits: apply it (its digest still to be checked).
    Apply,
    /// It holds nothing newer (another replica behind, or the same
    /// position again): keep what is held, it is not an error.
    Ignore,
    /// It does not fit (a delta from another position or epoch): refuse it
    /// whole, drop the cursor, ask for everything.
    Refuse(String),
}

/// Whether `answer` fits what is `held`.
///
/// Within an epoch the revision never goes back, whichever replica
/// answers: one behind is ignored. Health counts of different observers
/// cannot be compared, so a full answer from another observer at the
/// revision held or later replaces everything (the one full load a move to
/// another replica costs). Revisions of different epochs cannot be
/// compared either: a full answer from another epoch is taken whatever its
/// revision. A delta fits only the position and epoch it starts from.
///
/// A delta from another observer fits too: sync-server sends one only to a
/// client that sent the digest of its tables, when its own tables at that
/// revision have the same digest (a restarted replica, or another one, with
/// the same view). The follower checks the digest after applying, as for
/// every answer, so an answer that did not start from what it holds is
/// still refused whole.
pub fn fit(held: Option<&Cursor>, answer: &Changes) -> Fit {
    if let Some(held) = held.filter(|c| c.epoch == answer.epoch) {
        if answer.revision < held.position.revision {
            return Fit::Ignore;
        }
        if held.same_observer(&answer.observer) && Position::of(answer) <= held.position {
            return Fit::Ignore;
        }
    }
    if answer.full {
        return Fit::Apply;
    }
    match held {
        Some(held) if held.position == Position::since(answer) && held.epoch == answer.epoch => {
            Fit::Apply
        }
        held => Fit::Refuse(format!(
            "a delta since revision {} of epoch {:?} from observer {:?} does not fit the tables held ({held:?})",
            answer.since, answer.epoch, answer.observer
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(revision: u64, health_seq: u64, epoch: &str, observer: &str) -> Cursor {
        Cursor {
            position: Position::new(revision, health_seq),
            epoch: epoch.into(),
            observer: observer.into(),
        }
    }

    fn full(revision: u64, epoch: &str, observer: &str) -> Changes {
        Changes {
            revision,
            epoch: epoch.into(),
            observer: observer.into(),
            full: true,
            ..Changes::default()
        }
    }

    fn delta(since: (u64, u64), to: (u64, u64), epoch: &str, observer: &str) -> Changes {
        Changes {
            since: since.0,
            since_health_seq: since.1,
            revision: to.0,
            health_seq: to.1,
            epoch: epoch.into(),
            observer: observer.into(),
            ..Changes::default()
        }
    }

    fn refused(fit: Fit) -> bool {
        matches!(fit, Fit::Refuse(_))
    }

    #[test]
    fn positions_order_by_revision_then_health() {
        assert!(Position::new(1, 9) < Position::new(2, 0));
        assert!(Position::new(2, 0) < Position::new(2, 1));
        let answer = delta((3, 1), (4, 2), "e", "");
        assert_eq!(Position::of(&answer), Position::new(4, 2));
        assert_eq!(Position::since(&answer), Position::new(3, 1));
        let cursor = Cursor::of(&full(7, "e", "o"));
        assert_eq!(cursor, held(7, 0, "e", "o"));
    }

    #[test]
    fn a_full_answer_applies_when_nothing_is_held() {
        assert_eq!(fit(None, &full(0, "e", "")), Fit::Apply);
        assert_eq!(fit(None, &full(9, "e", "o")), Fit::Apply);
    }

    #[test]
    fn a_delta_needs_something_held() {
        let answer = delta((3, 0), (4, 0), "e", "o");
        let Fit::Refuse(why) = fit(None, &answer) else {
            panic!("a delta onto nothing")
        };
        assert!(why.contains("does not fit"), "{why}");
    }

    #[test]
    fn a_delta_fits_only_its_own_position_and_epoch() {
        let cursor = held(10, 1, "e", "o");
        assert_eq!(
            fit(Some(&cursor), &delta((10, 1), (11, 0), "e", "o")),
            Fit::Apply
        );
        // A health change at the same revision.
        assert_eq!(
            fit(Some(&cursor), &delta((10, 1), (10, 2), "e", "o")),
            Fit::Apply
        );
        assert!(refused(fit(
            Some(&cursor),
            &delta((9, 0), (11, 0), "e", "o")
        )));
        assert!(refused(fit(
            Some(&cursor),
            &delta((10, 0), (11, 0), "e", "o")
        )));
        assert!(refused(fit(
            Some(&cursor),
            &delta((10, 1), (11, 0), "f", "o")
        )));
        // Another observer continuing the tables held (its digest is
        // checked once applied), even to a lower health count.
        assert_eq!(
            fit(Some(&cursor), &delta((10, 1), (11, 0), "e", "p")),
            Fit::Apply
        );
        assert_eq!(
            fit(Some(&cursor), &delta((10, 1), (10, 0), "e", "p")),
            Fit::Apply
        );
        assert!(refused(fit(
            Some(&cursor),
            &delta((10, 0), (10, 3), "e", "p")
        )));
        // An older server names no observer: taken as the one held.
        assert_eq!(
            fit(Some(&cursor), &delta((10, 1), (11, 0), "e", "")),
            Fit::Apply
        );
    }

    #[test]
    fn never_older_within_an_epoch() {
        let cursor = held(10, 2, "e", "o");
        // Behind, from any observer, full or not: ignored, not refused.
        assert_eq!(fit(Some(&cursor), &full(9, "e", "o")), Fit::Ignore);
        assert_eq!(fit(Some(&cursor), &full(9, "e", "p")), Fit::Ignore);
        assert_eq!(
            fit(Some(&cursor), &delta((8, 0), (9, 0), "e", "p")),
            Fit::Ignore
        );
        // The same observer at or before the position held: no news.
        assert_eq!(fit(Some(&cursor), &full(10, "e", "o")), Fit::Ignore);
        assert_eq!(fit(Some(&cursor), &full(10, "e", "")), Fit::Ignore);
        assert_eq!(
            fit(Some(&cursor), &delta((10, 2), (10, 2), "e", "o")),
            Fit::Ignore
        );
    }

    #[test]
    fn a_full_answer_replaces_across_observers_and_epochs() {
        let cursor = held(10, 2, "e", "o");
        // Another observer's health counts do not compare: at the revision
        // held or later its full answer replaces everything.
        assert_eq!(fit(Some(&cursor), &full(10, "e", "p")), Fit::Apply);
        assert_eq!(fit(Some(&cursor), &full(12, "e", "p")), Fit::Apply);
        // The same observer, newer.
        assert_eq!(fit(Some(&cursor), &full(11, "e", "o")), Fit::Apply);
        // Another epoch, at any revision.
        assert_eq!(fit(Some(&cursor), &full(3, "f", "o")), Fit::Apply);
        assert!(refused(fit(
            Some(&cursor),
            &delta((10, 2), (11, 0), "f", "o")
        )));
    }
}
