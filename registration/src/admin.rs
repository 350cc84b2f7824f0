//! Operations on registrations that are already in etcd: list them, change
//! a weight in place (keeping the instance's lease), drain one.
//!
//! These back the `list`, `set-weight` and `drain` commands of
//! `etcd-mesh-register`.

use etcd_client::{Client, GetOptions, PutOptions};
use etcd_mesh_wire::{DEFAULT_WEIGHT, MAX_WEIGHT};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("no registration at {0:?}")]
    Missing(String),
    #[error("{key:?} does not hold etcd-naming JSON: {reason}")]
    NotNaming { key: String, reason: String },
    #[error("weight {0} is above {MAX_WEIGHT}")]
    Weight(u32),
}

/// One registration as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub service: String,
    pub addr: String,
    /// `None` when the value is not etcd-naming JSON.
    pub weight: Option<u32>,
    /// Seconds left on the key's lease; `None` without a lease.
    pub ttl_left: Option<i64>,
}

/// Every registration under `prefix`, sorted by key.
pub async fn list(client: &mut Client, prefix: &str) -> Result<Vec<Listed>, AdminError> {
    let response = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut listed = Vec::new();
    for kv in response.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let rest = key.strip_prefix(prefix).unwrap_or(&key);
        let service = rest.rsplit_once('/').map_or(rest, |(s, _)| s).to_owned();
        let value: Option<serde_json::Value> = serde_json::from_slice(kv.value()).ok();
        let (addr, weight) = match &value {
            Some(v) => (
                v["Addr"].as_str().unwrap_or_default().to_owned(),
                Some(
                    v["Metadata"]["weight"]
                        .as_u64()
                        .map_or(DEFAULT_WEIGHT, |w| w.min(u64::from(u32::MAX)) as u32),
                ),
            ),
            // openim-v2: the value is the address.
            None => (String::from_utf8_lossy(kv.value()).into_owned(), None),
        };
        let ttl_left = match kv.lease() {
            0 => None,
            lease => Some(client.lease_time_to_live(lease, None).await?.ttl()),
        };
        listed.push(Listed {
            key,
            service,
            addr,
            weight,
            ttl_left,
        });
    }
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(listed)
}

/// Rewrites `Metadata.weight` of the registration at `key`, keeping its
/// lease and its other metadata.
pub async fn set_weight(client: &mut Client, key: &str, weight: u32) -> Result<(), AdminError> {
    if weight > MAX_WEIGHT {
        return Err(AdminError::Weight(weight));
    }
    let response = client.get(key, None).await?;
    let kv = response
        .kvs()
        .first()
        .ok_or_else(|| AdminError::Missing(key.to_owned()))?;
    let not_naming = |reason: &str| AdminError::NotNaming {
        key: key.to_owned(),
        reason: reason.to_owned(),
    };
    let mut value: serde_json::Value =
        serde_json::from_slice(kv.value()).map_err(|e| not_naming(&e.to_string()))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| not_naming("not an object"))?;
    if !object.contains_key("Addr") {
        return Err(not_naming("no Addr"));
    }
    let metadata = object
        .entry("Metadata")
        .or_insert_with(|| serde_json::json!({}));
    if metadata.is_null() {
        *metadata = serde_json::json!({});
    }
    let metadata = metadata
        .as_object_mut()
        .ok_or_else(|| not_naming("Metadata is not an object"))?;
    metadata.insert("weight".into(), weight.into());
    let options = PutOptions::new().with_ignore_lease();
    client.put(key, value.to_string(), Some(options)).await?;
    Ok(())
}

/// Drains the registration at `key`: weight 0, a pause for the change to
/// reach every proxy and for calls in flight to finish, then deletion.
pub async fn drain(client: &mut Client, key: &str, wait: Duration) -> Result<(), AdminError> {
    set_weight(client, key, 0).await?;
    tokio::time::sleep(wait).await;
    client.delete(key, None).await?;
    Ok(())
}
