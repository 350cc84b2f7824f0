//! How etcd-mesh reaches etcd, in one place: the members, TLS, the user,
//! the timeouts ([`EtcdOptions`]), and the one retry pause every loop that
//! talks to etcd uses ([`Backoff`]).
//!
//! A client is pinned to one member. etcd-client's client over several
//! members keeps sending part of its requests to a member that died (a
//! failed connection still counts as ready), so callers connect to one
//! member at a time and move to the next one when it fails
//! ([`EtcdOptions::connect_member`]), or take the first member that
//! answers ([`EtcdOptions::connect`]). Connecting checks that the member
//! answers (and, with a user, that it accepts the password), within
//! [`EtcdOptions::connect_timeout`].
//!
//! Each process starts at a random member ([`EtcdOptions::first_member`]):
//! when every process started at the first one, they all lost it together.
//! Every request and watch requires a leader: a member cut from the
//! majority then refuses them ("no leader") instead of answering from its
//! frozen copy, and cancels watches it can no longer feed.

#![forbid(unsafe_code)]

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use std::path::Path;
use std::time::Duration;

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdOptions {
    /// `host:port` or URLs, one per member.
    pub endpoints: Vec<String>,
    /// How long connecting to one member may take, all of it: TCP, TLS,
    /// authentication and a first answer.
    pub connect_timeout: Duration,
    /// The deadline callers put on each request once connected.
    pub request_timeout: Duration,
    /// TLS to etcd: `https://` endpoints, verified against this CA.
    pub tls: Option<EtcdTls>,
    /// etcd authentication (user, password).
    pub user: Option<(String, String)>,
    /// The member turn 0 goes to: random per process, so that processes
    /// do not all lean on the first member listed.
    pub first_member: usize,
}

/// PEM material for TLS to etcd.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    /// A client certificate and key, when etcd asks for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the server certificate against, if not the host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EtcdOptions {
    /// Everything but the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(user, _)| user))
            .field("first_member", &self.first_member)
            .finish()
    }
}

impl EtcdTls {
    /// Reads the CA and, if given, a client certificate and key (PEM files).
    pub fn from_files(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        domain: Option<String>,
    ) -> std::io::Result<EtcdTls> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        let identity = match identity {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        Ok(EtcdTls {
            ca_pem: read(ca)?,
            identity,
            domain,
        })
    }
}

/// Why no client came back.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no etcd endpoints")]
    NoEndpoints,
    #[error("etcd at {endpoint}: {source}")]
    Etcd {
        endpoint: String,
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    /// Every member failed, each for its reason.
    #[error("no etcd member answered: {}", join(.0))]
    Members(Vec<ConnectError>),
}

fn join(errors: &[ConnectError]) -> String {
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    messages.join("; ")
}

impl EtcdOptions {
    /// Plain HTTP, no user; 2 s to connect, 5 s per request.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdOptions {
            endpoints,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            tls: None,
            user: None,
            first_member: fastrand::usize(..1024),
        }
    }

    /// One URL per member: `http://` or, with TLS, `https://` added to
    /// a bare `host:port`.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect()
    }

    /// The URL of the member that `turn` goes to: turns walk the members
    /// in order, from [`EtcdOptions::first_member`].
    pub fn member_url(&self, turn: usize) -> Option<String> {
        let urls = self.urls();
        let index = self.first_member.wrapping_add(turn) % urls.len().max(1);
        urls.into_iter().nth(index)
    }

    /// A client for the member of `turn` ([`EtcdOptions::member_url`])
    /// alone, once it has answered (within `connect_timeout`).
    pub async fn connect_member(&self, turn: usize) -> Result<Client, ConnectError> {
        let Some(url) = self.member_url(turn) else {
            return Err(ConnectError::NoEndpoints);
        };
        let attempt = async {
            let mut client = Client::connect([&url], Some(self.connect_options())).await?;
            // Connecting is lazy without a user: ask something to know the
            // member is there.
            client.status().await?;
            Ok(client)
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(source)) => Err(ConnectError::Etcd {
                endpoint: url.clone(),
                source,
            }),
            Err(_) => Err(ConnectError::Timeout {
                endpoint: url.clone(),
                timeout: self.connect_timeout,
            }),
        }
    }

    /// A client for the first member, in turn order, that answers.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        if self.endpoints.is_empty() {
            return Err(ConnectError::NoEndpoints);
        }
        let mut errors = Vec::new();
        for turn in 0..self.endpoints.len() {
            match self.connect_member(turn).await {
                Ok(client) => return Ok(client),
                Err(e) => errors.push(e),
            }
        }
        Err(match errors.len() {
            1 => errors.remove(0),
            _ => ConnectError::Members(errors),
        })
    }

    fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // HTTP/2 pings find a dead member even when nothing is sent.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            // A member without a leader refuses rather than serving (and
            // watching) a copy that no longer moves.
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            options = options.with_tls(config);
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        options
    }
}

