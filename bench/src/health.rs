//! Health checks: the calls lost when a backend dies while still
//! registered (its lease kept alive), with passive ejection alone (before
//! health checks), health checks alone and both, paired per round; and what
//! checking 10,000 endpoints costs sync-server, beside a sync-server
//! watching the same registrations without checks, in the same seconds.

use crate::util::{cpu_seconds, median, peak_rss_mib};
use etcd_client::{Client, PutOptions};
use etcd_mesh_demo::client::{say, Client as EchoClient};
use etcd_mesh_demo::proto::SayRequest;
use etcd_mesh_e2e::Mesh;
use etcd_mesh_testkit::{
    free_port, http_get, prometheus_value, wait_for, wait_ready, workspace_root, EnvoyOptions,
    Etcd, Proc,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use sync_server::health::{CheckName, HealthConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct HealthOptions {
    pub rounds: usize,
    /// Endpoints checked in the cost run, and the services they spread over.
    pub endpoints: usize,
    pub services: usize,
    /// The seconds over which the cost is measured.
    pub window_s: u64,
}

const INTERVAL: Duration = Duration::from_millis(500);

/// Ways a dead backend is taken out of traffic.
const VARIANTS: [(&str, bool, bool); 3] = [
    ("passive ejection only (before)", false, true),
    ("health checks 500 ms × 3 only", true, false),
    ("health checks and passive ejection", true, true),
];

pub async fn run(options: &HealthOptions) -> anyhow::Result<Value> {
    let loss = calls_lost(options.rounds).await?;
    eprintln!("health: calls lost done");
    let cost = check_cost(options).await?;
    Ok(json!({ "loss": loss, "cost": cost }))
}

/// One round of one variant: calls failed after the kill, and when the
/// last one failed (ms after the kill).
async fn one_kill(health: bool, ejection: bool) -> anyhow::Result<(f64, f64)> {
    let router = if ejection {
        r#"{"role":"router"}"#
    } else {
        r#"{"role":"router","outlier_detection":null}"#
    };
    let envoy = EnvoyOptions {
        router_config: Some(router.into()),
        ..EnvoyOptions::default()
    };
    let mesh = Mesh::start_configured(envoy, |config| {
        if health {
            config.health = Some(HealthConfig {
                interval: INTERVAL,
                timeout: Duration::from_millis(250),
                unhealthy_threshold: 3,
                healthy_threshold: 2,
                max_concurrent: 64,
                max_connections: sync_server::health::DEFAULT_MAX_CONNECTIONS,
                check_name: CheckName::Registry,
            });
        }
    })
    .await;
    let backends = mesh.weighted_backends(&[1, 1, 1]).await;
    if health {
        wait_for("all checked", Duration::from_secs(20), || async {
            let endpoints = mesh
                .snapshot()
                .await?
                .services
                .into_values()
                .next()?
                .endpoints;
            endpoints.iter().all(|e| e.health.is_some()).then_some(())
        })
        .await
        .map_err(anyhow::Error::msg)?;
        let digest = mesh.sync_metric("sync_server_tables_digest").await;
        mesh.envoy
            .wait_for_digest(digest.unwrap_or(0), Duration::from_secs(20))
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let mut clients: Vec<EchoClient> = mesh.clients(4).await;
    let killed = Instant::now();
    backends[0].stop_serving();
    let (mut failed, mut last) = (0usize, 0.0);
    let mut i = 0;
    while killed.elapsed() < Duration::from_secs(4) {
        let client = &mut clients[i % 4];
        i += 1;
        let call = tokio::time::timeout(Duration::from_secs(1), say(client, SayRequest::default()));
        if !matches!(call.await, Ok(Ok(_))) {
            failed += 1;
            last = killed.elapsed().as_secs_f64() * 1e3;
        }
    }
    Ok((failed as f64, last))
}

async fn calls_lost(rounds: usize) -> anyhow::Result<Value> {
    let mut failed = vec![Vec::new(); VARIANTS.len()];
    let mut last = vec![Vec::new(); VARIANTS.len()];
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let mut this_round = Vec::new();
        for (v, (_, health, ejection)) in VARIANTS.iter().enumerate() {
            let (f, l) = one_kill(*health, *ejection).await?;
            failed[v].push(f);
            last[v].push(l);
            this_round.push(f);
        }
        // Health checks alone against passive ejection alone, this round.
        ratios.push(this_round[1] / this_round[0].max(1.0));
    }
    let variants: Vec<Value> = VARIANTS
        .iter()
        .enumerate()
        .map(|(v, (name, _, _))| {
            json!({
                "name": name,
                "failed_calls_median": median(&failed[v]),
                "failed_calls_min": failed[v].iter().copied().fold(f64::MAX, f64::min),
                "failed_calls_max": failed[v].iter().copied().fold(0.0, f64::max),
                "last_failure_ms_median": median(&last[v]),
                "last_failure_ms_max": last[v].iter().copied().fold(0.0, f64::max),
            })
        })
        .collect();
    Ok(json!({
        "rounds": rounds,
        "variants": variants,
        "health_over_ejection_median": median(&ratios),
        "health_over_ejection_min": ratios.iter().copied().fold(f64::MAX, f64::min),
        "health_over_ejection_max": ratios.iter().copied().fold(0.0, f64::max),
    }))
}

/// Serves the gRPC health service (SERVING for the server as a whole) on
/// `count` loopback ports until `stop`.
async fn health_servers(count: usize, stop: &CancellationToken) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(count);
    for _ in 0..count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        let (_reporter, service) = tonic_health::server::health_reporter();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await;
        });
    }
    Ok(addrs)
}

