//! The plugin configuration (Envoy's `configuration` string), parsed once in
//! `on_configure`. A bad configuration is refused with an error that names
//! the field, and Envoy then refuses to load the plugin.

use etcd_mesh_routing::{Policy, SlowStart, ZoneRouting};
use serde::Deserialize;
use std::collections::HashMap;

/// What this instance of the plugin does.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum PluginConfig {
    /// The singleton that long-polls sync-server.
    Poller(PollerConfig),
    /// The HTTP filter that routes each call.
    Router(RouterConfig),
    /// An HTTP filter that makes at most one named host call and nothing
    /// else: the rungs of the benchmarks' cost ladder.
    Noop(NoopConfig),
}

/// The `noop` role: which one host call it makes per request, if any.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NoopConfig {
    #[serde(default)]
    pub call: NoopCall,
    /// The upstream of the override calls (`filter_state`,
    /// `header_override`).
    #[serde(default)]
    pub addr: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NoopCall {
    /// No host call: the floor any wasm filter costs.
    #[default]
    None,
    /// The 16-byte version read from shared data.
    VersionRead,
    /// The `:path` read.
    PathRead,
    /// The filter-state override to `addr` (for an ORIGINAL_DST cluster).
    FilterState,
    /// The `x-envoy-original-dst-host` header set to `addr`.
    HeaderOverride,
    /// The `grpc-status` read from the response trailers.
    GrpcStatusRead,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollerConfig {
    /// The Envoy cluster that leads to sync-server (one replica, or a pool
    /// Envoy balances over). Exactly one of this and `clusters`.
    #[serde(default)]
    pub cluster: Option<String>,
    /// One Envoy cluster per sync-server replica: the poller follows one
    /// and moves to another when it fails, hangs or turns stale.
    #[serde(default)]
    pub clusters: Option<Vec<String>>,
    /// The `:authority` of the poll requests.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// How long sync-server may hold one long-poll, in seconds.
    #[serde(default = "default_wait_seconds")]
    pub wait_seconds: u32,
    /// The most a poll may take beyond `wait_seconds`, in milliseconds.
    #[serde(default = "default_timeout_margin_ms")]
    pub timeout_margin_ms: u32,
    /// The longest pause between failed polls, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u32,
    /// Sent as `Authorization: Bearer <token>` when sync-server wants one.
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// The services this Envoy routes to; only these travel. All when unset.
    #[serde(default)]
    pub services: Option<Vec<String>>,
    /// How often (ms) the replica followed is asked `GET /v1/status` while
    /// a long-poll waits on it, to find it hung or stale; 0 never asks.
    /// Only with two or more `clusters`.
    #[serde(default = "default_probe_ms")]
    pub probe_ms: u32,
    /// How long (ms) a status probe may take before its replica counts as
    /// unusable.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u32,
}

impl PollerConfig {
    /// The clusters of the replicas, in the order configured: `cluster`
    /// alone is a list of one.
    pub fn clusters(&self) -> &[String] {
        match &self.clusters {
            Some(clusters) => clusters,
            None => self.cluster.as_slice(),
        }
    }

    /// Whether status probes are sent: they are for choosing between
    /// replicas, so never with one.
    pub fn probing(&self) -> bool {
        self.probe_ms > 0 && self.clusters().len() > 1
    }
}

/// Where the registry name of a call's service comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ServiceFrom {
    /// `/pkg.Service/Method` → `pkg.Service`.
    #[default]
    GrpcPath,
    /// The `:authority` (host), without any port.
    Authority,
    /// A request header set by something the operator trusts.
    Header(String),
}

