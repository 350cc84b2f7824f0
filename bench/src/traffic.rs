//! How fast a change in etcd reaches traffic, and how evenly calls split.

use crate::util::{median, percentile};
use etcd_client::Client;
use etcd_mesh_demo::client::{say, split, Client as EchoClient};
use etcd_mesh_demo::proto::SayRequest;
use etcd_mesh_demo::{DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_e2e::{Backend, Mesh};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn naming(addr: SocketAddr, weight: u32) -> String {
    etcd_mesh_registration::Instance::new(DEMO_PREFIX, DEMO_SERVICE, &addr.to_string())
        .with_weight(weight)
        .value()
}

fn key(addr: SocketAddr) -> String {
    format!("{DEMO_PREFIX}{DEMO_SERVICE}/{addr}")
}

/// Calls until one lands on `addr`; the time since `since`.
async fn first_landing(client: &mut EchoClient, addr: &str, since: Instant) -> anyhow::Result<f64> {
    while since.elapsed() < Duration::from_secs(5) {
        if say(client, SayRequest::default()).await? == addr {
            return Ok(since.elapsed().as_secs_f64() * 1e3);
        }
    }
    anyhow::bail!("{addr} took no call within 5 s")
}

/// Calls until none has landed on `addr` for 50 ms; the time from `since`
/// to the last call that did (0 if none did).
async fn last_landing(client: &mut EchoClient, addr: &str, since: Instant) -> anyhow::Result<f64> {
    let mut last = None;
    loop {
        let served = say(client, SayRequest::default()).await?;
        let now = Instant::now();
        if served == addr {
            last = Some(now);
        }
        if now.duration_since(last.unwrap_or(since)) > Duration::from_millis(50) {
            return Ok(last.map_or(0.0, |l| l.duration_since(since).as_secs_f64() * 1e3));
        }
        if since.elapsed() > Duration::from_secs(5) {
            anyhow::bail!("{addr} still takes calls after 5 s");
        }
    }
}

fn summary(ms: &[f64]) -> Value {
    json!({
        "count": ms.len(),
        "p50_ms": percentile(ms, 50.0),
        "p99_ms": percentile(ms, 99.0),
        "max_ms": ms.iter().copied().fold(0.0, f64::max),
        "all_ms": ms,
    })
}

/// `cycles` × (add, weight 1→0, weight 0→1, remove): four changes each.
pub async fn propagation(cycles: usize) -> anyhow::Result<Value> {
    propagation_on(&Mesh::start(2).await, cycles).await
}

/// The same on a mesh that may hold other registrations (a large registry).
pub async fn propagation_on(mesh: &Mesh, cycles: usize) -> anyhow::Result<Value> {
    let _base = mesh.weighted_backends(&[1]).await;
    let client = mesh.clients(1).await.remove(0);
    changes_to_traffic(client, mesh.etcd_endpoints(), cycles).await
}

/// The same through `client`'s Envoy, which already routes the demo
/// service, with the changes made in the etcd at `etcd`.
pub async fn changes_to_traffic(
    mut client: EchoClient,
    etcd: Vec<String>,
    cycles: usize,
) -> anyhow::Result<Value> {
    let extra = Backend::unregistered().await;
    let target = extra.addr.to_string();
    let extra_addr = extra.addr;
    let etcd = Client::connect(etcd, None).await?;
    let (mut appear, mut vanish) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        for (weight, appears) in [
            (Some(1), true),
            (Some(0), false),
            (Some(1), true),
            (None, false),
        ] {
            // The request runs beside the calls, so that calls are in
            // flight while the change travels.
            let mut writer = etcd.clone();
            let since = Instant::now();
            let change = tokio::spawn(async move {
                match weight {
                    Some(w) => writer
                        .put(key(extra_addr), naming(extra_addr, w), None)
                        .await
                        .map(drop),
                    None => writer.delete(key(extra_addr), None).await.map(drop),
                }
            });
            if appears {
                appear.push(first_landing(&mut client, &target, since).await?);
            } else {
                vanish.push(last_landing(&mut client, &target, since).await?);
            }
            change.await??;
        }
    }
    Ok(json!({
        "changes": cycles * 4,
        "put_to_first_call": summary(&appear),
        "delete_or_drain_to_last_call": summary(&vanish),
    }))
}

/// Deviation from the ideal share over many calls at 1:2:3, and how many
/// hosts the first 6 calls after a change reach.
pub async fn split_quality(calls: usize, trials: usize) -> anyhow::Result<Value> {
    let mesh = Mesh::start(2).await;
    let weights = [1u32, 2, 3];
    let backends = mesh.weighted_backends(&weights).await;
    let clients = mesh.clients(8).await;
    let counts = split(&clients, calls).await?;
    let deviations: Vec<Value> = backends
        .iter()
        .zip(weights)
        .map(|(b, w)| {
            let served = counts.get(&b.addr.to_string()).copied().unwrap_or(0);
            let share = 100.0 * served as f64 / calls as f64;
            let ideal = 100.0 * f64::from(w) / 6.0;
            json!({"weight": w, "served": served, "share_pct": share, "deviation_pp": share - ideal})
        })
        .collect();

    // A fourth backend toggles between weight 3 and 0; after each change
    // the next 6 calls, one per connection.
    let fourth = Backend::unregistered().await;
    let mut etcd = Client::connect(mesh.etcd_endpoints(), None).await?;
    let mut hosts_reached = Vec::new();
    for trial in 0..trials {
        let weight = if trial % 2 == 0 { 3 } else { 0 };
        let response = etcd
            .put(key(fourth.addr), naming(fourth.addr, weight), None)
            .await?;
        let revision = response.header().map_or(0, |h| h.revision()) as u64;
        mesh.envoy
            .wait_for_revision(revision, Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::msg)?;
        let mut hosts = BTreeSet::new();
        for client in clients.iter().take(6) {
            hosts.insert(say(&mut client.clone(), SayRequest::default()).await?);
        }
        hosts_reached.push(hosts.len() as f64);
    }
    Ok(json!({
        "calls": calls,
        "weights": weights,
        "backends": deviations,
        "max_abs_deviation_pp": deviations_max(&counts, &backends, &weights, calls),
        "first_6_after_change": {
            "trials": trials,
            "min_hosts": hosts_reached.iter().copied().fold(f64::INFINITY, f64::min),
            "median_hosts": median(&hosts_reached),
        },
    }))
}

fn deviations_max(
    counts: &std::collections::BTreeMap<String, usize>,
    backends: &[Backend],
    weights: &[u32],
    calls: usize,
) -> f64 {
    let total: u32 = weights.iter().sum();
    backends
        .iter()
        .zip(weights)
        .map(|(b, w)| {
            let served = counts.get(&b.addr.to_string()).copied().unwrap_or(0);
            (100.0 * served as f64 / calls as f64 - 100.0 * f64::from(*w) / f64::from(total)).abs()
        })
        .fold(0.0, f64::max)
}
