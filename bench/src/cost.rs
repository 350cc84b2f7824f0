//! Per-call cost, as a ladder: the same unary gRPC call through nothing,
//! Envoy's own ROUND_ROBIN, that plus an empty wasm filter, the empty
//! filter plus exactly one named host call (the version read, the `:path`
//! read, the response `grpc-status` read, the override as filter state or
//! header on an ORIGINAL_DST cluster — the floor of any wasm filter that
//! picks the host), and etcd-mesh itself; one worker, and the baseline and
//! etcd-mesh again with two. Variants are interleaved in rounds so that
//! the machine's noise hits every one, and each ratio is computed inside a
//! round (numerator and denominator measured back to back) before the
//! median over rounds is taken. Envoy's CPU time per call comes from
//! `/proc/<pid>/stat`.

use crate::util::{cpu_seconds, h2load, median, percentile};
use etcd_mesh_e2e::Mesh;
use etcd_mesh_testkit::{free_port, lb_endpoints_yaml, Envoy, EnvoyOptions};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    key: &'static str,
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
                configuration: { "@type": type.googleapis.com/google.protobuf.StringValue, value: '{{NOOP_CONFIG}}' }"#;

/// The plugin built with the `bench-noop` feature, which the noop filter
/// needs (the shipped module refuses `"role": "noop"`): `$ETCD_MESH_NOOP_WASM`,
/// or what scripts/bench.sh builds into target/bench-noop.
fn noop_wasm_path() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("ETCD_MESH_NOOP_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            etcd_mesh_testkit::workspace_root()
                .join("target/bench-noop/wasm32-unknown-unknown/wasm/etcd_mesh_plugin.wasm")
        });
    anyhow::ensure!(
        path.exists(),
        "no plugin with the noop role at {}; build it with `CARGO_TARGET_DIR=target/bench-noop \
         scripts/build-wasm.sh etcd-mesh-plugin --features bench-noop` (scripts/bench.sh does)",
        path.display()
    );
    Ok(path)
}

/// Where a static Envoy sends calls.
#[derive(Clone, Copy)]
enum Upstream {
    RoundRobin,
    /// ORIGINAL_DST, reading the filter state (or, with `true`, the header).
    OriginalDst(bool),
}

async fn static_envoy(
    dir: &Path,
    backends: &[SocketAddr],
    noop: Option<String>,
    upstream: Upstream,
    concurrency: u32,
) -> anyhow::Result<Envoy> {
    std::fs::create_dir_all(dir)?;
    let template = std::fs::read_to_string(
        etcd_mesh_testkit::workspace_root().join("bench/envoy-static.yaml"),
    )?;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let filter = match noop {
        Some(config) => NOOP_FILTER
            .replace("{{WASM_PATH}}", &noop_wasm_path()?.display().to_string())
            .replace("{{NOOP_CONFIG}}", &config),
        None => String::new(),
    };
    let (cluster, header) = match upstream {
        Upstream::RoundRobin => ("backends", false),
        Upstream::OriginalDst(header) => ("original_dst", header),
    };
    let rendered = template
        .replace("{{LISTEN_PORT}}", &listen.port().to_string())
        .replace("{{ADMIN_PORT}}", &admin.port().to_string())
        .replace("{{BACKENDS}}", &lb_endpoints_yaml(backends))
        .replace("{{EXTRA_FILTER}}", &filter)
        .replace("{{CLUSTER}}", cluster)
        .replace("{{USE_HTTP_HEADER}}", &header.to_string());
    Envoy::start_rendered(dir, &rendered, listen, admin, concurrency)
        .await
        .map_err(anyhow::Error::msg)
}

fn noop(call: &str, addr: SocketAddr) -> Option<String> {
    Some(format!(
        r#"{{"role": "noop", "call": "{call}", "addr": "{addr}"}}"#
    ))
}

/// The paired ratios: (name, numerator, denominator, goal).
const RATIOS: [(&str, &str, &str, &str); 11] = [
    ("empty filter / ROUND_ROBIN", "c", "b", ""),
    ("+ version read / empty filter", "c_version", "c", ""),
    ("+ :path read / empty filter", "c_path", "c", ""),
    ("+ grpc-status read / empty filter", "c_status", "c", ""),
    (
        "+ filter-state override on ORIGINAL_DST (the floor) / empty filter",
        "f",
        "c",
        "",
    ),
    (
        "+ header override on ORIGINAL_DST / empty filter",
        "f_header",
        "c",
        "",
    ),
    ("etcd-mesh / the floor", "d", "f", "≤ 1.02"),
    ("etcd-mesh / empty filter", "d", "c", "≤ 1.10"),
    ("etcd-mesh / ROUND_ROBIN", "d", "b", ""),
    ("etcd-mesh (header) / header floor", "e", "f_header", ""),
    ("two workers: etcd-mesh / ROUND_ROBIN", "d2", "b2", ""),
];

