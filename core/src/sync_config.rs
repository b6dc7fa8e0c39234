//! The keys of `sluice.yaml` for the filter's callouts: `sync:` (where the
//! sync service is, as an Envoy cluster) and the health check
//! (fastapi-balancer's `health_endpoint` and `health_check_interval`, plus
//! `health:` for what Envoy needs to reach the backend).
//!
//! Parsed from the same document as [`crate::config::Config`], apart from it
//! so that the enforcement keys and these evolve without touching each other.

use crate::config::{shown, ConfigError};
use serde_json::{Map, Value};
use std::time::Duration;

/// Default seconds without any message on the sync stream before the filter
/// gives up on it and reopens (the service sends a heartbeat about every
/// second).
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: f64 = 3.0;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_HEALTH_TIMEOUT_SECS: f64 = 1.0;

const SYNC_KEYS: &[&str] = &["cluster", "service", "heartbeat_timeout"];
const HEALTH_KEYS: &[&str] = &[
    "cluster",
    "unhealthy_threshold",
    "healthy_threshold",
    "timeout",
];

/// `sync:`: the filter watches the sync service for its capacities.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// The Envoy cluster (HTTP/2) of the sync service.
    pub cluster: String,
    /// Whose capacities to watch; the document's `service` by default.
    pub service: String,
    pub heartbeat_timeout: Duration,
}

/// The health check of the upstream, on when `health_endpoint`,
/// `health_check_interval` and `health.cluster` are all set.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Path to `GET`, e.g. `/health`.
    pub endpoint: String,
    pub interval: Duration,
    /// The Envoy cluster of the upstream.
    pub cluster: String,
    /// Consecutive failures (non-2xx, timeout, no answer) that make it unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive successes that make it healthy again.
    pub healthy_threshold: u32,
    pub timeout: Duration,
}

/// Both, read from the whole document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CalloutConfig {
    pub sync: Option<SyncConfig>,
    pub health: Option<HealthConfig>,
    /// Worth a log line, not a failure.
    pub warnings: Vec<String>,
}

impl CalloutConfig {
    /// Reads `sync`, `health_endpoint`, `health_check_interval` and `health`
    /// of the document whose `service` is `service`.
    pub fn from_json(root: &Value, service: &str) -> Result<CalloutConfig, ConfigError> {
        let mut warnings = Vec::new();
        let sync = match object(root.get("sync"), "sync", "{cluster: sluice_sync}")? {
            None => None,
            Some(m) => {
                unknown(m, SYNC_KEYS, "sync.", &mut warnings);
                Some(SyncConfig {
                    cluster: cluster(m.get("cluster"), "sync.cluster")?,
                    service: match m.get("service") {
                        None | Some(Value::Null) => service.to_string(),
                        Some(Value::String(s)) if !s.is_empty() => s.clone(),
                        Some(v) => {
                            return Err(ConfigError::new(
                                "sync.service",
                                format!("must be a non-empty string, got {}", shown(v)),
                            ))
                        }
                    },
                    heartbeat_timeout: seconds_or(
                        m.get("heartbeat_timeout"),
                        "sync.heartbeat_timeout",
                        DEFAULT_HEARTBEAT_TIMEOUT_SECS,
                    )?,
                })
            }
        };

        let endpoint = match root.get("health_endpoint") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.starts_with('/') => Some(s.clone()),
            Some(v) => {
                return Err(ConfigError::new(
                    "health_endpoint",
                    format!("must be a path starting with '/', got {}", shown(v)),
                ))
            }
        };
        let interval = match root.get("health_check_interval") {
            None | Some(Value::Null) => None,
            Some(v) => Some(seconds(v, "health_check_interval")?),
        };
        let health = match object(root.get("health"), "health", "{cluster: backend}")? {
            None => {
                if endpoint.is_some() {
                    warnings.push(
                        "health.cluster: not set; health checks are off (the filter needs the \
                         Envoy cluster of the backend to call health_endpoint)"
                            .to_string(),
                    );
                }
                None
            }
            Some(m) => {
                unknown(m, HEALTH_KEYS, "health.", &mut warnings);
                let cluster = cluster(m.get("cluster"), "health.cluster")?;
                let endpoint = endpoint.ok_or_else(|| {
                    ConfigError::new("health_endpoint", "is required when `health` is set")
                })?;
                let interval = interval.ok_or_else(|| {
                    ConfigError::new("health_check_interval", "is required when `health` is set")
                })?;
                Some(HealthConfig {
                    endpoint,
                    interval,
                    cluster,
                    unhealthy_threshold: threshold(
                        m.get("unhealthy_threshold"),
                        "health.unhealthy_threshold",
                        DEFAULT_UNHEALTHY_THRESHOLD,
                    )?,
                    healthy_threshold: threshold(
                        m.get("healthy_threshold"),
                        "health.healthy_threshold",
                        DEFAULT_HEALTHY_THRESHOLD,
                    )?,
                    timeout: seconds_or(
                        m.get("timeout"),
                        "health.timeout",
                        DEFAULT_HEALTH_TIMEOUT_SECS,
                    )?,
                })
            }
        };
        Ok(CalloutConfig {
            sync,
            health,
            warnings,
        })
    }
}

fn object<'a>(
    v: Option<&'a Value>,
    key: &str,
    example: &str,
) -> Result<Option<&'a Map<String, Value>>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(v) => Err(ConfigError::new(
            key,
            format!("must be a map like {example}, got {}", shown(v)),
        )),
    }
}

