//! One health check: a `grpc.health.v1.Health/Check` call over a tonic
//! [`Channel`], and what its answer means ([`Observation`]); the channel
//! itself, plain or TLS ([`HealthTls`]).
//!
//! An answer is one of:
//!
//! - `SERVING`;
//! - `NOT_SERVING`: the application asks to be drained;
//! - a failure: no connection, any RPC error (`UNIMPLEMENTED`, `NOT_FOUND`
//!   for an unknown service name, ...), the timeout, or the status
//!   `UNKNOWN` / `SERVICE_UNKNOWN` (or one this code does not know).
//!
//! A channel connects lazily, on its first check; the connect timeout is
//! the check timeout, and the whole check (connect and RPC) is bounded by
//! it too. With [`HealthTls`] the channels speak TLS (the endpoints'
//! certificates checked against its CA, optionally presenting a client
//! certificate); its files are read once, at start.

use super::Observation;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// TLS to the checked endpoints, as PEM bytes (read and checked at start).
#[derive(Debug, Clone)]
pub struct HealthTls {
    /// The CA(s) the endpoints' certificates must chain to.
    pub ca_pem: Vec<u8>,
    /// A client certificate and key, for endpoints that require one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name every endpoint's certificate is checked against; when
    /// `None`, the endpoint's own address (its certificate then needs that
    /// IP address as a subject alternative name).
    pub domain: Option<String>,
}

impl HealthTls {
    pub(super) fn client_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// A channel that connects on first use, over TLS when `tls` is given;
/// `None` if `addr` is no URI authority (every check of it then fails).
pub(super) fn connect_lazy(
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Option<Channel> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).and_then(|endpoint| match tls {
            Some(tls) => endpoint.tls_config(tls.clone()),
            None => Ok(endpoint),
        });
    match endpoint {
        Ok(endpoint) => Some(
            endpoint
                .connect_timeout(timeout)
                .timeout(timeout)
                .tcp_nodelay(true)
                .connect_lazy(),
        ),
        Err(error) => {
            // Debug: it recurs every interval; the registry validates addresses.
            tracing::debug!(%addr, %error, "cannot health-check this address");
            None
        }
    }
}

/// One check: asks for `service`'s health over `channel`, connect and RPC
/// together within `timeout`.
pub(super) async fn check(channel: Channel, service: String, timeout: Duration) -> Observation {
    let mut client = HealthClient::new(channel);
    let answer = tokio::time::timeout(timeout, client.check(HealthCheckRequest { service })).await;
    match answer {
        Ok(Ok(response)) => match ServingStatus::try_from(response.get_ref().status) {
            Ok(ServingStatus::Serving) => Observation::Serving,
            Ok(ServingStatus::NotServing) => Observation::NotServing,
            Ok(ServingStatus::Unknown | ServingStatus::ServiceUnknown) | Err(_) => {
                Observation::Failed
            }
        },
        Ok(Err(status)) => {
            tracing::debug!(code = ?status.code(), message = status.message(), "health check failed");
            Observation::Failed
        }
        Err(_) => Observation::Failed,
    }
}
