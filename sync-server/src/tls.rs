//! HTTPS: this module owns reading the PEM files, building the rustls
//! server configuration from them, re-reading them when they change, and
//! the listener that hands axum finished TLS connections.
//!
//! - [`load`] turns [`TlsFiles`] into a `ServerConfig`, or an error that
//!   names the file and what is wrong with it (missing, not PEM, no
//!   certificate in it, no key in it, a key that does not match).
//! - [`Reloader`] checks the files' modification stamps every second and,
//!   when one changed, builds a new configuration for the handshakes that
//!   follow. Connections already made keep theirs, so a held long-poll
//!   survives a rotation; a failed reload keeps the previous configuration
//!   and logs why. The stamps are taken before the files are read, so a
//!   file rewritten while it is read is read again on the next check.
//! - [`TlsListener`] is an [`axum::serve::Listener`], so axum's graceful
//!   shutdown works as on plain TCP: a task accepts TCP connections and
//!   runs each handshake in its own task under [`HANDSHAKE_TIMEOUT`], so a
//!   slow or silent client never holds up the next accept.
//!
//! [`plaintext_token_refusal`] is the start-up rule that a bearer token is
//! not sent in clear text over a network.
//!
//! Only the *ring* provider is used (the one tonic and etcd-client lock);
//! protocol versions are rustls' safe defaults (TLS 1.2 and 1.3).

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::{PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The longest a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the files' stamps are compared for a reload.
pub const RELOAD_CHECK_PERIOD: Duration = Duration::from_secs(1);

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

/// Reads `path` and returns its PEM sections; `what` names the file in
/// errors ("TLS certificate", ...).
fn read_pem(path: &Path, what: &str) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TlsError::new(format!("cannot read the {what} {}: {e}", path.display())))?;
    pem_sections(&bytes)
        .map_err(|why| TlsError::new(format!("the {what} {} {why}", path.display())))
}

/// The PEM sections of `bytes`, or why there are none to use (said after
/// the file's name).
fn pem_sections(bytes: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, String> {
    let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not valid PEM: {e}"))?;
    if sections.is_empty() {
        let encrypted = bytes
            .windows(b"ENCRYPTED PRIVATE KEY".len())
            .any(|w| w == b"ENCRYPTED PRIVATE KEY");
        return Err(if encrypted {
            "holds an encrypted private key: give it unencrypted (`openssl pkey -in <file>`)"
                .to_owned()
        } else if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            "holds no PEM block this server reads (CERTIFICATE or PRIVATE KEY)".to_owned()
        } else {
            "is not PEM (no -----BEGIN ...----- line; DER converts with `openssl x509 -inform der`)"
                .to_owned()
        });
    }
    Ok(sections)
}

/// The PEM labels of `sections`, for "holds no certificate (its PEM
/// blocks: PRIVATE KEY)".
fn kinds(sections: &[(SectionKind, Vec<u8>)]) -> String {
    let labels: Vec<String> = sections
        .iter()
        .map(|(kind, _)| match kind {
            SectionKind::Certificate => "CERTIFICATE".to_owned(),
            SectionKind::PrivateKey => "PRIVATE KEY".to_owned(),
            SectionKind::RsaPrivateKey => "RSA PRIVATE KEY".to_owned(),
            SectionKind::EcPrivateKey => "EC PRIVATE KEY".to_owned(),
            SectionKind::PublicKey => "PUBLIC KEY".to_owned(),
            SectionKind::Csr => "CERTIFICATE REQUEST".to_owned(),
            SectionKind::Crl => "X509 CRL".to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    labels.join(", ")
}

/// Every certificate in the PEM file `path`, in order; at least one.
pub fn read_certificates(
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let sections = read_pem(path, what)?;
    let certificates: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if certificates.is_empty() {
        return Err(TlsError::new(format!(
            "the {what} {} holds no certificate (its PEM blocks: {})",
            path.display(),
            kinds(&sections)
        )));
    }
    Ok(certificates)
}

/// The first private key in the PEM file `path`.
pub fn read_private_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let sections = read_pem(path, what)?;
    sections
        .iter()
        .find_map(|(kind, der)| match kind {
            SectionKind::PrivateKey => Some(PrivateKeyDer::Pkcs8(der.clone().into())),
            SectionKind::RsaPrivateKey => Some(PrivateKeyDer::Pkcs1(der.clone().into())),
            SectionKind::EcPrivateKey => Some(PrivateKeyDer::Sec1(der.clone().into())),
            _ => None,
        })
        .ok_or_else(|| {
            TlsError::new(format!(
                "the {what} {} holds no private key (its PEM blocks: {})",
                path.display(),
                kinds(&sections)
            ))
        })
}

/// The CA certificates of `path` as trust anchors.
fn read_roots(path: &Path, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, certificate) in read_certificates(path, what)?.into_iter().enumerate() {
        roots.add(certificate).map_err(|e| {
            TlsError::new(format!(
                "the {what} {}: certificate {} cannot be a trust anchor: {e}",
                path.display(),
                i + 1
            ))
        })?;
    }
    Ok(roots)
}

