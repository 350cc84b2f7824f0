//! What the page draws, computed from the held [`Tables`]: services (with
//! a filter), their endpoints' shares, the rejections, the change log, and
//! the pick preview of one service made by the routing core, so the strip
//! the page shows is what the plugin's picker does.

use crate::state::{LogEntry, Tables};
use etcd_mesh_routing::{preview_picks, Policy};
use etcd_mesh_wire::Service;
use serde::Serialize;

/// The most picks a preview shows: `2 × sum(weights)` can reach millions.
pub const MAX_PICKS: usize = 1000;

#[derive(Debug, Serialize)]
pub struct View<'a> {
    pub revision: u64,
    pub health_seq: u64,
    pub epoch: &'a str,
    pub stale: bool,
    /// Services held in all, before the filter.
    pub total_services: usize,
    pub services: Vec<ServiceView<'a>>,
    pub rejected: Vec<RejectedView<'a>>,
    pub log: Vec<&'a LogEntry>,
}

#[derive(Debug, Serialize)]
pub struct ServiceView<'a> {
    pub name: &'a str,
    pub total_weight: u64,
    pub endpoints: Vec<EndpointView<'a>>,
}

#[derive(Debug, Serialize)]
pub struct EndpointView<'a> {
    /// `a` for the first endpoint listed, `b` for the second, ...
    pub letter: String,
    pub addr: &'a str,
    pub weight: u32,
    /// Percent of the service's registered weight.
    pub share: f64,
    /// `healthy`, `unhealthy`, `not_serving`, or `unchecked`.
    pub health: &'static str,
    pub zone: Option<&'a str>,
    pub draining: bool,
    /// The metadata as `key=value` (JSON values other than strings as JSON).
    pub metadata: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RejectedView<'a> {
    pub key: &'a str,
    pub reason: &'a str,
}

/// The letter of the endpoint at `index`: a..z, then aa, ab, ...
pub fn letter(index: usize) -> String {
    let mut n = index;
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// The view of the tables, keeping services whose name contains `filter`
/// (case-insensitive) or whose endpoint address does.
pub fn view<'a>(tables: &'a Tables, filter: &str) -> View<'a> {
    let filter = filter.trim().to_lowercase();
    let services = tables
        .services
        .iter()
        .filter(|(name, service)| {
            filter.is_empty()
                || name.to_lowercase().contains(&filter)
                || service.endpoints.iter().any(|e| e.addr.contains(&filter))
        })
        .map(|(name, service)| service_view(name, service))
        .collect();
    View {
        revision: tables.position().revision,
        health_seq: tables.position().health_seq,
        epoch: tables.epoch(),
        stale: tables.stale,
        total_services: tables.services.len(),
        services,
        rejected: tables
            .rejected
            .iter()
            .map(|(key, reason)| RejectedView { key, reason })
            .collect(),
        log: tables.log.iter().collect(),
    }
}

fn service_view<'a>(name: &'a str, service: &'a Service) -> ServiceView<'a> {
    let total: u64 = service.endpoints.iter().map(|e| u64::from(e.weight)).sum();
    let endpoints = service
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| EndpointView {
            letter: letter(i),
            addr: &e.addr,
            weight: e.weight,
            share: if total == 0 {
                0.0
            } else {
                f64::from(e.weight) * 100.0 / total as f64
            },
            health: e.health.map_or("unchecked", |h| h.name()),
            zone: e.zone(),
            draining: e.weight == 0,
            metadata: e
                .metadata
                .iter()
                .map(|(k, v)| match v.as_str() {
                    Some(s) => format!("{k}={s}"),
                    None => format!("{k}={v}"),
                })
                .collect(),
        })
        .collect();
    ServiceView {
        name,
        total_weight: total,
        endpoints,
    }
}

/// The pick preview of one service.
#[derive(Debug, Serialize, PartialEq)]
pub struct Picks {
    /// `2 × sum(weights)`, what the preview covers when not capped.
    pub wanted: u64,
    /// The letters of the next picks, in order (at most [`MAX_PICKS`]).
    pub letters: Vec<String>,
}

