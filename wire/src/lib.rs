//! The snapshot wire format of the sync-server HTTP contract v1.
//!
//! sync-server encodes it and the Envoy plugin decodes it; both use these
//! types so the two sides cannot drift apart. Decoding also validates: a
//! snapshot that does not hold together (a weight out of range, an address
//! Envoy cannot connect to) is refused as a whole, so a bad snapshot never
//! changes traffic.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

/// The highest weight a registration may carry; 0 means draining.
pub const MAX_WEIGHT: u32 = 10_000;

/// The weight of a registration that does not state one.
pub const DEFAULT_WEIGHT: u32 = 1;

/// Everything sync-server knows at one etcd revision.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// The etcd revision this snapshot is consistent at.
    pub revision: u64,
    /// True while sync-server cannot reach etcd and serves its last view.
    #[serde(default)]
    pub stale: bool,
    /// Services by registry name.
    pub services: BTreeMap<String, Service>,
    /// Registrations left out, with why.
    #[serde(default)]
    pub rejected: Vec<Rejected>,
}

/// The live instances of one service.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Service {
    pub endpoints: Vec<Endpoint>,
}

/// One instance: where to connect and how much traffic it takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `ip:port` (IPv6 as `[ip]:port`).
    pub addr: String,
    /// 0..=MAX_WEIGHT; 0 means draining (no new calls).
    pub weight: u32,
    /// Free metadata from the registration (zone, version, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// A registration that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub key: String,
    pub reason: String,
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON, or not shaped like a snapshot.
    Json(String),
    /// Well-formed JSON whose content breaks the contract.
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Json(e) => write!(f, "snapshot is not valid JSON: {e}"),
            DecodeError::Invalid(e) => write!(f, "snapshot is invalid: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl Snapshot {
    /// Decodes and validates a snapshot body.
    pub fn decode(body: &[u8]) -> Result<Snapshot, DecodeError> {
        let snapshot: Snapshot =
            serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
        snapshot.validate().map_err(DecodeError::Invalid)?;
        Ok(snapshot)
    }

    /// Encodes the snapshot as the JSON body of `GET /v1/snapshot`.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain maps, strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks what the types alone cannot: names, addresses, weights, and
    /// that an address appears at most once per service.
    pub fn validate(&self) -> Result<(), String> {
        for (name, service) in &self.services {
            if name.is_empty() {
                return Err("a service has an empty name".into());
            }
            let mut seen = std::collections::HashSet::new();
            for endpoint in &service.endpoints {
                parse_addr(&endpoint.addr).map_err(|e| format!("service {name:?}: {e}"))?;
                if endpoint.weight > MAX_WEIGHT {
                    return Err(format!(
                        "service {name:?}: endpoint {} has weight {} above {MAX_WEIGHT}",
                        endpoint.addr, endpoint.weight
                    ));
                }
                if !seen.insert(endpoint.addr.as_str()) {
                    return Err(format!(
                        "service {name:?}: endpoint {} is listed twice",
                        endpoint.addr
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parses an endpoint address. Envoy connects to it directly, so it must be
/// a literal `ip:port` with a non-zero port: host names are refused.
pub fn parse_addr(addr: &str) -> Result<SocketAddr, String> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| format!("address {addr:?} is not ip:port"))?;
    if parsed.port() == 0 {
        return Err(format!("address {addr:?} has port 0"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(addr: &str, weight: u32) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            weight,
            metadata: BTreeMap::new(),
        }
    }

    fn snapshot_with(endpoints: Vec<Endpoint>) -> Snapshot {
        let mut services = BTreeMap::new();
        services.insert("demo.Echo".to_string(), Service { endpoints });
        Snapshot {
            revision: 7,
            stale: false,
            services,
            rejected: vec![],
        }
    }

    #[test]
    fn round_trips() {
        let snapshot = snapshot_with(vec![endpoint("127.0.0.1:1", 1), endpoint("[::1]:2", 0)]);
        assert_eq!(Snapshot::decode(&snapshot.encode()), Ok(snapshot));
    }

    #[test]
    fn decodes_the_contract_example() {
        let body = br#"{"revision": 42, "stale": false,
            "services": {"demo.Echo": {"endpoints": [
                {"addr": "10.0.0.1:50051", "weight": 3, "metadata": {"zone": "a"}}]}},
            "rejected": [{"key": "k", "reason": "r"}]}"#;
        let snapshot = Snapshot::decode(body).expect("valid");
        assert_eq!(snapshot.revision, 42);
        assert_eq!(snapshot.services["demo.Echo"].endpoints[0].weight, 3);
        assert_eq!(snapshot.rejected.len(), 1);
    }

    #[test]
    fn refuses_what_breaks_the_contract() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "JSON"),
            (b"not json", "JSON"),
            (b"[]", "JSON"),
            (br#"{"revision": -1, "services": {}}"#, "JSON"),
            (br#"{"revision": 1}"#, "JSON"),
            (br#"{"revision": 1, "services": {"s": {"endpoints": [{"addr": "x", "weight": 1}]}}}"#, "ip:port"),
            (br#"{"revision": 1, "services": {"s": {"endpoints": [{"addr": "1.2.3.4:0", "weight": 1}]}}}"#, "port 0"),
            (br#"{"revision": 1, "services": {"s": {"endpoints": [{"addr": "1.2.3.4:5", "weight": 10001}]}}}"#, "above"),
            (br#"{"revision": 1, "services": {"s": {"endpoints": [{"addr": "1.2.3.4:5", "weight": -3}]}}}"#, "JSON"),
            (br#"{"revision": 1, "services": {"": {"endpoints": []}}}"#, "empty name"),
            (br#"{"revision": 1, "services": {"s": {"endpoints": [{"addr": "1.2.3.4:5", "weight": 1}, {"addr": "1.2.3.4:5", "weight": 2}]}}}"#, "twice"),
        ];
        for (body, expected) in cases {
            let err = Snapshot::decode(body).expect_err(&String::from_utf8_lossy(body));
            assert!(
                err.to_string().contains(expected),
                "{:?}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let in_metadata = format!(
            r#"{{"revision": 1, "services": {{"s": {{"endpoints": [{{"addr": "1.2.3.4:5", "weight": 1, "metadata": {{"m": {deep}}}}}]}}}}}}"#
        );
        assert!(Snapshot::decode(in_metadata.as_bytes()).is_err());
        // An unknown field is skipped whatever it holds; it must not crash.
        let unknown = format!(r#"{{"revision": 1, "services": {{}}, "x": {deep}}}"#);
        let _ = Snapshot::decode(unknown.as_bytes());
    }
}
