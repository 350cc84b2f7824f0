//! An etcd cluster across network-namespace hosts ([`NetEtcd`]): one
//! member per host, so that a test can cut a member off from the majority,
//! or freeze it, as a real network and a real machine would.

use super::{Host, Net};
use crate::{http_get, Proc};
use std::path::Path;
use std::time::{Duration, Instant};

/// An etcd cluster with one member per host (`etcd1`, `etcd2`, …), each
/// listening on its host's address, clients on 2379 and peers on 2380.
/// Members are killed when it is dropped.
#[derive(Debug)]
pub struct NetEtcd {
    members: Vec<NetEtcdMember>,
    /// Raft member ids, by member index.
    ids: Vec<u64>,
}

#[derive(Debug)]
struct NetEtcdMember {
    host: Host,
    proc: Proc,
}

/// etcd's client port on every member host.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port on every member host.
pub const ETCD_PEER_PORT: u16 = 2380;
/// What an [`NetEtcd::ctl`] command may take.
const CTL_TIMEOUT: Duration = Duration::from_secs(2);

impl NetEtcd {
    /// Starts `size` members on new hosts of `net`, data and logs under
    /// `dir`, and waits (20 s at most) until every member is healthy, which
    /// needs a leader.
    pub async fn start(net: &Net, dir: &Path, size: usize) -> Result<NetEtcd, String> {
        if size == 0 {
            return Err("an etcd cluster needs a member".to_owned());
        }
        let hosts = (1..=size)
            .map(|i| net.host(&format!("etcd{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let cluster: Vec<String> = hosts
            .iter()
            .map(|h| format!("{}=http://{}", h.name, h.addr(ETCD_PEER_PORT)))
            .collect();
        let cluster = cluster.join(",");
        let token = format!("{}-etcd", net.id());
        let mut members = Vec::with_capacity(size);
        for host in hosts {
            let client = format!("http://{}", host.addr(ETCD_CLIENT_PORT));
            let peer = format!("http://{}", host.addr(ETCD_PEER_PORT));
            let data = dir.join(format!("{}.data", host.name));
            let data = data.to_string_lossy();
            let args = [
                "--name",
                &host.name,
                "--data-dir",
                &data,
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &token,
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                // etcd 3.5's default (3.4's is off): a member cut off does
                // not raise its term, so healing it costs no election.
                "--pre-vote",
                "--log-level",
                "warn",
            ];
            let log = dir.join(format!("{}.log", host.name));
            let proc = host.spawn("etcd", &args, log)?;
            members.push(NetEtcdMember { host, proc });
        }
        let mut etcd = NetEtcd {
            members,
            ids: Vec::new(),
        };
        etcd.wait_healthy(Duration::from_secs(20)).await?;
        Ok(etcd)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's `ip:2379`.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s `ip:2379` (members count from 0; member 0 is `etcd1`).
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].host.addr(ETCD_CLIENT_PORT)
    }

    pub fn member_host(&self, i: usize) -> &Host {
        &self.members[i].host
    }

    /// The etcd process of member `i`, for [`freeze`] and [`thaw`].
    pub fn member_pid(&self, i: usize) -> u32 {
        self.members[i].proc.pid()
    }

    /// The last lines of member `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        self.members[i].proc.log_tail(lines)
    }

    /// The member that the members reachable from the test process take
    /// as leader (the one named by the answer of highest raft term);
    /// `None` if none answers or none knows a leader.
    pub async fn leader_index(&self) -> Option<usize> {
        let mut best: Option<(u64, u64)> = None;
        for i in 0..self.len() {
            let Ok(status) = self.status(None, i).await else {
                continue;
            };
            if status.leader != 0 && best.is_none_or(|(term, _)| status.term > term) {
                best = Some((status.term, status.leader));
            }
        }
        let (_, leader) = best?;
        self.ids.iter().position(|&id| id == leader)
    }

    /// `etcdctl args` against member `i`, from the root namespace, with
    /// 1 s to connect and 2 s for the command: its stdout, or an error
    /// with its stderr.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> Result<String, String> {
        self.ctl_from(None, i, args).await
    }

