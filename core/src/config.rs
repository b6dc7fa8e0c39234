//! The enforcement part of `sluice.yaml`, parsed from its JSON form (the keys
//! are documented for users in `docs/filter.md`).
//!
//! The filter receives the document as JSON in its plugin `configuration`; the
//! native tools read YAML and hand the same tree over as a `serde_json::Value`,
//! so every part reports the same error for the same mistake. Keys that belong
//! to other parts (the prober's `method`, `headers`, `body`, thresholds,
//! `storage`, `ui`) are accepted and left alone; keys nobody knows produce a
//! warning, not a failure, so a newer prober's file never stops an older filter.

use serde_json::{Map, Value};
use std::fmt;
use std::time::Duration;

/// Default seconds a request may wait for a slot (fastapi-balancer's default).
pub const DEFAULT_QUEUE_TIMEOUT_SECS: f64 = 30.0;
/// Default number of waiting requests per endpoint before `503 queue-full`.
pub const DEFAULT_MAX_QUEUE: u32 = 1000;
/// Upper bound on `max_queue`. Every waiter is 8 bytes in the endpoint's
/// shared-data record, which is copied on each queue operation, so an
/// unbounded queue would make every admission slower as it grows.
pub const MAX_QUEUE_LIMIT: u32 = 10_000;
/// Default longest hold of an abandoned request's slot, seconds.
pub const DEFAULT_ABANDON_HOLD_SECS: f64 = 30.0;
/// Service name used when the document has none.
pub const DEFAULT_SERVICE: &str = "default";

const TOP_LEVEL_KEYS: &[&str] = &[
    "service",
    "queue_timeout",
    "max_queue",
    "abandon_hold",
    "metrics",
    "endpoints",
    // Read by other parts of Sluice.
    "error_threshold",
    "latency_threshold_ms",
    "storage",
    "ui",
    "sync",
    "probe",
    // The health check (fastapi-balancer's keys), read with `sync` by
    // `sync_config`.
    "health_endpoint",
    "health_check_interval",
    "health",
];
const ENDPOINT_KEYS: &[&str] = &[
    "match",
    "methods",
    "capacity",
    "queue_timeout",
    "max_queue",
    "abandon_hold",
    "count_upgrades",
    "max_queued_bytes",
    // Read by the prober: how to call the endpoint.
    "method",
    "headers",
    "body",
];

/// The whole enforcement configuration of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub service: String,
    pub queue_timeout: Duration,
    pub max_queue: u32,
    pub abandon_hold: Duration,
    /// Whether the filter defines its metrics in Envoy's stats (default
    /// true); false leaves Envoy's stats without them.
    pub metrics: bool,
    pub endpoints: Vec<Endpoint>,
    /// Things worth a log line that do not stop the plugin (unknown keys).
    pub warnings: Vec<ConfigWarning>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchKind {
    Exact,
    Prefix,
}

/// One watched endpoint, with the service-wide defaults already applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub path: String,
    pub match_kind: MatchKind,
    /// Upper-case method names this endpoint applies to; empty means all.
    pub methods: Vec<String>,
    /// `None` until measured: such an endpoint is watched but not limited.
    pub capacity: Option<u32>,
    pub queue_timeout: Duration,
    pub max_queue: u32,
    /// Longest time the slot of an abandoned in-flight request stays held
    /// (the backend may still be computing it); zero releases at once.
    pub abandon_hold: Duration,
    /// Whether upgraded requests (websockets) hold a slot for their life.
    pub count_upgrades: bool,
    /// Cap on the `content-length` bytes of all queued requests together.
    pub max_queued_bytes: Option<u64>,
}

