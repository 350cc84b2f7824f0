//! `--snapshot-file`: the last good snapshot on disk, so that a sync-server
//! restarted while etcd is down serves the last known endpoints (marked
//! stale) instead of nothing.
//!
//! Writes go to a temporary file in the same directory and are renamed over
//! the old one: a crash mid-write leaves the previous file whole.

use crate::publish::Publisher;
use etcd_mesh_wire::Snapshot;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Reads a snapshot file; `None` (logged) if it is missing or unusable.
pub fn load(path: &Path) -> Option<Snapshot> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read the snapshot file; starting empty");
            return None;
        }
    };
    match Snapshot::decode(&bytes) {
        Ok(mut snapshot) => {
            snapshot.stale = true;
            info!(path = %path.display(), revision = snapshot.revision, "loaded the last snapshot from file (stale until etcd answers)");
            Some(snapshot)
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring an unusable snapshot file");
            None
        }
    }
}

/// Replaces `path` with `bytes` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path)?;
    let result = (|| {
        tmp.1.write_all(bytes)?;
        tmp.1.sync_all()?;
        std::fs::rename(&tmp.0, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp.0);
    }
    result
}

fn tempfile_in(dir: &Path, path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let file = std::fs::File::create(&tmp)?;
    Ok((tmp, file))
}

/// Writes every new non-stale snapshot to `path` until `shutdown`. Bursts
/// coalesce: a write always takes the newest snapshot.
pub async fn persist(publisher: Publisher, path: PathBuf, shutdown: CancellationToken) {
    let mut changes = publisher.subscribe();
    let mut written = None;
    loop {
        let current = changes.borrow_and_update().clone();
        if let Some(current) = current.filter(|c| !c.stale && Some(c.revision()) != written) {
            let (target, body) = (path.clone(), current.snapshot_body());
            let result = tokio::task::spawn_blocking(move || write_atomic(&target, &body)).await;
            match result {
                Ok(Ok(())) => written = Some(current.revision()),
                Ok(Err(e)) => {
                    warn!(path = %path.display(), error = %e, "cannot write the snapshot file")
                }
                Err(e) => warn!(error = %e, "snapshot file writer failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("snapshot.json");
        assert_eq!(load(&path), None);
        let snapshot = Snapshot {
            revision: 9,
            ..Snapshot::default()
        };
        write_atomic(&path, &snapshot.encode()).expect("written");
        let loaded = load(&path).expect("loads");
        assert_eq!((loaded.revision, loaded.stale), (9, true));
        std::fs::write(&path, b"{half a snap").expect("written");
        assert_eq!(load(&path), None);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
