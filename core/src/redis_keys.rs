//! Where measured capacities are kept: the `storage:` key of `sluice.yaml` and
//! the Redis key layout the prober writes and the sync service reads.
//!
//! The layout is documented for people in `docs/redis-keys.md`; these
//! functions are the one place that spells the names, so the writer and the
//! reader cannot drift apart.
//!
//! Every key of a service carries the service name in braces, e.g.
//! `sluice:{demo}:capacity:/predict`. The braces are literal: they are a Redis
//! Cluster hash tag, so all keys of one service live in one slot and the
//! prober can update a record, the endpoint set and the version in one `MULTI`.

use crate::config::ConfigError;
use serde_json::Value;

/// Redis URL used when `storage.type` is `redis` and no `url` is given.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

const STORAGE_EXAMPLE: &str = "{type: redis, url: \"redis://host:6379\"}";

/// Fields of a capacity record (a Redis hash).
pub mod fields {
    /// Concurrent requests the endpoint takes (positive integer).
    pub const CAPACITY: &str = "capacity";
    /// p99 latency at that concurrency, milliseconds (absent for `manual`).
    pub const P99_MS: &str = "p99_ms";
    /// Throughput at that concurrency, requests per second (absent for `manual`).
    pub const RPS: &str = "rps";
    /// Error rate at that concurrency, 0..1 (absent for `manual`).
    pub const ERROR_RATE: &str = "error_rate";
    /// When it was measured or set: Unix time in whole seconds.
    pub const MEASURED_AT: &str = "measured_at";
    /// `probe` (measured by sluice-prober) or `manual` (set by hand in the file).
    pub const SOURCE: &str = "source";
    /// Prefix of the per-instance capacity fields: `instance_capacity:ADDR`
    /// holds what instance `ADDR` (`ip:port`, `[ipv6]:port`) takes of this
    /// endpoint, a positive integer. See [`super::instance_capacity_field`].
    pub const INSTANCE_CAPACITY_PREFIX: &str = "instance_capacity:";
}

/// The field of an endpoint's capacity record that holds instance `address`'s
/// own capacity for it, e.g. `instance_capacity:127.0.0.1:8003`. In the
/// endpoint's record, not a key of its own: one `HGETALL` reads the endpoint
/// and all its instances, one `MULTI` writes them together.
pub fn instance_capacity_field(address: &str) -> String {
    format!("{}{address}", fields::INSTANCE_CAPACITY_PREFIX)
}

/// Where capacities are shared, from `storage:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    /// Nothing is shared: each process keeps what its file says
    /// (fastapi-balancer's `type: memory`).
    Memory,
    Redis {
        url: String,
    },
}

impl Storage {
    /// Reads `storage` from the whole document; `None` when it is absent.
    pub fn from_json(root: &Value) -> Result<Option<Storage>, ConfigError> {
        let spec = match root.get("storage") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(v) => {
                return Err(ConfigError::new(
                    "storage",
                    format!("must be a map like {STORAGE_EXAMPLE}, got {v}"),
                ))
            }
        };
        let kind = match spec.get("type") {
            None | Some(Value::Null) => {
                if spec.contains_key("url") {
                    "redis"
                } else {
                    return Err(ConfigError::new(
                        "storage.type",
                        "is missing; expected \"redis\" or \"memory\"",
                    ));
                }
            }
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                return Err(ConfigError::new(
                    "storage.type",
                    format!("must be \"redis\" or \"memory\", got {v}"),
                ))
            }
        };
        match kind {
            "memory" => Ok(Some(Storage::Memory)),
            "redis" => match spec.get("url") {
                None | Some(Value::Null) => Ok(Some(Storage::Redis {
                    url: DEFAULT_REDIS_URL.to_string(),
                })),
                Some(Value::String(u))
                    if u.starts_with("redis://")
                        || u.starts_with("rediss://")
                        || u.starts_with("unix://")
                        || u.starts_with("redis+unix://") =>
                {
                    Ok(Some(Storage::Redis { url: u.clone() }))
                }
                Some(v) => Err(ConfigError::new(
                    "storage.url",
                    format!("must be a redis:// URL, got {v}"),
                )),
            },
            other => Err(ConfigError::new(
                "storage.type",
                format!("must be \"redis\" or \"memory\", got {other:?}"),
            )),
        }
    }
}

