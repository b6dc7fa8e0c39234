//! What counts as a successful response (`--expect-status`,
//! `--expect-body-contains`, `--expect-json`), and how a level's responses
//! compare with the first level's in size and shape.
//!
//! Some services answer overload with `200` and an error body; judged by
//! status alone they look healthy far past their capacity. A body check
//! catches that; without one, a change in the size or content type of the
//! successful responses between levels is how such errors usually show, and
//! the report says so.

use crate::error::ProberError;
use serde_json::Value;
use std::collections::BTreeMap;

/// Bodies longer than this are not checked: the check fails (a probe of a
/// large-response endpoint wants a status check, not a body check).
pub const MAX_CHECKED_BODY: usize = 1 << 20;
/// Distinct content types kept per level; more are counted as `other`.
const MAX_CONTENT_TYPES: usize = 8;

/// What a successful response looks like.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SuccessCheck {
    /// Statuses that succeed; empty: any 2xx.
    pub statuses: Vec<u16>,
    pub body: Option<BodyCheck>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BodyCheck {
    /// The body contains this text.
    Contains(String),
    /// The body is JSON whose value at this JSON pointer equals `value`.
    JsonEquals { pointer: String, value: Value },
}

impl SuccessCheck {
    /// From the flags; each mistake names its flag.
    pub fn from_flags(
        statuses: &[u16],
        contains: Option<&str>,
        json: Option<&str>,
    ) -> Result<SuccessCheck, ProberError> {
        for &code in statuses {
            if !(100..=599).contains(&code) {
                return Err(ProberError::Usage(format!(
                    "--expect-status {code}: must be an HTTP status, 100 to 599"
                )));
            }
        }
        let body = match (contains, json) {
            (Some(_), Some(_)) => {
                return Err(ProberError::Usage(
                    "--expect-body-contains and --expect-json: give one body check".into(),
                ))
            }
            (Some(""), None) => {
                return Err(ProberError::Usage(
                    "--expect-body-contains: must not be empty".into(),
                ))
            }
            (Some(text), None) => Some(BodyCheck::Contains(text.to_string())),
            (None, Some(spec)) => Some(parse_json_check(spec)?),
            (None, None) => None,
        };
        Ok(SuccessCheck {
            statuses: statuses.to_vec(),
            body,
        })
    }

    pub fn status_ok(&self, status: u16) -> bool {
        if self.statuses.is_empty() {
            (200..300).contains(&status)
        } else {
            self.statuses.contains(&status)
        }
    }

    /// The body must be read into memory to judge a response.
    pub fn reads_body(&self) -> bool {
        self.body.is_some()
    }

    /// Whether `body` passes the body check (true without one).
    pub fn body_ok(&self, body: &[u8]) -> bool {
        match &self.body {
            None => true,
            Some(_) if body.len() > MAX_CHECKED_BODY => false,
            Some(BodyCheck::Contains(text)) => {
                body.windows(text.len()).any(|w| w == text.as_bytes())
            }
            Some(BodyCheck::JsonEquals { pointer, value }) => serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|doc| doc.pointer(pointer).cloned())
                .is_some_and(|found| &found == value),
        }
    }

    /// How the report names this check.
    pub fn describe(&self) -> String {
        let statuses = if self.statuses.is_empty() {
            "2xx".to_string()
        } else {
            self.statuses
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        match &self.body {
            None => format!("status {statuses}"),
            Some(BodyCheck::Contains(text)) => {
                format!("status {statuses} and a body containing {text:?}")
            }
            Some(BodyCheck::JsonEquals { pointer, value }) => {
                format!("status {statuses} and JSON {pointer} = {value}")
            }
        }
    }
}

/// `FIELD=VALUE`: FIELD a JSON pointer (`/status`, `/result/ok`) or a dotted
/// name (`status`, `result.ok`); VALUE JSON (`true`, `3`, `"ok"`) or, if it
/// is not JSON, a string.
fn parse_json_check(spec: &str) -> Result<BodyCheck, ProberError> {
    let Some((field, value)) = spec.split_once('=') else {
        return Err(ProberError::Usage(format!(
            "--expect-json {spec:?}: expected FIELD=VALUE, e.g. status=ok or /result/ok=true"
        )));
    };
    let field = field.trim();
    if field.is_empty() || field == "/" {
        return Err(ProberError::Usage(format!(
            "--expect-json {spec:?}: the field before '=' is empty"
        )));
    }
    let pointer = if field.starts_with('/') {
        field.to_string()
    } else {
        field
            .split('.')
            .map(|part| format!("/{}", part.replace('~', "~0").replace('/', "~1")))
            .collect()
    };
    let value = serde_json::from_str(value.trim())
        .unwrap_or_else(|_| Value::String(value.trim().to_string()));
    Ok(BodyCheck::JsonEquals { pointer, value })
}

/// Size and content types of the responses a level counted as successful.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponseShape {
    pub responses: u64,
    pub body_bytes: u64,
    /// Content type (without parameters) → responses; bounded.
    pub content_types: BTreeMap<String, u64>,
}

