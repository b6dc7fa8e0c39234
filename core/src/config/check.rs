//! The checks every part applies to a value of `sluice.yaml`, and the error
//! and warning they report, so every part words the same mistake alike.

use serde_json::{Map, Value};
use std::fmt;
use std::time::Duration;

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
    /// `health_endpoint` without `health.cluster`: no health checks.
    HealthCheckOff,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            WarningKind::UnknownKey => "unknown key, ignored",
            WarningKind::NoEndpoints => "none configured; every request passes through",
            WarningKind::CapacityNotSet => {
                "not set; the endpoint is not limited until a capacity is measured"
            }
            WarningKind::HealthCheckOff => {
                "not set; health checks are off (the filter needs the Envoy cluster of the \
                 backend to call health_endpoint)"
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

/// One warning per key of `unknown` (the keys a section's type does not
/// name), prefixed with the section's dotted path.
pub fn unknown_keys(unknown: &Map<String, Value>, prefix: &str) -> Vec<ConfigWarning> {
    unknown
        .keys()
        .map(|key| ConfigWarning {
            key: format!("{prefix}{key}"),
            kind: WarningKind::UnknownKey,
        })
        .collect()
}

/// The seconds a duration key accepts, and how its error says so.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecondsRange {
    pub min: f64,
    /// `min` itself is refused ("greater than 0").
    pub min_exclusive: bool,
    pub max: f64,
    /// The range as the error words it, after "must be a number of seconds".
    pub wording: &'static str,
}

impl SecondsRange {
    pub fn contains(&self, s: f64) -> bool {
        let above = if self.min_exclusive {
            s > self.min
        } else {
            s >= self.min
        };
        above && s <= self.max
    }
}

// Durations past a day are certainly a unit mistake (ms for s). Below a
// millisecond is certainly a unit mistake too (and below the tick that times
// waiters out).
pub const QUEUE_TIMEOUT: SecondsRange = SecondsRange {
    min: 0.001,
    min_exclusive: false,
    max: 86_400.0,
    wording: "from 0.001 to 86400",
};
/// Zero turns the behaviour off.
pub const HOLD: SecondsRange = SecondsRange {
    min: 0.0,
    min_exclusive: false,
    max: 86_400.0,
    wording: "from 0 (off) to 86400",
};
/// The callouts' timings (sync heartbeat, health interval and timeout).
pub const CALLOUT: SecondsRange = SecondsRange {
    min: 0.0,
    min_exclusive: true,
    max: 86_400.0,
    wording: "greater than 0 and at most 86400",
};
pub const UI_REFRESH: SecondsRange = SecondsRange {
    min: 0.1,
    min_exclusive: false,
    max: 60.0,
    wording: "from 0.1 to 60",
};
/// The prober's level timings: an hour per level is already absurd.
pub const PROBE: SecondsRange = SecondsRange {
    min: 0.0,
    min_exclusive: true,
    max: 3600.0,
    wording: "greater than 0 and at most 3600",
};
pub const PROBE_WARMUP: SecondsRange = SecondsRange {
    min: 0.0,
    min_exclusive: false,
    max: 3600.0,
    wording: "from 0 and at most 3600",
};

/// The one duration check of `sluice.yaml`.
pub fn seconds(v: &Value, key: &str, range: SecondsRange) -> Result<Duration, ConfigError> {
    match v.as_f64() {
        Some(s) if range.contains(s) => Ok(Duration::from_secs_f64(s)),
        _ => Err(ConfigError::new(
            key,
            format!(
                "must be a number of seconds {}, got {}",
                range.wording,
                shown(v)
            ),
        )),
    }
}

/// [`seconds`] of a key that may be absent (or null).
pub fn seconds_or(
    v: Option<&Value>,
    key: &str,
    range: SecondsRange,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(v) => seconds(v, key, range),
    }
}

/// An integer from `min` to `max`.
pub fn integer(v: &Value, key: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    match v.as_u64() {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            key,
            format!("must be an integer from {min} to {max}, got {}", shown(v)),
        )),
    }
}

pub fn flag(v: Option<&Value>, key: &str, default: bool) -> Result<bool, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ConfigError::new(
            key,
            format!("must be true or false, got {}", shown(v)),
        )),
    }
}

/// A request header name (an HTTP token), lower-cased as Envoy hands
/// headers to filters, if given.
pub fn header_name(v: Option<&Value>, key: &str) -> Result<Option<String>, ConfigError> {
    match text(v, key)? {
        None => Ok(None),
        Some(h)
            if h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) =>
        {
            Ok(Some(h.to_ascii_lowercase()))
        }
        Some(h) => Err(ConfigError::new(
            key,
            format!("must be an HTTP header name, got {h:?}"),
        )),
    }
}

/// A string that must not be empty, if given.
pub fn text(v: Option<&Value>, key: &str) -> Result<Option<String>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(v) => Err(ConfigError::new(
            key,
            format!("must be a non-empty string, got {}", shown(v)),
        )),
    }
}
