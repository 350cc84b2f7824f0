//! What a watch configuration covers in etcd: each prefix's key range, the
//! one range that covers them all (watched by one watcher, so events come
//! in revision order), and the epoch that names what the revisions read
//! through them belong to.
//!
//! An epoch is the etcd cluster and the watch configuration: the same
//! revision of another cluster, or read through other prefixes, is other
//! content. Every replica over the same cluster and `--watch` flags has the
//! same epoch, so a client can move between them and keep its deltas
//! ([`crate::publish`]). Pure functions, no I/O.

use crate::format::WatchSpec;

/// The end of the key range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes (or empty): every key from the prefix on.
    vec![0]
}

/// Names what revisions belong to: the etcd cluster and the watch
/// configuration (the same revision of another cluster, or read through
/// other prefixes, is other content).
pub fn epoch(cluster_id: u64, specs: &[WatchSpec]) -> String {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = specs
        .iter()
        .flat_map(|s| [s.format.name(), "=", &s.prefix, "\n"])
        .flat_map(str::bytes)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(PRIME)
        });
    format!("{cluster_id:016x}-{:08x}", hash as u32)
}

/// The smallest key range holding every spec's prefix.
pub fn covering_range(specs: &[WatchSpec]) -> (Vec<u8>, Vec<u8>) {
    let start = specs
        .iter()
        .map(|s| s.prefix.as_bytes().to_vec())
        .min()
        .unwrap_or_default();
    let ends: Vec<Vec<u8>> = specs
        .iter()
        .map(|s| prefix_end(s.prefix.as_bytes()))
        .collect();
    // `[0]` means "to the end of the keyspace" and beats every other end.
    let end = if ends.iter().any(|e| e == &[0]) {
        vec![0]
    } else {
        ends.into_iter().max().unwrap_or_default()
    };
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(list: &[&str]) -> Vec<WatchSpec> {
        list.iter().map(|s| s.parse().expect("spec")).collect()
    }

    #[test]
    fn one_range_covers_every_prefix() {
        let (start, end) = covering_range(&specs(&["etcd-naming=openim/", "openim-v2=openim:///"]));
        assert_eq!(
            (start.as_slice(), end.as_slice()),
            (&b"openim/"[..], &b"openim://0"[..])
        );
        let (start, end) = covering_range(&specs(&["etcd-naming=b/", "etcd-naming=a/"]));
        assert_eq!((start.as_slice(), end.as_slice()), (&b"a/"[..], &b"b0"[..]));
    }

    #[test]
    fn epochs_name_the_cluster_and_the_prefixes() {
        let a = specs(&["etcd-naming=a/"]);
        assert_eq!(epoch(1, &a), epoch(1, &a));
        assert_ne!(epoch(1, &a), epoch(2, &a));
        assert_ne!(epoch(1, &a), epoch(1, &specs(&["openim-v2=a/"])));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"svc/"), b"svc0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }
}
