//! The sync-server binary: command line and signals; the rest is the library.

use clap::Parser;
use std::net::SocketAddr;
use sync_server::etcd::EtcdOptions;
use sync_server::format::WatchSpec;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Watches service registrations in etcd and serves them to Envoy as
/// versioned endpoint snapshots (GET /v1/snapshot, with long-poll).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// etcd members, host:port or URLs, comma-separated.
    #[arg(long, env = "SYNC_SERVER_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,

    /// Where to serve HTTP.
    #[arg(long, env = "SYNC_SERVER_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,

    /// A prefix to watch and its format, as <format>=<prefix>; formats:
    /// etcd-naming, openim-v2. Repeat for several prefixes.
    #[arg(long = "watch", env = "SYNC_SERVER_WATCH", required = true)]
    watches: Vec<WatchSpec>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cli.listen))?;
    info!(listen = %listener.local_addr()?, etcd = ?cli.etcd, "sync-server starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let config = sync_server::Config {
        etcd: EtcdOptions::new(cli.etcd),
        watches: cli.watches,
    };
    sync_server::run(config, listener, shutdown).await?;
    info!("sync-server stopped");
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
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
    shutdown.cancel();
}