/// Checks that a service name can be used inside a hash tag.
pub fn check_service_name(service: &str) -> Result<(), ConfigError> {
    if service.contains(['{', '}']) || service.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            "service",
            format!(
                "must not contain braces or spaces (it is a Redis key's hash tag), got {service:?}"
            ),
        ));
    }
    if service.is_empty() {
        return Err(ConfigError::new("service", "must not be empty"));
    }
    if service.len() > MAX_SERVICE_NAME {
        return Err(ConfigError::new(
            "service",
            format!(
                "must be at most {MAX_SERVICE_NAME} bytes, got {}",
                service.len()
            ),
        ));
    }
    if !service.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            "service",
            format!(
                "must be printable ASCII (letters, digits and punctuation such as - _ . : /), got {service:?}"
            ),
        ));
    }
    Ok(())
}

/// The longest service name sluice-sync accepts (and so every part).
pub const MAX_SERVICE_NAME: usize = 128;

/// The hash holding one endpoint's capacity record.
pub fn capacity_key(service: &str, path: &str) -> String {
    format!("sluice:{{{service}}}:capacity:{path}")
}

/// The set of every endpoint path that has a capacity record, so a reader
/// lists a service's endpoints without `SCAN`.
pub fn endpoints_key(service: &str) -> String {
    format!("sluice:{{{service}}}:endpoints")
}

/// The pub/sub channel that announces each change of a service's records.
pub fn updates_channel(service: &str) -> String {
    format!("sluice:{{{service}}}:updates")
}

/// The counter every writer `INCR`s in the `MULTI` of its record write: the
/// version of the service's capacities the sync service streams, monotonic
/// across sync restarts and replicas.
pub fn version_key(service: &str) -> String {
    format!("sluice:{{{service}}}:version")
}

/// Which sluice-sync replica allocates the service's shares among its
/// Envoys (`--advertise`): the replica's address, under a lease (`PX`).
pub fn allocator_key(service: &str) -> String {
    format!("sluice:{{{service}}}:allocator")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn key_names() {
        assert_eq!(
            capacity_key("demo", "/predict"),
            "sluice:{demo}:capacity:/predict"
        );
        assert_eq!(endpoints_key("demo"), "sluice:{demo}:endpoints");
        assert_eq!(updates_channel("demo"), "sluice:{demo}:updates");
        assert_eq!(version_key("demo"), "sluice:{demo}:version");
        assert_eq!(
            instance_capacity_field("[::1]:8003"),
            "instance_capacity:[::1]:8003"
        );
    }

    #[test]
    fn storage_forms() {
        assert_eq!(Storage::from_json(&json!({})).unwrap(), None);
        assert_eq!(
            Storage::from_json(&json!({"storage": {"type": "redis", "url": "redis://h:1/2"}}))
                .unwrap(),
            Some(Storage::Redis {
                url: "redis://h:1/2".into()
            })
        );
        assert_eq!(
            Storage::from_json(&json!({"storage": {"type": "redis"}})).unwrap(),
            Some(Storage::Redis {
                url: DEFAULT_REDIS_URL.into()
            })
        );
        assert_eq!(
            Storage::from_json(&json!({"storage": {"url": "redis://h:1"}})).unwrap(),
            Some(Storage::Redis {
                url: "redis://h:1".into()
            })
        );
        assert_eq!(
            Storage::from_json(&json!({"storage": {"type": "memory"}})).unwrap(),
            Some(Storage::Memory)
        );
    }

    #[test]
    fn storage_errors_name_the_key() {
        let cases = [
            (json!({"storage": "redis"}), "storage: must be a map like {type: redis, url: \"redis://host:6379\"}, got \"redis\""),
            (json!({"storage": {"type": "etcd"}}), "storage.type: must be \"redis\" or \"memory\", got \"etcd\""),
            (json!({"storage": {"type": 3}}), "storage.type: must be \"redis\" or \"memory\", got 3"),
            (json!({"storage": {}}), "storage.type: is missing; expected \"redis\" or \"memory\""),
            (json!({"storage": {"type": "redis", "url": "http://x"}}), "storage.url: must be a redis:// URL, got \"http://x\""),
        ];
        for (doc, want) in cases {
            assert_eq!(Storage::from_json(&doc).unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn service_names_for_hash_tags() {
        assert!(check_service_name("demo-1.prod").is_ok());
        assert!(check_service_name("a{b").is_err());
        assert!(check_service_name("a b").is_err());
        assert!(check_service_name("").is_err());
        assert!(check_service_name(&"s".repeat(128)).is_ok());
        assert!(check_service_name(&"s".repeat(129)).is_err());
        assert!(check_service_name("café").is_err());
        assert!(check_service_name("a\u{7f}").is_err());
    }
}