impl ResponseShape {
    pub fn record(&mut self, body_bytes: usize, content_type: Option<&str>) {
        self.responses += 1;
        self.body_bytes += body_bytes as u64;
        let kind = content_type
            .map(|c| {
                c.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_else(|| "none".to_string());
        if self.content_types.contains_key(&kind) || self.content_types.len() < MAX_CONTENT_TYPES {
            *self.content_types.entry(kind).or_default() += 1;
        } else {
            *self.content_types.entry("other".into()).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: &ResponseShape) {
        self.responses += other.responses;
        self.body_bytes += other.body_bytes;
        for (kind, n) in &other.content_types {
            *self.content_types.entry(kind.clone()).or_default() += n;
        }
    }

    pub fn mean_bytes(&self) -> Option<f64> {
        (self.responses > 0).then(|| self.body_bytes as f64 / self.responses as f64)
    }

    /// The content type most responses had.
    fn main_type(&self) -> Option<&str> {
        self.content_types
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(k, _)| k.as_str())
    }

    /// How this level's successful responses differ from `first`'s, if they
    /// do: a mean size off by more than a fifth (and 4 bytes), or another
    /// main content type.
    pub fn differs_from(&self, first: &ResponseShape) -> Option<String> {
        let (Some(mean), Some(first_mean)) = (self.mean_bytes(), first.mean_bytes()) else {
            return None;
        };
        let mut changes = Vec::new();
        if (mean - first_mean).abs() > (first_mean * 0.2).max(4.0) {
            changes.push(format!(
                "{mean:.0} bytes on average against {first_mean:.0}"
            ));
        }
        if let (Some(now), Some(then)) = (self.main_type(), first.main_type()) {
            if now != then {
                changes.push(format!("mostly {now} against {then}"));
            }
        }
        (!changes.is_empty()).then(|| changes.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn statuses_and_bodies() {
        let any = SuccessCheck::default();
        assert!(any.status_ok(200) && any.status_ok(204) && !any.status_ok(302));
        assert!(any.body_ok(b"anything"));
        let c = SuccessCheck::from_flags(&[200, 201], Some("\"ok\""), None).unwrap();
        assert!(c.status_ok(201) && !c.status_ok(204));
        assert!(c.body_ok(br#"{"status":"ok"}"#));
        assert!(!c.body_ok(br#"{"error":"over capacity"}"#));
        let j = SuccessCheck::from_flags(&[], None, Some("result.ok=true")).unwrap();
        assert_eq!(
            j.body,
            Some(BodyCheck::JsonEquals {
                pointer: "/result/ok".into(),
                value: json!(true)
            })
        );
        assert!(j.body_ok(br#"{"result":{"ok":true}}"#));
        assert!(!j.body_ok(br#"{"result":{"ok":"true"}}"#));
        assert!(!j.body_ok(b"not json"));
        let s = SuccessCheck::from_flags(&[], None, Some("/path=/predict")).unwrap();
        assert!(s.body_ok(br#"{"path":"/predict"}"#));
        assert_eq!(s.describe(), "status 2xx and JSON /path = \"/predict\"");
    }

    #[test]
    fn bad_flags_are_named() {
        for (statuses, contains, json, message) in [
            (
                &[700u16][..],
                None,
                None,
                "--expect-status 700: must be an HTTP status, 100 to 599",
            ),
            (
                &[],
                Some("a"),
                Some("b=c"),
                "--expect-body-contains and --expect-json: give one body check",
            ),
            (
                &[],
                Some(""),
                None,
                "--expect-body-contains: must not be empty",
            ),
            (
                &[],
                None,
                Some("status"),
                "--expect-json \"status\": expected FIELD=VALUE, e.g. status=ok or /result/ok=true",
            ),
            (
                &[],
                None,
                Some("=ok"),
                "--expect-json \"=ok\": the field before '=' is empty",
            ),
        ] {
            let e = SuccessCheck::from_flags(statuses, contains, json).unwrap_err();
            assert_eq!(e.to_string(), message);
        }
    }

    #[test]
    fn a_change_of_size_or_type_is_told() {
        let mut first = ResponseShape::default();
        for _ in 0..10 {
            first.record(40, Some("application/json"));
        }
        let mut same = ResponseShape::default();
        same.record(46, Some("application/json; charset=utf-8"));
        assert_eq!(same.differs_from(&first), None);
        let mut errors = ResponseShape::default();
        for _ in 0..10 {
            errors.record(25, Some("application/json"));
            errors.record(120, Some("application/json"));
        }
        assert_eq!(
            errors.differs_from(&first).unwrap(),
            "72 bytes on average against 40"
        );
        let mut html = ResponseShape::default();
        html.record(40, Some("text/html"));
        assert_eq!(
            html.differs_from(&first).unwrap(),
            "mostly text/html against application/json"
        );
    }
}
