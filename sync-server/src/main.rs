//! The sync-server binary: command line and signals; the rest is the library.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use sync_server::etcd::{EtcdOptions, EtcdTls};
use sync_server::format::WatchSpec;
use sync_server::health::{CheckName, HealthConfig, HealthTls};
use sync_server::tls::TlsFiles;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Watches service registrations in etcd and serves them to Envoy as
/// versioned endpoint snapshots (GET /v1/snapshot, with long-poll).
///
/// Every option can also be given by the environment variable shown.
/// Logs go to stderr; RUST_LOG sets the level (default info).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// etcd members, host:port or URLs, comma-separated.
    #[arg(long, env = "SYNC_SERVER_ETCD", value_delimiter = ',', required = true)]
    etcd: Vec<String>,

    /// A prefix to watch and its format, as <format>=<prefix>; formats:
    /// etcd-naming, openim-v2. Options after the prefix: `,zone=<zone>`
    /// (for registrations that name none) and `,health=off` (not
    /// health-checked). Repeat for several prefixes (in the environment
    /// variable, separate them with spaces).
    #[arg(
        long = "watch",
        env = "SYNC_SERVER_WATCH",
        value_delimiter = ' ',
        required = true
    )]
    watches: Vec<WatchSpec>,

    /// Where to serve HTTP (HTTPS with --tls-cert). Loopback unless told
    /// otherwise.
    #[arg(long, env = "SYNC_SERVER_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,

    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs
    /// --tls-key. Re-read when it changes: new connections get the new
    /// one, held long-polls stay.
    #[arg(long, env = "SYNC_SERVER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM, unencrypted) of --tls-cert; re-read with it.
    #[arg(long, env = "SYNC_SERVER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Require a client certificate signed by a CA in this file (PEM)
    /// from every HTTPS client (mutual TLS); the bearer token, if any, is
    /// still required beside it. Re-read when it changes.
    #[arg(long, env = "SYNC_SERVER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Allow --token-file over plain HTTP on a non-loopback --listen
    /// address (refused otherwise: the token would cross the network in
    /// clear text).
    #[arg(long, env = "SYNC_SERVER_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,

    /// Keep the last good snapshot in this file, and serve it (as stale)
    /// after a restart until etcd answers.
    #[arg(long, env = "SYNC_SERVER_SNAPSHOT_FILE")]
    snapshot_file: Option<PathBuf>,

    /// Require `Authorization: Bearer <token>` on /v1/* and /metrics, the
    /// token being this file's content (trimmed).
    #[arg(long, env = "SYNC_SERVER_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// CA certificate (PEM) to verify etcd with; turns on TLS to etcd.
    #[arg(long, env = "SYNC_SERVER_ETCD_CA")]
    etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd; needs --etcd-key.
    #[arg(
        long,
        env = "SYNC_SERVER_ETCD_CERT",
        requires = "etcd_key",
        requires = "etcd_ca"
    )]
    etcd_cert: Option<PathBuf>,

    /// Client key (PEM) for etcd; needs --etcd-cert.
    #[arg(long, env = "SYNC_SERVER_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,

    /// The name etcd's certificate is checked against, if not the host.
    #[arg(long, env = "SYNC_SERVER_ETCD_DOMAIN", requires = "etcd_ca")]
    etcd_domain: Option<String>,

    /// etcd user (with --etcd-password-file).
    #[arg(long, env = "SYNC_SERVER_ETCD_USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,

    /// File holding the etcd user's password.
    #[arg(long, env = "SYNC_SERVER_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,

    /// Revisions of change history kept for /v1/changes; a client further
    /// behind gets the full tables.
    #[arg(long, env = "SYNC_SERVER_HISTORY_CHANGES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    history_changes: u64,

    /// The most bytes that change history may take.
    #[arg(long, env = "SYNC_SERVER_HISTORY_BYTES", default_value_t = 64 << 20)]
    history_bytes: usize,

    /// The most long-polls held at once; more are answered 503 with
    /// Retry-After.
    #[arg(long, env = "SYNC_SERVER_MAX_LONG_POLLS", default_value_t = sync_server::http::DEFAULT_MAX_LONG_POLLS)]
    max_long_polls: usize,

    /// Check every endpoint with grpc.health.v1.Health/Check; results go
    /// out as each endpoint's `health` (unhealthy endpoints take no calls).
    #[arg(long, env = "SYNC_SERVER_HEALTH_CHECKS")]
    health_checks: bool,

    /// Between two checks of one endpoint (jittered by up to 10%).
    #[arg(long, env = "SYNC_SERVER_HEALTH_INTERVAL", default_value = "5s", value_parser = duration)]
    health_interval: Duration,

    /// The most one check may take, connecting included.
    #[arg(long, env = "SYNC_SERVER_HEALTH_TIMEOUT", default_value = "1s", value_parser = duration)]
    health_timeout: Duration,

    /// Failed checks in a row that make an endpoint unhealthy.
    #[arg(long, env = "SYNC_SERVER_HEALTH_UNHEALTHY_THRESHOLD", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    health_unhealthy_threshold: u32,

    /// Passed checks in a row that make an unhealthy endpoint healthy.
    #[arg(long, env = "SYNC_SERVER_HEALTH_HEALTHY_THRESHOLD", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    health_healthy_threshold: u32,

    /// Checks in flight at once, over all endpoints.
    #[arg(long, env = "SYNC_SERVER_HEALTH_MAX_CONCURRENT", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..))]
    health_max_concurrent: u64,

    /// Connections kept to endpoints between checks; beyond it each check
    /// connects anew (mind `ulimit -n`).
    #[arg(long, env = "SYNC_SERVER_HEALTH_MAX_CONNECTIONS",
          default_value_t = sync_server::health::DEFAULT_MAX_CONNECTIONS as u64)]
    health_max_connections: u64,

    /// The service named in each check: `registry` (the registry name of
    /// the endpoint's service), `empty` (the server as a whole), or
    /// `name:<grpc service>`.
    #[arg(long, env = "SYNC_SERVER_HEALTH_SERVICE", default_value = "registry", value_parser = check_name)]
    health_service: CheckName,

    /// Health checks speak TLS, checking each endpoint's certificate
    /// against the CA(s) in this file (PEM).
    #[arg(long, env = "SYNC_SERVER_HEALTH_TLS_CA")]
    health_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) the health checks present; needs
    /// --health-tls-key and --health-tls-ca.
    #[arg(
        long,
        env = "SYNC_SERVER_HEALTH_TLS_CERT",
        requires = "health_tls_key",
        requires = "health_tls_ca"
    )]
    health_tls_cert: Option<PathBuf>,

    /// Client key (PEM) of --health-tls-cert.
    #[arg(long, env = "SYNC_SERVER_HEALTH_TLS_KEY", requires = "health_tls_cert")]
    health_tls_key: Option<PathBuf>,

    /// The name every endpoint's certificate is checked against, if not
    /// the endpoint's IP address.
    #[arg(
        long,
        env = "SYNC_SERVER_HEALTH_TLS_DOMAIN",
        requires = "health_tls_ca"
    )]
    health_tls_domain: Option<String>,

    /// Serve the browser console at /ui/ from this directory (what
    /// scripts/build-console.sh makes: console/dist) instead of the files
    /// embedded at build time.
    #[arg(long, env = "SYNC_SERVER_UI_DIR")]
    ui_dir: Option<PathBuf>,

    /// How long connecting to one etcd member may take (TCP, TLS, auth,
    /// a first answer); then the next member is tried.
    #[arg(long, env = "SYNC_SERVER_CONNECT_TIMEOUT", default_value = "2s", value_parser = duration)]
    connect_timeout: Duration,

    /// The deadline of each etcd request (a listing page).
    #[arg(long, env = "SYNC_SERVER_REQUEST_TIMEOUT", default_value = "5s", value_parser = duration)]
    request_timeout: Duration,

    /// With no proof of contact with the etcd majority (a quorum read
    /// answered) for this long, what is served is marked `"stale": true`.
    #[arg(long, env = "SYNC_SERVER_FRESHNESS_TIMEOUT", default_value = "5s", value_parser = duration)]
    freshness_timeout: Duration,

    /// How long an endpoint that came (or recovered) while this process
    /// ran keeps its `serving_since_ms`, which the plugin's slow start
    /// ramps from: at least the longest `slow_start.window_ms` of your
    /// Envoys. Then it is dropped, so that replicas, and this process
    /// restarted, serve the same tables, and an Envoy moving between them
    /// is continued with a delta instead of a full load.
    #[arg(long, env = "SYNC_SERVER_STAMP_HORIZON", default_value = "10m", value_parser = duration)]
    stamp_horizon: Duration,
}

