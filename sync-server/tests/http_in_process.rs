//! The HTTP contract v1, in process: `app(state)` driven with `oneshot`, no
//! socket and no etcd, with paused time for long-polls. The snapshot (ETag,
//! If-None-Match, long-poll), one service, errors, and the change feed.

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use etcd_mesh_wire::{Changes, Endpoint, Service, Snapshot};
use std::sync::Arc;
use std::time::Duration;
use sync_server::http::{app, AppState};
use sync_server::publish::Publisher;
use sync_server::tables::{Commit, Tables};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn tables(services: &[(&str, u16)]) -> Tables {
    let snapshot = Snapshot {
        services: services
            .iter()
            .map(|(name, port)| {
                let endpoint = Endpoint::new(format!("127.0.0.1:{port}"), 1);
                (
                    name.to_string(),
                    Service {
                        endpoints: vec![endpoint],
                    },
                )
            })
            .collect(),
        ..Snapshot::default()
    };
    Tables::from_snapshot(&snapshot)
}

fn commit(services: &[&str]) -> Commit {
    Commit {
        services: services.iter().map(|s| Arc::from(*s)).collect(),
        rejections: vec![],
    }
}

fn state() -> (AppState, Publisher) {
    let publisher = Publisher::default();
    publisher.publish_reset("e", 10, tables(&[("a", 1), ("b", 2)]));
    let state = AppState::new(publisher.clone(), CancellationToken::new());
    (state, publisher)
}

async fn get(app: &Router, path: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    get_with(app, path, &[]).await
}

async fn get_with(
    app: &Router,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut request = Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Body::empty()).expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, usize::MAX).await.expect("body");
    (parts.status, parts.headers, body.to_vec())
}

#[tokio::test(start_paused = true)]
async fn a_long_poll_is_answered_by_the_next_change_with_a_delta() {
    let (state, publisher) = state();
    let app = app(state);
    let held = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/v1/changes?since=10&epoch=e&wait=30").await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!held.is_finished());
    publisher.publish_change(11, commit(&["b"]), tables(&[("a", 1), ("b", 3)]));
    let (status, headers, body) = held.await.expect("joined");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::ETAG], "\"11\"");
    let changes = Changes::decode(&body).expect("valid");
    assert_eq!(
        (changes.full, changes.since, changes.revision),
        (false, 10, 11)
    );
    assert_eq!(changes.services.keys().collect::<Vec<_>>(), ["b"]);

    // Nothing newer within the wait: 304.
    let (status, _, _) = get(&app, "/v1/changes?since=11&epoch=e&wait=3").await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
}

#[tokio::test(start_paused = true)]
async fn a_scoped_long_poll_waits_for_its_own_services() {
    let (state, publisher) = state();
    let app = app(state);
    let held = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/v1/changes?since=10&epoch=e&wait=30&services=a").await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    publisher.publish_change(11, commit(&["b"]), tables(&[("a", 1), ("b", 3)]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !held.is_finished(),
        "a change outside the scope does not answer"
    );
    publisher.publish_change(12, commit(&["a"]), tables(&[("a", 4), ("b", 3)]));
    let (status, _, body) = held.await.expect("joined");
    assert_eq!(status, StatusCode::OK);
    let changes = Changes::decode(&body).expect("valid");
    assert_eq!(changes.services.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(changes.revision, 12);

    // Changes outside the scope only: at the end of the wait an empty
    // delta moves the client on, so its revision does not fall behind.
    publisher.publish_change(13, commit(&["b"]), tables(&[("a", 4), ("b", 5)]));
    let (status, _, body) = get(&app, "/v1/changes?since=12&epoch=e&wait=2&services=a").await;
    assert_eq!(status, StatusCode::OK);
    let changes = Changes::decode(&body).expect("valid");
    assert!(changes.services.is_empty() && changes.removed.is_empty());
    assert_eq!(changes.revision, 13);
}

