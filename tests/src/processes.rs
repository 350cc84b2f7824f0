//! Processes a test can kill, freeze or cut off: a `demo-backend`, a
//! `sync-server` replica, a backend inside a network-namespace host, and
//! an Envoy started from an edited configuration.

use crate::DEADLINE;
use etcd_mesh_demo::DEMO_PREFIX;
use etcd_mesh_testkit::{http_get, prometheus_value, Envoy};
use std::net::SocketAddr;
use std::time::Duration;
use tempfile::TempDir;

/// A `demo-backend` process (built by `make test`), registered in etcd by
/// itself: what a real instance is, so that a test can SIGKILL it.
pub struct BackendProcess {
    pub addr: SocketAddr,
    proc: etcd_mesh_testkit::Proc,
    _dir: TempDir,
}

impl BackendProcess {
    /// Starts one on a free port with `weight` and a lease of `ttl_s`
    /// seconds; the caller waits for it to be listed.
    pub fn start(etcd: &[String], weight: u32, ttl_s: u64) -> BackendProcess {
        let binary = etcd_mesh_testkit::workspace_root().join("target/debug/demo-backend");
        assert!(
            binary.exists(),
            "no {}: `make test` builds it (cargo build -p etcd-mesh-demo --bin demo-backend)",
            binary.display()
        );
        let port = etcd_mesh_testkit::free_port().expect("a free port");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = tempfile::tempdir().expect("temporary dir");
        let mut command = std::process::Command::new(binary);
        command
            .args(["--etcd", &etcd.join(","), "--listen", &addr.to_string()])
            .args(["--weight", &weight.to_string(), "--ttl", &ttl_s.to_string()]);
        let proc =
            etcd_mesh_testkit::Proc::spawn("demo-backend", command, dir.path().join("backend.log"))
                .expect("demo-backend starts");
        BackendProcess {
            addr,
            proc,
            _dir: dir,
        }
    }

    /// SIGKILL: no deregistration, the lease lives until its TTL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// A `sync-server` process (built by `make test`): a replica a test can
/// SIGKILL, freeze with SIGSTOP, or cut off from its etcd member.
pub struct SyncServerProcess {
    pub addr: SocketAddr,
    proc: etcd_mesh_testkit::Proc,
    _dir: TempDir,
}

impl SyncServerProcess {
    /// Starts one on a free port over `etcd`, watching the demo prefix,
    /// with `extra` arguments, and waits until it is ready.
    pub async fn start(etcd: &[String], extra: &[&str]) -> SyncServerProcess {
        let binary = etcd_mesh_testkit::workspace_root().join("target/debug/sync-server");
        assert!(
            binary.exists(),
            "no {}: `make test` builds it (cargo build -p sync-server --bin sync-server)",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("temporary dir");
        for _ in 0..3 {
            let port = etcd_mesh_testkit::free_port().expect("a free port");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut command = std::process::Command::new(&binary);
            command
                .args(["--etcd", &etcd.join(","), "--listen", &addr.to_string()])
                .args(["--watch", &format!("etcd-naming={DEMO_PREFIX}")])
                .args(extra)
                .env("RUST_LOG", "info");
            let mut proc = etcd_mesh_testkit::Proc::spawn(
                "sync-server",
                command,
                dir.path().join(format!("sync-server-{port}.log")),
            )
            .expect("sync-server starts");
            let deadline = std::time::Instant::now() + DEADLINE;
            let ready = loop {
                if proc.exited() {
                    break Ok(false);
                }
                if matches!(http_get(addr, "/readyz").await, Ok((200, _))) {
                    break Ok(true);
                }
                if std::time::Instant::now() >= deadline {
                    break Err(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            match ready {
                Ok(true) => {
                    return SyncServerProcess {
                        addr,
                        proc,
                        _dir: dir,
                    }
                }
                // Its port was taken between the pick and the bind: again.
                Ok(false) if proc.log_tail(5).contains("in use") => continue,
                _ => panic!("sync-server did not start:\n{}", proc.log_tail(20)),
            }
        }
        panic!("no free port for sync-server after 3 tries");
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGKILL: its connections are reset at once.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// A number from its `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<u64> {
        let (_, body) = http_get(self.addr, "/metrics").await.ok()?;
        prometheus_value(&body, name)
    }

    /// Its `/v1/status`.
    pub async fn status(&self) -> Option<etcd_mesh_wire::Status> {
        let (status, body) = http_get(self.addr, "/v1/status").await.ok()?;
        (status == 200)
            .then(|| etcd_mesh_wire::Status::decode(body.as_bytes()).ok())
            .flatten()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

/// A `demo-backend` process (built by `make test`) inside a network-namespace
/// host, listening on the host's own address and registered in etcd with
/// it: a backend whose packets a test can drop ([`Net::cut`]).
///
/// [`Net::cut`]: etcd_mesh_testkit::Net::cut
pub struct NetBackend {
    pub addr: SocketAddr,
    proc: etcd_mesh_testkit::Proc,
}

impl NetBackend {
    /// Starts one on `host`, port `port`, registering in `etcd` (addresses
    /// the host reaches) with `weight` and a lease of `ttl_s` seconds; its
    /// log goes to `dir`. The caller waits for it to be listed.
    pub fn start(
        host: &etcd_mesh_testkit::Host,
        port: u16,
        etcd: &[String],
        weight: u32,
        ttl_s: u64,
        dir: &std::path::Path,
    ) -> NetBackend {
        let binary = etcd_mesh_testkit::workspace_root().join("target/debug/demo-backend");
        assert!(
            binary.exists(),
            "no {}: `make test` builds it (cargo build -p etcd-mesh-demo --bin demo-backend)",
            binary.display()
        );
        let addr = host.socket_addr(port);
        let (listen, members) = (addr.to_string(), etcd.join(","));
        let (weight, ttl) = (weight.to_string(), ttl_s.to_string());
        let args = [
            "--etcd", &members, "--listen", &listen, "--weight", &weight, "--ttl", &ttl,
        ];
        let log = dir.join(format!("demo-backend-{}.log", host.name()));
        let proc = host
            .spawn(binary.to_str().expect("a UTF-8 path"), &args, log)
            .expect("demo-backend starts");
        NetBackend { addr, proc }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }
}

/// Envoy from `envoy/etcd-mesh.yaml` with the router configured by
/// `router` and the rendered configuration changed by `edit` (to compare
/// the template with a variant of it), polling `sync`.
pub async fn start_envoy_edited(
    dir: &std::path::Path,
    sync: SocketAddr,
    router: &str,
    concurrency: u32,
    edit: impl Fn(String) -> String,
) -> Envoy {
    use etcd_mesh_testkit::{envoy_template_path, free_port, render_envoy_config, wasm_path};
    let template = std::fs::read_to_string(envoy_template_path()).expect("the Envoy template");
    let mut last = String::new();
    // A picked port may be taken before Envoy binds it: then fresh ones.
    for _ in 0..3 {
        let pick = || SocketAddr::from(([127, 0, 0, 1], free_port().expect("a free port")));
        let (listen, admin) = (pick(), pick());
        let rendered = render_envoy_config(&template, listen, admin, &[sync], &wasm_path())
            .replace(r#"'{"role": "router"}'"#, &format!("'{router}'"));
        let rendered = edit(rendered);
        match Envoy::start_rendered(dir, &rendered, listen, admin, concurrency).await {
            Ok(envoy) => return envoy,
            Err(e) if e.contains("Address already in use") => last = e,
            Err(e) => panic!("Envoy did not start: {e}"),
        }
    }
    panic!("Envoy did not start: {last}");
}
