//! Envoy with the etcd-mesh plugin, from `envoy/etcd-mesh.yaml`, and where
//! the binaries of the checkout are.

use crate::{free_port, http_get, wait_for, Proc};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The root of the etcd-mesh checkout.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The Envoy binary: `$ETCD_MESH_ENVOY` (the Makefile sets it to the venv of
/// `ENVOY_VERSION`), or the project's own venv with the default version.
pub fn envoy_bin() -> PathBuf {
    std::env::var_os("ETCD_MESH_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/envoy"))
}

/// The plugin: `$ETCD_MESH_WASM`, or the release build.
pub fn wasm_path() -> PathBuf {
    std::env::var_os("ETCD_MESH_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/wasm32-unknown-unknown/release/etcd_mesh_plugin.wasm")
        })
}

/// How to start Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// The gRPC listener; 0 picks a free port.
    pub listen_port: u16,
    /// The admin interface; 0 picks a free port.
    pub admin_port: u16,
    /// The sync-server replicas the plugin polls.
    pub sync_servers: Vec<SocketAddr>,
    pub concurrency: u32,
    /// The HTTP filter's plugin configuration, if not the template's.
    pub router_config: Option<String>,
    /// Let the ORIGINAL_DST cluster obey `x-envoy-original-dst-host` (for a
    /// router configured with `"host_override": "header"`).
    pub header_override: bool,
    /// The poller's configuration JSON, if not the template's;
    /// `{{SYNC_CLUSTER_NAMES}}` in it becomes the replicas' cluster list.
    pub poller_config: Option<String>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            listen_port: 0,
            admin_port: 0,
            sync_servers: vec![],
            concurrency: 2,
            router_config: None,
            header_override: false,
            poller_config: None,
        }
    }
}

/// The router configuration as the template writes it.
const TEMPLATE_ROUTER_CONFIG: &str = r#"'{"role": "router"}'"#;
/// The poller configuration as the template writes it.
const TEMPLATE_POLLER_CONFIG: &str = r#"'{"role": "poller", "clusters": {{SYNC_CLUSTER_NAMES}}, "authority": "sync-server", "wait_seconds": 30}'"#;

/// Envoy with the etcd-mesh plugin, from `envoy/etcd-mesh.yaml`.
#[derive(Debug)]
pub struct Envoy {
    proc: Proc,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
}

/// The Envoy configuration template, with `{{...}}` placeholders.
pub fn envoy_template_path() -> PathBuf {
    workspace_root().join("envoy/etcd-mesh.yaml")
}

/// `addrs` as the YAML flow list of an Envoy `lb_endpoints`.
pub fn lb_endpoints_yaml(addrs: &[SocketAddr]) -> String {
    let endpoints: Vec<String> = addrs
        .iter()
        .map(|a| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!("[{}]", endpoints.join(", "))
}

/// The name of the Envoy cluster of sync-server replica `i`.
pub fn sync_cluster_name(i: usize) -> String {
    format!("etcd_mesh_sync_{i}")
}

/// One STATIC Envoy cluster per sync-server replica (the plugin follows
/// one and fails over itself), as YAML list items of `clusters:`.
pub fn sync_clusters_yaml(sync_servers: &[SocketAddr]) -> String {
    sync_servers
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let name = sync_cluster_name(i);
            format!(
                "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints: {}\n",
                lb_endpoints_yaml(std::slice::from_ref(addr))
            )
        })
        .collect()
}

/// The poller's `clusters` value: a JSON list of the replicas' clusters.
pub fn sync_cluster_names_json(replicas: usize) -> String {
    let names: Vec<String> = (0..replicas)
        .map(|i| format!("\"{}\"", sync_cluster_name(i)))
        .collect();
    format!("[{}]", names.join(", "))
}

/// Fills in the template's placeholders.
pub fn render_envoy_config(
    template: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    sync_servers: &[SocketAddr],
    wasm: &Path,
) -> String {
    template
        .replace("{{SYNC_CLUSTERS}}\n", &sync_clusters_yaml(sync_servers))
        .replace(
            "{{SYNC_CLUSTER_NAMES}}",
            &sync_cluster_names_json(sync_servers.len()),
        )
        .replace("{{LISTEN_ADDRESS}}", &listen.ip().to_string())
        .replace("{{LISTEN_PORT}}", &listen.port().to_string())
        .replace("{{ADMIN_ADDRESS}}", &admin.ip().to_string())
        .replace("{{ADMIN_PORT}}", &admin.port().to_string())
        .replace("{{WASM_PATH}}", &wasm.display().to_string())
}

