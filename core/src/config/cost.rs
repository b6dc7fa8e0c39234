//! `cost`: an endpoint counts its capacity in units instead of requests
//! (see `docs/config.md#cost`). A request's cost comes from a header the
//! edge sets (tokens, a client's estimate), or from its `content-length` in
//! units of `unit_bytes`; the backend never holds more units than the
//! capacity ([`crate::admission::cost`]).

use super::check::{self, unknown_keys, ConfigError, ConfigWarning};
use super::shown;
use crate::admission::OverCapacity;
#[cfg(feature = "schema")]
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The largest `unit_bytes`: a TiB per unit is already absurd.
pub const MAX_UNIT_BYTES: u64 = 1 << 40;

/// `cost` as written (at the top level: every endpoint's default; on an
/// endpoint: its own, replacing the default whole).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Cost", deny_unknown_fields))]
#[serde(default)]
pub struct CostDoc {
    /// A request header holding the request's cost in units (a positive
    /// integer); it wins over `unit_bytes`. An edge Envoy must remove it
    /// from untrusted clients' requests.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))
    )]
    pub header: Option<Value>,
    /// Bytes of `content-length` per unit: a request costs its length over
    /// this, rounded up (1048576: one unit per MiB).
    #[cfg_attr(
        feature = "schema",
        schemars(with = "u64", range(min = 1, max = 1099511627776_u64))
    )]
    pub unit_bytes: Option<Value>,
    /// The least a request costs (also a request without a body).
    #[cfg_attr(feature = "schema", schemars(with = "u32", range(min = 1), extend("default" = 1)))]
    pub min: Option<Value>,
    /// The cost of a request with a body but no length (chunked) and no
    /// cost header; `min` by default.
    #[cfg_attr(feature = "schema", schemars(with = "u32", range(min = 1)))]
    pub without_length: Option<Value>,
    /// A request costing more than the whole capacity: `alone` runs it
    /// when nothing else holds units (and nothing beside it); `refuse`
    /// answers it `413 too-costly` at once.
    #[cfg_attr(feature = "schema", schemars(with = "String", extend("enum" = ["alone", "refuse"], "default" = "alone")))]
    pub over_capacity: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// What `cost` may be: its settings, or (on an endpoint) `false` for none.
#[cfg(feature = "schema")]
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(super) enum CostSetting {
    Cost(Box<CostDoc>),
    /// `false`: this endpoint counts requests, whatever the default.
    #[schemars(extend("const" = false))]
    Off(bool),
}

/// `cost`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    /// Lower-case, as Envoy hands headers to filters.
    pub header: Option<String>,
    pub unit_bytes: Option<u64>,
    pub min: u32,
    pub without_length: u32,
    pub over_capacity: OverCapacity,
}

/// How a request's cost was found ([`Cost::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    /// The cost header.
    Header,
    /// `content-length` over `unit_bytes`.
    Length,
    /// No cost given: `min` without a body, `without_length` with one.
    Default,
    /// The cost header held something other than a positive integer: the
    /// request costs what it would without the header.
    BadHeader,
}

