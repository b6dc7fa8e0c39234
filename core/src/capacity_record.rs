//! One endpoint's capacity record as Redis holds it (a hash of strings), and
//! the change message announced with every write. The prober writes these
//! and the sync service reads them: both go through this codec, so they
//! cannot disagree. Key names are in [`crate::redis_keys`]; the layout is
//! documented for people in `docs/redis-keys.md`.

use crate::redis_keys::{fields, instance_capacity_field};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// How a capacity was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Measured by sluice-prober.
    Probe,
    /// Set by hand in the config file.
    Manual,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Probe => "probe",
            Source::Manual => "manual",
        }
    }
}

/// One endpoint's capacity record.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityRecord {
    pub capacity: u32,
    pub p99_ms: Option<f64>,
    pub rps: Option<f64>,
    pub error_rate: Option<f64>,
    /// Unix time, seconds.
    pub measured_at: u64,
    pub source: Source,
}

/// A hash that is not a valid record: `field` names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub field: &'static str,
    pub problem: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field {}: {}", self.field, self.problem)
    }
}

impl std::error::Error for RecordError {}

impl CapacityRecord {
    /// Decodes `HGETALL` output. An empty hash is no record (`Ok(None)`);
    /// a hash without a positive integer `capacity` is an error. Optional
    /// figures that do not parse are dropped: they are informative only.
    pub fn from_hash(h: &HashMap<String, String>) -> Result<Option<CapacityRecord>, RecordError> {
        if h.is_empty() {
            return Ok(None);
        }
        let capacity = match h.get(fields::CAPACITY) {
            None => return Err(bad(fields::CAPACITY, "is missing".into())),
            Some(v) => match v.trim().parse::<u32>() {
                Ok(c) if c > 0 => c,
                _ => {
                    return Err(bad(
                        fields::CAPACITY,
                        format!("must be a positive integer, got {v:?}"),
                    ))
                }
            },
        };
        let source = match h.get(fields::SOURCE).map(String::as_str) {
            None | Some("probe") => Source::Probe,
            Some("manual") => Source::Manual,
            Some(other) => {
                return Err(bad(
                    fields::SOURCE,
                    format!("must be \"probe\" or \"manual\", got {other:?}"),
                ))
            }
        };
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<f64>().ok());
        Ok(Some(CapacityRecord {
            capacity,
            p99_ms: num(fields::P99_MS),
            rps: num(fields::RPS),
            error_rate: num(fields::ERROR_RATE),
            measured_at: h
                .get(fields::MEASURED_AT)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            source,
        }))
    }

    /// The fields to `HSET`, in a stable order.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            (fields::CAPACITY, self.capacity.to_string()),
            (fields::MEASURED_AT, self.measured_at.to_string()),
            (fields::SOURCE, self.source.as_str().to_string()),
        ];
        if let Some(v) = self.p99_ms {
            f.push((fields::P99_MS, format!("{v:.3}")));
        }
        if let Some(v) = self.rps {
            f.push((fields::RPS, format!("{v:.1}")));
        }
        if let Some(v) = self.error_rate {
            f.push((fields::ERROR_RATE, format!("{v:.6}")));
        }
        f
    }

    /// The message published on the service's updates channel after a write.
    pub fn update_message(&self, endpoint: &str) -> String {
        let update = Update {
            endpoint: endpoint.to_string(),
            capacity: self.capacity,
            source: self.source,
            measured_at: self.measured_at,
        };
        serde_json::to_string(&update).expect("plain struct serialises")
    }
}

/// Each instance's own capacity for one endpoint, by address (`ip:port`,
/// `[ipv6]:port`), kept in the endpoint's record as `instance_capacity:ADDR`
/// fields beside the endpoint's own `capacity` (which instances without a
/// figure take). Sorted by address.
pub type InstanceCapacities = BTreeMap<String, u32>;

/// A per-instance field that is not a positive integer: it is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInstanceField {
    pub field: String,
    pub value: String,
}