async fn metric(listen: SocketAddr, name: &str) -> Option<u64> {
    let (_, body) = http_get(listen, "/metrics").await.ok()?;
    prometheus_value(&body, name)
}

/// sync-server CPU with health checks of `endpoints` endpoints, against a
/// sync-server without, both running through the same seconds.
async fn check_cost(options: &HealthOptions) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path()).await.map_err(anyhow::Error::msg)?;
    let stop = CancellationToken::new();
    let per_service = options.endpoints.div_ceil(options.services.max(1));
    let servers = health_servers(per_service, &stop).await?;
    let mut client = Client::connect([etcd.endpoint()], None).await?;
    for i in 0..options.endpoints {
        let addr = servers[i % servers.len()];
        let key = format!("hc/svc-{}/{addr}", i / per_service);
        let value = format!(r#"{{"Op":0,"Addr":"{addr}","Metadata":{{"weight":1}}}}"#);
        client.put(key, value, None::<PutOptions>).await?;
    }
    let binary = workspace_root().join("target/release/sync-server");
    anyhow::ensure!(binary.exists(), "no {}: run `make build`", binary.display());
    let mut started = Vec::new();
    for (name, checks) in [("with-checks", true), ("without", false)] {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut command = Command::new(&binary);
        command
            .args(["--etcd", &etcd.endpoint(), "--listen", &listen.to_string()])
            .args(["--watch", "etcd-naming=hc/"]);
        if checks {
            command.args([
                "--health-checks",
                "--health-interval",
                "1s",
                "--health-service",
                "empty",
            ]);
        }
        let server = Proc::spawn(name, command, dir.path().join(format!("{name}.log")))?;
        wait_ready(listen, Duration::from_secs(60))
            .await
            .map_err(anyhow::Error::msg)?;
        started.push((listen, server));
    }
    let checked = started[0].0;
    let endpoints = options.endpoints as u64;
    wait_for(
        "every endpoint checked once",
        Duration::from_secs(120),
        || async {
            let healthy = metric(checked, "sync_server_health_checks_total").await?;
            (healthy >= endpoints).then_some(())
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let (with_pid, without_pid) = (started[0].1.pid(), started[1].1.pid());
    let checks_before = metric(checked, "sync_server_health_checks_total")
        .await
        .unwrap_or(0);
    let cpu_before = (cpu_seconds(with_pid)?, cpu_seconds(without_pid)?);
    let since = Instant::now();
    tokio::time::sleep(Duration::from_secs(options.window_s)).await;
    let seconds = since.elapsed().as_secs_f64();
    let checks = metric(checked, "sync_server_health_checks_total")
        .await
        .unwrap_or(0)
        - checks_before;
    let cpu_with = cpu_seconds(with_pid)? - cpu_before.0;
    let cpu_without = cpu_seconds(without_pid)? - cpu_before.1;
    let connections = metric(checked, "sync_server_health_connections").await;
    let peak = metric(checked, "sync_server_health_checks_in_flight_peak").await;
    let unhealthy = metric(checked, "sync_server_health_unhealthy_endpoints").await;
    let rss = (peak_rss_mib(with_pid)?, peak_rss_mib(without_pid)?);
    stop.cancel();
    Ok(json!({
        "endpoints": options.endpoints,
        "backends": servers.len(),
        "interval_s": 1,
        "window_s": seconds,
        "checks_per_second": checks as f64 / seconds,
        "cpu_percent_with_checks": 100.0 * cpu_with / seconds,
        "cpu_percent_without": 100.0 * cpu_without / seconds,
        "cpu_us_per_check": 1e6 * (cpu_with - cpu_without).max(0.0) / (checks.max(1) as f64),
        "connections": connections,
        "in_flight_peak": peak,
        "unhealthy": unhealthy,
        "peak_rss_mib_with_checks": rss.0,
        "peak_rss_mib_without": rss.1,
    }))
}
