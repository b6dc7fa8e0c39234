//! Reading `sluice.yaml` (or fastapi-balancer's `balancer.yml`, same keys).
//!
//! The file is read once into `sluice_core::config::Document`; the
//! enforcement keys are checked by `sluice_core::config`, exactly as the
//! filter checks them; this module checks the prober's own keys (thresholds,
//! `probe:` timings, each endpoint's `method`, `headers`, `body`) with the
//! same checks, and puts the file name and line in front of every message.

use crate::{config_edit, yaml_lines};
use hyper::header::{HeaderName, HeaderValue};
use serde_json::Value;
use sluice_core::capacity_record::InstanceCapacities;
use sluice_core::config::check::{self, PROBE, PROBE_WARMUP};
use sluice_core::config::{
    shown, Config, ConfigError, Document, EndpointDoc, ProbeDoc, Section, WarningKind,
};
use sluice_core::redis_keys::Storage;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Marks a capacity the prober wrote (in the comment of its line), so a later
/// run can tell a measured capacity from one set by hand.
pub const MEASURED_MARK: &str = "sluice-prober:";

/// A mistake in the file, located as precisely as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFileError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigFileError {}

/// The prober's settings as the file gives them (all optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileSettings {
    pub error_threshold: Option<f64>,
    pub latency_threshold_ms: Option<f64>,
    pub warmup: Option<Duration>,
    pub duration: Option<Duration>,
    pub max_duration: Option<Duration>,
    pub min_samples: Option<u64>,
    pub max_concurrency: Option<usize>,
    pub request_timeout: Option<Duration>,
    pub threads: Option<usize>,
}

/// How to call one endpoint, and what the file says of its capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    pub path: String,
    pub method: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Value>,
    pub capacity: Option<u32>,
    /// The comment on the `capacity:` line, when there is one.
    pub capacity_note: Option<String>,
    /// `instance_capacity: {ADDR: N}`: each instance's own capacity, where
    /// it differs (what `--each-instance` measured, or set by hand).
    pub instance_capacity: InstanceCapacities,
}

impl EndpointSpec {
    pub fn new(path: &str) -> EndpointSpec {
        EndpointSpec {
            path: path.to_string(),
            method: "GET".to_string(),
            headers: Vec::new(),
            body: None,
            capacity: None,
            capacity_note: None,
            instance_capacity: InstanceCapacities::new(),
        }
    }

    /// The capacity was written by the prober (its line carries our mark).
    pub fn capacity_was_measured(&self) -> bool {
        self.capacity_note
            .as_deref()
            .is_some_and(|n| n.starts_with(MEASURED_MARK))
    }
}

#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
    pub doc: Value,
    pub config: Config,
    pub settings: FileSettings,
    pub storage: Option<Storage>,
    /// In file order.
    pub endpoints: Vec<EndpointSpec>,
}

impl ConfigFile {
    pub fn endpoint(&self, path: &str) -> Option<&EndpointSpec> {
        self.endpoints.iter().find(|e| e.path == path)
    }

    /// Warnings worth showing a prober user (unknown keys, mostly).
    pub fn warnings(&self) -> Vec<String> {
        self.config
            .warnings
            .iter()
            // Not measured yet is what the prober is here to fix.
            .filter(|w| {
                !matches!(
                    w.kind,
                    WarningKind::CapacityNotSet | WarningKind::NoEndpoints
                )
            })
            .map(|w| match line_of(&self.text, &self.doc, &w.key) {
                Some(l) => format!("{}:{l}: warning: {w}", self.path.display()),
                None => format!("{}: warning: {w}", self.path.display()),
            })
            .collect()
    }
}

/// Reads and checks the file.
pub fn load(path: &Path) -> Result<ConfigFile, ConfigFileError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError {
        file: file.clone(),
        line: None,
        column: None,
        message: format!("cannot read: {e}"),
    })?;
    let mut cfg = parse_text(&file, &text)?;
    cfg.path = path.to_path_buf();
    Ok(cfg)
}

