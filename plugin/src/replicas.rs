//! Which sync-server replica the poller follows, as a pure state machine.
//!
//! The glue asks [`Replicas::next_call`] what to send, makes the host
//! call, and reports back: the token ([`Replicas::sent`]), then the
//! outcome ([`Replicas::poll_answered`], [`Replicas::poll_failed`],
//! [`Replicas::probed`]). Time is passed in as Unix milliseconds.
//!
//! The poller follows one replica, so that its tables move by deltas of
//! one health view, and leaves it when:
//! - a poll to it fails: the next replica is polled at once, and only
//!   when every replica failed in a row does the backoff apply;
//! - it does not answer a status probe while a long-poll waits on it: it
//!   is hung (frozen, or cut off), the long-poll is abandoned and this
//!   counts as a failed poll;
//! - it says it is stale (in an answer or a probe): every replica is asked
//!   its status, and the best of the epoch held is followed.

use crate::config::PollerConfig;
use crate::poll::PollSchedule;
use etcd_mesh_wire::Status;
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// How long past its timeout a status probe may stay unanswered before it
/// counts as failed. Envoy answers or times out every call it dispatched;
/// this only matters if a callback were lost, which would otherwise stop
/// the probes, or hold the polls behind a search, for good.
const LOST_CALLBACK_MS: u64 = 1_000;

/// What one HTTP call of the poller is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `GET /v1/changes` to the replica followed.
    Poll { replica: usize },
    /// `GET /v1/status` to the replica followed, while a poll waits on it.
    Check { replica: usize },
    /// `GET /v1/status` to one replica, to choose between them; `round`
    /// tells one search's answers from a later one's.
    Survey { replica: usize, round: u64 },
}

impl Call {
    pub fn replica(self) -> usize {
        match self {
            Call::Poll { replica } | Call::Check { replica } | Call::Survey { replica, .. } => {
                replica
            }
        }
    }
}

/// Why the poller moved to another replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A poll to the one followed failed.
    Failed,
    /// The one followed did not answer a status probe while holding a
    /// long-poll.
    Hung,
    /// A search chose another one, with this status.
    Chosen { stale: bool, revision: u64 },
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::Failed => write!(f, "a poll to it failed"),
            Why::Hung => write!(f, "it did not answer a status probe while holding our long-poll"),
            Why::Chosen {
                stale: false,
                revision,
            } => write!(
                f,
                "it is stale or did not answer; the new one is fresh at revision {revision}"
            ),
            Why::Chosen {
                stale: true,
                revision,
            } => write!(
                f,
                "every replica is stale or did not answer; the new one is the freshest, at revision {revision}"
            ),
        }
    }
}

/// A move from one replica to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub from: usize,
    pub to: usize,
    pub why: Why,
}

/// The poll or check under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Handed to the glue, token not known yet.
    Sending,
    Out(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Unsent,
    Sent,
    /// `None`: failed, timed out, or not a status.
    Got(Option<Status>),
}

#[derive(Debug)]
struct Search {
    round: u64,
    started_ms: u64,
    answers: Vec<Answer>,
}

