//! `make bench`: what etcd-mesh adds to each call, and how fast a change in
//! etcd reaches the traffic, measured side by side with Envoy's own
//! balancer in one run. Writes `bench/results.json` and `bench/RESULTS.md`;
//! `bench/plot.py` draws `bench/results.png` from the JSON.

#![forbid(unsafe_code)]

mod cost;
mod health;
mod ladder;
mod picker;
mod replicas;
mod report;
mod scale;
mod traffic;
mod util;

use clap::Parser;
use serde_json::json;
use std::path::PathBuf;

/// Runs the etcd-mesh benchmarks (loopback only, bounded).
#[derive(Debug, Parser)]
struct Cli {
    /// Interleaved rounds of the per-call cost runs.
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Calls per variant per round.
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// h2load clients and streams per client for the throughput runs.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    streams: usize,
    /// Calls and rate (per second) of the paced latency runs.
    #[arg(long, default_value_t = 2_000)]
    latency_calls: usize,
    #[arg(long, default_value_t = 1_000)]
    latency_rps: usize,
    /// Propagation cycles (four changes each).
    #[arg(long, default_value_t = 50)]
    cycles: usize,
    /// Calls of the split run.
    #[arg(long, default_value_t = 6_000)]
    split_calls: usize,
    /// The scale ladder: endpoints in etcd at each rung (growing; etcd is
    /// loaded incrementally, 10 endpoints per service).
    #[arg(long, value_delimiter = ',', default_values_t = [100_000, 1_000_000, 2_000_000])]
    ladder: Vec<usize>,
    /// Held change-feed long-polls at each rung, and up-to-date clients of
    /// its restart run with `digest`.
    #[arg(long, default_value_t = 10_000)]
    long_polls: usize,
    /// Clients of the restart run without `digest` (the *before*: each
    /// takes the whole tables).
    #[arg(long, default_value_t = 10)]
    before_clients: usize,
    /// Endpoints in the plugin's tables for the apply and propagation runs.
    #[arg(long, default_value_t = 100_000)]
    plugin_endpoints: usize,
    /// Propagation cycles with the plugin at scale (four changes each).
    #[arg(long, default_value_t = 25)]
    plugin_cycles: usize,
    /// Run only the scale section (and keep the other figures of the last
    /// results.json).
    #[arg(long)]
    scale_only: bool,
    /// Run only the per-call cost section (e.g. against another Envoy,
    /// with ETCD_MESH_ENVOY) and keep the other figures.
    #[arg(long, conflicts_with = "scale_only")]
    cost_only: bool,
    /// Rounds of the dead-backend runs (three variants each).
    #[arg(long, default_value_t = 5)]
    health_rounds: usize,
    /// Endpoints health-checked in the cost run.
    #[arg(long, default_value_t = 10_000)]
    health_endpoints: usize,
    /// Run only the health-check section and keep the other figures.
    #[arg(long, conflicts_with_all = ["scale_only", "cost_only"])]
    health_only: bool,
    /// Rounds of the replica runs (layouts side by side in each).
    #[arg(long, default_value_t = 5)]
    replica_rounds: usize,
    /// Seconds each layout is watched on the quiet registry.
    #[arg(long, default_value_t = 10)]
    replica_window_s: u64,
    /// Run only the replicas section and keep the other figures.
    #[arg(long, conflicts_with_all = ["scale_only", "cost_only", "health_only"])]
    replicas_only: bool,
    /// Rounds of the picker-update runs (the old update and the new one
    /// back to back in each).
    #[arg(long, default_value_t = 101)]
    picker_rounds: usize,
    /// Run only the picker-update section (native, no Envoy; seconds) and
    /// keep the other figures.
    #[arg(long, conflicts_with_all = ["scale_only", "cost_only", "health_only", "replicas_only"])]
    picker_only: bool,
    /// Measure nothing: write RESULTS.md anew from results.json (its
    /// figures and the *before* each section keeps).
    #[arg(long, conflicts_with_all = ["scale_only", "cost_only", "health_only", "replicas_only", "picker_only"])]
    report_only: bool,
    /// Where the results go.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let last: serde_json::Value = std::fs::read(cli.out.join("results.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    if cli.report_only {
        std::fs::write(
            cli.out.join("RESULTS.md"),
            report::markdown(&last, &last["before"]),
        )?;
        return Ok(());
    }
    let cost_options = cost::CostOptions {
        rounds: cli.rounds,
        calls: cli.calls,
        clients: cli.clients,
        streams: cli.streams,
        latency_calls: cli.latency_calls,
        latency_rps: cli.latency_rps,
    };
    let partial =
        cli.cost_only || cli.scale_only || cli.health_only || cli.replicas_only || cli.picker_only;
    let picker = if partial && !cli.picker_only {
        last["picker"].clone()
    } else {
        let picker = picker::run(&picker::PickerOptions {
            rounds: cli.picker_rounds,
        })?;
        eprintln!("picker done");
        picker
    };
    let replicas = if partial && !cli.replicas_only {
        last["replicas"].clone()
    } else {
        let replicas = replicas::run(&replicas::ReplicaOptions {
            rounds: cli.replica_rounds,
            services: 200,
            window_s: cli.replica_window_s,
            cycles: 10,
        })
        .await?;
        eprintln!("replicas done");
        replicas
    };
    let health = if partial && !cli.health_only {
        last["health"].clone()
    } else {
        let health = health::run(&health::HealthOptions {
            rounds: cli.health_rounds,
            endpoints: cli.health_endpoints,
            services: 100,
            window_s: 20,
        })
        .await?;
        eprintln!("health done");
        health
    };
    let (cost, propagation, split) = if cli.cost_only {
        let cost = cost::run(&cost_options).await?;
        (cost, last["propagation"].clone(), last["split"].clone())
    } else if partial {
        (
            last["cost"].clone(),
            last["propagation"].clone(),
            last["split"].clone(),
        )
    } else {
        let cost = cost::run(&cost_options).await?;
        eprintln!("cost done");
        let propagation = traffic::propagation(cli.cycles).await?;
        eprintln!("propagation done");
        let split = traffic::split_quality(cli.split_calls, 20).await?;
        eprintln!("split done");
        (cost, propagation, split)
    };
    let scale = if partial && !cli.scale_only {
        last["scale"].clone()
    } else {
        scale::run(&scale::ScaleOptions {
            ladder: ladder::LadderOptions {
                sizes: cli.ladder.clone(),
                long_polls: cli.long_polls,
                before_clients: cli.before_clients,
            },
            plugin_endpoints: cli.plugin_endpoints,
            plugin_cycles: cli.plugin_cycles,
        })
        .await?
    };
    // Each section says when it was measured, and keeps its own *before*:
    // the last committed figures when measured now, the ones it was shown
    // with when kept from an earlier run.
    let environment = report::environment();
    let before_file: serde_json::Value = std::fs::read(cli.out.join("before.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let measured_now = [
        ("cost", !partial || cli.cost_only),
        ("propagation", !partial),
        ("split", !partial),
        ("scale", !partial || cli.scale_only),
        ("health", !partial || cli.health_only),
        ("replicas", !partial || cli.replicas_only),
        ("picker", !partial || cli.picker_only),
    ];
    let mut measured = serde_json::Map::new();
    let mut before = serde_json::Map::new();
    for (section, now) in measured_now {
        let (date, figures) = if now {
            (environment["date"].clone(), before_file[section].clone())
        } else {
            let date = match &last["measured"][section] {
                serde_json::Value::Null => last["environment"]["date"].clone(),
                date => date.clone(),
            };
            let figures = match last.get("before") {
                Some(kept) => kept[section].clone(),
                None => before_file[section].clone(),
            };
            (date, figures)
        };
        measured.insert(section.into(), date);
        before.insert(section.into(), figures);
    }
    let results = json!({
        "environment": environment,
        "measured": measured,
        "before": before,
        "cost": cost,
        "propagation": propagation,
        "split": split,
        "scale": scale,
        "health": health,
        "replicas": replicas,
        "picker": picker,
    });
    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(
        cli.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(
        cli.out.join("RESULTS.md"),
        report::markdown(&results, &results["before"]),
    )?;
    eprintln!("wrote {}", cli.out.join("RESULTS.md").display());
    Ok(())
}
