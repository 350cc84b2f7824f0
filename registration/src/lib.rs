//! Keeps one service instance registered in etcd.
//!
//! A registration is a key under a lease: granted, put, and kept alive.
//! When the lease is lost (etcd away longer than its TTL, the keepalive
//! stream closed, "requested lease not found"), a new lease is granted and
//! the key put again, with a growing, jittered pause, until it is back. It
//! talks to one etcd member at a time and moves to the next after a
//! failure. [`EtcdOptions`] says how to reach etcd (TLS, user, timeouts).
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
    Client, Event, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions,
    WatchStream,
};
use etcd_mesh_wire::{parse_addr, MAX_WEIGHT};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
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
    /// Not yet registered, or lost and being re-registered.
    Retrying { reason: String },
    /// The key is in etcd under this lease.
    Registered { lease: i64 },
}

/// A running registration. [`Registration::deregister`] ends it and waits
/// for the key to go; dropping it ends it too, without waiting.
#[derive(Debug)]
pub struct Registration {
    state: watch::Receiver<State>,
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
        let (requested, requested_rx) = watch::channel(instance.weight);
        let (kept_tx, kept) = watch::channel(instance.weight);
        let stop = CancellationToken::new();
        let owner = Owner {
            options,
            key: instance.key(),
            instance,
            state: state_tx,
            requested: requested_rx,
            kept: kept_tx,
            stop: stop.clone(),
            written: None,
            key_lease: 0,
            unwritten_request: false,
            last_lease: None,
        };
        let task = tokio::spawn(owner.run());
        Ok(Registration {
            state,
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
    /// The last lease granted, for cleaning up when stopped while away.
    last_lease: Option<i64>,
}

/// The watch of the key and the lease's keepalive, on one member.
struct Held {
    client: Client,
    lease: i64,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
    watch: WatchStream,
}

impl Owner {
    async fn run(mut self) {
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        // One member at a time, the next after each failure: a client over
        // all members keeps sending to a dead one (seen with a member killed).
        let mut turn = 0usize;
        loop {
            match self.hold_lease(turn).await {
                Ok((client, lease)) => return self.revoke(client, lease).await,
                Err(reason) => {
                    if matches!(*self.state.borrow(), State::Registered { .. }) {
                        backoff.reset();
                    }
                    warn!(key = %self.key, %reason, "registration lost; retrying with the next member");
                    turn = turn.wrapping_add(1);
                    self.state.send_replace(State::Retrying { reason });
                }
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
        let Some(lease) = self.last_lease else { return };
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

    /// Connects, adopts what someone else wrote while this owner could not
    /// see it, grants a lease, puts the key, and starts the keepalive and
    /// the watch of the key.
    async fn register(&mut self, turn: usize) -> Result<Held, String> {
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
        self.last_lease = Some(lease);
        self.put(&mut client, lease).await?;
        let (keeper, responses) = within(timeout, client.lease_keep_alive(lease)).await?;
        let mut options = WatchOptions::new();
        if let Some(written) = self.written {
            options = options.with_start_revision(written + 1);
        }
        let watch = within(timeout, client.watch(self.key.as_str(), Some(options))).await?;
        Ok(Held {
            client,
            lease,
            keeper,
            responses,
            watch,
        })
    }

    /// Registers and keeps the lease alive until `stop` (returning the
    /// client and lease for cleanup) or until it is lost.
    async fn hold_lease(&mut self, turn: usize) -> Result<(Client, i64), String> {
        let Held {
            mut client,
            lease,
            mut keeper,
            mut responses,
            mut watch,
        } = self.register(turn).await?;
        info!(key = %self.key, lease, weight = self.instance.weight, "registered");
        self.state.send_replace(State::Registered { lease });

        // Renew three times per TTL; a lease not renewed for a whole TTL is
        // presumed lost even if no error surfaced.
        let mut renew = tokio::time::interval(self.instance.ttl / 3);
        let mut last_renewed = tokio::time::Instant::now();
        let mut requested_open = true;
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ok((client, lease)),
                changed = self.requested.changed(), if requested_open => {
                    if changed.is_err() {
                        // The handle is gone: keep the registration as it is.
                        requested_open = false;
                        continue;
                    }
                    let weight = *self.requested.borrow_and_update();
                    self.keep_weight(weight);
                    self.put(&mut client, lease).await?;
                    info!(key = %self.key, weight, "weight changed");
                }
                _ = renew.tick() => {
                    if last_renewed.elapsed() > self.instance.ttl {
                        return Err("no keepalive answer for a whole TTL".into());
                    }
                    keeper.keep_alive().await.map_err(|e| format!("keepalive: {e}"))?;
                }
                response = responses.message() => match response {
                    Ok(Some(r)) if r.ttl() > 0 => last_renewed = tokio::time::Instant::now(),
                    Ok(Some(_)) => return Err("the lease expired (requested lease not found)".into()),
                    Ok(None) => return Err("the keepalive stream closed".into()),
                    Err(e) => return Err(format!("keepalive: {e}")),
                },
                changes = watch.message() => match changes {
                    Ok(Some(r)) if r.canceled() => {
                        return Err(format!("the watch of the key was cancelled: {}", r.cancel_reason()));
                    }
                    Ok(Some(r)) => {
                        for event in r.events() {
                            self.someone_else_wrote(&mut client, lease, event).await?;
                        }
                    }
                    Ok(None) => return Err("the watch of the key closed".into()),
                    Err(e) => return Err(format!("watch: {e}")),
                },
            }
        }
    }

    /// Answers a change to the key made by someone else (the owner's own
    /// writes, and changes older than its last write, are passed over).
    async fn someone_else_wrote(
        &mut self,
        client: &mut Client,
        lease: i64,
        event: &Event,
    ) -> Result<(), String> {
        let Some(kv) = event.kv() else { return Ok(()) };
        if self
            .written
            .is_some_and(|written| kv.mod_revision() <= written)
        {
            return Ok(());
        }
        let key = self.key.clone();
        match event.event_type() {
            EventType::Put => {
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
            EventType::Delete => {
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

/// `request` within `timeout`, its error as text.
async fn within<T>(
    timeout: Duration,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
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
}
