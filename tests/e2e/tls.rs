//! The TLS layout end to end, across hosts (network namespaces, root
//! only): sync-server on a host of its own serving HTTPS with a client CA
//! and a token, etcd on another, Envoy and the backends in the test's own
//! namespace, so every sync-server connection crosses the bridge to a
//! non-loopback address.
//!
//! - Envoy follows sync-server over mutual TLS (envoy/etcd-mesh-tls.yaml)
//!   and routes real gRPC calls; an Envoy trusting another CA gets no
//!   tables (its polls fail on certificate verification); a sync-server
//!   restarted with a certificate Envoy does not trust fails the polls of
//!   the Envoy that follows it, which keeps its tables and routes on.
//! - Health checks over TLS with a client certificate mark a TLS backend
//!   healthy and one whose certificate is of another CA unhealthy; Envoy
//!   reaches the TLS backend over TLS with its own client certificate.
//!
//! Certificates are made by openssl (testkit's `TestCa`).

use etcd_mesh_demo::backend::EchoBackend;
use etcd_mesh_demo::client::{connect, split};
use etcd_mesh_demo::proto::echo_server::EchoServer;
use etcd_mesh_demo::{DEMO_PREFIX, DEMO_SERVICE};
use etcd_mesh_e2e::{Backend, DEADLINE};
use etcd_mesh_registration::{Instance, Registration};
use etcd_mesh_testkit::{
    render_envoy_tls_config, wait_for, wasm_path, workspace_root, Envoy, EnvoyOptions, Host, Net,
    NetEtcd, Proc, TestCa, TestCert, TlsUpstream,
};
use etcd_mesh_wire::{Health, Snapshot, Status};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// Where sync-server listens on its host.
const SYNC_PORT: u16 = 8443;
/// The name in sync-server's certificate, and Envoy's SNI.
const SYNC_NAME: &str = "sync-server.test";
/// The name in the TLS backends' certificates.
const BACKEND_NAME: &str = "backend.test";
const TOKEN: &str = "e2e-tls-token";

/// The certificates of a test: one CA for everything, and another CA.
struct Pki {
    dir: TempDir,
    ca: TestCa,
    other_ca: TestCa,
    /// Envoy's client certificate (to sync-server and to backends).
    envoy: TestCert,
    /// This test's own client certificate, to read sync-server.
    probe: TestCert,
}

impl Pki {
    fn make() -> Pki {
        let dir = tempfile::tempdir().expect("temporary dir");
        let ca = TestCa::new(dir.path(), "mesh").expect("CA");
        let other_ca = TestCa::new(dir.path(), "other").expect("other CA");
        let envoy = ca.issue("envoy", &["DNS:envoy.test"], 0xE1).expect("cert");
        let probe = ca.issue("probe", &["DNS:probe.test"], 0xE2).expect("cert");
        Pki {
            dir,
            ca,
            other_ca,
            envoy,
            probe,
        }
    }

    /// sync-server's certificate for `host`, issued by `ca`: the DNS name
    /// Envoy checks and the host's address.
    fn sync_cert(&self, ca: &TestCa, host: &Host, name: &str, serial: u64) -> TestCert {
        let ip = format!("IP:{}", host.ip());
        ca.issue(name, &[&format!("DNS:{SYNC_NAME}"), &ip], serial)
            .expect("sync-server certificate")
    }

    /// What Envoy is given to reach sync-server, trusting `ca`.
    fn upstream(&self, ca: &Path) -> TlsUpstream {
        TlsUpstream {
            ca: ca.to_path_buf(),
            sni: SYNC_NAME.to_owned(),
            client_cert: Some((self.envoy.cert.clone(), self.envoy.key.clone())),
            token: Some(TOKEN.to_owned()),
        }
    }
}

fn arg(path: &Path) -> String {
    path.display().to_string()
}

/// A client of sync-server trusting `ca`, with the test's certificate.
fn https_client(ca: &Path, identity: &TestCert) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("CA"))
        .expect("trust anchor");
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&identity.cert).expect("certificate")],
                PrivateKeyDer::from_pem_file(&identity.key).expect("key"),
            )
            .expect("identity");
    config.resumption = Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// GET `path` over a new HTTPS connection (with the token): status and
