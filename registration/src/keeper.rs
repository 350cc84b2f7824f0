//! Keeping the key registered: the task that owns the registration
//! ([`Registration`] is its handle).
//!
//! The task grants a lease, puts the key under it and keeps the lease
//! alive through one member at a time, under its own deadline for each
//! renewal; on a failure it moves to the next member and keeps the *same*
//! lease alive through it, and only when a member says the lease is gone
//! does it grant a new one and put the key again (see the crate docs, "A
//! member that stops answering"); the renewals themselves are `lease`'s.
//! Stopping revokes the lease. What others do to the key meanwhile is
//! `adopt`'s.

mod adopt;
mod lease;

use crate::{EtcdOptions, Instance, InstanceError};
use adopt::Change;
use etcd_client::{Client, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions};
use etcd_mesh_etcd_options::Backoff;
use etcd_mesh_wire::MAX_WEIGHT;
use lease::{guarded, keep_alive, keepalive_deadline, renew_interval};
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not yet registered, or lost and being re-registered, or moving to
    /// another member (the key stays under its lease meanwhile, if the
    /// move is quicker than the TTL).
    Retrying { reason: String },
    /// The key is in etcd under this lease.
    Registered { lease: i64 },
}

/// A running registration. [`Registration::deregister`] ends it and waits
/// for the key to go; dropping it ends it too, without waiting.
#[derive(Debug)]
pub struct Registration {
    state: watch::Receiver<State>,
    /// The member the lease is kept alive through, while registered.
    member: watch::Receiver<Option<String>>,
    /// Weights asked for through [`Registration::set_weight`].
    requested: watch::Sender<u32>,
    /// The weight kept: asked for here or written in etcd by someone else.
    kept: watch::Receiver<u32>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);

impl Registration {
    /// Starts keeping `instance` registered in the etcd at `endpoints`
    /// (plain HTTP, no user, the default timeouts). Needs a tokio runtime.
    pub fn start(
        endpoints: Vec<String>,
        instance: Instance,
    ) -> Result<Registration, InstanceError> {
        Self::start_with(EtcdOptions::new(endpoints), instance)
    }

    /// Starts keeping `instance` registered in the etcd `options` reach
    /// (TLS, user and timeouts included). Needs a tokio runtime.
    pub fn start_with(
        options: EtcdOptions,
        instance: Instance,
    ) -> Result<Registration, InstanceError> {
        instance.validate()?;
        if options.endpoints.is_empty() {
            return Err(InstanceError::NoEndpoints);
        }
        let (state_tx, state) = watch::channel(State::Retrying {
            reason: "starting".into(),
        });
        let (member_tx, member) = watch::channel(None);
        let (requested, requested_rx) = watch::channel(instance.weight);
        let (kept_tx, kept) = watch::channel(instance.weight);
        let stop = CancellationToken::new();
        let owner = Owner {
            options,
            key: instance.key(),
            instance,
            state: state_tx,
            member: member_tx,
            requested: requested_rx,
            kept: kept_tx,
            stop: stop.clone(),
            written: None,
            key_lease: 0,
            unwritten_request: false,
            lease: None,
        };
        let task = tokio::spawn(owner.run());
        Ok(Registration {
            state,
            member,
            requested,
            kept,
            stop,
            task,
        })
    }

    /// Changes the registered weight: written at once under the current
    /// lease, or with the next registration if etcd is away. The latest
    /// change wins, whether made here or by someone else in etcd; one made
    /// here while etcd is away wins over one found there on coming back.
    pub fn set_weight(&self, weight: u32) -> Result<(), InstanceError> {
        if weight > MAX_WEIGHT {
            return Err(InstanceError::Weight(weight));
        }
        self.requested.send_replace(weight);
        Ok(())
    }

    /// The weight the registration keeps: the last one set here, or
    /// written in etcd by someone else (`set-weight`, `drain`) since.
    pub fn weight(&self) -> u32 {
        *self.kept.borrow()
    }

    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn watch_state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// The URL of the etcd member the lease is kept alive through, while
    /// registered; `None` while retrying or moving to another member.
    pub fn current_member(&self) -> Option<String> {
        self.member.borrow().clone()
    }