    /// `etcdctl args` against member `i`, run inside `host` (`None`: the
    /// root namespace) — inside a cut member's own host, say, which still
    /// reaches it.
    pub async fn ctl_from(
        &self,
        host: Option<&Host>,
        i: usize,
        args: &[&str],
    ) -> Result<String, String> {
        let mut command = match host {
            Some(host) => host.command("etcdctl"),
            None => {
                let mut command = tokio::process::Command::new("etcdctl");
                command.kill_on_drop(true);
                command
            }
        };
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint(i)))
            .args(["--dial-timeout=1s", "--command-timeout=2s"])
            .args(args)
            .stdin(std::process::Stdio::null());
        let what = format!("etcdctl {} against {}", args.join(" "), self.endpoint(i));
        let output = tokio::time::timeout(CTL_TIMEOUT + Duration::from_secs(2), command.output())
            .await
            .map_err(|_| format!("{what}: no answer in time"))?
            .map_err(|e| format!("cannot run etcdctl: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "{what}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    async fn status(&self, host: Option<&Host>, i: usize) -> Result<MemberStatus, String> {
        let json = self
            .ctl_from(host, i, &["endpoint", "status", "-w", "json"])
            .await?;
        let field = |key| json_u64(&json, key);
        Ok(MemberStatus {
            id: field("member_id").ok_or_else(|| format!("no member_id in {json}"))?,
            // Left out when zero.
            leader: field("leader").unwrap_or(0),
            term: field("raftTerm").unwrap_or(0),
        })
    }

    /// Polls `/health` of every member until all are healthy, then learns
    /// their raft ids; fails early, with its log, if a member exits.
    async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<usize> = (0..self.len()).collect();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for i in pending {
                let member = &mut self.members[i];
                if member.proc.exited() {
                    return Err(format!(
                        "etcd on {} exited:\n{}",
                        member.host.ns,
                        member.proc.log_tail(20)
                    ));
                }
                let addr = member.host.socket_addr(ETCD_CLIENT_PORT);
                let healthy = matches!(
                    tokio::time::timeout(Duration::from_secs(3), http_get(addr, "/health")).await,
                    Ok(Ok((200, body))) if body.contains("\"true\"")
                );
                if !healthy {
                    still.push(i);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = pending
                    .iter()
                    .map(|&i| format!("{}:\n{}", self.members[i].host.ns, self.log_tail(i, 10)))
                    .collect();
                return Err(format!(
                    "timed out after {timeout:?} waiting for etcd members {pending:?} to be \
                     healthy\n{}",
                    logs.join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut ids = Vec::with_capacity(self.len());
        for i in 0..self.len() {
            let id = loop {
                match self.status(None, i).await {
                    Ok(status) => break status.id,
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            ids.push(id);
        }
        self.ids = ids;
        Ok(())
    }
}

struct MemberStatus {
    id: u64,
    leader: u64,
    term: u64,
}

/// The first unsigned number after `"key":` in `json` (etcd's ids do not
/// fit a JSON parser's f64, so they are read as text).
fn json_u64(json: &str, key: &str) -> Option<u64> {
    let pattern = format!("\"{key}\":");
    let at = json.find(&pattern)? + pattern.len();
    let digits: String = json[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_u64_reads_big_ids_and_misses_absent_keys() {
        let json = r#"[{"Status":{"header":{"member_id":13668033151171901709,"raft_term":2},"leader":13668033151171901709,"raftTerm":2}}]"#;
        assert_eq!(
            json_u64(json, "member_id"),
            Some(13_668_033_151_171_901_709)
        );
        assert_eq!(json_u64(json, "raftTerm"), Some(2));
        assert_eq!(json_u64(json, "dbSize"), None);
    }
}
