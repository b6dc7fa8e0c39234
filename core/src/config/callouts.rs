//! The keys of `sluice.yaml` for the filter's callouts: `sync:` (where the
//! sync service is, as an Envoy cluster) and the health check
//! (fastapi-balancer's `health_endpoint` and `health_check_interval`, plus
//! `health:` for what Envoy needs to reach the backend).
//!
//! Apart from [`super::Config`], so that the enforcement keys and these
//! evolve without touching each other.

use super::check::{self, unknown_keys, ConfigError, ConfigWarning, WarningKind};
use super::document::{Document, Section};
use super::shown;
use serde_json::Value;
use std::time::Duration;

/// Default seconds without any message on the sync stream before the filter
/// gives up on it and reopens (the service sends a heartbeat about every
/// second).
pub const DEFAULT_HEARTBEAT_TIMEOUT_SECS: f64 = 3.0;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_HEALTH_TIMEOUT_SECS: f64 = 1.0;

/// `sync:`: the filter watches the sync service for its capacities.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// The Envoy cluster (HTTP/2) of the sync service.
    pub cluster: String,
    /// Whose capacities to watch; the document's `service` by default.
    pub service: String,
    pub heartbeat_timeout: Duration,
    /// Sent as `authorization: Bearer <token>` on the stream.
    pub token: Option<SyncToken>,
    /// Share the capacities with the other Envoys of the service through
    /// sync's `Share` stream (docs/sync.md, "Shares among Envoy replicas").
    pub shares: bool,
}

/// The longest `sync.token`: the filter hands Envoy the stream's settings
/// as a short serialized message, whose lengths must stay single bytes.
pub const MAX_TOKEN_LEN: usize = 100;

/// `sync.token`, never printed (`Debug` says `<redacted>`).
#[derive(Clone, PartialEq, Eq)]
pub struct SyncToken(String);

impl SyncToken {
    /// Printable ASCII without spaces (it travels in an HTTP/2 header), 1 to
    /// [`MAX_TOKEN_LEN`] bytes; the error never repeats the value.
    pub fn parse(value: Option<&Value>, key: &str) -> Result<Option<SyncToken>, ConfigError> {
        let text = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.trim(),
            Some(_) => return Err(ConfigError::new(key, "must be a string")),
        };
        if text.is_empty() {
            return Err(ConfigError::new(key, "must not be empty"));
        }
        if text.len() > MAX_TOKEN_LEN {
            return Err(ConfigError::new(
                key,
                format!("must be at most {MAX_TOKEN_LEN} bytes, got {}", text.len()),
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                key,
                "holds a character that cannot travel in an HTTP/2 header \
                 (use printable ASCII without spaces)",
            ));
        }
        Ok(Some(SyncToken(text.to_string())))
    }

    /// The token itself, for the stream's metadata only.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SyncToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncToken(<redacted>)")
    }
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
    pub warnings: Vec<ConfigWarning>,
}

impl CalloutConfig {
    /// Reads `sync`, `health_endpoint`, `health_check_interval` and `health`
    /// of the document whose `service` is `service`.
    pub fn from_json(root: &Value, service: &str) -> Result<CalloutConfig, ConfigError> {
        CalloutConfig::from_document(&Document::from_value(root)?, service)
    }

