//! The HTTP contract v1: snapshots (with ETag and long-poll), the change
//! feed (deltas, with long-poll), one service, health and readiness.
//!
//! [`app`] builds the router without a socket, so tests can drive it
//! directly; every error is an [`ApiError`], answered as JSON.

use crate::history::Position;
use crate::metrics::{Metrics, WaiterGuard};
use crate::publish::{Answer, Cursor, Published, Publisher};
use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The longest a long-poll may be held, whatever `wait` asks.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct AppState {
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    /// When set, `/v1/*` and `/metrics` need `Authorization: Bearer <token>`.
    pub token: Option<Arc<str>>,
    /// Ends held long-polls at once when the server shuts down.
    pub shutdown: CancellationToken,
    /// The most long-polls held at once; beyond it a long-poll is answered
    /// 503 with `Retry-After` at once, so the others are never stalled.
    pub max_long_polls: usize,
}

/// The default of `--max-long-polls`.
pub const DEFAULT_MAX_LONG_POLLS: usize = 20_000;

impl AppState {
    pub fn new(publisher: Publisher, shutdown: CancellationToken) -> Self {
        AppState {
            publisher,
            metrics: Metrics::new(),
            token: None,
            shutdown,
            max_long_polls: DEFAULT_MAX_LONG_POLLS,
        }
    }
}

pub fn app(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/v1/snapshot", get(snapshot))
        .route("/v1/changes", get(changes))
        .route("/v1/status", get(status))
        .route("/v1/services/{name}", get(service))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    // Probes stay open: an orchestrator has no token.
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .merge(crate::ui::router())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such path") })
        .with_state(state)
}

async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.token {
        let offered = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !offered.is_some_and(|offered| constant_time_eq(offered, token.as_bytes())) {
            state
                .metrics
                .unauthorized_total
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token",
            ));
        }
    }
    Ok(next.run(request).await)
}

/// Compares without stopping at the first difference, so response times
/// do not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state.publisher, state.max_long_polls);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// An error answered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Seconds for `Retry-After`, when trying again later will work.
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn too_many_long_polls(max: usize) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{max} long-polls are held already; retry later"),
            )
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no snapshot yet: the first sync from etcd has not finished",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The query of `/v1/snapshot` and `/v1/changes`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SnapshotQuery {
    pub since: Option<u64>,
    /// The health-check changes the client holds at `since` (see
    /// [`Position`]); a client that sends none is not woken by them.
    pub health_seq: Option<u64>,
    pub wait: Duration,
    /// `/v1/changes` only: the epoch of `since`.
    pub epoch: Option<String>,
    /// `/v1/changes` only: the observer whose view the client holds.
    pub observer: Option<String>,
    /// `/v1/changes` only: the digest of the tables the client holds.
    pub digest: Option<u64>,
    /// `/v1/changes` only: the services wanted (comma-separated names).
    pub services: Option<BTreeSet<String>>,
}

impl SnapshotQuery {
    /// Parses the query of `/v1/snapshot`.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        Self::parse_for(query, false)
    }

    /// Parses the query of `/v1/changes`, which also takes `epoch` and
    /// `services`.
    pub fn parse_changes(query: Option<&str>) -> Result<Self, String> {
        Self::parse_for(query, true)
    }

    fn parse_for(query: Option<&str>, changes: bool) -> Result<Self, String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| format!("the query is not form-encoded: {e}"))?;
        let mut parsed = SnapshotQuery::default();
        for (name, value) in pairs {
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("`{name}` must be a whole number, got {value:?}"))
            };
            match name.as_str() {
                "since" => parsed.since = Some(number()?),
                "health_seq" => parsed.health_seq = Some(number()?),
                "wait" => parsed.wait = Duration::from_secs(number()?).min(MAX_WAIT),
                "epoch" if changes => parsed.epoch = Some(value),
                "observer" if changes => parsed.observer = Some(value),
                "digest" if changes => parsed.digest = Some(number()?),
                "services" if changes => {
                    let names: BTreeSet<String> = value
                        .split(',')
                        .filter(|n| !n.is_empty())
                        .map(str::to_owned)
                        .collect();
                    if names.is_empty() {
                        return Err("`services` names no service".into());
                    }
                    parsed.services = Some(names);
                }
                other => return Err(format!("unknown query parameter `{other}`")),
            }
        }
        if parsed.wait > Duration::ZERO && parsed.since.is_none() {
            return Err("`wait` needs `since`".into());
        }
        if parsed.digest.is_some() && parsed.since.is_none() {
            return Err("`digest` needs `since`".into());
        }
        if parsed.health_seq.is_some() && parsed.since.is_none() {
            return Err("`health_seq` needs `since`".into());
        }
        Ok(parsed)
    }
}

