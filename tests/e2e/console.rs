//! The console in a real browser: Debian's chromium, headless, driven by
//! its chromedriver over WebDriver, against a real etcd and sync-server
//! (with a bearer token and health checks of live demo backends) on free
//! loopback ports. The page asks for the token and shows nothing without
//! it; then it lists the services, their health as the checks find it,
//! the pick strip of weights 5,1,1, the rejected key with its reason, and
//! a put in etcd within a second, without a reload.
//!
//! It fails, never skips, when chromium or chromedriver is missing
//! (scripts/setup.sh installs them), and when sync-server was built without
//! the console (scripts/build-console.sh; `make test` runs it first).
//! It saves a screenshot to `target/tmp/console.png`, or to
//! `$ETCD_MESH_CONSOLE_SCREENSHOT`.

use etcd_client::Client as EtcdClient;
use etcd_mesh_demo::DEMO_PREFIX;
use etcd_mesh_testkit::{free_port, http_get, http_get_with, wait_for, wait_ready, Etcd, Proc};
use fantoccini::{Client, ClientBuilder, Locator};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use sync_server::etcd::EtcdOptions;
use tokio_util::sync::CancellationToken;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const DEADLINE: Duration = Duration::from_secs(20);
const TOKEN: &str = "console-test-token";

/// chromedriver in its own process group, with the chromium it starts:
/// the whole group is killed on drop, even when the test fails.
struct Driver {
    proc: Proc,
    port: u16,
}

impl Driver {
    async fn start(dir: &Path) -> Driver {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(binary).exists(),
                "{binary} is missing: run scripts/setup.sh (Debian chromium, chromium-driver)"
            );
        }
        let port = free_port().expect("free port");
        let mut command = Command::new(CHROMEDRIVER);
        command
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .process_group(0);
        let proc = Proc::spawn("chromedriver", command, dir.join("chromedriver.log"))
            .expect("chromedriver starts");
        let driver = Driver { proc, port };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Its port accepting is enough: the session request waits for the
        // rest (chromedriver keeps connections open, so no plain GET here).
        wait_for("chromedriver to listen", DEADLINE, || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(drop)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", driver.proc.log_tail(20)));
        driver
    }

    async fn browser(&self, profile: &Path) -> Client {
        let capabilities = serde_json::json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                    "--window-size=1280,1400",
                ],
            }
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("an object literal");
        };
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .unwrap_or_else(|e| panic!("chromium starts: {e}\n{}", self.proc.log_tail(20)))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        if let Ok(pid) = i32::try_from(self.proc.pid()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A live `demo.Echo` backend (with the gRPC health service) on a free port.
async fn live_backend(stop: &CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    tokio::spawn(etcd_mesh_demo::backend::serve(listener, stop.clone()));
    addr
}

/// An address nothing listens on: its health checks fail.
fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port().expect("free port"))
}

/// sync-server in this runtime, watching the demo prefix, with or without
/// a bearer token.
async fn start_sync_server(etcd: &Etcd, token: Option<&str>) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let stop = CancellationToken::new();
    let mut config = sync_server::Config::new(
        EtcdOptions::new(vec![etcd.endpoint()]),
        vec![format!("etcd-naming={DEMO_PREFIX}").parse().expect("spec")],
    );
    config.token = token.map(str::to_owned);
    // The guarded one also checks health, so the page shows it change.
    if token.is_some() {
        config.health = Some(sync_server::health::HealthConfig {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(150),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            max_concurrent: 16,
            max_connections: 16,
            check_name: sync_server::health::CheckName::Empty,
        });
    }
    tokio::spawn(sync_server::run(config, listener, stop.clone()));
    wait_ready(addr, DEADLINE).await.expect("sync-server ready");
    (addr, stop)
}

async fn register(etcd: &mut EtcdClient, service: &str, addr: &str, weight: u32, meta: &str) {
    let value = format!(
        r#"{{"Op":0,"Addr":"{addr}","Metadata":{{"weight":{weight}{}{meta}}}}}"#,
        if meta.is_empty() { "" } else { "," }
    );
    etcd.put(format!("{DEMO_PREFIX}{service}/{addr}"), value, None)
        .await
        .expect("put");
}

