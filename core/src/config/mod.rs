//! `sluice.yaml`, the one configuration document of every part.
//!
//! [`Document`] holds it as serde types, read once per part; each part
//! converts it into its own runtime form with `TryFrom`, where every value
//! is checked, with errors that name the dotted key (`endpoints./p.capacity:
//! must be a positive integer, got 0`) and unknown keys as warnings:
//! - the filter: [`FilterConfig`] (enforcement, dashboard, callouts), from
//!   the JSON of its plugin `configuration`;
//! - the prober and sync: the same document read as YAML (`yaml`, a native
//!   feature), plus their own sections (`probe`, `storage`).

pub mod callouts;
pub mod check;
pub mod classes;
pub mod cost;
mod document;
mod enforcement;
pub mod instances;
pub mod json_keys;
pub mod tenants;
mod ui;
#[cfg(feature = "yaml")]
pub mod yaml;

pub use callouts::{
    CalloutConfig, HealthConfig, SyncConfig, DEFAULT_HEALTHY_THRESHOLD,
    DEFAULT_HEALTH_TIMEOUT_SECS, DEFAULT_HEARTBEAT_TIMEOUT_SECS, DEFAULT_UNHEALTHY_THRESHOLD,
};
pub use check::{shown, ConfigError, ConfigWarning, WarningKind};
pub use classes::{ClassSpec, Classes, DEFAULT_CLASS, DEFAULT_CLASS_HEADER, MAX_CLASSES};
pub use cost::{Cost, CostSource};
#[cfg(feature = "schema")]
pub use document::schema_json;
pub use document::{
    Document, EndpointDoc, Endpoints, HealthDoc, ProbeDoc, Section, StorageDoc, SyncDoc, UiDoc,
};
pub use enforcement::{
    capacity, path_problem, Config, Endpoint, MatchKind, DEFAULT_ABANDON_HOLD_SECS,
    DEFAULT_MAX_QUEUE, DEFAULT_QUEUE_FULL_STATUS, DEFAULT_QUEUE_TIMEOUT_SECS, DEFAULT_SERVICE,
    MAX_QUEUE_LIMIT,
};
pub use instances::{InstanceSet, Instances, Sticky, DEFAULT_INSTANCE_HEADER};
pub use tenants::{Tenants, DEFAULT_FLOWS};
pub use ui::{StatsDoc, Ui, DEFAULT_STATS_PATH, DEFAULT_UI_PATH, DEFAULT_UI_REFRESH_SECS};

use serde_json::Value;

/// Everything the filter reads from its plugin configuration, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterConfig {
    /// What to limit; its warnings are the enforcement keys'.
    pub config: Config,
    pub ui: Ui,
    /// The sync stream and health check; its warnings are theirs.
    pub callouts: CalloutConfig,
}

impl FilterConfig {
    /// Parses the JSON text of the plugin configuration. The first mistake
    /// fails it, in the order enforcement, callouts, dashboard.
    pub fn from_json_str(text: &str) -> Result<FilterConfig, ConfigError> {
        let doc = Document::from_value(&plugin_json(text)?)?;
        let config = Config::try_from(&doc)?;
        let callouts = CalloutConfig::from_document(&doc, &config.service)?;
        let ui = Ui::try_from(&doc)?;
        Ok(FilterConfig {
            config,
            ui,
            callouts,
        })
    }

    /// Every warning: the enforcement keys', then the callouts'.
    pub fn warnings(&self) -> impl Iterator<Item = &ConfigWarning> {
        self.config
            .warnings
            .iter()
            .chain(self.callouts.warnings.iter())
    }
}

/// The plugin configuration's JSON, refusing what serde_json would accept
/// silently (a key given twice keeps only the last).
fn plugin_json(text: &str) -> Result<Value, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::new(
            "configuration",
            "is empty; expected a JSON object",
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ConfigError::new("configuration", format!("is not valid JSON: {e}")))?;
    if let Ok(Some(key)) = json_keys::first_repeated_key(text) {
        return Err(ConfigError::new(
            key,
            "is given more than once (JSON would keep only the last)",
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_filter_reads_every_part_from_one_parse() {
        let c = FilterConfig::from_json_str(
            r#"{"service": "demo", "colour": 1, "endpoints": {"/a": {"capacity": 2}},
                "ui": {"enable": true}, "sync": {"cluster": "s", "x": 1}}"#,
        )
        .unwrap();
        assert_eq!(c.config.endpoints[0].capacity, Some(2));
        assert!(c.ui.enable);
        assert_eq!(c.callouts.sync.as_ref().unwrap().service, "demo");
        let texts: Vec<String> = c.warnings().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "colour: unknown key, ignored",
                "sync.x: unknown key, ignored"
            ]
        );
        // The same errors, in the same order, as each part alone.
        let e = FilterConfig::from_json_str(r#"{"ui": true, "sync": {}}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sync.cluster: is required: the name of an Envoy cluster"
        );
        let e = FilterConfig::from_json_str(r#"{"ui": {"pasword": "x"}}"#).unwrap_err();
        assert!(e.to_string().starts_with("ui.pasword: unknown key"), "{e}");
    }
}
