//! Envoy with the etcd-mesh plugin, from `envoy/etcd-mesh.yaml` (or
//! `envoy/etcd-mesh-tls.yaml`, TLS to sync-server), where the binaries of
//! the checkout are, and the test certificates of the TLS layout
//! ([`TestCa`], made with openssl).

mod certs;
mod hot_restart;

pub use certs::*;
pub use hot_restart::*;

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

/// The plugin: `$ETCD_MESH_WASM`, or the build of the `wasm` profile.
pub fn wasm_path() -> PathBuf {
    std::env::var_os("ETCD_MESH_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join("target/wasm32-unknown-unknown/wasm/etcd_mesh_plugin.wasm")
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
    /// The configuration template, if not `envoy/etcd-mesh.yaml` (with
    /// `sync_tls`: `envoy/etcd-mesh-tls.yaml` when `None`).
    pub template: Option<PathBuf>,
    /// TLS to the sync-server replicas: each replica's cluster gets the
    /// transport socket, and the TLS template's placeholders are filled.
    pub sync_tls: Option<TlsUpstream>,
    /// More Envoy arguments (`--component-log-level connection:debug`).
    pub extra_args: Vec<String>,
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
            template: None,
            sync_tls: None,
            extra_args: Vec::new(),
        }
    }
}

/// The router configuration as the template writes it.
const TEMPLATE_ROUTER_CONFIG: &str = r#"'{"role": "router"}'"#;
/// The poller configuration as the template writes it.
const TEMPLATE_POLLER_CONFIG: &str = r#"'{"role": "poller", "clusters": {{SYNC_CLUSTER_NAMES}}, "authority": "sync-server", "wait_seconds": 30}'"#;
/// The poller configuration as the TLS template writes it.
const TLS_TEMPLATE_POLLER_CONFIG: &str = r#"'{"role": "poller", "clusters": {{SYNC_CLUSTER_NAMES}}, "authority": "sync-server", "wait_seconds": 30, "bearer_token": "{{SYNC_TOKEN}}"}'"#;

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

/// The TLS template: `envoy/etcd-mesh.yaml` with TLS to sync-server.
pub fn envoy_tls_template_path() -> PathBuf {
    workspace_root().join("envoy/etcd-mesh-tls.yaml")
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
        .map(|(i, addr)| sync_cluster_yaml(i, *addr))
        .collect()
}

/// The cluster of replica `i` at `addr`, without a transport socket.
fn sync_cluster_yaml(i: usize, addr: SocketAddr) -> String {
    let name = sync_cluster_name(i);
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints: {}\n",
        lb_endpoints_yaml(&[addr])
    )
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

/// TLS from Envoy to the sync-server replicas, what fills the TLS
/// template's placeholders.
#[derive(Debug, Clone)]
pub struct TlsUpstream {
    /// `{{SYNC_CA}}`: the CA sync-server's certificate must chain to.
    pub ca: PathBuf,
    /// `{{SYNC_SNI}}`: the name sent as SNI, which sync-server's
    /// certificate must carry as a DNS subject alternative name.
    pub sni: String,
    /// `{{SYNC_CLIENT_CERT}}` and `{{SYNC_CLIENT_KEY}}`: Envoy's client
    /// certificate, for a sync-server started with `--tls-client-ca`;
    /// without it the clusters present none.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `{{SYNC_TOKEN}}`: the poller's `bearer_token` (the content of
    /// sync-server's `--token-file`); without it the poller sends none.
    pub token: Option<String>,
}

/// The transport socket of one sync-server cluster, with the TLS
/// template's placeholders (as `envoy/etcd-mesh-tls.yaml` shows it), at a
/// cluster field's indentation.
pub fn sync_transport_socket_yaml(client_cert: bool) -> String {
    let mut yaml = String::from(
        "    transport_socket:\n\
         \x20     name: envoy.transport_sockets.tls\n\
         \x20     typed_config:\n\
         \x20       \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n\
         \x20       sni: \"{{SYNC_SNI}}\"\n\
         \x20       common_tls_context:\n\
         \x20         validation_context:\n\
         \x20           trusted_ca: { filename: \"{{SYNC_CA}}\" }\n\
         \x20           match_typed_subject_alt_names:\n\
         \x20           - san_type: DNS\n\
         \x20             matcher: { exact: \"{{SYNC_SNI}}\" }\n",
    );
    if client_cert {
        yaml.push_str(
            "          tls_certificates:\n\
             \x20         - certificate_chain: { filename: \"{{SYNC_CLIENT_CERT}}\" }\n\
             \x20           private_key: { filename: \"{{SYNC_CLIENT_KEY}}\" }\n",
        );
    }
    yaml
}

