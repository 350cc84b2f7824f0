//! The demo side of etcd-mesh: a tonic `demo.Echo` backend that registers
//! itself in etcd, a client that counts which backend served each call, and
//! [`stack`], the loopback test kit (`etcd-mesh-testkit`) that starts etcd
//! and Envoy for `make run` and the end-to-end tests.

#![forbid(unsafe_code)]

pub mod backend;
pub mod client;
pub use etcd_mesh_testkit as stack;

/// The generated `demo` protobuf and gRPC code.
pub mod proto {
    tonic::include_proto!("demo");
}

/// The etcd prefix the demo registers under (etcd-naming format).
pub const DEMO_PREFIX: &str = "etcd-mesh/";
/// The gRPC service name of the demo.
pub const DEMO_SERVICE: &str = "demo.Echo";

/// Waits for SIGTERM or Ctrl-C.
pub async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
