//! etcd-mesh Envoy plugin.
//!
//! One `.wasm` plays two roles, chosen by its plugin configuration:
//! - `poller`: loaded once per Envoy as a singleton bootstrap service; it
//!   long-polls sync-server's change feed and writes each changed service
//!   to shared data ([`feed`]), following one sync-server replica and
//!   moving to another when it fails, hangs or turns stale ([`replicas`]);
//! - `router`: the HTTP filter on every worker; it keeps a decoded copy of
//!   the tables and re-reads only the services that changed, and picks the
//!   upstream of each call by smooth weighted round-robin; a call that
//!   comes before the worker's first tables is held until they arrive
//!   ([`hold`]). A full load of the tables (or a large delta) is read in
//!   bounded slices, the calls meanwhile reading the services they need
//!   one by one ([`reload`]).
//!
//! Everything here but [`glue`] is pure logic, built and unit-tested natively.

#![forbid(unsafe_code)]

pub mod config;
pub mod feed;
pub mod filter_state;
pub mod hold;
pub mod naming;
pub mod outlier;
pub mod poll;
pub mod reload;
pub mod replicas;
pub mod tables;

#[cfg(target_arch = "wasm32")]
mod glue;

/// Shared-data key holding the ejection records ([`outlier::Ejections`]).
pub const EJECTIONS_KEY: &str = "etcd-mesh/ejections";
/// Shared-data key holding [`Version`]: workers read these 16 bytes per
/// call, and the tables or ejections only when their part changes.
pub const VERSION_KEY: &str = "etcd-mesh/version";

/// What a worker checks on every call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Version {
    /// The poller's update sequence ([`feed::ChangeLog`]).
    pub tables: u64,
    /// Bumped on every change of [`EJECTIONS_KEY`].
    pub ejections: u64,
}

impl Version {
    pub fn encode(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.tables.to_le_bytes());
        out[8..].copy_from_slice(&self.ejections.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Version> {
        let tables = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let ejections = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Version { tables, ejections })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_and_refuse_short_input() {
        let v = Version {
            tables: 7,
            ejections: u64::MAX,
        };
        assert_eq!(Version::decode(&v.encode()), Some(v));
        assert_eq!(Version::decode(&[1; 15]), None);
        assert_eq!(Version::decode(b""), None);
    }
}
