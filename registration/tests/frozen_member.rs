//! A frozen member never costs a live registration its key.
//!
//! A member stopped with SIGSTOP takes connections and never answers: the
//! case etcd's own timeouts and HTTP/2 pings do not cover. In a 3-member
//! loopback cluster, with a 5 s TTL, the member the registration keeps its
//! lease alive through is frozen for two TTLs, trial after trial; the key
//! is watched (and read every 100 ms) through a healthy member meanwhile.
//! It must never go: never deleted (its create revision stays the one of
//! the first registration, whatever happens between trials too), and
//! within each freeze the lease stays the same one.

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use etcd_mesh_registration::{EtcdOptions, Instance, Registration, State};
use etcd_mesh_testkit::{wait_for, EtcdCluster, Frozen};
use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

const TTL: Duration = Duration::from_secs(5);
const DEADLINE: Duration = Duration::from_secs(20);
const TRIALS: usize = 5;
/// Longer than anything a missed renewal could hide behind: the TTL from
/// the last renewal, plus a new leader's takeover when the leader is the
/// one frozen.
const FROZEN_FOR: Duration = Duration::from_secs(10);

/// The pid of the etcd keeping its data in `data_dir`. The test kit gives
/// each member a data directory of its own (`<dir>/etcd-data-<name>`) but
/// does not say its pid, so it is found in /proc by that argument.
fn pid_of(data_dir: &Path) -> u32 {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args
            .windows(2)
            .any(|w| w[0] == b"--data-dir" && w[1] == data_dir.as_os_str().as_bytes())
        {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "etcd for {}: {found:?}", data_dir.display());
    found[0]
}

async fn connect(endpoint: &str) -> Option<Client> {
    tokio::time::timeout(Duration::from_secs(1), Client::connect([endpoint], None))
        .await
        .ok()?
        .ok()
}

/// Which member leads, if every member answers and one says it leads.
async fn leader(endpoints: &[String]) -> Option<usize> {
    for (i, endpoint) in endpoints.iter().enumerate() {
        let mut c = connect(endpoint).await?;
        let status = tokio::time::timeout(Duration::from_secs(1), c.status())
            .await
            .ok()?
            .ok()?;
        if status.leader() != 0 && status.header().map(|h| h.member_id()) == Some(status.leader()) {
            return Some(i);
        }
    }
    None
}

/// Every member answers a linearizable read (it has a leader and has
/// caught up).
async fn all_healthy(endpoints: &[String]) -> Option<()> {
    for endpoint in endpoints {
        let mut c = connect(endpoint).await?;
        tokio::time::timeout(Duration::from_secs(1), c.get("health", None))
            .await
            .ok()?
            .ok()?;
    }
    Some(())
}

/// The key's lease and create revision through `endpoint` (a key deleted
/// and put again has a new create revision).
async fn lease_and_created(endpoint: &str, key: &str) -> Option<(i64, i64)> {
    let mut c = connect(endpoint).await?;
    let response = c.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    Some((kv.lease(), kv.create_revision()))
}

/// What one trial saw.
#[derive(Debug, Default)]
struct Trial {
    /// The key found missing: DELETE events, and reads that found nothing.
    deletes: usize,
    missing_reads: usize,
    /// The key put under another lease (registered again).
    put_again: usize,
    reads: usize,
    /// From the freeze to the lease kept alive through another member.
    rotated: Option<Duration>,
    reasons: Vec<String>,
    leases: BTreeSet<i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_never_costs_the_registration_its_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = EtcdCluster::start(dir.path(), 3)
        .await
        .expect("a 3-member cluster");
    let endpoints = cluster.endpoints();
    let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
    let instance = Instance::new("reg/", "demo.Echo", "127.0.0.1:7101")
        .with_weight(3)
        .with_ttl(TTL);
    let key = instance.key();
    // Registered through the leader, chosen: the first trial freezes it,
    // the hardest case (the others elect a new one meanwhile).
    let first = wait_for("a leader", DEADLINE, || leader(&endpoints))
        .await
        .expect("a leader");
    let mut options = EtcdOptions::new(endpoints.clone());
    options.first_member = first;
    let registration = Registration::start_with(options, instance).expect("valid");
    let first_lease = registration.registered(DEADLINE).await.expect("registered");
    assert_eq!(registration.current_member().as_ref(), Some(&urls[first]));
    let mut leases_held = vec![first_lease];
    let (_, created) = lease_and_created(&endpoints[(first + 1) % 3], &key)
        .await
        .expect("the key is there");

