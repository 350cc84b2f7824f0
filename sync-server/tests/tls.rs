//! The sync-server binary serving HTTPS: mutual TLS beside the bearer
//! token, what is refused (no client certificate, another CA, plain HTTP,
//! a token over plain HTTP on a network address), clear errors for bad
//! files at start, and certificate rotation under a held long-poll.
//!
//! Certificates are made by openssl in a temporary directory (testkit's
//! `TestCa`); the client is rustls, so the test sees exactly which
//! certificate each new connection was served.

mod common;

use common::{naming, DEADLINE};
use etcd_mesh_testkit::{
    free_port, http_get, prometheus_value, wait_for, Etcd, Proc, TestCa, TestCert,
};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The name in the server certificate (and the SNI the clients send).
const SERVER_NAME: &str = "sync-server.test";
const TOKEN: &str = "s3cret-token";
const PREFIX: &str = "svc/";

/// A CA, the server's and a client's certificates from it, and another
/// CA with a client certificate of its own.
struct Pki {
    dir: TempDir,
    ca: TestCa,
    server: TestCert,
    client: TestCert,
    other_ca: TestCa,
    other_client: TestCert,
}

impl Pki {
    fn make() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new(dir.path(), "mesh").expect("CA");
        let server = ca
            .issue(
                "server",
                &[&format!("DNS:{SERVER_NAME}"), "IP:127.0.0.1"],
                0xA1,
            )
            .expect("server certificate");
        let client = ca
            .issue("envoy", &["DNS:envoy.test"], 0xC1)
            .expect("client certificate");
        let other_ca = TestCa::new(dir.path(), "other").expect("other CA");
        let other_client = other_ca
            .issue("stranger", &["DNS:stranger.test"], 0xD1)
            .expect("other client certificate");
        Pki {
            dir,
            ca,
            server,
            client,
            other_ca,
            other_client,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn token_file(&self) -> PathBuf {
        let path = self.path("token");
        std::fs::write(&path, format!("{TOKEN}\n")).expect("token file");
        path
    }
}

fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// The first certificate of a PEM file, as DER.
fn der_of(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).expect("a certificate")
}

