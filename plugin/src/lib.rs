//! etcd-mesh Envoy plugin.
//!
//! One `.wasm` plays two roles, chosen by its plugin configuration:
//! - `poller`: loaded once per Envoy as a singleton bootstrap service; it
//!   long-polls sync-server and writes each newer snapshot to shared data;
//! - `router`: the HTTP filter on every worker; it keeps a decoded copy of
//!   the tables, refreshed only when their revision changes, and picks the
//!   upstream of each call by smooth weighted round-robin.
//!
//! Everything here but [`glue`] is pure logic, built and unit-tested natively.

#![forbid(unsafe_code)]

pub mod config;
pub mod filter_state;
pub mod naming;
pub mod poll;
pub mod rng;
pub mod tables;
pub mod wrr;

#[cfg(target_arch = "wasm32")]
mod glue;

/// Shared-data key holding the newest snapshot body the poller accepted.
pub const TABLES_KEY: &str = "etcd-mesh/tables";
/// Shared-data key holding that snapshot's revision (u64, little endian),
/// written after the tables: workers read these 8 bytes per call, and the
/// whole table only when they change.
pub const REVISION_KEY: &str = "etcd-mesh/revision";