/// `chain` and `key` as one signing identity, checking that the key is
/// the leaf certificate's; `what` names the pair in errors ("TLS",
/// "health-check client").
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    (cert_path, key_path): (&Path, &Path),
    what: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        TlsError::new(format!(
            "the {what} key {} cannot be used: {e}",
            key_path.display()
        ))
    })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::new(format!(
                "the {what} key {} does not match the certificate {}: the certificate \
                 was issued for another key (was one replaced without the other?)",
                key_path.display(),
                cert_path.display()
            )))
        }
        Err(e) => Err(TlsError::new(format!(
            "the {what} certificate {} cannot be parsed: {e}",
            cert_path.display()
        ))),
    }
}

/// A client certificate and key checked to belong together, as the PEM
/// bytes they were read from (what tonic's `Identity` takes).
pub fn read_identity(cert: &Path, key: &Path, what: &str) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let chain = read_certificates(cert, &format!("{what} certificate"))?;
    let der = read_private_key(key, &format!("{what} key"))?;
    certified_key(chain, der, (cert, key), what, &provider())?;
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| TlsError::new(format!("cannot read {}: {e}", path.display())))
    };
    Ok((read(cert)?, read(key)?))
}

/// A CA file checked to hold usable trust anchors, as its PEM bytes.
pub fn read_ca(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    read_roots(path, what)?;
    std::fs::read(path)
        .map_err(|e| TlsError::new(format!("cannot read the {what} {}: {e}", path.display())))
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

/// What a file looked like when last checked: any difference means it was
/// rewritten or replaced (a renamed-over file or a swapped symlink, as a
/// Kubernetes secret volume does, changes the inode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    changed: i64,
    changed_nanos: i64,
    len: u64,
    inode: u64,
}

/// Each file's stamp, `None` for one that cannot be examined now.
fn stamps(files: &TlsFiles) -> Vec<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    files
        .paths()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some(Stamp {
                modified: meta.modified().ok(),
                changed: meta.ctime(),
                changed_nanos: meta.ctime_nsec(),
                len: meta.len(),
                inode: meta.ino(),
            })
        })
        .collect()
}

/// Counters of the HTTPS side, rendered into `/metrics` when it is on.
#[derive(Debug, Default)]
pub struct TlsMetrics {
    /// Handshakes that failed or timed out (a client without the right
    /// certificate, a plain-HTTP client, a scanner).
    pub handshake_failures: AtomicU64,
    /// Times the files changed and were taken.
    pub reloads: AtomicU64,
    /// Times the files changed and could not be used (the previous
    /// configuration was kept).
    pub reload_failures: AtomicU64,
}

impl TlsMetrics {
    /// Appends the TLS rows in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let rows = [
            (
                "sync_server_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out",
                &self.handshake_failures,
            ),
            (
                "sync_server_tls_reloads_total",
                "times the TLS files changed and were taken for new connections",
                &self.reloads,
            ),
            (
                "sync_server_tls_reload_failures_total",
                "times the TLS files changed but could not be used (the previous ones are kept)",
                &self.reload_failures,
            ),
        ];
        for (name, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
    }
}

