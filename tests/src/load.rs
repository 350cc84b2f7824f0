//! Calls through Envoy in a loop: until stopped, in the background, or
//! timed one by one (what a failure test counts).

use crate::DEADLINE;
use etcd_mesh_demo::client;
use etcd_mesh_testkit::wait_for;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The longest one call of a load run may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What a load run did: calls sent, and the failures (index, status).
pub type LoadReport = (usize, Vec<(usize, tonic::Code)>);

/// Sends up to `calls` calls one after another over `clients` until
/// `stop`, counting them in `sent`.
pub async fn load(
    clients: &[client::Client],
    calls: usize,
    stop: &CancellationToken,
    sent: &AtomicUsize,
) -> LoadReport {
    let mut failures = Vec::new();
    for i in 0..calls {
        if stop.is_cancelled() {
            break;
        }
        let mut client = clients[i % clients.len()].clone();
        let request = etcd_mesh_demo::proto::SayRequest::default();
        // A call that hangs is a failure too, and must not stall the load.
        let call = tokio::time::timeout(CALL_TIMEOUT, client::say(&mut client, request));
        match call.await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => failures.push((i, status.code())),
            Err(_) => failures.push((i, tonic::Code::DeadlineExceeded)),
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    (sent.load(Ordering::Relaxed), failures)
}

/// A [`load`] running in the background.
pub struct BackgroundLoad {
    stop: CancellationToken,
    sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<LoadReport>,
}

impl BackgroundLoad {
    pub fn start(clients: Vec<client::Client>, calls: usize) -> BackgroundLoad {
        let stop = CancellationToken::new();
        let sent = Arc::new(AtomicUsize::new(0));
        let task = {
            let (stop, sent) = (stop.clone(), Arc::clone(&sent));
            tokio::spawn(async move { load(&clients, calls, &stop, &sent).await })
        };
        BackgroundLoad { stop, sent, task }
    }

    /// Waits until `n` more calls have been sent, so that the load really
    /// spans the step that follows, however slow the machine is.
    pub async fn progress(&self, n: usize) {
        let target = self.sent.load(Ordering::Relaxed) + n;
        wait_for("the load to progress", DEADLINE, || async {
            (self.sent.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await
        .expect("the load makes progress");
    }

    /// Stops the load and asserts that no call failed.
    pub async fn assert_no_failed_call(self) {
        self.stop.cancel();
        let (sent, failures) = self.task.await.expect("load task");
        assert!(
            failures.is_empty(),
            "{} of {sent} calls failed: {failures:?}",
            failures.len()
        );
    }
}

/// One call of a [`TimedLoad`]: when it started (from the load's start),
/// how long it took (retries included), who served it or how it failed,
/// and how many times it was retried.
#[derive(Debug, Clone)]
pub struct TimedCall {
    pub client: usize,
    pub started: Duration,
    pub took: Duration,
    pub outcome: Result<String, tonic::Code>,
    pub retries: u32,
}

/// One loop of calls per client, each call with a deadline (a call past it
/// is cancelled, as a gRPC client's deadline does, and counted as
/// `DeadlineExceeded`), every call timed; at most `max_calls` per loop.
/// With retries, an `UNAVAILABLE` is sent again at once, within the same
/// deadline, as a gRPC retry policy on `UNAVAILABLE` does (without its
/// backoff): a new call through Envoy, and a new pick.
pub struct TimedLoad {
    started: std::time::Instant,
    stop: CancellationToken,
    sent: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<TimedCall>>>,
}

impl TimedLoad {
    pub fn start(clients: Vec<client::Client>, deadline: Duration, max_calls: usize) -> TimedLoad {
        Self::start_retrying(clients, deadline, max_calls, 0)
    }

    /// The same, each `UNAVAILABLE` retried up to `retries` times.
    pub fn start_retrying(
        clients: Vec<client::Client>,
        deadline: Duration,
        max_calls: usize,
        retries: u32,
    ) -> TimedLoad {
        let started = std::time::Instant::now();
        let stop = CancellationToken::new();
        let sent = Arc::new(AtomicUsize::new(0));
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(i, mut client)| {
                let (stop, sent) = (stop.clone(), Arc::clone(&sent));
                tokio::spawn(async move {
                    let mut calls = Vec::new();
                    for _ in 0..max_calls {
                        if stop.is_cancelled() {
                            break;
                        }
                        let at = std::time::Instant::now();
                        let mut tries = 0;
                        let call = tokio::time::timeout(deadline, async {
                            loop {
                                let request = etcd_mesh_demo::proto::SayRequest::default();
                                match client::say(&mut client, request).await {
                                    Err(status)
                                        if status.code() == tonic::Code::Unavailable
                                            && tries < retries =>
                                    {
                                        tries += 1;
                                    }
                                    done => break done,
                                }
                            }
                        });
                        let outcome = match call.await {
                            Ok(Ok(by)) => Ok(by),
                            Ok(Err(status)) => Err(status.code()),
                            Err(_) => Err(tonic::Code::DeadlineExceeded),
                        };
                        calls.push(TimedCall {
                            client: i,
                            started: at.duration_since(started),
                            took: at.elapsed(),
                            outcome,
                            retries: tries,
                        });
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    calls
                })
            })
            .collect();
        TimedLoad {
            started,
            stop,
            sent,
            tasks,
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Calls finished so far.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the loops (a call under way finishes or meets its deadline)
    /// and returns every call, in the order they started.
    pub async fn finish(mut self) -> Vec<TimedCall> {
        self.stop.cancel();
        let mut calls = Vec::new();
        for task in std::mem::take(&mut self.tasks) {
            calls.extend(task.await.expect("load loop"));
        }
        calls.sort_by_key(|c| c.started);
        calls
    }
}

impl Drop for TimedLoad {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The `p`-th percentile (0..=100, nearest rank) of `values`; zero when empty.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