/// A configuration mistake: its key is the dotted path to the offending value.
/// Built only by [`ConfigError::new`], so every part words it alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    key: String,
    problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// Dotted path to the offending value, e.g. `endpoints./predict.capacity`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What is wrong with it, without the key.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Something in the document worth a log line that does not stop the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// Dotted path to what the warning is about.
    pub key: String,
    pub kind: WarningKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarningKind {
    /// A key no part of Sluice reads: a typo, or a newer version's key.
    UnknownKey,
    /// `endpoints` is absent or empty: every request passes through.
    NoEndpoints,
    /// An endpoint without `capacity`: watched, not limited, until measured.
    CapacityNotSet,
    /// A `queue_timeout` (this one) that Envoy's default
    /// `stream_idle_timeout` (300 s) cuts short with its own 504.
    QueueTimeoutPastIdleTimeout(Duration),
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            WarningKind::UnknownKey => "unknown key, ignored",
            WarningKind::NoEndpoints => "none configured; every request passes through",
            WarningKind::CapacityNotSet => {
                "not set; the endpoint is not limited until a capacity is measured"
            }
            WarningKind::QueueTimeoutPastIdleTimeout(t) => {
                return write!(
                    f,
                    "{}: {} s is not below Envoy's default stream_idle_timeout (300 s); set the \
                     connection manager's stream_idle_timeout above it, or queued requests get \
                     Envoy's 504 \"stream timeout\" at 300 s",
                    self.key,
                    t.as_secs_f64()
                )
            }
        };
        write!(f, "{}: {what}", self.key)
    }
}

/// The value as the user wrote it, for error messages (strings quoted).
/// Other parts use it too, so every part shows values alike.
pub fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl Config {
    /// Parses the JSON text of the plugin configuration.
    pub fn from_json_str(text: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Err(ConfigError::new(
                "configuration",
                "is empty; expected a JSON object",
            ));
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::new("configuration", format!("is not valid JSON: {e}")))?;
        if let Ok(Some(key)) = crate::json_keys::first_repeated_key(text) {
            return Err(ConfigError::new(
                key,
                "is given more than once (JSON would keep only the last)",
            ));
        }
        Config::from_json(&value)
    }

    /// Parses an already-decoded document (JSON, or YAML turned into JSON).
    pub fn from_json(value: &Value) -> Result<Config, ConfigError> {
        let root = value.as_object().ok_or_else(|| {
            ConfigError::new(
                "configuration",
                format!("must be an object, got {}", shown(value)),
            )
        })?;
        let mut warnings = Vec::new();
        warn_unknown(root, TOP_LEVEL_KEYS, "", &mut warnings);

        let service = match root.get("service") {
            None | Some(Value::Null) => DEFAULT_SERVICE.to_string(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(v) => {
                return Err(ConfigError::new(
                    "service",
                    format!("must be a non-empty string, got {}", shown(v)),
                ))
            }
        };
        let queue_timeout = match root.get("queue_timeout") {
            None | Some(Value::Null) => Duration::from_secs_f64(DEFAULT_QUEUE_TIMEOUT_SECS),
            Some(v) => seconds(v, "queue_timeout")?,
        };
        let max_queue = match root.get("max_queue") {
            None | Some(Value::Null) => DEFAULT_MAX_QUEUE,
            Some(v) => queue_len(v, "max_queue")?,
        };
        let abandon_hold = match root.get("abandon_hold") {
            None | Some(Value::Null) => Duration::from_secs_f64(DEFAULT_ABANDON_HOLD_SECS),
            Some(v) => hold_seconds(v, "abandon_hold")?,
        };
        let metrics = match root.get("metrics") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ConfigError::new(
                    "metrics",
                    format!("must be true or false, got {}", shown(v)),
                ))
            }
        };

        let mut endpoints = Vec::new();
        match root.get("endpoints") {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) => {
                for (path, spec) in map {
                    endpoints.push(endpoint(
                        path,
                        spec,
                        queue_timeout,
                        max_queue,
                        abandon_hold,
                        &mut warnings,
                    )?);
                }
            }
            Some(v) => {
                return Err(ConfigError::new(
                    "endpoints",
                    format!(
                        "must be a map from path to endpoint settings, got {}",
                        shown(v)
                    ),
                ))
            }
        }
        if endpoints.is_empty() {
            warnings.push(ConfigWarning {
                key: "endpoints".into(),
                kind: WarningKind::NoEndpoints,
            });
        }
        long_queue_timeout_warnings(queue_timeout, &endpoints, &mut warnings);
        for e in &endpoints {
            if e.capacity.is_none() {
                warnings.push(ConfigWarning {
                    key: format!("endpoints.{}.capacity", e.path),
                    kind: WarningKind::CapacityNotSet,
                });
            }
        }
        Ok(Config {
            service,
            queue_timeout,
            max_queue,
            abandon_hold,
            metrics,
            endpoints,
            warnings,
        })
    }
}