/// Keeps the configuration for new handshakes in step with the files.
#[derive(Debug)]
pub struct Reloader {
    files: TlsFiles,
    seen: Vec<Option<Stamp>>,
    current: watch::Sender<Arc<ServerConfig>>,
    metrics: Arc<TlsMetrics>,
}

impl Reloader {
    /// Loads `files` once (failing as [`load`] does) and returns the
    /// reloader and the receiver of the configuration to handshake with.
    pub fn start(
        files: TlsFiles,
        metrics: Arc<TlsMetrics>,
    ) -> Result<(Reloader, watch::Receiver<Arc<ServerConfig>>), TlsError> {
        // Stamps first: a change made while the files are read is seen.
        let seen = stamps(&files);
        let config = load(&files)?;
        let (current, receiver) = watch::channel(config);
        Ok((
            Reloader {
                files,
                seen,
                current,
                metrics,
            },
            receiver,
        ))
    }

    /// Checks the files every `period` until `shutdown`.
    pub async fn run(mut self, period: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = shutdown.cancelled() => return,
            }
            self.check();
        }
    }

    /// Reloads if any file changed since the last check.
    fn check(&mut self) {
        let now = stamps(&self.files);
        if now == self.seen {
            return;
        }
        self.seen = now;
        match load(&self.files) {
            Ok(config) => {
                self.current.send_replace(config);
                self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS files changed: new connections use them"
                );
            }
            Err(error) => {
                self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    %error,
                    "TLS files changed but cannot be used; new connections keep the previous certificate"
                );
            }
        }
    }
}

/// A listener of finished TLS connections for `axum::serve`.
#[derive(Debug)]
pub struct TlsListener {
    handshaken: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Accepts on `tcp`, handshaking with whatever `configs` holds when
    /// each connection arrives.
    pub fn new(
        tcp: TcpListener,
        configs: watch::Receiver<Arc<ServerConfig>>,
        metrics: Arc<TlsMetrics>,
    ) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        // Small: a handshaken connection waits only for axum's next accept.
        let (out, handshaken) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(tcp, configs, out, metrics));
        Ok(TlsListener {
            handshaken,
            local,
            accepting,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Closes the port: axum dropped the listener at shutdown.
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(connection) => connection,
            // The accept task ended (only if it panicked): accept nothing
            // more rather than spin.
            None => {
                tracing::error!("the TLS accept task ended: no new connection is accepted");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    tcp: TcpListener,
    configs: watch::Receiver<Arc<ServerConfig>>,
    out: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    metrics: Arc<TlsMetrics>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_error(error).await;
                    continue;
                }
            },
            () = out.closed() => return,
        };
        // Small answers go out at once rather than wait for an ACK.
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(Arc::clone(&configs.borrow()));
        let out = out.clone();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // Fails only when the server is shutting down.
                    let _ = out.send((tls, peer)).await;
                }
                Ok(Err(error)) => {
                    metrics.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    // Debug: any scanner can make these.
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                }
                Err(_) => {
                    metrics.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        });
    }
}

/// As axum does for plain TCP: a connection that failed before it was
/// accepted is nobody's concern; anything else (out of file descriptors)
/// is logged and retried after a pause, not spun on.
async fn accept_error(error: io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "cannot accept a connection; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
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

    #[test]
    fn pem_problems_are_named() {
        let not_pem = pem_sections(b"\x30\x82\x01\x0a binary DER").expect_err("DER");
        assert!(not_pem.starts_with("is not PEM"), "{not_pem}");
        let encrypted = pem_sections(
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .expect_err("encrypted");
        assert!(encrypted.contains("encrypted private key"), "{encrypted}");
        let cut = pem_sections(b"-----BEGIN CERTIFICATE-----\nAAAA\n").expect_err("cut short");
        assert!(cut.starts_with("is not valid PEM"), "{cut}");
        let sections =
            pem_sections(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .expect("one block");
        assert_eq!(kinds(&sections), "CERTIFICATE");
    }
}
