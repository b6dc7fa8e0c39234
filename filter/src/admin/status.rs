//! The service-level state the leader reports (sync stream, health checks)
//! for `/balancer/stats`: one `sluice:<service>:status` key, JSON, written by
//! the leader when something changes and read only on the stats path, never
//! on the request path.

use serde_json::{json, Value};
use sluice_core::shared_data::SharedData;
use sluice_core::shared_keys::status as key;

/// Unix milliseconds of a host time in ns.
pub fn unix_ms(now_ns: u64) -> u64 {
    now_ns / 1_000_000
}

/// Replaces the document. Only the leader writes it, so no CAS.
pub fn write<S: SharedData>(store: &S, service: &str, doc: &Value) {
    if let Err(e) = store.set(&key(service), doc.to_string().as_bytes(), 0) {
        log::warn!("cannot write {}: {e}", key(service));
    }
}

/// Whether any leader has written the document.
pub fn exists<S: SharedData>(store: &S, service: &str) -> bool {
    matches!(store.get(&key(service)), Ok(Some((bytes, _))) if !bytes.is_empty())
}

fn read<S: SharedData>(store: &S, service: &str) -> Value {
    match store.get(&key(service)) {
        Ok(Some((bytes, _))) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// The service-level parts of the stats.
pub struct ServiceStatus {
    pub sync: Value,
    pub health: Value,
    /// Which root context leads, since when (`null` before any did).
    pub leader: Value,
}

/// What the leader last wrote, with the age of the last sync message as of
/// `now_ns`. `off` when no leader has reported.
pub fn for_stats<S: SharedData>(store: &S, service: &str, now_ns: u64) -> ServiceStatus {
    let doc = read(store, service);
    let mut sync = match &doc["sync"] {
        Value::Object(_) => doc["sync"].clone(),
        _ => json!({"state": "off"}),
    };
    if let Some(last) = sync["last_message_unix_ms"].as_u64() {
        sync["last_message_age_ms"] = json!(unix_ms(now_ns).saturating_sub(last));
    } else if sync["state"] != "off" {
        sync["last_message_age_ms"] = Value::Null;
    }
    if sync["shares"].is_object() {
        let now = unix_ms(now_ns);
        for (until, left) in [
            ("lease_until_unix_ms", "lease_left_ms"),
            ("fallback_until_unix_ms", "fallback_left_ms"),
        ] {
            sync["shares"][left] = json!(sync["shares"][until]
                .as_u64()
                .map_or(0, |t| t.saturating_sub(now)));
        }
    }
    let health = match &doc["health"] {
        Value::Object(_) => doc["health"].clone(),
        _ => json!({"state": "off"}),
    };
    ServiceStatus {
        sync,
        health,
        leader: doc["leader"].clone(),
    }
}