#[derive(Debug)]
pub struct Replicas {
    schedule: PollSchedule,
    count: usize,
    current: usize,
    /// 0 when status probes are off (one replica, or `probe_ms: 0`).
    probe_ms: u64,
    probe_timeout_ms: u64,
    /// Every call out whose answer is still wanted; an answer whose token
    /// is not here is ignored.
    calls: HashMap<u32, Call>,
    poll: Slot,
    /// When the poll out (or last out) was sent.
    poll_sent_ms: u64,
    next_poll_ms: u64,
    check: Slot,
    check_sent_ms: u64,
    /// Polls failed in a row, whichever replica they went to, since the
    /// last answer or the last backoff.
    failed_in_row: usize,
    /// The replica followed said it is stale, last it said anything.
    stale: bool,
    search: Option<Search>,
    search_at_ms: Option<u64>,
    last_search_ms: Option<u64>,
    rounds: u64,
    switches: Vec<Switch>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a replica in this state can be followed.
fn usable(status: &Status) -> bool {
    status.ready && !status.stale
}

impl Replicas {
    /// Starts at a random replica, from the schedule's seed, so that the
    /// Envoys of a fleet spread over the replicas.
    pub fn new(config: PollerConfig, seed: u64) -> Replicas {
        let probe_ms = if config.probing() {
            u64::from(config.probe_ms)
        } else {
            0
        };
        let probe_timeout_ms = u64::from(config.probe_timeout_ms);
        let mut schedule = PollSchedule::new(config, seed);
        // At least one: the configuration is validated, and this keeps
        // every `% count` defined whatever it holds.
        let count = schedule.config().clusters().len().max(1);
        let current = schedule.random_index(count);
        Replicas {
            schedule,
            count,
            current,
            probe_ms,
            probe_timeout_ms,
            calls: HashMap::new(),
            poll: Slot::Free,
            poll_sent_ms: 0,
            next_poll_ms: 0,
            check: Slot::Free,
            check_sent_ms: 0,
            failed_in_row: 0,
            stale: false,
            search: None,
            search_at_ms: None,
            last_search_ms: None,
            rounds: 0,
            switches: Vec::new(),
        }
    }

    pub fn schedule(&self) -> &PollSchedule {
        &self.schedule
    }

    /// The replica followed.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The Envoy cluster of a replica ("" if there is none, which the host
    /// refuses like any unknown cluster).
    pub fn cluster(&self, replica: usize) -> &str {
        self.schedule
            .config()
            .clusters()
            .get(replica)
            .map_or("", String::as_str)
    }

    /// Whether the replica followed says it is stale.
    pub fn stale(&self) -> bool {
        self.stale
    }

    /// How long until the next poll may go out.
    pub fn next_poll_in(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.next_poll_ms.saturating_sub(now_ms))
    }

    /// The moves made since the last call, oldest first.
    pub fn take_switches(&mut self) -> Vec<Switch> {
        std::mem::take(&mut self.switches)
    }

    /// The next call to send now, if any. Each is handed out once: the
    /// glue sends it and reports [`Self::sent`], or its failure.
    pub fn next_call(&mut self, now_ms: u64) -> Option<Call> {
        if self.search.is_none() && self.search_at_ms.is_some_and(|at| now_ms >= at) {
            self.rounds += 1;
            self.search = Some(Search {
                round: self.rounds,
                started_ms: now_ms,
                answers: vec![Answer::Unsent; self.count],
            });
            self.search_at_ms = None;
            self.last_search_ms = Some(now_ms);
        }
        if let Some(search) = &mut self.search {
            if let Some(replica) = search.answers.iter().position(|a| *a == Answer::Unsent) {
                search.answers[replica] = Answer::Sent;
                return Some(Call::Survey {
                    replica,
                    round: search.round,
                });
            }
            // The choice decides where the next poll goes, and the
            // search probes the replica followed too.
            return None;
        }
        if self.poll == Slot::Free && now_ms >= self.next_poll_ms {
            self.poll = Slot::Sending;
            self.poll_sent_ms = now_ms;
            return Some(Call::Poll {
                replica: self.current,
            });
        }
        // A poll answered within `probe_ms` shows the replica alive; one
        // that waits longer is checked every `probe_ms`.
        let due = self.poll_sent_ms.max(self.check_sent_ms) + self.probe_ms;
        if self.probe_ms > 0
            && matches!(self.poll, Slot::Out(_))
            && self.check == Slot::Free
            && now_ms >= due
        {
            self.check = Slot::Sending;
            self.check_sent_ms = now_ms;
            return Some(Call::Check {
                replica: self.current,
            });
        }
        None
    }

