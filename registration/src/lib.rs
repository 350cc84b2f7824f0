//! Keeps one service instance registered in etcd.
//!
//! A registration is a key under a lease: granted, put, and kept alive.
//! When the lease is lost (etcd away longer than its TTL, the keepalive
//! stream closed, "requested lease not found"), a new lease is granted and
//! the key put again, with a growing, jittered pause, until it is back. It
//! talks to one etcd member at a time and moves to the next after a
//! failure. [`EtcdOptions`] says how to reach etcd (TLS, user, timeouts).
//!
//! # A member that stops answering
//!
//! A partitioned or frozen member must not cost a live instance its
//! registration. The lease is renewed five times per TTL, and each renewal
//! must be answered within a deadline well under the TTL (a fifth of it,
//! at least 500 ms; see `keepalive_deadline` in the source for the
//! budget): etcd itself may take ~7 s to say "no leader" or "timed out",
//! and a frozen member never answers. On a missed deadline, an error or a
//! "no leader", the owner moves to the next member at once (every other
//! member is tried before any pause) and keeps the *same* lease alive
//! through it, then catches up with what was done to the key meanwhile.
//! Only when a member answers that the lease is gone is a new one granted
//! and the key put again: a new lease means the key deleted and put back,
//! which watchers (sync-server) would see as the instance leaving and
//! coming back. [`Registration::current_member`] says which member the
//! lease is kept alive through.
//!
//! # Changes made by others
//!
//! The process that keeps a key registered (its owner) watches the key, and
//! before each re-registration reads it again, so that operators' changes
//! (`etcd-mesh-register set-weight` and `drain`, or etcdctl) outlive lease
//! losses instead of being overwritten by the owner's own weight:
//!
//! - A weight written by someone else is adopted and kept, across
//!   re-registrations, until it is changed again here or there: the latest
//!   change wins. Weight 0 (drained) is kept like any other. Only the
//!   weight is adopted; the owner writes its own address and metadata.
//!   A weight found in etcd on registering again is not adopted over one
//!   asked for through [`Registration::set_weight`] while away.
//! - A key deleted by someone else while the owner's lease is alive
//!   (`drain`'s last step, `etcdctl del`) is put back at once at weight 0:
//!   the instance is taken out of traffic and stays so, still listed, until
//!   a weight is set again or its process stops. A running owner's key
//!   cannot be removed for good from outside; stop the process for that.
//! - A key deleted because the lease ended (expired, revoked) is a loss:
//!   registered again with the weight kept.
//! - A key put without a lease (`etcdctl put`) is put back under the
//!   owner's lease, so that it still goes when the owner dies. A key put
//!   under another lease (another process registering the same instance)
//!   is left be.
//!
//! A process that starts registers its own configured weight: operators'
//! changes live as long as the process that adopted them.
//!
//! # Ending
//!
//! [`Registration::deregister`] revokes the lease (the key goes with it)
//! and waits until that is done, so callers stop being routed to the
//! instance without waiting for the TTL. Dropping a [`Registration`] does
//! the same without waiting: the background task revokes the lease if the
//! tokio runtime lives on long enough (a runtime shutting down cancels it;
//! the key then expires with its TTL, as after a crash).
//!
//! The key and value follow etcd's gRPC naming (`<prefix><service>/<addr>`,
//! `{"Op":0,"Addr":..,"Metadata":{"weight":..}}`) or the older openim-v2
//! form (`<schema>:///<service>/<addr>` → `addr`, no weight to adopt).

#![forbid(unsafe_code)]

pub mod admin;

pub use etcd_mesh_etcd_options::{Backoff, ConnectError, EtcdOptions, EtcdTls};

use etcd_client::{
    Client, EventType, KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions,
};
use etcd_mesh_wire::{parse_addr, MAX_WEIGHT};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How the key and value are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFormat {
    /// `<prefix><service>/<addr>` with a JSON value.
    EtcdNaming { prefix: String },
    /// `<schema>:///<service>/<addr>` with the bare address (weight is lost).
    OpenimV2 { schema: String },
}