impl Cost {
    /// `v` as the cost at `key` (`endpoints./p.cost`, or `cost`): `None`
    /// for absent, `Some(None)` for `false` (no cost on this endpoint).
    pub fn parse(
        v: Option<&Value>,
        key: &str,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Result<Option<Option<Cost>>, ConfigError> {
        let fields = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Bool(false)) => return Ok(Some(None)),
            Some(v @ Value::Object(_)) => CostDoc::deserialize(v).map_err(|_| bad(key, v))?,
            Some(v) => return Err(bad(key, v)),
        };
        let field = |f: &str| format!("{key}.{f}");
        warnings.extend(unknown_keys(&fields.unknown, &format!("{key}.")));
        let header = check::header_name(fields.header.as_ref(), &field("header"))?;
        let unit_bytes = match &fields.unit_bytes {
            None | Some(Value::Null) => None,
            Some(v) => Some(check::integer(v, &field("unit_bytes"), 1, MAX_UNIT_BYTES)?),
        };
        if header.is_none() && unit_bytes.is_none() {
            return Err(ConfigError::new(
                key,
                "says nothing a cost could come from: set header (a request header holding the \
                 cost), unit_bytes (cost by content-length), or both",
            ));
        }
        let units = |v: &Option<Value>, f: &str| match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => check::integer(v, &field(f), 1, u64::from(u32::MAX)).map(|n| Some(n as u32)),
        };
        let min = units(&fields.min, "min")?.unwrap_or(1);
        let without_length = units(&fields.without_length, "without_length")?.unwrap_or(min);
        if without_length < min {
            return Err(ConfigError::new(
                field("without_length"),
                format!("must be at least min ({min}), got {without_length}"),
            ));
        }
        let over_capacity = match &fields.over_capacity {
            None | Some(Value::Null) => OverCapacity::Alone,
            Some(Value::String(s)) if s == "alone" => OverCapacity::Alone,
            Some(Value::String(s)) if s == "refuse" => OverCapacity::Refuse,
            Some(v) => {
                return Err(ConfigError::new(
                    field("over_capacity"),
                    format!("must be \"alone\" or \"refuse\", got {}", shown(v)),
                ))
            }
        };
        Ok(Some(Some(Cost {
            header,
            unit_bytes,
            min,
            without_length,
            over_capacity,
        })))
    }

    /// The units of a request, reading its headers with `header` (the
    /// cost header, then `content-length`, each only if configured);
    /// `has_body`: more than headers is coming. Never below `min`.
    pub fn of(&self, header: impl Fn(&str) -> Option<String>, has_body: bool) -> (u32, CostSource) {
        let mut source = CostSource::Default;
        if let Some(name) = &self.header {
            if let Some(v) = header(name) {
                match positive(&v) {
                    Some(n) => return (n.max(self.min), CostSource::Header),
                    None => source = CostSource::BadHeader,
                }
            }
        }
        if let Some(unit) = self.unit_bytes {
            if let Some(len) = header("content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
                let n = len.div_ceil(unit).min(u64::from(u32::MAX)) as u32;
                let source = if source == CostSource::BadHeader {
                    source
                } else {
                    CostSource::Length
                };
                return (n.max(self.min), source);
            }
        }
        let n = if has_body {
            self.without_length
        } else {
            self.min
        };
        (n, source)
    }
}

/// A header's positive integer (decimal digits, surrounding spaces
/// ignored), at most `u32::MAX` (larger ones are that: still the costliest).
fn positive(v: &str) -> Option<u32> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = v.parse::<u64>().unwrap_or(u64::MAX);
    (n > 0).then(|| n.min(u64::from(u32::MAX)) as u32)
}

