//! The console at /ui/, in process: open while /v1/* asks for the token,
//! its security headers and content types, from a directory (`--ui-dir`),
//! and nothing outside that directory.

use axum::body::{to_bytes, Body};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use std::sync::Arc;
use sync_server::http::{app, AppState};
use sync_server::publish::Publisher;
use sync_server::ui::{UiDir, CONTENT_SECURITY_POLICY};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn guarded_app() -> Router {
    let mut state = AppState::new(Publisher::default(), CancellationToken::new());
    state.token = Some(Arc::from("s3cret"));
    app(state)
}

async fn get(app: &Router, path: &str) -> (StatusCode, HeaderMap, Vec<u8>) {
    let request = Request::get(path).body(Body::empty()).expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, 1 << 24).await.expect("body");
    (parts.status, parts.headers, body.to_vec())
}

fn ui_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("pkg")).expect("mkdir");
    std::fs::write(
        dir.path().join("index.html"),
        "<!doctype html><title>c</title>",
    )
    .expect("write");
    std::fs::write(dir.path().join("pkg/m_bg.wasm"), b"\0asm").expect("write");
    std::fs::write(dir.path().join("console.js"), "export {};").expect("write");
    dir
}

#[tokio::test]
async fn the_console_is_open_and_sent_with_a_strict_csp() {
    let dir = ui_dir();
    let app = guarded_app().layer(axum::Extension(UiDir(dir.path().to_owned())));

    let (status, headers, _) = get(&app, "/ui").await;
    assert!(status.is_redirection(), "{status}");
    assert_eq!(headers[header::LOCATION], "/ui/");

    for (path, content_type) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/index.html", "text/html; charset=utf-8"),
        ("/ui/console.js", "text/javascript; charset=utf-8"),
        ("/ui/pkg/m_bg.wasm", "application/wasm"),
    ] {
        let (status, headers, _) = get(&app, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY,
            "{path}"
        );
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
    for path in [
        "/ui/nope.js",
        "/ui/../Cargo.toml",
        "/ui/%2e%2e/x",
        "/ui/pkg//m_bg.wasm",
        "/ui/.hidden",
    ] {
        let (status, headers, _) = get(&app, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            headers.contains_key(header::CONTENT_SECURITY_POLICY),
            "{path}"
        );
    }

    // The data stays behind the token.
    let (status, _, _) = get(&app, "/v1/changes").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_a_dir_the_embedded_console_or_how_to_build_it() {
    let (status, headers, body) = get(&guarded_app(), "/ui/").await;
    assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(
        headers[header::CONTENT_SECURITY_POLICY],
        CONTENT_SECURITY_POLICY
    );
    let page = String::from_utf8_lossy(&body);
    if sync_server::ui::embedded() {
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains("console.js"), "{page}");
    } else {
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(page.contains("scripts/build-console.sh"), "{page}");
    }
}

#[tokio::test]
async fn the_binary_serves_ui_dir_and_refuses_a_dir_without_the_page() {
    use etcd_mesh_testkit::{free_port, http_get, wait_for, Proc};
    use std::process::Command;
    let dir = ui_dir();
    let logs = tempfile::tempdir().expect("tempdir");
    // etcd is never reached here: /ui/ does not need it.
    let etcd = format!("127.0.0.1:{}", free_port().expect("port"));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port().expect("port")));
    let command = |ui_dir: &std::path::Path| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sync-server"));
        command
            .args(["--etcd", &etcd, "--listen", &addr.to_string()])
            .args(["--watch", "etcd-naming=svc/"])
            .arg("--ui-dir")
            .arg(ui_dir);
        command
    };

    let server = Proc::spawn(
        "sync-server",
        command(dir.path()),
        logs.path().join("a.log"),
    )
    .expect("spawn");
    let served = wait_for(
        "/ui/ from --ui-dir",
        std::time::Duration::from_secs(20),
        || async {
            match http_get(addr, "/ui/").await {
                Ok((200, body)) => Some(body),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(
        served.as_deref(),
        Ok("<!doctype html><title>c</title>"),
        "{}",
        server.log_tail(20)
    );
    drop(server);

    let empty = tempfile::tempdir().expect("tempdir");
    let status = command(empty.path()).output().expect("runs");
    assert!(!status.status.success());
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(stderr.contains("has no index.html"), "{stderr}");
}