/// A rustls client trusting `ca`, presenting `identity` if given, never
/// resuming a session (so each connection shows the certificate served
/// now).
fn client(ca: &Path, identity: Option<&TestCert>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(der_of(ca)).expect("CA as trust anchor");
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
    let mut config = match identity {
        Some(cert) => builder
            .with_client_auth_cert(
                vec![der_of(&cert.cert)],
                PrivateKeyDer::from_pem_file(&cert.key).expect("key"),
            )
            .expect("client identity"),
        None => builder.with_no_client_auth(),
    };
    config.resumption = Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

async fn connect(tls: &TlsConnector, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    let name = ServerName::try_from(SERVER_NAME).expect("name");
    tokio::time::timeout(Duration::from_secs(5), tls.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// The leaf certificate the server presented on `stream`.
fn served_certificate(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
        .into_owned()
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one GET on a kept-alive connection and reads its response (by
/// Content-Length: what sync-server sends).
async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<Response> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    read_response(stream).await
}

async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Response> {
    let mut raw = Vec::new();
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "closed before a response: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            ));
        }
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed in the body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One GET on a new connection.
async fn get_new(
    tls: &TlsConnector,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<Response> {
    let mut stream = connect(tls, addr).await?;
    get(&mut stream, path, token).await
}

/// The sync-server binary on a free loopback port.
struct Binary {
    addr: SocketAddr,
    proc: Proc,
}

impl Binary {
    fn spawn(dir: &Path, etcd: &str, args: &[String]) -> Binary {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port().expect("port")));
        let mut command = Command::new(env!("CARGO_BIN_EXE_sync-server"));
        command
            .args(["--etcd", etcd, "--listen", &addr.to_string()])
            .args(["--watch", &format!("etcd-naming={PREFIX}")])
            .args(args)
            .env("RUST_LOG", "info");
        let log = dir.join(format!("sync-server-{}.log", addr.port()));
        let proc = Proc::spawn("sync-server", command, log).expect("spawn sync-server");
        Binary { addr, proc }
    }

    /// Waits until `/readyz` answers 200 over HTTPS.
    async fn ready_over_tls(&self, tls: &TlsConnector) {
        let addr = self.addr;
        let ready = wait_for("sync-server ready over HTTPS", DEADLINE, || async move {
            let response = get_new(tls, addr, "/readyz", None).await.ok()?;
            (response.status == 200).then_some(())
        })
        .await;
        assert!(ready.is_ok(), "{ready:?}\n{}", self.proc.log_tail(30));
    }

    async fn metric(&self, tls: &TlsConnector, name: &str) -> Option<u64> {
        let response = get_new(tls, self.addr, "/metrics", Some(TOKEN))
            .await
            .ok()?;
        prometheus_value(&response.body, name)
    }
}

/// The flags of sync-server serving HTTPS with `cert`/`key`, requiring
/// client certificates of `client_ca`, and the token.
fn tls_args(cert: &Path, key: &Path, client_ca: &Path, token: &Path) -> Vec<String> {
    [
        "--tls-cert",
        &arg(cert),
        "--tls-key",
        &arg(key),
        "--tls-client-ca",
        &arg(client_ca),
        "--token-file",
        &arg(token),
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn put(etcd: &Etcd, key: &str, value: String) -> u64 {
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect etcd");
    let put = client.put(key, value, None).await.expect("put");
    put.header().map_or(0, |h| h.revision() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_client_certificate_and_the_token() {
    let pki = Pki::make();
    let etcd = Etcd::start(pki.dir.path()).await.expect("etcd");
    put(&etcd, "svc/echo/a", naming("10.0.0.1:9000", 1)).await;
    let ui = pki.path("ui");
    std::fs::create_dir(&ui).expect("ui dir");
    std::fs::write(ui.join("index.html"), "<p>console</p>").expect("index.html");
    let mut args = tls_args(
        &pki.server.cert,
        &pki.server.key,
        &pki.ca.cert,
        &pki.token_file(),
    );
    args.extend(["--ui-dir".to_owned(), arg(&ui)]);
    let server = Binary::spawn(pki.dir.path(), &etcd.endpoint(), &args);
    let good = client(&pki.ca.cert, Some(&pki.client));
    server.ready_over_tls(&good).await;
    let addr = server.addr;

    // The feed, with the certificate and the token, on one connection.
    let mut stream = connect(&good, addr).await.expect("mutual TLS handshake");
    assert_eq!(served_certificate(&stream), der_of(&pki.server.cert));
    let feed = get(&mut stream, "/v1/changes", Some(TOKEN))
        .await
        .expect("GET");
    assert_eq!(feed.status, 200, "{feed:?}");
    assert!(feed.body.contains("10.0.0.1:9000"), "{}", feed.body);
    // The token is still required beside the certificate.
    let no_token = get(&mut stream, "/v1/changes", None).await.expect("GET");
    assert_eq!(no_token.status, 401, "{no_token:?}");
    let wrong = get(&mut stream, "/v1/status", Some("guess"))
        .await
        .expect("GET");
    assert_eq!(wrong.status, 401);
    // Probes and the console stay open (to a client with a certificate).
    for probe in ["/healthz", "/readyz"] {
        let answer = get(&mut stream, probe, None).await.expect("GET");
        assert_eq!(answer.status, 200, "{probe}: {answer:?}");
    }
    let page = get(&mut stream, "/ui/", None).await.expect("GET /ui/");
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.body, "<p>console</p>");
    assert!(page.header("content-security-policy").is_some());

    let failures = "sync_server_tls_handshake_failures_total";
    let before = server.metric(&good, failures).await.expect("TLS metrics");

    // No client certificate: refused at the handshake (in TLS 1.3 the
    // client learns it from the server's alert, on its first read).
    let anonymous = client(&pki.ca.cert, None);
    let refused = get_new(&anonymous, addr, "/healthz", None).await;
    let error = refused
        .expect_err("no client certificate is refused")
        .to_string();
    assert!(error.contains("CertificateRequired"), "{error}");
    // A client certificate of another CA: refused too.
    let stranger = client(&pki.ca.cert, Some(&pki.other_client));
    let refused = get_new(&stranger, addr, "/healthz", None).await;
    let error = refused
        .expect_err("another CA's client is refused")
        .to_string();
    assert!(
        error.contains("UnknownCA") || error.contains("BadCertificate"),
        "{error}"
    );
    // A client that does not trust the server's CA stops on its own side.
    let distrustful = client(&pki.other_ca.cert, Some(&pki.client));
    let error = connect(&distrustful, addr)
        .await
        .expect_err("unknown issuer")
        .to_string();
    assert!(error.contains("UnknownIssuer"), "{error}");
    // Plain HTTP to the HTTPS port: no HTTP answer at all.
    let plain = http_get(addr, "/healthz").await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");

    // All four counted (each as its handshake task ends).
    wait_for("four handshake failures counted", DEADLINE, || async {
        (server.metric(&good, failures).await? >= before + 4).then_some(())
    })
    .await
    .expect("counted");
}

/// Runs the binary with `args` (and a placeholder etcd: every case fails
/// before it is contacted) and returns what it printed when it exited.
async fn fails_at_start(args: &[String]) -> String {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_sync-server"));
    command
        .args(["--etcd", "127.0.0.1:1", "--watch", "etcd-naming=svc/"])
        .args(args)
        .kill_on_drop(true);
    let output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("exits at once")
        .expect("runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started with {args:?}:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_fail_at_start_naming_the_file() {
    let pki = Pki::make();
    let missing = pki.path("missing.pem");
    let not_pem = pki.path("not-pem.pem");
    std::fs::write(&not_pem, "hello, I am no certificate\n").expect("write");
    let (cert, key) = (&pki.server.cert, &pki.server.key);
    let listen = [
        "--listen".to_owned(),
        format!("127.0.0.1:{}", free_port().expect("port")),
    ];
    let server_tls = |cert: &Path, key: &Path| {
        let mut args = listen.to_vec();
        args.extend(["--tls-cert", &arg(cert), "--tls-key", &arg(key)].map(str::to_owned));
        args
    };
    let with_client_ca = |ca: &Path| {
        let mut args = server_tls(cert, key);
        args.extend(["--tls-client-ca".to_owned(), arg(ca)]);
        args
    };
    let health_ca = |ca: &Path| {
        let mut args = listen.to_vec();
        args.extend(["--health-checks", "--health-tls-ca", &arg(ca)].map(str::to_owned));
        args
    };
    let cases: Vec<(Vec<String>, &Path, &str)> = vec![
        (
            server_tls(&missing, key),
            &missing,
            "cannot read the TLS certificate",
        ),
        (server_tls(&not_pem, key), &not_pem, "is not PEM"),
        (server_tls(key, key), key, "holds no certificate"),
        (server_tls(cert, cert), cert, "holds no private key"),
        (server_tls(&missing, &missing), &missing, "cannot read"),
        (
            server_tls(cert, &pki.client.key),
            &pki.client.key,
            "does not match the certificate",
        ),
        (
            with_client_ca(&missing),
            &missing,
            "cannot read the TLS client CA",
        ),
        (with_client_ca(&not_pem), &not_pem, "TLS client CA"),
        (with_client_ca(key), key, "holds no certificate"),
        (health_ca(&not_pem), &not_pem, "health-check CA"),
    ];
    for (args, file, what) in cases {
        let text = fails_at_start(&args).await;
        assert!(
            text.contains(&file.display().to_string()) && text.contains(what),
            "{args:?}: expected {what:?} naming {}, got:\n{text}",
            file.display()
        );
    }
    // The mismatch names both files.
    let text = fails_at_start(&server_tls(cert, &pki.client.key)).await;
    assert!(text.contains(&cert.display().to_string()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_on_a_network_address_needs_tls_or_the_override() {
    let pki = Pki::make();
    let token = pki.token_file();
    let port = free_port().expect("port");
    let everywhere = format!("0.0.0.0:{port}");
    let text = fails_at_start(&[
        "--listen".to_owned(),
        everywhere.clone(),
        "--token-file".to_owned(),
        arg(&token),
    ])
    .await;
    for says in [
        "refusing to serve --token-file over plain HTTP on 0.0.0.0",
        "not a loopback address",
        "clear text",
        "--tls-cert FILE --tls-key FILE",
        "--insecure-plaintext",
    ] {
        assert!(text.contains(says), "{says:?} in:\n{text}");
    }

    // Accepted with the override (plain HTTP answers on the port) ...
    let etcd = Etcd::start(pki.dir.path()).await.expect("etcd");
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let spawn = |name: &str, listen: &str, extra: &[String]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sync-server"));
        command
            .args(["--etcd", &etcd.endpoint(), "--listen", listen])
            .args(["--watch", "etcd-naming=svc/", "--token-file", &arg(&token)])
            .args(extra);
        Proc::spawn("sync-server", command, pki.path(name)).expect("spawn")
    };
    let insecure = spawn(
        "insecure.log",
        &everywhere,
        &["--insecure-plaintext".to_owned()],
    );
    let up = wait_for(
        "plain HTTP on 0.0.0.0 with --insecure-plaintext",
        DEADLINE,
        || async { matches!(http_get(local, "/healthz").await, Ok((200, _))).then_some(()) },
    )
    .await;
    assert!(up.is_ok(), "{up:?}\n{}", insecure.log_tail(20));
    drop(insecure);

    // ... and with TLS.
    let port = free_port().expect("port");
    let tls_args = [
        "--tls-cert",
        &arg(&pki.server.cert),
        "--tls-key",
        &arg(&pki.server.key),
    ]
    .map(str::to_owned);
    let secure = spawn("secure.log", &format!("0.0.0.0:{port}"), &tls_args);
    let anonymous = client(&pki.ca.cert, None);
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let up = wait_for("HTTPS on 0.0.0.0", DEADLINE, || async {
        let answer = get_new(&anonymous, local, "/healthz", None).await.ok()?;
        (answer.status == 200).then_some(())
    })
    .await;
    assert!(up.is_ok(), "{up:?}\n{}", secure.log_tail(20));
}

/// Writes `from` over `to` the way a rotation tool does: a new file
/// renamed into place.
fn replace_file(from: &Path, to: &Path) {
    let staged = to.with_extension("staged");
    std::fs::copy(from, &staged).expect("copy");
    std::fs::rename(&staged, to).expect("rename into place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_held_long_polls_and_new_connections_get_the_new_certificate() {
    let pki = Pki::make();
    let sans = [&format!("DNS:{SERVER_NAME}")[..], "IP:127.0.0.1"];
    let cert_b = pki
        .ca
        .issue("server-b", &sans, 0xB2)
        .expect("certificate B");
    let (live_cert, live_key) = (pki.path("live.pem"), pki.path("live.key"));
    std::fs::copy(&pki.server.cert, &live_cert).expect("copy");
    std::fs::copy(&pki.server.key, &live_key).expect("copy");
    let etcd = Etcd::start(pki.dir.path()).await.expect("etcd");
    put(&etcd, "svc/echo/a", naming("10.0.0.1:9000", 1)).await;
    let args = tls_args(&live_cert, &live_key, &pki.ca.cert, &pki.token_file());
    let server = Binary::spawn(pki.dir.path(), &etcd.endpoint(), &args);
    let good = client(&pki.ca.cert, Some(&pki.client));
    server.ready_over_tls(&good).await;
    let addr = server.addr;
    let (a, b) = (der_of(&pki.server.cert), der_of(&cert_b.cert));

    // Where the client stands, then a long-poll held on connection 1.
    let first = get_new(&good, addr, "/v1/changes", Some(TOKEN))
        .await
        .expect("GET");
    let held = etcd_mesh_wire::Changes::decode(first.body.as_bytes()).expect("changes");
    let mut stream = connect(&good, addr).await.expect("connection 1");
    assert_eq!(served_certificate(&stream), a, "certificate A first");
    let path = format!(
        "/v1/changes?since={}&epoch={}&observer={}&wait=120",
        held.revision, held.epoch, held.observer
    );
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the long-poll");
    let long_poll = tokio::spawn(async move {
        let answer = read_response(&mut stream).await;
        (answer, stream)
    });
    wait_for("the long-poll to be held", DEADLINE, || async {
        (server
            .metric(&good, "sync_server_long_poll_waiters")
            .await?
            == 1)
            .then_some(())
    })
    .await
    .expect("held");

    // A half-done rotation (B's certificate, A's key): the reload fails,
    // is logged, and new connections keep certificate A.
    std::fs::copy(&cert_b.cert, &live_cert).expect("write B's certificate in place");
    wait_for("the failed reload to be logged", DEADLINE, || async {
        server
            .proc
            .log_tail(50)
            .contains("does not match the certificate")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", server.proc.log_tail(20)));
    let failed = server
        .metric(&good, "sync_server_tls_reload_failures_total")
        .await;
    assert!(
        failed.is_some_and(|n| n >= 1),
        "reload failures: {failed:?}"
    );
    let still = connect(&good, addr).await.expect("new connection");
    assert_eq!(served_certificate(&still), a, "a failed reload keeps A");
    drop(still);

    // The key follows: new connections get B.
    replace_file(&cert_b.key, &live_key);
    let swapped = Instant::now();
    wait_for(
        "a new connection to be served certificate B",
        DEADLINE,
        || async {
            let stream = connect(&good, addr).await.ok()?;
            (served_certificate(&stream) == b).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", server.proc.log_tail(20)));
    eprintln!(
        "certificate B served {:?} after its key was in place",
        swapped.elapsed()
    );
    let reloads = server.metric(&good, "sync_server_tls_reloads_total").await;
    assert!(reloads.is_some_and(|n| n >= 1), "reloads: {reloads:?}");

    // The long-poll held since before the rotation is still held, then
    // answered normally by the next change.
    assert!(
        !long_poll.is_finished(),
        "the held long-poll ended at the rotation"
    );
    let revision = put(&etcd, "svc/echo/b", naming("10.0.0.2:9000", 1)).await;
    let (answer, stream) = tokio::time::timeout(DEADLINE, long_poll)
        .await
        .expect("the long-poll is answered")
        .expect("task");
    let answer = answer.expect("an HTTP answer on the old connection");
    assert_eq!(answer.status, 200, "{answer:?}");
    let changes = etcd_mesh_wire::Changes::decode(answer.body.as_bytes()).expect("changes");
    assert_eq!(changes.revision, revision);
    assert!(!changes.full, "a delta: {}", answer.body);
    assert!(answer.body.contains("10.0.0.2:9000"), "{}", answer.body);
    assert_eq!(served_certificate(&stream), a, "the old connection kept A");
}

/// CPU seconds `pid` has run so far, over all its threads (from the
/// scheduler's nanosecond counters, not the 10 ms ticks of `stat`).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 / 1e9
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// What some polls cost: wall time and the server's CPU time.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    wall: f64,
    server_cpu: f64,
}

/// Requests alternate between the two servers in blocks this long, so
/// that both see the same machine (other work, frequency) in a round.
const BLOCK: usize = 100;

/// One side of a pairing: a server and how to open a connection to it.
struct Side<'a, F> {
    server: &'a Binary,
    connect: F,
}

/// `BLOCK` sequential `GET /v1/status` on `held` (kept alive) or each on a
/// new connection; adds what they cost to `cost`.
async fn block<S, F, Fut>(side: &mut Side<'_, F>, held: &mut Option<S>, cost: &mut Cost)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let cpu = cpu_seconds(side.server.proc.pid());
    let started = Instant::now();
    for _ in 0..BLOCK {
        let answer = match held.as_mut() {
            Some(stream) => get(stream, "/v1/status", Some(TOKEN)).await,
            None => get(&mut (side.connect)().await, "/v1/status", Some(TOKEN)).await,
        };
        assert_eq!(answer.expect("answer").status, 200);
    }
    cost.wall += started.elapsed().as_secs_f64();
    cost.server_cpu += cpu_seconds(side.server.proc.pid()) - cpu;
}

/// `n` polls to each side, alternating in blocks, kept alive or on new
/// connections: (plaintext cost, TLS cost).
async fn paired<S1, F1, Fut1, S2, F2, Fut2>(
    n: usize,
    keep: bool,
    mut plain: Side<'_, F1>,
    mut tls: Side<'_, F2>,
) -> (Cost, Cost)
where
    S1: AsyncRead + AsyncWrite + Unpin,
    F1: FnMut() -> Fut1,
    Fut1: std::future::Future<Output = S1>,
    S2: AsyncRead + AsyncWrite + Unpin,
    F2: FnMut() -> Fut2,
    Fut2: std::future::Future<Output = S2>,
{
    let mut plain_held = if keep {
        Some((plain.connect)().await)
    } else {
        None
    };
    let mut tls_held = if keep {
        Some((tls.connect)().await)
    } else {
        None
    };
    let (mut plain_cost, mut tls_cost) = (Cost::default(), Cost::default());
    for _ in 0..n / BLOCK {
        block(&mut plain, &mut plain_held, &mut plain_cost).await;
        block(&mut tls, &mut tls_held, &mut tls_cost).await;
    }
    (plain_cost, tls_cost)
}

/// What a TLS poll costs beside a plaintext one, on this machine: rounds
/// of `N` sequential `GET /v1/status` (with the token) to each of a
/// plaintext and a mutual-TLS sync-server (ECDSA P-256 or RSA 2048 server
/// certificate, a client certificate), over one kept-alive connection or
/// a new connection each (full handshakes, or resumed ones as Envoy does
/// by default), the two alternating in blocks of `BLOCK`. Prints, per
/// kind, the median and min–max over rounds of TLS / plaintext (wall time
/// and server CPU time) and the time per poll. Run it on a release build:
///
/// `cargo test --release -p sync-server --test tls -- --ignored --nocapture tls_poll_cost`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run it by name"]
async fn tls_poll_cost() {
    const N: usize = 2000;
    const ROUNDS: usize = 7;
    let pki = Pki::make();
    let rsa_ca = TestCa::rsa(pki.dir.path(), "rsa").expect("RSA CA");
    let rsa_server = rsa_ca
        .issue(
            "rsa-server",
            &[&format!("DNS:{SERVER_NAME}"), "IP:127.0.0.1"],
            0xF1,
        )
        .expect("RSA server certificate");
    let etcd = Etcd::start(pki.dir.path()).await.expect("etcd");
    put(&etcd, "svc/echo/a", naming("10.0.0.1:9000", 1)).await;
    let token = pki.token_file();
    let plain = Binary::spawn(
        pki.dir.path(),
        &etcd.endpoint(),
        &["--token-file".to_owned(), arg(&token)],
    );
    let ec = Binary::spawn(
        pki.dir.path(),
        &etcd.endpoint(),
        &tls_args(&pki.server.cert, &pki.server.key, &pki.ca.cert, &token),
    );
    let rsa = Binary::spawn(
        pki.dir.path(),
        &etcd.endpoint(),
        &tls_args(&rsa_server.cert, &rsa_server.key, &pki.ca.cert, &token),
    );
    let ec_client = client(&pki.ca.cert, Some(&pki.client));
    let rsa_client = client(&rsa_ca.cert, Some(&pki.client));
    // The same, resuming sessions (as Envoy does by default).
    let resuming = {
        let mut roots = RootCertStore::empty();
        roots.add(der_of(&pki.ca.cert)).expect("anchor");
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![der_of(&pki.client.cert)],
                    PrivateKeyDer::from_pem_file(&pki.client.key).expect("key"),
                )
                .expect("identity");
        TlsConnector::from(Arc::new(config))
    };
    ec.ready_over_tls(&ec_client).await;
    rsa.ready_over_tls(&rsa_client).await;
    wait_for("plain sync-server ready", DEADLINE, || async {
        matches!(http_get(plain.addr, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await
    .expect("ready");

    let tcp = |server: &Binary| {
        let addr = server.addr;
        move || async move { TcpStream::connect(addr).await.expect("connect") }
    };
    let tls = |tls: &TlsConnector, server: &Binary| {
        let (tls, addr) = (tls.clone(), server.addr);
        move || {
            let tls = tls.clone();
            async move { connect(&tls, addr).await.expect("handshake") }
        }
    };
    let plain_side = || Side {
        server: &plain,
        connect: tcp(&plain),
    };
    let kinds = [
        "kept-alive, ECDSA",
        "kept-alive, RSA",
        "new connections, ECDSA, full handshake",
        "new connections, RSA, full handshake",
        "new connections, ECDSA, resumed",
    ];
    // Per kind: TLS/plain wall, TLS/plain CPU, µs per poll (TLS, plain),
    // server CPU µs per poll (TLS, plain).
    let mut results: Vec<[Vec<f64>; 6]> = vec![Default::default(); kinds.len()];
    for _ in 0..ROUNDS {
        let runs = [
            paired(
                N,
                true,
                plain_side(),
                Side {
                    server: &ec,
                    connect: tls(&ec_client, &ec),
                },
            )
            .await,
            paired(
                N,
                true,
                plain_side(),
                Side {
                    server: &rsa,
                    connect: tls(&rsa_client, &rsa),
                },
            )
            .await,
            paired(
                N,
                false,
                plain_side(),
                Side {
                    server: &ec,
                    connect: tls(&ec_client, &ec),
                },
            )
            .await,
            paired(
                N,
                false,
                plain_side(),
                Side {
                    server: &rsa,
                    connect: tls(&rsa_client, &rsa),
                },
            )
            .await,
            paired(
                N,
                false,
                plain_side(),
                Side {
                    server: &ec,
                    connect: tls(&resuming, &ec),
                },
            )
            .await,
        ];
        for (i, (base, with_tls)) in runs.iter().enumerate() {
            results[i][0].push(with_tls.wall / base.wall);
            results[i][1].push(with_tls.server_cpu / base.server_cpu);
            results[i][2].push(with_tls.wall * 1e6 / N as f64);
            results[i][3].push(base.wall * 1e6 / N as f64);
            results[i][4].push(with_tls.server_cpu * 1e6 / N as f64);
            results[i][5].push(base.server_cpu * 1e6 / N as f64);
        }
    }
    let spread = |values: &mut Vec<f64>| {
        let m = median(values);
        let (lo, hi) = values
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        format!("{m:.2} ({lo:.2}–{hi:.2})")
    };
    eprintln!(
        "{N} sequential GET /v1/status per side and kind, alternating in blocks of {BLOCK}, \
         {ROUNDS} rounds; median (min–max) over rounds:"
    );
    for (kind, [wall, cpu, tls_us, plain_us, tls_cpu, plain_cpu]) in
        kinds.iter().zip(results.iter_mut())
    {
        eprintln!(
            "  {kind}: TLS/plain wall {}, server CPU {}; per poll: wall TLS {} µs, plain {} µs; \
             server CPU TLS {} µs, plain {} µs",
            spread(wall),
            spread(cpu),
            spread(tls_us),
            spread(plain_us),
            spread(tls_cpu),
            spread(plain_cpu),
        );
    }
}