/// Checks YAML text as if it were the file `file`.
pub fn parse_text(file: &str, text: &str) -> Result<ConfigFile, ConfigFileError> {
    let fail = |line: Option<usize>, column: Option<usize>, message: String| ConfigFileError {
        file: file.to_string(),
        line,
        column,
        message,
    };
    let doc = if text.trim().is_empty() {
        return Err(fail(
            None,
            None,
            "is empty; expected a YAML mapping with `endpoints:`".into(),
        ));
    } else {
        match config_edit::parse(text) {
            Ok(v) => v,
            Err(e) => {
                let loc = e.location();
                let message = e.to_string();
                // yaml_serde appends " at line L column C"; we lead with it.
                let message = match message.find(" at line ") {
                    Some(i) => message[..i].to_string(),
                    None => message,
                };
                return Err(fail(
                    loc.as_ref().map(|l| l.line()),
                    loc.as_ref().map(|l| l.column()),
                    format!("not valid YAML: {message}"),
                ));
            }
        }
    };
    let located = |e: ConfigError| fail(line_of(text, &doc, e.key()), None, e.to_string());
    let document = Document::from_value(&doc).map_err(located)?;
    let config = Config::try_from(&document).map_err(located)?;
    let storage = Storage::from_json(&doc).map_err(located)?;
    let settings = file_settings(&document).map_err(located)?;
    let mut endpoints = Vec::new();
    if let Ok(Some(map)) = document.endpoints() {
        for (path, spec) in map {
            let fields = match spec {
                Some(Section::Map(fields)) => fields,
                // Any other value was refused by the core parser.
                _ => &EndpointDoc::default(),
            };
            let mut e = endpoint_spec(path, fields).map_err(located)?;
            if e.capacity.is_some() {
                e.capacity_note = yaml_lines::capacity_comment(text, path);
            }
            e.instance_capacity =
                instance_capacity(doc.get("endpoints").and_then(|m| m.get(path)), path)
                    .map_err(located)?;
            endpoints.push(e);
        }
    }
    Ok(ConfigFile {
        path: PathBuf::from(file),
        text: text.to_string(),
        doc,
        config,
        settings,
        storage,
        endpoints,
    })
}

/// The line of a dotted key path like `endpoints./v1.2/predict.capacity`,
/// resolving endpoint paths (which contain dots) against the document.
pub fn line_of(text: &str, doc: &Value, key: &str) -> Option<usize> {
    let (head, rest) = match key.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (key, None),
    };
    let mut keys: Vec<&str> = vec![head];
    if let Some(rest) = rest {
        if head == "endpoints" {
            let paths: Vec<&str> = doc
                .get("endpoints")
                .and_then(Value::as_object)
                .map(|m| m.keys().map(String::as_str).collect())
                .unwrap_or_default();
            // The longest endpoint path that the rest starts with.
            let path = paths
                .iter()
                .filter(|p| rest == **p || rest.starts_with(&format!("{p}.")))
                .max_by_key(|p| p.len());
            match path {
                Some(p) => {
                    keys.push(p);
                    if rest.len() > p.len() {
                        keys.extend(rest[p.len() + 1..].split('.'));
                    }
                }
                None => keys.extend(rest.split('.')),
            }
        } else {
            keys.extend(rest.split('.'));
        }
    }
    yaml_lines::locate(text, &keys)
}

fn whole(v: &Value, key: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    match v.as_u64() {
        Some(n) if n >= min && n <= max => Ok(n),
        _ => Err(ConfigError::new(
            key,
            format!(
                "must be a whole number from {min} to {max}, got {}",
                shown(v)
            ),
        )),
    }
}

