//! Hosts as Linux network namespaces on one switch, for fault tests: a
//! [`Net`] owns a switch (a bridge in its own namespace), the hosts plugged
//! into it and the faults done to them — a host cut off from everyone, a
//! pair of hosts that cannot reach each other, a frozen process — and an
//! etcd cluster with one member per host ([`NetEtcd`]).
//!
//! Loopback cannot lose packets, so a partition there is a closed port and
//! an instant "connection refused"; here a cut host's packets vanish
//! silently, as on a real network, and timeouts are what the code under
//! test sees. The test process stays in the root namespace, plugged into
//! the switch as `.1` of the subnet, so it reaches every host directly.
//!
//! Needs root and `ip` (iproute2) only: no iptables, no netem. Everything is
//! removed when the [`Net`] is dropped (also when a test panics), and a new
//! [`Net`] first removes what a killed test process left behind.

mod etcd;

pub use etcd::*;

use crate::Proc;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Namespaces of this harness are named `emesh-<pid>-<net>-<host>`: the pid
/// of the test process that made them, so a later one can tell leftovers.
const NS_PREFIX: &str = "emesh-";
/// The root namespace's veth is `emr<pid hex>x<net hex>` (at most 15
/// characters, the limit for interface names).
const ROOT_IF_PREFIX: &str = "emr";
/// The bridge, in the switch namespace.
const BRIDGE: &str = "br0";
/// A host's interface, in its own namespace.
const HOST_IF: &str = "eth0";
/// The hardware address a poisoned neighbour entry points at: nobody's.
const NOWHERE_MAC: &str = "02:00:00:00:00:01";
/// Subnets are 10.A.B.0/24 with A in 128..=254.
const SUBNETS: u32 = 127 * 256;

static NEXT_NET: AtomicU32 = AtomicU32::new(0);
/// Held while a subnet is picked and taken, so two `Net`s of this process
/// cannot take the same one.
static SUBNET_PICK: Mutex<()> = Mutex::new(());

/// A switch with hosts on it, each host a network namespace; see the
/// module documentation. Dropping it kills every process in its
/// namespaces and deletes them.
#[derive(Debug)]
pub struct Net {
    id: String,
    switch: String,
    root_if: String,
    /// The first three octets of the /24.
    subnet: [u8; 3],
    state: Mutex<NetState>,
    cleaned: bool,
}

#[derive(Debug, Default)]
struct NetState {
    /// Every namespace made, the switch first.
    namespaces: Vec<String>,
    hosts: Vec<Host>,
}

/// A host on a [`Net`]: a network namespace with one interface on the
/// switch. Cheap to clone; it does not own the namespace (the `Net` does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    /// Its port on the switch (the switch-side veth).
    port: String,
}