/// One instance to keep registered.
#[derive(Debug, Clone)]
pub struct Instance {
    pub service: String,
    /// `ip:port` where the instance serves.
    pub addr: String,
    pub weight: u32,
    /// Extra metadata (zone, version, ...), written beside the weight.
    pub metadata: BTreeMap<String, serde_json::Value>,
    pub format: KeyFormat,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("service name is empty or contains '/'")]
    Service,
    #[error("{0}")]
    Addr(String),
    #[error("weight {0} is above {MAX_WEIGHT}")]
    Weight(u32),
    #[error("ttl must be at least 2 s")]
    Ttl,
    #[error("no etcd endpoints")]
    NoEndpoints,
}

impl Instance {
    /// An etcd-naming registration with weight 1 and a 10 s lease.
    pub fn new(prefix: &str, service: &str, addr: &str) -> Instance {
        Instance {
            service: service.to_owned(),
            addr: addr.to_owned(),
            weight: 1,
            metadata: BTreeMap::new(),
            format: KeyFormat::EtcdNaming {
                prefix: prefix.to_owned(),
            },
            ttl: Duration::from_secs(10),
        }
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The zone the instance runs in (`Metadata.zone`): an Envoy in the
    /// same zone keeps its calls there while the zone has capacity.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.metadata
            .insert("zone".into(), serde_json::Value::String(zone.into()));
        self
    }

    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn validate(&self) -> Result<(), InstanceError> {
        if self.service.is_empty() || self.service.contains('/') {
            return Err(InstanceError::Service);
        }
        parse_addr(&self.addr).map_err(InstanceError::Addr)?;
        if self.weight > MAX_WEIGHT {
            return Err(InstanceError::Weight(self.weight));
        }
        if self.ttl < Duration::from_secs(2) {
            return Err(InstanceError::Ttl);
        }
        Ok(())
    }

    pub fn key(&self) -> String {
        match &self.format {
            KeyFormat::EtcdNaming { prefix } => format!("{prefix}{}/{}", self.service, self.addr),
            KeyFormat::OpenimV2 { schema } => format!("{schema}:///{}/{}", self.service, self.addr),
        }
    }

    pub fn value(&self) -> String {
        match &self.format {
            KeyFormat::EtcdNaming { .. } => {
                let mut metadata: serde_json::Map<String, serde_json::Value> =
                    self.metadata.clone().into_iter().collect();
                metadata.insert("weight".into(), self.weight.into());
                serde_json::json!({"Op": 0, "Addr": self.addr, "Metadata": metadata}).to_string()
            }
            KeyFormat::OpenimV2 { .. } => self.addr.clone(),
        }
    }
}

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

/// The least time a keepalive answer is waited for (see
/// [`keepalive_deadline`]).
const MIN_KEEPALIVE_DEADLINE: Duration = Duration::from_millis(500);