/// Holds one long-poll slot, or refuses when all are taken.
fn long_poll_slot(state: &AppState) -> Result<WaiterGuard, ApiError> {
    state
        .metrics
        .try_waiter(state.max_long_polls)
        .ok_or_else(|| {
            state
                .metrics
                .long_polls_refused_total
                .fetch_add(1, Ordering::Relaxed);
            ApiError::too_many_long_polls(state.max_long_polls)
        })
}

async fn snapshot(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = SnapshotQuery::parse(query.as_deref()).map_err(ApiError::bad_request)?;
    let Some(since) = query
        .since
        .map(|s| Position::of_client(s, query.health_seq))
    else {
        let current = state.publisher.current().ok_or_else(ApiError::not_ready)?;
        let if_none_match = headers
            .get(header::IF_NONE_MATCH)
            .map(HeaderValue::as_bytes);
        if if_none_match == Some(current.etag.as_bytes()) {
            return Ok(not_modified(Some(&current)));
        }
        return Ok(full(&current));
    };
    // Long-poll: answer as soon as something newer than `since` is held.
    let _waiting = long_poll_slot(&state)?;
    let mut changes = state.publisher.subscribe();
    let deadline = tokio::time::Instant::now() + query.wait;
    loop {
        let current = changes.borrow_and_update().clone();
        if let Some(current) = current.as_ref().filter(|c| c.position() > since) {
            return Ok(full(current));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return Ok(not_modified(current.as_deref())) },
            _ = tokio::time::sleep_until(deadline) => return Ok(not_modified(current.as_deref())),
            _ = state.shutdown.cancelled() => return Ok(not_modified(current.as_deref())),
        }
    }
}

/// The change feed: what changed after `since` (see the README's API
/// section). Long-polls like `/v1/snapshot`; a scoped long-poll is held
/// until a service in scope changes.
async fn changes(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let query = SnapshotQuery::parse_changes(query.as_deref()).map_err(ApiError::bad_request)?;
    let cursor = Cursor {
        since: query
            .since
            .map(|s| Position::of_client(s, query.health_seq)),
        epoch: query.epoch,
        observer: query.observer,
        digest: query.digest,
        scope: query.services.map(Arc::new),
    };
    let respond = |current: &Published, answer: Option<Arc<Answer>>| match answer {
        Some(answer) => {
            let kind = if answer.full {
                &state.metrics.changes_full_total
            } else {
                &state.metrics.changes_delta_total
            };
            kind.fetch_add(1, Ordering::Relaxed);
            let mut response = Response::new(Body::from(answer.body.clone()));
            set_headers(&mut response, Some(current));
            response
        }
        None => not_modified(Some(current)),
    };
    let waiting = (query.wait > Duration::ZERO)
        .then(|| long_poll_slot(&state))
        .transpose()?;
    let mut changes = state.publisher.subscribe();
    let deadline = tokio::time::Instant::now() + query.wait;
    loop {
        let current = changes.borrow_and_update().clone();
        let Some(current) = current else {
            if waiting.is_none() {
                return Err(ApiError::not_ready());
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return Err(ApiError::not_ready()) },
                _ = tokio::time::sleep_until(deadline) => return Err(ApiError::not_ready()),
                _ = state.shutdown.cancelled() => return Err(ApiError::not_ready()),
            }
            continue;
        };
        let answer = current.changes(&cursor);
        let ready = answer
            .as_ref()
            .is_some_and(|a| a.continued || !(a.empty && cursor.scope.is_some()));
        if ready || waiting.is_none() {
            return Ok(respond(&current, answer));
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = state.shutdown.cancelled() => break,
        }
    }
    // The wait ran out: an empty scoped delta still moves the client on.
    let current = state.publisher.current().ok_or_else(ApiError::not_ready)?;
    Ok(respond(&current, current.changes(&cursor)))
}