impl Net {
    /// Makes a switch with a fresh /24 and plugs the root namespace into it
    /// as `.1`. Needs root; removes first what dead test processes left.
    pub fn new() -> Result<Net, String> {
        check_root()?;
        sweep_leftovers()?;
        let pid = std::process::id();
        let n = NEXT_NET.fetch_add(1, Ordering::Relaxed) % 0x10_0000;
        let id = format!("{NS_PREFIX}{pid}-{n}");
        let picking = SUBNET_PICK.lock().unwrap_or_else(|e| e.into_inner());
        let subnet = pick_subnet(pid, n)?;
        // Made before anything exists, so whatever fails below is undone
        // by its drop.
        let net = Net {
            switch: format!("{id}-sw"),
            root_if: format!("{ROOT_IF_PREFIX}{pid:x}x{n:x}"),
            id,
            subnet,
            state: Mutex::new(NetState::default()),
            cleaned: false,
        };
        net.add_namespace(&net.switch.clone())?;
        let sw = net.switch.as_str();
        ip(&[
            "-n",
            sw,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", sw, "link", "set", BRIDGE, "up"])?;
        let root_if = net.root_if.as_str();
        ip(&[
            "link", "add", root_if, "type", "veth", "peer", "name", "root", "netns", sw,
        ])?;
        ip(&["-n", sw, "link", "set", "root", "master", BRIDGE, "up"])?;
        // No IPv6 link-local address: nothing but the tests' own traffic.
        ip(&["link", "set", root_if, "addrgenmode", "none"])?;
        let cidr = format!("{}/24", net.ip_of(1));
        ip(&["addr", "add", &cidr, "dev", root_if])?;
        ip(&["link", "set", root_if, "up"])?;
        drop(picking);
        Ok(net)
    }

    /// `emesh-<pid>-<n>`: the prefix of every namespace of this net.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `10.A.B.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}/24", self.ip_of(0))
    }

    /// The test process's own address on the switch (`.1`).
    pub fn root_ip(&self) -> Ipv4Addr {
        self.ip_of(1)
    }

    /// The root namespace's interface on the switch.
    pub fn root_interface(&self) -> &str {
        &self.root_if
    }

    /// Every namespace of this net (the switch and the hosts).
    pub fn namespaces(&self) -> Vec<String> {
        self.state().namespaces.clone()
    }

    /// A new host called `name` (letters, digits, `-`, `_`), with the next
    /// free address from `.2` on, plugged into the switch.
    pub fn host(&self, name: &str) -> Result<Host, String> {
        if name.is_empty()
            || name.len() > 32
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "host name {name:?}: use 1 to 32 letters, digits, '-' or '_'"
            ));
        }
        let n = {
            let state = self.state();
            if state.hosts.iter().any(|h| h.name == name) {
                return Err(format!("{}: there is a host {name:?} already", self.id));
            }
            state.hosts.len() + 2
        };
        if n > 254 {
            return Err(format!("{}: a /24 holds 253 hosts", self.id));
        }
        let ns = format!("{}-{name}", self.id);
        let port = format!("h{n}");
        self.add_namespace(&ns)?;
        let sw = self.switch.as_str();
        ip(&[
            "link", "add", HOST_IF, "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
            sw,
        ])?;
        ip(&["-n", sw, "link", "set", &port, "master", BRIDGE, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "set", HOST_IF, "addrgenmode", "none"])?;
        let host = Host {
            name: name.to_owned(),
            ns,
            ip: self.ip_of(u8::try_from(n).unwrap_or(254)),
            port,
        };
        let cidr = format!("{}/24", host.ip);
        ip(&["-n", &host.ns, "addr", "add", &cidr, "dev", HOST_IF])?;
        ip(&["-n", &host.ns, "link", "set", HOST_IF, "up"])?;
        self.state().hosts.push(host.clone());
        Ok(host)
    }

    /// Cuts `host` off from everyone (the root namespace too): its port on
    /// the switch goes down, and packets to or from it vanish silently —
    /// no reset, no "unreachable"; connections time out.
    pub fn cut(&self, host: &Host) -> Result<(), String> {
        self.check_mine(host)?;
        ip(&["-n", &self.switch, "link", "set", &host.port, "down"]).map(drop)
    }

    /// Undoes [`Net::cut`].
    pub fn heal(&self, host: &Host) -> Result<(), String> {
        self.check_mine(host)?;
        ip(&["-n", &self.switch, "link", "set", &host.port, "up"]).map(drop)
    }

    /// Partitions `a` from `b` only: both still reach everyone else.
    ///
    /// Without a packet filter this is neighbour poisoning: each side gets
    /// a permanent ARP entry mapping the other's address to a hardware
    /// address nobody has, so what it sends the other is dropped on the
    /// floor, silently (the switch floods it, every interface ignores it).
    pub fn cut_pair(&self, a: &Host, b: &Host) -> Result<(), String> {
        self.check_pair(a, b)?;
        for (from, to) in [(a, b), (b, a)] {
            ip(&[
                "-n",
                &from.ns,
                "neigh",
                "replace",
                &to.ip.to_string(),
                "lladdr",
                NOWHERE_MAC,
                "nud",
                "permanent",
                "dev",
                HOST_IF,
            ])?;
        }
        Ok(())
    }

    /// Undoes [`Net::cut_pair`] (the next packet resolves the address
    /// afresh); a pair not cut is left as it is.
    pub fn heal_pair(&self, a: &Host, b: &Host) -> Result<(), String> {
        self.check_pair(a, b)?;
        for (from, to) in [(a, b), (b, a)] {
            let to = to.ip.to_string();
            match ip(&["-n", &from.ns, "neigh", "del", &to, "dev", HOST_IF]) {
                Err(e) if e.contains("No such file") => {}
                other => {
                    other?;
                }
            }
        }
        Ok(())
    }

    /// Kills every process in this net's namespaces and deletes them (the
    /// root namespace's interface goes with them). Done by drop; call it
    /// to see the errors. The net cannot be used afterwards.
    pub fn cleanup(&mut self) -> Result<(), String> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        let namespaces = std::mem::take(&mut self.state().namespaces);
        let mut errors = Vec::new();
        // Hosts before the switch: no process is left to notice.
        for ns in namespaces.iter().rev() {
            if let Err(e) = kill_all_in(ns) {
                errors.push(e);
            }
        }
        // Deleting one end deletes both, now; a namespace's veths only go
        // when the kernel gets round to destroying it.
        let _ = ip(&["link", "del", &self.root_if]);
        for ns in namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                errors.push(e);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{}: cleanup: {}", self.id, errors.join("; ")))
        }
    }

    fn ip_of(&self, last: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, last)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_namespace(&self, ns: &str) -> Result<(), String> {
        ip(&["netns", "add", ns])?;
        self.state().namespaces.push(ns.to_owned());
        Ok(())
    }

    fn check_mine(&self, host: &Host) -> Result<(), String> {
        if self.state().hosts.contains(host) {
            Ok(())
        } else {
            Err(format!("{} is not a host of {}", host.ns, self.id))
        }
    }

    fn check_pair(&self, a: &Host, b: &Host) -> Result<(), String> {
        self.check_mine(a)?;
        self.check_mine(b)?;
        if a == b {
            return Err(format!("{}: a host cannot be cut from itself", a.ns));
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("{e}");
        }
    }
}

