//! `make run`: the whole mesh on this machine, on well-known loopback ports.
//!
//! Starts etcd, sync-server, three `demo.Echo` backends (weights 1, 2, 3)
//! and Envoy with the plugin; sends 600 calls through Envoy and prints how
//! many each backend served; then keeps everything up until Ctrl-C or
//! SIGTERM, and stops every process it started. sync-server also serves
//! the browser console at `/ui/`.

use etcd_mesh_demo::client::{connect, split};
use etcd_mesh_demo::{wait_for_stop_signal, DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_testkit::{
    ensure_free, fetch_snapshot, free_port, http_get, wait_for, wait_ready, Envoy, EnvoyOptions,
    Etcd, Proc,
};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

const ETCD_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
const SYNC_PORT: u16 = 8090;
const ENVOY_PORT: u16 = 10000;
const ADMIN_PORT: u16 = 9901;
const WEIGHTS: [u32; 3] = [1, 2, 3];
const CALLS: usize = 600;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd-mesh demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    for (port, what) in [
        (ETCD_PORT, "etcd"),
        (ETCD_PEER_PORT, "etcd peer"),
        (SYNC_PORT, "sync-server"),
        (ENVOY_PORT, "Envoy gRPC listener"),
        (ADMIN_PORT, "Envoy admin"),
    ] {
        ensure_free(port, what)?;
    }
    let bin_dir = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .parent()
        .map(Path::to_path_buf)
        .ok_or("cannot find the binaries' directory")?;
    let dir = tempfile::Builder::new()
        .prefix("etcd-mesh-demo-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let logs = dir.path();
    println!("etcd-mesh demo (logs and data in {})", logs.display());

    let etcd = Etcd::start_on(logs, ETCD_PORT, ETCD_PEER_PORT).await?;
    println!("  etcd          {}", etcd.endpoint());

    let sync_addr = SocketAddr::from(([127, 0, 0, 1], SYNC_PORT));
    let mut command = Command::new(bin_dir.join("sync-server"));
    command
        .args([
            "--etcd",
            &etcd.endpoint(),
            "--listen",
            &sync_addr.to_string(),
        ])
        .args(["--watch", &format!("etcd-naming={DEMO_PREFIX}")])
        // Health checks on, so that a backend killed with SIGKILL leaves
        // the mesh within 1.5 s: 3 failed checks, 500 ms apart.
        .args(["--health-checks", "--health-interval", "500ms"])
        .args(["--health-unhealthy-threshold", "3"]);
    let sync = Proc::spawn("sync-server", command, logs.join("sync-server.log"))
        .map_err(|e| e.to_string())?;
    wait_ready(sync_addr, Duration::from_secs(20))
        .await
        .map_err(|e| format!("{e}\n{}", sync.log_tail(20)))?;
    println!("  sync-server   http://{sync_addr}/v1/snapshot");
    // A sync-server built before the console answers /ui/ with 404 and how
    // to build it: say so here too.
    let console = match http_get(sync_addr, "/ui/").await {
        Ok((200, _)) => String::new(),
        _ => "  (not built in: scripts/build-console.sh, then rebuild sync-server)".into(),
    };
    println!("  console       http://{sync_addr}/ui/{console}");

    let mut backends = Vec::new();
    for weight in WEIGHTS {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port().map_err(|e| e.to_string())?));
        let mut command = Command::new(bin_dir.join("demo-backend"));
        command
            .args(["--etcd", &etcd.endpoint(), "--listen", &addr.to_string()])
            .args(["--weight", &weight.to_string()]);
        let log = logs.join(format!("backend-{}.log", addr.port()));
        backends.push((
            addr,
            weight,
            Proc::spawn("demo-backend", command, log).map_err(|e| e.to_string())?,
        ));
        println!("  backend       {addr}  weight {weight}  ({DEMO_SERVICE})");
    }

    let options = EnvoyOptions {
        listen_port: ENVOY_PORT,
        admin_port: ADMIN_PORT,
        sync_servers: vec![sync_addr],
        concurrency: 2,
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start(logs, options).await?;
    println!(
        "  envoy         gRPC {}  admin http://{}  config {}",
        envoy.listen,
        envoy.admin,
        envoy.config.display()
    );

    let revision = wait_for(
        "sync-server to list 3 backends",
        Duration::from_secs(20),
        || async {
            let snapshot = fetch_snapshot(sync_addr).await?;
            let listed = snapshot.services.get(DEMO_SERVICE)?.endpoints.len();
            (listed == WEIGHTS.len()).then_some(snapshot.revision)
        },
    )
    .await?;
    envoy
        .wait_for_revision(revision, Duration::from_secs(20))
        .await?;

    let client = connect(envoy.listen).await.map_err(|e| e.to_string())?;
    let counts = split(&[client], CALLS).await.map_err(|e| e.to_string())?;
    let total_weight: u32 = WEIGHTS.iter().sum();
    println!("\n{CALLS} calls to {DEMO_SERVICE}/Say through Envoy:");
    for (addr, weight, _) in &backends {
        let served = counts.get(&addr.to_string()).copied().unwrap_or(0);
        println!(
            "  {addr}  weight {weight}  served {served:>4}  ({:.1}%, ideal {:.1}%)",
            100.0 * served as f64 / CALLS as f64,
            100.0 * f64::from(*weight) / f64::from(total_weight)
        );
    }
    println!(
        "\nThe mesh is up. Call it on {} (any gRPC client, plaintext HTTP/2);",
        envoy.listen
    );
    println!("watch http://{sync_addr}/v1/snapshot change as backends come and go.");
    println!(
        "Health checks run every 500 ms: `kill -9` a demo-backend and its endpoint turns\n\
         \"unhealthy\" there within 1.5 s, and Envoy stops sending it calls."
    );
    println!("Ctrl-C stops everything.");

    wait_for_stop_signal().await;
    println!("\nstopping...");
    // Backends first, by SIGTERM, so they deregister cleanly.
    for (_, _, mut backend) in backends {
        backend.terminate(Duration::from_secs(5));
    }
    drop(envoy);
    drop(sync);
    drop(etcd);
    Ok(())
}
