//! Envoy's own hot restart ([`HotRestart`]): a chain of processes that
//! hand their listening sockets on, for the restart tests; [`super::Envoy::start`]
//! disables it.

use super::{envoy_bin, Envoy};
use crate::{http_get, Proc};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// One process of a hot-restart chain: Envoys started one after another
/// with the same `--base-id` hand their listening sockets on, and each new
/// one drains and then stops its parent (Envoy's own hot restart, which
/// [`Envoy::start`] disables). See [`Envoy::start_hot_restart_epoch`].
#[derive(Debug, Clone)]
pub struct HotRestart {
    /// `--base-id`: names the chain's shared memory and domain sockets,
    /// so one per chain on the host ([`unique_base_id`]).
    pub base_id: u32,
    /// `--restart-epoch`: 0 for the first process, then 1, 2, ...
    pub epoch: u32,
    /// `--drain-time-s`: how long the parent drains its listeners.
    pub drain_time_s: u32,
    /// `--parent-shutdown-time-s`: when the new process tells its parent
    /// to exit.
    pub parent_shutdown_time_s: u32,
    /// The process's environment variables (a configuration can read them:
    /// `%ENVIRONMENT(NAME)%`).
    pub env: Vec<(String, String)>,
}

impl HotRestart {
    /// Epoch 0 of the chain `base_id`, draining for 2 s and stopping the
    /// parent after 4 s.
    pub fn new(base_id: u32) -> HotRestart {
        HotRestart {
            base_id,
            epoch: 0,
            drain_time_s: 2,
            parent_shutdown_time_s: 4,
            env: Vec::new(),
        }
    }

    /// The next epoch of the same chain.
    pub fn next(&self) -> HotRestart {
        HotRestart {
            epoch: self.epoch + 1,
            ..self.clone()
        }
    }

    /// Envoy's hot-restart arguments.
    pub fn args(&self) -> Vec<String> {
        [
            "--restart-epoch",
            &self.epoch.to_string(),
            "--base-id",
            &self.base_id.to_string(),
            "--drain-time-s",
            &self.drain_time_s.to_string(),
            "--parent-shutdown-time-s",
            &self.parent_shutdown_time_s.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// A hot-restart `--base-id` that no other process on this host uses at
/// the same time: from this process's id and a counter, so tests running
/// in parallel (in one process or several) never share a chain. Envoy
/// names its shared memory `/envoy_shared_memory_<base id × 10>`, so the
/// id stays below `u32::MAX / 10`.
pub fn unique_base_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id() % 4_000_000;
    pid * 100 + 10 + COUNTER.fetch_add(1, Ordering::Relaxed) % 90
}

/// Removes the shared memory region of the hot-restart chain `base_id`
/// (Envoy leaves it behind when it exits).
pub fn remove_hot_restart_memory(base_id: u32) {
    let name = format!("/dev/shm/envoy_shared_memory_{}", u64::from(base_id) * 10);
    let _ = std::fs::remove_file(name);
}

impl Envoy {
    /// Starts epoch `hot.epoch` of a hot-restart chain with a configuration
    /// already rendered, listening on `listen` with its admin on `admin`
    /// (for epoch 1 on: the parent's, which the new process takes over).
    /// Its configuration goes to `envoy-epoch<n>.yaml` and its log to
    /// `envoy-epoch<n>.log` in `dir`. Returns once this epoch is live: its
    /// admin (`/server_info`) says so for this epoch (the parent's admin
    /// answers until the new process takes the port).
    pub async fn start_hot_restart_epoch(
        dir: &Path,
        rendered: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        concurrency: u32,
        hot: &HotRestart,
        extra_args: &[String],
    ) -> Result<Envoy, String> {
        let config = dir.join(format!("envoy-epoch{}.yaml", hot.epoch));
        std::fs::write(&config, rendered).map_err(|e| e.to_string())?;
        let mut command = Command::new(envoy_bin());
        command
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .args(hot.args())
            .args(["--log-level", "warn"])
            .args(extra_args)
            .envs(hot.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let log = dir.join(format!("envoy-epoch{}.log", hot.epoch));
        let proc = Proc::spawn("envoy", command, log).map_err(|e| e.to_string())?;
        let mut envoy = Envoy {
            proc,
            listen,
            admin,
            config,
        };
        let live = [
            format!("\"restart_epoch\":{},", hot.epoch),
            "\"state\":\"LIVE\"".to_owned(),
        ];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if envoy.proc.exited() {
                return Err(format!("Envoy exited\n{}", envoy.proc.log_tail(30)));
            }
            if let Ok((200, body)) = http_get(admin, "/server_info").await {
                let compact: String = body.split_whitespace().collect();
                if live.iter().all(|s| compact.contains(s.as_str())) {
                    return Ok(envoy);
                }
            }
            if Instant::now() >= deadline {
                let tail = envoy.proc.log_tail(30);
                return Err(format!(
                    "timed out after 30s waiting for Envoy epoch {} to be live\n{tail}",
                    hot.epoch
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process has exited (a hot restart's parent does when
    /// the new process tells it to).
    pub fn exited(&mut self) -> bool {
        self.proc.exited()
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        self.proc.terminate(grace);
    }
}