impl Host {
    /// The name given to [`Net::host`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its network namespace, for `ip netns exec` or `ip -n`.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip:port`.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }

    pub fn socket_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// `program` run inside this host (through `ip netns exec`, which
    /// execs it: the child's pid is the program's). Killed when dropped.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.ns, program])
            .kill_on_drop(true);
        command
    }

    /// The same as a `std` command, for [`Proc::spawn`] (see [`Host::spawn`]).
    pub fn std_command(&self, program: &str) -> std::process::Command {
        let mut command = std::process::Command::new("ip");
        command.args(["netns", "exec", &self.ns, program]);
        command
    }

    /// Starts `program args` inside this host as a [`Proc`]: killed when
    /// dropped, its output in `log`.
    pub fn spawn(&self, program: &str, args: &[&str], log: PathBuf) -> Result<Proc, String> {
        let mut command = self.std_command(program);
        command.args(args);
        Proc::spawn(&format!("{program} in {}", self.ns), command, log).map_err(|e| e.to_string())
    }

    /// The processes running inside this host now.
    pub fn pids(&self) -> Result<Vec<u32>, String> {
        pids_in(&self.ns)
    }
}

/// Stops process `pid` (SIGSTOP): it holds its sockets and answers nothing
/// until [`thaw`]; a kill still works.
pub fn freeze(pid: u32) -> Result<(), String> {
    signal(pid, nix::sys::signal::Signal::SIGSTOP)
}

/// Resumes a process stopped by [`freeze`] (SIGCONT).
pub fn thaw(pid: u32) -> Result<(), String> {
    signal(pid, nix::sys::signal::Signal::SIGCONT)
}

/// SIGSTOP until dropped (then SIGCONT, even when the test fails): a
/// process that hangs rather than dies, with its sockets open.
pub struct Frozen(u32);

impl Frozen {
    pub fn freeze(pid: u32) -> Frozen {
        freeze(pid).expect("SIGSTOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = thaw(self.0);
    }
}

fn signal(pid: u32, signal: nix::sys::signal::Signal) -> Result<(), String> {
    let raw = i32::try_from(pid).map_err(|_| format!("no such pid {pid}"))?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal)
        .map_err(|e| format!("{signal} to {pid}: {e}"))
}

