//! Registration against a real etcd: keepalive over several TTLs, coming
//! back after an outage longer than the TTL, clean and unclean exits, the
//! admin commands and how the owner answers them, dropping the handle, TLS
//! and user authentication, a member that does not answer, and a killed
//! member passed over with the lease kept. A frozen member is in
//! `frozen_member.rs`.

use etcd_client::Client;
use etcd_mesh_registration::{admin, EtcdOptions, EtcdTls, Instance, Registration, State};
use etcd_mesh_testkit::{free_port, wait_for, Etcd, EtcdCluster, EtcdTlsFiles, Proc};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);
const TTL: Duration = Duration::from_secs(2);

fn instance(port: u16) -> Instance {
    Instance::new("reg/", "demo.Echo", &format!("127.0.0.1:{port}"))
        .with_weight(3)
        .with_ttl(TTL)
}

async fn client(etcd: &Etcd) -> Client {
    Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect")
}

/// The key's value and lease as `member` sees them, if the key is there.
async fn stored(member: &str, key: &str) -> Option<(Vec<u8>, i64)> {
    let mut c = Client::connect([member], None).await.ok()?;
    let response = c.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    Some((kv.value().to_vec(), kv.lease()))
}

/// The key's value, lease and create revision as `member` sees them, if
/// the key is there (a key deleted and put again has a new create
/// revision).
async fn stored_kv(member: &str, key: &str) -> Option<(Vec<u8>, i64, i64)> {
    let mut c = Client::connect([member], None).await.ok()?;
    let response = c.get(key, None).await.ok()?;
    let kv = response.kvs().first()?;
    Some((kv.value().to_vec(), kv.lease(), kv.create_revision()))
}

/// The key's lease, if the key is there.
async fn lease_of(etcd: &Etcd, key: &str) -> Option<i64> {
    stored(&etcd.endpoint(), key).await.map(|(_, lease)| lease)
}