/// Checks an error threshold given as a fraction.
pub fn error_threshold(v: &Value, key: &str) -> Result<f64, ConfigError> {
    match v.as_f64() {
        Some(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(ConfigError::new(
            key,
            format!(
                "must be a fraction from 0 to 1 (0.05 is 5%), got {}",
                shown(v)
            ),
        )),
    }
}

/// Checks a latency threshold in milliseconds.
pub fn latency_threshold_ms(v: &Value, key: &str) -> Result<f64, ConfigError> {
    match v.as_f64() {
        Some(f) if f > 0.0 && f <= 3_600_000.0 => Ok(f),
        _ => Err(ConfigError::new(
            key,
            format!(
                "must be a number of milliseconds greater than 0, got {}",
                shown(v)
            ),
        )),
    }
}

fn file_settings(doc: &Document) -> Result<FileSettings, ConfigError> {
    let mut s = FileSettings::default();
    let present = |v: &Option<Value>| v.clone().filter(|v| !v.is_null());
    if let Some(v) = present(&doc.error_threshold) {
        s.error_threshold = Some(error_threshold(&v, "error_threshold")?);
    }
    if let Some(v) = present(&doc.latency_threshold_ms) {
        s.latency_threshold_ms = Some(latency_threshold_ms(&v, "latency_threshold_ms")?);
    }
    let probe: &ProbeDoc = match &doc.probe {
        None => return Ok(s),
        Some(Section::Map(m)) => m,
        Some(Section::Bad(v)) => {
            return Err(ConfigError::new(
                "probe",
                format!(
                    "must be a map of level settings (warmup, duration, …), got {}",
                    shown(v)
                ),
            ))
        }
    };
    if let Some(k) = probe.unknown.keys().next() {
        return Err(ConfigError::new(
            format!("probe.{k}"),
            "unknown key (expected warmup, duration, max_duration, min_samples, max_concurrency, request_timeout or threads)",
        ));
    }
    let secs = |v: &Option<Value>, k: &str, range| match present(v) {
        None => Ok(None),
        Some(v) => check::seconds(&v, &format!("probe.{k}"), range).map(Some),
    };
    let count = |v: &Option<Value>, k: &str, min, max| match present(v) {
        None => Ok(None),
        Some(v) => whole(&v, &format!("probe.{k}"), min, max).map(Some),
    };
    s.warmup = secs(&probe.warmup, "warmup", PROBE_WARMUP)?;
    s.duration = secs(&probe.duration, "duration", PROBE)?;
    s.max_duration = secs(&probe.max_duration, "max_duration", PROBE)?;
    s.min_samples = count(&probe.min_samples, "min_samples", 0, 10_000_000)?;
    s.max_concurrency =
        count(&probe.max_concurrency, "max_concurrency", 1, 10_000)?.map(|n| n as usize);
    s.request_timeout = secs(&probe.request_timeout, "request_timeout", PROBE)?;
    s.threads = count(&probe.threads, "threads", 1, 64)?.map(|n| n as usize);
    Ok(s)
}

/// Checks a method name and returns it upper-cased.
pub fn method(v: &str, key: &str) -> Result<String, ConfigError> {
    if !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(v.to_ascii_uppercase())
    } else {
        Err(ConfigError::new(
            key,
            format!("must be an HTTP method name like GET or POST, got {v:?}"),
        ))
    }
}

/// Checks a header name and value the way the HTTP client will.
pub fn header(name: &str, value: &str, key: &str) -> Result<(String, String), ConfigError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| ConfigError::new(key, format!("{name:?} is not a valid header name")))?;
    HeaderValue::from_str(value)
        .map_err(|_| ConfigError::new(key, format!("{value:?} is not a valid header value")))?;
    Ok((name.to_string(), value.to_string()))
}

