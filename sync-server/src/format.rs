//! The registration formats sync-server understands, as pure parsing.
//!
//! | format        | key                               | value                                  |
//! |---------------|-----------------------------------|----------------------------------------|
//! | `etcd-naming` | `<prefix><service>/<anything>`    | `{"Op":0,"Addr":"ip:port","Metadata":{..}}` |
//! | `openim-v2`   | `<schema>:///<service>/<ip:port>` | `ip:port`                              |
//!
//! A key or value that cannot be understood is an `Err` with the reason; the
//! caller lists it under `rejected`, it is never fatal.

use etcd_mesh_wire::{parse_addr, Endpoint, DEFAULT_WEIGHT, MAX_WEIGHT};
use serde::Deserialize;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// etcd's official gRPC naming (`client/v3/naming/endpoints`), OpenIM v3.7+.
    EtcdNaming,
    /// The seed's `RegisterEtcd`: the value is the bare address, weight 1.
    OpenimV2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::EtcdNaming => "etcd-naming",
            Format::OpenimV2 => "openim-v2",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "etcd-naming" => Ok(Format::EtcdNaming),
            "openim-v2" => Ok(Format::OpenimV2),
            other => Err(format!(
                "unknown format {other:?}; expected etcd-naming or openim-v2"
            )),
        }
    }
}

/// One watched prefix and how to read the registrations under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    pub format: Format,
    pub prefix: String,
    /// The zone of registrations that name none (openim-v2 values cannot).
    pub zone: Option<String>,
    /// Whether sync-server's health checks (when on) check what is read
    /// here; `health=off` leaves these endpoints unchecked.
    pub health_checks: bool,
}