#[tokio::test(start_paused = true)]
async fn long_polls_beyond_the_limit_get_503_with_retry_after() {
    let (mut state, _publisher) = state();
    state.max_long_polls = 2;
    let app = app(state);
    let mut held = Vec::new();
    for _ in 0..2 {
        let app = app.clone();
        held.push(tokio::spawn(async move {
            get(&app, "/v1/changes?since=10&epoch=e&wait=60").await.0
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, headers, body) = get(&app, "/v1/snapshot?since=10&wait=60").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(String::from_utf8_lossy(&body).contains("long-polls"));
    let (_, _, metrics) = get(&app, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.contains("\nsync_server_long_polls_refused_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nsync_server_long_poll_limit 2\n"),
        "{metrics}"
    );
    // A request that does not wait is never refused.
    assert_eq!(get(&app, "/v1/changes").await.0, StatusCode::OK);
    for poll in held {
        assert_eq!(poll.await.expect("joined"), StatusCode::NOT_MODIFIED);
    }
    assert_eq!(
        get(&app, "/v1/changes?since=10&epoch=e&wait=1").await.0,
        StatusCode::NOT_MODIFIED,
        "slots are given back"
    );
}

#[tokio::test]
async fn bad_change_queries_get_400_with_the_reason() {
    let (state, _publisher) = state();
    let app = app(state);
    for (query, reason) in [
        ("?since=x", "whole number"),
        ("?wait=5", "`wait` needs `since`"),
        ("?services=", "names no service"),
        ("?scope=a", "unknown query parameter"),
        ("?since=%zz", "since"),
    ] {
        let (status, _, body) = get(&app, &format!("/v1/changes{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(reason), "{query}: {body}");
    }
}

#[tokio::test(start_paused = true)]
async fn snapshots_have_etags_and_long_polls_wait_for_a_newer_revision() {
    let (state, publisher) = state();
    let app = app(state);
    let (status, headers, body) = get(&app, "/v1/snapshot").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::ETAG], "\"10\"");
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let snapshot = Snapshot::decode(&body).expect("valid");
    assert_eq!((snapshot.revision, snapshot.services.len()), (10, 2));
    let (status, _, body) = get_with(&app, "/v1/snapshot", &[("if-none-match", "\"10\"")]).await;
    assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
    let (status, _, _) = get_with(&app, "/v1/snapshot", &[("if-none-match", "\"9\"")]).await;
    assert_eq!(status, StatusCode::OK);

    // Held until a newer revision, then the whole snapshot.
    let held = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/v1/snapshot?since=10&wait=30").await }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!held.is_finished());
    publisher.publish_change(11, commit(&["b"]), tables(&[("a", 1), ("b", 3)]));
    let (status, headers, body) = held.await.expect("joined");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::ETAG], "\"11\"");
    assert_eq!(Snapshot::decode(&body).expect("valid").revision, 11);
    // Newer already: at once; nothing newer: 304 when `wait` runs out.
    assert_eq!(
        get(&app, "/v1/snapshot?since=3&wait=30").await.0,
        StatusCode::OK
    );
    let started = tokio::time::Instant::now();
    assert_eq!(
        get(&app, "/v1/snapshot?since=11&wait=7").await.0,
        StatusCode::NOT_MODIFIED
    );
    assert_eq!(started.elapsed(), Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_held_long_polls_at_once() {
    let (state, _publisher) = state();
    let shutdown = state.shutdown.clone();
    let app = app(state);
    let held = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/v1/snapshot?since=10&wait=300").await.0 }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = tokio::time::Instant::now();
    shutdown.cancel();
    assert_eq!(held.await.expect("joined"), StatusCode::NOT_MODIFIED);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn services_errors_and_probes() {
    let (state, _publisher) = state();
    let app = app(state);
    let (status, _, body) = get(&app, "/v1/services/b").await;
    assert_eq!(status, StatusCode::OK);
    let service: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(service["endpoints"][0]["addr"], "127.0.0.1:2");
    assert_eq!(
        (service["name"].as_str(), service["revision"].as_u64()),
        (Some("b"), Some(10))
    );
    assert_eq!(
        get(&app, "/v1/services/nope").await.0,
        StatusCode::NOT_FOUND
    );
    for bad in [
        "/v1/snapshot?since=-1",
        "/v1/snapshot?wait=3",
        "/v1/snapshot?what=1",
    ] {
        let (status, _, body) = get(&app, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body.starts_with(b"{\"error\""), "{bad}");
    }
    let (status, _, body) = get(&app, "/v2/anything").await;
    assert_eq!(
        (status, body.starts_with(b"{\"error\"")),
        (StatusCode::NOT_FOUND, true)
    );
    assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
    // Not ready until a listing from etcd (a published snapshot is not one).
    assert_eq!(
        get(&app, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}
