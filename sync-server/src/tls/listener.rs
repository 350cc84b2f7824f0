//! The listener that hands axum finished TLS connections.
//!
//! [`TlsListener`] is an [`axum::serve::Listener`], so axum's graceful
//! shutdown works as on plain TCP: a task accepts TCP connections and
//! runs each handshake in its own task under [`HANDSHAKE_TIMEOUT`], so a
//! slow or silent client never holds up the next accept. Each handshake
//! uses the configuration the [`super::Reloader`] holds when the
//! connection arrives.

use crate::metrics::TlsMetrics;
use rustls::ServerConfig;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The longest a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
