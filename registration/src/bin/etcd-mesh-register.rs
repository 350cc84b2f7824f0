//! `etcd-mesh-register`: registration from a shell or a container
//! entrypoint. Wiring only; the work is in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use etcd_mesh_registration::{
    admin, EtcdOptions, EtcdTls, Instance, KeyFormat, Registration, State,
};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// Where the password of `--etcd-user` is read from (not a flag: flags
/// show in `ps`).
const PASSWORD_ENV: &str = "ETCD_MESH_ETCD_PASSWORD";

/// Registers service instances in etcd for etcd-mesh, and inspects or
/// changes the registrations that are there.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// etcd members, comma-separated host:port.
    #[arg(
        long,
        global = true,
        env = "ETCD_MESH_ETCD",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// CA certificate (PEM) to verify etcd with; turns on TLS to etcd.
    #[arg(long, global = true, env = "ETCD_MESH_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), when etcd asks for one; needs --etcd-key.
    #[arg(
        long,
        global = true,
        env = "ETCD_MESH_ETCD_CERT",
        requires = "etcd_key",
        requires = "etcd_ca"
    )]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM); needs --etcd-cert.
    #[arg(
        long,
        global = true,
        env = "ETCD_MESH_ETCD_KEY",
        requires = "etcd_cert"
    )]
    etcd_key: Option<PathBuf>,
    /// The name etcd's certificate is checked against, if not the host.
    #[arg(
        long,
        global = true,
        env = "ETCD_MESH_ETCD_DOMAIN",
        requires = "etcd_ca"
    )]
    etcd_domain: Option<String>,
    /// etcd user; the password is read from $ETCD_MESH_ETCD_PASSWORD.
    #[arg(long, global = true, env = "ETCD_MESH_ETCD_USER")]
    etcd_user: Option<String>,
    /// Seconds an etcd member has to answer a connection (TCP, TLS,
    /// authentication and a first request).
    #[arg(
        long,
        global = true,
        env = "ETCD_MESH_CONNECT_TIMEOUT",
        default_value = "2",
        value_parser = parse_seconds
    )]
    connect_timeout: Duration,
    /// Seconds each request to etcd may take; for list and set-weight, the
    /// whole command once connected (drain adds its --wait).
    #[arg(
        long,
        global = true,
        env = "ETCD_MESH_REQUEST_TIMEOUT",
        default_value = "5",
        value_parser = parse_seconds
    )]
    request_timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    fn etcd_options(&self) -> anyhow::Result<EtcdOptions> {
        let mut options = EtcdOptions::new(self.etcd.clone());
        options.connect_timeout = self.connect_timeout;
        options.request_timeout = self.request_timeout;
        if let Some(ca) = &self.etcd_ca {
            let identity = self.etcd_cert.as_deref().zip(self.etcd_key.as_deref());
            let tls = EtcdTls::from_files(ca, identity, self.etcd_domain.clone())
                .context("cannot read the etcd TLS files")?;
            options.tls = Some(tls);
        }
        if let Some(user) = &self.etcd_user {
            let password = std::env::var(PASSWORD_ENV)
                .with_context(|| format!("--etcd-user needs the password in ${PASSWORD_ENV}"))?;
            options.user = Some((user.clone(), password));
        }
        Ok(options)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Keeps one instance registered until SIGTERM or Ctrl-C, then
    /// deregisters it. Survives etcd outages by registering again.
    Run {
        /// The registry name of the service.
        #[arg(long, env = "ETCD_MESH_SERVICE")]
        service: String,
        /// The instance's ip:port.
        #[arg(long, env = "ETCD_MESH_ADDR")]
        addr: String,
        /// 0..=10000; 0 means draining.
        #[arg(long, env = "ETCD_MESH_WEIGHT", default_value_t = 1)]
        weight: u32,
        /// Lease TTL in seconds.
        #[arg(long, env = "ETCD_MESH_TTL", default_value_t = 10)]
        ttl: u64,
        /// The etcd-naming prefix.
        #[arg(
            long,
            env = "ETCD_MESH_PREFIX",
            default_value = "etcd-mesh/",
            conflicts_with = "openim_schema"
        )]
        prefix: String,
        /// Write the older openim-v2 form `<schema>:///<service>/<addr>` instead.
        #[arg(long, env = "ETCD_MESH_OPENIM_SCHEMA")]
        openim_schema: Option<String>,
        /// Extra metadata, key=value; repeatable.
        #[arg(long = "meta", value_parser = parse_meta)]
        metadata: Vec<(String, String)>,
        /// The zone this instance runs in (written as `Metadata.zone`; the
        /// openim-v2 form has no metadata: give sync-server's --watch a
        /// `,zone=` instead).
        #[arg(long, env = "ETCD_MESH_ZONE", conflicts_with = "openim_schema")]
        zone: Option<String>,
    },
    /// Lists the registrations under a prefix: key, address, weight, TTL left.
    List {
        #[arg(long, default_value = "etcd-mesh/")]
        prefix: String,
    },
    /// Changes the weight of a registration in place, keeping its lease.
    SetWeight {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        weight: u32,
    },
    /// Weight 0, wait for calls to move away, then deregister.
    Drain {
        #[command(flatten)]
        target: Target,
        /// Seconds to wait between weight 0 and the deletion.
        #[arg(long, default_value_t = 5)]
        wait: u64,
    },
}