impl FromStr for WatchSpec {
    type Err = String;
    /// `<format>=<prefix>[,zone=<zone>][,health=on|off]`, as given to
    /// `--watch` (so a prefix cannot hold a comma).
    fn from_str(s: &str) -> Result<Self, String> {
        let (format, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not <format>=<prefix>"))?;
        let mut parts = rest.split(',');
        let prefix = parts.next().unwrap_or_default();
        if prefix.is_empty() {
            return Err(format!("{s:?} has an empty prefix"));
        }
        let mut spec = WatchSpec {
            format: format.parse()?,
            prefix: prefix.to_owned(),
            zone: None,
            health_checks: true,
        };
        for option in parts {
            match option.split_once('=') {
                Some(("zone", "")) => return Err(format!("{s:?} has an empty zone")),
                Some(("zone", zone)) => spec.zone = Some(zone.to_owned()),
                Some(("health", "on")) => spec.health_checks = true,
                Some(("health", "off")) => spec.health_checks = false,
                _ => {
                    return Err(format!(
                        "{s:?}: unknown option {option:?} (zone=<zone> or health=on|off)"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

/// A registration that was understood.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub service: String,
    pub endpoint: Endpoint,
}

/// Parses one key/value under `spec.prefix`.
pub fn parse(spec: &WatchSpec, key: &[u8], value: &[u8]) -> Result<Registration, String> {
    let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_owned())?;
    let rest = key
        .strip_prefix(spec.prefix.as_str())
        .ok_or_else(|| format!("key is not under prefix {:?}", spec.prefix))?;
    let (service, _instance) = rest
        .rsplit_once('/')
        .ok_or_else(|| "key has no /<instance> after the service name".to_owned())?;
    if service.is_empty() {
        return Err("key has an empty service name".into());
    }
    let mut endpoint = match spec.format {
        Format::EtcdNaming => parse_naming_value(value)?,
        Format::OpenimV2 => {
            let addr = std::str::from_utf8(value).map_err(|_| "value is not UTF-8".to_owned())?;
            parse_addr(addr)?;
            Endpoint::new(addr, DEFAULT_WEIGHT)
        }
    };
    if let Some(zone) = &spec.zone {
        endpoint
            .metadata
            .entry(etcd_mesh_wire::ZONE_KEY.to_owned())
            .or_insert_with(|| zone.as_str().into());
    }
    Ok(Registration {
        service: service.to_owned(),
        endpoint,
    })
}

/// The value etcd's naming package writes (`Op` was dropped by newer
/// versions, so it is optional).
#[derive(Deserialize)]
struct NamingValue {
    #[serde(rename = "Op", default)]
    op: u8,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata", default)]
    metadata: serde_json::Value,
}

fn parse_naming_value(value: &[u8]) -> Result<Endpoint, String> {
    let value: NamingValue =
        serde_json::from_slice(value).map_err(|e| format!("value is not etcd-naming JSON: {e}"))?;
    if value.op != 0 {
        return Err(format!(
            "value has Op {} (only 0, add, registers)",
            value.op
        ));
    }
    parse_addr(&value.addr)?;
    let mut metadata = match value.metadata {
        serde_json::Value::Null => serde_json::Map::new(),
        serde_json::Value::Object(map) => map,
        other => return Err(format!("Metadata is not an object: {other}")),
    };
    let weight = match metadata.remove("weight") {
        None => DEFAULT_WEIGHT,
        Some(weight) => parse_weight(&weight)?,
    };
    let mut endpoint = Endpoint::new(value.addr, weight);
    endpoint.metadata = metadata.into_iter().collect();
    Ok(endpoint)
}

/// A weight is an integer 0..=MAX_WEIGHT, as a JSON number or a string of
/// digits (Go services often keep metadata as `map[string]string`).
fn parse_weight(weight: &serde_json::Value) -> Result<u32, String> {
    let parsed = match weight {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    match parsed {
        Some(w) if w <= u64::from(MAX_WEIGHT) => Ok(w as u32),
        _ => Err(format!(
            "Metadata.weight {weight} is not an integer in 0..={MAX_WEIGHT}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naming() -> WatchSpec {
        "etcd-naming=services/".parse().expect("valid spec")
    }

    fn openim() -> WatchSpec {
        "openim-v2=openim:///".parse().expect("valid spec")
    }

    #[test]
    fn a_watch_may_name_the_zone_of_what_it_reads() {
        let spec: WatchSpec = "openim-v2=openim:///,zone=eu-1".parse().expect("spec");
        assert_eq!(
            (spec.prefix.as_str(), spec.zone.as_deref()),
            ("openim:///", Some("eu-1"))
        );
        let r = parse(&spec, b"openim:///user/127.0.0.1:5", b"127.0.0.1:5").expect("valid");
        assert_eq!(r.endpoint.zone(), Some("eu-1"));
        let naming: WatchSpec = "etcd-naming=svc/,zone=eu-1".parse().expect("spec");
        let own = br#"{"Op":0,"Addr":"127.0.0.1:5","Metadata":{"zone":"eu-2"}}"#;
        let r = parse(&naming, b"svc/user/a", own).expect("valid");
        assert_eq!(
            r.endpoint.zone(),
            Some("eu-2"),
            "the registration's own zone wins"
        );
        assert!("openim-v2=openim:///,zone=".parse::<WatchSpec>().is_err());
        let unchecked: WatchSpec = "etcd-naming=svc/,health=off,zone=a".parse().expect("spec");
        assert!(!unchecked.health_checks && unchecked.zone.as_deref() == Some("a"));
        assert!(naming.health_checks, "checked unless told");
        assert!("etcd-naming=svc/,colour=red".parse::<WatchSpec>().is_err());
    }

    #[test]
    fn parses_watch_specs() {
        assert_eq!(naming().format, Format::EtcdNaming);
        assert_eq!(openim().prefix, "openim:///");
        assert!("nope=x/".parse::<WatchSpec>().is_err());
        assert!("etcd-naming=".parse::<WatchSpec>().is_err());
        assert!("etcd-naming".parse::<WatchSpec>().is_err());
    }

    #[test]
    fn parses_etcd_naming() {
        let r = parse(
            &naming(),
            b"services/demo.Echo/127.0.0.1:5000",
            br#"{"Op":0,"Addr":"127.0.0.1:5000","Metadata":{"weight":3,"zone":"a"}}"#,
        )
        .expect("valid");
        assert_eq!(r.service, "demo.Echo");
        assert_eq!(r.endpoint.addr, "127.0.0.1:5000");
        assert_eq!(r.endpoint.weight, 3);
        assert_eq!(r.endpoint.metadata["zone"], "a");
        assert!(!r.endpoint.metadata.contains_key("weight"));

        let plain = parse(&naming(), b"services/a/b/x", br#"{"Addr":"[::1]:80"}"#).expect("valid");
        assert_eq!((plain.service.as_str(), plain.endpoint.weight), ("a/b", 1));
        let string_weight = parse(
            &naming(),
            b"services/s/x",
            br#"{"Addr":"10.0.0.1:1","Metadata":{"weight":"0"}}"#,
        )
        .expect("valid");
        assert_eq!(string_weight.endpoint.weight, 0);
    }

    #[test]
    fn parses_openim_v2() {
        let r = parse(
            &openim(),
            b"openim:///User/10.0.0.2:10110",
            b"10.0.0.2:10110",
        )
        .expect("valid");
        assert_eq!((r.service.as_str(), r.endpoint.weight), ("User", 1));
    }

    #[test]
    fn rejects_with_a_reason() {
        let cases: &[(&WatchSpec, &[u8], &[u8], &str)] = &[
            (
                &naming(),
                b"services/s/x",
                b"not json",
                "not etcd-naming JSON",
            ),
            (
                &naming(),
                b"services/s/x",
                br#"{"Addr":"host:80"}"#,
                "not ip:port",
            ),
            (
                &naming(),
                b"services/s/x",
                br#"{"Addr":"1.2.3.4:0"}"#,
                "port 0",
            ),
            (
                &naming(),
                b"services/s/x",
                br#"{"Op":1,"Addr":"1.2.3.4:5"}"#,
                "Op 1",
            ),
            (
                &naming(),
                b"services/s/x",
                br#"{"Addr":"1.2.3.4:5","Metadata":{"weight":10001}}"#,
                "weight",
            ),
            (
                &naming(),
                b"services/s/x",
                br#"{"Addr":"1.2.3.4:5","Metadata":{"weight":-1}}"#,
                "weight",
            ),
            (
                &naming(),
                b"services/s/x",
                br#"{"Addr":"1.2.3.4:5","Metadata":{"weight":1.5}}"#,
                "weight",
            ),
            (
                &naming(),
                b"services/s/x",
                br#"{"Addr":"1.2.3.4:5","Metadata":{"weight":"heavy"}}"#,
                "weight",
            ),
            (
                &naming(),
                b"services/s/x",
                br#"{"Addr":"1.2.3.4:5","Metadata":"w=1"}"#,
                "not an object",
            ),
            (&naming(), b"services/s/x", br#"{"Metadata":{}}"#, "Addr"),
            (
                &naming(),
                b"services/noslash",
                br#"{"Addr":"1.2.3.4:5"}"#,
                "no /<instance>",
            ),
            (
                &naming(),
                b"services//x",
                br#"{"Addr":"1.2.3.4:5"}"#,
                "empty service",
            ),
            (
                &naming(),
                b"services/\xff/x",
                br#"{"Addr":"1.2.3.4:5"}"#,
                "UTF-8",
            ),
            (
                &naming(),
                b"other/s/x",
                br#"{"Addr":"1.2.3.4:5"}"#,
                "not under prefix",
            ),
            (
                &openim(),
                b"openim:///User/x",
                b"localhost:80",
                "not ip:port",
            ),
            (&openim(), b"openim:///User/x", b"\xff", "UTF-8"),
        ];
        for (spec, key, value, reason) in cases {
            let err = parse(spec, key, value).expect_err(&String::from_utf8_lossy(value));
            assert!(err.contains(reason), "{err:?} should say {reason:?}");
        }
    }
}