fn endpoint_spec(path: &str, fields: &EndpointDoc) -> Result<EndpointSpec, ConfigError> {
    let key = |f: &str| format!("endpoints.{path}.{f}");
    let mut e = EndpointSpec::new(path);
    match &fields.method {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) => e.method = method(m, &key("method"))?,
        Some(v) => {
            return Err(ConfigError::new(
                key("method"),
                format!(
                    "must be an HTTP method name like GET or POST, got {}",
                    shown(v)
                ),
            ))
        }
    }
    match &fields.headers {
        None | Some(Value::Null) => {}
        Some(Value::Object(h)) => {
            for (name, value) in h {
                let value = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(_) | Value::Bool(_) => value.to_string(),
                    other => {
                        return Err(ConfigError::new(
                            format!("{}.{name}", key("headers")),
                            format!("must be a string, got {}", shown(other)),
                        ))
                    }
                };
                e.headers
                    .push(header(name, &value, &format!("{}.{name}", key("headers")))?);
            }
        }
        Some(v) => {
            return Err(ConfigError::new(
                key("headers"),
                format!("must be a map of header names to values, got {}", shown(v)),
            ))
        }
    }
    e.body = fields.body.clone().filter(|b| !b.is_null());
    // Already checked by the core parser; read the value it accepted.
    e.capacity = fields
        .capacity
        .as_ref()
        .and_then(sluice_core::config::capacity);
    Ok(e)
}

/// `endpoints.PATH.instance_capacity`: a map of `ip:port` (or
/// `[ipv6]:port`) to a positive integer. Addresses are kept as Rust prints
/// them, as sync and Envoy do.
pub fn instance_capacity(
    endpoint: Option<&Value>,
    path: &str,
) -> Result<InstanceCapacities, ConfigError> {
    let key = format!("endpoints.{path}.instance_capacity");
    let mut out = InstanceCapacities::new();
    match endpoint.and_then(|e| e.get("instance_capacity")) {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (address, value) in map {
                let parsed: std::net::SocketAddr = address.parse().map_err(|_| {
                    ConfigError::new(
                        format!("{key}.{address}"),
                        "must be an instance address ip:port or [ipv6]:port",
                    )
                })?;
                let c = sluice_core::config::capacity(value).ok_or_else(|| {
                    ConfigError::new(
                        format!("{key}.{address}"),
                        format!("must be a positive integer, got {}", shown(value)),
                    )
                })?;
                out.insert(parsed.to_string(), c);
            }
        }
        Some(v) => {
            return Err(ConfigError::new(
                key,
                format!(
                    "must be a map of instance address to capacity, like {{\"127.0.0.1:8001\": 4}}, got {}",
                    shown(v)
                ),
            ))
        }
    }
    Ok(out)
}

