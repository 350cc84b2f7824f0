//! sync-server at scale (10,000 services, 100,000 endpoints), and the
//! plugin's table refresh for 10,000 endpoints inside Envoy.

use crate::util::{median, peak_rss_mib};
use anyhow::Context;
use etcd_client::{Client, Txn, TxnOp};
use etcd_mesh_demo::stack::{
    free_port, http_get, prometheus_value, wait_for, workspace_root, Etcd, Proc,
};
use etcd_mesh_e2e::Mesh;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub services: usize,
    pub endpoints: usize,
    pub long_polls: usize,
    pub plugin_endpoints: usize,
}

/// A distinct loopback address per endpoint (nothing is ever sent there).
fn addr(i: usize) -> String {
    format!(
        "127.{}.{}.{}:9000",
        1 + i / 65_536,
        (i / 256) % 256,
        i % 256
    )
}

/// Puts `endpoints` etcd-naming registrations spread over `services`.
async fn load(
    etcd: &[String],
    prefix: &str,
    services: usize,
    endpoints: usize,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let writers = 4;
    for w in 0..writers {
        let mut client = Client::connect(etcd, None).await?;
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            let mine: Vec<usize> = (0..endpoints).filter(|i| i % writers == w).collect();
            for chunk in mine.chunks(100) {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|i| {
                        let a = addr(*i);
                        let value = format!(r#"{{"Op":0,"Addr":"{a}","Metadata":{{"weight":1}}}}"#);
                        TxnOp::put(format!("{prefix}scale-{}/{a}", i % services), value, None)
                    })
                    .collect();
                client.txn(Txn::new().and_then(ops)).await?;
            }
            Ok::<_, etcd_client::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// One long-poll on a raw connection; the instant it was answered.
async fn long_poll(addr: SocketAddr, since: u64) -> anyhow::Result<(Instant, bool)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET /v1/snapshot?since={since}&wait=60 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    let answered = Instant::now();
    let ok = head.starts_with(b"HTTP/1.1 200");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await?;
    Ok((answered, ok))
}

pub async fn run(options: &ScaleOptions) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path()).await.map_err(anyhow::Error::msg)?;
    let loading = Instant::now();
    load(
        &[etcd.endpoint()],
        "scale/",
        options.services,
        options.endpoints,
    )
    .await?;
    let load_s = loading.elapsed().as_secs_f64();
    eprintln!(
        "scale: {} endpoints in etcd after {load_s:.1} s",
        options.endpoints
    );

    let binary = workspace_root().join("target/release/sync-server");
    anyhow::ensure!(binary.exists(), "no {}: run `make build`", binary.display());
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut command = Command::new(&binary);
    command
        .args(["--etcd", &etcd.endpoint(), "--listen", &listen.to_string()])
        .args(["--watch", "etcd-naming=scale/"])
        .env("RUST_LOG", "warn");
    let started = Instant::now();
    let server = Proc::spawn("sync-server", command, dir.path().join("sync.log"))?;
    wait_for("sync-server /readyz", Duration::from_secs(300), || async {
        matches!(http_get(listen, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await
    .map_err(anyhow::Error::msg)?;
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    let rss_ready = peak_rss_mib(server.pid())?;

    let mut serve_ms = Vec::new();
    let mut body_bytes = 0;
    let mut revision = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let (status, body) = http_get(listen, "/v1/snapshot").await?;
        serve_ms.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status == 200, "snapshot status {status}");
        body_bytes = body.len();
        revision = etcd_mesh_wire::Snapshot::decode(body.as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .revision;
    }

    let mut polls = tokio::task::JoinSet::new();
    for _ in 0..options.long_polls {
        polls.spawn(long_poll(listen, revision));
    }
    let waiting = options.long_polls as u64;
    wait_for(
        "the long-polls to be held",
        Duration::from_secs(60),
        || async {
            let (_, metrics) = http_get(listen, "/metrics").await.ok()?;
            let held = prometheus_value(&metrics, "sync_server_long_poll_waiters")?;
            (held >= waiting).then_some(())
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let mut client = Client::connect([etcd.endpoint()], None).await?;
    let put_at = Instant::now();
    client
        .put(
            "scale/scale-0/127.250.0.1:9000",
            r#"{"Addr":"127.250.0.1:9000"}"#,
            None,
        )
        .await?;
    let mut answered_ms = Vec::new();
    let mut all_ok = true;
    while let Some(done) = polls.join_next().await {
        let (at, ok) = done??;
        all_ok &= ok;
        answered_ms.push(at.duration_since(put_at).as_secs_f64() * 1e3);
    }
    let rss_peak = peak_rss_mib(server.pid())?;
    drop(server);
    eprintln!(
        "scale: sync-server done; now the plugin at {} endpoints",
        options.plugin_endpoints
    );

    let plugin = plugin_refresh(options.plugin_endpoints).await?;
    Ok(json!({
        "services": options.services,
        "endpoints": options.endpoints,
        "etcd_load_s": load_s,
        "time_to_ready_ms": ready_ms,
        "peak_rss_mib_at_ready": rss_ready,
        "peak_rss_mib": rss_peak,
        "full_snapshot_bytes": body_bytes,
        "full_snapshot_serve_ms_median": median(&serve_ms),
        "long_polls": options.long_polls,
        "long_polls_all_200": all_ok,
        "put_to_all_long_polls_answered_ms": answered_ms.iter().copied().fold(0.0, f64::max),
        "put_to_median_long_poll_answered_ms": median(&answered_ms),
        "plugin": plugin,
    }))
}

/// The plugin with `endpoints` endpoints in its tables: how long after a
/// put the poller holds the new revision, and how long a worker takes to
/// rebuild its tables (`table_refresh_us`).
async fn plugin_refresh(endpoints: usize) -> anyhow::Result<Value> {
    let mesh = Mesh::start(2).await;
    load(
        &mesh.etcd_endpoints(),
        etcd_mesh_demo::DEMO_PREFIX,
        endpoints / 10,
        endpoints,
    )
    .await?;
    let backend = mesh.weighted_backends(&[1]).await;
    let mut client = mesh.clients(1).await.remove(0);
    let mut etcd = Client::connect(mesh.etcd_endpoints(), None).await?;
    let refresh = "wasmcustom.etcd_mesh.table_refresh_us";
    let mut to_poller_ms = Vec::new();
    let mut refresh_us = Vec::new();
    for i in 0..10 {
        let key = format!("{}scale-0/127.251.0.{i}:9000", etcd_mesh_demo::DEMO_PREFIX);
        let put_at = Instant::now();
        let response = etcd
            .put(key, format!(r#"{{"Addr":"127.251.0.{i}:9000"}}"#), None)
            .await?;
        let revision = response.header().context("header")?.revision() as u64;
        mesh.envoy
            .wait_for_revision(revision, Duration::from_secs(20))
            .await
            .map_err(anyhow::Error::msg)?;
        to_poller_ms.push(put_at.elapsed().as_secs_f64() * 1e3);
        // A call makes a worker rebuild; the gauge is flushed on its tick.
        let before = mesh.envoy.stat(refresh).await.unwrap_or(0);
        etcd_mesh_demo::client::say(&mut client, Default::default()).await?;
        let after = wait_for("the refresh gauge", Duration::from_secs(5), || async {
            let now = mesh.envoy.stat(refresh).await?;
            (now != before && now > 0).then_some(now)
        })
        .await
        .unwrap_or(before);
        refresh_us.push(after as f64);
    }
    drop(backend);
    Ok(json!({
        "endpoints": endpoints,
        "put_to_poller_holding_it_ms_median": median(&to_poller_ms),
        "worker_table_refresh_ms_median": median(&refresh_us) / 1e3,
    }))
}
