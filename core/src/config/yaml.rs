//! `sluice.yaml` as YAML, for the native parts (the `yaml` feature): the one
//! YAML reader of the workspace, turning the file into the JSON form every
//! part reads.

use serde_json::Value;

pub use yaml_serde::Error;

/// Parses YAML text into the JSON form every part of Sluice reads.
pub fn parse(text: &str) -> Result<Value, Error> {
    let yaml: yaml_serde::Value = yaml_serde::from_str(text)?;
    Ok(to_json(yaml))
}

/// YAML to JSON: scalar keys become strings (`200: x` → `"200"`), tags are
/// dropped, and non-finite floats become null (JSON has none).
pub fn to_json(v: yaml_serde::Value) -> Value {
    use yaml_serde::Value as Y;
    match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                n.as_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or(Value::Null)
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(to_json).collect()),
        Y::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        Y::Null => "null".to_string(),
                        other => match to_json(other) {
                            Value::String(s) => s,
                            j => j.to_string(),
                        },
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(t) => to_json(t.value),
    }
}