/// Envoy's default `stream_idle_timeout`, which also runs while a request
/// is queued: a queue timeout at or above it is cut short by Envoy's own 504.
const ENVOY_DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// One warning for a long top-level `queue_timeout`, and one for each
/// endpoint that sets a long one of its own.
fn long_queue_timeout_warnings(
    top: Duration,
    endpoints: &[Endpoint],
    warnings: &mut Vec<ConfigWarning>,
) {
    let warning = |key: String, t: Duration| ConfigWarning {
        key,
        kind: WarningKind::QueueTimeoutPastIdleTimeout(t),
    };
    if top >= ENVOY_DEFAULT_STREAM_IDLE_TIMEOUT {
        warnings.push(warning("queue_timeout".into(), top));
    }
    for e in endpoints {
        if e.queue_timeout >= ENVOY_DEFAULT_STREAM_IDLE_TIMEOUT && e.queue_timeout != top {
            warnings.push(warning(
                format!("endpoints.{}.queue_timeout", e.path),
                e.queue_timeout,
            ));
        }
    }
}

fn warn_unknown(
    map: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
    warnings: &mut Vec<ConfigWarning>,
) {
    for key in map.keys() {
        if !known.contains(&key.as_str()) {
            warnings.push(ConfigWarning {
                key: format!("{prefix}{key}"),
                kind: WarningKind::UnknownKey,
            });
        }
    }
}