    let mut trials = Vec::new();
    for number in 1..=TRIALS {
        wait_for("every member healthy", DEADLINE, || all_healthy(&endpoints))
            .await
            .expect("healthy before freezing");
        let current = wait_for("the member the lease is kept through", DEADLINE, || async {
            registration.current_member()
        })
        .await
        .expect("registered");
        let frozen_index = urls.iter().position(|u| *u == current).expect("a member");
        let was_leader = leader(&endpoints).await == Some(frozen_index);
        let healthy = &endpoints[(frozen_index + 1) % 3];
        let mut reader = connect(healthy).await.expect("a healthy member");
        let start = reader.get(key.as_str(), None).await.expect("get");
        // The lease this trial starts with: a registration may have moved
        // to a new one between trials (reported below), never by losing
        // the key (the create revision is checked at the end).
        let lease = start
            .kvs()
            .first()
            .map(|kv| kv.lease())
            .unwrap_or_else(|| panic!("trial {number}: registered before the freeze"));
        if leases_held.last() != Some(&lease) {
            leases_held.push(lease);
        }
        let revision = start.header().expect("header").revision();
        let mut events = reader
            .watch(
                key.as_str(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            )
            .await
            .expect("watch");
        let mut states = registration.watch_state();
        states.borrow_and_update();

        let data_dir = dir.path().join(format!("etcd-data-member{frozen_index}"));
        let frozen = Frozen::freeze(pid_of(&data_dir));
        let frozen_at = Instant::now();
        let end = tokio::time::Instant::now() + FROZEN_FOR;
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        let mut trial = Trial::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(end) => break,
                changed = states.changed() => {
                    changed.expect("the registration runs");
                    let state = states.borrow_and_update().clone();
                    match state {
                        State::Retrying { reason } => trial.reasons.push(reason),
                        State::Registered { lease } => {
                            trial.leases.insert(lease);
                            let elsewhere = registration
                                .current_member()
                                .is_some_and(|m| m != current);
                            if elsewhere && trial.rotated.is_none() {
                                trial.rotated = Some(frozen_at.elapsed());
                            }
                        }
                    }
                }
                message = events.message() => {
                    let response = message.expect("watch").expect("the watch stays open");
                    for event in response.events() {
                        match (event.event_type(), event.kv()) {
                            (EventType::Delete, _) => trial.deletes += 1,
                            (EventType::Put, Some(kv)) if kv.lease() != lease => trial.put_again += 1,
                            _ => {}
                        }
                    }
                }
                _ = poll.tick() => {
                    // Serializable: the healthy member's own copy, which a
                    // deletion reaches too, answered even while the others
                    // elect a leader.
                    let get = reader.get(key.as_str(), Some(GetOptions::new().with_serializable()));
                    if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_millis(500), get).await {
                        trial.reads += 1;
                        if response.kvs().is_empty() {
                            trial.missing_reads += 1;
                        }
                    }
                }
            }
        }
        drop(frozen);
        println!(
            "trial {number}: froze member{frozen_index}{} for {FROZEN_FOR:?}; kept alive through \
             another member after {:?}; deletes {}, missing reads {} of {}, put again {}; \
             leases {:?}; why it moved: {:?}",
            if was_leader { " (the leader)" } else { "" },
            trial.rotated,
            trial.deletes,
            trial.missing_reads,
            trial.reads,
            trial.put_again,
            trial.leases,
            trial.reasons,
        );
        trials.push((lease, trial));
    }

    let missing: usize = trials
        .iter()
        .map(|(_, t)| t.deletes + t.missing_reads)
        .sum();
    let put_again: usize = trials.iter().map(|(_, t)| t.put_again).sum();
    let rotations: Vec<Duration> = trials.iter().filter_map(|(_, t)| t.rotated).collect();
    println!(
        "{TRIALS} trials: key missing {missing} times, put again {put_again} times; \
         rotations {rotations:?}"
    );
    assert_eq!(missing, 0, "the key went missing");
    assert_eq!(put_again, 0, "the key was registered again");
    assert_eq!(
        rotations.len(),
        TRIALS,
        "moved off the frozen member every time"
    );
    assert!(
        rotations.iter().all(|r| *r < TTL),
        "moved within the TTL: {rotations:?}"
    );
    for (lease, trial) in &trials {
        assert!(
            trial.leases.iter().all(|l| l == lease),
            "the same lease throughout a freeze: {:?}",
            trial.leases
        );
        assert!(trial.reads > 0, "the healthy member was read");
    }
    // Never deleted and put back, between trials either: the key created
    // once.
    wait_for("every member healthy", DEADLINE, || all_healthy(&endpoints))
        .await
        .expect("healthy after the last thaw");
    let (_, created_now) = lease_and_created(&endpoints[0], &key)
        .await
        .expect("the key is there");
    println!("leases held over the trials: {leases_held:?}");
    assert_eq!(created_now, created, "the key was never deleted");
    registration.deregister().await;
}