/// Fills the TLS placeholders (`{{SYNC_CA}}`, `{{SYNC_SNI}}`,
/// `{{SYNC_CLIENT_CERT}}`, `{{SYNC_CLIENT_KEY}}`, `{{SYNC_TOKEN}}`) in
/// `text`; without a token, the poller's `bearer_token` goes.
pub fn fill_tls_placeholders(text: &str, tls: &TlsUpstream) -> String {
    let mut text = text
        .replace("{{SYNC_CA}}", &tls.ca.display().to_string())
        .replace("{{SYNC_SNI}}", &tls.sni);
    if let Some((cert, key)) = &tls.client_cert {
        text = text
            .replace("{{SYNC_CLIENT_CERT}}", &cert.display().to_string())
            .replace("{{SYNC_CLIENT_KEY}}", &key.display().to_string());
    }
    match &tls.token {
        Some(token) => text.replace("{{SYNC_TOKEN}}", token),
        None => text.replace(r#", "bearer_token": "{{SYNC_TOKEN}}""#, ""),
    }
}

/// [`sync_clusters_yaml`] with the TLS transport socket in every cluster,
/// placeholders left for [`fill_tls_placeholders`].
fn sync_clusters_tls_template(sync_servers: &[SocketAddr], client_cert: bool) -> String {
    let socket = sync_transport_socket_yaml(client_cert);
    sync_servers
        .iter()
        .enumerate()
        .map(|(i, addr)| sync_cluster_yaml(i, *addr) + &socket)
        .collect()
}

/// One STATIC cluster per sync-server replica, each speaking TLS to it as
/// `tls` says (filled in), as YAML list items of `clusters:`.
pub fn sync_clusters_tls_yaml(sync_servers: &[SocketAddr], tls: &TlsUpstream) -> String {
    fill_tls_placeholders(
        &sync_clusters_tls_template(sync_servers, tls.client_cert.is_some()),
        tls,
    )
}

/// Fills in the TLS template (`envoy/etcd-mesh-tls.yaml`): its clusters
/// speak TLS to the replicas, and every placeholder is filled.
pub fn render_envoy_tls_config(
    template: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    sync_servers: &[SocketAddr],
    wasm: &Path,
    tls: &TlsUpstream,
) -> String {
    let clusters = sync_clusters_tls_template(sync_servers, tls.client_cert.is_some());
    let template = template.replace("{{SYNC_CLUSTERS}}\n", &clusters);
    fill_tls_placeholders(
        &render_envoy_config(&template, listen, admin, sync_servers, wasm),
        tls,
    )
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
        let template_path = match (&options.template, &options.sync_tls) {
            (Some(path), _) => path.clone(),
            (None, Some(_)) => envoy_tls_template_path(),
            (None, None) => envoy_template_path(),
        };
        let mut template = std::fs::read_to_string(&template_path)
            .map_err(|e| format!("{}: {e}", template_path.display()))?;
        if let Some(poller) = &options.poller_config {
            template = template
                .replace(TEMPLATE_POLLER_CONFIG, &format!("'{poller}'"))
                .replace(TLS_TEMPLATE_POLLER_CONFIG, &format!("'{poller}'"));
        }
        // A port picked here was free when picked, not necessarily when Envoy
        // binds it (an outgoing connection can take it in between): then
        // Envoy exits at once, and fresh ports are picked.
        let picked = options.listen_port == 0 || options.admin_port == 0;
        let mut tries_left = if picked { 3 } else { 1 };
        loop {
            let listen = SocketAddr::from(([127, 0, 0, 1], pick(options.listen_port)?));
            let admin = SocketAddr::from(([127, 0, 0, 1], pick(options.admin_port)?));
            let mut rendered = match &options.sync_tls {
                Some(tls) => render_envoy_tls_config(
                    &template,
                    listen,
                    admin,
                    &options.sync_servers,
                    &wasm,
                    tls,
                ),
                None => render_envoy_config(&template, listen, admin, &options.sync_servers, &wasm),
            };
            if let Some(router) = &options.router_config {
                rendered = rendered.replace(TEMPLATE_ROUTER_CONFIG, &format!("'{router}'"));
            }
            if options.header_override {
                rendered = rendered.replace("use_http_header: false", "use_http_header: true");
            }
            tries_left -= 1;
            let started = Self::start_rendered_with_args(
                dir,
                &rendered,
                listen,
                admin,
                options.concurrency,
                &options.extra_args,
            );
            match started.await {
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
        Self::start_rendered_with_args(dir, rendered, listen, admin, concurrency, &[]).await
    }

    /// [`Envoy::start_rendered`], with more Envoy arguments.
    pub async fn start_rendered_with_args(
        dir: &Path,
        rendered: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        concurrency: u32,
        extra_args: &[String],
    ) -> Result<Envoy, String> {
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, rendered).map_err(|e| e.to_string())?;
        let mut command = Command::new(envoy_bin());
        command
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--disable-hot-restart", "--log-level", "warn"])
            .args(extra_args);
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

    /// One of the plugin's own stats (`wasmcustom.etcd_mesh.<name>`), 0
    /// until Envoy has it.
    pub async fn plugin_stat(&self, name: &str) -> u64 {
        self.stat(&format!("wasmcustom.etcd_mesh.{name}"))
            .await
            .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines that are not YAML comments.
    fn uncommented(yaml: &str) -> String {
        yaml.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    fn render(tls: &TlsUpstream) -> String {
        let template = std::fs::read_to_string(envoy_tls_template_path()).expect("TLS template");
        let addr = |port| SocketAddr::from(([10, 0, 0, 5], port));
        render_envoy_tls_config(
            &template,
            addr(10000),
            addr(9901),
            &[addr(8443), addr(8444)],
            Path::new("/plugin.wasm"),
            tls,
        )
    }

    #[test]
    fn the_tls_template_renders_every_placeholder_and_a_socket_per_replica() {
        let tls = TlsUpstream {
            ca: PathBuf::from("/tls/ca.pem"),
            sni: "sync.test".to_owned(),
            client_cert: Some((
                PathBuf::from("/tls/envoy.pem"),
                PathBuf::from("/tls/envoy.key"),
            )),
            token: Some("t0ken".to_owned()),
        };
        let live = uncommented(&render(&tls));
        assert!(!live.contains("{{"), "{live}");
        for i in 0..2 {
            assert!(live.contains(&format!("  - name: etcd_mesh_sync_{i}\n")));
        }
        assert_eq!(live.matches("envoy.transport_sockets.tls").count(), 2);
        assert_eq!(
            live.matches(r#"trusted_ca: { filename: "/tls/ca.pem" }"#)
                .count(),
            2
        );
        assert_eq!(
            live.matches(r#"matcher: { exact: "sync.test" }"#).count(),
            2
        );
        assert_eq!(
            live.matches(r#"private_key: { filename: "/tls/envoy.key" }"#)
                .count(),
            2
        );
        assert!(live.contains(r#""bearer_token": "t0ken""#));
        assert!(live.contains(r#""clusters": ["etcd_mesh_sync_0", "etcd_mesh_sync_1"]"#));
        assert_eq!(
            sync_clusters_tls_yaml(&[SocketAddr::from(([10, 0, 0, 5], 8443))], &tls)
                .matches("sni: \"sync.test\"")
                .count(),
            1
        );
    }

    #[test]
    fn without_a_client_certificate_or_token_they_are_left_out() {
        let tls = TlsUpstream {
            ca: PathBuf::from("/tls/ca.pem"),
            sni: "sync.test".to_owned(),
            client_cert: None,
            token: None,
        };
        let live = uncommented(&render(&tls));
        assert!(!live.contains("{{"), "{live}");
        assert!(!live.contains("tls_certificates"));
        assert!(!live.contains("bearer_token"));
    }

    #[test]
    fn the_tls_template_is_the_plain_one_plus_the_token() {
        // Outside comments they differ by the poller's bearer token only
        // (the transport sockets come with {{SYNC_CLUSTERS}}): a change to
        // envoy/etcd-mesh.yaml must be made to the TLS template too.
        let read = |path: PathBuf| std::fs::read_to_string(path).expect("template");
        let plain = uncommented(&read(envoy_template_path()));
        let tls = uncommented(&read(envoy_tls_template_path()))
            .replace(r#", "bearer_token": "{{SYNC_TOKEN}}""#, "");
        assert_eq!(
            plain, tls,
            "envoy/etcd-mesh-tls.yaml has drifted from etcd-mesh.yaml"
        );
    }

    #[test]
    fn hot_restart_epochs_share_a_base_id_that_no_other_chain_has() {
        let ids: Vec<u32> = (0..200).map(|_| unique_base_id()).collect();
        let mut distinct = ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        // The counter wraps after 90: ids repeat only that far apart.
        assert_eq!(distinct.len(), 90, "{ids:?}");
        assert!(ids.iter().all(|id| *id > 0 && *id < u32::MAX / 10));
        let first = HotRestart::new(ids[0]);
        let second = first.next();
        assert_eq!((first.epoch, second.epoch), (0, 1));
        let args = second.args();
        let value = |flag: &str| {
            let at = args.iter().position(|a| a == flag).expect(flag);
            args[at + 1].clone()
        };
        assert_eq!(value("--restart-epoch"), "1");
        assert_eq!(value("--base-id"), ids[0].to_string());
        assert_eq!(value("--drain-time-s"), "2");
        assert_eq!(value("--parent-shutdown-time-s"), "4");
    }

    #[test]
    fn the_plain_template_renders_as_before() {
        let template = std::fs::read_to_string(envoy_template_path()).expect("template");
        let addr = SocketAddr::from(([127, 0, 0, 1], 8090));
        let rendered = render_envoy_config(&template, addr, addr, &[addr], Path::new("/p.wasm"));
        let live = uncommented(&rendered);
        assert!(!live.contains("{{"), "{live}");
        assert!(!live.contains("transport_socket"));
        assert!(live.contains("  - name: etcd_mesh_sync_0\n"));
    }
}