    /// `call`, handed out by [`Self::next_call`], went out as `token`.
    pub fn sent(&mut self, call: Call, token: u32) {
        let wanted = match call {
            Call::Poll { .. } => self.poll == Slot::Sending,
            Call::Check { .. } => self.check == Slot::Sending,
            Call::Survey { replica, round } => self
                .search
                .as_ref()
                .is_some_and(|s| s.round == round && s.answers.get(replica) == Some(&Answer::Sent)),
        };
        if !wanted {
            return;
        }
        match call {
            Call::Poll { .. } => self.poll = Slot::Out(token),
            Call::Check { .. } => self.check = Slot::Out(token),
            Call::Survey { .. } => {}
        }
        self.calls.insert(token, call);
    }

    /// What the answer with `token` is for; `None` for a call abandoned or
    /// not the poller's, whose answer is to be ignored. The glue reports
    /// the outcome of what this returns.
    pub fn take(&mut self, token: u32) -> Option<Call> {
        self.calls.remove(&token)
    }

    /// The poll answered (200 or 304); `stale` is what a 200 said.
    pub fn poll_answered(&mut self, now_ms: u64, stale: Option<bool>) {
        self.poll = Slot::Free;
        self.failed_in_row = 0;
        self.schedule.succeeded();
        self.next_poll_ms = now_ms;
        match stale {
            Some(true) => {
                self.stale = true;
                self.want_search(now_ms);
            }
            Some(false) => {
                self.stale = false;
                self.search_at_ms = None;
            }
            None => {}
        }
    }

    /// The poll could not be sent or failed (no answer, a status other
    /// than 200 or 304, a body that is refused).
    pub fn poll_failed(&mut self, now_ms: u64) {
        self.poll = Slot::Free;
        self.fail_over(now_ms, Why::Failed);
    }

    /// A status probe's outcome: `None` when it could not be sent, failed,
    /// timed out, or was not a status. `held_epoch` is the epoch of the
    /// tables held, if any: a search chooses only within it.
    pub fn probed(
        &mut self,
        call: Call,
        now_ms: u64,
        status: Option<&Status>,
        held_epoch: Option<&str>,
    ) {
        match call {
            Call::Poll { .. } => {}
            Call::Check { replica } => {
                self.check = Slot::Free;
                if replica != self.current {
                    return;
                }
                match status {
                    None => self.fail_over(now_ms, Why::Hung),
                    Some(status) if usable(status) => {
                        self.stale = false;
                        self.search_at_ms = None;
                    }
                    // Long-polls are not woken when a server turns stale:
                    // this probe is how the poller learns it.
                    Some(_) => {
                        self.stale = true;
                        self.want_search(now_ms);
                    }
                }
            }
            Call::Survey { replica, round } => {
                let Some(search) = self.search.as_mut().filter(|s| s.round == round) else {
                    return;
                };
                if let Some(answer) = search.answers.get_mut(replica) {
                    *answer = Answer::Got(status.cloned());
                }
                if search.answers.iter().all(|a| matches!(a, Answer::Got(_))) {
                    self.choose(now_ms, held_epoch);
                }
            }
        }
    }

    /// Counts probes whose answer is overdue as failed (see
    /// [`LOST_CALLBACK_MS`]); called on every tick.
    pub fn expire(&mut self, now_ms: u64, held_epoch: Option<&str>) {
        let overdue = self.probe_timeout_ms + LOST_CALLBACK_MS;
        if let Slot::Out(token) = self.check {
            if now_ms >= self.check_sent_ms + overdue {
                self.calls.remove(&token);
                let call = Call::Check {
                    replica: self.current,
                };
                self.probed(call, now_ms, None, held_epoch);
            }
        }
        let Some(search) = &mut self.search else {
            return;
        };
        if now_ms >= search.started_ms + overdue {
            let round = search.round;
            for answer in &mut search.answers {
                if !matches!(answer, Answer::Got(_)) {
                    *answer = Answer::Got(None);
                }
            }
            self.calls
                .retain(|_, call| !matches!(call, Call::Survey { round: r, .. } if *r == round));
            self.choose(now_ms, held_epoch);
        }
    }

