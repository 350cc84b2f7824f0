//! The layout `docs/operations.md` recommends: several sync-server
//! replicas (real processes) over one etcd cluster, one Envoy following
//! them. A quiet registry costs no full load; changes arrive as deltas; a
//! replica that is killed, frozen or stale is left within 5 s for a fresh
//! one, with no full load when the replicas serve the same tables (at most
//! one when they differ); replicas whose health views differ never make
//! the Envoy's picks flap.

use etcd_client::Client;
use etcd_mesh_demo::client::split;
use etcd_mesh_demo::{DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_e2e::{Backend, SyncServerProcess, DEADLINE};
use etcd_mesh_registration::Instance;
use etcd_mesh_testkit::{wait_for, Envoy, EnvoyOptions, EtcdCluster, Frozen};
use std::time::{Duration, Instant};

/// The longest a failover may take (the issue's bound).
const FAILOVER: Duration = Duration::from_secs(5);

/// The poller of these tests: replicas in order, short long-polls so that
/// a quiet registry still makes many polls to count.
fn poller(wait_seconds: u32) -> String {
    format!(
        r#"{{"role": "poller", "clusters": {{{{SYNC_CLUSTER_NAMES}}}}, "authority": "sync-server", "wait_seconds": {wait_seconds}, "timeout_margin_ms": 1000}}"#
    )
}

struct Layout {
    etcd: EtcdCluster,
    replicas: Vec<SyncServerProcess>,
    envoy: Envoy,
    _dir: tempfile::TempDir,
}

impl Layout {
    /// A 3-member etcd cluster, `replicas` sync-servers (replica `i` given
    /// `members(i)` as its `--etcd`, and `extra(i)` arguments), and one
    /// Envoy listing every replica.
    async fn start(
        replicas: usize,
        wait_seconds: u32,
        members: impl Fn(usize, &[String]) -> Vec<String>,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> Layout {
        let dir = tempfile::tempdir().expect("temporary dir");
        let etcd = EtcdCluster::start(dir.path(), 3)
            .await
            .expect("etcd cluster");
        let mut started = Vec::new();
        for i in 0..replicas {
            let args = extra(i);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            started.push(SyncServerProcess::start(&members(i, &etcd.endpoints()), &args).await);
        }
        let envoy = Envoy::start(
            dir.path(),
            EnvoyOptions {
                sync_servers: started.iter().map(|r| r.addr).collect(),
                poller_config: Some(poller(wait_seconds)),
                ..EnvoyOptions::default()
            },
        )
        .await
        .expect("envoy starts");
        Layout {
            etcd,
            replicas: started,
            envoy,
            _dir: dir,
        }
    }

    async fn stat(&self, name: &str) -> u64 {
        self.envoy.plugin_stat(name).await
    }

    /// The replica the poller follows, once it holds tables.
    async fn followed(&self) -> usize {
        wait_for("the poller to hold tables", DEADLINE, || async {
            (self.stat("updates_full").await >= 1).then_some(())
        })
        .await
        .expect("tables");
        self.stat("sync_replica").await as usize
    }

    /// Registers `addr` (weight 1) by a plain put through the first member
    /// that takes it within a second (one may be frozen), and returns the
    /// revision.
    async fn put(&self, addr: &str) -> u64 {
        let instance = Instance::new(DEMO_PREFIX, DEMO_SERVICE, addr);
        let endpoints = self.etcd.endpoints();
        let turn = std::sync::atomic::AtomicUsize::new(0);
        wait_for("a member to take the put", DEADLINE, || async {
            let i = turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let endpoint = &endpoints[i % endpoints.len()];
            let attempt = async {
                let mut client = Client::connect([endpoint], None).await.ok()?;
                let put = client.put(instance.key(), instance.value(), None).await;
                put.ok()?.header().map(|h| h.revision() as u64)
            };
            tokio::time::timeout(Duration::from_secs(1), attempt)
                .await
                .ok()
                .flatten()
        })
        .await
        .expect("etcd takes the put")
    }

    /// Waits until the plugin holds `revision`; returns how long it took.
    async fn reaches(&self, revision: u64, within: Duration) -> Duration {
        let started = Instant::now();
        self.envoy
            .wait_for_revision(revision, within)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.envoy.log_tail(20)));
        started.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_cost_no_full_load_when_quiet_and_deltas_for_changes() {
    let layout = Layout::start(3, 1, |_, all| all.to_vec(), |_| vec![]).await;
    let revision = layout.put("127.0.0.1:31001").await;
    layout.reaches(revision, DEADLINE).await;
    let followed = layout.followed().await;
    let full = layout.stat("updates_full").await;
    assert_eq!(full, 1, "one full load to start");

    // Quiet: each 1 s long-poll ends with 304. Ten polls, no full load.
    let polls = layout.stat("polls_succeeded").await;
    wait_for("ten quiet polls", DEADLINE, || async {
        (layout.stat("polls_succeeded").await >= polls + 10).then_some(())
    })
    .await
    .expect("polls go on");
    assert_eq!(layout.stat("updates_full").await, 1, "quiet: no full load");
    assert_eq!(layout.stat("sync_replica").await as usize, followed);

    // Changes: deltas only.
    let deltas = layout.stat("updates_delta").await;
    let mut last = 0;
    for port in 31002..31022 {
        last = layout.put(&format!("127.0.0.1:{port}")).await;
    }
    layout.reaches(last, DEADLINE).await;
    assert_eq!(
        layout.stat("updates_full").await,
        1,
        "changes: no full load"
    );
    assert!(layout.stat("updates_delta").await > deltas);
    assert_eq!(layout.stat("replica_switches").await, 0);
    for replica in &layout.replicas {
        assert!(
            replica.metric("sync_server_stale").await == Some(0),
            "every replica fresh"
        );
    }
}

/// Kills (or freezes) the replica the Envoy follows, makes a change, and
/// returns how long the Envoy took to hold it, checking the switch cost no
/// full load: the replicas serve the same tables once their arrival
/// stamps are past the horizon, and the Envoy is continued with a delta.
async fn fails_over_when(hang: bool) -> Duration {
    let mut layout = Layout::start(
        2,
        30,
        |_, all| all.to_vec(),
        |_| vec!["--stamp-horizon".into(), "300ms".into()],
    )
    .await;
    let revision = layout.put("127.0.0.1:31101").await;
    layout.reaches(revision, DEADLINE).await;
    let followed = layout.followed().await;
    wait_for(
        "every replica and the Envoy to hold the same tables",
        DEADLINE,
        || async {
            let held = layout.stat("table_digest").await;
            for replica in &layout.replicas {
                (replica.metric("sync_server_tables_digest").await? == held).then_some(())?;
            }
            Some(())
        },
    )
    .await
    .expect("the replicas converge");
    let full = layout.stat("updates_full").await;

    let cut = Instant::now();
    let _frozen = if hang {
        Some(Frozen::freeze(layout.replicas[followed].pid()))
    } else {
        layout.replicas[followed].kill();
        None
    };
    let revision = layout.put("127.0.0.1:31102").await;
    layout.reaches(revision, FAILOVER * 2).await;
    let took = cut.elapsed();
    assert_ne!(layout.stat("sync_replica").await as usize, followed);
    assert_eq!(
        layout.stat("updates_full").await,
        full,
        "the switch continues the tables held: no full load"
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_left_within_five_seconds() {
    let took = fails_over_when(false).await;
    eprintln!("killed replica: the change arrived {took:?} after the kill");
    assert!(took <= FAILOVER, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_is_left_within_five_seconds() {
    let took = fails_over_when(true).await;
    eprintln!("frozen replica: the change arrived {took:?} after SIGSTOP");
    assert!(took <= FAILOVER, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_is_left_for_a_fresh_one() {
    // Replica 0 talks to member 0 alone; replica 1 to the two others.
    // Freezing member 0 leaves replica 0 without proof of contact with the
    // majority (stale after 2 s) while replica 1 stays fresh.
    let layout = Layout::start(
        2,
        30,
        |i, all| match i {
            0 => vec![all[0].clone()],
            _ => all[1..].to_vec(),
        },
        |_| vec!["--freshness-timeout".into(), "2s".into()],
    )
    .await;
    let revision = layout.put("127.0.0.1:31201").await;
    layout.reaches(revision, DEADLINE).await;
    // Follow replica 0 first: freeze replica 1 until the poller is there.
    if layout.followed().await != 0 {
        let _frozen = Frozen::freeze(layout.replicas[1].pid());
        wait_for("the poller to follow replica 0", DEADLINE, || async {
            (layout.stat("sync_replica").await == 0).then_some(())
        })
        .await
        .expect("failover to replica 0");
    }
    wait_for("replica 1 fresh again", DEADLINE, || async {
        layout.replicas[1]
            .status()
            .await
            .filter(|s| !s.stale)
            .map(drop)
    })
    .await
    .expect("fresh");
    let full = layout.stat("updates_full").await;

    let member = layout.etcd.members[0].pid().expect("member 0 runs");
    let _frozen = Frozen::freeze(member);
    let cut = Instant::now();
    wait_for("replica 0 to say stale", DEADLINE, || async {
        layout.replicas[0]
            .status()
            .await
            .filter(|s| s.stale)
            .map(drop)
    })
    .await
    .expect("replica 0 turns stale");
    let stale_after = cut.elapsed();
    let revision = layout.put("127.0.0.1:31202").await;
    let took = layout.reaches(revision, DEADLINE).await;
    let moved = cut.elapsed();
    eprintln!(
        "stale replica: stale {stale_after:?} after its member froze; the Envoy held a change made then {took:?} later ({moved:?} after the freeze)"
    );
    assert_eq!(
        layout.stat("sync_replica").await,
        1,
        "follows the fresh one"
    );
    assert!(took <= FAILOVER, "{took:?}");
    assert!(layout.stat("updates_full").await <= full + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_different_health_views_never_make_picks_flap() {
    // Replica 0 checks health and sees the NOT_SERVING backend; replica 1
    // does not check. The Envoy follows one view, poll after poll.
    let layout = Layout::start(
        2,
        1,
        |_, all| all.to_vec(),
        |i| match i {
            0 => ["--health-checks", "--health-interval", "200ms"]
                .map(String::from)
                .to_vec(),
            _ => vec![],
        },
    )
    .await;
    let etcd = layout.etcd.endpoints();
    let serving = Backend::registered(etcd.clone(), 1).await;
    let draining = Backend::registered(etcd.clone(), 1).await;
    draining.set_serving(false);
    let revision = wait_for("both backends listed", DEADLINE, || async {
        let status = layout.replicas[1].status().await?;
        let snapshot = etcd_mesh_testkit::fetch_snapshot(layout.replicas[1].addr).await?;
        let listed = snapshot.services.get(DEMO_SERVICE)?.endpoints.len();
        (listed == 2).then_some(status.revision)
    })
    .await
    .expect("listed");
    layout.reaches(revision, DEADLINE).await;
    wait_for(
        "replica 0 to see the NOT_SERVING backend",
        DEADLINE,
        || async {
            let snapshot = etcd_mesh_testkit::fetch_snapshot(layout.replicas[0].addr).await?;
            let endpoints = &snapshot.services.get(DEMO_SERVICE)?.endpoints;
            endpoints
                .iter()
                .any(|e| e.health == Some(etcd_mesh_wire::Health::NotServing))
                .then_some(())
        },
    )
    .await
    .expect("health observed");
    let followed = layout.followed().await;
    // What the followed view says the drained backend gets: none of the
    // calls (replica 0's view) or half (replica 1's).
    let expect_drained = |calls: usize| if followed == 0 { 0 } else { calls / 2 };
    let client = etcd_mesh_demo::client::connect(layout.envoy.listen)
        .await
        .expect("client");
    if followed == 0 {
        let digest = layout.replicas[0]
            .metric("sync_server_tables_digest")
            .await
            .expect("digest");
        layout
            .envoy
            .wait_for_digest(digest, DEADLINE)
            .await
            .expect("the health view arrives");
    }
    let full = layout.stat("updates_full").await;
    for round in 0..5 {
        let polls = layout.stat("polls_succeeded").await;
        let counts = split(std::slice::from_ref(&client), 20)
            .await
            .expect("calls succeed");
        let drained = counts.get(&draining.addr.to_string()).copied().unwrap_or(0);
        assert_eq!(
            drained,
            expect_drained(20),
            "round {round}: following replica {followed}, {counts:?}"
        );
        wait_for("another poll", DEADLINE, || async {
            (layout.stat("polls_succeeded").await > polls).then_some(())
        })
        .await
        .expect("polls go on");
    }
    assert_eq!(
        layout.stat("updates_full").await,
        full,
        "no switch, no reload"
    );
    assert_eq!(layout.stat("replica_switches").await, 0);
    drop(serving);
}
