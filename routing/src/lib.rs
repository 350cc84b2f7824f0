//! The routing core of etcd-mesh: how one call's endpoint is chosen.
//!
//! It is pure logic with no host calls, so the same code runs in two
//! places: inside Envoy, where the plugin feeds it the tables from shared
//! data, and in the browser, where the console shows the picks it makes.
//! What the console shows as the next picks is what the plugin does.

#![forbid(unsafe_code)]

pub mod balancer;
pub mod policy;
pub mod rng;
pub mod wrr;

pub use balancer::Balancer;
pub use policy::{Policy, SlowStart, ZoneRouting};

use etcd_mesh_wire::Service;

/// The next `count` picks the plugin's picker makes for `service` at
/// `now_ms` (Unix ms), from where an unshuffled picker starts. Each Envoy
/// worker starts at its own random point of this same sequence.
pub fn preview_picks(service: &Service, policy: &Policy, now_ms: u64, count: usize) -> Vec<String> {
    let mut balancer = Balancer::new(service, policy, now_ms);
    (0..count)
        .map_while(|_| balancer.pick().map(str::to_owned))
        .collect()
}