/// Runs `ip args`; its stderr is the error.
fn ip(args: &[&str]) -> Result<String, String> {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn check_root() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    // `Uid:` real, effective, saved, filesystem.
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    if euid == Some("0") {
        Ok(())
    } else {
        Err(
            "network-namespace tests need root (they create namespaces with `ip netns add`): \
             run as root, as CI does"
                .to_owned(),
        )
    }
}

fn pids_in(ns: &str) -> Result<Vec<u32>, String> {
    Ok(ip(&["netns", "pids", ns])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// SIGKILLs everything in `ns` until nothing is left (a shell may fork
/// while it is being killed), for at most 5 s.
fn kill_all_in(ns: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = match pids_in(ns) {
            Ok(pids) => pids,
            // Gone already: nothing to kill.
            Err(_) if !Path::new("/run/netns").join(ns).exists() => return Ok(()),
            Err(e) => return Err(e),
        };
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{ns}: processes {pids:?} survive SIGKILL"));
        }
        for pid in pids {
            let _ = signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes namespaces and root interfaces whose test process is gone.
fn sweep_leftovers() -> Result<(), String> {
    let me = std::process::id();
    let dead = |pid: u32| pid != me && !Path::new(&format!("/proc/{pid}")).exists();
    for line in ip(&["netns", "list"])?.lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let creator = ns
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse().ok());
        if creator.is_some_and(dead) {
            // Another test process may be sweeping the same: best effort.
            let _ = kill_all_in(ns);
            let _ = ip(&["netns", "del", ns]);
        }
    }
    // A root interface outlives its namespace's name if a process kept the
    // namespace alive; it goes with its veth peer.
    for line in ip(&["-o", "link", "show"])?.lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let creator = name
            .strip_prefix(ROOT_IF_PREFIX)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| u32::from_str_radix(pid, 16).ok());
        if creator.is_some_and(dead) {
            let _ = ip(&["link", "del", name]);
        }
    }
    Ok(())
}

/// A 10.A.B.0/24 (A in 128..=254) overlapping no address or route of the
/// root namespace, starting from one derived from the pid and the net's
/// number so that concurrent test processes start far apart.
fn pick_subnet(pid: u32, n: u32) -> Result<[u8; 3], String> {
    let mut taken = ip(&["-o", "-4", "addr", "show"])?;
    taken.push_str(&ip(&["-4", "route", "show", "table", "all"])?);
    let prefixes: Vec<(u32, u32)> = taken.split_whitespace().filter_map(parse_prefix).collect();
    let start = (u64::from(pid) * 64 + u64::from(n)) % u64::from(SUBNETS);
    let start = u32::try_from(start).unwrap_or(0);
    for k in 0..SUBNETS {
        let s = (start + k) % SUBNETS;
        let subnet = [10, 128 + (s / 256) as u8, (s % 256) as u8];
        let base = u32::from(Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 0));
        let overlaps = prefixes.iter().any(|&(net, len)| {
            let shorter = len.min(24);
            let mask = if shorter == 0 {
                0
            } else {
                u32::MAX << (32 - shorter)
            };
            net & mask == base & mask
        });
        if !overlaps {
            return Ok(subnet);
        }
    }
    Err("no free 10.x.y.0/24 subnet in the root namespace".to_owned())
}

/// `a.b.c.d` or `a.b.c.d/len` as (address, len); `default` is no prefix
/// (it would overlap everything).
fn parse_prefix(token: &str) -> Option<(u32, u32)> {
    let (addr, len) = match token.split_once('/') {
        Some((addr, len)) => (addr, len.parse().ok()?),
        None => (token, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    (len <= 32).then_some((u32::from(addr), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_default_is_not_one() {
        assert_eq!(
            parse_prefix("10.0.0.0/8"),
            Some((u32::from(Ipv4Addr::new(10, 0, 0, 0)), 8))
        );
        assert_eq!(parse_prefix("192.0.2.2"), Some((0xC000_0202, 32)));
        assert_eq!(parse_prefix("default"), None);
        assert_eq!(parse_prefix("10.1.2.3/33"), None);
    }
}
