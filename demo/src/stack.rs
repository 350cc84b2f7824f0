//! The loopback process kit: etcd (one member or a cluster, with or without
//! TLS), Envoy with the plugin, any other process ([`Proc`], which is how
//! `make run` starts sync-server and the backends), a minimal HTTP GET and
//! waits with deadlines.
//!
//! Used by `make run` (fixed, well-known ports), the end-to-end tests and
//! `make bench` (free ports, one temporary directory each). Every process is killed when
//! its handle is dropped, so a failing test leaves nothing behind; every
//! wait is a poll with a deadline.

use std::fs::File;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// A loopback port nobody listens on right now, as the OS hands them out.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Fails with a message naming `what` if `127.0.0.1:port` is taken.
pub fn ensure_free(port: u16, what: &str) -> Result<(), String> {
    TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| format!("127.0.0.1:{port} ({what}) is not free: {e}"))
}

/// Polls `probe` every 20 ms until it gives a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP response, as [`http_get_with`] reads it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The value of `name` in a Prometheus text page, if it is there.
pub fn prometheus_value(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The snapshot the sync-server at `addr` serves now, if it serves a
/// valid one.
pub async fn fetch_snapshot(addr: SocketAddr) -> Option<etcd_mesh_wire::Snapshot> {
    match http_get(addr, "/v1/snapshot").await {
        Ok((200, body)) => etcd_mesh_wire::Snapshot::decode(body.as_bytes()).ok(),
        _ => None,
    }
}

/// Waits until the sync-server at `addr` is ready (`/readyz` answers 200).
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    wait_for(
        &format!("sync-server {addr} /readyz"),
        timeout,
        || async move { matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(()) },
    )
    .await
}

/// A minimal HTTP/1.1 GET on loopback: (status, body). Enough for health
/// checks and admin pages, without pulling an HTTP client into the tests.
pub async fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_get_with(addr, path, &[])
        .await
        .map(|r| (r.status, r.body))
}

/// A GET with extra request headers, returning the response headers too.
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpResponse> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tokio::task::spawn_blocking(move || http_exchange(addr, &request))
        .await
        .map_err(io::Error::other)?
}

fn http_exchange(addr: SocketAddr, request: &str) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response from {addr}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// A child process that is killed when dropped; its output goes to a log.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> io::Result<Proc> {
        let out = File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(Proc { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Exited already?
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single-member etcd with its own data directory.
#[derive(Debug)]
pub struct Etcd {
    proc: Option<Proc>,
    pub client: SocketAddr,
    peer: SocketAddr,
    dir: PathBuf,
    tls: Option<EtcdTlsFiles>,
    name: String,
    /// `--initial-cluster`; `None` for a single member.
    cluster: Option<String>,
}

/// PEM files for an etcd that serves clients over TLS and requires a
/// client certificate signed by `ca`.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdTlsFiles {
    /// Makes, with openssl, a CA and server and client certificates for
    /// 127.0.0.1 signed by it, under `dir` (`client.pem`, `client.key`
    /// beside the returned server files).
    pub fn make(dir: &Path) -> Result<EtcdTlsFiles, String> {
        let run = |args: &[&str]| -> Result<(), String> {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .map_err(|e| format!("openssl: {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "openssl {args:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                ))
            }
        };
        std::fs::write(
            dir.join("san.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .map_err(|e| e.to_string())?;
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=etcd-mesh test CA",
        ])?;
        for name in ["server", "client"] {
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ])?;
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                "san.cnf",
            ])?;
        }
        Ok(EtcdTlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        })
    }
}

impl Etcd {
    /// Starts etcd on free ports under `dir`.
    pub async fn start(dir: &Path) -> Result<Etcd, String> {
        let port = |_| free_port().map_err(|e| e.to_string());
        Self::start_on(dir, port(0)?, port(1)?).await
    }

    /// Starts etcd on the given client and peer ports under `dir`.
    pub async fn start_on(dir: &Path, client_port: u16, peer_port: u16) -> Result<Etcd, String> {
        let mut etcd = Etcd {
            proc: None,
            client: SocketAddr::from(([127, 0, 0, 1], client_port)),
            peer: SocketAddr::from(([127, 0, 0, 1], peer_port)),
            dir: dir.to_path_buf(),
            tls: None,
            name: "mesh".into(),
            cluster: None,
        };
        etcd.launch().await?;
        Ok(etcd)
    }

