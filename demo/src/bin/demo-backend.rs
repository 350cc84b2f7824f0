//! A `demo.Echo` backend that keeps itself registered in etcd.
//! On SIGTERM or Ctrl-C it deregisters first, then stops serving.

use clap::Parser;
use etcd_mesh_demo::{backend, DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_registration::{Instance, Registration};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Serves demo.Echo and registers it in etcd (etcd-naming format).
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    /// etcd members, comma-separated host:port.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    etcd: Vec<String>,
    /// Where to serve gRPC (an ip:port others can reach: it is registered).
    #[arg(long)]
    listen: SocketAddr,
    /// The registered weight, 0..=10000.
    #[arg(long, default_value_t = 1)]
    weight: u32,
    /// The registry name of the service.
    #[arg(long, default_value = DEMO_SERVICE)]
    service: String,
    /// The etcd prefix of registrations.
    #[arg(long, default_value = DEMO_PREFIX)]
    prefix: String,
    /// The lease TTL in seconds.
    #[arg(long, default_value_t = 10)]
    ttl: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    let addr = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    let server = tokio::spawn(backend::serve(listener, stop.clone()));
    let instance = Instance::new(&cli.prefix, &cli.service, &addr)
        .with_weight(cli.weight)
        .with_ttl(Duration::from_secs(cli.ttl));
    let registration = Registration::start(cli.etcd, instance)?;

    etcd_mesh_demo::wait_for_stop_signal().await;
    registration.deregister().await;
    stop.cancel();
    server.await??;
    Ok(())
}