    /// A failed poll, or a hung replica: on to the next one at once, and
    /// after a whole round of failures, to it after a backoff.
    fn fail_over(&mut self, now_ms: u64, why: Why) {
        // One backoff per round in which every replica failed.
        self.failed_in_row += 1;
        let round_failed = self.failed_in_row >= self.count;
        if round_failed {
            self.failed_in_row = 0;
        }
        self.switch_to((self.current + 1) % self.count, now_ms, why);
        self.next_poll_ms = if round_failed {
            now_ms.saturating_add(millis(self.schedule.failed()))
        } else {
            now_ms
        };
    }

    fn switch_to(&mut self, to: usize, now_ms: u64, why: Why) {
        if to == self.current {
            return;
        }
        let from = self.current;
        self.current = to;
        // What is out to the old replica is of no more use: its answers
        // are ignored. A search's probes still count.
        self.calls
            .retain(|_, call| matches!(call, Call::Survey { .. }));
        self.poll = Slot::Free;
        self.check = Slot::Free;
        self.next_poll_ms = now_ms;
        // Nothing known of the new one yet.
        self.stale = false;
        self.search_at_ms = None;
        self.switches.push(Switch { from, to, why });
    }

    /// A search is wanted: at once, or `probe_ms` after the last one.
    fn want_search(&mut self, now_ms: u64) {
        if self.probe_ms == 0 || self.search.is_some() {
            return;
        }
        let at = self
            .last_search_ms
            .map_or(now_ms, |last| now_ms.max(last + self.probe_ms));
        if self.search_at_ms.is_none_or(|held| held > at) {
            self.search_at_ms = Some(at);
        }
    }

