//! The wire format of the sync-server HTTP contract v1: the full
//! [`Snapshot`] and the change feed's [`Changes`], and the [`Digest`] both
//! sides compute over what they hold.
//!
//! sync-server encodes them and the Envoy plugin decodes them; both use
//! these types so the two sides cannot drift apart. Decoding also
//! validates: an answer that does not hold together (a weight out of range,
//! an address Envoy cannot connect to) is refused as a whole, so a bad
//! answer never changes traffic.

#![forbid(unsafe_code)]

pub mod feed;

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
    /// How many health-check changes sync-server has published (they move
    /// the tables without a new etcd revision); 0 and left out when health
    /// checks are off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub health_seq: u64,
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
    /// What sync-server's active health checks found; absent when the
    /// endpoint is not checked (it then takes calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// When this endpoint began taking calls, in Unix milliseconds of
    /// sync-server's clock: when sync-server first saw it, or saw it pass
    /// its health checks again. Absent for endpoints already registered
    /// when sync-server started. Slow start ramps from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_since_ms: Option<u64>,
}

/// The result of an endpoint's active health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Its checks pass (`SERVING`).
    Healthy,
    /// Its checks fail: no answer, an error, or a timeout, as many times
    /// in a row as the unhealthy threshold.
    Unhealthy,
    /// The application answers `NOT_SERVING`: it asks for no new calls.
    NotServing,
}

impl Health {
    /// Whether the endpoint takes calls (when any endpoint does).
    pub fn takes_calls(self) -> bool {
        self == Health::Healthy
    }

    pub fn name(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::NotServing => "not_serving",
        }
    }
}

/// The metadata key of an endpoint's zone.
pub const ZONE_KEY: &str = "zone";

impl Endpoint {
    /// An endpoint with no metadata, health or start time.
    pub fn new(addr: impl Into<String>, weight: u32) -> Self {
        Endpoint {
            addr: addr.into(),
            weight,
            metadata: BTreeMap::new(),
            health: None,
            serving_since_ms: None,
        }
    }

    /// The zone the registration names (`metadata.zone`, a string).
    pub fn zone(&self) -> Option<&str> {
        self.metadata.get(ZONE_KEY).and_then(|z| z.as_str())
    }

    /// Whether health checks let it take calls (unchecked counts as yes).
    pub fn checks_pass(&self) -> bool {
        self.health.is_none_or(Health::takes_calls)
    }
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
        self.services
            .iter()
            .try_for_each(|(name, service)| service.validate(name))
    }
}

impl Service {
    /// Checks one service of a snapshot or a change: a name, and endpoints
    /// Envoy can connect to, each once, with weights in range.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if name.is_empty() {
            return Err("a service has an empty name".into());
        }
        let mut seen = std::collections::HashSet::new();
        for endpoint in &self.endpoints {
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
        Ok(())
    }

    /// The canonical encoding: what [`Digest`] hashes and what the plugin
    /// keeps in shared data.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One answer of the change feed (`GET /v1/changes`): what changed after
/// the revision the client holds, at service granularity.
///
/// With `full`, the answer replaces everything the client holds (its
/// revision was too old for the history kept, from another etcd cluster or
/// watch configuration, or it held nothing): `services` and `rejected` are
/// then complete. Otherwise `services` holds each service added or changed
/// since `since`, whole; `removed` the services gone; `rejected` the
/// rejections added or changed and `unrejected` the keys no longer rejected.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Changes {
    /// The etcd revision the client holds once it applied this answer.
    pub revision: u64,
    /// With `revision`, the position the client holds: health-check
    /// changes move it without a new revision. Sent back as `health_seq`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub health_seq: u64,
    /// The revision these changes start from (0 with `full`).
    #[serde(default)]
    pub since: u64,
    /// The health count these changes start from.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub since_health_seq: u64,
    /// Names the etcd cluster and watch configuration the revisions belong
    /// to; revisions of different epochs cannot be compared. Every replica
    /// of sync-server over the same cluster and `--watch` flags has the
    /// same epoch, and the same content at the same revision.
    pub epoch: String,
    /// Names the sync-server process whose observations (health checks,
    /// `serving_since_ms`) the answer carries; sent back as `observer`.
    /// Those differ between replicas, so a client that moves to another
    /// replica takes one full answer; empty from older servers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub observer: String,
    #[serde(default)]
    pub full: bool,
    #[serde(default)]
    pub stale: bool,
    pub services: BTreeMap<String, Service>,
    #[serde(default)]
    pub removed: Vec<String>,
    #[serde(default)]
    pub rejected: Vec<Rejected>,
    #[serde(default)]
    pub unrejected: Vec<String>,
    /// The [`Digest`] of every service the client holds after applying
    /// this answer (of the services asked for, when scoped).
    pub digest: u64,
    /// The server continues a client of another observer (another replica,
    /// or this one before a restart) with a delta when the client sends
    /// back `digest` and its tables equal the server's; older servers
    /// refuse the parameter, so a client sends it only when this is true.
    #[serde(default, skip_serializing_if = "is_false")]
    pub continues: bool,
}