/// body.
async fn https_get(tls: &TlsConnector, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let name = ServerName::try_from(SYNC_NAME).ok()?;
        let mut stream = tls.connect(name, tcp).await.ok()?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {SYNC_NAME}\r\nAuthorization: Bearer {TOKEN}\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        // A server that closes without close_notify still sent it all.
        let _ = stream.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

async fn status_of(tls: &TlsConnector, addr: SocketAddr) -> Option<Status> {
    match https_get(tls, addr, "/v1/status").await? {
        (200, body) => Status::decode(body.as_bytes()).ok(),
        _ => None,
    }
}

async fn snapshot_of(tls: &TlsConnector, addr: SocketAddr) -> Option<Snapshot> {
    match https_get(tls, addr, "/v1/snapshot").await? {
        (200, body) => Snapshot::decode(body.as_bytes()).ok(),
        _ => None,
    }
}

/// sync-server on `host`, serving HTTPS with `cert`, requiring client
/// certificates of the test CA and the token, with `extra` flags; ready
/// (as `probe` sees it over HTTPS).
async fn start_sync_server(
    pki: &Pki,
    host: &Host,
    etcd: &[String],
    cert: &TestCert,
    extra: &[String],
    probe: &TlsConnector,
) -> (Proc, SocketAddr) {
    let binary = workspace_root().join("target/debug/sync-server");
    assert!(
        binary.exists(),
        "no {}: cargo build -p sync-server --bin sync-server",
        binary.display()
    );
    let token = pki.dir.path().join("token");
    std::fs::write(&token, TOKEN).expect("token file");
    let addr = host.socket_addr(SYNC_PORT);
    let mut args = [
        "--etcd",
        &etcd.join(","),
        "--listen",
        &addr.to_string(),
        "--watch",
        &format!("etcd-naming={DEMO_PREFIX}"),
        "--tls-cert",
        &arg(&cert.cert),
        "--tls-key",
        &arg(&cert.key),
        "--tls-client-ca",
        &arg(&pki.ca.cert),
        "--token-file",
        &arg(&token),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = pki
        .dir
        .path()
        .join(format!("sync-server-{}.log", cert.serial));
    let proc = host
        .spawn(binary.to_str().expect("utf-8 path"), &args, log)
        .expect("sync-server starts");
    wait_for("sync-server ready over HTTPS", DEADLINE, || async {
        matches!(https_get(probe, addr, "/readyz").await, Some((200, _))).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", proc.log_tail(20)));
    (proc, addr)
}

async fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(name).await.unwrap_or(0)
}

async fn plugin_stat(envoy: &Envoy, name: &str) -> u64 {
    stat(envoy, &format!("wasmcustom.etcd_mesh.{name}")).await
}

/// Envoy's count of upstream handshakes to sync-server that failed
/// certificate verification.
const VERIFY_FAILED: &str = "cluster.etcd_mesh_sync_0.ssl.fail_verify_error";

/// Envoy logs why each upstream handshake fails at debug level (the
/// `connection` component).
fn tls_debug_log() -> Vec<String> {
    ["--component-log-level", "connection:debug"]
        .map(str::to_owned)
        .to_vec()
}

/// Waits until `envoy`'s polls failed `more` times more than `from`, a
/// handshake failed verification, and its log names the TLS error.
async fn polls_fail_on_verification(envoy: &Envoy, from: u64, more: u64) {
    wait_for(
        "polls failing on certificate verification",
        DEADLINE,
        || async {
            let failed = plugin_stat(envoy, "polls_failed").await;
            let verify = stat(envoy, VERIFY_FAILED).await;
            (failed >= from + more && verify >= 1).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", envoy.log_tail(40)));
    let log = envoy.log_tail(2000);
    let said = log
        .lines()
        .find(|l| l.contains("CERTIFICATE_VERIFY_FAILED"));
    let said =
        said.unwrap_or_else(|| panic!("Envoy's log names the TLS error:\n{}", envoy.log_tail(40)));
    eprintln!("Envoy says: {said}");
    if let Some(warned) = log
        .lines()
        .find(|l| l.contains("etcd-mesh: sync-server replica"))
    {
        eprintln!("the plugin says: {warned}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_sync_server_over_mutual_tls_and_keeps_its_tables_when_trust_fails() {
    let net = Net::new().expect("network namespaces");
    let pki = Pki::make();
    let etcd = NetEtcd::start(&net, pki.dir.path(), 1).await.expect("etcd");
    let members = etcd.endpoints();
    let host = net.host("sync").expect("host");
    let probe = https_client(&pki.ca.cert, &pki.probe);
    let good = pki.sync_cert(&pki.ca, &host, "sync-good", 0x5A1);
    let (mut sync, sync_addr) = start_sync_server(&pki, &host, &members, &good, &[], &probe).await;

    let backends = [
        Backend::registered(members.clone(), 1).await,
        Backend::registered(members.clone(), 1).await,
    ];
    let revision = wait_for("sync-server to list both backends", DEADLINE, || async {
        let snapshot = snapshot_of(&probe, sync_addr).await?;
        let listed = snapshot.services.get(DEMO_SERVICE)?.endpoints.len();
        (listed == 2).then_some(snapshot.revision)
    })
    .await
    .expect("listed");

    // Envoy over mutual TLS, with the token: tables, and calls routed.
    let envoy_dir = tempfile::tempdir().expect("temporary dir");
    let envoy = Envoy::start(
        envoy_dir.path(),
        EnvoyOptions {
            sync_servers: vec![sync_addr],
            sync_tls: Some(pki.upstream(&pki.ca.cert)),
            // Short long-polls: a poll a second while nothing changes.
            poller_config: Some(
                r#"{"role": "poller", "clusters": {{SYNC_CLUSTER_NAMES}}, "authority": "sync-server", "wait_seconds": 1, "bearer_token": "{{SYNC_TOKEN}}"}"#
                    .to_owned(),
            ),
            extra_args: tls_debug_log(),
            ..EnvoyOptions::default()
        },
    )
    .await
    .expect("Envoy with the TLS template starts");
    envoy
        .wait_for_revision(revision, DEADLINE)
        .await
        .expect("the plugin takes the tables over TLS");
    let clients = vec![connect(envoy.listen).await.expect("client")];
    let counts = split(&clients, 20).await.expect("calls routed");
    assert_eq!(counts.len(), 2, "both backends called: {counts:?}");
    assert_eq!(plugin_stat(&envoy, "polls_failed").await, 0);
    // 1 s long-polls go on over a kept-alive TLS connection: a handshake
    // per connection, not per poll.
    let requests = "cluster.etcd_mesh_sync_0.upstream_rq_total";
    let waited = wait_for("six polls of sync-server", DEADLINE, || async {
        (stat(&envoy, requests).await >= 6).then_some(())
    })
    .await;
    waited.unwrap_or_else(|e| panic!("{e}\n{}", envoy.log_tail(20)));
    let handshakes = stat(&envoy, "cluster.etcd_mesh_sync_0.ssl.handshake").await;
    let connections = stat(&envoy, "cluster.etcd_mesh_sync_0.upstream_cx_total").await;
    let requests = stat(&envoy, requests).await;
    eprintln!(
        "to sync-server: {requests} requests, {connections} connections, {handshakes} handshakes"
    );
    assert!(handshakes >= 1 && handshakes <= connections && connections < requests);

    // An Envoy trusting another CA: every poll fails verification, and it
    // never holds tables (so it routes nothing: it fails closed).
    let stranger_dir = tempfile::tempdir().expect("temporary dir");
    let stranger = Envoy::start(
        stranger_dir.path(),
        EnvoyOptions {
            sync_servers: vec![sync_addr],
            sync_tls: Some(pki.upstream(&pki.other_ca.cert)),
            extra_args: tls_debug_log(),
            ..EnvoyOptions::default()
        },
    )
    .await
    .expect("the second Envoy starts");
    polls_fail_on_verification(&stranger, 0, 2).await;
    assert_eq!(plugin_stat(&stranger, "updates_full").await, 0, "no tables");
    let refused = split(&[connect(stranger.listen).await.expect("client")], 1).await;
    assert!(refused.is_err(), "routed without tables: {refused:?}");
    drop(stranger);

    // sync-server comes back with a certificate of a CA the first Envoy
    // does not trust: its polls fail, it keeps its tables and routes on.
    let failed = plugin_stat(&envoy, "polls_failed").await;
    let full = plugin_stat(&envoy, "updates_full").await;
    sync.kill();
    let untrusted = pki.sync_cert(&pki.other_ca, &host, "sync-untrusted", 0x5B2);
    let other_probe = https_client(&pki.other_ca.cert, &pki.probe);
    let (_sync, _) = start_sync_server(&pki, &host, &members, &untrusted, &[], &other_probe).await;
    polls_fail_on_verification(&envoy, failed, 2).await;
    let counts = split(&clients, 20).await.expect("calls still routed");
    assert_eq!(counts.len(), 2, "both backends still called: {counts:?}");
    assert_eq!(
        plugin_stat(&envoy, "updates_full").await,
        full,
        "the tables held were kept"
    );
    assert!(plugin_stat(&envoy, "table_revision").await >= revision);
    drop(backends);
}

/// A `demo.Echo` backend serving TLS with `cert` on `ip`, requiring client
/// certificates of `client_ca`, registered in etcd under its address.
struct TlsBackend {
    addr: SocketAddr,
    stop: CancellationToken,
    _registration: Registration,
}

impl TlsBackend {
    async fn start(ip: IpAddr, cert: &TestCert, client_ca: &Path, etcd: &[String]) -> TlsBackend {
        use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
        let read = |path: &Path| std::fs::read(path).expect("PEM file");
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&cert.cert), read(&cert.key)))
            .client_ca_root(Certificate::from_pem(read(client_ca)));
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<EchoBackend>>().await;
        let stop = CancellationToken::new();
        let server = Server::builder()
            .tls_config(tls)
            .expect("TLS config")
            .add_service(health_service)
            .add_service(EchoServer::new(EchoBackend::new(addr.to_string())))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        let instance = Instance::new(DEMO_PREFIX, DEMO_SERVICE, &addr.to_string());
        let registration = Registration::start(etcd.to_vec(), instance).expect("instance");
        registration.registered(DEADLINE).await.expect("registered");
        TlsBackend {
            addr,
            stop,
            _registration: registration,
        }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What goes into `etcd_mesh_upstream` for TLS to the backends (see
/// docs/tls.md): their certificates checked against `ca` and the name
/// they share, Envoy's client certificate presented, h2 by ALPN.
fn upstream_tls_to_backends(ca: &Path, client: &TestCert) -> String {
    format!(
        "    transport_socket:\n\
         \x20     name: envoy.transport_sockets.tls\n\
         \x20     typed_config:\n\
         \x20       \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n\
         \x20       sni: {BACKEND_NAME}\n\
         \x20       common_tls_context:\n\
         \x20         alpn_protocols: [h2]\n\
         \x20         validation_context:\n\
         \x20           trusted_ca: {{ filename: \"{}\" }}\n\
         \x20           match_typed_subject_alt_names:\n\
         \x20           - san_type: DNS\n\
         \x20             matcher: {{ exact: {BACKEND_NAME} }}\n\
         \x20         tls_certificates:\n\
         \x20         - certificate_chain: {{ filename: \"{}\" }}\n\
         \x20           private_key: {{ filename: \"{}\" }}\n",
        ca.display(),
        client.cert.display(),
        client.key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_envoy_reach_backends_over_tls() {
    let net = Net::new().expect("network namespaces");
    let pki = Pki::make();
    let etcd = NetEtcd::start(&net, pki.dir.path(), 1).await.expect("etcd");
    let members = etcd.endpoints();
    let host = net.host("sync").expect("host");
    let probe = https_client(&pki.ca.cert, &pki.probe);
    let cert = pki.sync_cert(&pki.ca, &host, "sync", 0x5C1);
    // sync-server checks health over TLS with its own client certificate,
    // against the name the backends share.
    let checker = pki
        .ca
        .issue("checker", &["DNS:checker.test"], 0xE3)
        .expect("cert");
    let health = [
        "--health-checks",
        "--health-interval",
        "200ms",
        "--health-unhealthy-threshold",
        "2",
        "--health-tls-ca",
        &arg(&pki.ca.cert),
        "--health-tls-cert",
        &arg(&checker.cert),
        "--health-tls-key",
        &arg(&checker.key),
        "--health-tls-domain",
        BACKEND_NAME,
    ]
    .map(str::to_owned);
    let (sync, sync_addr) = start_sync_server(&pki, &host, &members, &cert, &health, &probe).await;

    // Backends on the test's address on the bridge, which sync-server's
    // host reaches: one with a certificate of the mesh CA, one of another.
    let ip = IpAddr::V4(net.root_ip());
    let backend_san = format!("DNS:{BACKEND_NAME}");
    let trusted_cert = pki
        .ca
        .issue("backend", &[&backend_san], 0xB1)
        .expect("cert");
    let foreign_cert = pki
        .other_ca
        .issue("foreign", &[&backend_san], 0xB2)
        .expect("cert");
    let trusted = TlsBackend::start(ip, &trusted_cert, &pki.ca.cert, &members).await;
    let foreign = TlsBackend::start(ip, &foreign_cert, &pki.ca.cert, &members).await;
    let snapshot = wait_for("the health of both over TLS", DEADLINE, || async {
        let snapshot = snapshot_of(&probe, sync_addr).await?;
        let endpoints = &snapshot.services.get(DEMO_SERVICE)?.endpoints;
        let health_of = |addr: SocketAddr| {
            endpoints
                .iter()
                .find(|e| e.addr == addr.to_string())
                .and_then(|e| e.health)
        };
        (health_of(trusted.addr) == Some(Health::Healthy)
            && health_of(foreign.addr) == Some(Health::Unhealthy))
        .then_some(snapshot)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", sync.log_tail(20)));
    let status = status_of(&probe, sync_addr).await.expect("status");
    assert_eq!(status.revision, snapshot.revision);

    // Envoy: TLS to sync-server (the TLS template) and to the backends
    // (etcd_mesh_upstream with an UpstreamTlsContext).
    let dir = tempfile::tempdir().expect("temporary dir");
    let template =
        std::fs::read_to_string(workspace_root().join("envoy/etcd-mesh-tls.yaml")).expect("read");
    let listen = SocketAddr::from((
        [127, 0, 0, 1],
        etcd_mesh_testkit::free_port().expect("port"),
    ));
    let admin = SocketAddr::from((
        [127, 0, 0, 1],
        etcd_mesh_testkit::free_port().expect("port"),
    ));
    let rendered = render_envoy_tls_config(
        &template,
        listen,
        admin,
        &[sync_addr],
        &wasm_path(),
        &pki.upstream(&pki.ca.cert),
    );
    let anchor = "    original_dst_lb_config: { use_http_header: false }\n";
    assert!(rendered.contains(anchor), "the template's upstream cluster");
    let rendered = rendered.replacen(
        anchor,
        &format!(
            "{anchor}{}",
            upstream_tls_to_backends(&pki.ca.cert, &pki.envoy)
        ),
        1,
    );
    let envoy = Envoy::start_rendered(dir.path(), &rendered, listen, admin, 2)
        .await
        .expect("Envoy with TLS to sync-server and backends");
    let digest = wait_for("sync-server's tables digest", DEADLINE, || async {
        let (_, metrics) = https_get(&probe, sync_addr, "/metrics").await?;
        etcd_mesh_testkit::prometheus_value(&metrics, "sync_server_tables_digest")
    })
    .await
    .expect("digest");
    envoy
        .wait_for_digest(digest, DEADLINE)
        .await
        .expect("the plugin holds the health view");
    let clients = vec![connect(envoy.listen).await.expect("client")];
    let counts = split(&clients, 20)
        .await
        .unwrap_or_else(|e| panic!("calls over TLS to the backend: {e}\n{}", envoy.log_tail(30)));
    assert_eq!(
        counts.get(&trusted.addr.to_string()),
        Some(&20),
        "the healthy TLS backend serves every call: {counts:?}"
    );
    assert!(stat(&envoy, "cluster.etcd_mesh_upstream.ssl.handshake").await >= 1);
}
