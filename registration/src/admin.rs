//! Operations on registrations that are already in etcd: list them, change
//! a weight in place (keeping the instance's lease), drain one.
//!
//! These back the `list`, `set-weight` and `drain` commands of
//! `etcd-mesh-register`. A key whose process keeps it registered with this
//! library outlives them: the process adopts a weight written here and
//! keeps it across re-registrations, and puts a deleted key back at weight
//! 0 (see the crate docs).

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
    /// `None` when the value is not etcd-naming JSON or its weight cannot
    /// be read.
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
                weight_in(v).ok(),
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

/// The weight in an etcd-naming value, read as sync-server reads it:
/// `Metadata.weight`, an integer 0..=MAX_WEIGHT as a JSON number or a
/// string of digits, 1 when absent.
pub fn weight_of(value: &[u8]) -> Result<u32, String> {
    let value: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| format!("not etcd-naming JSON: {e}"))?;
    weight_in(&value)
}

fn weight_in(value: &serde_json::Value) -> Result<u32, String> {
    let weight = match &value["Metadata"]["weight"] {
        serde_json::Value::Null => return Ok(DEFAULT_WEIGHT),
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    weight
        .and_then(|w| u32::try_from(w).ok())
        .filter(|w| *w <= MAX_WEIGHT)
        .ok_or_else(|| {
            format!(
                "Metadata.weight {} is not an integer in 0..={MAX_WEIGHT}",
                value["Metadata"]["weight"]
            )
        })
}

/// Rewrites `Metadata.weight` of the registration at `key`, keeping its
/// lease and its other metadata. A process keeping the key registered
/// adopts the weight and keeps it until it is changed again.
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
/// A process still keeping the key registered puts it back at weight 0:
/// it stays listed, drained, until that process stops.
pub async fn drain(client: &mut Client, key: &str, wait: Duration) -> Result<(), AdminError> {
    set_weight(client, key, 0).await?;
    tokio::time::sleep(wait).await;
    client.delete(key, None).await?;
    Ok(())
}
