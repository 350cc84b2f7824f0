//! Replicas: the layout `docs/operations.md` recommends (sync-server
//! replicas, one Envoy cluster each, the poller following one) beside the
//! layout it replaced (one Envoy cluster over every replica), in the same
//! rounds: full loads per Envoy on a quiet registry; how fast a change
//! reaches traffic through one replica and through two; how long a
//! failover takes and what it costs.

use crate::traffic::changes_to_traffic;
use crate::util::{median, percentile};
use etcd_client::Client;
use etcd_mesh_demo::{DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_e2e::{start_sync_server_on, Backend, SyncServerProcess};
use etcd_mesh_registration::Instance;
use etcd_mesh_testkit::{
    envoy_template_path, free_port, lb_endpoints_yaml, render_envoy_config,
    sync_cluster_names_json, wait_for, wasm_path, Envoy, EnvoyOptions, Etcd, Frozen,
};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    pub rounds: usize,
    /// Services in the quiet registry.
    pub services: usize,
    /// Seconds each layout is watched on the quiet registry.
    pub window_s: u64,
    /// Propagation cycles per round (four changes each).
    pub cycles: usize,
}

const DEADLINE: Duration = Duration::from_secs(20);

pub async fn run(options: &ReplicaOptions) -> anyhow::Result<Value> {
    let quiet = quiet_registry(options).await?;
    eprintln!("replicas: quiet registry done");
    let propagation = propagation(options).await?;
    eprintln!("replicas: propagation done");
    let failover = failover(options.rounds).await?;
    eprintln!("replicas: failover done");
    Ok(json!({ "quiet": quiet, "propagation": propagation, "failover": failover }))
}

