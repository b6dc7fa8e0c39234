//! The enforcement part of `sluice.yaml`: what the filter limits, and how
//! (the keys are documented for users in `docs/filter.md`).
//!
//! Keys that belong to other parts (the prober's `method`, `headers`, `body`,
//! thresholds, `storage`, `ui`) are accepted and left alone; keys nobody
//! knows produce a warning, not a failure, so a newer prober's file never
//! stops an older filter.

use super::check::{self, unknown_keys, ConfigError, ConfigWarning, WarningKind};
use super::classes::Classes;
use super::cost::Cost;
use super::document::{Document, EndpointDoc, Section};
use super::instances::Instances;
use super::shown;
use super::tenants::Tenants;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// Default seconds a request may wait for a slot (fastapi-balancer's default).
pub const DEFAULT_QUEUE_TIMEOUT_SECS: f64 = 30.0;
/// Default number of waiting requests per endpoint before `503 queue-full`.
pub const DEFAULT_MAX_QUEUE: u32 = 1000;
/// Upper bound on `max_queue`. Every waiter is 17 bytes in the endpoint's
/// shared-data record, which is copied on each queue operation, so an
/// unbounded queue would make every admission slower as it grows.
pub const MAX_QUEUE_LIMIT: u32 = 10_000;
/// Default longest hold of an abandoned request's slot, seconds.
pub const DEFAULT_ABANDON_HOLD_SECS: f64 = 30.0;
/// Default `max_upload_time`: a body still arriving a minute after its
/// request took a slot is a slow client, not a busy backend.
pub const DEFAULT_MAX_UPLOAD_TIME_SECS: f64 = 60.0;
/// Default HTTP status of a `queue-full` refusal (fastapi-balancer's).
pub const DEFAULT_QUEUE_FULL_STATUS: u16 = 503;
/// Service name used when the document has none.
pub const DEFAULT_SERVICE: &str = "default";

/// The whole enforcement configuration of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub service: String,
    pub queue_timeout: Duration,
    pub max_queue: u32,
    pub abandon_hold: Duration,
    pub max_upload_time: Duration,
    /// HTTP status of a `queue-full` refusal: 503 or 429.
    pub queue_full_status: u16,
    /// Whether the filter defines its metrics in Envoy's stats (default
    /// true); false leaves Envoy's stats without them.
    pub metrics: bool,
    pub endpoints: Vec<Endpoint>,
    /// The instances the filter picks from (`instances`); `None`: a sidecar,
    /// or a front proxy that counts for everything behind it.
    pub instances: Option<Instances>,
    /// Request classes (`classes`); `None`: one class, one FIFO.
    pub classes: Option<Classes>,
    /// `deadline_header`, lower-case.
    pub deadline_header: Option<String>,
    /// Fair shares between tenants (`tenants`).
    pub tenants: Option<Tenants>,
    /// A request whose own deadline comes before the soonest it could get
    /// a slot (by the measured durations) is answered at once.
    pub refuse_unreachable_deadlines: bool,
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
    /// Longest time from admission to the end of the request body; zero:
    /// no limit. A body still arriving past it gets 408 and frees its slot.
    pub max_upload_time: Duration,
    /// HTTP status of its `queue-full` refusals: 503 or 429.
    pub queue_full_status: u16,
    /// Whether upgraded requests (websockets) hold a slot for their life.
    pub count_upgrades: bool,
    /// Cap on the `content-length` bytes of all queued requests together.
    pub max_queued_bytes: Option<u64>,
    /// Capacities of instances that differ from `capacity`
    /// (`instance_capacity`).
    pub instance_capacity: Vec<(SocketAddr, u32)>,
    /// The class (an index into the classes) of its requests that name none.
    pub class: Option<u8>,
    /// Its capacity counts units of cost (`cost`); `None`: requests.
    pub cost: Option<Cost>,
}

/// The service-wide values an endpoint falls back to.
struct Defaults {
    queue_timeout: Duration,
    max_queue: u32,
    abandon_hold: Duration,
    max_upload_time: Duration,
    queue_full_status: u16,
    cost: Option<Cost>,
}

impl Config {
    /// Parses the JSON text of the plugin configuration.
    pub fn from_json_str(text: &str) -> Result<Config, ConfigError> {
        Config::try_from(&Document::from_value(&super::plugin_json(text)?)?)
    }

    /// Parses an already-decoded document (JSON, or YAML turned into JSON).
    pub fn from_json(value: &Value) -> Result<Config, ConfigError> {
        Config::try_from(&Document::from_value(value)?)
    }
}

impl TryFrom<&Document> for Config {
    type Error = ConfigError;