/// Which registration a command acts on.
#[derive(Debug, clap::Args)]
struct Target {
    #[arg(long, default_value = "etcd-mesh/")]
    prefix: String,
    #[arg(long)]
    service: String,
    #[arg(long)]
    addr: String,
}

impl Target {
    fn key(&self) -> String {
        Instance::new(&self.prefix, &self.service, &self.addr).key()
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|secs| *secs > 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

/// `command` within `limit`.
async fn bounded<T>(
    limit: Duration,
    command: impl Future<Output = Result<T, admin::AdminError>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, command).await {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!("etcd did not finish within {limit:?}"),
    }
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let options = cli.etcd_options()?;
    let limit = options.request_timeout;
    match cli.command {
        Command::Run {
            service,
            addr,
            weight,
            ttl,
            prefix,
            openim_schema,
            metadata,
            zone,
        } => {
            let mut instance = Instance::new(&prefix, &service, &addr)
                .with_weight(weight)
                .with_ttl(Duration::from_secs(ttl));
            if let Some(schema) = openim_schema {
                instance.format = KeyFormat::OpenimV2 { schema };
            }
            instance.metadata = metadata.into_iter().map(|(k, v)| (k, v.into())).collect();
            if let Some(zone) = zone {
                instance = instance.with_zone(zone);
            }
            let registration = Registration::start_with(options, instance)?;
            let mut states = registration.watch_state();
            let stop = stop_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    changed = states.changed() => {
                        if changed.is_err() { break; }
                        if let State::Registered { lease } = &*states.borrow_and_update() {
                            eprintln!("registered (lease {lease:x})");
                        }
                    }
                }
            }
            registration.deregister().await;
        }
        Command::List { prefix } => {
            let mut client = options.connect().await?;
            for entry in bounded(limit, admin::list(&mut client, &prefix)).await? {
                let weight = entry.weight.map_or("-".into(), |w| w.to_string());
                let ttl = entry.ttl_left.map_or("-".into(), |t| format!("{t}s"));
                println!(
                    "{}\t{}\t{}\tweight={weight}\tttl={ttl}",
                    entry.service, entry.addr, entry.key
                );
            }
        }
        Command::SetWeight { target, weight } => {
            let mut client = options.connect().await?;
            bounded(limit, admin::set_weight(&mut client, &target.key(), weight)).await?;
        }
        Command::Drain { target, wait } => {
            let mut client = options.connect().await?;
            let (key, wait) = (target.key(), Duration::from_secs(wait));
            bounded(wait + limit * 2, admin::drain(&mut client, &key, wait)).await?;
        }
    }
    Ok(())
}

async fn stop_signal() {
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
