//! The scale ladder: one etcd loaded incrementally to each size of the
//! ladder (10 endpoints per service), and at each size a fresh release
//! sync-server: its time to ready and where that went (its listing log
//! line), its memory idle and with the long-polls held, the full
//! change-feed answer, one put answering every held long-poll, and what a
//! restart costs clients that are up to date, with `digest` and without
//! (the *before*). Clients speak raw HTTP/1.1 from this process.

use crate::scale::{key, load, value};
use crate::util::{linear_fit, median, peak_rss_mib, rss_mib};
use anyhow::Context;
use etcd_client::Client;
use etcd_mesh_testkit::{
    free_port, http_get, prometheus_value, wait_for, wait_ready, workspace_root, Envoy,
    EnvoyOptions, Etcd, Proc,
};
use etcd_mesh_wire::Changes;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Where the ladder's registrations live in etcd.
const PREFIX: &str = "scale/";
/// The most a sync-server may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Connections opened at once by the clients.
const CONNECTING: usize = 256;
/// `wait` of the restart run's long-polls, and how long they may take to
/// be held (less, so that none times out before the restart).
const RESTART_WAIT_S: u64 = 30;
const RESTART_HELD_TIMEOUT: Duration = Duration::from_secs(20);
/// The most a restart run's client may take to get its 200.
const RESTART_DEADLINE: Duration = Duration::from_secs(300);
/// sync-server's log line that says where its time to ready went.
const LISTING_LINE: &str = "listed registrations from etcd";
/// The size the ladder is extrapolated to, on paper.
const EXTRAPOLATED_TO: usize = 10_000_000;

#[derive(Debug, Clone)]
pub struct LadderOptions {
    /// Endpoints at each rung, growing.
    pub sizes: Vec<usize>,
    /// Held long-polls answered by one put, and up-to-date clients of the
    /// restart run with `digest`.
    pub long_polls: usize,
    /// Clients of the restart run without `digest` (each takes the whole
    /// tables).
    pub before_clients: usize,
}

pub async fn run(options: &LadderOptions) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let etcd = Etcd::start(dir.path()).await.map_err(anyhow::Error::msg)?;
    let mut client = Client::connect([etcd.endpoint()], None).await?;
    let mut rungs = Vec::new();
    let mut loaded = 0;
    for (n, &size) in options.sizes.iter().enumerate() {
        anyhow::ensure!(size > loaded, "ladder sizes must grow: {:?}", options.sizes);
        let loading = Instant::now();
        load(&[etcd.endpoint()], PREFIX, loaded..size).await?;
        let load_s = loading.elapsed().as_secs_f64();
        eprintln!(
            "ladder: {size} endpoints in etcd ({load_s:.1} s for the last {})",
            size - loaded
        );
        loaded = size;
        let mut rung = measure(&etcd, &mut client, dir.path(), size, n, options).await?;
        rung["etcd_load_s"] = json!(load_s);
        rung["etcd_db_mib"] = json!(etcd_db_mib(etcd.client).await);
        rungs.push(rung);
    }
    Ok(json!({
        "endpoints_per_service": crate::scale::ENDPOINTS_PER_SERVICE,
        "long_polls": options.long_polls,
        "before_clients": options.before_clients,
        "etcd_quota_backend_bytes": std::env::var("ETCD_QUOTA_BACKEND_BYTES").ok(),
        "extrapolated": extrapolate(&rungs),
        "rungs": rungs,
    }))
}

