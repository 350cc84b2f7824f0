//! A minimal HTTP/1.1 GET on loopback, and what the tests read with it:
//! Prometheus values, sync-server's snapshot and readiness.

use crate::wait_for;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An HTTP response, as [`http_get_with`] reads it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The value of `name` in a Prometheus text page, if it is there.
pub fn prometheus_value(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The snapshot the sync-server at `addr` serves now, if it serves a
/// valid one.
pub async fn fetch_snapshot(addr: SocketAddr) -> Option<etcd_mesh_wire::Snapshot> {
    match http_get(addr, "/v1/snapshot").await {
        Ok((200, body)) => etcd_mesh_wire::Snapshot::decode(body.as_bytes()).ok(),
        _ => None,
    }
}

/// Waits until the sync-server at `addr` is ready (`/readyz` answers 200).
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    wait_for(
        &format!("sync-server {addr} /readyz"),
        timeout,
        || async move { matches!(http_get(addr, "/readyz").await, Ok((200, _))).then_some(()) },
    )
    .await
}

/// A minimal HTTP/1.1 GET on loopback: (status, body). Enough for health
/// checks and admin pages, without pulling an HTTP client into the tests.
pub async fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_get_with(addr, path, &[])
        .await
        .map(|r| (r.status, r.body))
}

/// A GET with extra request headers, returning the response headers too.
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpResponse> {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tokio::task::spawn_blocking(move || http_exchange(addr, &request))
        .await
        .map_err(io::Error::other)?
}

fn http_exchange(addr: SocketAddr, request: &str) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response from {addr}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}
