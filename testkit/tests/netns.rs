//! The network-namespace fault harness, tested against the kernel: hosts
//! reach each other and the test process, a cut host's packets vanish (a
//! connect times out, it is not refused), a cut pair is cut both ways and
//! only from each other, an etcd cluster fails over when its leader is cut
//! and the member catches up when healed, a frozen member stops answering,
//! and nothing is left behind — after a drop, after a panic, after a test
//! process that died.
//!
//! Needs root, `ip`, `python3` (the listeners), `curl` (connects from inside
//! a host), `etcd` and `etcdctl`. Traffic goes only to the namespaces these
//! tests make. Run with `--nocapture` to see the measured times.

use etcd_mesh_testkit::{freeze, thaw, Host, Net, NetEtcd, Proc, ETCD_CLIENT_PORT};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Every test finishes within this, or fails.
const TEST_BOUND: Duration = Duration::from_secs(30);
/// How long a connect may take before it counts as timed out.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const LISTEN_PORT: u16 = 8000;

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .unwrap_or_else(|_| panic!("test took more than {TEST_BOUND:?}"))
}

/// A temporary directory, removed when dropped.
struct TestDir(PathBuf);

impl TestDir {
    fn new(what: &str) -> TestDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "emesh-netns-test-{}-{what}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary dir");
        TestDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a TCP connect came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Connect {
    Connected,
    /// An answer came back (a reset): the host is reachable, nobody listens.
    Refused,
    /// Nothing came back within the timeout: the packets vanished.
    TimedOut,
    Other(String),
}

/// A connect from the test process (the root namespace).
async fn connect_from_root(addr: SocketAddr) -> Connect {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Connect::Connected,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Connect::Refused,
        Ok(Err(e)) => Connect::Other(e.to_string()),
        Err(_) => Connect::TimedOut,
    }
}

