//! The JSON Schemas of the prober's `--json` output, generated from the
//! report types (`schemars`), so they cannot drift from what is printed.
//! `prober/schema/*.schema.json` are these, committed; a test compares them
//! and `cargo run -p sluice-prober --bin sluice-prober-schema` rewrites them.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::Value;

// `sluice_core::capacity_record::Source` as the reports print it: core's
// type has no schema, and a test below checks the two agree.
/// Where a capacity came from: `probe` (measured by sluice-prober) or
/// `manual` (set by hand in the file).
#[derive(JsonSchema)]
#[schemars(rename = "Source")]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum SourceSchema {
    Probe,
    Manual,
}

/// File name and schema of each command's output.
pub fn output_schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "probe-output.schema.json",
            one::<crate::report::ProbeReport>("sluice-prober probe --json"),
        ),
        (
            "sweep-output.schema.json",
            one::<crate::sweep::SweepReport>("sluice-prober sweep --json"),
        ),
        (
            "push-output.schema.json",
            one::<crate::push::PushReport>("sluice-prober push --json"),
        ),
    ]
}

/// The text of a schema file: pretty JSON and a final newline.
pub fn file_text(schema: &Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).expect("a schema serializes");
    text.push('\n');
    text
}

fn one<T: JsonSchema>(title: &str) -> Value {
    // What the report prints: every field is there (Option as null).
    let generator = SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator();
    let mut schema = generator.into_root_schema_for::<T>();
    schema.insert("title".into(), Value::String(title.into()));
    schema.to_value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::capacity_record::Source;

    #[test]
    fn the_source_schema_names_what_core_prints() {
        for (source, name) in [(Source::Probe, "probe"), (Source::Manual, "manual")] {
            assert_eq!(serde_json::to_value(source).unwrap(), name);
        }
        let schema = schemars::schema_for!(SourceSchema).to_value();
        assert_eq!(schema["enum"], serde_json::json!(["probe", "manual"]));
    }
}
