//! Real etcd on loopback: one member or a cluster, plain or TLS, each with
//! its own data directory, restartable on the same data.

use crate::{free_port, http_get, wait_for, Proc};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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
    /// A member not started yet: the one place an [`Etcd`] is made.
    fn unstarted(
        dir: &Path,
        client_port: u16,
        peer_port: u16,
        name: String,
        tls: Option<EtcdTlsFiles>,
    ) -> Etcd {
        Etcd {
            proc: None,
            client: SocketAddr::from(([127, 0, 0, 1], client_port)),
            peer: SocketAddr::from(([127, 0, 0, 1], peer_port)),
            dir: dir.to_path_buf(),
            tls,
            name,
            cluster: None,
        }
    }

    /// Starts etcd on free ports under `dir`; on fresh ones if a port was
    /// taken between the pick and etcd's bind.
    pub async fn start(dir: &Path) -> Result<Etcd, String> {
        let port = |_| free_port().map_err(|e| e.to_string());
        let mut tries_left = 3;
        loop {
            tries_left -= 1;
            match Self::start_on(dir, port(0)?, port(1)?).await {
                Err(e) if tries_left > 0 && e.contains("address already in use") => continue,
                started => return started,
            }
        }
    }

    /// Starts etcd on the given client and peer ports under `dir`.
    pub async fn start_on(dir: &Path, client_port: u16, peer_port: u16) -> Result<Etcd, String> {
        let mut etcd = Self::unstarted(dir, client_port, peer_port, "mesh".into(), None);
        etcd.launch().await?;
        Ok(etcd)
    }

    /// Starts etcd on free ports, serving clients over TLS only.
    pub async fn start_tls(dir: &Path, tls: EtcdTlsFiles) -> Result<Etcd, String> {
        let port = || free_port().map_err(|e| e.to_string());
        let mut etcd = Self::unstarted(dir, port()?, port()?, "mesh".into(), Some(tls));
        etcd.launch().await?;
        Ok(etcd)
    }

    /// `host:port` for clients.
    pub fn endpoint(&self) -> String {
        self.client.to_string()
    }

    /// The member's process id while it runs (to freeze it with SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
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

    /// Saves a backup of a single member's data to `path`.
    pub fn save_snapshot(&self, path: &Path) -> Result<(), String> {
        let path = path.to_str().ok_or("a non-UTF-8 path")?;
        let endpoint = self.endpoint();
        etcdctl(&["--endpoints", &endpoint, "snapshot", "save", path])
    }

    /// Replaces a single member's data by the backup at `snapshot` and
    /// starts it again on the same ports: the same cluster ID (same name,
    /// peer URL and cluster token), revisions back to the backup's.
    pub async fn restore(&mut self, snapshot: &Path) -> Result<(), String> {
        self.kill();
        let data = self.dir.join(format!("etcd-data-{}", self.name));
        std::fs::remove_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let peer = format!("http://{}", self.peer);
        let cluster = format!("{}={peer}", self.name);
        etcdctl(&[
            "snapshot",
            "restore",
            snapshot.to_str().ok_or("a non-UTF-8 path")?,
            "--name",
            &self.name,
            "--initial-cluster",
            &cluster,
            "--initial-advertise-peer-urls",
            &peer,
            "--data-dir",
            data.to_str().ok_or("a non-UTF-8 path")?,
        ])?;
        self.launch().await
    }

    async fn launch(&mut self) -> Result<(), String> {
        self.spawn()?;
        self.wait_ready().await
    }

    /// Whether the process is gone (it failed to start, say).
    fn exited(&mut self) -> bool {
        self.proc.as_mut().is_none_or(Proc::exited)
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

    async fn wait_ready(&mut self) -> Result<(), String> {
        let addr = self.client;
        let tls = self.tls.is_some();
        let this = std::cell::RefCell::new(&mut *self);
        let ready = wait_for("etcd /health", Duration::from_secs(20), || async {
            // A member that exited (a port taken, say) will not come up:
            // say so now rather than at the deadline.
            if this.borrow_mut().exited() {
                return Some(Err("etcd exited".to_owned()));
            }
            if tls {
                // Plain HTTP cannot ask a TLS etcd; an open port will do,
                // and the client's own retries cover the rest.
                return TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| Ok(()));
            }
            match http_get(addr, "/health").await {
                Ok((200, body)) if body.contains("true") => Some(Ok(())),
                _ => None,
            }
        })
        .await
        .and_then(|ready| ready.map(drop));
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
            members.push(Etcd::unstarted(
                dir,
                port()?,
                port()?,
                format!("member{i}"),
                None,
            ));
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
        for member in &mut members {
            member.wait_ready().await?;
        }
        Ok(EtcdCluster { members })
    }

    /// Every member's `host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Etcd::endpoint).collect()
    }
}

/// Runs `etcdctl` (API v3) to the end.
fn etcdctl(args: &[&str]) -> Result<(), String> {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run etcdctl: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "etcdctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
