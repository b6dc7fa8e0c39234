//! `tenants`: fair shares between the tenants of one endpoint (see
//! `docs/config.md#tenants`). A request's tenant is a header's value (for
//! example one Envoy's `jwt_authn` fills from a claim); within a class, a
//! freed slot goes to the tenant whose turn it is (start-time fair
//! queueing, in proportion to the tenants' weights), FIFO within a tenant.
//! Tenants map onto a bounded number of flows by a hash of the key, so the
//! state never grows with the number of clients.

use super::check::{self, unknown_keys, ConfigError, ConfigWarning};
use super::document::{Document, Section};
use super::shown;
use crate::admission::MAX_FLOWS;
#[cfg(feature = "schema")]
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};

pub const DEFAULT_FLOWS: u8 = 64;
/// The largest weight: a tenant of weight 1000 gets 1000 slots to one of
/// weight 1's while both wait.
pub const MAX_WEIGHT: u32 = 1000;

/// `tenants` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Tenants", deny_unknown_fields))]
#[serde(default)]
pub struct TenantsDoc {
    /// The request header whose value is the request's tenant (an edge
    /// Envoy sets it from what it trusts, e.g. a JWT claim).
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))
    )]
    pub header: Option<Value>,
    /// Flows per endpoint the tenants are hashed onto (1 to 255): tenants
    /// that share a flow share its turn.
    #[cfg_attr(feature = "schema", schemars(with = "u8", range(min = 1, max = 255), extend("default" = 64)))]
    pub flows: Option<Value>,
    /// Weights of named tenants (1 to 1000; others weigh 1).
    #[cfg_attr(feature = "schema", schemars(with = "std::collections::BTreeMap<String, u32>", extend("additionalProperties" = {"type": "integer", "minimum": 1, "maximum": 1000})))]
    pub weights: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// `tenants`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenants {
    /// Lower-case, as Envoy hands headers to filters.
    pub header: String,
    pub flows: u8,
    pub weights: Vec<(String, u32)>,
}

impl Tenants {
    pub fn from_document(
        doc: &Document,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Result<Option<Tenants>, ConfigError> {
        let fields = match &doc.tenants {
            None => return Ok(None),
            Some(Section::Map(m)) => m,
            Some(Section::Bad(v)) => {
                return Err(ConfigError::new(
                    "tenants",
                    format!("must be a map of tenant settings, got {}", shown(v)),
                ))
            }
        };
        warnings.extend(unknown_keys(&fields.unknown, "tenants."));
        let header =
            check::header_name(fields.header.as_ref(), "tenants.header")?.ok_or_else(|| {
                ConfigError::new(
                    "tenants.header",
                    "is required: the request header that names the tenant",
                )
            })?;
        let flows = match &fields.flows {
            None | Some(Value::Null) => DEFAULT_FLOWS,
            Some(v) => check::integer(v, "tenants.flows", 1, MAX_FLOWS as u64)? as u8,
        };
        let weights = match &fields.weights {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => {
                let mut out = Vec::with_capacity(m.len());
                for (name, w) in m {
                    let key = format!("tenants.weights.{name}");
                    out.push((
                        name.clone(),
                        check::integer(w, &key, 1, u64::from(MAX_WEIGHT))? as u32,
                    ));
                }
                out
            }
            Some(v) => {
                return Err(ConfigError::new(
                    "tenants.weights",
                    format!("must be a map from tenant to weight, got {}", shown(v)),
                ))
            }
        };
        Ok(Some(Tenants {
            header,
            flows,
            weights,
        }))
    }

    /// The flow of tenant `key` (FNV-1a of its bytes, the same on every
    /// worker and every Envoy) and its weight.
    pub fn flow_of(&self, key: &str) -> (u8, u32) {
        let mut h: u32 = 0x811c_9dc5;
        for b in key.as_bytes() {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        let weight = self
            .weights
            .iter()
            .find(|(n, _)| n == key)
            .map_or(1, |&(_, w)| w);
        ((h % u32::from(self.flows)) as u8, weight)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use serde_json::json;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn tenants_with_weights_and_bounded_flows() {
        let c = Config::from_json(&json!({
            "tenants": {"header": "X-Tenant", "flows": 8, "weights": {"gold": 3}},
        }))
        .unwrap();
        let t = c.tenants.unwrap();
        assert_eq!((t.header.as_str(), t.flows), ("x-tenant", 8));
        assert_eq!(t.flow_of("gold").1, 3);
        assert_eq!(t.flow_of("anyone").1, 1);
        // Any key lands on one of the 8 flows, the same one every time.
        for k in ["a", "b", "", "a-very-long-tenant-name"] {
            let (f, _) = t.flow_of(k);
            assert!(f < 8);
            assert_eq!(t.flow_of(k).0, f);
        }
        let distinct: std::collections::BTreeSet<u8> = (0..100)
            .map(|i| t.flow_of(&format!("tenant-{i}")).0)
            .collect();
        assert_eq!(distinct.len(), 8, "100 tenants spread over all 8 flows");
    }

    #[test]
    fn bad_tenants_name_the_key() {
        let err = |v| Config::from_json(&v).unwrap_err().to_string();
        assert_eq!(
            err(json!({"tenants": {}})),
            "tenants.header: is required: the request header that names the tenant"
        );
        assert_eq!(
            err(json!({"tenants": {"header": "t", "flows": 0}})),
            "tenants.flows: must be an integer from 1 to 255, got 0"
        );
        assert_eq!(
            err(json!({"tenants": {"header": "t", "weights": {"a": 0}}})),
            "tenants.weights.a: must be an integer from 1 to 1000, got 0"
        );
        assert_eq!(
            err(json!({"tenants": {"header": "t", "weights": [1]}})),
            "tenants.weights: must be a map from tenant to weight, got [1]"
        );
    }
}