    /// Waits until the key is in etcd, or `timeout` passes.
    pub async fn registered(&self, timeout: Duration) -> Result<i64, State> {
        let mut state = self.state.clone();
        let wait = async {
            state
                .wait_for(|s| matches!(s, State::Registered { .. }))
                .await
                .map(|s| s.clone())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(State::Registered { lease })) => Ok(lease),
            _ => Err(self.state()),
        }
    }

    /// Revokes the lease (the key goes with it) and stops; returns when
    /// that is done, or has failed within the request timeout.
    pub async fn deregister(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Registration {
    /// Stops the registration: its task revokes the lease in the
    /// background, as [`Registration::deregister`] does, if the runtime
    /// lives on long enough; otherwise the key expires with its TTL.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The task that keeps one key registered.
struct Owner {
    options: EtcdOptions,
    /// `instance.weight` is the weight kept.
    instance: Instance,
    key: String,
    state: watch::Sender<State>,
    member: watch::Sender<Option<String>>,
    requested: watch::Receiver<u32>,
    kept: watch::Sender<u32>,
    stop: CancellationToken,
    /// The revision of this owner's last write of the key: a change at a
    /// later revision was made by someone else. `None` before the first.
    written: Option<i64>,
    /// The lease the key was last seen under.
    key_lease: i64,
    /// A weight asked for through the handle and not written yet.
    unwritten_request: bool,
    /// The last lease granted, until a member says it is gone: when a
    /// member fails, this lease is kept alive through the next one rather
    /// than replaced (a new lease means the key deleted and put again,
    /// which watchers see as the instance leaving and coming back). Also
    /// what is revoked when stopped while away.
    lease: Option<i64>,
}

/// A client on one member, and the lease's keepalive through it (its
/// first renewal answered).
struct Attached {
    client: Client,
    lease: i64,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
    /// The lease was kept from before (the key may have changed while no
    /// member watched it), not granted now.
    reattached: bool,
}

impl Owner {
    async fn run(mut self) {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        // One member at a time, the next after each failure: a client over
        // all members keeps sending to a dead one (seen with a member killed).
        let mut turn = 0usize;
        // Members still to try without a pause. A member lost while
        // registered leaves the lease ticking: every other member is tried
        // at once, and only then does the backoff start.
        let mut at_once = 0usize;
        loop {
            match self.hold_lease(turn).await {
                Ok((client, lease)) => return self.revoke(client, lease).await,
                Err(reason) => {
                    if matches!(*self.state.borrow(), State::Registered { .. }) {
                        backoff.reset();
                        at_once = self.options.endpoints.len().saturating_sub(1);
                    }
                    warn!(key = %self.key, %reason, "registration lost; retrying with the next member");
                    turn = turn.wrapping_add(1);
                    self.member.send_replace(None);
                    self.state.send_replace(State::Retrying { reason });
                }
            }
            if self.stop.is_cancelled() {
                return self.revoke_while_away(turn).await;
            }
            if at_once > 0 {
                at_once -= 1;
                continue;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return self.revoke_while_away(turn).await,
                _ = tokio::time::sleep(backoff.next()) => {}
            }
        }
    }

    /// Stopping: the key goes with the lease now rather than after the TTL.
    /// Only the lease is revoked, so a key another process put under its
    /// own lease stays.
    async fn revoke(&self, mut client: Client, lease: i64) {
        let revoked =
            tokio::time::timeout(self.options.request_timeout, client.lease_revoke(lease)).await;
        match revoked {
            Ok(Ok(_)) => info!(key = %self.key, "deregistered"),
            _ => warn!(key = %self.key, "could not deregister; the key expires with its lease"),
        }
    }

    /// Stopped while etcd is away: the last lease is revoked if a member
    /// answers within the request timeout (best effort; it expires anyway).
    async fn revoke_while_away(&self, turn: usize) {
        let Some(lease) = self.lease else { return };
        let attempts = async {
            for i in 0..self.options.endpoints.len() {
                if let Ok(mut client) = self.options.connect_member(turn.wrapping_add(i)).await {
                    if client.lease_revoke(lease).await.is_ok() {
                        return;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(self.options.request_timeout, attempts).await;
    }

    fn keep_weight(&mut self, weight: u32) {
        self.instance.weight = weight;
        self.kept.send_replace(weight);
    }

    fn keepalive_deadline(&self) -> Duration {
        keepalive_deadline(self.instance.ttl, self.options.request_timeout)
    }

    /// Puts the key, with the weight kept, under `lease`.
    async fn put(&mut self, client: &mut Client, lease: i64) -> Result<(), String> {
        let options = PutOptions::new().with_lease(lease);
        let put = client.put(self.key.as_str(), self.instance.value(), Some(options));
        let response = within(self.options.request_timeout, put).await?;
        self.written = response.header().map(|h| h.revision());
        self.key_lease = lease;
        self.unwritten_request = false;
        Ok(())
    }

    /// Connects to the member of `turn` and keeps the lease alive through
    /// it: the lease held so far if that member says it is alive (the
    /// first renewal answered within the keepalive deadline), else a new
    /// one with the key put under it.
    async fn attach(&mut self, turn: usize) -> Result<Attached, String> {
        let mut client = self
            .options
            .connect_member(turn)
            .await
            .map_err(|e| e.to_string())?;
        // A weight asked for here while away wins over one found there
        // (which of the two came later cannot be known).
        if self.requested.has_changed().unwrap_or(false) {
            let weight = *self.requested.borrow_and_update();
            self.keep_weight(weight);
            self.unwritten_request = true;
        }
        if let Some(lease) = self.lease {
            let deadline = self.keepalive_deadline();
            match tokio::time::timeout(deadline, client.lease_keep_alive(lease)).await {
                Ok(Ok((keeper, responses))) => {
                    return Ok(Attached {
                        client,
                        lease,
                        keeper,
                        responses,
                        reattached: true,
                    })
                }
                // etcd-client's answer to a first renewal with TTL 0: the
                // member says the lease is gone (expired or revoked while
                // no member could renew it).
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(reason))) => {
                    info!(key = %self.key, lease, %reason, "the lease is gone; registering under a new one");
                    self.lease = None;
                }
                Ok(Err(e)) => return Err(format!("keepalive: {e}")),
                Err(_) => return Err(format!("no keepalive answer within {deadline:?}")),
            }
        }
        self.register(client).await
    }

    /// Adopts what someone else wrote while this owner could not see it,
    /// grants a lease, puts the key, and starts the keepalive.
    async fn register(&mut self, mut client: Client) -> Result<Attached, String> {
        let timeout = self.options.request_timeout;
        self.adopt_what_was_written_while_away(&mut client).await?;
        let ttl_secs = i64::try_from(self.instance.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = within(timeout, client.lease_grant(ttl_secs, None))
            .await?
            .id();
        self.lease = Some(lease);
        self.put(&mut client, lease).await?;
        let (keeper, responses) = within(timeout, client.lease_keep_alive(lease)).await?;
        Ok(Attached {
            client,
            lease,
            keeper,
            responses,
            reattached: false,
        })
    }

    /// Registers (or keeps the lease from before alive) through the member
    /// of `turn`, and keeps the lease alive until `stop` (returning the
    /// client and lease for cleanup) or until that member fails or the
    /// lease is lost.
    async fn hold_lease(&mut self, turn: usize) -> Result<(Client, i64), String> {
        let Attached {
            mut client,
            lease,
            keeper,
            responses,
            reattached,
        } = self.attach(turn).await?;
        let keepalive = keep_alive(
            keeper,
            responses,
            renew_interval(self.instance.ttl),
            self.keepalive_deadline(),
        );
        tokio::pin!(keepalive);
        // From here on, whatever else waits on etcd waits beside the
        // renewals, and gives up as soon as they do.
        let from = if reattached {
            guarded(keepalive.as_mut(), self.catch_up(&mut client, lease)).await?
        } else {
            self.written.map_or(0, |written| written + 1)
        };
        let mut options = WatchOptions::new();
        if from > 0 {
            options = options.with_start_revision(from);
        }
        let watching = within(
            self.options.request_timeout,
            client.watch(self.key.as_str(), Some(options)),
        );
        let mut watch = guarded(keepalive.as_mut(), watching).await?;
        let member = self.options.member_url(turn);
        if reattached {
            info!(key = %self.key, lease, member = ?member, "kept the lease alive through another member");
        } else {
            info!(key = %self.key, lease, weight = self.instance.weight, member = ?member, "registered");
        }
        self.member.send_replace(member);
        self.state.send_replace(State::Registered { lease });

        let mut requested_open = true;
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ok((client, lease)),
                why = keepalive.as_mut() => return Err(why),
                changed = self.requested.changed(), if requested_open => {
                    if changed.is_err() {
                        // The handle is gone: keep the registration as it is.
                        requested_open = false;
                        continue;
                    }
                    let weight = *self.requested.borrow_and_update();
                    self.keep_weight(weight);
                    // Still to write if this member fails on it.
                    self.unwritten_request = true;
                    guarded(keepalive.as_mut(), self.put(&mut client, lease)).await?;
                    info!(key = %self.key, weight, "weight changed");
                }
                changes = watch.message() => match changes {
                    Ok(Some(r)) if r.canceled() => {
                        return Err(format!("the watch of the key was cancelled: {}", r.cancel_reason()));
                    }
                    Ok(Some(r)) => {
                        for event in r.events() {
                            // The owner's own writes, and changes older than
                            // its last write, are passed over.
                            let Some(kv) = event.kv() else { continue };
                            if self.written.is_some_and(|written| kv.mod_revision() <= written) {
                                continue;
                            }
                            let change = match event.event_type() {
                                EventType::Put => Change::Put(kv),
                                EventType::Delete => Change::Deleted,
                            };
                            let answer = self.someone_else_wrote(&mut client, lease, change);
                            guarded(keepalive.as_mut(), answer).await?;
                        }
                    }
                    Ok(None) => return Err("the watch of the key closed".into()),
                    Err(e) => return Err(format!("watch: {e}")),
                },
            }
        }
    }
}

/// `request` within `timeout`, its error as text.
async fn within<T>(
    timeout: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(format!("etcd: {e}")),
        Err(_) => Err(format!("etcd did not answer within {timeout:?}")),
    }
}
