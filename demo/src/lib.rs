//! The demo side of etcd-mesh: a tonic `demo.Echo` backend that registers
//! itself in etcd, and a client that counts which backend served each call.
//! The loopback test kit that starts etcd and Envoy for `make run` and the
//! end-to-end tests is `etcd-mesh-testkit`; use it directly.

#![forbid(unsafe_code)]

pub mod backend;
pub mod client;

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