/// How often the lease is renewed: five times per TTL (see
/// [`keepalive_deadline`] for the budget this leaves).
fn renew_interval(ttl: Duration) -> Duration {
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
fn keepalive_deadline(ttl: Duration, request_timeout: Duration) -> Duration {
    (ttl / 5).min(request_timeout).max(MIN_KEEPALIVE_DEADLINE)
}

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

/// What someone else did to the key.
enum Change<'a> {
    Put(&'a KeyValue),
    Deleted,
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

    /// Reads a weight someone else wrote; `None` for the openim-v2 form
    /// (its value holds no weight).
    fn weight_written_by_others(&self, value: &[u8]) -> Option<Result<u32, String>> {
        match self.instance.format {
            KeyFormat::EtcdNaming { .. } => Some(admin::weight_of(value)),
            KeyFormat::OpenimV2 { .. } => None,
        }
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
        let found = within(timeout, client.get(self.key.as_str(), None)).await?;
        if let (Some(kv), Some(written)) = (found.kvs().first(), self.written) {
            if kv.mod_revision() > written && !self.unwritten_request {
                if let Some(Ok(weight)) = self.weight_written_by_others(kv.value()) {
                    info!(key = %self.key, weight, "adopting the weight written in etcd while away");
                    self.keep_weight(weight);
                }
            }
        }
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

    /// After keeping the lease alive through another member: catches up
    /// with what was done to the key while no member watched it for this
    /// owner, as the watch would have, and returns the revision to watch
    /// from.
    async fn catch_up(&mut self, client: &mut Client, lease: i64) -> Result<i64, String> {
        let found = within(
            self.options.request_timeout,
            client.get(self.key.as_str(), None),
        )
        .await?;
        let revision = found.header().map_or(0, |h| h.revision());
        match (found.kvs().first(), self.written) {
            // Never written under this lease, or a weight asked for here
            // while away (it wins): ours to write.
            (_, None) => self.put(client, lease).await?,
            _ if self.unwritten_request => self.put(client, lease).await?,
            (Some(kv), Some(written)) if kv.mod_revision() <= written => {}
            (Some(kv), Some(_)) => {
                self.someone_else_wrote(client, lease, Change::Put(kv))
                    .await?;
            }
            (None, Some(_)) => {
                self.someone_else_wrote(client, lease, Change::Deleted)
                    .await?;
            }
        }
        Ok(revision + 1)
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

    /// Answers a change to the key made by someone else.
    async fn someone_else_wrote(
        &mut self,
        client: &mut Client,
        lease: i64,
        change: Change<'_>,
    ) -> Result<(), String> {
        let key = self.key.clone();
        match change {
            Change::Put(kv) => {
                match self.weight_written_by_others(kv.value()) {
                    Some(Ok(weight)) => {
                        info!(%key, weight, "adopting the weight written in etcd");
                        self.keep_weight(weight);
                    }
                    Some(Err(reason)) => {
                        warn!(%key, %reason, "someone else wrote a weight that cannot be read; keeping mine");
                    }
                    None => {}
                }
                self.key_lease = kv.lease();
                if kv.lease() == 0 {
                    // Without a lease the key would outlive this process.
                    self.put(client, lease).await?;
                    info!(%key, "put the key back under its lease");
                }
                // Under another lease: another process registers the same
                // instance; it is left be (no tug of war).
            }
            Change::Deleted => {
                let still_alive = within(
                    self.options.request_timeout,
                    client.lease_time_to_live(lease, None),
                )
                .await?
                .ttl()
                    > 0;
                if !still_alive {
                    return Err("the lease expired (the key was deleted with it)".into());
                }
                if self.key_lease == lease {
                    // Deleted by hand (`drain`, `etcdctl del`): taken out of
                    // traffic, and kept out, but still listed.
                    warn!(%key, "the key was deleted by someone else; putting it back drained (weight 0)");
                    self.keep_weight(0);
                } else {
                    info!(%key, "the key went with another process's lease; registering it again");
                }
                self.put(client, lease).await?;
            }
        }
        Ok(())
    }
}

/// Keeps a lease alive through the member `keeper` talks to, renewing it
/// every `renew` (its first renewal was answered on attaching), until a
/// renewal is not answered within `deadline`, an error comes ("no leader"
/// among them), the lease is gone or the stream closes; returns which.
async fn keep_alive(
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
async fn guarded<T>(
    keepalive: Pin<&mut impl Future<Output = String>>,
    work: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::select! {
        biased;
        why = keepalive => Err(why),
        done = work => done,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_both_formats() {
        let mut instance = Instance::new("svc/", "demo.Echo", "127.0.0.1:5000").with_weight(3);
        instance.metadata.insert("zone".into(), "a".into());
        assert_eq!(instance.key(), "svc/demo.Echo/127.0.0.1:5000");
        let value: serde_json::Value = serde_json::from_str(&instance.value()).expect("json");
        assert_eq!(value["Addr"], "127.0.0.1:5000");
        assert_eq!(value["Metadata"]["weight"], 3);
        assert_eq!(value["Metadata"]["zone"], "a");
        instance.format = KeyFormat::OpenimV2 {
            schema: "openim".into(),
        };
        assert_eq!(instance.key(), "openim:///demo.Echo/127.0.0.1:5000");
        assert_eq!(instance.value(), "127.0.0.1:5000");
    }

    #[test]
    fn refuses_bad_instances() {
        let good = Instance::new("p/", "s", "127.0.0.1:1");
        assert!(good.validate().is_ok());
        assert!(Instance::new("p/", "", "127.0.0.1:1").validate().is_err());
        assert!(Instance::new("p/", "a/b", "127.0.0.1:1")
            .validate()
            .is_err());
        assert!(Instance::new("p/", "s", "host:1").validate().is_err());
        assert!(good.clone().with_weight(10_001).validate().is_err());
        assert!(good.with_ttl(Duration::from_secs(1)).validate().is_err());
    }

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
