//! At scale: sync-server over a ladder of registry sizes (see
//! [`crate::ladder`]), and the plugin with `plugin_endpoints` endpoints in
//! its tables (put → poller, worker apply, full load, Envoy's memory,
//! propagation). Also the registrations both put in etcd.

use crate::ladder::{self, LadderOptions};
use crate::util::{median, percentile, rss_mib};
use anyhow::Context;
use etcd_client::{Client, Txn, TxnOp};
use etcd_mesh_e2e::Mesh;
use etcd_mesh_testkit::wait_for;
use serde_json::{json, Value};
use std::ops::Range;
use std::time::{Duration, Instant};

/// Endpoints per service, at every size.
pub const ENDPOINTS_PER_SERVICE: usize = 10;

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub ladder: LadderOptions,
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

/// The etcd-naming key of endpoint `i`: service `i / 10`, so that loading
/// more endpoints fills new services and leaves the old ones as they are.
pub fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}scale-{}/{}", i / ENDPOINTS_PER_SERVICE, addr(i))
}

/// The etcd-naming value of endpoint `i`.
pub fn value(i: usize, weight: u32) -> String {
    format!(
        r#"{{"Op":0,"Addr":"{}","Metadata":{{"weight":{weight}}}}}"#,
        addr(i)
    )
}

/// Puts the registrations of endpoints `range` (weight 1): txns of 100
/// puts (etcd takes at most 128 by default), 4 writers.
pub async fn load(etcd: &[String], prefix: &str, range: Range<usize>) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let writers = 4;
    for w in 0..writers {
        let mut client = Client::connect(etcd, None).await?;
        let prefix = prefix.to_owned();
        let mine: Vec<usize> = range.clone().filter(|i| i % writers == w).collect();
        tasks.spawn(async move {
            for chunk in mine.chunks(100) {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|i| TxnOp::put(key(&prefix, *i), value(*i, 1), None))
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

pub async fn run(options: &ScaleOptions) -> anyhow::Result<Value> {
    let ladder = ladder::run(&options.ladder).await?;
    eprintln!(
        "scale: ladder done; now the plugin at {} endpoints",
        options.plugin_endpoints
    );
    let plugin = plugin_at_scale(options).await?;
    Ok(json!({ "ladder": ladder, "plugin": plugin }))
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
/// poller holds it, a worker's apply time, the poller's apply time, a
/// worker's full load, Envoy's memory, and propagation to traffic.
async fn plugin_at_scale(options: &ScaleOptions) -> anyhow::Result<Value> {
    let endpoints = options.plugin_endpoints;
    let services = endpoints.div_ceil(ENDPOINTS_PER_SERVICE).max(1);
    let mesh = Mesh::start(2).await;
    load(
        &mesh.etcd_endpoints(),
        etcd_mesh_demo::DEMO_PREFIX,
        0..endpoints,
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
    // The whole load across slices (a newer gauge: missing or 0 before it).
    let load_stat = "wasmcustom.etcd_mesh.table_load_ms";
    let table_load_ms = wait_for("the table load gauge", Duration::from_secs(5), || async {
        mesh.envoy.stat(load_stat).await.filter(|ms| *ms > 0)
    })
    .await
    .ok()
    .or(mesh.envoy.stat(load_stat).await);
    let envoy_rss_mib = rss_mib(mesh.envoy.pid())?;
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
        "worker_table_load_ms": table_load_ms,
        "envoy_rss_mib_after_load": envoy_rss_mib,
        "put_to_poller_holding_it_ms_median": median(&to_poller_ms),
        "put_to_poller_holding_it_ms_p99": percentile(&to_poller_ms, 99.0),
        "poller_apply_ms_median": median(&poller_us) / 1e3,
        "worker_apply_ms_median": median(&worker_us) / 1e3,
        "worker_apply_ms_max": worker_us.iter().copied().fold(0.0, f64::max) / 1e3,
        "propagation": propagation,
    }))
}
