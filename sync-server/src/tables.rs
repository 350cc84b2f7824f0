//! The built tables: every service as served and every rejected key, at
//! one revision, with their digest and endpoint count kept up to date.
//!
//! [`Tables`] are what the registry builds and the publisher serves. They
//! are persistent maps: a published copy costs O(1), and each service is
//! encoded and hashed once, when it changes ([`BuiltService`]). A
//! [`Commit`] names what one change of the tables changed, for the change
//! history. Nothing here parses registrations ([`crate::registry`] does)
//! or does I/O.

use etcd_mesh_wire::{Digest, Service};
use serde_json::value::RawValue;
use std::sync::Arc;

/// One service as served: decoded, encoded once, and hashed once.
#[derive(Debug)]
pub struct BuiltService {
    pub service: Service,
    /// The canonical JSON of `service` ([`Service::encode`]).
    pub json: Box<RawValue>,
    /// Its contribution to the tables' [`Digest`].
    pub digest: u64,
}

impl BuiltService {
    pub fn new(name: &str, service: Service) -> Self {
        // Serialized straight into a raw value, as [`Service::encode`]
        // does: not parsed again (a start builds every service once).
        let json = serde_json::value::to_raw_value(&service)
            .unwrap_or_else(|_| RawValue::from_string("{}".into()).unwrap_or_default());
        let digest = Digest::of_encoded(name, json.get().as_bytes());
        BuiltService {
            service,
            json,
            digest,
        }
    }
}

/// Services by name. Cloning one is O(1).
pub type Services = imbl::OrdMap<Arc<str>, Arc<BuiltService>>;
/// Rejection reasons by key. Cloning one is O(1).
pub type Rejections = imbl::OrdMap<Arc<str>, Arc<str>>;

/// The built tables at one revision.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub services: Services,
    pub rejected: Rejections,
    pub digest: Digest,
    pub endpoints: usize,
}

impl Tables {
    /// Tables holding `snapshot`'s content (a snapshot file, a test).
    pub fn from_snapshot(snapshot: &etcd_mesh_wire::Snapshot) -> Self {
        let mut tables = Tables::default();
        for (name, service) in &snapshot.services {
            tables.set_service(name, Some(service.clone()));
        }
        for rejected in &snapshot.rejected {
            tables.rejected.insert(
                rejected.key.as_str().into(),
                rejected.reason.as_str().into(),
            );
        }
        tables
    }

    /// Whether `service` as served lists `addr` (endpoints are sorted by
    /// address).
    pub fn lists(&self, service: &str, addr: &str) -> bool {
        self.services.get(service).is_some_and(|built| {
            built
                .service
                .endpoints
                .binary_search_by(|e| e.addr.as_str().cmp(addr))
                .is_ok()
        })
    }

    /// Puts (or with `None` removes) a service; false if nothing changed.
    pub(crate) fn set_service(&mut self, name: &str, service: Option<Service>) -> bool {
        let held = self.services.get(name);
        if held.map(|b| &b.service) == service.as_ref() {
            return false;
        }
        if let Some(old) = held {
            self.digest.remove(old.digest);
            self.endpoints -= old.service.endpoints.len();
        }
        match service {
            Some(service) => {
                let built = BuiltService::new(name, service);
                self.digest.add(built.digest);
                self.endpoints += built.service.endpoints.len();
                self.services.insert(name.into(), Arc::new(built));
            }
            None => {
                self.services.remove(name);
            }
        }
        true
    }

    /// Sets (or with `None` clears) a rejection; false if nothing changed.
    pub(crate) fn set_rejection(&mut self, key: &str, reason: Option<String>) -> bool {
        if self.rejected.get(key).map(|r| &**r) == reason.as_deref() {
            return false;
        }
        match reason {
            Some(reason) => self.rejected.insert(key.into(), reason.into()),
            None => self.rejected.remove(key),
        };
        true
    }
}

/// What one commit changed: the services added, changed or removed, and
/// the keys whose rejection appeared, changed or went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Commit {
    pub services: Vec<Arc<str>>,
    pub rejections: Vec<Arc<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_mesh_wire::Endpoint;

    #[test]
    fn a_built_service_holds_the_canonical_encoding() {
        let mut endpoint = Endpoint::new("127.0.0.1:80", 3);
        endpoint.metadata.insert("zone".into(), "a\"b".into());
        let service = Service {
            endpoints: vec![endpoint],
        };
        let built = BuiltService::new("s", service.clone());
        assert_eq!(built.json.get().as_bytes(), service.encode().as_slice());
        assert_eq!(built.digest, Digest::of("s", &service));
    }
}