/// How the pick reaches Envoy's ORIGINAL_DST cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HostOverride {
    /// The filter state `envoy.network.transport_socket.original_dst_address`:
    /// safe whatever the cluster says about headers.
    #[default]
    FilterState,
    /// The `x-envoy-original-dst-host` header, always overwritten: cheaper,
    /// and safe only with the cluster's `use_http_header: true` and this
    /// filter failing closed (it is never skipped).
    Header,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    #[serde(default)]
    pub service_from: ServiceFrom,
    /// From the name found in the call to the name in the registry (OpenIM
    /// registers `User` for its gRPC `openim.user.User` service).
    #[serde(default)]
    pub service_names: HashMap<String, String>,
    /// The gRPC status of the reply when a service has no endpoint.
    #[serde(default = "default_no_endpoint_status")]
    pub no_endpoint_status: u32,
    #[serde(default)]
    pub host_override: HostOverride,
    /// Passive outlier ejection; `null` turns it off.
    #[serde(default = "default_outlier")]
    pub outlier_detection: Option<OutlierConfig>,
    /// How often (ms) each worker checks for new tables even when it was
    /// not notified: a 16-byte read per tick rather than per call. The
    /// poller notifies every worker through a shared queue, so this is the
    /// catch-up for a notice missed (5 ms when the queue cannot be had).
    #[serde(default = "default_refresh_ms")]
    pub refresh_ms: u32,
    /// How long (ms) a call that comes before this worker has its first
    /// tables is held (paused) waiting for them, then routed; past it, the
    /// call is answered `UNAVAILABLE` saying the tables never arrived. 0
    /// answers such a call at once. Nothing is held once tables are in.
    #[serde(default = "default_hold_until_tables_ms")]
    pub hold_until_tables_ms: u32,
    /// This Envoy's zone: calls stay in it while it has capacity
    /// ([`ZoneRoutingConfig`]). Zone-blind when unset.
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub zone_routing: ZoneRoutingConfig,
    /// Ramps endpoints new to a service up to their weight; off when unset.
    #[serde(default)]
    pub slow_start: Option<SlowStartConfig>,
}

/// When the local zone keeps all calls (see `etcd_mesh_routing::balancer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZoneRoutingConfig {
    /// Endpoints taking calls the local zone needs, at least.
    pub min_endpoints: u32,
    /// The percent of the local zone's registered weight that must take
    /// calls; below it, calls spread over every zone by weight.
    pub min_healthy_percent: u32,
}

impl Default for ZoneRoutingConfig {
    fn default() -> Self {
        let routing = ZoneRouting::default();
        ZoneRoutingConfig {
            min_endpoints: u32::try_from(routing.min_endpoints).unwrap_or(1),
            min_healthy_percent: routing.min_healthy_percent,
        }
    }
}

/// Envoy's `slow_start_config`: `weight × max(min, (t / window)^(1 /
/// aggression))` over `window_ms` from when sync-server first saw the
/// endpoint serve (`serving_since_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowStartConfig {
    pub window_ms: u64,
    #[serde(default = "default_aggression")]
    pub aggression: f64,
    #[serde(default = "default_min_weight_percent")]
    pub min_weight_percent: u32,
}

// `aggression` is a float; configurations compare equal field by field.
impl Eq for SlowStartConfig {}

impl RouterConfig {
    /// What shapes the weights, for the routing core.
    pub fn policy(&self) -> Policy {
        Policy {
            local_zone: self.zone.clone(),
            zone_routing: ZoneRouting {
                min_endpoints: self.zone_routing.min_endpoints as usize,
                min_healthy_percent: self.zone_routing.min_healthy_percent,
            },
            slow_start: self.slow_start.map(|s| SlowStart {
                window_ms: s.window_ms,
                aggression: s.aggression,
                min_weight_percent: s.min_weight_percent,
            }),
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            service_from: ServiceFrom::default(),
            service_names: HashMap::new(),
            no_endpoint_status: default_no_endpoint_status(),
            host_override: HostOverride::default(),
            outlier_detection: default_outlier(),
            refresh_ms: default_refresh_ms(),
            hold_until_tables_ms: default_hold_until_tables_ms(),
            zone: None,
            zone_routing: ZoneRoutingConfig::default(),
            slow_start: None,
        }
    }
}