/// `500ms`, `2s` or `1m`.
fn duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (ms, s or m)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        _ => {
            return Err(format!(
                "{text:?} has the unit {unit:?}; expected ms, s or m"
            ))
        }
    };
    if duration.is_zero() {
        return Err(format!("{text:?} is zero"));
    }
    Ok(duration)
}

fn check_name(text: &str) -> Result<CheckName, String> {
    match text {
        "registry" => Ok(CheckName::Registry),
        "empty" => Ok(CheckName::Empty),
        _ => match text.strip_prefix("name:") {
            Some(name) if !name.is_empty() => Ok(CheckName::Fixed(name.to_owned())),
            _ => Err(format!(
                "{text:?}: expected registry, empty or name:<grpc service>"
            )),
        },
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

fn read_secret(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = String::from_utf8(read(path, what)?)
        .with_context(|| format!("the {what} {} is not UTF-8", path.display()))?;
    let secret = text.trim().to_owned();
    anyhow::ensure!(!secret.is_empty(), "the {what} {} is empty", path.display());
    Ok(secret)
}

impl Cli {
    fn config(self) -> anyhow::Result<sync_server::Config> {
        let mut etcd = EtcdOptions::new(self.etcd);
        etcd.connect_timeout = self.connect_timeout;
        etcd.request_timeout = self.request_timeout;
        if let Some(ca) = &self.etcd_ca {
            let identity = match (&self.etcd_cert, &self.etcd_key) {
                (Some(cert), Some(key)) => Some((
                    read(cert, "etcd client certificate")?,
                    read(key, "etcd client key")?,
                )),
                _ => None,
            };
            etcd.tls = Some(EtcdTls {
                ca_pem: read(ca, "etcd CA certificate")?,
                identity,
                domain: self.etcd_domain.clone(),
            });
        }
        if let (Some(user), Some(password)) = (&self.etcd_user, &self.etcd_password_file) {
            etcd.user = Some((user.clone(), read_secret(password, "etcd password file")?));
        }
        let mut config = sync_server::Config::new(etcd, self.watches);
        config.snapshot_file = self.snapshot_file;
        config.history = sync_server::history::HistoryLimits {
            changes: usize::try_from(self.history_changes).unwrap_or(usize::MAX),
            bytes: self.history_bytes,
        };
        config.max_long_polls = self.max_long_polls;
        config.freshness_timeout = self.freshness_timeout;
        config.stamp_horizon = self.stamp_horizon;
        if self.health_checks {
            config.health = Some(HealthConfig {
                interval: self.health_interval,
                timeout: self.health_timeout,
                unhealthy_threshold: self.health_unhealthy_threshold,
                healthy_threshold: self.health_healthy_threshold,
                max_concurrent: usize::try_from(self.health_max_concurrent).unwrap_or(usize::MAX),
                max_connections: usize::try_from(self.health_max_connections).unwrap_or(usize::MAX),
                check_name: self.health_service.clone(),
            });
        }
        if let Some(dir) = &self.ui_dir {
            anyhow::ensure!(
                dir.join("index.html").is_file(),
                "the console directory {} has no index.html (scripts/build-console.sh makes console/dist)",
                dir.display()
            );
        }
        config.ui_dir = self.ui_dir;
        config.token = match &self.token_file {
            Some(path) => Some(read_secret(path, "token file")?),
            None => None,
        };
        if let Some(refusal) = sync_server::tls::plaintext_token_refusal(
            self.listen,
            config.token.is_some(),
            self.tls_cert.is_some(),
            self.insecure_plaintext,
        ) {
            anyhow::bail!(refusal);
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            let files = TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            };
            // `run` loads them again; checked here too, so a bad file is
            // reported before the port is bound and "starting" is logged.
            sync_server::tls::load(&files)?;
            config.tls = Some(files);
        }
        if let Some(ca) = &self.health_tls_ca {
            if !self.health_checks {
                tracing::warn!("--health-tls-ca is given without --health-checks: no check runs");
            }
            let identity = match (&self.health_tls_cert, &self.health_tls_key) {
                (Some(cert), Some(key)) => Some(sync_server::tls::read_identity(
                    cert,
                    key,
                    "health-check client",
                )?),
                _ => None,
            };
            if let Some(domain) = &self.health_tls_domain {
                anyhow::ensure!(
                    rustls_pki_types::ServerName::try_from(domain.as_str()).is_ok(),
                    "--health-tls-domain {domain:?} is not a DNS name or an IP address"
                );
            }
            config.health_tls = Some(HealthTls {
                ca_pem: sync_server::tls::read_ca(ca, "health-check CA")?,
                identity,
                domain: self.health_tls_domain.clone(),
            });
        }
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let listen = cli.listen;
    let config = cli.config()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    info!(listen = %listener.local_addr()?, scheme, etcd = ?config.etcd.endpoints, "sync-server starting");
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
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
    info!("shutting down");
    shutdown.cancel();
}
