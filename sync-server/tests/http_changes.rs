//! The HTTP contract of the change feed, in process: `app(state)` driven
//! with `oneshot`, no socket and no etcd, with paused time for long-polls.

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use etcd_mesh_wire::{Changes, Endpoint, Service, Snapshot};
use std::sync::Arc;
use std::time::Duration;
use sync_server::http::{app, AppState};
use sync_server::publish::Publisher;
use sync_server::registry::{Commit, Tables};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn tables(services: &[(&str, u16)]) -> Tables {
    let snapshot = Snapshot {
        services: services
            .iter()
            .map(|(name, port)| {
                let endpoint = Endpoint {
                    addr: format!("127.0.0.1:{port}"),
                    weight: 1,
                    metadata: Default::default(),
                };
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
    let request = Request::get(path).body(Body::empty()).expect("request");
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