/// Runs `script` in the page and returns its string result.
async fn text(client: &Client, script: &str) -> String {
    match client.execute(script, vec![]).await.expect("script runs") {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

async fn displayed(client: &Client, css: &str) -> bool {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.is_displayed().await.unwrap_or(false),
        Err(_) => false,
    }
}

async fn wait_displayed(client: &Client, css: &str, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        if displayed(client, css).await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            let error = text(
                client,
                "return document.getElementById('error').textContent",
            )
            .await;
            let feed = text(client, "return document.getElementById('feed').textContent").await;
            return Err(format!(
                "{css} not shown within {within:?} (feed: {feed:?}, error: {error:?})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn submit_token(client: &Client, token: &str) {
    let input = client
        .find(Locator::Css("#token"))
        .await
        .expect("token input");
    input.send_keys(token).await.expect("type the token");
    client
        .find(Locator::Css("#token-form button"))
        .await
        .expect("button")
        .click()
        .await
        .expect("submit");
}

fn screenshot_path() -> PathBuf {
    std::env::var_os("ETCD_MESH_CONSOLE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console.png"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_etcd_live_in_a_browser() {
    assert!(
        sync_server::ui::embedded(),
        "sync-server was built without the console: run scripts/build-console.sh first (make test does)"
    );
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temporary dir");
    let etcd = Etcd::start(dir.path()).await.expect("etcd starts");
    let mut kv = EtcdClient::connect([etcd.endpoint()], None)
        .await
        .expect("etcd client");
    let backends = CancellationToken::new();
    let _stop_backends = backends.clone().drop_guard();
    let mut echo = [
        live_backend(&backends).await,
        live_backend(&backends).await,
        live_backend(&backends).await,
    ];
    // sync-server lists endpoints by address: weight 5 goes to the first.
    echo.sort();
    let inventory = [live_backend(&backends).await, dead_addr(), dead_addr()];
    let payments = live_backend(&backends).await;
    let zones = ["eu-west-1a", "eu-west-1b", "eu-west-1c"];
    for ((addr, weight), zone) in echo.iter().zip([5, 1, 1]).zip(zones) {
        let meta = format!(r#""zone":"{zone}","version":"1.4.2""#);
        register(&mut kv, "demo.Echo", addr, weight, &meta).await;
    }
    for ((addr, weight), zone) in inventory.iter().zip([3, 2, 0]).zip(zones) {
        let meta = format!(r#""zone":"{zone}""#);
        register(&mut kv, "demo.Inventory", addr, weight, &meta).await;
    }
    kv.put(
        format!("{DEMO_PREFIX}demo.Broken/x"),
        r#"{"Op":0,"Addr":"not-an-address"}"#,
        None,
    )
    .await
    .expect("put");
    let (sync, stop_sync) = start_sync_server(&etcd, Some(TOKEN)).await;
    let (open_sync, stop_open_sync) = start_sync_server(&etcd, None).await;

    // The page is open and sent with the CSP; the data is not.
    let page = http_get_with(sync, "/ui/", &[]).await.expect("GET /ui/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-security-policy"),
        Some(sync_server::ui::CONTENT_SECURITY_POLICY)
    );
    let wasm = http_get_with(sync, "/ui/pkg/etcd_mesh_console_bg.wasm", &[])
        .await
        .expect("GET the wasm");
    assert_eq!(wasm.header("content-type"), Some("application/wasm"));
    assert_eq!(http_get(sync, "/v1/changes").await.expect("GET").0, 401);

    let driver = Driver::start(dir.path()).await;
    let client = driver.browser(&dir.path().join("profile")).await;
    // The checks run in their own task so that the browser session is
    // closed whatever they do; the process group goes with `driver`.
    let addrs = Addrs {
        echo: echo.to_vec(),
        dead: inventory[1].clone(),
        payments,
    };
    let checks = tokio::spawn(checks(client.clone(), sync, open_sync, kv, addrs));
    let outcome = checks.await;
    let _ = client.close().await;
    drop(driver);
    stop_sync.cancel();
    stop_open_sync.cancel();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    eprintln!("console browser test passed in {:?}", started.elapsed());
}

/// The endpoints the checks look at.
struct Addrs {
    /// demo.Echo's, live, weights 5, 1, 1.
    echo: Vec<String>,
    /// A demo.Inventory endpoint nothing listens on.
    dead: String,
    /// Put while the page is open, live.
    payments: String,
}

async fn checks(
    client: Client,
    sync: SocketAddr,
    open_sync: SocketAddr,
    mut kv: EtcdClient,
    addrs: Addrs,
) {
    // `/ui` redirects to `/ui/`; with no token the page asks for one and
    // shows no data.
    client
        .goto(&format!("http://{sync}/ui"))
        .await
        .expect("open the console");
    assert_eq!(client.current_url().await.expect("url").path(), "/ui/");
    wait_displayed(&client, "#token-form", DEADLINE)
        .await
        .expect("asks for the token");
    assert!(
        !displayed(&client, "#main").await,
        "data shown without a token"
    );
    assert_eq!(
        text(
            &client,
            "return document.getElementById('services').childElementCount"
        )
        .await,
        "0"
    );

    // A wrong token is refused (401) and asked again.
    submit_token(&client, "wrong").await;
    wait_displayed(&client, "#token-error", DEADLINE)
        .await
        .expect("refuses a wrong token");
    assert!(
        !displayed(&client, "#main").await,
        "data shown with a wrong token"
    );

    submit_token(&client, TOKEN).await;
    wait_displayed(&client, "#main", DEADLINE)
        .await
        .expect("shows the data with the token");
    wait_displayed(&client, r#".service[data-service="demo.Echo"]"#, DEADLINE)
        .await
        .expect("lists demo.Echo");
    assert!(displayed(&client, r#".service[data-service="demo.Inventory"]"#).await);
    let storage = text(
        &client,
        "return JSON.stringify([localStorage.length, sessionStorage.length, location.href])",
    )
    .await;
    assert_eq!(
        storage,
        format!(r#"[0,1,"http://{sync}/ui/"]"#),
        "token kept in this tab only"
    );

    // The styles loaded under the CSP (none is inline), and nothing was blocked.
    assert_eq!(
        text(&client, "return getComputedStyle(document.body).maxWidth").await,
        "1152px"
    );
    assert!(
        !displayed(&client, "#error").await,
        "{}",
        text(
            &client,
            "return document.getElementById('error').textContent"
        )
        .await
    );

    // Health as the checks find it, arriving as deltas (health_seq).
    let tag = |addr: &str, health: &str| format!(r#"tr[data-addr="{addr}"] .tag.{health}"#);
    wait_displayed(&client, &tag(&addrs.dead, "unhealthy"), DEADLINE)
        .await
        .expect("the dead endpoint shows unhealthy");
    for addr in &addrs.echo {
        wait_displayed(&client, &tag(addr, "healthy"), DEADLINE)
            .await
            .expect("a live endpoint shows healthy");
    }

    // Freshness: when sync-server last proved contact with the etcd majority.
    let shown = Instant::now();
    loop {
        let freshness = text(
            &client,
            "return document.getElementById('freshness').textContent",
        )
        .await;
        if freshness.starts_with("fresh, proven ") && freshness.ends_with(" s ago") {
            break;
        }
        assert!(
            shown.elapsed() < Duration::from_secs(10),
            "freshness shows {freshness:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The pick strip of weights 5,1,1 is the plugin's smooth sequence.
    let picks = text(
        &client,
        "return [...document.querySelectorAll('#picks li')].map(e => e.textContent).join(' ')",
    )
    .await;
    assert_eq!(picks, "a a b a c a a a a b a c a a");
    assert_eq!(
        text(
            &client,
            "return document.getElementById('pick-service').value"
        )
        .await,
        "demo.Echo"
    );

    // The rejected key, with its reason.
    let rejected = text(
        &client,
        "return document.querySelector('#rejected tbody').textContent",
    )
    .await;
    assert!(
        rejected.contains(&format!("{DEMO_PREFIX}demo.Broken/x")),
        "{rejected}"
    );
    assert!(rejected.contains("not-an-address"), "{rejected}");

    // A put shows within a second, without a reload.
    let marker = text(&client, "window.__same_page = 1; return 'set'").await;
    assert_eq!(marker, "set");
    let put = Instant::now();
    register(
        &mut kv,
        "demo.Payments",
        &addrs.payments,
        2,
        r#""zone":"eu-west-1c""#,
    )
    .await;
    let shown = wait_displayed(
        &client,
        r#".service[data-service="demo.Payments"]"#,
        Duration::from_secs(1),
    )
    .await
    .expect("the put shows within 1 s");
    eprintln!(
        "a put in etcd showed in the page {:?} after the put returned ({:?} after it began)",
        shown,
        put.elapsed()
    );
    assert_eq!(
        text(&client, "return String(window.__same_page)").await,
        "1",
        "the page reloaded"
    );
    let log = text(&client, "return document.getElementById('log').textContent").await;
    assert!(
        log.contains("demo.Payments: 1 endpoint (weight 2)"),
        "{log}"
    );

    wait_displayed(&client, &tag(&addrs.payments, "healthy"), DEADLINE)
        .await
        .expect("the new endpoint shows healthy");
    let png = client.screenshot().await.expect("screenshot");
    let path = screenshot_path();
    std::fs::write(&path, png).expect("save the screenshot");
    eprintln!("screenshot: {}", path.display());

    // A sync-server without a token: the data shows at once, no form.
    client
        .goto(&format!("http://{open_sync}/ui/"))
        .await
        .expect("open the console");
    wait_displayed(
        &client,
        r#".service[data-service="demo.Payments"]"#,
        DEADLINE,
    )
    .await
    .expect("lists the services without a token");
    assert!(
        !displayed(&client, "#token-form").await,
        "asked for a token it does not need"
    );
}