impl Changes {
    /// Decodes and validates a change-feed body.
    pub fn decode(body: &[u8]) -> Result<Changes, DecodeError> {
        let changes: Changes =
            serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
        changes.validate().map_err(DecodeError::Invalid)?;
        Ok(changes)
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), String> {
        for (name, service) in &self.services {
            service.validate(name)?;
        }
        if let Some(name) = self.removed.iter().find(|n| self.services.contains_key(*n)) {
            return Err(format!("service {name:?} is both changed and removed"));
        }
        if self.full && !self.removed.is_empty() {
            return Err("a full answer lists removed services".into());
        }
        // Revisions only: a delta that continues a client of another
        // observer starts from that observer's health count, which this
        // one's does not compare with.
        if !self.full && self.since > self.revision {
            return Err(format!(
                "changes since {} end at the older revision {}",
                self.since, self.revision
            ));
        }
        Ok(())
    }
}

/// What `GET /v1/status` answers: where one sync-server stands, in a few
/// bytes, so that a client can choose between replicas without taking
/// their tables.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Status {
    /// See [`Changes::epoch`]; empty before the first listing.
    pub epoch: String,
    /// See [`Changes::observer`].
    pub observer: String,
    pub revision: u64,
    #[serde(default)]
    pub health_seq: u64,
    /// True when the server cannot show that its tables are current (no
    /// contact with the etcd majority within its freshness timeout).
    pub stale: bool,
    /// False until the first full listing from etcd.
    pub ready: bool,
    /// How long ago contact with the etcd majority was last proven (a
    /// listing or a quorum read answered); absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof_age_ms: Option<u64>,
}

impl Status {
    pub fn decode(body: &[u8]) -> Result<Status, DecodeError> {
        serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A digest of endpoint tables that both sides keep as they apply changes:
/// the wrapping sum of one FNV-1a hash per service (its name and canonical
/// encoding), so adding, replacing or removing a service costs one hash.
/// Two holders with the same services have the same digest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digest(u64);

impl Digest {
    /// Shown digests keep 48 bits: they stay exact as a float (Prometheus,
    /// JSON readers) and Envoy's gauges.
    const SHOWN: u64 = (1 << 48) - 1;

    /// The hash one service contributes.
    pub fn of(name: &str, service: &Service) -> u64 {
        Self::of_encoded(name, &service.encode())
    }

    /// The same, from the canonical encoding ([`Service::encode`]).
    pub fn of_encoded(name: &str, encoded: &[u8]) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let step = |hash: u64, byte: &u8| (hash ^ u64::from(*byte)).wrapping_mul(PRIME);
        let hash = name.as_bytes().iter().fold(OFFSET, step);
        encoded.iter().fold(step(hash, &0xff), step)
    }

    pub fn add(&mut self, hash: u64) {
        self.0 = self.0.wrapping_add(hash);
    }

    pub fn remove(&mut self, hash: u64) {
        self.0 = self.0.wrapping_sub(hash);
    }

    pub fn value(self) -> u64 {
        self.0 & Self::SHOWN
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
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
        Endpoint::new(addr, weight)
    }

    fn snapshot_with(endpoints: Vec<Endpoint>) -> Snapshot {
        let mut services = BTreeMap::new();
        services.insert("demo.Echo".to_string(), Service { endpoints });
        Snapshot {
            revision: 7,
            health_seq: 0,
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
    fn changes_round_trip_and_refuse_contradictions() {
        let snapshot = snapshot_with(vec![endpoint("127.0.0.1:1", 2)]);
        let changes = Changes {
            revision: 9,
            since: 7,
            epoch: "e".into(),
            services: snapshot.services.clone(),
            removed: vec!["gone".into()],
            unrejected: vec!["k".into()],
            ..Changes::default()
        };
        assert_eq!(Changes::decode(&changes.encode()), Ok(changes.clone()));
        let mut both = changes.clone();
        both.removed.push("demo.Echo".into());
        assert!(Changes::decode(&both.encode()).is_err());
        let mut backwards = changes.clone();
        backwards.since = 10;
        assert!(Changes::decode(&backwards.encode()).is_err());
        let mut bad = changes;
        bad.services.insert(
            "s".into(),
            Service {
                endpoints: vec![endpoint("nohost", 1)],
            },
        );
        assert!(Changes::decode(&bad.encode()).is_err());
    }

    #[test]
    fn digests_follow_content_not_history() {
        let a = Service {
            endpoints: vec![endpoint("127.0.0.1:1", 1)],
        };
        let b = Service {
            endpoints: vec![endpoint("127.0.0.1:2", 1)],
        };
        let mut built = Digest::default();
        built.add(Digest::of("a", &a));
        built.add(Digest::of("b", &a));
        built.remove(Digest::of("b", &a));
        built.add(Digest::of("b", &b));
        let mut direct = Digest::default();
        direct.add(Digest::of("b", &b));
        direct.add(Digest::of("a", &a));
        assert_eq!(built, direct);
        assert_ne!(Digest::of("a", &b), Digest::of("b", &a));
        assert!(built.value() < 1 << 48);
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