/// The next `2 × sum(weights)` picks of `name` as the plugin's picker makes
/// them from an unshuffled start, as letters; `None` for an unknown service.
pub fn picks(tables: &Tables, name: &str, now_ms: u64) -> Option<Picks> {
    let service = tables.services.get(name)?;
    let wanted: u64 = 2 * service
        .endpoints
        .iter()
        .map(|e| u64::from(e.weight))
        .sum::<u64>();
    let count = usize::try_from(wanted).unwrap_or(MAX_PICKS).min(MAX_PICKS);
    let letters = preview_picks(service, &Policy::default(), now_ms, count)
        .iter()
        .map(|addr| {
            service
                .endpoints
                .iter()
                .position(|e| &e.addr == addr)
                .map_or_else(|| "?".to_owned(), letter)
        })
        .collect();
    Some(Picks { wanted, letters })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::{Changes, Digest, Endpoint};

    fn tables_with(weights: &[u32]) -> Tables {
        let mut endpoints: Vec<Endpoint> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Endpoint::new(format!("127.0.0.1:{}", 1000 + i), *w))
            .collect();
        endpoints[0]
            .metadata
            .insert("zone".into(), serde_json::json!("eu-1"));
        let service = Service { endpoints };
        let mut digest = Digest::default();
        digest.add(Digest::of("demo.Echo", &service));
        let changes = Changes {
            revision: 5,
            epoch: "e".into(),
            full: true,
            services: [("demo.Echo".to_string(), service)].into(),
            digest: digest.value(),
            ..Changes::default()
        };
        let mut tables = Tables::new();
        tables.apply_body(&changes.encode()).expect("valid");
        tables
    }

    #[test]
    fn letters_follow_the_listed_order() {
        assert_eq!(letter(0), "a");
        assert_eq!(letter(2), "c");
        assert_eq!(letter(25), "z");
        assert_eq!(letter(26), "aa");
        assert_eq!(letter(27), "ab");
        assert_eq!(letter(26 * 27), "aaa");
    }

    #[test]
    fn weights_5_1_1_pick_as_the_plugin_does() {
        let tables = tables_with(&[5, 1, 1]);
        let picks = picks(&tables, "demo.Echo", 0).expect("known");
        assert_eq!(picks.wanted, 14);
        assert_eq!(
            picks.letters.join(" "),
            "a a b a c a a a a b a c a a",
            "two rounds of nginx's smooth weighted round-robin"
        );
        assert!(super::picks(&tables, "nope", 0).is_none());
    }

    #[test]
    fn an_endpoint_failing_its_health_checks_takes_no_picks() {
        let mut tables = tables_with(&[5, 1, 1]);
        let service = tables.services.get_mut("demo.Echo").expect("held");
        service.endpoints[2].health = Some(etcd_mesh_wire::Health::Unhealthy);
        let picks = picks(&tables, "demo.Echo", 0).expect("known");
        assert!(
            !picks.letters.iter().any(|l| l == "c"),
            "{:?}",
            picks.letters
        );
        assert_eq!(
            view(&tables, "").services[0].endpoints[2].health,
            "unhealthy"
        );
    }

    #[test]
    fn caps_a_long_preview_and_shows_no_picks_when_all_drain() {
        let tables = tables_with(&[10_000, 10_000]);
        let picks = picks(&tables, "demo.Echo", 0).expect("known");
        assert_eq!(picks.wanted, 40_000);
        assert_eq!(picks.letters.len(), MAX_PICKS);
        let drained = tables_with(&[0, 0]);
        assert!(super::picks(&drained, "demo.Echo", 0)
            .expect("known")
            .letters
            .is_empty());
    }

    #[test]
    fn shows_shares_zones_draining_and_filters() {
        let tables = tables_with(&[3, 1, 0]);
        let view = view(&tables, "");
        let endpoints = &view.services[0].endpoints;
        assert_eq!(endpoints[0].share, 75.0);
        assert_eq!(endpoints[0].zone, Some("eu-1"));
        assert_eq!(endpoints[0].metadata, ["zone=eu-1"]);
        assert_eq!(endpoints[0].health, "unchecked");
        assert!(endpoints[2].draining);
        assert_eq!(super::view(&tables, "ECHO").services.len(), 1);
        assert_eq!(super::view(&tables, "127.0.0.1:1001").services.len(), 1);
        let none = super::view(&tables, "other");
        assert!(none.services.is_empty());
        assert_eq!(none.total_services, 1);
    }
}
