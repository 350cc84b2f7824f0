//! The snapshot being served, and the signal long-polls wait on.
//!
//! The etcd loop publishes; HTTP handlers read. Each published snapshot is
//! encoded once and its bytes are shared by every response that sends it.

use axum::body::Bytes;
use etcd_mesh_wire::Snapshot;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// One snapshot, ready to serve.
#[derive(Debug)]
pub struct Published {
    pub snapshot: Snapshot,
    /// The encoded JSON body, shared by every response that sends it: a
    /// thousand long-polls answered at once hold one copy, not a thousand.
    pub body: Bytes,
    /// `"<revision>"`, the ETag.
    pub etag: String,
}

impl Published {
    pub fn new(snapshot: Snapshot) -> Self {
        Published {
            body: snapshot.encode().into(),
            etag: format!("\"{}\"", snapshot.revision),
            snapshot,
        }
    }

    pub fn revision(&self) -> u64 {
        self.snapshot.revision
    }
}

/// Shared between the etcd loop and the HTTP side. `None` until the first
/// full sync or a loaded snapshot file: `/v1/snapshot` answers 503 until then.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: Arc<watch::Sender<Option<Arc<Published>>>>,
    /// Set by the first full listing from etcd (a snapshot loaded from file
    /// is served, but does not make the server ready).
    synced: Arc<AtomicBool>,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

impl Publisher {
    pub fn new() -> Self {
        Publisher {
            tx: Arc::new(watch::channel(None).0),
            synced: Arc::default(),
        }
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.tx
            .send_replace(Some(Arc::new(Published::new(snapshot))));
    }

    /// Marks the held snapshot stale (etcd unreachable), keeping its content.
    pub fn mark_stale(&self) {
        let current = self.current();
        if let Some(current) = current.filter(|c| !c.snapshot.stale) {
            let mut snapshot = current.snapshot.clone();
            snapshot.stale = true;
            self.publish(snapshot);
        }
    }

    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// Whether a full listing from etcd has been published.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn current(&self) -> Option<Arc<Published>> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.tx.subscribe()
    }
}