/// The bytes to send for a `body` value and the content type it implies:
/// a string is sent as it is; anything else as JSON.
pub fn body_bytes(body: Option<&Value>) -> (Vec<u8>, Option<&'static str>) {
    match body {
        None | Some(Value::Null) => (Vec::new(), None),
        Some(Value::String(s)) => (s.clone().into_bytes(), None),
        Some(other) => (other.to_string().into_bytes(), Some("application/json")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<ConfigFile, String> {
        parse_text("sluice.yaml", text).map_err(|e| e.to_string())
    }

    #[test]
    fn full_file() {
        let c = check(
            "service: demo
error_threshold: 0.02
latency_threshold_ms: 250
probe: {warmup: 0.5, duration: 2, min_samples: 100, max_concurrency: 64, threads: 2}
storage: {type: redis, url: \"redis://127.0.0.1:7000\"}
endpoints:
  /predict:
    method: post
    headers: {Content-Type: application/json, X-N: 3}
    body: {input: sample}
  /fixed:
    capacity: 10 # sluice-prober: p99 21 ms
  /manual:
    capacity: 4
",
        )
        .unwrap();
        assert_eq!(c.config.service, "demo");
        assert_eq!(c.settings.error_threshold, Some(0.02));
        assert_eq!(c.settings.latency_threshold_ms, Some(250.0));
        assert_eq!(c.settings.warmup, Some(Duration::from_millis(500)));
        assert_eq!(c.settings.min_samples, Some(100));
        assert_eq!(c.settings.threads, Some(2));
        assert_eq!(
            c.storage,
            Some(Storage::Redis {
                url: "redis://127.0.0.1:7000".into()
            })
        );
        let p = &c.endpoints[0];
        assert_eq!(p.method, "POST");
        assert_eq!(
            p.headers,
            vec![
                ("Content-Type".to_string(), "application/json".to_string()),
                ("X-N".to_string(), "3".to_string())
            ]
        );
        assert_eq!(body_bytes(p.body.as_ref()).0, br#"{"input":"sample"}"#);
        assert!(c.endpoints[1].capacity_was_measured());
        assert_eq!(c.endpoints[2].capacity, Some(4));
        assert!(!c.endpoints[2].capacity_was_measured());
    }

    /// One row per mistake: the file, the exact message a user sees.
    #[test]
    fn error_messages_name_file_line_and_problem() {
        let cases: &[(&str, &str)] = &[
            ("", "sluice.yaml: is empty; expected a YAML mapping with `endpoints:`"),
            (
                "endpoints:\n  /a:\n    method: GET\n   bad\n",
                "sluice.yaml:4:4: not valid YAML: did not find expected key",
            ),
            (
                "service: x\nendpoints:\n  /a: {capacity: -3}\n",
                "sluice.yaml:3: endpoints./a.capacity: must be a positive integer, got -3",
            ),
            (
                "endpoints:\n  /v1.2/a:\n    method: GET\n    capacity: zero\n",
                "sluice.yaml:4: endpoints./v1.2/a.capacity: must be a positive integer, got \"zero\"",
            ),
            (
                "error_threshold: 5\nendpoints: {}\n",
                "sluice.yaml:1: error_threshold: must be a fraction from 0 to 1 (0.05 is 5%), got 5",
            ),
            (
                "latency_threshold_ms: -1\n",
                "sluice.yaml:1: latency_threshold_ms: must be a number of milliseconds greater than 0, got -1",
            ),
            (
                "probe:\n  duration: 0\n",
                "sluice.yaml:2: probe.duration: must be a number of seconds greater than 0 and at most 3600, got 0",
            ),
            (
                "probe:\n  warmpu: 1\n",
                "sluice.yaml:2: probe.warmpu: unknown key (expected warmup, duration, max_duration, min_samples, max_concurrency, request_timeout or threads)",
            ),
            (
                "endpoints:\n  /a:\n    method: \"PO ST\"\n",
                "sluice.yaml:3: endpoints./a.method: must be an HTTP method name like GET or POST, got \"PO ST\"",
            ),
            (
                "endpoints:\n  /a:\n    headers:\n      \"Bad Name\": x\n",
                "sluice.yaml:4: endpoints./a.headers.Bad Name: \"Bad Name\" is not a valid header name",
            ),
            (
                "storage:\n  type: etcd\n",
                "sluice.yaml:2: storage.type: must be \"redis\" or \"memory\", got \"etcd\"",
            ),
            (
                "endpoints:\n  predict:\n    method: GET\n",
                "sluice.yaml:2: endpoints.predict: path must start with '/'",
            ),
            (
                "endpoints:\n  /a: 1\n  /a: 2\n",
                "sluice.yaml:2:3: not valid YAML: endpoints: duplicate entry with key \"/a\"",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(check(text).unwrap_err(), *want, "for {text:?}");
        }
    }

    #[test]
    fn unknown_keys_warn_with_their_line() {
        let mut c = check("service: x\nendpoints:\n  /a:\n    methdo: GET\n").unwrap();
        c.path = PathBuf::from("b.yml");
        assert_eq!(
            c.warnings(),
            vec!["b.yml:4: warning: endpoints./a.methdo: unknown key, ignored"]
        );
    }
}