    fn try_from(doc: &Document) -> Result<Config, ConfigError> {
        let mut warnings = unknown_keys(&doc.unknown, "");
        let service = check::text(doc.service.as_ref(), "service")?
            .unwrap_or_else(|| DEFAULT_SERVICE.to_string());
        let defaults = Defaults {
            queue_timeout: check::seconds_or(
                doc.queue_timeout.as_ref(),
                "queue_timeout",
                check::QUEUE_TIMEOUT,
                Duration::from_secs_f64(DEFAULT_QUEUE_TIMEOUT_SECS),
            )?,
            max_queue: queue_len(doc.max_queue.as_ref(), "max_queue", DEFAULT_MAX_QUEUE)?,
            abandon_hold: check::seconds_or(
                doc.abandon_hold.as_ref(),
                "abandon_hold",
                check::HOLD,
                Duration::from_secs_f64(DEFAULT_ABANDON_HOLD_SECS),
            )?,
            max_upload_time: check::seconds_or(
                doc.max_upload_time.as_ref(),
                "max_upload_time",
                check::HOLD,
                Duration::from_secs_f64(DEFAULT_MAX_UPLOAD_TIME_SECS),
            )?,
            queue_full_status: queue_full_status(
                doc.queue_full_status.as_ref(),
                "queue_full_status",
                DEFAULT_QUEUE_FULL_STATUS,
            )?,
            cost: Cost::parse(doc.cost.as_ref(), "cost", &mut warnings)?.flatten(),
        };
        let metrics = check::flag(doc.metrics.as_ref(), "metrics", true)?;

        let specs = doc.endpoints().map_err(|v| {
            ConfigError::new(
                "endpoints",
                format!(
                    "must be a map from path to endpoint settings, got {}",
                    shown(v)
                ),
            )
        })?;
        let instances = Instances::from_document(doc, &mut warnings)?;
        let classes = Classes::from_document(doc, &mut warnings)?;
        let tenants = Tenants::from_document(doc, &mut warnings)?;
        let refuse_unreachable_deadlines = check::flag(
            doc.refuse_unreachable_deadlines.as_ref(),
            "refuse_unreachable_deadlines",
            true,
        )?;
        let deadline_header = check::header_name(doc.deadline_header.as_ref(), "deadline_header")?;
        let mut endpoints = Vec::new();
        for (path, spec) in specs.into_iter().flatten() {
            endpoints.push(endpoint(
                path,
                spec.as_ref(),
                &defaults,
                instances.as_ref(),
                classes.as_ref(),
                &mut warnings,
            )?);
        }
        if endpoints.is_empty() {
            warnings.push(ConfigWarning {
                key: "endpoints".into(),
                kind: WarningKind::NoEndpoints,
            });
        }
        long_queue_timeout_warnings(defaults.queue_timeout, &endpoints, &mut warnings);
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
            queue_timeout: defaults.queue_timeout,
            max_queue: defaults.max_queue,
            abandon_hold: defaults.abandon_hold,
            max_upload_time: defaults.max_upload_time,
            queue_full_status: defaults.queue_full_status,
            metrics,
            endpoints,
            instances,
            classes,
            deadline_header,
            tenants,
            refuse_unreachable_deadlines,
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

/// Why an endpoint path can never match a request, if it cannot.
pub fn path_problem(path: &str) -> Option<String> {
    let fixed = |s: &str| Some(s.to_string());
    if !path.starts_with('/') {
        fixed("path must start with '/'")
    } else if path.contains('?') {
        fixed("path must not contain a query string (requests match on the path alone)")
    } else if path.contains('#') {
        fixed("path must not contain '#' (a fragment never reaches the proxy)")
    } else if path.chars().any(char::is_whitespace) {
        fixed("path must not contain spaces (a request path has them as %20)")
    } else {
        // Requests are matched on their normalised path: a key in any other
        // spelling would never match one.
        let normal = crate::path::request_path(path);
        (normal != path).then(|| {
            format!(
                "requests are matched on their normalised path, so this one would never match; \
                 write it as {normal:?} (escaped UTF-8 and unreserved characters decoded, \
                 dot segments and repeated slashes removed)"
            )
        })
    }
}

fn endpoint(
    path: &str,
    spec: Option<&Section<EndpointDoc>>,
    defaults: &Defaults,
    instances: Option<&Instances>,
    classes: Option<&Classes>,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<Endpoint, ConfigError> {
    let key = |field: &str| format!("endpoints.{path}.{field}");
    if let Some(problem) = path_problem(path) {
        return Err(ConfigError::new(format!("endpoints.{path}"), problem));
    }
    let empty = EndpointDoc::default();
    let fields = match spec {
        None => &empty,
        Some(Section::Map(m)) => m,
        Some(Section::Bad(v)) => {
            return Err(ConfigError::new(
                format!("endpoints.{path}"),
                format!("must be a map of endpoint settings, got {}", shown(v)),
            ))
        }
    };
    warnings.extend(unknown_keys(&fields.unknown, &format!("endpoints.{path}.")));

    let match_kind = match &fields.match_kind {
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
    let methods = match &fields.methods {
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
    let capacity = match &fields.capacity {
        None | Some(Value::Null) => None,
        Some(v) => Some(capacity(v).ok_or_else(|| {
            ConfigError::new(
                key("capacity"),
                format!("must be a positive integer, got {}", shown(v)),
            )
        })?),
    };
    let queue_timeout = check::seconds_or(
        fields.queue_timeout.as_ref(),
        &key("queue_timeout"),
        check::QUEUE_TIMEOUT,
        defaults.queue_timeout,
    )?;
    let max_queue = queue_len(
        fields.max_queue.as_ref(),
        &key("max_queue"),
        defaults.max_queue,
    )?;
    let abandon_hold = check::seconds_or(
        fields.abandon_hold.as_ref(),
        &key("abandon_hold"),
        check::HOLD,
        defaults.abandon_hold,
    )?;
    let max_upload_time = check::seconds_or(
        fields.max_upload_time.as_ref(),
        &key("max_upload_time"),
        check::HOLD,
        defaults.max_upload_time,
    )?;
    let queue_full_status = queue_full_status(
        fields.queue_full_status.as_ref(),
        &key("queue_full_status"),
        defaults.queue_full_status,
    )?;
    let count_upgrades = check::flag(fields.count_upgrades.as_ref(), &key("count_upgrades"), true)?;
    let max_queued_bytes = match &fields.max_queued_bytes {
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
    let instance_capacity = match &fields.instance_capacity {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => super::instances::instance_capacity(v, &key("instance_capacity"), instances)?,
    };
    let class = match check::text(fields.class.as_ref(), &key("class"))? {
        None => None,
        Some(name) => match classes {
            None => {
                return Err(ConfigError::new(
                    key("class"),
                    "is set but there are no classes; define them under classes:",
                ))
            }
            Some(c) => Some(c.index(&name).ok_or_else(|| {
                let names: Vec<&str> = c.list.iter().map(|c| c.name.as_str()).collect();
                ConfigError::new(
                    key("class"),
                    format!("{name:?} is not one of the classes ({})", names.join(", ")),
                )
            })?),
        },
    };
    let cost = Cost::parse(fields.cost.as_ref(), &key("cost"), warnings)?
        .unwrap_or_else(|| defaults.cost.clone());
    Ok(Endpoint {
        path: path.to_string(),
        match_kind,
        methods,
        capacity,
        queue_timeout,
        max_queue,
        abandon_hold,
        max_upload_time,
        queue_full_status,
        count_upgrades,
        max_queued_bytes,
        instance_capacity,
        class,
        cost,
    })
}

impl Endpoint {
    /// The static instances with this endpoint's own capacity of each
    /// (`None`: the endpoint's `capacity`).
    pub fn instance_hosts(&self, instances: &Instances) -> Vec<(SocketAddr, Option<u32>)> {
        instances
            .hosts()
            .iter()
            .map(|&a| (a, self.own_capacity(&a)))
            .collect()
    }

    /// The capacity `instance_capacity` gives instance `a`, if any.
    pub fn own_capacity(&self, a: &SocketAddr) -> Option<u32> {
        self.instance_capacity
            .iter()
            .find(|(b, _)| b == a)
            .map(|&(_, c)| c)
    }
}

/// A valid `capacity` value: a positive integer that fits a `u32`.
pub fn capacity(v: &Value) -> Option<u32> {
    v.as_u64()
        .filter(|n| *n >= 1 && *n <= u64::from(u32::MAX))
        .map(|n| n as u32)
}

/// 503 (the default, as fastapi-balancer answers) or 429 (what most HTTP
/// clients and libraries treat as "slow down"); nothing else, since a
/// client must be able to tell a refusal from the backend's own errors.
fn queue_full_status(v: Option<&Value>, key: &str, default: u16) -> Result<u16, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(503) => Ok(503),
            Some(429) => Ok(429),
            _ => Err(ConfigError::new(
                key,
                format!("must be 503 or 429, got {}", shown(v)),
            )),
        },
    }
}

fn queue_len(v: Option<&Value>, key: &str, default: u32) -> Result<u32, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => Ok(check::integer(v, key, 0, u64::from(MAX_QUEUE_LIMIT))? as u32),
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
    fn queue_full_status_defaults_to_503_and_endpoints_override_it() {
        let c = Config::from_json(&json!({"endpoints": {"/a": {"capacity": 1}}})).unwrap();
        assert_eq!(c.queue_full_status, 503);
        assert_eq!(c.endpoints[0].queue_full_status, 503);
        let c = Config::from_json(&json!({"queue_full_status": 429, "endpoints": {
            "/a": {"capacity": 1},
            "/b": {"capacity": 1, "queue_full_status": 503},
        }}))
        .unwrap();
        assert_eq!(c.endpoints[0].queue_full_status, 429);
        assert_eq!(c.endpoints[1].queue_full_status, 503);
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
                "{\"endpoints\": {\"/pr%C3%A9dict\": {}}}",
                "endpoints./pr%C3%A9dict: requests are matched on their normalised path, so this one would never match; \
                 write it as \"/prédict\" (escaped UTF-8 and unreserved characters decoded, \
                 dot segments and repeated slashes removed)",
            ),
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
                "{\"queue_full_status\": 500}",
                "queue_full_status: must be 503 or 429, got 500",
            ),
            (
                "{\"endpoints\": {\"/p\": {\"queue_full_status\": \"429\"}}}",
                "endpoints./p.queue_full_status: must be 503 or 429, got \"429\"",
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
}