    /// Starts etcd on free ports, serving clients over TLS only.
    pub async fn start_tls(dir: &Path, tls: EtcdTlsFiles) -> Result<Etcd, String> {
        let port = || free_port().map_err(|e| e.to_string());
        let mut etcd = Etcd {
            proc: None,
            client: SocketAddr::from(([127, 0, 0, 1], port()?)),
            peer: SocketAddr::from(([127, 0, 0, 1], port()?)),
            dir: dir.to_path_buf(),
            tls: Some(tls),
            name: "mesh".into(),
            cluster: None,
        };
        etcd.launch().await?;
        Ok(etcd)
    }

    /// `host:port` for clients.
    pub fn endpoint(&self) -> String {
        self.client.to_string()
    }

    /// Kills etcd (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.launch().await
    }

    async fn launch(&mut self) -> Result<(), String> {
        self.spawn()?;
        self.wait_ready().await
    }

    fn spawn(&mut self) -> Result<(), String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let cluster = self
            .cluster
            .clone()
            .unwrap_or_else(|| format!("{}={peer}", self.name));
        let mut command = Command::new("etcd");
        command
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.join(format!("etcd-data-{}", self.name)))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &cluster])
            .args(["--log-level", "warn"]);
        if let Some(tls) = &self.tls {
            command
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--client-cert-auth");
        }
        let log = self.dir.join(format!("etcd-{}.log", self.name));
        let proc = Proc::spawn("etcd", command, log).map_err(|e| e.to_string())?;
        self.proc = Some(proc);
        Ok(())
    }

    async fn wait_ready(&self) -> Result<(), String> {
        let addr = self.client;
        let tls = self.tls.is_some();
        let ready = wait_for("etcd /health", Duration::from_secs(20), || async move {
            if tls {
                // Plain HTTP cannot ask a TLS etcd; an open port will do,
                // and the client's own retries cover the rest.
                return TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(drop);
            }
            match http_get(addr, "/health").await {
                Ok((200, body)) if body.contains("true") => Some(()),
                _ => None,
            }
        })
        .await;
        ready.map_err(|e| format!("{e}\n{}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(20))
            .unwrap_or_default()
    }
}

/// A multi-member etcd cluster on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    pub members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts `size` members on free ports under `dir` and waits until
    /// every one is healthy (which needs a quorum).
    pub async fn start(dir: &Path, size: usize) -> Result<EtcdCluster, String> {
        let port = || free_port().map_err(|e| e.to_string());
        let mut members = Vec::with_capacity(size);
        for i in 0..size {
            members.push(Etcd {
                proc: None,
                client: SocketAddr::from(([127, 0, 0, 1], port()?)),
                peer: SocketAddr::from(([127, 0, 0, 1], port()?)),
                dir: dir.to_path_buf(),
                tls: None,
                name: format!("member{i}"),
                cluster: None,
            });
        }
        let cluster: Vec<String> = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let cluster = cluster.join(",");
        for member in &mut members {
            member.cluster = Some(cluster.clone());
            member.spawn()?;
        }
        for member in &members {
            member.wait_ready().await?;
        }
        Ok(EtcdCluster { members })
    }

    /// Every member's `host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }
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
    /// The poller's configuration JSON, if not the template's.
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
const TEMPLATE_POLLER_CONFIG: &str = r#"'{"role": "poller", "cluster": "etcd_mesh_sync", "authority": "sync-server", "wait_seconds": 30}'"#;

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

/// Fills in the template's placeholders.
pub fn render_envoy_config(
    template: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    sync_servers: &[SocketAddr],
    wasm: &Path,
) -> String {
    let endpoints = lb_endpoints_yaml(sync_servers);
    template
        .replace("{{LISTEN_ADDRESS}}", &listen.ip().to_string())
        .replace("{{LISTEN_PORT}}", &listen.port().to_string())
        .replace("{{ADMIN_ADDRESS}}", &admin.ip().to_string())
        .replace("{{ADMIN_PORT}}", &admin.port().to_string())
        .replace("{{SYNC_ENDPOINTS}}", &endpoints)
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
        let template = std::fs::read_to_string(envoy_template_path()).map_err(|e| e.to_string())?;
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
            if let Some(poller) = &options.poller_config {
                rendered = rendered.replace(TEMPLATE_POLLER_CONFIG, &format!("'{poller}'"));
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
        wait_for(
            &format!("the plugin's poller and workers to hold revision {revision}"),
            timeout,
            || async move {
                let held = self.stat("wasmcustom.etcd_mesh.table_revision").await?;
                let workers = self
                    .stats_matching("^wasmcustom.etcd_mesh.worker_[0-9]*.table_revision$")
                    .await;
                (held >= revision
                    && !workers.is_empty()
                    && workers.iter().all(|(_, r)| *r >= revision))
                .then_some(())
            },
        )
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
