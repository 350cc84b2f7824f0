//! The browser console at `/ui/` (and `/ui`, redirected there): its files,
//! their content types, and the security headers on every answer.
//!
//! The files come from console/dist/ (scripts/build-console.sh): embedded
//! at compile time when they were built before sync-server (build.rs), or
//! read from `--ui-dir` at each request, which wins when given. `/ui/` is
//! open, like the probes: the page holds no data, it asks `/v1/*` for it
//! with the user's token.

use axum::extract::{Path, Request};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::path::PathBuf;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/ui_files.rs"));
}

/// The page may load its own script, styles and wasm, and talk to this
/// server alone: no inline script or style, no framing, no forms elsewhere.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; \
    connect-src 'self'; style-src 'self'; img-src 'self' data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// Where the console's files are read from at each request (`--ui-dir`),
/// given to the router as a request extension; without it, the embedded
/// files.
#[derive(Debug, Clone)]
pub struct UiDir(pub PathBuf);

/// Whether the console was embedded at compile time.
pub fn embedded() -> bool {
    !embedded::FILES.is_empty()
}

/// The `/ui` routes, open and stateless.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|request: Request| serve(None, request)))
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>, request: Request| serve(Some(path), request)),
        )
        .layer(middleware::from_fn(secure))
}

async fn secure(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        // Revalidate, so a rebuilt console is never mixed with an old one.
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

async fn serve(path: Option<String>, request: Request) -> Response {
    let path = path.unwrap_or_default();
    let path = if path.is_empty() || path.ends_with('/') {
        format!("{path}index.html")
    } else {
        path
    };
    // Plain names only: no `..`, no hidden files, no empty segments.
    if path
        .split('/')
        .any(|s| s.is_empty() || s.starts_with('.') || s.contains('\\'))
    {
        return not_found();
    }
    let body = match request.extensions().get::<UiDir>() {
        Some(UiDir(dir)) => tokio::fs::read(dir.join(&path)).await.ok(),
        None => embedded::FILES
            .iter()
            .find(|(name, _)| *name == path)
            .map(|(_, bytes)| bytes.to_vec()),
    };
    match body {
        Some(body) => ([(header::CONTENT_TYPE, content_type(&path))], body).into_response(),
        None if path == "index.html" => not_built(),
        None => not_found(),
    }
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map_or("", |(_, ext)| ext) {
        "html" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "json" => "application/json",
        "png" => "image/png",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "no such file in the console\n",
    )
        .into_response()
}

/// What `/ui/` answers when this binary has no console and no `--ui-dir`.
fn not_built() -> Response {
    const PAGE: &str = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
        <title>etcd-mesh console not built</title></head><body>\
        <h1>The etcd-mesh console is not built into this sync-server</h1>\
        <p>Build it with <code>scripts/build-console.sh</code> (or <code>make build</code>), \
        then rebuild sync-server to embed it, or start sync-server with \
        <code>--ui-dir console/dist</code>.</p></body></html>\n";
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(content_type("pkg/x_bg.wasm"), "application/wasm");
        assert_eq!(content_type("console.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(content_type("README"), "application/octet-stream");
    }
}