/// Passive outlier ejection, after Envoy's outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Failures in a row (connect failure, reset, `UNAVAILABLE`) that eject
    /// (a connect failure alone does with `eject_on_connect_failure`).
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times as long.
    pub base_ejection_ms: u64,
    /// The longest an ejection lasts.
    pub max_ejection_ms: u64,
    /// The most of a service's endpoints that may be out at once (at least
    /// one may always be, if the service has two or more).
    pub max_ejection_percent: u32,
    /// A connect failure (refused, or `connect_timeout` passed: Envoy's
    /// `UF`) ejects the endpoint at once, for every worker, instead of
    /// counting towards `consecutive_failures`; still within
    /// `max_ejection_percent`.
    #[serde(deserialize_with = "eject_on_connect_failure")]
    pub eject_on_connect_failure: bool,
    /// A connection lost under a call before any response (Envoy's `UC`:
    /// the backend died mid-call, or the HTTP/2 keepalive found it
    /// unreachable) ejects at once too. Off: a healthy backend can lose a
    /// connection, and then only counts.
    #[serde(deserialize_with = "eject_on_connection_loss")]
    pub eject_on_connection_loss: bool,
}

/// A boolean of `outlier_detection`, whose error names the field (serde's
/// own names the type only).
fn flag<'de, D: serde::Deserializer<'de>>(d: D, field: &str) -> Result<bool, D::Error> {
    use serde::de::Error;
    bool::deserialize(d).map_err(|e| {
        D::Error::custom(format!(
            "`outlier_detection.{field}` must be true or false: {e}"
        ))
    })
}

fn eject_on_connect_failure<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    flag(d, "eject_on_connect_failure")
}

fn eject_on_connection_loss<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    flag(d, "eject_on_connection_loss")
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 50,
            eject_on_connect_failure: true,
            eject_on_connection_loss: false,
        }
    }
}

fn default_authority() -> String {
    "sync-server".into()
}
fn default_wait_seconds() -> u32 {
    30
}
fn default_timeout_margin_ms() -> u32 {
    5_000
}
fn default_max_backoff_ms() -> u32 {
    5_000
}
fn default_probe_ms() -> u32 {
    2_000
}
fn default_probe_timeout_ms() -> u32 {
    1_000
}
fn default_no_endpoint_status() -> u32 {
    14
}
fn default_refresh_ms() -> u32 {
    100
}
fn default_hold_until_tables_ms() -> u32 {
    5_000
}
/// The longest `hold_until_tables_ms`: a call held longer is better failed.
pub const MAX_HOLD_UNTIL_TABLES_MS: u32 = 60_000;
fn default_aggression() -> f64 {
    1.0
}
fn default_min_weight_percent() -> u32 {
    10
}
fn default_outlier() -> Option<OutlierConfig> {
    Some(OutlierConfig::default())
}