fn full(published: &Published) -> Response {
    let mut response = Response::new(Body::from(published.snapshot_body()));
    set_headers(&mut response, Some(published));
    response
}

fn not_modified(published: Option<&Published>) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    set_headers(&mut response, published);
    response
}

fn set_headers(response: &mut Response, published: Option<&Published>) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(published) = published {
        headers.insert(header::ETAG, published.etag.clone());
    }
}

async fn service(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let current = state.publisher.current().ok_or_else(ApiError::not_ready)?;
    let service = current
        .tables
        .services
        .get(name.as_str())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no service {name:?}")))?;
    let body = serde_json::json!({
        "revision": current.revision(),
        "health_seq": current.health_seq,
        "stale": current.stale,
        "name": name,
        "endpoints": service.service.endpoints,
    });
    let mut response = Response::new(Body::from(body.to_string()));
    set_headers(&mut response, Some(&current));
    Ok(response)
}

/// Where this replica stands, in a few bytes: what a client compares to
/// choose a replica without taking its tables.
async fn status(State(state): State<AppState>) -> Response {
    let current = state.publisher.current();
    let status = etcd_mesh_wire::Status {
        epoch: current
            .as_ref()
            .map(|c| c.epoch.to_string())
            .unwrap_or_default(),
        observer: state.publisher.observer().to_owned(),
        revision: current.as_ref().map_or(0, |c| c.revision),
        health_seq: current.as_ref().map_or(0, |c| c.health_seq),
        stale: current.as_ref().is_none_or(|c| c.stale),
        ready: state.publisher.synced(),
        proof_age_ms: state.metrics.proof_age().map(|age| age.as_millis() as u64),
    };
    let mut response = Response::new(Body::from(status.encode()));
    set_headers(&mut response, None);
    response
}

/// Ready once etcd has been listed in full; stays ready while etcd is away
/// (the last snapshot is served, marked stale).
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    if state.publisher.synced() {
        Ok("ready\n")
    } else {
        Err(ApiError::not_ready())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn parses_queries() {
        assert_eq!(SnapshotQuery::parse(None), Ok(SnapshotQuery::default()));
        assert_eq!(
            SnapshotQuery::parse(Some("since=5&wait=10")),
            Ok(SnapshotQuery {
                since: Some(5),
                wait: Duration::from_secs(10),
                ..SnapshotQuery::default()
            })
        );
        let changes =
            SnapshotQuery::parse_changes(Some("since=5&epoch=a-b&observer=o1&services=x.Y%2Cz,w"))
                .expect("valid");
        assert_eq!(changes.epoch.as_deref(), Some("a-b"));
        assert_eq!(changes.observer.as_deref(), Some("o1"));
        assert_eq!(
            changes
                .services
                .expect("scoped")
                .into_iter()
                .collect::<Vec<_>>(),
            ["w", "x.Y", "z"]
        );
        assert!(SnapshotQuery::parse(Some("since=5&epoch=a")).is_err());
        assert!(SnapshotQuery::parse_changes(Some("services=,")).is_err());
        assert_eq!(
            SnapshotQuery::parse(Some("since=5&wait=100000")).map(|q| q.wait),
            Ok(MAX_WAIT)
        );
        for bad in [
            "since=-1",
            "since=x",
            "wait=5",
            "since=1&wait=",
            "foo=1",
            "since",
        ] {
            assert!(SnapshotQuery::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