    /// Ends the search: among the ready replicas of the epoch held (any
    /// epoch when nothing is held), a fresh one before a stale one; the
    /// current one if it is fresh, as moving costs a full load and gains
    /// nothing; else the highest revision, ties to the current one.
    fn choose(&mut self, now_ms: u64, held_epoch: Option<&str>) {
        let Some(search) = self.search.take() else {
            return;
        };
        let mut best: Option<((bool, bool, u64), usize, &Status)> = None;
        // The current one first, so that it keeps ties.
        for step in 0..self.count {
            let replica = (self.current + step) % self.count;
            let Some(Answer::Got(Some(status))) = search.answers.get(replica) else {
                continue;
            };
            if !status.ready
                || status.epoch.is_empty()
                || held_epoch.is_some_and(|epoch| epoch != status.epoch)
            {
                continue;
            }
            let rank = (!status.stale, step == 0 && !status.stale, status.revision);
            if best.is_none_or(|(held, _, _)| rank > held) {
                best = Some((rank, replica, status));
            }
        }
        if let Some((_, replica, status)) = best {
            let (stale, revision) = (status.stale, status.revision);
            self.switch_to(replica, now_ms, Why::Chosen { stale, revision });
            self.stale = stale;
        }
        // Nothing better now: ask again while the one followed is stale.
        if self.stale {
            self.search_at_ms = Some(now_ms + self.probe_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(clusters: &[&str], probe_ms: u32) -> PollerConfig {
        PollerConfig {
            cluster: None,
            clusters: Some(clusters.iter().map(|c| c.to_string()).collect()),
            authority: "sync-server".into(),
            wait_seconds: 30,
            timeout_margin_ms: 5_000,
            max_backoff_ms: 5_000,
            bearer_token: None,
            services: None,
            probe_ms,
            probe_timeout_ms: 1_000,
        }
    }

    fn three() -> Replicas {
        Replicas::new(config(&["s0", "s1", "s2"], 2_000), 7)
    }

    fn status(epoch: &str, revision: u64, stale: bool) -> Status {
        Status {
            epoch: epoch.into(),
            observer: "o".into(),
            revision,
            health_seq: 0,
            stale,
            ready: true,
            proof_age_ms: None,
        }
    }

    /// Plays the glue: sends every call due, with fresh tokens.
    struct Glue {
        next_token: u32,
    }

    impl Glue {
        fn new() -> Glue {
            Glue { next_token: 1 }
        }

        fn send(&mut self, r: &mut Replicas, now: u64) -> Vec<(u32, Call)> {
            let mut out = Vec::new();
            while let Some(call) = r.next_call(now) {
                let token = self.next_token;
                self.next_token += 1;
                r.sent(call, token);
                out.push((token, call));
            }
            out
        }
    }

    /// The survey probes in `calls`, by replica.
    fn surveys(calls: &[(u32, Call)]) -> Vec<(u32, Call)> {
        let mut surveys: Vec<(u32, Call)> = calls
            .iter()
            .copied()
            .filter(|(_, c)| matches!(c, Call::Survey { .. }))
            .collect();
        surveys.sort_by_key(|(_, c)| c.replica());
        surveys
    }

    /// Answers each survey probe with the status given for its replica.
    fn answer(
        r: &mut Replicas,
        now: u64,
        calls: &[(u32, Call)],
        statuses: &[Option<Status>],
        held: Option<&str>,
    ) {
        for (token, _) in surveys(calls) {
            let call = r.take(token).expect("wanted");
            r.probed(call, now, statuses[call.replica()].as_ref(), held);
        }
    }

    #[test]
    fn starts_at_a_random_replica() {
        let starts: std::collections::HashSet<usize> = (0..64)
            .map(|seed| Replicas::new(config(&["s0", "s1", "s2"], 2_000), seed).current())
            .collect();
        assert_eq!(starts.len(), 3);
    }

    #[test]
    fn a_failed_poll_moves_to_the_next_replica_at_once_and_backs_off_after_a_round() {
        let mut r = three();
        let mut glue = Glue::new();
        let start = r.current();
        let mut now = 1_000;
        for step in 1..3 {
            let calls = glue.send(&mut r, now);
            assert_eq!(calls.len(), 1);
            let call = r.take(calls[0].0).expect("wanted");
            assert_eq!(call.replica(), (start + step - 1) % 3);
            r.poll_failed(now);
            assert_eq!(r.current(), (start + step) % 3);
            assert_eq!(r.next_poll_in(now), Duration::ZERO, "at once");
        }
        let calls = glue.send(&mut r, now);
        r.take(calls[0].0).expect("wanted");
        r.poll_failed(now);
        assert_eq!(r.current(), start, "round and round");
        let delay = r.next_poll_in(now);
        assert!(delay > Duration::ZERO, "every replica failed: backoff");
        assert!(glue.send(&mut r, now).is_empty());
        now += millis(delay);
        let calls = glue.send(&mut r, now);
        assert_eq!(calls[0].1, Call::Poll { replica: start });
        let switches = r.take_switches();
        assert_eq!(switches.len(), 3);
        assert!(switches.iter().all(|s| s.why == Why::Failed));
        // An answer ends the run: the next failure moves on at once again.
        r.take(calls[0].0).expect("wanted");
        r.poll_answered(now, None);
        let calls = glue.send(&mut r, now);
        r.take(calls[0].0).expect("wanted");
        r.poll_failed(now);
        assert_eq!(r.next_poll_in(now), Duration::ZERO);
    }

    #[test]
    fn one_replica_backs_off_after_every_failure_and_is_never_probed() {
        let mut r = Replicas::new(config(&["only"], 2_000), 7);
        let mut glue = Glue::new();
        let calls = glue.send(&mut r, 0);
        r.take(calls[0].0).expect("wanted");
        r.poll_answered(0, Some(true));
        assert!(r.stale(), "still read, for the gauge");
        let calls = glue.send(&mut r, 0);
        assert_eq!(calls, [(2, Call::Poll { replica: 0 })], "no search");
        assert!(glue.send(&mut r, 60_000).is_empty(), "no probe");
        r.take(2).expect("wanted");
        r.poll_failed(60_000);
        assert!(r.next_poll_in(60_000) > Duration::ZERO);
        assert!(r.take_switches().is_empty());
    }

    #[test]
    fn a_replica_that_does_not_answer_its_probe_is_left_and_its_long_poll_forgotten() {
        let mut r = three();
        let mut glue = Glue::new();
        let start = r.current();
        let poll = glue.send(&mut r, 0)[0].0;
        assert!(glue.send(&mut r, 1_999).is_empty(), "not yet");
        let calls = glue.send(&mut r, 2_000);
        assert_eq!(calls.len(), 1);
        let (probe, call) = calls[0];
        assert_eq!(call, Call::Check { replica: start });
        assert!(glue.send(&mut r, 2_500).is_empty(), "one probe at a time");
        // The probe times out after `probe_timeout_ms`.
        let call = r.take(probe).expect("wanted");
        r.probed(call, 3_000, None, Some("e"));
        let next = (start + 1) % 3;
        assert_eq!(
            r.take_switches(),
            [Switch {
                from: start,
                to: next,
                why: Why::Hung
            }]
        );
        assert_eq!(r.take(poll), None, "the late answer of the long-poll");
        let calls = glue.send(&mut r, 3_000);
        assert_eq!(calls[0].1, Call::Poll { replica: next });
    }

    #[test]
    fn a_fresh_probe_changes_nothing_and_probes_recur() {
        let mut r = three();
        let mut glue = Glue::new();
        let start = r.current();
        glue.send(&mut r, 0);
        let (probe, _) = glue.send(&mut r, 2_000)[0];
        let call = r.take(probe).expect("wanted");
        r.probed(call, 2_010, Some(&status("e", 10, false)), Some("e"));
        assert!(r.take_switches().is_empty());
        assert_eq!(r.current(), start);
        assert!(glue.send(&mut r, 3_900).is_empty());
        let calls = glue.send(&mut r, 4_000);
        assert_eq!(calls[0].1, Call::Check { replica: start });
    }

    #[test]
    fn a_busy_feed_is_not_probed() {
        let mut r = three();
        let mut glue = Glue::new();
        let mut now = 0;
        for _ in 0..100 {
            let calls = glue.send(&mut r, now);
            assert!(calls.iter().all(|(_, c)| matches!(c, Call::Poll { .. })));
            now += 500;
            r.take(calls[0].0).expect("wanted");
            r.poll_answered(now, Some(false));
        }
    }

    #[test]
    fn a_stale_answer_searches_and_the_fresh_replica_with_the_highest_revision_wins() {
        let mut r = three();
        let mut glue = Glue::new();
        let start = r.current();
        let (poll, _) = glue.send(&mut r, 0)[0];
        r.take(poll).expect("wanted");
        r.poll_answered(100, Some(true));
        assert!(r.stale());
        let calls = glue.send(&mut r, 100);
        assert_eq!(surveys(&calls).len(), 3, "every replica, and no poll yet");
        assert_eq!(calls.len(), 3);
        let (b, c) = ((start + 1) % 3, (start + 2) % 3);
        let mut statuses = vec![None; 3];
        statuses[start] = Some(status("e", 100, true));
        statuses[b] = Some(status("e", 98, false));
        statuses[c] = Some(status("e", 99, false));
        answer(&mut r, 200, &calls, &statuses, Some("e"));
        assert_eq!(
            r.take_switches(),
            [Switch {
                from: start,
                to: c,
                why: Why::Chosen {
                    stale: false,
                    revision: 99
                }
            }]
        );
        assert!(!r.stale());
        assert_eq!(glue.send(&mut r, 200)[0].1, Call::Poll { replica: c });
    }

    #[test]
    fn a_stale_probe_searches_and_abandons_the_long_poll_on_a_move() {
        let mut r = three();
        let mut glue = Glue::new();
        let start = r.current();
        let (poll, _) = glue.send(&mut r, 0)[0];
        let (probe, _) = glue.send(&mut r, 2_000)[0];
        let call = r.take(probe).expect("wanted");
        r.probed(call, 2_010, Some(&status("e", 50, true)), Some("e"));
        assert!(r.stale());
        let calls = glue.send(&mut r, 2_010);
        let b = (start + 1) % 3;
        let mut statuses = vec![Some(status("e", 50, true)); 3];
        statuses[b] = Some(status("e", 51, false));
        answer(&mut r, 2_100, &calls, &statuses, Some("e"));
        assert_eq!(r.current(), b);
        assert_eq!(r.take(poll), None, "the long-poll to the stale one");
        assert_eq!(glue.send(&mut r, 2_100)[0].1, Call::Poll { replica: b });
    }

    #[test]
    fn when_every_replica_is_stale_the_freshest_is_followed_and_searched_again() {
        let mut r = three();
        let mut glue = Glue::new();
        let start = r.current();
        let (poll, _) = glue.send(&mut r, 0)[0];
        r.take(poll).expect("wanted");
        r.poll_answered(0, Some(true));
        let calls = glue.send(&mut r, 0);
        let c = (start + 2) % 3;
        let mut statuses = vec![Some(status("e", 100, true)); 3];
        statuses[c] = Some(status("e", 105, true));
        answer(&mut r, 100, &calls, &statuses, Some("e"));
        assert_eq!(r.current(), c);
        assert!(r.stale());
        let (poll, _) = glue.send(&mut r, 100)[0];
        // Its stale answers do not search more often than every probe_ms.
        r.take(poll).expect("wanted");
        r.poll_answered(500, Some(true));
        let calls = glue.send(&mut r, 500);
        assert!(matches!(calls[..], [(_, Call::Poll { .. })]));
        assert!(glue.send(&mut r, 1_999).is_empty());
        let calls = glue.send(&mut r, 2_000);
        assert_eq!(surveys(&calls).len(), 3);
        // The one followed is fresh again: it stays.
        let mut statuses = vec![Some(status("e", 100, true)); 3];
        statuses[c] = Some(status("e", 106, false));
        answer(&mut r, 2_200, &calls, &statuses, Some("e"));
        assert!(!r.stale());
        assert_eq!(r.current(), c);
        assert!(glue
            .send(&mut r, 60_000)
            .iter()
            .all(|(_, c)| !matches!(c, Call::Survey { .. })));
    }

    #[test]
    fn a_fresh_current_replica_and_ties_are_kept() {
        for (current, other) in [
            (status("e", 100, false), status("e", 101, false)),
            (status("e", 100, true), status("e", 100, true)),
        ] {
            let mut r = three();
            let mut glue = Glue::new();
            let start = r.current();
            let (poll, _) = glue.send(&mut r, 0)[0];
            r.take(poll).expect("wanted");
            r.poll_answered(0, Some(true));
            let calls = glue.send(&mut r, 0);
            let mut statuses = vec![Some(other.clone()); 3];
            statuses[start] = Some(current.clone());
            answer(&mut r, 10, &calls, &statuses, Some("e"));
            assert_eq!(r.current(), start, "{current:?} against {other:?}");
            assert!(r.take_switches().is_empty());
        }
    }

    #[test]
    fn only_ready_replicas_of_the_epoch_held_are_chosen() {
        let mut r = three();
        let mut glue = Glue::new();
        let start = r.current();
        let (b, c) = ((start + 1) % 3, (start + 2) % 3);
        let (poll, _) = glue.send(&mut r, 0)[0];
        r.take(poll).expect("wanted");
        r.poll_answered(0, Some(true));
        let calls = glue.send(&mut r, 0);
        let mut statuses = vec![None; 3];
        statuses[start] = Some(status("e", 10, true));
        statuses[b] = Some(status("f", 99, false));
        let mut unready = status("e", 99, false);
        unready.ready = false;
        statuses[c] = Some(unready);
        answer(&mut r, 10, &calls, &statuses.clone(), Some("e"));
        assert_eq!(r.current(), start);
        assert!(r.stale());
        // Nothing held: any epoch will do.
        let calls = glue.send(&mut r, 2_010);
        assert_eq!(surveys(&calls).len(), 3, "searched again");
        answer(&mut r, 2_020, &calls, &statuses, None);
        assert_eq!(r.current(), b);
    }

    #[test]
    fn answers_of_an_old_search_are_ignored() {
        let mut r = three();
        let mut glue = Glue::new();
        let (poll, _) = glue.send(&mut r, 0)[0];
        r.take(poll).expect("wanted");
        r.poll_answered(0, Some(true));
        let first = glue.send(&mut r, 0);
        // Nobody answers: the search is given up after its deadline.
        r.expire(2_000, Some("e"));
        assert!(r.search.is_none());
        for (token, _) in &first {
            assert_eq!(r.take(*token), None);
        }
        let old = Call::Survey {
            replica: 0,
            round: 1,
        };
        r.probed(old, 2_000, Some(&status("e", 1, false)), Some("e"));
        assert!(r.take_switches().is_empty());
        // The poll held back by the search goes out.
        let calls = glue.send(&mut r, 2_000);
        assert!(matches!(calls[0].1, Call::Poll { .. }));
    }

    #[test]
    fn a_lost_probe_callback_counts_as_a_failed_probe() {
        let mut r = three();
        let mut glue = Glue::new();
        let start = r.current();
        glue.send(&mut r, 0);
        let (probe, _) = glue.send(&mut r, 2_000)[0];
        r.expire(3_999, Some("e"));
        assert_eq!(r.current(), start);
        r.expire(4_000, Some("e"));
        assert_eq!(r.current(), (start + 1) % 3);
        assert_eq!(r.take(probe), None);
    }

    #[test]
    fn probing_off_sends_no_status_calls() {
        let mut r = Replicas::new(config(&["s0", "s1"], 0), 7);
        let mut glue = Glue::new();
        let (poll, _) = glue.send(&mut r, 0)[0];
        r.take(poll).expect("wanted");
        r.poll_answered(0, Some(true));
        assert!(r.stale());
        let calls = glue.send(&mut r, 0);
        assert!(matches!(calls[..], [(_, Call::Poll { .. })]));
        assert!(glue.send(&mut r, 600_000).is_empty());
    }

    #[test]
    fn healthy_quiet_replicas_are_never_left() {
        let mut r = three();
        let mut glue = Glue::new();
        let mut out: Vec<(u32, Call)> = Vec::new();
        let mut poll_sent = 0;
        // Ten minutes of 100 ms ticks; long-polls end in 304 after 30 s.
        for now in (0..600_000).step_by(100) {
            for (token, call) in std::mem::take(&mut out) {
                match call {
                    Call::Poll { .. } if now - poll_sent >= 30_000 => {
                        r.take(token).expect("wanted");
                        r.poll_answered(now, None);
                    }
                    Call::Check { .. } => {
                        let call = r.take(token).expect("wanted");
                        r.probed(call, now, Some(&status("e", 10, false)), Some("e"));
                    }
                    _ => out.push((token, call)),
                }
            }
            r.expire(now, Some("e"));
            for (token, call) in glue.send(&mut r, now) {
                if matches!(call, Call::Poll { .. }) {
                    poll_sent = now;
                }
                out.push((token, call));
            }
        }
        assert!(r.take_switches().is_empty());
        assert!(
            glue.next_token > 250,
            "probed all along: {}",
            glue.next_token
        );
    }
}