/// Growing pauses between attempts: each [`Backoff::next`] is a random
/// pause between half and all of the current step, and doubles the step up
/// to `max`; [`Backoff::reset`] goes back to `first` after a success.
/// The randomness keeps many processes that lost etcd together from
/// retrying in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let first = first.min(max);
        Backoff {
            first,
            max,
            step: first,
        }
    }

    /// The pause before the next attempt.
    // Not an `Iterator`: it never ends, and callers want a pause, not an
    // `Option` of one.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        jitter(step)
    }

    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

/// A pause between `d/2` and `d`.
fn jitter(d: Duration) -> Duration {
    d / 2 + d.mul_f64(fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_the_scheme_their_tls_needs() {
        let mut options = EtcdOptions::new(vec!["10.0.0.1:2379".into(), "http://h:1".into()]);
        assert_eq!(options.urls(), ["http://10.0.0.1:2379", "http://h:1"]);
        options.tls = Some(EtcdTls {
            ca_pem: Vec::new(),
            identity: None,
            domain: None,
        });
        assert_eq!(options.urls(), ["https://10.0.0.1:2379", "http://h:1"]);
    }

    #[test]
    fn turns_walk_every_member_from_a_random_first_one() {
        let members: Vec<String> = (0..3).map(|i| format!("h{i}:1")).collect();
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let options = EtcdOptions::new(members.clone());
            let turns: std::collections::BTreeSet<String> =
                (0..3).filter_map(|t| options.member_url(t)).collect();
            assert_eq!(turns.len(), 3, "three turns reach three members");
            firsts.extend(options.member_url(0));
        }
        assert_eq!(firsts.len(), 3, "processes start at every member");
    }

    #[test]
    fn debug_leaves_the_password_out() {
        let mut options = EtcdOptions::new(vec!["h:1".into()]);
        options.user = Some(("root".into(), "s3cret".into()));
        let shown = format!("{options:?}");
        assert!(
            shown.contains("root") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn backoff_grows_to_its_max_with_jitter_and_resets() {
        let (first, max) = (Duration::from_millis(100), Duration::from_millis(700));
        let mut backoff = Backoff::new(first, max);
        let steps = [100, 200, 400, 700, 700].map(Duration::from_millis);
        let mut pauses = Vec::new();
        for step in steps {
            let pause = backoff.next();
            assert!(pause >= step / 2 && pause <= step, "{pause:?} for {step:?}");
            pauses.push(pause);
        }
        backoff.reset();
        let pause = backoff.next();
        assert!(
            pause >= first / 2 && pause <= first,
            "{pause:?} after reset"
        );
        // Not one fixed pause per step: 1,000 draws of one step differ.
        let draws: std::collections::BTreeSet<Duration> =
            (0..1000).map(|_| jitter(Duration::from_secs(1))).collect();
        assert!(draws.len() > 900, "{} distinct pauses", draws.len());
    }

    #[tokio::test]
    async fn no_endpoints_is_an_error_not_a_hang() {
        let options = EtcdOptions::new(Vec::new());
        assert!(matches!(
            options.connect().await,
            Err(ConnectError::NoEndpoints)
        ));
        assert!(matches!(
            options.connect_member(3).await,
            Err(ConnectError::NoEndpoints)
        ));
    }

    #[tokio::test]
    async fn a_member_that_never_answers_times_out() {
        // Accepts TCP connections (the backlog) and never speaks.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr").to_string();
        let mut options = EtcdOptions::new(vec![addr.clone(), addr]);
        options.connect_timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), options.connect())
            .await
            .expect("connect gives up on its own");
        let errors = match result {
            Err(ConnectError::Members(errors)) => errors,
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("connected to nothing"),
        };
        assert!(
            errors
                .iter()
                .all(|e| matches!(e, ConnectError::Timeout { .. })),
            "{errors:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
