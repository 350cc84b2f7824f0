//! Calls held until a worker has its first tables.
//!
//! A new Envoy process (a cold start, the new epoch of a hot restart) takes
//! connections as soon as its listener accepts, which can be before its
//! poller has fetched the tables from sync-server (shared data starts empty
//! in every process). Rather than answer such a call "no endpoint" at once,
//! the worker holds it (the filter pauses the request) until its first
//! tables arrive, for at most `hold_until_tables_ms`, and then routes it;
//! past that it answers `UNAVAILABLE`, saying that the tables never
//! arrived. Once a worker holds tables, nothing is held again: a service
//! without endpoints is answered "no endpoint" at once, as before. A worker
//! holds tables from the step that begins its first load, not the one that
//! ends it ([`crate::reload`]): it can answer every call from then on, a
//! call reading its own service until the load reaches it.
//!
//! This module only decides: which call to hold, which to release when the
//! tables come, which has waited too long, and what to count. The glue
//! pauses, resumes (through each call's context id) and answers.

use std::collections::BTreeMap;

/// The most calls one worker holds at once; more are refused at once.
pub const MAX_HELD: usize = 10_000;

/// What to do with a call that came before the worker had tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Pause it; it is released or refused later.
    Hold,
    /// Answer it now.
    Refuse(Refusal),
}

/// Why a call is answered without tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Holding is off (`hold_until_tables_ms: 0`).
    Off,
    /// [`MAX_HELD`] calls are held already.
    Full,
    /// It was held for `hold_until_tables_ms` and no tables came.
    TimedOut { waited_ms: u64 },
}

impl Refusal {
    /// The message of the gRPC `UNAVAILABLE` reply: never "no endpoint for
    /// service X", which means the tables say so.
    pub fn message(self) -> String {
        const WHAT: &str = "etcd-mesh: no endpoint tables yet";
        match self {
            Refusal::Off => format!("{WHAT}: this Envoy has not received them from sync-server"),
            Refusal::Full => {
                format!("{WHAT}, and {MAX_HELD} calls are already waiting for them")
            }
            Refusal::TimedOut { waited_ms } => {
                format!(
                    "{WHAT}: none arrived from sync-server while the call waited {waited_ms} ms"
                )
            }
        }
    }
}

/// What was held, released and refused since last taken; for the stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HoldCounts {
    /// Calls held.
    pub held: u64,
    /// Calls held that were refused at the limit.
    pub timed_out: u64,
    /// Calls answered for want of tables: timed out, holding off, or full.
    pub no_tables: u64,
    /// The longest a call released to be routed had waited (ms), if any was.
    pub max_wait_ms: Option<u64>,
}

/// The calls one worker holds.
#[derive(Debug)]
pub struct Hold {
    limit_ms: u64,
    /// When each held call was held (host clock, ms), by context id: the
    /// host numbers contexts in order, so the oldest come first.
    held: BTreeMap<u32, u64>,
    counts: HoldCounts,
}

impl Hold {
    /// Holds calls for at most `limit_ms`; 0 holds none.
    pub fn new(limit_ms: u32) -> Hold {
        Hold {
            limit_ms: u64::from(limit_ms),
            held: BTreeMap::new(),
            counts: HoldCounts::default(),
        }
    }

    /// A call `id` came at `now_ms` and the worker has no tables.
    pub fn admit(&mut self, id: u32, now_ms: u64) -> Admit {
        let refusal = if self.limit_ms == 0 {
            Refusal::Off
        } else if self.held.len() >= MAX_HELD {
            Refusal::Full
        } else {
            self.held.insert(id, now_ms);
            self.counts.held += 1;
            return Admit::Hold;
        };
        self.counts.no_tables += 1;
        Admit::Refuse(refusal)
    }