/// The `instance_capacity:ADDR` fields of a record (`HGETALL` output), and
/// those that do not hold a positive integer (left out: the instance then
/// takes the endpoint's capacity).
pub fn instance_capacities_from_hash(
    h: &HashMap<String, String>,
) -> (InstanceCapacities, Vec<BadInstanceField>) {
    let mut capacities = InstanceCapacities::new();
    let mut bad = Vec::new();
    for (field, value) in h {
        let Some(address) = field.strip_prefix(fields::INSTANCE_CAPACITY_PREFIX) else {
            continue;
        };
        match value.trim().parse::<u32>() {
            Ok(c) if c > 0 && !address.is_empty() => {
                capacities.insert(address.to_string(), c);
            }
            _ => bad.push(BadInstanceField {
                field: field.clone(),
                value: value.clone(),
            }),
        }
    }
    bad.sort_by(|a, b| a.field.cmp(&b.field));
    (capacities, bad)
}

/// The fields to `HSET` for per-instance capacities, beside
/// [`CapacityRecord::to_fields`], sorted by address.
pub fn instance_capacity_fields(capacities: &InstanceCapacities) -> Vec<(String, String)> {
    capacities
        .iter()
        .map(|(address, c)| (instance_capacity_field(address), c.to_string()))
        .collect()
}

fn bad(field: &'static str, problem: String) -> RecordError {
    RecordError { field, problem }
}

/// The message on `sluice:{SERVICE}:updates`: a hint naming what changed.
/// Readers re-read the record; the message is never the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub endpoint: String,
    pub capacity: u32,
    pub source: Source,
    pub measured_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn hash(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fields_round_trip() {
        let r = CapacityRecord {
            capacity: 37,
            p99_ms: Some(21.5),
            rps: Some(1790.0),
            error_rate: Some(0.0),
            measured_at: 1_700_000_000,
            source: Source::Probe,
        };
        let h: HashMap<String, String> = r
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(CapacityRecord::from_hash(&h), Ok(Some(r)));
        assert_eq!(CapacityRecord::from_hash(&HashMap::new()), Ok(None));
    }

    #[test]
    fn bad_records_name_the_field() {
        let cases = [
            (hash(&[("source", "probe")]), "field capacity: is missing"),
            (
                hash(&[("capacity", "0")]),
                "field capacity: must be a positive integer, got \"0\"",
            ),
            (
                hash(&[("capacity", "ten")]),
                "field capacity: must be a positive integer, got \"ten\"",
            ),
            (
                hash(&[("capacity", "3"), ("source", "guess")]),
                "field source: must be \"probe\" or \"manual\", got \"guess\"",
            ),
        ];
        for (h, want) in cases {
            assert_eq!(CapacityRecord::from_hash(&h).unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn instance_capacities_live_beside_the_record() {
        let capacities: InstanceCapacities = [
            ("127.0.0.1:8001".to_string(), 2),
            ("[::1]:8003".to_string(), 8),
        ]
        .into_iter()
        .collect();
        let fields = instance_capacity_fields(&capacities);
        assert_eq!(
            fields,
            [
                (
                    "instance_capacity:127.0.0.1:8001".to_string(),
                    "2".to_string()
                ),
                ("instance_capacity:[::1]:8003".to_string(), "8".to_string()),
            ]
        );
        let mut h: HashMap<String, String> = fields.into_iter().collect();
        h.insert("capacity".into(), "4".into());
        h.insert("instance_capacity:10.0.0.1:80".into(), "0".into());
        h.insert("instance_capacity:10.0.0.2:80".into(), "many".into());
        let (back, bad) = instance_capacities_from_hash(&h);
        assert_eq!(back, capacities);
        assert_eq!(
            bad.iter().map(|b| b.field.as_str()).collect::<Vec<_>>(),
            [
                "instance_capacity:10.0.0.1:80",
                "instance_capacity:10.0.0.2:80"
            ]
        );
        // The endpoint's record does not see them.
        assert_eq!(CapacityRecord::from_hash(&h).unwrap().unwrap().capacity, 4);
    }

    #[test]
    fn update_message_is_the_documented_json() {
        let r = CapacityRecord {
            capacity: 8,
            p99_ms: None,
            rps: None,
            error_rate: None,
            measured_at: 1763842052,
            source: Source::Probe,
        };
        let m = r.update_message("/predict");
        assert_eq!(
            m,
            r#"{"endpoint":"/predict","capacity":8,"source":"probe","measured_at":1763842052}"#
        );
        let back: Update = serde_json::from_str(&m).unwrap();
        assert_eq!(back.endpoint, "/predict");
    }
}