pub async fn run(options: &CostOptions) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let mesh = Mesh::start(1).await;
    let backends = mesh.weighted_backends(&[1, 1, 1]).await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let d = |name: &str| dir.path().join(name);
    let one = addrs[0];
    let b = static_envoy(&d("b"), &addrs, None, Upstream::RoundRobin, 1).await?;
    let b2 = static_envoy(&d("b2"), &addrs, None, Upstream::RoundRobin, 2).await?;
    let c = static_envoy(&d("c"), &addrs, noop("none", one), Upstream::RoundRobin, 1).await?;
    let c_version = static_envoy(
        &d("cv"),
        &addrs,
        noop("version_read", one),
        Upstream::RoundRobin,
        1,
    )
    .await?;
    let c_path = static_envoy(
        &d("cp"),
        &addrs,
        noop("path_read", one),
        Upstream::RoundRobin,
        1,
    )
    .await?;
    let c_status = static_envoy(
        &d("cs"),
        &addrs,
        noop("grpc_status_read", one),
        Upstream::RoundRobin,
        1,
    )
    .await?;
    let f = static_envoy(
        &d("f"),
        &addrs,
        noop("filter_state", one),
        Upstream::OriginalDst(false),
        1,
    )
    .await?;
    let f_header = static_envoy(
        &d("fh"),
        &addrs,
        noop("header_override", one),
        Upstream::OriginalDst(true),
        1,
    )
    .await?;
    let mesh_envoy = |name: &str, router: Option<&str>, header: bool, concurrency: u32| {
        let dir = d(name);
        let options = EnvoyOptions {
            sync_servers: vec![mesh.sync_addr],
            concurrency,
            router_config: router.map(str::to_owned),
            header_override: header,
            ..EnvoyOptions::default()
        };
        async move {
            std::fs::create_dir_all(&dir)?;
            Envoy::start(&dir, options)
                .await
                .map_err(anyhow::Error::msg)
        }
    };
    let e = mesh_envoy(
        "e",
        Some(r#"{"role": "router", "host_override": "header"}"#),
        true,
        1,
    )
    .await?;
    let d2 = mesh_envoy("d2", None, false, 2).await?;
    let revision = mesh.snapshot().await.map(|s| s.revision).unwrap_or(0);
    for envoy in [&e, &d2] {
        envoy
            .wait_for_revision(revision, std::time::Duration::from_secs(20))
            .await
            .map_err(anyhow::Error::msg)?;
    }

    let mut variants = vec![
        Variant::new("a", "a direct to one backend", one, None),
        Variant::new("b", "b Envoy ROUND_ROBIN", b.listen, Some(b.pid())),
        Variant::new("c", "c b + empty wasm filter", c.listen, Some(c.pid())),
        Variant::new(
            "c_version",
            "c + the version read",
            c_version.listen,
            Some(c_version.pid()),
        ),
        Variant::new(
            "c_path",
            "c + the :path read",
            c_path.listen,
            Some(c_path.pid()),
        ),
        Variant::new(
            "c_status",
            "c + the response grpc-status read",
            c_status.listen,
            Some(c_status.pid()),
        ),
        Variant::new(
            "f",
            "f c + filter-state override, ORIGINAL_DST (floor)",
            f.listen,
            Some(f.pid()),
        ),
        Variant::new(
            "f_header",
            "f' c + header override, ORIGINAL_DST",
            f_header.listen,
            Some(f_header.pid()),
        ),
        Variant::new(
            "d",
            "d etcd-mesh (filter state)",
            mesh.envoy.listen,
            Some(mesh.envoy.pid()),
        ),
        Variant::new("e", "e etcd-mesh (header)", e.listen, Some(e.pid())),
        Variant::new("b2", "b, two workers", b2.listen, Some(b2.pid())),
        Variant::new("d2", "d, two workers", d2.listen, Some(d2.pid())),
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
    let find = |key: &str| variants.iter().find(|v| v.key == key);
    let paired = |num: &str, den: &str, of: fn(&Variant) -> &Vec<f64>| -> Value {
        let (Some(n), Some(d)) = (find(num), find(den)) else {
            return Value::Null;
        };
        let per_round: Vec<f64> = of(n).iter().zip(of(d)).map(|(n, d)| n / d).collect();
        json!({
            "median": median(&per_round),
            "min": per_round.iter().copied().fold(f64::INFINITY, f64::min),
            "max": per_round.iter().copied().fold(0.0, f64::max),
            "rounds": per_round,
        })
    };
    let ladder: Vec<Value> = RATIOS
        .iter()
        .map(|(name, num, den, goal)| {
            json!({"name": name, "cpu": paired(num, den, |v| &v.cpu_us), "goal": goal})
        })
        .collect();
    let cpu = |key: &str| paired(key, "b", |v| &v.cpu_us)["median"].clone();
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
        "ladder": ladder,
        "throughput_d_over_b": paired("d", "b", |v| &v.rps),
        "ratios": {
            "d_over_b": cpu("d"),
            "d_over_c": paired("d", "c", |v| &v.cpu_us)["median"],
            "d_over_f": paired("d", "f", |v| &v.cpu_us)["median"],
            "e_over_b": cpu("e"),
            "e_over_c": paired("e", "c", |v| &v.cpu_us)["median"],
        },
    }))
}

impl Variant {
    fn new(
        key: &'static str,
        name: &'static str,
        target: SocketAddr,
        envoy_pid: Option<u32>,
    ) -> Variant {
        Variant {
            key,
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
