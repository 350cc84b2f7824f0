//! The instance to register: its service, address, weight, metadata and
//! lease TTL ([`Instance`]), how they are checked ([`Instance::validate`]),
//! and the key and value they are written as ([`KeyFormat`]): etcd's gRPC
//! naming (`<prefix><service>/<addr>`,
//! `{"Op":0,"Addr":..,"Metadata":{"weight":..}}`) or the older openim-v2
//! form (`<schema>:///<service>/<addr>` → `addr`). Pure: no etcd, no task.

use etcd_mesh_wire::{parse_addr, MAX_WEIGHT};
use std::collections::BTreeMap;
use std::time::Duration;

/// How the key and value are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFormat {
    /// `<prefix><service>/<addr>` with a JSON value.
    EtcdNaming { prefix: String },
    /// `<schema>:///<service>/<addr>` with the bare address (weight is lost).
    OpenimV2 { schema: String },
}

/// One instance to keep registered.
#[derive(Debug, Clone)]
pub struct Instance {
    pub service: String,
    /// `ip:port` where the instance serves.
    pub addr: String,
    pub weight: u32,
    /// Extra metadata (zone, version, ...), written beside the weight.
    pub metadata: BTreeMap<String, serde_json::Value>,
    pub format: KeyFormat,
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("service name is empty or contains '/'")]
    Service,
    #[error("{0}")]
    Addr(String),
    #[error("weight {0} is above {MAX_WEIGHT}")]
    Weight(u32),
    #[error("ttl must be at least 2 s")]
    Ttl,
    #[error("no etcd endpoints")]
    NoEndpoints,
}

impl Instance {
    /// An etcd-naming registration with weight 1 and a 10 s lease.
    pub fn new(prefix: &str, service: &str, addr: &str) -> Instance {
        Instance {
            service: service.to_owned(),
            addr: addr.to_owned(),
            weight: 1,
            metadata: BTreeMap::new(),
            format: KeyFormat::EtcdNaming {
                prefix: prefix.to_owned(),
            },
            ttl: Duration::from_secs(10),
        }
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The zone the instance runs in (`Metadata.zone`): an Envoy in the
    /// same zone keeps its calls there while the zone has capacity.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.metadata
            .insert("zone".into(), serde_json::Value::String(zone.into()));
        self
    }

    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn validate(&self) -> Result<(), InstanceError> {
        if self.service.is_empty() || self.service.contains('/') {
            return Err(InstanceError::Service);
        }
        parse_addr(&self.addr).map_err(InstanceError::Addr)?;
        if self.weight > MAX_WEIGHT {
            return Err(InstanceError::Weight(self.weight));
        }
        if self.ttl < Duration::from_secs(2) {
            return Err(InstanceError::Ttl);
        }
        Ok(())
    }

    pub fn key(&self) -> String {
        match &self.format {
            KeyFormat::EtcdNaming { prefix } => format!("{prefix}{}/{}", self.service, self.addr),
            KeyFormat::OpenimV2 { schema } => format!("{schema}:///{}/{}", self.service, self.addr),
        }
    }

    pub fn value(&self) -> String {
        match &self.format {
            KeyFormat::EtcdNaming { .. } => {
                let mut metadata: serde_json::Map<String, serde_json::Value> =
                    self.metadata.clone().into_iter().collect();
                metadata.insert("weight".into(), self.weight.into());
                serde_json::json!({"Op": 0, "Addr": self.addr, "Metadata": metadata}).to_string()
            }
            KeyFormat::OpenimV2 { .. } => self.addr.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_both_formats() {
        let mut instance = Instance::new("svc/", "demo.Echo", "127.0.0.1:5000").with_weight(3);
        instance.metadata.insert("zone".into(), "a".into());
        assert_eq!(instance.key(), "svc/demo.Echo/127.0.0.1:5000");
        let value: serde_json::Value = serde_json::from_str(&instance.value()).expect("json");
        assert_eq!(value["Addr"], "127.0.0.1:5000");
        assert_eq!(value["Metadata"]["weight"], 3);
        assert_eq!(value["Metadata"]["zone"], "a");
        instance.format = KeyFormat::OpenimV2 {
            schema: "openim".into(),
        };
        assert_eq!(instance.key(), "openim:///demo.Echo/127.0.0.1:5000");
        assert_eq!(instance.value(), "127.0.0.1:5000");
    }

    #[test]
    fn refuses_bad_instances() {
        let good = Instance::new("p/", "s", "127.0.0.1:1");
        assert!(good.validate().is_ok());
        assert!(Instance::new("p/", "", "127.0.0.1:1").validate().is_err());
        assert!(Instance::new("p/", "a/b", "127.0.0.1:1")
            .validate()
            .is_err());
        assert!(Instance::new("p/", "s", "host:1").validate().is_err());
        assert!(good.clone().with_weight(10_001).validate().is_err());
        assert!(good.with_ttl(Duration::from_secs(1)).validate().is_err());
    }
}
