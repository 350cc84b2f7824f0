//! Per-call cost: the same unary gRPC call through (a) nothing, (b) Envoy's
//! own ROUND_ROBIN, (c) that plus an empty wasm filter, (d) etcd-mesh with
//! the filter-state override and (e) etcd-mesh with the header override,
//! interleaved in rounds so that the machine's noise hits every variant.
//! Envoy runs with one worker; its CPU time per call comes from
//! `/proc/<pid>/stat`.

use crate::util::{cpu_seconds, h2load, median, percentile};
use etcd_mesh_demo::stack::{free_port, lb_endpoints_yaml, wasm_path, Envoy, EnvoyOptions};
use etcd_mesh_e2e::Mesh;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct CostOptions {
    pub rounds: usize,
    pub calls: usize,
    pub clients: usize,
    pub streams: usize,
    pub latency_calls: usize,
    pub latency_rps: usize,
}

struct Variant {
    name: &'static str,
    target: SocketAddr,
    envoy_pid: Option<u32>,
    cpu_us: Vec<f64>,
    rps: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

const NOOP_FILTER: &str = r#"
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: noop
                root_id: noop
                vm_config: { vm_id: noop, runtime: envoy.wasm.runtime.v8, code: { local: { filename: "{{WASM_PATH}}" } } }
                configuration: { "@type": type.googleapis.com/google.protobuf.StringValue, value: '{"role": "noop"}' }"#;

async fn static_envoy(
    dir: &Path,
    backends: &[SocketAddr],
    with_filter: bool,
) -> anyhow::Result<Envoy> {
    let template = std::fs::read_to_string(
        etcd_mesh_demo::stack::workspace_root().join("bench/envoy-static.yaml"),
    )?;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let filter = if with_filter {
        NOOP_FILTER.replace("{{WASM_PATH}}", &wasm_path().display().to_string())
    } else {
        String::new()
    };
    let rendered = template
        .replace("{{LISTEN_PORT}}", &listen.port().to_string())
        .replace("{{ADMIN_PORT}}", &admin.port().to_string())
        .replace("{{BACKENDS}}", &lb_endpoints_yaml(backends))
        .replace("{{EXTRA_FILTER}}", &filter);
    Envoy::start_rendered(dir, &rendered, listen, admin, 1)
        .await
        .map_err(anyhow::Error::msg)
}

pub async fn run(options: &CostOptions) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let mesh = Mesh::start(1).await;
    let backends = mesh.weighted_backends(&[1, 1, 1]).await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (b_dir, c_dir, e_dir) = (
        dir.path().join("b"),
        dir.path().join("c"),
        dir.path().join("e"),
    );
    for d in [&b_dir, &c_dir, &e_dir] {
        std::fs::create_dir_all(d)?;
    }
    let round_robin = static_envoy(&b_dir, &addrs, false).await?;
    let noop = static_envoy(&c_dir, &addrs, true).await?;
    let header = Envoy::start(
        &e_dir,
        EnvoyOptions {
            sync_servers: vec![mesh.sync_addr],
            concurrency: 1,
            router_config: Some(r#"{"role": "router", "host_override": "header"}"#.into()),
            header_override: true,
            ..EnvoyOptions::default()
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let revision = mesh.snapshot().await.map(|s| s.revision).unwrap_or(0);
    header
        .wait_for_revision(revision, std::time::Duration::from_secs(20))
        .await
        .map_err(anyhow::Error::msg)?;

    let mut variants = vec![
        Variant::new("a direct to one backend", addrs[0], None),
        Variant::new(
            "b Envoy ROUND_ROBIN",
            round_robin.listen,
            Some(round_robin.pid()),
        ),
        Variant::new("c b + empty wasm filter", noop.listen, Some(noop.pid())),
        Variant::new(
            "d etcd-mesh (filter state)",
            mesh.envoy.listen,
            Some(mesh.envoy.pid()),
        ),
        Variant::new("e etcd-mesh (header)", header.listen, Some(header.pid())),
    ];
    let body = dir.path().join("say.grpc");
    // An empty SayRequest in a gRPC frame: no compression, length 0.
    std::fs::write(&body, [0u8; 5])?;
    for variant in &variants {
        // Warm-up: connections, JIT, and proof that the path works.
        h2load(&variant.target.to_string(), &body, 500, 1, 10, None, None)?;
    }
    for round in 0..options.rounds {
        for variant in &mut variants {
            let before = variant.envoy_pid.map(cpu_seconds).transpose()?;
            let load = h2load(
                &variant.target.to_string(),
                &body,
                options.calls,
                options.clients,
                options.streams,
                None,
                None,
            )?;
            if let (Some(pid), Some(before)) = (variant.envoy_pid, before) {
                let used = cpu_seconds(pid)? - before;
                variant.cpu_us.push(used * 1e6 / options.calls as f64);
            }
            variant.rps.push(load.requests_per_second);
            let log = dir.path().join(format!("latency-{round}.log"));
            let paced = h2load(
                &variant.target.to_string(),
                &body,
                options.latency_calls,
                1,
                1,
                Some(options.latency_rps),
                Some(&log),
            )?;
            variant.p50_us.push(percentile(&paced.durations_us, 50.0));
            variant.p99_us.push(percentile(&paced.durations_us, 99.0));
        }
        eprintln!("cost: round {} of {} done", round + 1, options.rounds);
    }
    let cpu = |name: char| {
        variants
            .iter()
            .find(|v| v.name.starts_with(name))
            .map_or(f64::NAN, |v| median(&v.cpu_us))
    };
    Ok(json!({
        "options": {
            "rounds": options.rounds, "calls": options.calls, "clients": options.clients,
            "streams": options.streams, "latency_calls": options.latency_calls, "latency_rps": options.latency_rps,
            "envoy_concurrency": 1,
        },
        "variants": variants.iter().map(|v| json!({
            "name": v.name,
            "envoy_cpu_us_per_call": median(&v.cpu_us),
            "envoy_cpu_us_per_call_rounds": v.cpu_us,
            "requests_per_second": median(&v.rps),
            "p50_us": median(&v.p50_us),
            "p99_us": median(&v.p99_us),
        })).collect::<Vec<_>>(),
        "ratios": {
            "d_over_b": cpu('d') / cpu('b'),
            "d_over_c": cpu('d') / cpu('c'),
            "e_over_b": cpu('e') / cpu('b'),
            "e_over_c": cpu('e') / cpu('c'),
        },
    }))
}

impl Variant {
    fn new(name: &'static str, target: SocketAddr, envoy_pid: Option<u32>) -> Variant {
        Variant {
            name,
            target,
            envoy_pid,
            cpu_us: vec![],
            rps: vec![],
            p50_us: vec![],
            p99_us: vec![],
        }
    }
}