fn endpoint(
    path: &str,
    spec: &Value,
    default_timeout: Duration,
    default_max_queue: u32,
    default_abandon_hold: Duration,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<Endpoint, ConfigError> {
    let key = |field: &str| format!("endpoints.{path}.{field}");
    if !path.starts_with('/') {
        return Err(ConfigError::new(
            format!("endpoints.{path}"),
            "path must start with '/'",
        ));
    }
    if path.contains('?') {
        return Err(ConfigError::new(
            format!("endpoints.{path}"),
            "path must not contain a query string (requests match on the path alone)",
        ));
    }
    if path.contains('#') {
        return Err(ConfigError::new(
            format!("endpoints.{path}"),
            "path must not contain '#' (a fragment never reaches the proxy)",
        ));
    }
    if path.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            format!("endpoints.{path}"),
            "path must not contain spaces (a request path has them as %20)",
        ));
    }
    let empty = Map::new();
    let fields = match spec {
        Value::Null => &empty,
        Value::Object(m) => m,
        v => {
            return Err(ConfigError::new(
                format!("endpoints.{path}"),
                format!("must be a map of endpoint settings, got {}", shown(v)),
            ))
        }
    };
    warn_unknown(
        fields,
        ENDPOINT_KEYS,
        &format!("endpoints.{path}."),
        warnings,
    );

    let match_kind = match fields.get("match") {
        None | Some(Value::Null) => MatchKind::Exact,
        Some(Value::String(s)) if s == "exact" => MatchKind::Exact,
        Some(Value::String(s)) if s == "prefix" => MatchKind::Prefix,
        Some(v) => {
            return Err(ConfigError::new(
                key("match"),
                format!("must be \"exact\" or \"prefix\", got {}", shown(v)),
            ))
        }
    };
    let methods = match fields.get("methods") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item.as_str() {
                    Some(m) if !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic()) => {
                        out.push(m.to_ascii_uppercase())
                    }
                    _ => {
                        return Err(ConfigError::new(
                            key("methods"),
                            format!("must be a list of HTTP method names, got {}", shown(item)),
                        ))
                    }
                }
            }
            if out.is_empty() {
                return Err(ConfigError::new(
                    key("methods"),
                    "is empty, so no request would be limited; leave it out to limit every method",
                ));
            }
            out
        }
        Some(v) => {
            return Err(ConfigError::new(
                key("methods"),
                format!("must be a list of HTTP method names, got {}", shown(v)),
            ))
        }
    };
    let capacity = match fields.get("capacity") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(u32::MAX) => Some(n as u32),
            _ => {
                return Err(ConfigError::new(
                    key("capacity"),
                    format!("must be a positive integer, got {}", shown(v)),
                ))
            }
        },
    };
    let queue_timeout = match fields.get("queue_timeout") {
        None | Some(Value::Null) => default_timeout,
        Some(v) => seconds(v, &key("queue_timeout"))?,
    };
    let max_queue = match fields.get("max_queue") {
        None | Some(Value::Null) => default_max_queue,
        Some(v) => queue_len(v, &key("max_queue"))?,
    };
    let abandon_hold = match fields.get("abandon_hold") {
        None | Some(Value::Null) => default_abandon_hold,
        Some(v) => hold_seconds(v, &key("abandon_hold"))?,
    };
    let count_upgrades = match fields.get("count_upgrades") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ConfigError::new(
                key("count_upgrades"),
                format!("must be true or false, got {}", shown(v)),
            ))
        }
    };
    let max_queued_bytes = match fields.get("max_queued_bytes") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Some(n),
            _ => {
                return Err(ConfigError::new(
                    key("max_queued_bytes"),
                    format!("must be a positive number of bytes, got {}", shown(v)),
                ))
            }
        },
    };
    Ok(Endpoint {
        path: path.to_string(),
        match_kind,
        methods,
        capacity,
        queue_timeout,
        max_queue,
        abandon_hold,
        count_upgrades,
        max_queued_bytes,
    })
}

