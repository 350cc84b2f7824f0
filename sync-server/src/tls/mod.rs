//! HTTPS: serving the feed over TLS with certificate files that may be
//! replaced while the server runs.
//!
//! - [`load`] turns [`TlsFiles`] into a `ServerConfig`, or an error that
//!   names the file and what is wrong with it (missing, not PEM, no
//!   certificate in it, no key in it, a key that does not match); reading
//!   and checking the PEM files is `pem` (also used for the health
//!   checks' client certificate and CA).
//! - [`Reloader`] (`reload`) re-reads the files when they change, for the
//!   handshakes that follow.
//! - [`TlsListener`] (`listener`) hands axum finished TLS connections.
//!
//! [`plaintext_token_refusal`] is the start-up rule that a bearer token is
//! not sent in clear text over a network.
//!
//! Only the *ring* provider is used (the one tonic and etcd-client lock);
//! protocol versions are rustls' safe defaults (TLS 1.2 and 1.3).

mod listener;
mod pem;
mod reload;

pub use listener::{TlsListener, HANDSHAKE_TIMEOUT};
pub use pem::{read_ca, read_certificates, read_identity, read_private_key};
pub use reload::{Reloader, RELOAD_CHECK_PERIOD};

use pem::{certified_key, read_roots};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::SingleCertAndKey;
use rustls::ServerConfig;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The PEM files HTTPS is served with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1; not encrypted).
    pub key: PathBuf,
    /// When given, every client must present a certificate signed by one
    /// of the CAs in this file (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [
            Some(self.cert.as_path()),
            Some(self.key.as_path()),
            self.client_ca.as_deref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// A TLS file that cannot be used; the message names the file and what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

impl TlsError {
    fn new(message: impl Into<String>) -> Self {
        TlsError(message.into())
    }
}

impl From<TlsError> for io::Error {
    fn from(error: TlsError) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, error.0)
    }
}

/// The one crypto provider, named rather than taken from process defaults,
/// so another library installing a default cannot change it.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration from `files`.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain = read_certificates(&files.cert, "TLS certificate")?;
    let key = read_private_key(&files.key, "TLS key")?;
    let certified = certified_key(chain, key, (&files.cert, &files.key), "TLS", &provider)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            TlsError::new(format!(
                "the TLS provider has no safe protocol version: {e}"
            ))
        })?;
    let builder = match &files.client_ca {
        Some(path) => {
            let roots = read_roots(path, "TLS client CA")?;
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| {
                        TlsError::new(format!(
                            "the TLS client CA {} cannot verify clients: {e}",
                            path.display()
                        ))
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    // Only HTTP/1.1 is served: a client offering h2 too (curl) is told so
    // in the handshake rather than left to guess.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why listening on `listen` with a bearer token and without TLS is
/// refused, or `None` when it is allowed: on loopback the token never
/// leaves the machine; anywhere else it would cross the network in clear
/// text with every poll, and the endpoint tables with it.
pub fn plaintext_token_refusal(
    listen: SocketAddr,
    token: bool,
    tls: bool,
    insecure_plaintext: bool,
) -> Option<String> {
    if !token || tls || insecure_plaintext || listen.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "refusing to serve --token-file over plain HTTP on {listen}: that is not a loopback \
         address, so the bearer token (sent with every poll) and the endpoint tables would \
         cross the network in clear text. Serve HTTPS with --tls-cert FILE --tls-key FILE \
         (and --tls-client-ca FILE to require client certificates; see docs/tls.md), listen \
         on loopback, or pass --insecure-plaintext to accept the risk"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_on_a_network_address_needs_tls_or_the_override() {
        let any: SocketAddr = "0.0.0.0:8090".parse().expect("addr");
        let lan: SocketAddr = "10.0.0.5:8090".parse().expect("addr");
        let loopback: SocketAddr = "127.0.0.1:8090".parse().expect("addr");
        let loopback6: SocketAddr = "[::1]:8090".parse().expect("addr");
        for listen in [any, lan] {
            let refused = plaintext_token_refusal(listen, true, false, false).expect("refused");
            assert!(
                refused.contains("--tls-cert FILE --tls-key FILE"),
                "{refused}"
            );
            assert!(refused.contains("--insecure-plaintext"), "{refused}");
            assert!(refused.contains(&listen.to_string()), "{refused}");
            assert_eq!(plaintext_token_refusal(listen, true, true, false), None);
            assert_eq!(plaintext_token_refusal(listen, true, false, true), None);
            assert_eq!(plaintext_token_refusal(listen, false, false, false), None);
        }
        for listen in [loopback, loopback6] {
            assert_eq!(plaintext_token_refusal(listen, true, false, false), None);
        }
    }
}
