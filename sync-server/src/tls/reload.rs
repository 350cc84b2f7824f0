//! Keeping the HTTPS configuration in step with its files.
//!
//! [`Reloader`] checks the files' modification stamps every second and,
//! when one changed, builds a new configuration for the handshakes that
//! follow. Connections already made keep theirs, so a held long-poll
//! survives a rotation; a failed reload keeps the previous configuration
//! and logs why. The stamps are taken before the files are read, so a
//! file rewritten while it is read is read again on the next check.

use super::{load, TlsError, TlsFiles};
use crate::metrics::TlsMetrics;
use rustls::ServerConfig;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the files' stamps are compared for a reload.
pub const RELOAD_CHECK_PERIOD: Duration = Duration::from_secs(1);

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