fn seconds(v: &Value, key: &str) -> Result<Duration, ConfigError> {
    match v.as_f64() {
        // Durations past a day are certainly a unit mistake (ms for s).
        // Below a millisecond is certainly a unit mistake too (and below the
        // tick that times waiters out).
        Some(s) if (0.001..=86_400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(ConfigError::new(
            key,
            format!(
                "must be a number of seconds from 0.001 to 86400, got {}",
                shown(v)
            ),
        )),
    }
}

/// Like [`seconds`], but 0 is allowed: it turns the behaviour off.
fn hold_seconds(v: &Value, key: &str) -> Result<Duration, ConfigError> {
    match v.as_f64() {
        Some(s) if (0.0..=86_400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(ConfigError::new(
            key,
            format!(
                "must be a number of seconds from 0 (off) to 86400, got {}",
                shown(v)
            ),
        )),
    }
}

fn queue_len(v: &Value, key: &str) -> Result<u32, ConfigError> {
    match v.as_u64() {
        Some(n) if n <= u64::from(MAX_QUEUE_LIMIT) => Ok(n as u32),
        _ => Err(ConfigError::new(
            key,
            format!(
                "must be an integer from 0 to {MAX_QUEUE_LIMIT}, got {}",
                shown(v)
            ),
        )),
    }
}

/// Where the dashboard is served unless `ui.path` says otherwise
/// (fastapi-balancer's path).
pub const DEFAULT_UI_PATH: &str = "/balancer/ui";
/// Seconds between the dashboard's polls of the stats.
pub const DEFAULT_UI_REFRESH_SECS: f64 = 2.0;
const UI_KEYS: &[&str] = &["enable", "path", "username", "password", "refresh"];

/// The dashboard's settings: the `ui` key, with balancer.yml's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ui {
    /// Serve the page at all (default: no).
    pub enable: bool,
    pub path: String,
    /// `(username, password)`: when set, the page and the stats JSON ask for
    /// them (HTTP Basic); when not, both are open to anyone who can reach
    /// the proxy.
    pub credentials: Option<(String, String)>,
    /// How often the page polls the stats.
    pub refresh: Duration,
}

impl Default for Ui {
    fn default() -> Ui {
        Ui {
            enable: false,
            path: DEFAULT_UI_PATH.to_string(),
            credentials: None,
            refresh: Duration::from_secs_f64(DEFAULT_UI_REFRESH_SECS),
        }
    }
}

impl Ui {
    /// Reads `ui` from the whole document. Unlike elsewhere, an unknown key
    /// here is an error: a misspelt `password` would leave the stats open.
    pub fn from_json(document: &Value) -> Result<Ui, ConfigError> {
        let mut ui = Ui::default();
        let fields = match document.get("ui") {
            None | Some(Value::Null) => return Ok(ui),
            Some(Value::Object(m)) => m,
            Some(v) => {
                return Err(ConfigError::new(
                    "ui",
                    format!("must be a map of dashboard settings, got {}", shown(v)),
                ))
            }
        };
        if let Some(key) = fields.keys().find(|k| !UI_KEYS.contains(&k.as_str())) {
            return Err(ConfigError::new(
                format!("ui.{key}"),
                format!(
                    "unknown key; the dashboard's keys are {}",
                    UI_KEYS.join(", ")
                ),
            ));
        }
        match fields.get("enable") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => ui.enable = *b,
            Some(v) => {
                return Err(ConfigError::new(
                    "ui.enable",
                    format!("must be true or false, got {}", shown(v)),
                ))
            }
        }
        match fields.get("path") {
            None | Some(Value::Null) => {}
            Some(Value::String(p)) if p.starts_with('/') && !p.contains(['?', '#']) => {
                ui.path = p.clone()
            }
            Some(v) => {
                return Err(ConfigError::new(
                    "ui.path",
                    format!(
                        "must be a path starting with '/', without a query string, got {}",
                        shown(v)
                    ),
                ))
            }
        }
        let text = |key: &str| match fields.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(v) => Err(ConfigError::new(
                format!("ui.{key}"),
                format!("must be a non-empty string, got {}", shown(v)),
            )),
        };
        ui.credentials = match (text("username")?, text("password")?) {
            (None, None) => None,
            (Some(user), Some(password)) if !user.contains(':') => Some((user, password)),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "ui.username",
                    "must not contain ':' (HTTP Basic separates it from the password with one)",
                ))
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "ui.password",
                    "missing: set both username and password, or neither",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "ui.username",
                    "missing: set both username and password, or neither",
                ))
            }
        };
        match fields.get("refresh") {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_f64() {
                Some(s) if (0.1..=60.0).contains(&s) => ui.refresh = Duration::from_secs_f64(s),
                _ => {
                    return Err(ConfigError::new(
                        "ui.refresh",
                        format!(
                            "must be a number of seconds from 0.1 to 60, got {}",
                            shown(v)
                        ),
                    ))
                }
            },
        }
        Ok(ui)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn full_document_with_defaults_applied() {
        let c = Config::from_json(&json!({
            "service": "demo",
            "queue_timeout": 30,
            "max_queue": 1000,
            "error_threshold": 0.05,
            "latency_threshold_ms": 2000,
            "storage": {"type": "redis", "url": "redis://127.0.0.1:6379"},
            "ui": {"enable": true, "path": "/balancer/ui"},
            "endpoints": {
                "/predict": {
                    "method": "POST", "headers": {"Content-Type": "application/json"},
                    "body": {"input": "sample"}, "capacity": 10, "queue_timeout": 120
                },
                "/embed": {"match": "prefix", "methods": ["post", "PUT"], "max_queue": 5},
                "/health": null
            }
        }))
        .unwrap();
        assert_eq!(c.service, "demo");
        assert_eq!(c.endpoints.len(), 3);
        let predict = &c.endpoints[0];
        assert_eq!(predict.path, "/predict");
        assert_eq!(predict.capacity, Some(10));
        assert_eq!(predict.queue_timeout, Duration::from_secs(120));
        assert_eq!(predict.max_queue, 1000);
        assert_eq!(predict.match_kind, MatchKind::Exact);
        let embed = &c.endpoints[1];
        assert_eq!(embed.match_kind, MatchKind::Prefix);
        assert_eq!(embed.methods, vec!["POST", "PUT"]);
        assert_eq!(embed.queue_timeout, Duration::from_secs(30));
        assert_eq!(embed.max_queue, 5);
        assert_eq!(embed.abandon_hold, Duration::from_secs(30));
        assert!(embed.count_upgrades);
        assert_eq!(c.endpoints[2].capacity, None);
        // Other parts' keys are not warnings; missing capacities are.
        assert_eq!(
            c.warnings,
            vec![
                ConfigWarning {
                    key: "endpoints./embed.capacity".into(),
                    kind: WarningKind::CapacityNotSet
                },
                ConfigWarning {
                    key: "endpoints./health.capacity".into(),
                    kind: WarningKind::CapacityNotSet
                },
            ]
        );
    }

    #[test]
    fn fractional_queue_timeout() {
        let c = Config::from_json(
            &json!({"queue_timeout": 0.25, "endpoints": {"/a": {"capacity": 1}}}),
        )
        .unwrap();
        assert_eq!(c.endpoints[0].queue_timeout, Duration::from_millis(250));
        assert_eq!(c.service, "default");
    }

    #[test]
    fn metrics_default_on_and_must_be_a_bool() {
        let on = Config::from_json(&json!({"endpoints": {}})).unwrap();
        assert!(on.metrics);
        let off = Config::from_json(&json!({"metrics": false})).unwrap();
        assert!(!off.metrics);
        let e = Config::from_json(&json!({"metrics": "no"})).unwrap_err();
        assert_eq!(e.to_string(), "metrics: must be true or false, got \"no\"");
    }

    #[test]
    fn abandon_hold_and_count_upgrades() {
        let c = Config::from_json(&json!({"abandon_hold": 5, "endpoints": {
            "/a": {"capacity": 1},
            "/b": {"capacity": 1, "abandon_hold": 0, "count_upgrades": false},
        }}))
        .unwrap();
        assert_eq!(c.endpoints[0].abandon_hold, Duration::from_secs(5));
        assert!(c.endpoints[0].count_upgrades);
        assert_eq!(c.endpoints[1].abandon_hold, Duration::ZERO);
        assert_eq!(c.endpoints[0].max_queued_bytes, None);
        assert!(!c.endpoints[1].count_upgrades);
    }

    #[test]
    fn queue_timeouts_envoy_would_cut_are_warned_about_once() {
        let c = Config::from_json(&json!({"queue_timeout": 600, "endpoints": {
            "/a": {"capacity": 1},
            "/b": {"capacity": 1},
            "/c": {"capacity": 1, "queue_timeout": 300},
            "/d": {"capacity": 1, "queue_timeout": 299.9},
        }}))
        .unwrap();
        let texts: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            vec![
                "queue_timeout: 600 s is not below Envoy's default stream_idle_timeout (300 s); set the connection manager's stream_idle_timeout above it, or queued requests get Envoy's 504 \"stream timeout\" at 300 s",
                "endpoints./c.queue_timeout: 300 s is not below Envoy's default stream_idle_timeout (300 s); set the connection manager's stream_idle_timeout above it, or queued requests get Envoy's 504 \"stream timeout\" at 300 s",
            ]
        );
    }

    #[test]
    fn unknown_keys_warn_but_parse() {
        let c = Config::from_json(
            &json!({"colour": "red", "endpoints": {"/a": {"capcity": 3, "capacity": 2}}}),
        )
        .unwrap();
        assert_eq!(
            c.warnings,
            vec![
                ConfigWarning {
                    key: "colour".into(),
                    kind: WarningKind::UnknownKey
                },
                ConfigWarning {
                    key: "endpoints./a.capcity".into(),
                    kind: WarningKind::UnknownKey
                },
            ]
        );
    }

    /// The exact text a user sees for each warning.
    #[test]
    fn warning_texts() {
        let shown = |doc: Value| -> Vec<String> {
            let c = Config::from_json(&doc).unwrap();
            c.warnings.iter().map(ToString::to_string).collect()
        };
        assert_eq!(
            shown(json!({"colour": "red", "endpoints": {"/a": {"capcity": 3}}})),
            vec![
                "colour: unknown key, ignored",
                "endpoints./a.capcity: unknown key, ignored",
                "endpoints./a.capacity: not set; the endpoint is not limited until a capacity is measured",
            ]
        );
        assert_eq!(
            shown(json!({})),
            vec!["endpoints: none configured; every request passes through"]
        );
    }

    /// The exact text a user sees for each bad input.
    #[test]
    fn error_texts() {
        let cases: &[(&str, &str)] = &[
            ("", "configuration: is empty; expected a JSON object"),
            ("[1]", "configuration: must be an object, got [1]"),
            ("{\"service\": 3}", "service: must be a non-empty string, got 3"),
            ("{\"service\": \"\"}", "service: must be a non-empty string, got \"\""),
            (
                "{\"queue_timeout\": -1}",
                "queue_timeout: must be a number of seconds from 0.001 to 86400, got -1",
            ),
            (
                "{\"queue_timeout\": \"30s\"}",
                "queue_timeout: must be a number of seconds from 0.001 to 86400, got \"30s\"",
            ),
            ("{\"max_queue\": -5}", "max_queue: must be an integer from 0 to 10000, got -5"),
            ("{\"max_queue\": 1.5}", "max_queue: must be an integer from 0 to 10000, got 1.5"),
            ("{\"max_queue\": 20000}", "max_queue: must be an integer from 0 to 10000, got 20000"),
            (
                "{\"endpoints\": [\"/a\"]}",
                "endpoints: must be a map from path to endpoint settings, got [\"/a\"]",
            ),
            ("{\"endpoints\": {\"predict\": {}}}", "endpoints.predict: path must start with '/'"),
            (
                "{\"endpoints\": {\"/p?x=1\": {}}}",
                "endpoints./p?x=1: path must not contain a query string (requests match on the path alone)",
            ),
            ("{\"endpoints\": {\"/p\": 5}}", "endpoints./p: must be a map of endpoint settings, got 5"),
            (
                "{\"endpoints\": {\"/p\": {\"capacity\": -3}}}",
                "endpoints./p.capacity: must be a positive integer, got -3",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"capacity\": 0}}}",
                "endpoints./p.capacity: must be a positive integer, got 0",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"capacity\": \"10\"}}}",
                "endpoints./p.capacity: must be a positive integer, got \"10\"",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"capacity\": 2.5}}}",
                "endpoints./p.capacity: must be a positive integer, got 2.5",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"match\": \"regex\"}}}",
                "endpoints./p.match: must be \"exact\" or \"prefix\", got \"regex\"",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"methods\": \"POST\"}}}",
                "endpoints./p.methods: must be a list of HTTP method names, got \"POST\"",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"methods\": [\"GE T\"]}}}",
                "endpoints./p.methods: must be a list of HTTP method names, got \"GE T\"",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"queue_timeout\": 0}}}",
                "endpoints./p.queue_timeout: must be a number of seconds from 0.001 to 86400, got 0",
            ),
            (
                "{\"abandon_hold\": -1}",
                "abandon_hold: must be a number of seconds from 0 (off) to 86400, got -1",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"count_upgrades\": \"no\"}}}",
                "endpoints./p.count_upgrades: must be true or false, got \"no\"",
            ),
            (
                "{\"queue_timeout\": 0.0009}",
                "queue_timeout: must be a number of seconds from 0.001 to 86400, got 0.0009",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"max_queued_bytes\": 0}}}",
                "endpoints./p.max_queued_bytes: must be a positive number of bytes, got 0",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"methods\": []}}}",
                "endpoints./p.methods: is empty, so no request would be limited; leave it out to limit every method",
            ),
            (
                "{\"endpoints\": {\"/p#x\": {}}}",
                "endpoints./p#x: path must not contain '#' (a fragment never reaches the proxy)",
            ),
            (
                "{\"endpoints\": {\"/p q\": {}}}",
                "endpoints./p q: path must not contain spaces (a request path has them as %20)",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"max_queue\": true}}}",
                "endpoints./p.max_queue: must be an integer from 0 to 10000, got true",
            ),
        ];
        for (input, want) in cases {
            let got = Config::from_json_str(input).expect_err(input).to_string();
            assert_eq!(&got, want, "input: {input}");
        }
        let got =
            Config::from_json_str(r#"{"endpoints": {"/p": {"capacity": 2, "capacity": 20}}}"#)
                .unwrap_err()
                .to_string();
        assert_eq!(
            got,
            "endpoints./p.capacity: is given more than once (JSON would keep only the last)"
        );
        let got = Config::from_json_str("{oops").unwrap_err().to_string();
        assert!(
            got.starts_with("configuration: is not valid JSON: "),
            "{got}"
        );
    }

    #[test]
    fn ui_defaults_and_full() {
        assert_eq!(Ui::from_json(&json!({})).unwrap(), Ui::default());
        assert!(!Ui::default().enable);
        let ui = Ui::from_json(&json!({"ui": {
            "enable": true, "path": "/ops/ui", "username": "admin", "password": "s:cret",
            "refresh": 0.5
        }}))
        .unwrap();
        assert_eq!(
            ui,
            Ui {
                enable: true,
                path: "/ops/ui".into(),
                credentials: Some(("admin".into(), "s:cret".into())),
                refresh: Duration::from_millis(500),
            }
        );
    }

    /// The exact text a user sees for each bad `ui`.
    #[test]
    fn ui_error_texts() {
        let cases: &[(Value, &str)] = &[
            (json!({"ui": true}), "ui: must be a map of dashboard settings, got true"),
            (
                json!({"ui": {"passwd": "x"}}),
                "ui.passwd: unknown key; the dashboard's keys are enable, path, username, password, refresh",
            ),
            (json!({"ui": {"enable": "yes"}}), "ui.enable: must be true or false, got \"yes\""),
            (
                json!({"ui": {"path": "ui"}}),
                "ui.path: must be a path starting with '/', without a query string, got \"ui\"",
            ),
            (
                json!({"ui": {"username": "admin"}}),
                "ui.password: missing: set both username and password, or neither",
            ),
            (
                json!({"ui": {"password": "x"}}),
                "ui.username: missing: set both username and password, or neither",
            ),
            (json!({"ui": {"username": "", "password": "x"}}), "ui.username: must be a non-empty string, got \"\""),
            (
                json!({"ui": {"username": "a:b", "password": "x"}}),
                "ui.username: must not contain ':' (HTTP Basic separates it from the password with one)",
            ),
            (json!({"ui": {"refresh": 0}}), "ui.refresh: must be a number of seconds from 0.1 to 60, got 0"),
        ];
        for (input, want) in cases {
            let got = Ui::from_json(input)
                .expect_err(&input.to_string())
                .to_string();
            assert_eq!(&got, want, "input: {input}");
        }
    }
}