fn bad(key: &str, v: &Value) -> ConfigError {
    ConfigError::new(
        key,
        format!(
            "must be a map of cost settings (header, unit_bytes, min, without_length, \
             over_capacity) or false, got {}",
            shown(v)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn parse(v: Value) -> Result<Cost, String> {
        let mut w = Vec::new();
        match Cost::parse(Some(&v), "cost", &mut w) {
            Ok(Some(Some(c))) => Ok(c),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn settings_and_their_defaults() {
        let c = parse(json!({"unit_bytes": 1048576})).unwrap();
        assert_eq!(
            c,
            Cost {
                header: None,
                unit_bytes: Some(1 << 20),
                min: 1,
                without_length: 1,
                over_capacity: OverCapacity::Alone,
            }
        );
        let c = parse(json!({"header": "X-Cost", "min": 2, "without_length": 8,
                             "over_capacity": "refuse"}))
        .unwrap();
        assert_eq!(c.header.as_deref(), Some("x-cost"));
        assert_eq!((c.min, c.without_length), (2, 8));
        assert_eq!(c.over_capacity, OverCapacity::Refuse);
        let mut w = Vec::new();
        assert_eq!(
            Cost::parse(Some(&json!(false)), "cost", &mut w).unwrap(),
            Some(None)
        );
        assert_eq!(Cost::parse(None, "cost", &mut w).unwrap(), None);
        Cost::parse(Some(&json!({"unit_bytes": 1, "colour": 1})), "cost", &mut w).unwrap();
        assert_eq!(w[0].to_string(), "cost.colour: unknown key, ignored");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let cases = [
            (json!({}), "cost: says nothing a cost could come from: set header (a request header holding the cost), unit_bytes (cost by content-length), or both"),
            (json!(true), "cost: must be a map of cost settings (header, unit_bytes, min, without_length, over_capacity) or false, got true"),
            (json!("size"), "cost: must be a map of cost settings (header, unit_bytes, min, without_length, over_capacity) or false, got \"size\""),
            (json!({"unit_bytes": 0}), "cost.unit_bytes: must be an integer from 1 to 1099511627776, got 0"),
            (json!({"unit_bytes": "1MB"}), "cost.unit_bytes: must be an integer from 1 to 1099511627776, got \"1MB\""),
            (json!({"header": "x cost"}), "cost.header: must be an HTTP header name, got \"x cost\""),
            (json!({"header": "x", "min": 0}), "cost.min: must be an integer from 1 to 4294967295, got 0"),
            (json!({"header": "x", "min": 4, "without_length": 2}), "cost.without_length: must be at least min (4), got 2"),
            (json!({"header": "x", "over_capacity": "wait"}), "cost.over_capacity: must be \"alone\" or \"refuse\", got \"wait\""),
        ];
        for (v, want) in cases {
            assert_eq!(parse(v.clone()).unwrap_err(), want, "{v}");
        }
    }

    #[test]
    fn a_request_costs_its_header_else_its_length_else_the_default() {
        let c = parse(json!({"header": "x-cost", "unit_bytes": 1000, "min": 2,
                             "without_length": 7}))
        .unwrap();
        let of = |h: &[(&str, &str)], body: bool| {
            let h: Vec<(String, String)> = h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            c.of(
                |name| h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
                body,
            )
        };
        use CostSource::*;
        assert_eq!(
            of(&[("x-cost", "40"), ("content-length", "5")], true),
            (40, Header)
        );
        assert_eq!(of(&[("x-cost", " 1 ")], false), (2, Header), "at least min");
        assert_eq!(of(&[("content-length", "25000001")], true), (25001, Length));
        assert_eq!(of(&[("content-length", "1000")], true), (2, Length));
        assert_eq!(of(&[("content-length", "0")], false), (2, Length));
        assert_eq!(of(&[], true), (7, Default), "a body of unknown length");
        assert_eq!(of(&[], false), (2, Default), "no body");
        for bad in ["0", "-3", "1.5", "ten", ""] {
            assert_eq!(of(&[("x-cost", bad)], true), (7, BadHeader), "{bad:?}");
            assert_eq!(
                of(&[("x-cost", bad), ("content-length", "3000")], true),
                (3, BadHeader)
            );
        }
        assert_eq!(
            of(&[("x-cost", "99999999999999999999")], false),
            (u32::MAX, Header),
            "huge: the costliest, not the cheapest"
        );
    }

    #[test]
    fn without_unit_bytes_the_length_is_never_read() {
        let c = parse(json!({"header": "x-cost"})).unwrap();
        let (n, _) = c.of(
            |name| {
                assert_ne!(name, "content-length");
                None
            },
            true,
        );
        assert_eq!(n, 1);
    }
}

#[cfg(test)]
mod document_tests {
    use crate::config::Config;
    use serde_json::json;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_service_wide_cost_is_each_endpoints_default_replaced_whole_or_turned_off() {
        let c = Config::from_json(&json!({
            "cost": {"unit_bytes": 1048576, "without_length": 4},
            "endpoints": {
                "/upload": {"capacity": 50},
                "/chat": {"capacity": 8, "cost": {"header": "x-tokens"}},
                "/health": {"cost": false},
            }
        }))
        .unwrap();
        let cost = |i: usize| c.endpoints[i].cost.clone();
        assert_eq!(cost(0).unwrap().unit_bytes, Some(1 << 20));
        assert_eq!(cost(0).unwrap().without_length, 4);
        let chat = cost(1).unwrap();
        assert_eq!((chat.unit_bytes, chat.without_length), (None, 1));
        assert_eq!(cost(2), None);
        let e = Config::from_json(&json!({"endpoints": {"/p": {"cost": {"unit_bytes": -1}}}}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "endpoints./p.cost.unit_bytes: must be an integer from 1 to 1099511627776, got -1"
        );
        let none = Config::from_json(&json!({"endpoints": {"/p": {}}})).unwrap();
        assert_eq!(none.endpoints[0].cost, None);
    }
}