    pub fn from_document(doc: &Document, service: &str) -> Result<CalloutConfig, ConfigError> {
        let mut warnings = Vec::new();
        let sync = match section(&doc.sync, "sync", "{cluster: sluice_sync}")? {
            None => None,
            Some(m) => {
                warnings.extend(unknown_keys(&m.unknown, "sync."));
                let watched = check::text(m.service.as_ref(), "sync.service")?
                    .unwrap_or_else(|| service.to_string());
                // Sync refuses other names, for ever: say so at start.
                crate::redis_keys::check_service_name(&watched).map_err(|e| {
                    let key = if m.service.is_some() {
                        "sync.service"
                    } else {
                        "service"
                    };
                    ConfigError::new(key, e.problem().to_string())
                })?;
                Some(SyncConfig {
                    cluster: cluster(m.cluster.as_ref(), "sync.cluster")?,
                    service: watched,
                    token: SyncToken::parse(m.token.as_ref(), "sync.token")?,
                    shares: check::flag(m.shares.as_ref(), "sync.shares", false)?,
                    heartbeat_timeout: check::seconds_or(
                        m.heartbeat_timeout.as_ref(),
                        "sync.heartbeat_timeout",
                        check::CALLOUT,
                        Duration::from_secs_f64(DEFAULT_HEARTBEAT_TIMEOUT_SECS),
                    )?,
                })
            }
        };

        let endpoint = match &doc.health_endpoint {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.starts_with('/') => Some(s.clone()),
            Some(v) => {
                return Err(ConfigError::new(
                    "health_endpoint",
                    format!("must be a path starting with '/', got {}", shown(v)),
                ))
            }
        };
        let interval = match &doc.health_check_interval {
            None | Some(Value::Null) => None,
            Some(v) => Some(check::seconds(v, "health_check_interval", check::CALLOUT)?),
        };
        let health = match section(&doc.health, "health", "{cluster: backend}")? {
            None => {
                if endpoint.is_some() {
                    warnings.push(ConfigWarning {
                        key: "health.cluster".into(),
                        kind: WarningKind::HealthCheckOff,
                    });
                }
                None
            }
            Some(m) => {
                warnings.extend(unknown_keys(&m.unknown, "health."));
                let cluster = cluster(m.cluster.as_ref(), "health.cluster")?;
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
                        m.unhealthy_threshold.as_ref(),
                        "health.unhealthy_threshold",
                        DEFAULT_UNHEALTHY_THRESHOLD,
                    )?,
                    healthy_threshold: threshold(
                        m.healthy_threshold.as_ref(),
                        "health.healthy_threshold",
                        DEFAULT_HEALTHY_THRESHOLD,
                    )?,
                    timeout: check::seconds_or(
                        m.timeout.as_ref(),
                        "health.timeout",
                        check::CALLOUT,
                        Duration::from_secs_f64(DEFAULT_HEALTH_TIMEOUT_SECS),
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

fn section<'a, T>(
    v: &'a Option<Section<T>>,
    key: &str,
    example: &str,
) -> Result<Option<&'a T>, ConfigError> {
    match v {
        None => Ok(None),
        Some(Section::Map(m)) => Ok(Some(m)),
        Some(Section::Bad(v)) => Err(ConfigError::new(
            key,
            format!("must be a map like {example}, got {}", shown(v)),
        )),
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

fn threshold(v: Option<&Value>, key: &str, default: u32) -> Result<u32, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => Ok(check::integer(v, key, 1, 1000)? as u32),
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
                token: None,
                shares: false,
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
        assert_eq!(c.sync.as_ref().unwrap().service, "other");
        assert!(!c.sync.as_ref().unwrap().shares, "off unless configured");
        let warnings: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings, ["sync.colour: unknown key, ignored"]);
        let c = parse(json!({"sync": {"cluster": "s", "shares": true}})).unwrap();
        assert!(c.sync.unwrap().shares);
        let c = parse(json!({"sync": {"cluster": "s", "token": "s3cret\n"}})).unwrap();
        let token = c.sync.unwrap().token.unwrap();
        assert_eq!(token.secret(), "s3cret");
        assert_eq!(format!("{token:?}"), "SyncToken(<redacted>)");
    }

    #[test]
    fn balancer_health_keys_without_a_cluster_warn() {
        let c = parse(json!({"health_endpoint": "/health", "health_check_interval": 5})).unwrap();
        assert_eq!(c.health, None);
        assert!(c.warnings[0]
            .to_string()
            .starts_with("health.cluster: not set; health checks are off"));
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
                json!({"sync": {"cluster": "s", "service": "caf\u{e9}"}}),
                "sync.service: must be printable ASCII (letters, digits and punctuation such as - _ . : /), got \"caf\u{e9}\"",
            ),
            (json!({"sync": {"cluster": "s", "token": 5}}), "sync.token: must be a string"),
            (json!({"sync": {"cluster": "s", "shares": "yes"}}), "sync.shares: must be true or false, got \"yes\""),
            (json!({"sync": {"cluster": "s", "token": " "}}), "sync.token: must not be empty"),
            (
                json!({"sync": {"cluster": "s", "token": "se cret"}}),
                "sync.token: holds a character that cannot travel in an HTTP/2 header (use printable ASCII without spaces)",
            ),
            (
                json!({"sync": {"cluster": "s", "token": "x".repeat(101)}}),
                "sync.token: must be at most 100 bytes, got 101",
            ),
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
