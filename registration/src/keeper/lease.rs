//! Renewing the lease through one member, under the owner's own deadline
//! for each renewal (etcd's own can be far longer than a lease's TTL; see
//! [`keepalive_deadline`] for the budget), and running etcd requests
//! beside the renewals so that neither holds the other up ([`guarded`]).

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::{Instant, MissedTickBehavior};

/// The least time a keepalive answer is waited for (see
/// [`keepalive_deadline`]).
pub(super) const MIN_KEEPALIVE_DEADLINE: Duration = Duration::from_millis(500);

/// How often the lease is renewed: five times per TTL (see
/// [`keepalive_deadline`] for the budget this leaves).
pub(super) fn renew_interval(ttl: Duration) -> Duration {
    ttl / 5
}

/// How long one keepalive round trip may take before its member is left
/// for the next one.
///
/// etcd does not give up on a keepalive soon enough by itself: a follower
/// forwards it to the leader and waits up to ~7 s (5 s plus two election
/// timeouts) before answering "timed out" or "no leader", a frozen member
/// never answers, and HTTP/2 pings do not notice a member that is alive
/// but cut off from the others. With a 10 s TTL one such wait can cost the
/// lease. So the owner keeps its own deadline: a fifth of the TTL (1 s for
/// a 5 s TTL, 2 s for 10 s), no longer than the request timeout, and never
/// under 500 ms (a healthy member answers in milliseconds; 500 ms leaves
/// room for a slow link or a pause in either process).
///
/// Renewing every fifth of the TTL, a member that stalls is left at most
/// 2/5 of the TTL after the last renewal (one interval, one deadline) and
/// the next member is asked at once; a second bad member costs one more
/// deadline (or the connect timeout, if it does not even take the
/// connection), and a third member is still reached with the lease alive.
pub(super) fn keepalive_deadline(ttl: Duration, request_timeout: Duration) -> Duration {
    (ttl / 5).min(request_timeout).max(MIN_KEEPALIVE_DEADLINE)
}

/// Keeps a lease alive through the member `keeper` talks to, renewing it
/// every `renew` (its first renewal was answered on attaching), until a
/// renewal is not answered within `deadline`, an error comes ("no leader"
/// among them), the lease is gone or the stream closes; returns which.
pub(super) async fn keep_alive(
    mut keeper: LeaseKeeper,
    mut responses: LeaseKeepAliveStream,
    renew: Duration,
    deadline: Duration,
) -> String {
    let mut ticks = tokio::time::interval_at(Instant::now() + renew, renew);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // When the renewal still unanswered was sent.
    let mut waiting: Option<Instant> = None;
    loop {
        let overdue = async {
            match waiting {
                Some(sent) => tokio::time::sleep_until(sent + deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = overdue => return format!("no keepalive answer within {deadline:?}"),
            response = responses.message() => match response {
                Ok(Some(r)) if r.ttl() > 0 => waiting = None,
                Ok(Some(_)) => return "the lease expired (requested lease not found)".into(),
                Ok(None) => return "the keepalive stream closed".into(),
                Err(e) => return format!("keepalive: {e}"),
            },
            _ = ticks.tick(), if waiting.is_none() => {
                if let Err(e) = keeper.keep_alive().await {
                    return format!("keepalive: {e}");
                }
                waiting = Some(Instant::now());
            }
        }
    }
}

/// `work`, unless the keepalive stops first: a request made while holding
/// the lease does not hold its renewals up, and a member that stops
/// answering is left at the keepalive's deadline, not the request's.
pub(super) async fn guarded<T>(
    keepalive: Pin<&mut impl Future<Output = String>>,
    work: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::select! {
        biased;
        why = keepalive => Err(why),
        done = work => done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_missed_renewals_leave_room_before_the_lease_ends() {
        let request_timeout = Duration::from_secs(5);
        for secs in [2, 5, 10, 30, 60] {
            let ttl = Duration::from_secs(secs);
            let (renew, deadline) = (
                renew_interval(ttl),
                keepalive_deadline(ttl, request_timeout),
            );
            // The last renewal answered, the member stalls: it is left one
            // interval and one deadline later, and a second bad member costs
            // another deadline; a third is still reached in time.
            let worst = renew + deadline * 2;
            assert!(worst < ttl, "{ttl:?}: {worst:?}");
            assert!(deadline >= MIN_KEEPALIVE_DEADLINE && deadline <= request_timeout);
        }
        assert_eq!(
            keepalive_deadline(Duration::from_secs(5), Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        assert_eq!(
            keepalive_deadline(Duration::from_secs(60), Duration::from_secs(5)),
            Duration::from_secs(5),
            "never longer than the request timeout"
        );
        assert_eq!(
            keepalive_deadline(Duration::from_secs(2), Duration::from_millis(100)),
            MIN_KEEPALIVE_DEADLINE
        );
    }
}
