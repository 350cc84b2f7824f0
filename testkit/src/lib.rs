//! The loopback test kit of etcd-mesh: real etcd (one member or a cluster,
//! with or without TLS), Envoy with the plugin, any other process, a
//! minimal HTTP GET, free ports and waits with deadlines. Used by
//! `make run`, the end-to-end tests, the sync-server and registration
//! tests and `make bench`; it carries no gRPC code, so those test builds
//! need neither tonic nor protoc.
//!
//! Every process is killed when its handle is dropped, so a failing test
//! leaves nothing behind; every wait is a poll with a deadline.

#![forbid(unsafe_code)]

mod envoy;
mod etcd;
mod http;
mod netns;
mod process;

pub use envoy::*;
pub use etcd::*;
pub use http::*;
pub use netns::*;
pub use process::*;

use std::future::Future;
use std::io;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A loopback port nobody listens on right now, for a process to bind.
///
/// Picked at random below the kernel's ephemeral range: outgoing
/// connections (health checks, gRPC clients, Envoy's upstreams) take their
/// local ports from that range, so one could take a port handed out by
/// `bind(0)` before the process that was meant to bind it does.
pub fn free_port() -> io::Result<u16> {
    const FLOOR: u16 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > FLOOR + 1_000 {
        let span = u64::from(ephemeral_low - FLOOR);
        for _ in 0..64 {
            let port = FLOOR + u16::try_from(fastrand::u64(..span)).unwrap_or(0);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Fails with a message naming `what` if `127.0.0.1:port` is taken.
pub fn ensure_free(port: u16, what: &str) -> Result<(), String> {
    TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| format!("127.0.0.1:{port} ({what}) is not free: {e}"))
}

/// Polls `probe` every 20 ms until it gives a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