fn spread(values: &[f64]) -> Value {
    json!({
        "median": median(values),
        "min": values.iter().copied().fold(f64::INFINITY, f64::min),
        "max": values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

/// Envoy with the poller on one cluster over every replica: the layout
/// before the poller chose replicas itself.
async fn one_cluster_envoy(dir: &Path, replicas: &[SocketAddr]) -> anyhow::Result<Envoy> {
    let template = std::fs::read_to_string(envoy_template_path())?;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let rendered = render_envoy_config(&template, listen, admin, replicas, &wasm_path())
        .replace(
            &format!("\"clusters\": {}", sync_cluster_names_json(replicas.len())),
            "\"cluster\": \"etcd_mesh_sync_all\"",
        )
        .replace(
            "\nadmin:",
            &format!(
                "  - name: etcd_mesh_sync_all\n    type: STATIC\n    connect_timeout: 1s\n    \
                 load_assignment:\n      cluster_name: etcd_mesh_sync_all\n      endpoints:\n      \
                 - lb_endpoints: {}\n\nadmin:",
                lb_endpoints_yaml(replicas)
            ),
        );
    Envoy::start_rendered(dir, &rendered, listen, admin, 2)
        .await
        .map_err(anyhow::Error::msg)
}

/// One endpoint in each of `services` services, put directly; the revision.
async fn fill(etcd: &Etcd, services: usize) -> anyhow::Result<u64> {
    let mut client = Client::connect([etcd.endpoint()], None).await?;
    let mut revision = 0;
    for i in 0..services {
        let addr = format!("127.0.0.{}:{}", 2 + i / 50_000, 10_000 + i % 50_000);
        let instance = Instance::new(DEMO_PREFIX, &format!("quiet.Svc{i}"), &addr);
        let put = client.put(instance.key(), instance.value(), None).await?;
        revision = put.header().map_or(0, |h| h.revision()) as u64;
    }
    Ok(revision)
}

/// Full loads per Envoy per minute with a quiet registry, each layout
/// watched over the same seconds.
async fn quiet_registry(options: &ReplicaOptions) -> anyhow::Result<Value> {
    let (mut replica_layout, mut one_cluster) = (Vec::new(), Vec::new());
    for _ in 0..options.rounds {
        let dir = tempfile::tempdir()?;
        let etcd = Etcd::start(dir.path()).await.map_err(anyhow::Error::msg)?;
        let revision = fill(&etcd, options.services).await?;
        let mut replicas = Vec::new();
        let mut stops = Vec::new();
        for _ in 0..2 {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let (addr, stop) = start_sync_server_on(vec![etcd.endpoint()], listener).await;
            replicas.push(addr);
            stops.push(stop);
        }
        let (new_dir, old_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let followed = Envoy::start(
            new_dir.path(),
            EnvoyOptions {
                sync_servers: replicas.clone(),
                ..EnvoyOptions::default()
            },
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let alternating = one_cluster_envoy(old_dir.path(), &replicas).await?;
        for envoy in [&followed, &alternating] {
            envoy
                .wait_for_revision(revision, DEADLINE)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let before = [
            followed.plugin_stat("updates_full").await,
            alternating.plugin_stat("updates_full").await,
        ];
        let window = Duration::from_secs(options.window_s);
        tokio::time::sleep(window).await;
        let per_minute = |after: u64, before: u64| {
            (after.saturating_sub(before)) as f64 * 60.0 / window.as_secs_f64()
        };
        replica_layout.push(per_minute(
            followed.plugin_stat("updates_full").await,
            before[0],
        ));
        one_cluster.push(per_minute(
            alternating.plugin_stat("updates_full").await,
            before[1],
        ));
        for stop in stops {
            stop.cancel();
        }
    }
    Ok(json!({
        "services": options.services,
        "window_s": options.window_s,
        "rounds": options.rounds,
        "full_loads_per_minute_replica_clusters": spread(&replica_layout),
        "full_loads_per_minute_one_cluster": spread(&one_cluster),
    }))
}

/// Put → first call and delete or drain → last call, through one replica
/// and through two (the poller following one of them), paired per round.
async fn propagation(options: &ReplicaOptions) -> anyhow::Result<Value> {
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..options.rounds {
        for (replicas, into) in [(1usize, &mut one), (2, &mut two)] {
            let dir = tempfile::tempdir()?;
            let etcd = Etcd::start(dir.path()).await.map_err(anyhow::Error::msg)?;
            let mut addrs = Vec::new();
            let mut stops = Vec::new();
            for _ in 0..replicas {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                let (addr, stop) = start_sync_server_on(vec![etcd.endpoint()], listener).await;
                addrs.push(addr);
                stops.push(stop);
            }
            let envoy = Envoy::start(
                dir.path(),
                EnvoyOptions {
                    sync_servers: addrs,
                    ..EnvoyOptions::default()
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            let base = Backend::registered(vec![etcd.endpoint()], 1).await;
            let mut probe = etcd_mesh_demo::client::connect(envoy.listen).await?;
            wait_for("the base backend to take calls", DEADLINE, || {
                let mut probe = probe.clone();
                async move {
                    etcd_mesh_demo::client::say(&mut probe, Default::default())
                        .await
                        .ok()
                }
            })
            .await
            .map_err(anyhow::Error::msg)?;
            probe = etcd_mesh_demo::client::connect(envoy.listen).await?;
            let figures = changes_to_traffic(probe, vec![etcd.endpoint()], options.cycles).await?;
            for kind in ["put_to_first_call", "delete_or_drain_to_last_call"] {
                let all = figures[kind]["all_ms"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                into.extend(all.iter().filter_map(Value::as_f64));
            }
            drop(base);
            for stop in stops {
                stop.cancel();
            }
        }
    }
    let summary = |ms: &[f64]| {
        json!({
            "changes": ms.len(),
            "p50_ms": percentile(ms, 50.0),
            "p99_ms": percentile(ms, 99.0),
            "max_ms": ms.iter().copied().fold(0.0, f64::max),
        })
    };
    Ok(json!({ "one_replica": summary(&one), "two_replicas": summary(&two) }))
}

/// The followed replica SIGKILLed or SIGSTOPped: how long until a change
/// made then reaches the Envoy, and the full loads it took.
async fn failover(rounds: usize) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    for (name, hang) in [("sigkill", false), ("sigstop", true)] {
        let (mut times, mut loads) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let dir = tempfile::tempdir()?;
            let etcd = Etcd::start(dir.path()).await.map_err(anyhow::Error::msg)?;
            let members = vec![etcd.endpoint()];
            let mut replicas = [
                SyncServerProcess::start(&members, &[]).await,
                SyncServerProcess::start(&members, &[]).await,
            ];
            let envoy = Envoy::start(
                dir.path(),
                EnvoyOptions {
                    sync_servers: replicas.iter().map(|r| r.addr).collect(),
                    ..EnvoyOptions::default()
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            let mut client = Client::connect(members.clone(), None).await?;
            let put = |i: u16| {
                Instance::new(
                    DEMO_PREFIX,
                    DEMO_SERVICE,
                    &format!("127.0.0.1:{}", 31_000 + i),
                )
            };
            let first = client.put(put(0).key(), put(0).value(), None).await?;
            envoy
                .wait_for_revision(first.header().map_or(0, |h| h.revision()) as u64, DEADLINE)
                .await
                .map_err(anyhow::Error::msg)?;
            let followed = envoy.plugin_stat("sync_replica").await as usize;
            let full = envoy.plugin_stat("updates_full").await;
            let cut = Instant::now();
            let _frozen = if hang {
                Some(Frozen::freeze(replicas[followed].pid()))
            } else {
                replicas[followed].kill();
                None
            };
            let change = client.put(put(1).key(), put(1).value(), None).await?;
            envoy
                .wait_for_revision(change.header().map_or(0, |h| h.revision()) as u64, DEADLINE)
                .await
                .map_err(anyhow::Error::msg)?;
            times.push(cut.elapsed().as_secs_f64() * 1e3);
            loads.push((envoy.plugin_stat("updates_full").await - full) as f64);
        }
        out.insert(
            name.into(),
            json!({ "rounds": rounds, "change_held_after_ms": spread(&times), "full_loads": spread(&loads) }),
        );
    }
    Ok(Value::Object(out))
}