impl PluginConfig {
    pub fn parse(bytes: &[u8]) -> Result<PluginConfig, String> {
        let config: PluginConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("invalid plugin configuration: {e}"))?;
        config
            .validate()
            .map_err(|e| format!("invalid plugin configuration: {e}"))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            PluginConfig::Poller(poller) => {
                match (&poller.cluster, &poller.clusters) {
                    (Some(_), Some(_)) => {
                        return Err("`cluster` and `clusters` are both set; use one".into())
                    }
                    (None, None) => {
                        return Err("`cluster` (or `clusters`, one per replica) is missing".into())
                    }
                    (Some(cluster), None) if cluster.is_empty() => {
                        return Err("`cluster` is empty".into())
                    }
                    (None, Some(clusters)) => {
                        if clusters.is_empty() {
                            return Err("`clusters` is empty".into());
                        }
                        if clusters.iter().any(String::is_empty) {
                            return Err("`clusters` has an empty name".into());
                        }
                        let mut seen = std::collections::HashSet::new();
                        if let Some(twice) = clusters.iter().find(|c| !seen.insert(c.as_str())) {
                            return Err(format!("`clusters` names {twice:?} twice"));
                        }
                    }
                    _ => {}
                }
                if poller.probe_ms > 0 && !(1..poller.probe_ms).contains(&poller.probe_timeout_ms) {
                    return Err(format!(
                        "`probe_timeout_ms` is {}, expected 1..{} (below `probe_ms`)",
                        poller.probe_timeout_ms, poller.probe_ms
                    ));
                }
                if !(1..=300).contains(&poller.wait_seconds) {
                    return Err(format!(
                        "`wait_seconds` is {}, expected 1..=300",
                        poller.wait_seconds
                    ));
                }
                if poller.max_backoff_ms < 100 {
                    return Err("`max_backoff_ms` is below 100".into());
                }
                if poller.bearer_token.as_deref().is_some_and(|t| {
                    t.is_empty() || t.bytes().any(|b| b.is_ascii_control() || b == b' ')
                }) {
                    return Err(
                        "`bearer_token` is empty or has spaces or control characters".into(),
                    );
                }
                if let Some(services) = &poller.services {
                    if services.is_empty() {
                        return Err("`services` is empty (leave it out to route to all)".into());
                    }
                    if let Some(bad) = services.iter().find(|n| n.is_empty() || n.contains(',')) {
                        return Err(format!(
                            "`services` has the name {bad:?}: empty or with a comma"
                        ));
                    }
                }
            }
            PluginConfig::Router(router) => {
                if let ServiceFrom::Header(name) = &router.service_from {
                    if name.is_empty()
                        || name.starts_with(':')
                        || name.to_ascii_lowercase() != *name
                    {
                        return Err(format!(
                            "`service_from.header` {name:?} must be a lower-case, non-pseudo header name"
                        ));
                    }
                }
                if !(1..=1000).contains(&router.refresh_ms) {
                    return Err(format!(
                        "`refresh_ms` is {}, expected 1..=1000",
                        router.refresh_ms
                    ));
                }
                if router.hold_until_tables_ms > MAX_HOLD_UNTIL_TABLES_MS {
                    return Err(format!(
                        "`hold_until_tables_ms` is {}, expected 0..={MAX_HOLD_UNTIL_TABLES_MS}",
                        router.hold_until_tables_ms
                    ));
                }
                if router.zone.as_deref().is_some_and(str::is_empty) {
                    return Err("`zone` is empty (leave it out to route zone-blind)".into());
                }
                if router.zone_routing.min_healthy_percent > 100 {
                    return Err(format!(
                        "`zone_routing.min_healthy_percent` is {}, expected 0..=100",
                        router.zone_routing.min_healthy_percent
                    ));
                }
                if let Some(ramp) = &router.slow_start {
                    if !(1..=3_600_000).contains(&ramp.window_ms) {
                        return Err(format!(
                            "`slow_start.window_ms` is {}, expected 1..=3600000",
                            ramp.window_ms
                        ));
                    }
                    if !(ramp.aggression.is_finite() && ramp.aggression > 0.0) {
                        return Err(format!(
                            "`slow_start.aggression` is {}, expected a number above 0",
                            ramp.aggression
                        ));
                    }
                    if ramp.min_weight_percent > 100 {
                        return Err(format!(
                            "`slow_start.min_weight_percent` is {}, expected 0..=100",
                            ramp.min_weight_percent
                        ));
                    }
                }
                if !(1..=16).contains(&router.no_endpoint_status) {
                    return Err(format!(
                        "`no_endpoint_status` is {}, expected a gRPC status 1..=16",
                        router.no_endpoint_status
                    ));
                }
                if let Some((from, _)) = router
                    .service_names
                    .iter()
                    .find(|(from, to)| from.is_empty() || to.is_empty())
                {
                    return Err(format!(
                        "`service_names` maps {from:?} to or from an empty name"
                    ));
                }
                if let Some(outlier) = &router.outlier_detection {
                    if outlier.consecutive_failures == 0 {
                        return Err("`outlier_detection.consecutive_failures` is 0".into());
                    }
                    if outlier.base_ejection_ms == 0
                        || outlier.max_ejection_ms < outlier.base_ejection_ms
                    {
                        return Err(
                            "`outlier_detection.base_ejection_ms` must be above 0 and at most `max_ejection_ms`"
                                .into(),
                        );
                    }
                    if outlier.max_ejection_percent > 100 {
                        return Err("`outlier_detection.max_ejection_percent` is above 100".into());
                    }
                    if outlier.eject_on_connection_loss && !outlier.eject_on_connect_failure {
                        return Err(
                            "`outlier_detection.eject_on_connection_loss` needs `eject_on_connect_failure`: a refused connect says more than a lost connection"
                                .into(),
                        );
                    }
                }
            }
            PluginConfig::Noop(noop) => {
                let needs_addr =
                    matches!(noop.call, NoopCall::FilterState | NoopCall::HeaderOverride);
                match (&noop.addr, needs_addr) {
                    (Some(addr), true) => {
                        etcd_mesh_wire::parse_addr(addr).map_err(|e| format!("`addr`: {e}"))?;
                    }
                    (None, true) => return Err("`call` needs `addr`".into()),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_roles_with_defaults() {
        let poller = PluginConfig::parse(br#"{"role":"poller","cluster":"sync"}"#);
        assert_eq!(
            poller,
            Ok(PluginConfig::Poller(PollerConfig {
                cluster: Some("sync".into()),
                clusters: None,
                authority: "sync-server".into(),
                wait_seconds: 30,
                timeout_margin_ms: 5_000,
                max_backoff_ms: 5_000,
                bearer_token: None,
                services: None,
                probe_ms: 2_000,
                probe_timeout_ms: 1_000,
            }))
        );
        assert_eq!(
            PluginConfig::parse(br#"{"role":"router"}"#),
            Ok(PluginConfig::Router(RouterConfig::default()))
        );
        assert_eq!(
            PluginConfig::parse(br#"{"role":"noop"}"#),
            Ok(PluginConfig::Noop(NoopConfig::default()))
        );
        assert_eq!(
            PluginConfig::parse(br#"{"role":"noop","call":"filter_state","addr":"127.0.0.1:1"}"#),
            Ok(PluginConfig::Noop(NoopConfig {
                call: NoopCall::FilterState,
                addr: Some("127.0.0.1:1".into())
            }))
        );
    }

    #[test]
    fn parses_one_cluster_per_replica() {
        let config = PluginConfig::parse(
            br#"{"role":"poller","clusters":["sync_0","sync_1"],"probe_ms":3000}"#,
        );
        let Ok(PluginConfig::Poller(poller)) = config else {
            panic!("{config:?}");
        };
        assert_eq!(poller.clusters(), ["sync_0", "sync_1"]);
        assert_eq!((poller.probe_ms, poller.probe_timeout_ms), (3_000, 1_000));
        assert!(poller.probing());
        let one = PluginConfig::parse(br#"{"role":"poller","cluster":"sync"}"#);
        let Ok(PluginConfig::Poller(one)) = one else {
            panic!("{one:?}");
        };
        assert_eq!(one.clusters(), ["sync"]);
        assert!(!one.probing(), "nothing to choose between");
        // Probing off: the timeout is not used, so not checked.
        let off = PluginConfig::parse(
            br#"{"role":"poller","clusters":["a","b"],"probe_ms":0,"probe_timeout_ms":0}"#,
        );
        let Ok(PluginConfig::Poller(off)) = off else {
            panic!("{off:?}");
        };
        assert!(!off.probing());
    }

    #[test]
    fn parses_every_router_field() {
        let config = PluginConfig::parse(
            br#"{"role":"router","service_from":{"header":"x-service"},
                 "service_names":{"openim.user.User":"User"},"no_endpoint_status":5,
                 "host_override":"header",
                 "outlier_detection":{"consecutive_failures":3,"base_ejection_ms":1000}}"#,
        );
        let Ok(PluginConfig::Router(router)) = config else {
            panic!("{config:?}");
        };
        assert_eq!(router.service_from, ServiceFrom::Header("x-service".into()));
        assert_eq!(router.service_names["openim.user.User"], "User");
        assert_eq!(router.no_endpoint_status, 5);
        assert_eq!(router.host_override, HostOverride::Header);
        assert_eq!(router.hold_until_tables_ms, 5_000, "held 5 s by default");
        let off = PluginConfig::parse(br#"{"role":"router","hold_until_tables_ms":0}"#);
        assert!(matches!(
            off,
            Ok(PluginConfig::Router(RouterConfig {
                hold_until_tables_ms: 0,
                ..
            }))
        ));
        let outlier = router.outlier_detection.expect("on");
        assert_eq!(
            (outlier.consecutive_failures, outlier.base_ejection_ms),
            (3, 1000)
        );
        assert_eq!(outlier.max_ejection_percent, 50);
        assert!(outlier.eject_on_connect_failure, "on by default");
        assert!(!outlier.eject_on_connection_loss, "off by default");
        let counted = PluginConfig::parse(
            br#"{"role":"router","outlier_detection":{"eject_on_connect_failure":false}}"#,
        );
        let Ok(PluginConfig::Router(counted)) = counted else {
            panic!("{counted:?}");
        };
        assert_eq!(
            counted.outlier_detection,
            Some(OutlierConfig {
                eject_on_connect_failure: false,
                ..OutlierConfig::default()
            })
        );
        let lost = PluginConfig::parse(
            br#"{"role":"router","outlier_detection":{"eject_on_connection_loss":true}}"#,
        );
        let Ok(PluginConfig::Router(lost)) = lost else {
            panic!("{lost:?}");
        };
        assert_eq!(
            lost.outlier_detection,
            Some(OutlierConfig {
                eject_on_connection_loss: true,
                ..OutlierConfig::default()
            })
        );
        let shaped = PluginConfig::parse(
            br#"{"role":"router","zone":"eu-1","zone_routing":{"min_endpoints":2},
                 "slow_start":{"window_ms":30000,"aggression":2}}"#,
        );
        let Ok(PluginConfig::Router(shaped)) = shaped else {
            panic!("{shaped:?}");
        };
        let policy = shaped.policy();
        assert_eq!(policy.local_zone.as_deref(), Some("eu-1"));
        assert_eq!(policy.zone_routing.min_endpoints, 2);
        assert_eq!(policy.zone_routing.min_healthy_percent, 50);
        let ramp = policy.slow_start.expect("on");
        assert_eq!(
            (ramp.window_ms, ramp.aggression, ramp.min_weight_percent),
            (30_000, 2.0, 10)
        );
        assert_eq!(RouterConfig::default().policy(), Policy::default());
        let off = PluginConfig::parse(
            br#"{"role":"router","outlier_detection":null,"service_from":"authority"}"#,
        );
        assert!(matches!(
            off,
            Ok(PluginConfig::Router(RouterConfig {
                outlier_detection: None,
                service_from: ServiceFrom::Authority,
                ..
            }))
        ));
    }

    #[test]
    fn errors_name_the_field() {
        for (config, field) in [
            (&br#"{"role":"poller"}"#[..], "cluster"),
            (br#"{"role":"poller","cluster":"s","wait_secs":3}"#, "wait_secs"),
            (br#"{"role":"poller","cluster":"s","wait_seconds":0}"#, "wait_seconds"),
            (br#"{"role":"poller","cluster":"s","wait_seconds":"x"}"#, "invalid type"),
            (br#"{"role":"poller","cluster":""}"#, "cluster"),
            (br#"{"role":"poller","cluster":"s","bearer_token":"a b"}"#, "bearer_token"),
            (br#"{"role":"poller","cluster":"s","services":[]}"#, "services"),
            (br#"{"role":"router","refresh_ms":0}"#, "refresh_ms"),
            (br#"{"role":"router","zone":""}"#, "zone"),
            (br#"{"role":"router","hold_until_tables_ms":60001}"#, "hold_until_tables_ms"),
            (br#"{"role":"router","hold_until_tables_ms":-1}"#, "invalid value"),
            (br#"{"role":"router","zone_routing":{"min_healthy_percent":101}}"#, "min_healthy_percent"),
            (br#"{"role":"router","zone_routing":{"min_hosts":1}}"#, "min_hosts"),
            (br#"{"role":"router","slow_start":{}}"#, "window_ms"),
            (br#"{"role":"router","slow_start":{"window_ms":0}}"#, "window_ms"),
            (br#"{"role":"router","slow_start":{"window_ms":10,"aggression":0}}"#, "aggression"),
            (br#"{"role":"router","slow_start":{"window_ms":10,"min_weight_percent":200}}"#, "min_weight_percent"),
            (br#"{"role":"noop","call":"filter_state"}"#, "needs `addr`"),
            (br#"{"role":"noop","call":"header_override","addr":"x"}"#, "addr"),
            (br#"{"role":"noop","call":"dance"}"#, "unknown variant"),
            (br#"{"role":"poller","cluster":"s","services":["a,b"]}"#, "comma"),
            (br#"{"role":"poller","cluster":"s","clusters":["t"]}"#, "both"),
            (br#"{"role":"poller","clusters":[]}"#, "`clusters` is empty"),
            (br#"{"role":"poller","clusters":["a",""]}"#, "`clusters` has an empty name"),
            (br#"{"role":"poller","clusters":["a","b","a"]}"#, "`clusters` names \"a\" twice"),
            (br#"{"role":"poller","clusters":"a"}"#, "invalid type"),
            (br#"{"role":"poller","cluster":"s","probe_timeout_ms":0}"#, "probe_timeout_ms"),
            (br#"{"role":"poller","cluster":"s","probe_ms":500}"#, "probe_timeout_ms"),
            (br#"{"role":"poller","cluster":"s","probe_ms":1000,"probe_timeout_ms":1000}"#, "probe_timeout_ms"),
            (br#"{"role":"poller","cluster":"s","probe_ms":-1}"#, "invalid value"),
            (br#"{"role":"pollster"}"#, "pollster"),
            (br#"{"cluster":"s"}"#, "role"),
            (br#"{"role":"router","extra":1}"#, "extra"),
            (br#"{"role":"router","service_from":"path"}"#, "path"),
            (br#"{"role":"router","service_from":{"header":":path"}}"#, "service_from.header"),
            (br#"{"role":"router","service_from":{"header":"X-Svc"}}"#, "service_from.header"),
            (br#"{"role":"router","no_endpoint_status":0}"#, "no_endpoint_status"),
            (br#"{"role":"router","no_endpoint_status":17}"#, "no_endpoint_status"),
            (br#"{"role":"router","service_names":{"a":""}}"#, "service_names"),
            (br#"{"role":"router","host_override":"dns"}"#, "dns"),
            (br#"{"role":"router","outlier_detection":{"consecutive_failures":0}}"#, "consecutive_failures"),
            (br#"{"role":"router","outlier_detection":{"base_ejection_ms":10,"max_ejection_ms":5}}"#, "base_ejection_ms"),
            (br#"{"role":"router","outlier_detection":{"max_ejection_percent":101}}"#, "max_ejection_percent"),
            (br#"{"role":"router","outlier_detection":{"interval":1}}"#, "interval"),
            (br#"{"role":"router","outlier_detection":{"eject_on_connect_failure":"yes"}}"#, "eject_on_connect_failure"),
            (br#"{"role":"router","outlier_detection":{"eject_on_connect_failure":1}}"#, "eject_on_connect_failure"),
            (br#"{"role":"router","outlier_detection":{"eject_on_connect_failure":null}}"#, "eject_on_connect_failure"),
            (br#"{"role":"router","outlier_detection":{"eject_on_connect_failures":true}}"#, "eject_on_connect_failures"),
            (br#"{"role":"router","outlier_detection":{"eject_on_connection_loss":"no"}}"#, "eject_on_connection_loss"),
            (br#"{"role":"router","outlier_detection":{"eject_on_connection_loss":true,"eject_on_connect_failure":false}}"#, "eject_on_connection_loss"),
            (b"", "EOF"),
        ] {
            let err = PluginConfig::parse(config).expect_err("must be refused");
            assert!(err.contains(field), "{err} should name {field}");
        }
    }
}