/// One rung: a fresh sync-server over `endpoints` registrations.
async fn measure(
    etcd: &Etcd,
    client: &mut Client,
    dir: &Path,
    endpoints: usize,
    rung: usize,
    options: &LadderOptions,
) -> anyhow::Result<Value> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let log = |what: &str| dir.join(format!("sync-{endpoints}-{what}.log"));
    let (server, ready_ms) = Server::start(&etcd.endpoint(), listen, log("first")).await?;
    let listing = server.listing();
    let rss_idle = rss_mib(server.pid())?;
    eprintln!("ladder: sync-server ready in {ready_ms:.0} ms at {rss_idle:.0} MiB");
    let full = full_answer(listen).await?;
    let path = format!(
        "/v1/changes?since={}&epoch={}&wait=120",
        full.held.revision, full.held.epoch
    );
    // A weight change of one endpoint: the key count stays the ladder's.
    let put = (key(PREFIX, 0), value(0, 2 + rung as u32));
    let polls =
        put_answers_long_polls(listen, server.pid(), client, &path, options.long_polls, put)
            .await?;
    eprintln!("ladder: one put answered {} long-polls", options.long_polls);
    let hwm = peak_rss_mib(server.pid())?;
    let services = endpoints.div_ceil(crate::scale::ENDPOINTS_PER_SERVICE);
    let envoy = json!({
        "unscoped": envoy_memory(dir, listen, services, None).await,
        "scoped": envoy_memory(dir, listen, services, Some(SCOPED_SERVICES)).await,
    });
    eprintln!("ladder: Envoy's memory measured");
    let (before, after) = restarts(server, etcd, options, log).await;
    Ok(json!({
        "endpoints": endpoints,
        "services": endpoints.div_ceil(crate::scale::ENDPOINTS_PER_SERVICE),
        "time_to_ready_ms": ready_ms,
        "listing": listing,
        "rss_idle_mib": rss_idle,
        "rss_long_polls_mib": polls["rss_held_mib"],
        "hwm_mib": hwm,
        "full_answer_bytes": full.bytes,
        "full_answer_serve_ms_median": full.serve_ms_median,
        "put_long_polls": polls,
        "envoy": envoy,
        "restart_without_digest": before,
        "restart_with_digest": after,
    }))
}

/// Services a scoped Envoy asks for.
const SCOPED_SERVICES: usize = 10;

