//! At scale: sync-server over 10,000 services / 100,000 endpoints (one put
//! answering 1,000 and 10,000 held long-polls, full snapshot against
//! change feed; a rolling restart of 1,000 instances), and the plugin with
//! 100,000 endpoints in its tables (put → poller, worker apply,
//! propagation).

use crate::util::{cpu_seconds, median, peak_rss_mib, percentile};
use anyhow::Context;
use etcd_client::{Client, Txn, TxnOp};
use etcd_mesh_e2e::Mesh;
use etcd_mesh_testkit::{
    free_port, http_get, prometheus_value, wait_for, wait_ready, workspace_root, Etcd, Proc,
};
use etcd_mesh_wire::Changes;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub services: usize,
    pub endpoints: usize,
    pub snapshot_long_polls: usize,
    pub long_polls: usize,
    pub many_long_polls: usize,
    pub rolling_instances: usize,
    pub rolling_seconds: u64,
    pub plugin_endpoints: usize,
    pub plugin_cycles: usize,
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

fn key(prefix: &str, services: usize, i: usize) -> String {
    format!("{prefix}scale-{}/{}", i % services, addr(i))
}

fn value(i: usize) -> String {
    format!(
        r#"{{"Op":0,"Addr":"{}","Metadata":{{"weight":1}}}}"#,
        addr(i)
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
                    .map(|i| TxnOp::put(key(&prefix, services, *i), value(*i), None))
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

/// One long-poll on a raw connection: when its answer began, whether it
/// was a 200, and the body's length.
async fn long_poll(
    addr: SocketAddr,
    path: String,
    connecting: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<(Instant, bool, usize)> {
    let permit = connecting.acquire_owned().await?;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    drop(permit);
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    let answered = Instant::now();
    let ok = head.starts_with(b"HTTP/1.1 200");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await?;
    let body = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |at| rest.len() - at - 4);
    Ok((answered, ok, body))
}

async fn metric(listen: SocketAddr, name: &str) -> Option<u64> {
    let (_, metrics) = http_get(listen, "/metrics").await.ok()?;
    prometheus_value(&metrics, name)
}

/// Holds `n` long-polls on `path`, puts one endpoint, and measures when
/// every long-poll was answered: (p100 ms, median ms, all 200, largest body).
async fn put_answers_long_polls(
    listen: SocketAddr,
    etcd: &mut Client,
    path: &str,
    n: usize,
    put: (String, String),
) -> anyhow::Result<Value> {
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let mut polls = tokio::task::JoinSet::new();
    for _ in 0..n {
        polls.spawn(long_poll(listen, path.to_owned(), Arc::clone(&connecting)));
    }
    wait_for(
        &format!("{n} long-polls to be held"),
        Duration::from_secs(120),
        || async {
            let held = metric(listen, "sync_server_long_poll_waiters").await?;
            (held >= n as u64).then_some(())
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let put_at = Instant::now();
    etcd.put(put.0, put.1, None).await?;
    let mut answered_ms = Vec::new();
    let (mut all_ok, mut largest) = (true, 0);
    while let Some(done) = polls.join_next().await {
        let (at, ok, body) = done??;
        all_ok &= ok;
        largest = largest.max(body);
        answered_ms.push(at.duration_since(put_at).as_secs_f64() * 1e3);
    }
    Ok(json!({
        "long_polls": n,
        "all_answered_ms": answered_ms.iter().copied().fold(0.0, f64::max),
        "median_answered_ms": median(&answered_ms),
        "all_200": all_ok,
        "bytes_per_answer": largest,
    }))
}

/// One Envoy-like follower, long-polling `mode` ("changes" or
/// "snapshot") until `done` and caught up with `last_revision`; the bytes
/// and answers it received.
async fn follow(
    listen: SocketAddr,
    changes: bool,
    done: Arc<AtomicBool>,
    target: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<(usize, usize)> {
    let (mut bytes, mut answers) = (0usize, 0usize);
    let (_, first) = http_get(
        listen,
        if changes {
            "/v1/changes"
        } else {
            "/v1/snapshot"
        },
    )
    .await?;
    let first: Value = serde_json::from_str(&first)?;
    let mut revision = first["revision"].as_u64().context("revision")?;
    let epoch = first["epoch"].as_str().unwrap_or("").to_owned();
    loop {
        if done.load(Ordering::Relaxed) && revision >= target.load(Ordering::Relaxed) {
            return Ok((bytes, answers));
        }
        let path = if changes {
            format!("/v1/changes?since={revision}&epoch={epoch}&wait=1")
        } else {
            format!("/v1/snapshot?since={revision}&wait=1")
        };
        let (status, body) = http_get(listen, &path).await?;
        if status == 200 {
            bytes += body.len();
            answers += 1;
            let answer: Value = serde_json::from_str(&body)?;
            revision = answer["revision"].as_u64().context("revision")?;
        }
    }
}

/// A rolling restart: each of `instances` registrations deleted and put
/// back, paced over `seconds`, with one follower of `changes` or the full
/// snapshot; bytes it received and sync-server CPU.
async fn rolling_restart(
    listen: SocketAddr,
    server_pid: u32,
    etcd: &mut Client,
    options: &ScaleOptions,
    changes: bool,
) -> anyhow::Result<Value> {
    let done = Arc::new(AtomicBool::new(false));
    let target = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let follower = tokio::spawn(follow(
        listen,
        changes,
        Arc::clone(&done),
        Arc::clone(&target),
    ));
    let cpu_before = cpu_seconds(server_pid)?;
    let started = Instant::now();
    let step = Duration::from_secs(options.rolling_seconds) / options.rolling_instances as u32;
    let mut last = 0;
    for n in 0..options.rolling_instances {
        tokio::time::sleep_until((started + step * n as u32).into()).await;
        let i = n * (options.endpoints / options.rolling_instances).max(1);
        etcd.delete(key("scale/", options.services, i), None)
            .await?;
        let put = etcd
            .put(key("scale/", options.services, i), value(i), None)
            .await?;
        last = put.header().map_or(0, |h| h.revision()) as u64;
    }
    target.store(last, Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    let (bytes, answers) = tokio::time::timeout(Duration::from_secs(120), follower).await???;
    Ok(json!({
        "feed": if changes { "changes" } else { "snapshot" },
        "instances": options.rolling_instances,
        "changes": options.rolling_instances * 2,
        "seconds": started.elapsed().as_secs_f64(),
        "bytes_to_one_envoy": bytes,
        "answers": answers,
        "sync_server_cpu_s": cpu_seconds(server_pid)? - cpu_before,
    }))
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
    wait_ready(listen, Duration::from_secs(300))
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
    let mut client = Client::connect([etcd.endpoint()], None).await?;
    let extra = |n: usize| {
        let i = options.endpoints + n;
        (key("scale/", options.services, i), value(i))
    };

    // Before: every held long-poll gets the whole snapshot.
    let snapshot_polls = if options.snapshot_long_polls > 0 {
        put_answers_long_polls(
            listen,
            &mut client,
            &format!("/v1/snapshot?since={revision}&wait=120"),
            options.snapshot_long_polls,
            extra(0),
        )
        .await?
    } else {
        Value::Null
    };
    eprintln!("scale: full-snapshot long-polls done");
    // After: the change feed, 1,000 and 10,000 held.
    let mut delta_polls = Vec::new();
    for (n, count) in [options.long_polls, options.many_long_polls]
        .into_iter()
        .enumerate()
    {
        let (_, body) = http_get(listen, "/v1/changes").await?;
        let full = Changes::decode(body.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let path = format!(
            "/v1/changes?since={}&epoch={}&wait=120",
            full.revision, full.epoch
        );
        delta_polls
            .push(put_answers_long_polls(listen, &mut client, &path, count, extra(n + 1)).await?);
        eprintln!("scale: {count} change-feed long-polls done");
    }
    let rss_peak = peak_rss_mib(server.pid())?;

    let mut rolling = Vec::new();
    for changes in [false, true] {
        rolling.push(rolling_restart(listen, server.pid(), &mut client, options, changes).await?);
        eprintln!("scale: rolling restart done");
    }
    drop(server);

    eprintln!(
        "scale: sync-server done; now the plugin at {} endpoints",
        options.plugin_endpoints
    );
    let plugin = plugin_at_scale(options).await?;
    Ok(json!({
        "services": options.services,
        "endpoints": options.endpoints,
        "etcd_load_s": load_s,
        "time_to_ready_ms": ready_ms,
        "peak_rss_mib_at_ready": rss_ready,
        "peak_rss_mib": rss_peak,
        "full_snapshot_bytes": body_bytes,
        "full_snapshot_serve_ms_median": median(&serve_ms),
        "snapshot_long_polls": snapshot_polls,
        "delta_long_polls": delta_polls,
        "rolling_restart": rolling,
        "plugin": plugin,
    }))
}

/// Polls an Envoy stat as fast as the admin answers, until `test` holds.
async fn stat_until(mesh: &Mesh, name: &str, test: impl Fn(u64) -> bool) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = mesh.envoy.stat(name).await.filter(|v| test(*v)) {
            return Ok(value);
        }
        anyhow::ensure!(Instant::now() < deadline, "{name} never got there");
    }
}

/// The plugin with `plugin_endpoints` endpoints in its tables: put →
/// poller holds it, a worker's apply time, the poller's apply time, and
/// propagation to traffic.
async fn plugin_at_scale(options: &ScaleOptions) -> anyhow::Result<Value> {
    let endpoints = options.plugin_endpoints;
    let services = (endpoints / 10).max(1);
    let mesh = Mesh::start(2).await;
    load(
        &mesh.etcd_endpoints(),
        etcd_mesh_demo::DEMO_PREFIX,
        services,
        endpoints,
    )
    .await?;
    let backend = mesh.weighted_backends(&[1]).await;
    let mut client = mesh.clients(1).await.remove(0);
    let mut etcd = Client::connect(mesh.etcd_endpoints(), None).await?;
    let services_stat = "wasmcustom.etcd_mesh.table_services";
    stat_until(&mesh, services_stat, |n| n as usize > services).await?;
    // The first call after the load makes its worker read everything.
    etcd_mesh_demo::client::say(&mut client, Default::default()).await?;
    let refresh = "wasmcustom.etcd_mesh.table_refresh_us";
    let first_load_us = stat_until(&mesh, refresh, |us| us > 0).await?;
    let mut to_poller_ms = Vec::new();
    let mut worker_us = Vec::new();
    let mut poller_us = Vec::new();
    for i in 0..20 {
        let key = format!("{}scale-0/127.251.0.{i}:9000", etcd_mesh_demo::DEMO_PREFIX);
        let put_at = Instant::now();
        let response = etcd
            .put(key, format!(r#"{{"Addr":"127.251.0.{i}:9000"}}"#), None)
            .await?;
        let revision = response.header().context("header")?.revision() as u64;
        stat_until(&mesh, "wasmcustom.etcd_mesh.table_revision", |r| {
            r >= revision
        })
        .await?;
        to_poller_ms.push(put_at.elapsed().as_secs_f64() * 1e3);
        poller_us.push(
            mesh.envoy
                .stat("wasmcustom.etcd_mesh.poll_apply_us")
                .await
                .unwrap_or(0) as f64,
        );
        // A call makes a worker apply it; the gauge is flushed on its tick.
        let before = mesh.envoy.stat(refresh).await.unwrap_or(0);
        etcd_mesh_demo::client::say(&mut client, Default::default()).await?;
        let after = wait_for("the refresh gauge", Duration::from_secs(5), || async {
            let now = mesh.envoy.stat(refresh).await?;
            (now != before).then_some(now)
        })
        .await
        .unwrap_or(before);
        worker_us.push(after as f64);
    }
    // The propagation run registers its own backends.
    for mut backend in backend {
        backend.deregister().await;
    }
    let propagation = crate::traffic::propagation_on(&mesh, options.plugin_cycles).await?;
    Ok(json!({
        "endpoints": endpoints,
        "services": services,
        "worker_first_load_ms": first_load_us as f64 / 1e3,
        "put_to_poller_holding_it_ms_median": median(&to_poller_ms),
        "put_to_poller_holding_it_ms_p99": percentile(&to_poller_ms, 99.0),
        "poller_apply_ms_median": median(&poller_us) / 1e3,
        "worker_apply_ms_median": median(&worker_us) / 1e3,
        "worker_apply_ms_max": worker_us.iter().copied().fold(0.0, f64::max) / 1e3,
        "propagation": propagation,
    }))
}