fn unknown(map: &Map<String, Value>, known: &[&str], prefix: &str, warnings: &mut Vec<String>) {
    for key in map.keys() {
        if !known.contains(&key.as_str()) {
            warnings.push(format!("{prefix}{key}: unknown key, ignored"));
        }
    }
}

fn cluster(v: Option<&Value>, key: &str) -> Result<String, ConfigError> {
    match v {
        // A cluster literally named `envoy` parses as an empty GrpcService
        // and aborts Envoy 1.40; we always send the serialized form, but a
        // reader of the config should not have to know that.
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(ConfigError::new(
            key,
            "is required: the name of an Envoy cluster",
        )),
        Some(v) => Err(ConfigError::new(
            key,
            format!("must be the name of an Envoy cluster, got {}", shown(v)),
        )),
    }
}

fn seconds(v: &Value, key: &str) -> Result<Duration, ConfigError> {
    match v.as_f64() {
        Some(s) if s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(ConfigError::new(
            key,
            format!(
                "must be a number of seconds greater than 0 and at most 86400, got {}",
                shown(v)
            ),
        )),
    }
}

fn seconds_or(v: Option<&Value>, key: &str, default: f64) -> Result<Duration, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(Duration::from_secs_f64(default)),
        Some(v) => seconds(v, key),
    }
}

fn threshold(v: Option<&Value>, key: &str, default: u32) -> Result<u32, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=1000).contains(&n) => Ok(n as u32),
            _ => Err(ConfigError::new(
                key,
                format!("must be an integer from 1 to 1000, got {}", shown(v)),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn parse(doc: Value) -> Result<CalloutConfig, String> {
        CalloutConfig::from_json(&doc, "demo").map_err(|e| e.to_string())
    }

    #[test]
    fn off_unless_set() {
        assert_eq!(parse(json!({})).unwrap(), CalloutConfig::default());
    }

    #[test]
    fn full_settings_and_defaults() {
        let c = parse(json!({
            "sync": {"cluster": "sluice_sync"},
            "health_endpoint": "/health", "health_check_interval": 0.5,
            "health": {"cluster": "backend", "unhealthy_threshold": 2}
        }))
        .unwrap();
        assert_eq!(
            c.sync,
            Some(SyncConfig {
                cluster: "sluice_sync".into(),
                service: "demo".into(),
                heartbeat_timeout: Duration::from_secs(3),
            })
        );
        assert_eq!(
            c.health,
            Some(HealthConfig {
                endpoint: "/health".into(),
                interval: Duration::from_millis(500),
                cluster: "backend".into(),
                unhealthy_threshold: 2,
                healthy_threshold: 2,
                timeout: Duration::from_secs(1),
            })
        );
        let c = parse(json!({"sync": {"cluster": "s", "service": "other",
            "heartbeat_timeout": 10, "colour": 1}}))
        .unwrap();
        assert_eq!(c.sync.unwrap().service, "other");
        assert_eq!(c.warnings, ["sync.colour: unknown key, ignored"]);
    }

    #[test]
    fn balancer_health_keys_without_a_cluster_warn() {
        let c = parse(json!({"health_endpoint": "/health", "health_check_interval": 5})).unwrap();
        assert_eq!(c.health, None);
        assert!(c.warnings[0].starts_with("health.cluster: not set; health checks are off"));
    }

    /// The exact text a user sees for each bad input.
    #[test]
    fn error_texts() {
        let cases = [
            (json!({"sync": "s"}), "sync: must be a map like {cluster: sluice_sync}, got \"s\""),
            (json!({"sync": {}}), "sync.cluster: is required: the name of an Envoy cluster"),
            (json!({"sync": {"cluster": 5}}), "sync.cluster: must be the name of an Envoy cluster, got 5"),
            (json!({"sync": {"cluster": "s", "service": ""}}), "sync.service: must be a non-empty string, got \"\""),
            (
                json!({"sync": {"cluster": "s", "heartbeat_timeout": 0}}),
                "sync.heartbeat_timeout: must be a number of seconds greater than 0 and at most 86400, got 0",
            ),
            (json!({"health_endpoint": "health"}), "health_endpoint: must be a path starting with '/', got \"health\""),
            (
                json!({"health_check_interval": "5s"}),
                "health_check_interval: must be a number of seconds greater than 0 and at most 86400, got \"5s\"",
            ),
            (json!({"health": []}), "health: must be a map like {cluster: backend}, got []"),
            (json!({"health": {}}), "health.cluster: is required: the name of an Envoy cluster"),
            (json!({"health": {"cluster": "b"}}), "health_endpoint: is required when `health` is set"),
            (
                json!({"health_endpoint": "/h", "health": {"cluster": "b"}}),
                "health_check_interval: is required when `health` is set",
            ),
            (
                json!({"health_endpoint": "/h", "health_check_interval": 1,
                       "health": {"cluster": "b", "unhealthy_threshold": 0}}),
                "health.unhealthy_threshold: must be an integer from 1 to 1000, got 0",
            ),
            (
                json!({"health_endpoint": "/h", "health_check_interval": 1,
                       "health": {"cluster": "b", "timeout": -1}}),
                "health.timeout: must be a number of seconds greater than 0 and at most 86400, got -1",
            ),
        ];
        for (doc, want) in cases {
            assert_eq!(parse(doc.clone()).unwrap_err(), want, "input: {doc}");
        }
    }
}