    /// Whether call `id` is held (its request must stay paused).
    pub fn is_held(&self, id: u32) -> bool {
        self.held.contains_key(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Call `id` ended (the client went away) while held: it is forgotten,
    /// and neither released nor refused. Returns whether it was held.
    pub fn forget(&mut self, id: u32) -> bool {
        self.held.remove(&id).is_some()
    }

    /// The tables arrived: every held call is released, oldest first, to
    /// be routed now.
    pub fn release(&mut self, now_ms: u64) -> Vec<u32> {
        let held = std::mem::take(&mut self.held);
        for since in held.values() {
            let waited = now_ms.saturating_sub(*since);
            let max = self.counts.max_wait_ms.get_or_insert(0);
            *max = (*max).max(waited);
        }
        held.into_keys().collect()
    }

    /// The calls that have waited `hold_until_tables_ms` by `now_ms`, with
    /// why each is refused; they are no longer held.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(u32, Refusal)> {
        let limit = self.limit_ms;
        let due: Vec<(u32, u64)> = self
            .held
            .iter()
            .filter(|(_, since)| now_ms.saturating_sub(**since) >= limit)
            .map(|(id, since)| (*id, now_ms.saturating_sub(*since)))
            .collect();
        for (id, _) in &due {
            self.held.remove(id);
        }
        self.counts.timed_out += due.len() as u64;
        self.counts.no_tables += due.len() as u64;
        due.into_iter()
            .map(|(id, waited_ms)| (id, Refusal::TimedOut { waited_ms }))
            .collect()
    }

    /// The counts since last taken.
    pub fn take_counts(&mut self) -> HoldCounts {
        std::mem::take(&mut self.counts)
    }
}

/// Shared-data key of the longest wait of a held call routed in this Envoy
/// (ms, little-endian `u64`): every worker raises it, so the gauge shows the
/// longest over all workers.
pub const MAX_WAIT_KEY: &str = "etcd-mesh/held-max-wait-ms";

/// The [`MAX_WAIT_KEY`] value raised to `wait_ms`, or `None` when it holds
/// as much already.
pub fn raise_max_wait(bytes: Option<&[u8]>, wait_ms: u64) -> Option<Vec<u8>> {
    let held = decode_max_wait(bytes);
    (wait_ms > held || bytes.is_none()).then(|| wait_ms.max(held).to_le_bytes().to_vec())
}

/// The wait a [`MAX_WAIT_KEY`] value holds (0 when none or unreadable).
pub fn decode_max_wait(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_held_then_released_oldest_first_with_their_wait() {
        let mut hold = Hold::new(5_000);
        assert_eq!(hold.admit(7, 1_000), Admit::Hold);
        assert_eq!(hold.admit(3, 1_040), Admit::Hold);
        assert_eq!(hold.admit(9, 1_100), Admit::Hold);
        assert!(hold.is_held(3) && hold.is_held(7) && hold.is_held(9));
        assert_eq!(hold.len(), 3);
        // Nothing is due before the limit.
        assert_eq!(hold.expire(5_999), []);
        assert_eq!(hold.release(1_250), [3, 7, 9]);
        assert!(hold.is_empty() && !hold.is_held(7));
        assert_eq!(
            hold.take_counts(),
            HoldCounts {
                held: 3,
                timed_out: 0,
                no_tables: 0,
                max_wait_ms: Some(250),
            }
        );
        assert_eq!(hold.take_counts(), HoldCounts::default(), "taken once");
        // Nothing held: nothing to release.
        assert_eq!(hold.release(2_000), Vec::<u32>::new());
        assert_eq!(hold.take_counts().max_wait_ms, None);
    }

    #[test]
    fn a_call_held_past_the_limit_is_refused_saying_the_tables_never_came() {
        let mut hold = Hold::new(5_000);
        assert_eq!(hold.admit(1, 10_000), Admit::Hold);
        assert_eq!(hold.admit(2, 12_000), Admit::Hold);
        assert_eq!(
            hold.expire(15_000),
            [(1, Refusal::TimedOut { waited_ms: 5_000 })]
        );
        assert!(!hold.is_held(1) && hold.is_held(2));
        // A late tick: refused with the wait it had.
        assert_eq!(
            hold.expire(17_100),
            [(2, Refusal::TimedOut { waited_ms: 5_100 })]
        );
        let counts = hold.take_counts();
        assert_eq!((counts.held, counts.timed_out, counts.no_tables), (2, 2, 2));
        assert_eq!(counts.max_wait_ms, None, "no call was routed");
        let message = Refusal::TimedOut { waited_ms: 5_000 }.message();
        assert!(message.contains("no endpoint tables yet"), "{message}");
        assert!(message.contains("5000 ms"), "{message}");
        for refusal in [
            Refusal::Off,
            Refusal::Full,
            Refusal::TimedOut { waited_ms: 1 },
        ] {
            assert!(
                !refusal.message().contains("no endpoint for service"),
                "distinct from a service without endpoints"
            );
        }
    }

    #[test]
    fn holding_off_refuses_at_once() {
        let mut hold = Hold::new(0);
        assert_eq!(hold.admit(1, 0), Admit::Refuse(Refusal::Off));
        assert!(hold.is_empty());
        let counts = hold.take_counts();
        assert_eq!((counts.held, counts.no_tables), (0, 1));
        assert!(Refusal::Off.message().contains("not received"));
    }

    #[test]
    fn a_call_that_ends_while_held_is_forgotten() {
        let mut hold = Hold::new(5_000);
        hold.admit(4, 0);
        hold.admit(5, 0);
        assert!(hold.forget(4));
        assert!(!hold.forget(4), "once");
        assert!(!hold.forget(99), "never held");
        assert_eq!(hold.release(10), [5]);
        assert_eq!(hold.expire(1_000_000), []);
    }

    #[test]
    fn the_number_held_is_bounded() {
        let mut hold = Hold::new(5_000);
        for id in 0..MAX_HELD as u32 {
            assert_eq!(hold.admit(id, 0), Admit::Hold);
        }
        assert_eq!(
            hold.admit(u32::MAX, 0),
            Admit::Refuse(Refusal::Full),
            "one more is answered at once"
        );
        assert!(Refusal::Full.message().contains("already waiting"));
        // Room again once they are released.
        assert_eq!(hold.release(1).len(), MAX_HELD);
        assert_eq!(hold.admit(u32::MAX, 2), Admit::Hold);
    }

    #[test]
    fn a_clock_that_goes_back_neither_expires_nor_underflows() {
        let mut hold = Hold::new(100);
        hold.admit(1, 5_000);
        assert_eq!(hold.expire(4_000), []);
        assert_eq!(hold.release(4_000), [1]);
        assert_eq!(hold.take_counts().max_wait_ms, Some(0));
    }

    #[test]
    fn the_longest_wait_is_kept_over_workers() {
        let first = raise_max_wait(None, 0).expect("written when absent");
        assert_eq!(decode_max_wait(Some(&first)), 0);
        let raised = raise_max_wait(Some(&first), 120).expect("raised");
        assert_eq!(decode_max_wait(Some(&raised)), 120);
        assert_eq!(raise_max_wait(Some(&raised), 80), None, "a shorter wait");
        assert_eq!(raise_max_wait(Some(&raised), 120), None);
        assert_eq!(decode_max_wait(Some(&[1, 2])), 0, "unreadable");
    }
}