/// The key's weight and lease, if the key is there.
async fn weight_and_lease(etcd: &Etcd, key: &str) -> Option<(u32, i64)> {
    let (value, lease) = stored(&etcd.endpoint(), key).await?;
    Some((admin::weight_of(&value).ok()?, lease))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_outlives_several_ttls_and_goes_at_once_on_deregister() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let instance = instance(7001);
    let key = instance.key();
    let registration = Registration::start(vec![etcd.endpoint()], instance).expect("valid");
    let lease = registration.registered(DEADLINE).await.expect("registered");
    // Watched over three TTLs: the key never lapses.
    let until = Instant::now() + TTL * 3;
    while Instant::now() < until {
        assert_eq!(lease_of(&etcd, &key).await, Some(lease), "the key lapsed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    registration.set_weight(7).expect("valid weight");
    wait_for("the new weight", DEADLINE, || async {
        let mut c = client(&etcd).await;
        let listed = admin::list(&mut c, "reg/").await.ok()?;
        (listed.first()?.weight == Some(7)).then_some(())
    })
    .await
    .expect("weight written");
    assert_eq!(
        lease_of(&etcd, &key).await,
        Some(lease),
        "same lease after set_weight"
    );
    registration.deregister().await;
    assert_eq!(lease_of(&etcd, &key).await, None, "gone at once");
}

/// Kills etcd, waits until the registration has seen the loss, keeps etcd
/// down for longer than the TTL (the outage itself, not a wait for
/// anything), and starts it again on the same data; returns when it is
/// back.
async fn outage_longer_than_the_ttl(etcd: &mut Etcd, registration: &Registration) -> Instant {
    etcd.kill();
    lost(registration).await;
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    let restarted = Instant::now();
    etcd.restart().await.expect("etcd restarts");
    restarted
}

/// Waits until the registration has seen its lease lost.
async fn lost(registration: &Registration) {
    let mut states = registration.watch_state();
    wait_for("the loss to be seen", DEADLINE, || {
        let state = states.borrow_and_update().clone();
        async move { matches!(state, State::Retrying { .. }).then_some(()) }
    })
    .await
    .expect("retrying");
}

/// Waits until the registration is back after a loss it has been seen
/// to take ([`lost`]): under the same lease if that outlived the loss
/// (etcd gives the leases it restores on a restart, or that a new leader
/// takes over, a fresh TTL), else under a new one.
async fn back(registration: &Registration) -> i64 {
    registration
        .registered(DEADLINE)
        .await
        .expect("registered again")
}

/// Waits until the registration holds a lease other than `old`.
async fn registered_under_a_new_lease(registration: &Registration, old: i64) -> i64 {
    let mut states = registration.watch_state();
    wait_for("a registration under a new lease", DEADLINE, || {
        let state = states.borrow_and_update().clone();
        async move {
            match state {
                State::Registered { lease } if lease != old => Some(lease),
                _ => None,
            }
        }
    })
    .await
    .expect("registered again")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_ttl_is_survived() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = Etcd::start(dir.path()).await.expect("etcd");
    let instance = instance(7002);
    let key = instance.key();
    let registration = Registration::start(vec![etcd.endpoint()], instance).expect("valid");
    registration.registered(DEADLINE).await.expect("registered");
    let restarted = outage_longer_than_the_ttl(&mut etcd, &registration).await;
    back(&registration).await;
    let back_after = restarted.elapsed();
    println!("registered again {back_after:?} after etcd came back");
    // And it stays: kept alive, not a leftover of a lease left to expire.
    let until = Instant::now() + TTL * 2;
    while Instant::now() < until {
        assert!(
            lease_of(&etcd, &key).await.is_some(),
            "the key lapsed after the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    registration.deregister().await;
    assert_eq!(lease_of(&etcd, &key).await, None);
}

fn run_cli(etcd: &Etcd, dir: &std::path::Path, port: u16) -> Proc {
    let mut command = Command::new(env!("CARGO_BIN_EXE_etcd-mesh-register"));
    command
        .args(["--etcd", &etcd.endpoint(), "run", "--service", "demo.Echo"])
        .args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--ttl",
            "2",
            "--prefix",
            "reg/",
        ])
        .args(["--weight", "4", "--meta", "zone=a"]);
    Proc::spawn(
        "etcd-mesh-register",
        command,
        dir.join(format!("register-{port}.log")),
    )
    .expect("spawn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_registers_lists_and_cleans_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let (killed_port, stopped_port) = (free_port().expect("port"), free_port().expect("port"));
    let mut killed = run_cli(&etcd, dir.path(), killed_port);
    let mut stopped = run_cli(&etcd, dir.path(), stopped_port);
    let killed_key = instance(killed_port).key();
    let stopped_key = instance(stopped_port).key();
    for key in [&killed_key, &stopped_key] {
        wait_for("the CLI to register", DEADLINE, || async {
            lease_of(&etcd, key).await
        })
        .await
        .expect("registered");
    }

    let output = Command::new(env!("CARGO_BIN_EXE_etcd-mesh-register"))
        .args(["--etcd", &etcd.endpoint(), "list", "--prefix", "reg/"])
        .output()
        .expect("list runs");
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{listing}");
    for key in [&killed_key, &stopped_key] {
        let line = listing
            .lines()
            .find(|l| l.contains(key.as_str()))
            .expect("listed");
        assert!(
            line.contains("weight=4") && line.contains("ttl=") && !line.contains("ttl=-"),
            "{line}"
        );
    }

    // SIGTERM: deregistered at once.
    stopped.terminate(Duration::from_secs(5));
    assert_eq!(
        lease_of(&etcd, &stopped_key).await,
        None,
        "gone when the process exits"
    );
    // SIGKILL: nobody deregisters; the key lapses with its lease.
    killed.kill();
    let killed_at = Instant::now();
    wait_for(
        "the killed process's key to lapse",
        TTL + Duration::from_secs(5),
        || async { lease_of(&etcd, &killed_key).await.is_none().then_some(()) },
    )
    .await
    .expect("lapsed");
    assert!(
        killed_at.elapsed() >= Duration::from_millis(500),
        "it lapsed, it was not deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_weight_and_drain_keep_the_lease_and_refuse_garbage() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let registration = Registration::start(vec![etcd.endpoint()], instance(7003)).expect("valid");
    let lease = registration.registered(DEADLINE).await.expect("registered");
    let key = instance(7003).key();
    let mut c = client(&etcd).await;
    admin::set_weight(&mut c, &key, 9).await.expect("set");
    let listed = admin::list(&mut c, "reg/").await.expect("list");
    assert_eq!(
        (listed[0].weight, lease_of(&etcd, &key).await),
        (Some(9), Some(lease))
    );
    assert!(matches!(
        admin::set_weight(&mut c, "reg/demo.Echo/nope", 1).await,
        Err(admin::AdminError::Missing(_))
    ));
    assert!(matches!(
        admin::set_weight(&mut c, &key, 10_001).await,
        Err(admin::AdminError::Weight(_))
    ));
    c.put("reg/demo.Echo/garbage", "not json", None)
        .await
        .expect("put");
    assert!(matches!(
        admin::set_weight(&mut c, "reg/demo.Echo/garbage", 1).await,
        Err(admin::AdminError::NotNaming { .. })
    ));
    admin::drain(&mut c, &key, Duration::from_millis(100))
        .await
        .expect("drain");
    // Its process is alive: the key is back, drained, under the same lease.
    wait_for("the drained key back at weight 0", DEADLINE, || async {
        (weight_and_lease(&etcd, &key).await == Some((0, lease))).then_some(())
    })
    .await
    .expect("drained, not gone");
    registration.deregister().await;
    assert_eq!(lease_of(&etcd, &key).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_is_passed_over_for_the_next_keeping_the_lease() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = EtcdCluster::start(dir.path(), 3)
        .await
        .expect("a 3-member cluster");
    let endpoints = cluster.endpoints();
    let instance = instance(7004);
    let key = instance.key();
    // Through the first member, chosen rather than left to chance.
    let mut options = EtcdOptions::new(endpoints.clone());
    options.first_member = 0;
    let registration = Registration::start_with(options, instance).expect("valid");
    let first = registration.registered(DEADLINE).await.expect("registered");
    let first_member = format!("http://{}", endpoints[0]);
    assert_eq!(registration.current_member(), Some(first_member.clone()));
    let created = stored_kv(&endpoints[1], &key).await.expect("stored").2;
    cluster.members[0].kill();
    let killed = Instant::now();
    wait_for(
        "the lease kept alive through another member",
        DEADLINE,
        || async {
            let member = registration.current_member()?;
            (member != first_member).then_some(member)
        },
    )
    .await
    .expect("moved to another member");
    println!(
        "kept alive through another member {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(
        registration.state(),
        State::Registered { lease: first },
        "the same lease, not a new one"
    );
    // Kept alive through the others for longer than the TTL, never put
    // again: the key created once, under the first lease.
    let until = Instant::now() + TTL * 3;
    while Instant::now() < until {
        assert_eq!(
            stored_kv(&endpoints[1], &key)
                .await
                .map(|(_, lease, c)| (lease, c)),
            Some((first, created)),
            "the key lapsed or was put again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(registration.state(), State::Registered { lease: first });
    registration.deregister().await;
    assert_eq!(stored(&endpoints[2], &key).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_weight_outlives_an_outage_longer_than_the_ttl() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = Etcd::start(dir.path()).await.expect("etcd");
    let instance = instance(7005);
    let key = instance.key();
    let registration = Registration::start(vec![etcd.endpoint()], instance).expect("valid");
    registration.registered(DEADLINE).await.expect("registered");
    admin::set_weight(&mut client(&etcd).await, &key, 9)
        .await
        .expect("set-weight");
    wait_for("the owner to adopt weight 9", DEADLINE, || async {
        (registration.weight() == 9).then_some(())
    })
    .await
    .expect("adopted");
    outage_longer_than_the_ttl(&mut etcd, &registration).await;
    let second = back(&registration).await;
    assert_eq!(
        weight_and_lease(&etcd, &key).await,
        Some((9, second)),
        "registered again with the operator's weight"
    );
    registration.deregister().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_instance_stays_drained_through_an_outage_longer_than_the_ttl() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut etcd = Etcd::start(dir.path()).await.expect("etcd");
    let instance = instance(7006);
    let key = instance.key();
    let registration = Registration::start(vec![etcd.endpoint()], instance).expect("valid");
    let first = registration.registered(DEADLINE).await.expect("registered");
    // Weight 0, then the key deleted: its owner puts it back at weight 0.
    admin::drain(&mut client(&etcd).await, &key, Duration::from_millis(200))
        .await
        .expect("drain");
    wait_for("the drained key back at weight 0", DEADLINE, || async {
        (weight_and_lease(&etcd, &key).await == Some((0, first))).then_some(())
    })
    .await
    .expect("kept drained");
    assert_eq!(registration.weight(), 0);
    outage_longer_than_the_ttl(&mut etcd, &registration).await;
    let second = back(&registration).await;
    assert_eq!(
        weight_and_lease(&etcd, &key).await,
        Some((0, second)),
        "still drained after registering again"
    );
    // The latest change wins: the process itself can bring it back.
    registration.set_weight(5).expect("valid weight");
    wait_for("weight 5 written", DEADLINE, || async {
        (weight_and_lease(&etcd, &key).await == Some((5, second))).then_some(())
    })
    .await
    .expect("undrained");
    registration.deregister().await;
    assert_eq!(lease_of(&etcd, &key).await, None);
}

/// A TCP forwarder to etcd that can cut the owner off (its connections
/// dropped, new ones closed at once) and let it through again.
struct Link {
    addr: String,
    open: Arc<AtomicBool>,
    pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Link {
    async fn to(etcd: &Etcd) -> Link {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let open = Arc::new(AtomicBool::new(true));
        let pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (target, open_, pipes_) = (etcd.client, Arc::clone(&open), Arc::clone(&pipes));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !open_.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                lock(&pipes_).push(pipe);
            }
        });
        Link { addr, open, pipes }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for pipe in lock(&self.pipes).drain(..) {
            pipe.abort();
        }
    }

    fn mend(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_set_while_the_owner_was_cut_off_is_adopted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let link = Link::to(&etcd).await;
    let instance = instance(7013);
    let key = instance.key();
    let registration = Registration::start(vec![link.addr.clone()], instance).expect("valid");
    let first = registration.registered(DEADLINE).await.expect("registered");
    link.cut();
    lost(&registration).await;
    // The key lives on with its lease for a while: the operator changes it
    // while the owner cannot see the change.
    admin::set_weight(&mut client(&etcd).await, &key, 7)
        .await
        .expect("set-weight while the owner is away");
    link.mend();
    let second = back(&registration).await;
    // Cut off for far less than the TTL: the lease is kept alive again,
    // not replaced, and the change made meanwhile is caught up with.
    assert_eq!(second, first, "the same lease after a short cut");
    assert_eq!(weight_and_lease(&etcd, &key).await, Some((7, second)));
    assert_eq!(registration.weight(), 7);

    // Both sides change it while cut off: the process's own change, the
    // later one, wins.
    link.cut();
    lost(&registration).await;
    admin::set_weight(&mut client(&etcd).await, &key, 2)
        .await
        .expect("set-weight while the owner is away");
    registration.set_weight(4).expect("valid weight");
    link.mend();
    let third = back(&registration).await;
    assert_eq!(third, first, "the same lease after a short cut");
    assert_eq!(weight_and_lease(&etcd, &key).await, Some((4, third)));
    registration.deregister().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_by_hand_comes_back_drained() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let instance = instance(7012);
    let key = instance.key();
    let registration = Registration::start(vec![etcd.endpoint()], instance).expect("valid");
    let lease = registration.registered(DEADLINE).await.expect("registered");
    // As `etcdctl del` would: no weight 0 first.
    client(&etcd)
        .await
        .delete(key.as_str(), None)
        .await
        .expect("delete");
    wait_for("the key back at weight 0", DEADLINE, || async {
        (weight_and_lease(&etcd, &key).await == Some((0, lease))).then_some(())
    })
    .await
    .expect("back, drained");
    assert_eq!(registration.weight(), 0);
    registration.deregister().await;
    assert_eq!(lease_of(&etcd, &key).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_is_a_loss_not_a_drain() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let instance = instance(7007);
    let key = instance.key();
    let registration = Registration::start(vec![etcd.endpoint()], instance).expect("valid");
    let first = registration.registered(DEADLINE).await.expect("registered");
    client(&etcd)
        .await
        .lease_revoke(first)
        .await
        .expect("revoke");
    let second = registered_under_a_new_lease(&registration, first).await;
    assert_eq!(weight_and_lease(&etcd, &key).await, Some((3, second)));
    registration.deregister().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_without_the_lease_is_adopted_and_put_back_under_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    let instance = instance(7008);
    let key = instance.key();
    let registration = Registration::start(vec![etcd.endpoint()], instance).expect("valid");
    let lease = registration.registered(DEADLINE).await.expect("registered");
    // As `etcdctl put` would: no lease, the weight as a string.
    let value = r#"{"Op":0,"Addr":"127.0.0.1:7008","Metadata":{"weight":"6"}}"#;
    client(&etcd)
        .await
        .put(key.as_str(), value, None)
        .await
        .expect("put");
    wait_for("weight 6 under the owner's lease", DEADLINE, || async {
        (weight_and_lease(&etcd, &key).await == Some((6, lease))).then_some(())
    })
    .await
    .expect("adopted and put back under the lease");
    registration.deregister().await;
    assert_eq!(lease_of(&etcd, &key).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_revokes_the_lease_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    // A TTL far longer than the wait below: expiry cannot explain it.
    let ttl = Duration::from_secs(60);
    let instance = instance(7009).with_ttl(ttl);
    let key = instance.key();
    let registration = Registration::start(vec![etcd.endpoint()], instance).expect("valid");
    let lease = registration.registered(DEADLINE).await.expect("registered");
    drop(registration);
    wait_for("the key and its lease to go", ttl / 6, || async {
        let mut c = client(&etcd).await;
        let left = c.lease_time_to_live(lease, None).await.ok()?.ttl();
        (left == -1 && lease_of(&etcd, &key).await.is_none()).then_some(())
    })
    .await
    .expect("revoked on drop");
}

/// Runs the CLI to its end, failing the test if it has not ended within
/// the deadline.
async fn cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_etcd-mesh-register"));
    command.args(args).env_remove("ETCD_MESH_ETCD_PASSWORD");
    command.envs(env.iter().copied()).kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("the CLI ends on its own")
        .expect("the CLI runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_and_the_cli_reach_etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = EtcdTlsFiles::make(dir.path()).expect("certificates");
    let etcd = Etcd::start_tls(dir.path(), files.clone())
        .await
        .expect("etcd with TLS");
    let (client_cert, client_key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    let mut options = EtcdOptions::new(vec![etcd.endpoint()]);
    options.tls = Some(
        EtcdTls::from_files(&files.ca, Some((&client_cert, &client_key)), None).expect("PEM files"),
    );
    let instance = instance(7010);
    let key = instance.key();
    let registration = Registration::start_with(options, instance).expect("valid");
    registration
        .registered(DEADLINE)
        .await
        .expect("registered over TLS");

    let path = |p: &std::path::Path| p.display().to_string();
    let (ca, cert, client_key) = (path(&files.ca), path(&client_cert), path(&client_key));
    let tls = [
        "--etcd-ca",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &client_key,
    ];
    let endpoint = etcd.endpoint();
    let listed = cli(
        &[
            &["--etcd", &endpoint],
            &tls[..],
            &["list", "--prefix", "reg/"],
        ]
        .concat(),
        &[],
    )
    .await;
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && listing.contains(&key) && listing.contains("weight=3"),
        "{listing}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    // Without the client certificate etcd refuses, and the CLI says so.
    let refused = cli(
        &[
            "--etcd",
            &endpoint,
            "--etcd-ca",
            &ca,
            "list",
            "--prefix",
            "reg/",
        ],
        &[],
    )
    .await;
    assert!(!refused.status.success());
    registration.deregister().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_and_the_cli_log_in_as_an_etcd_user() {
    let dir = tempfile::tempdir().expect("temp dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd");
    for args in [&["user", "add", "root:rootpw"][..], &["auth", "enable"]] {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.endpoint()])
            .args(args)
            .output()
            .expect("etcdctl runs");
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    }
    let mut options = EtcdOptions::new(vec![etcd.endpoint()]);
    options.user = Some(("root".into(), "rootpw".into()));
    let instance = instance(7011);
    let key = instance.key();
    let registration = Registration::start_with(options.clone(), instance).expect("valid");
    registration
        .registered(DEADLINE)
        .await
        .expect("registered as root");

    let endpoint = etcd.endpoint();
    let set_weight = [
        "--etcd",
        &endpoint,
        "--etcd-user",
        "root",
        "set-weight",
        "--prefix",
        "reg/",
        "--service",
        "demo.Echo",
        "--addr",
        "127.0.0.1:7011",
        "--weight",
        "8",
    ];
    let done = cli(&set_weight, &[("ETCD_MESH_ETCD_PASSWORD", "rootpw")]).await;
    assert!(done.status.success(), "{done:?}");
    let mut c = options.connect().await.expect("connect as root");
    let listed = admin::list(&mut c, "reg/").await.expect("list");
    assert_eq!(
        listed.iter().find(|l| l.key == key).and_then(|l| l.weight),
        Some(8)
    );
    wait_for("the owner to adopt weight 8", DEADLINE, || async {
        (registration.weight() == 8).then_some(())
    })
    .await
    .expect("adopted");
    // A wrong password, or none, is refused.
    let wrong = cli(&set_weight, &[("ETCD_MESH_ETCD_PASSWORD", "nope")]).await;
    assert!(!wrong.status.success(), "{wrong:?}");
    let without = cli(&set_weight, &[]).await;
    assert!(
        !without.status.success()
            && String::from_utf8_lossy(&without.stderr).contains("ETCD_MESH_ETCD_PASSWORD"),
        "{without:?}"
    );
    registration.deregister().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_gives_up_on_an_etcd_that_does_not_answer() {
    // Accepts connections (the kernel's backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = silent.local_addr().expect("addr").to_string();
    let started = Instant::now();
    let out = cli(
        &["--etcd", &endpoint, "--connect-timeout", "1", "list"],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("did not answer within 1s"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
