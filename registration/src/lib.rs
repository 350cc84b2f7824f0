//! Keeps one service instance registered in etcd.
//!
//! A registration is a key under a lease: granted, put, and kept alive.
//! When the lease is lost (etcd away longer than its TTL, the keepalive
//! stream closed, "requested lease not found"), a new lease is granted and
//! the key put again, with a growing, jittered pause, until it is back. It
//! talks to one etcd member at a time and moves to the next after a
//! failure. [`EtcdOptions`] says how to reach etcd (TLS, user, timeouts).
//! Deregistering deletes the key and revokes the lease at once, so callers
//! stop being routed to the instance without waiting for the TTL.
//!
//! The key and value follow etcd's gRPC naming (`<prefix><service>/<addr>`,
//! `{"Op":0,"Addr":..,"Metadata":{"weight":..}}`) or the older openim-v2
//! form (`<schema>:///<service>/<addr>` → `addr`).

#![forbid(unsafe_code)]

pub mod admin;

pub use etcd_mesh_etcd_options::{Backoff, ConnectError, EtcdOptions, EtcdTls};

use etcd_client::{Client, PutOptions};
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

/// A running registration; [`Registration::deregister`] ends it cleanly.
#[derive(Debug)]
pub struct Registration {
    state: watch::Receiver<State>,
    weight: watch::Sender<u32>,
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
        let (weight, weight_rx) = watch::channel(instance.weight);
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_registered(
            options,
            instance,
            state_tx,
            weight_rx,
            stop.clone(),
        ));
        Ok(Registration {
            state,
            weight,
            stop,
            task,
        })
    }

    /// Changes the registered weight: written at once under the current
    /// lease, or with the next registration if etcd is away.
    pub fn set_weight(&self, weight: u32) -> Result<(), InstanceError> {
        if weight > MAX_WEIGHT {
            return Err(InstanceError::Weight(weight));
        }
        self.weight.send_replace(weight);
        Ok(())
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

    /// Deletes the key, revokes the lease, and stops.
    pub async fn deregister(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn keep_registered(
    options: EtcdOptions,
    mut instance: Instance,
    state: watch::Sender<State>,
    mut weight: watch::Receiver<u32>,
    stop: CancellationToken,
) {
    let key = instance.key();
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    // One member at a time, the next after each failure: a client over all
    // members keeps sending to a dead one (seen with a member killed).
    let mut turn = 0usize;
    loop {
        instance.weight = *weight.borrow_and_update();
        let outcome = hold_lease(&options, turn, &mut instance, &state, &mut weight, &stop).await;
        match outcome {
            Ok((mut client, lease)) => {
                // Stopping: remove the key now rather than after the TTL.
                let cleanup = async {
                    client.delete(key.as_str(), None).await?;
                    client.lease_revoke(lease).await
                };
                match tokio::time::timeout(options.request_timeout, cleanup).await {
                    Ok(Ok(_)) => info!(%key, "deregistered"),
                    _ => warn!(%key, "could not deregister; the key expires with its lease"),
                }
                return;
            }
            Err(reason) => {
                if matches!(*state.borrow(), State::Registered { .. }) {
                    backoff.reset();
                }
                warn!(%key, %reason, "registration lost; retrying with the next member");
                turn = turn.wrapping_add(1);
                state.send_replace(State::Retrying { reason });
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {
                // Stopped while etcd is away: a best-effort delete through
                // the members in turn, bounded.
                let delete = async {
                    for i in 0..options.endpoints.len() {
                        if let Ok(mut client) = options.connect_member(turn.wrapping_add(i)).await {
                            if client.delete(key.as_str(), None).await.is_ok() {
                                return;
                            }
                        }
                    }
                };
                let _ = tokio::time::timeout(options.request_timeout, delete).await;
                return;
            }
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

/// Grants a lease, puts the key, and keeps the lease alive until `stop`
/// (returning the client and lease for cleanup) or until it is lost.
async fn hold_lease(
    options: &EtcdOptions,
    turn: usize,
    instance: &mut Instance,
    state: &watch::Sender<State>,
    weight: &mut watch::Receiver<u32>,
    stop: &CancellationToken,
) -> Result<(Client, i64), String> {
    let ttl_secs = i64::try_from(instance.ttl.as_secs()).unwrap_or(i64::MAX);
    let mut client = options
        .connect_member(turn)
        .await
        .map_err(|e| e.to_string())?;
    let timeout = options.request_timeout;
    let setup = async {
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let put = PutOptions::new().with_lease(lease);
        client
            .put(instance.key(), instance.value(), Some(put))
            .await?;
        let keepalive = client.lease_keep_alive(lease).await?;
        Ok::<_, etcd_client::Error>((lease, keepalive))
    };
    let (lease, (mut keeper, mut responses)) = match tokio::time::timeout(timeout, setup).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => return Err(format!("etcd: {e}")),
        Err(_) => return Err(format!("etcd did not answer within {timeout:?}")),
    };
    info!(key = %instance.key(), lease, "registered");
    state.send_replace(State::Registered { lease });

    // Renew three times per TTL; a lease not renewed for a whole TTL is
    // presumed lost even if no error surfaced.
    let mut renew = tokio::time::interval(instance.ttl / 3);
    let mut last_renewed = tokio::time::Instant::now();
    let mut weight_open = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok((client, lease)),
            changed = weight.changed(), if weight_open => {
                if changed.is_err() {
                    // The handle is gone: keep the registration as it is.
                    weight_open = false;
                    continue;
                }
                instance.weight = *weight.borrow_and_update();
                let put = PutOptions::new().with_lease(lease);
                let written = tokio::time::timeout(
                    timeout,
                    client.put(instance.key(), instance.value(), Some(put)),
                )
                .await;
                match written {
                    Ok(Ok(_)) => info!(key = %instance.key(), weight = instance.weight, "weight changed"),
                    Ok(Err(e)) => return Err(format!("etcd: {e}")),
                    Err(_) => return Err(format!("etcd did not answer within {timeout:?}")),
                }
            }
            _ = renew.tick() => {
                if last_renewed.elapsed() > instance.ttl {
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
        }
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