impl Envoy {
    pub async fn start(dir: &Path, options: EnvoyOptions) -> Result<Envoy, String> {
        let pick = |port: u16| {
            if port == 0 {
                free_port().map_err(|e| e.to_string())
            } else {
                Ok(port)
            }
        };
        let wasm = wasm_path();
        if !wasm.exists() {
            return Err(format!("no plugin at {}: run `make build`", wasm.display()));
        }
        let mut template =
            std::fs::read_to_string(envoy_template_path()).map_err(|e| e.to_string())?;
        if let Some(poller) = &options.poller_config {
            template = template.replace(TEMPLATE_POLLER_CONFIG, &format!("'{poller}'"));
        }
        // A port picked here was free when picked, not necessarily when Envoy
        // binds it (an outgoing connection can take it in between): then
        // Envoy exits at once, and fresh ports are picked.
        let picked = options.listen_port == 0 || options.admin_port == 0;
        let mut tries_left = if picked { 3 } else { 1 };
        loop {
            let listen = SocketAddr::from(([127, 0, 0, 1], pick(options.listen_port)?));
            let admin = SocketAddr::from(([127, 0, 0, 1], pick(options.admin_port)?));
            let mut rendered =
                render_envoy_config(&template, listen, admin, &options.sync_servers, &wasm);
            if let Some(router) = &options.router_config {
                rendered = rendered.replace(TEMPLATE_ROUTER_CONFIG, &format!("'{router}'"));
            }
            if options.header_override {
                rendered = rendered.replace("use_http_header: false", "use_http_header: true");
            }
            tries_left -= 1;
            match Self::start_rendered(dir, &rendered, listen, admin, options.concurrency).await {
                Err(e) if tries_left > 0 && e.contains("Address already in use") => continue,
                started => return started,
            }
        }
    }

    /// Starts Envoy with a configuration already rendered, listening on
    /// `listen` with its admin on `admin`.
    pub async fn start_rendered(
        dir: &Path,
        rendered: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        concurrency: u32,
    ) -> Result<Envoy, String> {
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, rendered).map_err(|e| e.to_string())?;
        let mut command = Command::new(envoy_bin());
        command
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--disable-hot-restart", "--log-level", "warn"]);
        let proc =
            Proc::spawn("envoy", command, dir.join("envoy.log")).map_err(|e| e.to_string())?;
        let mut envoy = Envoy {
            proc,
            listen,
            admin,
            config,
        };
        // Ready, or gone (a configuration Envoy refuses): whichever comes first.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if envoy.proc.exited() {
                return Err(format!("Envoy exited\n{}", envoy.proc.log_tail(30)));
            }
            if let Ok((200, _)) = http_get(admin, "/ready").await {
                return Ok(envoy);
            }
            if Instant::now() >= deadline {
                let tail = envoy.proc.log_tail(30);
                return Err(format!(
                    "timed out after 30s waiting for Envoy /ready\n{tail}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A stat from the admin interface (`wasmcustom.etcd_mesh.*` for the
    /// plugin's own), or `None` if Envoy has not created it yet.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let (status, body) = http_get(self.admin, &format!("/stats?filter=^{name}$"))
            .await
            .ok()?;
        if status != 200 {
            return None;
        }
        body.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Every stat whose name matches the regular expression `pattern`.
    pub async fn stats_matching(&self, pattern: &str) -> Vec<(String, u64)> {
        let Ok((200, body)) = http_get(self.admin, &format!("/stats?filter={pattern}")).await
        else {
            return Vec::new();
        };
        body.lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// Waits until the plugin holds tables at `revision` or newer: the
    /// poller, and every worker (each reads new tables on its tick).
    pub async fn wait_for_revision(&self, revision: u64, timeout: Duration) -> Result<(), String> {
        let what = format!("the plugin's poller and workers to hold revision {revision}");
        self.wait_for_tables(&what, "table_revision", timeout, |held| held >= revision)
            .await
    }

    /// Waits until the poller and every worker hold tables of `digest`
    /// (sync-server's `sync_server_tables_digest`): what a health change,
    /// which moves no revision, is waited on by.
    pub async fn wait_for_digest(&self, digest: u64, timeout: Duration) -> Result<(), String> {
        let what = format!("the plugin's poller and workers to hold digest {digest}");
        self.wait_for_tables(&what, "table_digest", timeout, |held| held == digest)
            .await
    }

    /// Waits until the poller's gauge `etcd_mesh.<gauge>` and every
    /// worker's `etcd_mesh.worker_<n>.<gauge>` satisfy `holds`.
    async fn wait_for_tables(
        &self,
        what: &str,
        gauge: &str,
        timeout: Duration,
        holds: impl Fn(u64) -> bool,
    ) -> Result<(), String> {
        let holds = &holds;
        wait_for(what, timeout, || async move {
            let poller = self.stat(&format!("wasmcustom.etcd_mesh.{gauge}")).await?;
            let workers = self
                .stats_matching(&format!("^wasmcustom.etcd_mesh.worker_[0-9]*.{gauge}$"))
                .await;
            (holds(poller) && !workers.is_empty() && workers.iter().all(|(_, v)| holds(*v)))
                .then_some(())
        })
        .await
        .map_err(|e| format!("{e}\n{}", self.proc.log_tail(30)))
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}