/// A connect (an HTTP GET, with curl) from inside `host`.
async fn connect_from(host: &Host, addr: SocketAddr) -> Connect {
    let output = host
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "--noproxy",
            "*",
            "--connect-timeout",
        ])
        .arg(CONNECT_TIMEOUT.as_secs().to_string())
        .args(["--max-time", "5"])
        .arg(format!("http://{addr}/"))
        .output()
        .await
        .expect("curl runs");
    match output.status.code() {
        Some(0) => Connect::Connected,
        Some(7) => Connect::Refused,
        Some(28) => Connect::TimedOut,
        code => Connect::Other(format!(
            "curl exit {code:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

/// Polls `probe` every 50 ms until it gives `want` or `timeout` passes;
/// returns how long it took.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, want: Connect, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Connect>,
{
    let start = Instant::now();
    loop {
        let got = probe().await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: still {got:?} after {timeout:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP (HTTP) listener on `host`'s address, port 8000, ready.
async fn listen(host: &Host, dir: &Path) -> Proc {
    let ip = host.ip().to_string();
    let port = LISTEN_PORT.to_string();
    let log = dir.join(format!("listener-{}.log", host.name()));
    let mut listener = host
        .spawn("python3", &["-m", "http.server", "--bind", &ip, &port], log)
        .expect("python3 starts");
    let start = Instant::now();
    while connect_from_root(host.socket_addr(LISTEN_PORT)).await != Connect::Connected {
        assert!(
            !listener.exited(),
            "listener on {} exited:\n{}",
            host.name(),
            listener.log_tail(10)
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "listener on {} not up in 10 s",
            host.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listener
}

/// Names of every network namespace.
fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// `ip -o link` and `ip -o addr` of the root namespace.
fn root_links_and_addrs() -> String {
    let mut text = String::new();
    for args in [["-o", "link"], ["-o", "addr"]] {
        let out = Command::new("ip").args(args).output().expect("ip");
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    text
}

/// Whether `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Starts, inside `host`, a `sleep` that is not our child (its shell exits
/// and it is re-parented): only the net's cleanup can kill it. Its pid.
async fn orphan_sleep(host: &Host) -> u32 {
    let out = host
        .command("sh")
        .args(["-c", "sleep 300 >/dev/null 2>&1 & echo $!"])
        .output()
        .await
        .expect("sh runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a pid")
}

/// What is left of a net, checked after it was dropped.
struct Remains {
    id: String,
    root_if: String,
    subnet_prefix: String,
}

impl Remains {
    fn of(net: &Net) -> Remains {
        let subnet = net.subnet();
        Remains {
            id: net.id().to_owned(),
            root_if: net.root_interface().to_owned(),
            subnet_prefix: subnet.trim_end_matches("0/24").to_owned(),
        }
    }

    fn assert_none(&self) {
        let left: Vec<String> = namespaces()
            .into_iter()
            .filter(|ns| ns.starts_with(&format!("{}-", self.id)))
            .collect();
        assert!(left.is_empty(), "namespaces left: {left:?}");
        let root = root_links_and_addrs();
        assert!(
            !root.contains(&self.root_if),
            "{} still in the root namespace:\n{root}",
            self.root_if
        );
        assert!(
            !root.contains(&format!(" {}", self.subnet_prefix)),
            "an address of {}* still in the root namespace:\n{root}",
            self.subnet_prefix
        );
    }
}

#[tokio::test]
async fn a_cut_host_drops_packets_silently_and_heal_restores_it() {
    bounded(async {
        let dir = TestDir::new("cut");
        let net = Net::new().expect("net");
        let a = net.host("a").expect("host a");
        let b = net.host("b").expect("host b");
        assert_ne!(a.ip(), b.ip());
        let _listener = listen(&b, dir.path()).await;
        let b_addr = b.socket_addr(LISTEN_PORT);

        assert_eq!(connect_from(&a, b_addr).await, Connect::Connected, "a → b");
        // a is reachable too: nobody listens there, so it answers a reset.
        assert_eq!(
            connect_from_root(a.socket_addr(LISTEN_PORT)).await,
            Connect::Refused,
            "root → a"
        );

        net.cut(&b).expect("cut b");
        let start = Instant::now();
        assert_eq!(
            connect_from_root(b_addr).await,
            Connect::TimedOut,
            "root → cut b"
        );
        let root_failed = start.elapsed();
        assert_eq!(
            connect_from(&a, b_addr).await,
            Connect::TimedOut,
            "a → cut b"
        );
        // Nothing else is affected.
        assert_eq!(
            connect_from_root(a.socket_addr(LISTEN_PORT)).await,
            Connect::Refused,
            "root → a while b is cut"
        );
        println!("cut: root → b timed out after {root_failed:?} (the connect timeout)");

        net.heal(&b).expect("heal b");
        let from_root = wait_until(
            "root → healed b",
            Duration::from_secs(10),
            Connect::Connected,
            || connect_from_root(b_addr),
        )
        .await;
        let from_a = wait_until(
            "a → healed b",
            Duration::from_secs(10),
            Connect::Connected,
            || connect_from(&a, b_addr),
        )
        .await;
        println!("heal: root → b connected {from_root:?} after heal, then a → b in {from_a:?}");
    })
    .await;
}

#[tokio::test]
async fn cut_pair_blocks_exactly_that_pair_both_ways_until_healed() {
    bounded(async {
        let dir = TestDir::new("pair");
        let net = Net::new().expect("net");
        let hosts: Vec<Host> = ["a", "b", "c"]
            .iter()
            .map(|name| net.host(name).expect("host"))
            .collect();
        let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
        let mut listeners = Vec::new();
        for host in &hosts {
            listeners.push(listen(host, dir.path()).await);
        }
        let at = |h: &Host| h.socket_addr(LISTEN_PORT);
        for from in &hosts {
            for to in &hosts {
                assert_eq!(
                    connect_from(from, at(to)).await,
                    Connect::Connected,
                    "{} → {} before the cut",
                    from.name(),
                    to.name()
                );
            }
        }

        net.cut_pair(a, b).expect("cut a from b");
        let start = Instant::now();
        let (a_to_b, b_to_a) = tokio::join!(connect_from(a, at(b)), connect_from(b, at(a)));
        let failed_after = start.elapsed();
        assert_eq!(a_to_b, Connect::TimedOut, "a → b while cut");
        assert_eq!(b_to_a, Connect::TimedOut, "b → a while cut");
        for (from, to) in [(a, c), (c, a), (b, c), (c, b)] {
            assert_eq!(
                connect_from(from, at(to)).await,
                Connect::Connected,
                "{} → {} while a and b are cut from each other",
                from.name(),
                to.name()
            );
        }
        for to in [a, b] {
            assert_eq!(
                connect_from_root(at(to)).await,
                Connect::Connected,
                "root → {} while a and b are cut from each other",
                to.name()
            );
        }
        println!("cut_pair: a → b and b → a timed out after {failed_after:?}; a, b ↔ c, root fine");

        net.heal_pair(a, b).expect("heal");
        let start = Instant::now();
        let a_to_b = wait_until(
            "a → b healed",
            Duration::from_secs(10),
            Connect::Connected,
            || connect_from(a, at(b)),
        )
        .await;
        let b_to_a = wait_until(
            "b → a healed",
            Duration::from_secs(10),
            Connect::Connected,
            || connect_from(b, at(a)),
        )
        .await;
        println!(
            "heal_pair: a → b connected {a_to_b:?} after heal, b → a {b_to_a:?} later \
             ({:?} in all)",
            start.elapsed()
        );
        // Healing what is not cut is no error.
        net.heal_pair(a, b).expect("heal again");
        assert!(net.cut_pair(a, a).is_err(), "a host cut from itself");
    })
    .await;
}

#[tokio::test]
async fn etcd_fails_over_when_its_leader_is_cut_and_the_member_catches_up_when_healed() {
    bounded(async {
        let dir = TestDir::new("etcd-cut");
        let net = Net::new().expect("net");
        let start = Instant::now();
        let etcd = NetEtcd::start(&net, dir.path(), 3).await.expect("etcd");
        println!("3-member etcd healthy {:?} after start", start.elapsed());
        assert_eq!(etcd.endpoints().len(), 3);
        for (i, endpoint) in etcd.endpoints().iter().enumerate() {
            assert_eq!(*endpoint, etcd.member_host(i).addr(ETCD_CLIENT_PORT));
        }

        etcd.ctl(0, &["put", "k1", "v1"]).await.expect("put via 1");
        let got = etcd
            .ctl(2, &["get", "k1", "--print-value-only"])
            .await
            .expect("get via 3");
        assert_eq!(got.trim(), "v1");

        let leader = etcd.leader_index().await.expect("a leader");
        let cut = etcd.member_host(leader).clone();
        net.cut(&cut).expect("cut the leader");
        let cut_at = Instant::now();
        let other = (leader + 1) % 3;
        loop {
            match etcd.ctl(other, &["put", "k2", "v2"]).await {
                Ok(_) => break,
                Err(e) => assert!(
                    cut_at.elapsed() < Duration::from_secs(15),
                    "no put through member {other} 15 s after the leader was cut: {e}"
                ),
            }
        }
        let failover = cut_at.elapsed();
        let new_leader = etcd.leader_index().await.expect("a new leader");
        assert_ne!(new_leader, leader, "the cut member is still the leader");
        println!(
            "leader {leader} cut: a put through member {other} succeeded {failover:?} later; \
             new leader {new_leader}"
        );

        // From the test process the cut member is unreachable...
        assert!(
            etcd.ctl(leader, &["get", "k2"]).await.is_err(),
            "a get through the cut member from outside"
        );
        // ...and from its own host it answers, but cannot serve a
        // linearizable read, and its serializable one is stale.
        let inside = Some(&cut);
        let linearizable = etcd.ctl_from(inside, leader, &["get", "k2"]).await;
        assert!(
            linearizable.is_err(),
            "a linearizable get on the cut member: {linearizable:?}"
        );
        let stale = ["get", "k2", "--consistency=s", "--print-value-only"];
        let stale = etcd
            .ctl_from(inside, leader, &stale)
            .await
            .expect("serializable");
        assert_eq!(
            stale.trim(),
            "",
            "the cut member has the key written after the cut"
        );
        let old = ["get", "k1", "--consistency=s", "--print-value-only"];
        let old = etcd
            .ctl_from(inside, leader, &old)
            .await
            .expect("serializable");
        assert_eq!(old.trim(), "v1");

        net.heal(&cut).expect("heal");
        let healed_at = Instant::now();
        loop {
            match etcd.ctl(leader, &["get", "k2", "--print-value-only"]).await {
                Ok(v) if v.trim() == "v2" => break,
                got => assert!(
                    healed_at.elapsed() < Duration::from_secs(15),
                    "member {leader} does not serve k2 15 s after heal: {got:?}"
                ),
            }
        }
        println!(
            "healed: member {leader} served k2 linearizably {:?} after heal",
            healed_at.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn a_frozen_etcd_member_stops_answering_and_thaw_resumes_it() {
    bounded(async {
        let dir = TestDir::new("etcd-freeze");
        let net = Net::new().expect("net");
        let etcd = NetEtcd::start(&net, dir.path(), 3).await.expect("etcd");
        let leader = etcd.leader_index().await.expect("a leader");
        let frozen = (leader + 1) % 3;
        freeze(etcd.member_pid(frozen)).expect("freeze");
        let result = etcd.ctl(frozen, &["get", "k"]).await;
        assert!(result.is_err(), "a get through a frozen member: {result:?}");
        etcd.ctl(leader, &["put", "k", "v"])
            .await
            .expect("the other two keep a quorum");
        thaw(etcd.member_pid(frozen)).expect("thaw");
        let thawed = Instant::now();
        loop {
            match etcd.ctl(frozen, &["get", "k", "--print-value-only"]).await {
                Ok(v) if v.trim() == "v" => break,
                got => assert!(
                    thawed.elapsed() < Duration::from_secs(10),
                    "thawed member {frozen} does not serve k: {got:?}"
                ),
            }
        }
        println!("thawed member served k {:?} after thaw", thawed.elapsed());
    })
    .await;
}

#[tokio::test]
async fn dropping_the_net_kills_its_processes_and_deletes_everything() {
    bounded(async {
        let net = Net::new().expect("net");
        let host = net.host("h").expect("host");
        let remains = Remains::of(&net);
        assert_eq!(net.namespaces().len(), 2, "the switch and the host");
        let orphan = orphan_sleep(&host).await;
        // A child whose handle outlives the net: the net kills it anyway.
        let mut child = host
            .command("sleep")
            .arg("300")
            .spawn()
            .expect("sleep runs");
        let child_pid = child.id().expect("running");
        let mut want = vec![orphan, child_pid];
        want.sort_unstable();
        // `ip netns exec` enters the namespace a moment after it starts.
        let start = Instant::now();
        loop {
            let mut pids = host.pids().expect("pids");
            pids.sort_unstable();
            if pids == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the processes in the host: {pids:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        drop(net);
        remains.assert_none();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{child_pid} survives"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(!status.success(), "sleep 300 ended by itself? {status:?}");
        while !ended(orphan) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{orphan} survives"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_panicking_test_leaves_nothing_behind() {
    bounded(async {
        let (tx, rx) = std::sync::mpsc::channel();
        let panicked = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let net = Net::new().expect("net");
                let host = net.host("doomed").expect("host");
                let orphan = orphan_sleep(&host).await;
                tx.send((Remains::of(&net), orphan)).expect("send");
                panic!("a deliberate panic, with the net alive");
            })
        })
        .join();
        assert!(panicked.is_err(), "the thread did not panic");
        let (remains, orphan) = rx.recv().expect("the net was made");
        remains.assert_none();
        let start = Instant::now();
        while !ended(orphan) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{orphan} survives"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Leaves what a test process killed mid-test would: a namespace named for
/// a dead pid, a process in it and a root interface. `None` if a `Net` of
/// a concurrent test swept it before the process was in.
async fn make_leftover() -> Option<(String, String, std::process::Child)> {
    // A pid that was alive and is not any more.
    let mut gone = Command::new("true").spawn().expect("true runs");
    gone.wait().expect("wait");
    let dead = gone.id();
    let ns = format!("emesh-{dead}-0-sw");
    let root_if = format!("emr{dead:x}x0");
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .status()
            .expect("ip")
            .success()
    };
    assert!(ip(&["netns", "add", &ns]), "ip netns add {ns}");
    let veth = [
        "link", "add", &root_if, "type", "veth", "peer", "name", "left", "netns", &ns,
    ];
    if !ip(&veth) {
        return None;
    }
    let mut left = Command::new("ip")
        .args(["netns", "exec", &ns, "sleep", "300"])
        .spawn()
        .expect("ip runs");
    let start = Instant::now();
    loop {
        let pids = Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .expect("ip");
        if !pids.stdout.is_empty() {
            return Some((ns, root_if, left));
        }
        if left.try_wait().expect("wait").is_some() {
            return None;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "sleep not in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_new_net_sweeps_what_a_dead_test_process_left() {
    bounded(async {
        let mut leftover = None;
        for _ in 0..5 {
            leftover = make_leftover().await;
            if leftover.is_some() {
                break;
            }
        }
        let (ns, root_if, mut left) = leftover.expect("a leftover, in 5 tries");

        let _net = Net::new().expect("net");
        assert!(!namespaces().contains(&ns), "{ns} not swept");
        assert!(
            !root_links_and_addrs().contains(&root_if),
            "{root_if} not swept"
        );
        let status = tokio::task::spawn_blocking(move || left.wait())
            .await
            .expect("join")
            .expect("wait");
        assert!(!status.success(), "the leftover's process was not killed");
    })
    .await;
}