/// An Envoy (two workers) following the sync-server at `listen`, all of
/// its `services` or the first `scope` of them: its resident memory once
/// the poller holds them and a worker loaded them, and how long that took;
/// `{"error": ...}` if it did not within two minutes.
async fn envoy_memory(
    dir: &Path,
    listen: SocketAddr,
    services: usize,
    scope: Option<usize>,
) -> Value {
    let measured = async {
        let names = scope.map(|n| {
            let names: Vec<String> = (0..n).map(|i| format!("\"scale-{i}\"")).collect();
            format!(r#", "services": [{}]"#, names.join(","))
        });
        let poller = format!(
            r#"{{"role": "poller", "clusters": {{{{SYNC_CLUSTER_NAMES}}}}, "authority": "sync-server"{}}}"#,
            names.unwrap_or_default()
        );
        let dir = tempfile::tempdir_in(dir)?;
        let started = Instant::now();
        let envoy = Envoy::start(
            dir.path(),
            EnvoyOptions {
                concurrency: 2,
                sync_servers: vec![listen],
                poller_config: Some(poller),
                ..EnvoyOptions::default()
            },
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let want = scope.unwrap_or(services) as u64;
        wait_for(
            "the Envoy to hold the tables",
            Duration::from_secs(120),
            || async {
                let held = envoy.stat("wasmcustom.etcd_mesh.table_services").await?;
                // A scoped load of a few services may take under a millisecond.
                let loaded = envoy.stat("wasmcustom.etcd_mesh.table_load_ms").await?;
                (held >= want && (scope.is_some() || loaded > 0)).then_some(())
            },
        )
        .await
        .map_err(|e| {
            let log = envoy.log_tail(200);
            let why = if log.contains("buffer size limit for async client response body") {
                "the full answer is over Envoy's 32 MiB buffer for a plugin's HTTP call"
            } else {
                "see Envoy's log"
            };
            anyhow::anyhow!("{e} ({why})")
        })?;
        Ok::<_, anyhow::Error>(json!({
            "services": want,
            "held_after_ms": started.elapsed().as_secs_f64() * 1e3,
            "rss_mib": rss_mib(envoy.pid())?,
        }))
    };
    measured
        .await
        .unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

/// The restart runs, without `digest` (the *before*) and then with it,
/// each against the server the one before left; a run that fails is
/// reported as `{"error": ...}`.
async fn restarts(
    server: Server,
    etcd: &Etcd,
    options: &LadderOptions,
    log: impl Fn(&str) -> PathBuf,
) -> (Value, Value) {
    let failed = |e: anyhow::Error| json!({ "error": format!("{e:#}") });
    let endpoint = etcd.endpoint();
    let before = restart(
        server,
        &endpoint,
        options.before_clients,
        false,
        log("before"),
    )
    .await;
    let (server, before) = match before {
        Ok((server, before)) => (server, before),
        Err(e) => {
            let skipped = json!({ "error": "not run: the run without digest failed" });
            return (failed(e), skipped);
        }
    };
    eprintln!("ladder: restart without digest done");
    let after = restart(server, &endpoint, options.long_polls, true, log("after")).await;
    let after = match after {
        Ok((_server, after)) => {
            eprintln!("ladder: restart with digest done");
            after
        }
        Err(e) => {
            eprintln!("ladder: RESTART WITH DIGEST FAILED: {e:#}");
            failed(e)
        }
    };
    (before, after)
}

/// A release sync-server watching the ladder's registrations, killed when
/// dropped.
struct Server {
    proc: Proc,
    listen: SocketAddr,
    log: PathBuf,
}

impl Server {
    /// Starts one on `listen` and waits until it is ready: (server,
    /// milliseconds from the start to `/readyz` answering 200).
    async fn start(etcd: &str, listen: SocketAddr, log: PathBuf) -> anyhow::Result<(Server, f64)> {
        let binary = workspace_root().join("target/release/sync-server");
        anyhow::ensure!(binary.exists(), "no {}: run `make build`", binary.display());
        let mut command = Command::new(&binary);
        command
            .args(["--etcd", etcd, "--listen", &listen.to_string()])
            .args(["--watch", &format!("etcd-naming={PREFIX}")])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let started = Instant::now();
        let mut proc = Proc::spawn("sync-server", command, log.clone())?;
        let ready = tokio::select! {
            ready = wait_ready(listen, READY_TIMEOUT) => ready,
            () = exit_of(&mut proc) => Err("it exited".to_owned()),
        };
        if let Err(e) = ready {
            anyhow::bail!("sync-server on {listen}: {e}\n{}", proc.log_tail(20));
        }
        let ready_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok((Server { proc, listen, log }, ready_ms))
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The fields of its listing log line (null where missing).
    fn listing(&self) -> Value {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        listing_fields(&strip_ansi(&text))
    }

    /// SIGTERM, and waits for it to exit (SIGKILL after 30 s): the
    /// milliseconds that took.
    async fn stop(self) -> anyhow::Result<f64> {
        let stopping = Instant::now();
        let mut proc = self.proc;
        tokio::task::spawn_blocking(move || proc.terminate(Duration::from_secs(30))).await?;
        Ok(stopping.elapsed().as_secs_f64() * 1e3)
    }
}

/// Returns once `proc` has exited (polled every 100 ms).
async fn exit_of(proc: &mut Proc) {
    while !proc.exited() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip to the sequence's final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The numeric `key=value` fields of the first listing line in `log`
/// (`fetch_ms`, `build_ms`, `publish_ms`, `pages`, `keys`, ...: whatever
/// this sync-server logs); null without that line.
fn listing_fields(log: &str) -> Value {
    let Some(line) = log.lines().find(|l| l.contains(LISTING_LINE)) else {
        return Value::Null;
    };
    line.split_whitespace()
        .filter_map(|word| {
            let (name, value) = word.split_once('=')?;
            Some((name.to_owned(), json!(value.parse::<u64>().ok()?)))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// etcd's database size, in MiB (its `/metrics`).
async fn etcd_db_mib(etcd: SocketAddr) -> Option<f64> {
    let (_, page) = http_get(etcd, "/metrics").await.ok()?;
    let bytes: f64 = page.lines().find_map(|l| {
        l.strip_prefix("etcd_mvcc_db_total_size_in_bytes ")?
            .parse()
            .ok()
    })?;
    Some(bytes / (1024.0 * 1024.0))
}

/// What a client holds after a full answer: what it sends back.
#[derive(Debug, Clone)]
struct Held {
    revision: u64,
    health_seq: u64,
    epoch: String,
    observer: String,
    digest: u64,
}

impl Held {
    /// The long-poll of an up-to-date client, with `digest` or without.
    fn long_poll(&self, digest: bool, wait_s: u64) -> String {
        let mut path = format!(
            "/v1/changes?since={}&health_seq={}&epoch={}&observer={}",
            self.revision, self.health_seq, self.epoch, self.observer
        );
        if digest {
            path += &format!("&digest={}", self.digest);
        }
        path + &format!("&wait={wait_s}")
    }
}

/// `GET /v1/changes` (no query): its size, the median time to serve it
/// over 3 requests, and what it gives a client to hold.
struct FullAnswer {
    bytes: usize,
    serve_ms_median: f64,
    held: Held,
}

async fn full_answer(listen: SocketAddr) -> anyhow::Result<FullAnswer> {
    let mut serve_ms = Vec::new();
    let mut body = String::new();
    for _ in 0..3 {
        let t = Instant::now();
        let (status, got) = http_get(listen, "/v1/changes").await?;
        serve_ms.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status == 200, "/v1/changes status {status}");
        body = got;
    }
    Ok(FullAnswer {
        bytes: body.len(),
        serve_ms_median: median(&serve_ms),
        held: held_after(&body)?,
    })
}

/// What a client holds after the full answer `body`.
fn held_after(body: &str) -> anyhow::Result<Held> {
    let full = Changes::decode(body.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Held {
        revision: full.revision,
        health_seq: full.health_seq,
        epoch: full.epoch,
        observer: full.observer,
        digest: full.digest,
    })
}

/// One answer on a raw HTTP/1.1 connection, read to its end: when it
/// began, its status, its body's length and first bytes.
struct Answer {
    at: Instant,
    status: u16,
    body_bytes: usize,
    body_start: Vec<u8>,
}

impl Answer {
    fn is_full(&self) -> bool {
        String::from_utf8_lossy(&self.body_start).contains(r#""full":true"#)
    }
}

/// GETs `path` with `Connection: close`, `connecting` bounding the
/// connections being opened at once. The body is counted, not kept (a
/// full answer at 2,000,000 endpoints is about 90 MB).
async fn exchange(addr: SocketAddr, path: &str, connecting: &Semaphore) -> anyhow::Result<Answer> {
    const KEPT: usize = 4096;
    let permit = connecting.acquire().await?;
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    drop(permit);
    // No buffer while the long-poll is held.
    stream.readable().await?;
    let mut buf = vec![0u8; 16 << 10];
    let (mut head, mut body_start) = (Vec::new(), None::<Vec<u8>>);
    let (mut at, mut body_bytes) = (None, 0);
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        at.get_or_insert_with(Instant::now);
        match &mut body_start {
            Some(start) => {
                body_bytes += n;
                let room = KEPT.saturating_sub(start.len()).min(n);
                start.extend_from_slice(&buf[..room]);
            }
            None => {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    let mut start = head.split_off(end + 4);
                    body_bytes = start.len();
                    start.truncate(KEPT);
                    body_start = Some(start);
                }
            }
        }
    }
    let status = std::str::from_utf8(head.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .context("not an HTTP answer")?;
    Ok(Answer {
        at: at.context("no answer")?,
        status,
        body_bytes,
        body_start: body_start.unwrap_or_default(),
    })
}

async fn metric(listen: SocketAddr, name: &str) -> Option<u64> {
    let (_, metrics) = http_get(listen, "/metrics").await.ok()?;
    prometheus_value(&metrics, name)
}

/// Waits until sync-server holds `n` long-polls; fails at once if a
/// client finished meanwhile (a 400, say), with its error.
async fn wait_held<T: 'static>(
    listen: SocketAddr,
    n: usize,
    clients: &mut JoinSet<anyhow::Result<T>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(done) = clients.try_join_next() {
            done??;
            anyhow::bail!("a client was answered before the others were held");
        }
        let held = metric(listen, "sync_server_long_poll_waiters").await;
        if held.is_some_and(|held| held >= n as u64) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{n} long-polls not held after {timeout:?} (held: {held:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Holds `n` long-polls on `path`, puts one registration, and measures
/// when every long-poll was answered (p100 and median ms), with the
/// server's VmRSS while they were held.
async fn put_answers_long_polls(
    listen: SocketAddr,
    server_pid: u32,
    etcd: &mut Client,
    path: &str,
    n: usize,
    put: (String, String),
) -> anyhow::Result<Value> {
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let mut polls = JoinSet::new();
    for _ in 0..n {
        let (connecting, path) = (Arc::clone(&connecting), path.to_owned());
        polls.spawn(async move { exchange(listen, &path, &connecting).await });
    }
    wait_held(listen, n, &mut polls, Duration::from_secs(120)).await?;
    let rss_held = rss_mib(server_pid)?;
    let put_at = Instant::now();
    etcd.put(put.0, put.1, None).await?;
    let mut answered_ms = Vec::new();
    let (mut all_ok, mut largest) = (true, 0);
    while let Some(done) = polls.join_next().await {
        let answer = done??;
        all_ok &= answer.status == 200;
        largest = largest.max(answer.body_bytes);
        answered_ms.push(answer.at.duration_since(put_at).as_secs_f64() * 1e3);
    }
    Ok(json!({
        "long_polls": n,
        "all_answered_ms": answered_ms.iter().copied().fold(0.0, f64::max),
        "median_answered_ms": median(&answered_ms),
        "all_200": all_ok,
        "bytes_per_answer": largest,
        "rss_held_mib": rss_held,
    }))
}

/// What one client of a restart run got: when its 200 came, the body bytes
/// of every answer, whether the 200 was a full answer, requests made.
struct Followed {
    answered: Instant,
    bytes: usize,
    full: bool,
    requests: usize,
}

/// An up-to-date client across a restart: long-polls `path` until a 200,
/// retrying (20 ms backoff doubling to 500 ms) when a connection ends
/// without one; a 400 fails at once.
async fn follow_restart(
    listen: SocketAddr,
    path: String,
    connecting: Arc<Semaphore>,
    deadline: Instant,
) -> anyhow::Result<Followed> {
    let (mut bytes, mut requests, mut backoff) = (0, 0, Duration::from_millis(20));
    loop {
        requests += 1;
        let exchanged =
            tokio::time::timeout_at(deadline.into(), exchange(listen, &path, &connecting))
                .await
                .context("no 200 before the deadline")?;
        if let Ok(answer) = exchanged {
            bytes += answer.body_bytes;
            match answer.status {
                200 => {
                    return Ok(Followed {
                        answered: answer.at,
                        bytes,
                        full: answer.is_full(),
                        requests,
                    })
                }
                400 => anyhow::bail!(
                    "HTTP 400: {}",
                    String::from_utf8_lossy(&answer.body_start).trim()
                ),
                _ => {}
            }
        }
        anyhow::ensure!(
            Instant::now() + backoff < deadline,
            "no 200 before the deadline"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// A restart with `clients` up-to-date clients held: each long-polls with
/// what a full answer of `server` gave (and its `digest` if `digest`);
/// `server` is stopped and a new one started on the same address; each
/// client retries until a 200. Returns the new server, the bytes the
/// clients received, their full answers and the time from the SIGTERM to
/// the last 200 (and to the median client's).
async fn restart(
    server: Server,
    etcd: &str,
    clients: usize,
    digest: bool,
    log: PathBuf,
) -> anyhow::Result<(Server, Value)> {
    let listen = server.listen;
    let (_, body) = http_get(listen, "/v1/changes").await?;
    let path = held_after(&body)?.long_poll(digest, RESTART_WAIT_S);
    drop(body);
    let connecting = Arc::new(Semaphore::new(CONNECTING));
    let deadline = Instant::now() + RESTART_DEADLINE;
    let mut followers = JoinSet::new();
    for _ in 0..clients {
        followers.spawn(follow_restart(
            listen,
            path.clone(),
            Arc::clone(&connecting),
            deadline,
        ));
    }
    wait_held(listen, clients, &mut followers, RESTART_HELD_TIMEOUT).await?;
    let restart_at = Instant::now();
    let stop_ms = server.stop().await?;
    let (server, ready_ms) = Server::start(etcd, listen, log).await?;
    let (mut bytes, mut full, mut requests, mut answered_ms) = (0, 0, 0, Vec::new());
    while let Some(done) = followers.join_next().await {
        let followed = done??;
        bytes += followed.bytes;
        full += usize::from(followed.full);
        requests += followed.requests;
        let after = followed.answered.saturating_duration_since(restart_at);
        answered_ms.push(after.as_secs_f64() * 1e3);
    }
    Ok((
        server,
        json!({
            "clients": clients,
            "digest": digest,
            "bytes_total": bytes,
            "full_answers": full,
            "requests": requests,
            "restart_to_last_200_ms": answered_ms.iter().copied().fold(0.0, f64::max),
            "restart_to_200_ms_median": median(&answered_ms),
            "stop_ms": stop_ms,
            "new_server_ready_ms": ready_ms,
        }),
    ))
}

/// Ready time and memory against endpoints: the least-squares line over
/// the rungs, evaluated at [`EXTRAPOLATED_TO`] (on paper, not measured).
fn extrapolate(rungs: &[Value]) -> Value {
    let at = |field: &str| {
        let points: Vec<(f64, f64)> = rungs
            .iter()
            .filter_map(|r| Some((r["endpoints"].as_f64()?, r[field].as_f64()?)))
            .collect();
        linear_fit(&points).map(|(slope, intercept)| slope * EXTRAPOLATED_TO as f64 + intercept)
    };
    json!({
        "endpoints": EXTRAPOLATED_TO,
        "method": "least-squares line over the measured rungs",
        "rungs": rungs.len(),
        "time_to_ready_ms": at("time_to_ready_ms"),
        "rss_idle_mib": at("rss_idle_mib"),
        "hwm_mib": at("hwm_mib"),
    })
}
