//! The dashboard's settings (the `ui` key, with balancer.yml's names) and
//! the stats JSON's (`stats`).

use super::check::{self, ConfigError};
use super::document::{Document, Section, UiDoc};
use super::shown;
#[cfg(feature = "schema")]
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::Duration;

/// Where the dashboard is served unless `ui.path` says otherwise
/// (fastapi-balancer's path).
pub const DEFAULT_UI_PATH: &str = "/balancer/ui";
/// Seconds between the dashboard's polls of the stats.
pub const DEFAULT_UI_REFRESH_SECS: f64 = 2.0;
const UI_KEYS: &[&str] = &["enable", "path", "username", "password", "refresh"];
/// Where the stats JSON is served unless `stats.path` says otherwise
/// (fastapi-balancer's path).
pub const DEFAULT_STATS_PATH: &str = "/balancer/stats";
const STATS_KEYS: &[&str] = &["enable", "path"];

/// The stats JSON (`stats`). As in `ui`, an unknown key is an error: a
/// misspelt `enable: false` would leave it open.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Stats", deny_unknown_fields))]
#[serde(default)]
pub struct StatsDoc {
    /// Answer the stats path at all; `false` lets it through to the
    /// application (and turns the dashboard off, which reads it).
    #[cfg_attr(feature = "schema", schemars(with = "bool", extend("default" = true)))]
    pub enable: Option<Value>,
    /// Where the stats JSON is served (`GET`/`HEAD`).
    #[cfg_attr(feature = "schema", schemars(with = "String", regex(pattern = "^/[^?#]*$"), extend("default" = "/balancer/stats")))]
    pub path: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ui {
    /// Serve the page at all (default: no).
    pub enable: bool,
    pub path: String,
    /// `(username, password)`: when set, the page and the stats JSON ask for
    /// them (HTTP Basic); when not, both are open to anyone who can reach
    /// the proxy.
    pub credentials: Option<(String, String)>,
    /// How often the page polls the stats.
    pub refresh: Duration,
    /// Where the stats JSON is served (`stats.path`); `None` with
    /// `stats.enable: false`: that path is the application's.
    pub stats_path: Option<String>,
}

impl Default for Ui {
    fn default() -> Ui {
        Ui {
            enable: false,
            path: DEFAULT_UI_PATH.to_string(),
            credentials: None,
            refresh: Duration::from_secs_f64(DEFAULT_UI_REFRESH_SECS),
            stats_path: Some(DEFAULT_STATS_PATH.to_string()),
        }
    }
}

impl Ui {
    /// Reads `ui` from the whole document.
    pub fn from_json(document: &Value) -> Result<Ui, ConfigError> {
        Ui::try_from(&Document::from_value(document)?)
    }
}

impl TryFrom<&Document> for Ui {
    type Error = ConfigError;

    /// Unlike elsewhere, an unknown key here is an error: a misspelt
    /// `password` would leave the stats open.
    fn try_from(doc: &Document) -> Result<Ui, ConfigError> {
        let mut ui = Ui {
            stats_path: stats_path(doc.stats.as_ref())?,
            ..Ui::default()
        };
        let fields: &UiDoc = match &doc.ui {
            None => return Ok(ui),
            Some(Section::Map(m)) => m,
            Some(Section::Bad(v)) => {
                return Err(ConfigError::new(
                    "ui",
                    format!("must be a map of dashboard settings, got {}", shown(v)),
                ))
            }
        };
        if let Some(key) = fields.unknown.keys().next() {
            return Err(ConfigError::new(
                format!("ui.{key}"),
                format!(
                    "unknown key; the dashboard's keys are {}",
                    UI_KEYS.join(", ")
                ),
            ));
        }
        ui.enable = check::flag(fields.enable.as_ref(), "ui.enable", false)?;
        if let Some(p) = path(fields.path.as_ref(), "ui.path")? {
            ui.path = p;
        }
        if ui.enable && ui.stats_path.is_none() {
            return Err(ConfigError::new(
                "ui.enable",
                "the dashboard reads the stats JSON, which `stats.enable: false` turns off",
            ));
        }
        if ui.enable && ui.stats_path.as_deref() == Some(ui.path.as_str()) {
            return Err(ConfigError::new(
                "ui.path",
                format!("is the stats path too ({:?}): give each its own", ui.path),
            ));
        }
        let username = check::text(fields.username.as_ref(), "ui.username")?;
        let password = check::text(fields.password.as_ref(), "ui.password")?;
        ui.credentials = match (username, password) {
            (None, None) => None,
            (Some(user), Some(password)) if !user.contains(':') => Some((user, password)),
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "ui.username",
                    "must not contain ':' (HTTP Basic separates it from the password with one)",
                ))
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "ui.password",
                    "missing: set both username and password, or neither",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "ui.username",
                    "missing: set both username and password, or neither",
                ))
            }
        };
        ui.refresh = check::seconds_or(
            fields.refresh.as_ref(),
            "ui.refresh",
            check::UI_REFRESH,
            ui.refresh,
        )?;
        Ok(ui)
    }
}

/// A path key: `None` when not set.
fn path(v: Option<&Value>, key: &str) -> Result<Option<String>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(p)) if p.starts_with('/') && !p.contains(['?', '#']) => {
            Ok(Some(p.clone()))
        }
        Some(v) => Err(ConfigError::new(
            key,
            format!(
                "must be a path starting with '/', without a query string, got {}",
                shown(v)
            ),
        )),
    }
}

/// Where the stats are served, from the `stats` section; `None`: nowhere.
fn stats_path(section: Option<&Section<StatsDoc>>) -> Result<Option<String>, ConfigError> {
    let fields = match section {
        None => return Ok(Some(DEFAULT_STATS_PATH.to_string())),
        Some(Section::Map(m)) => m,
        Some(Section::Bad(v)) => {
            return Err(ConfigError::new(
                "stats",
                format!("must be a map of stats settings, got {}", shown(v)),
            ))
        }
    };
    if let Some(key) = fields.unknown.keys().next() {
        return Err(ConfigError::new(
            format!("stats.{key}"),
            format!("unknown key; the stats' keys are {}", STATS_KEYS.join(", ")),
        ));
    }
    if !check::flag(fields.enable.as_ref(), "stats.enable", true)? {
        return Ok(None);
    }
    Ok(Some(
        path(fields.path.as_ref(), "stats.path")?.unwrap_or_else(|| DEFAULT_STATS_PATH.to_string()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn ui_defaults_and_full() {
        assert_eq!(Ui::from_json(&json!({})).unwrap(), Ui::default());
        assert!(!Ui::default().enable);
        let ui = Ui::from_json(&json!({"ui": {
            "enable": true, "path": "/ops/ui", "username": "admin", "password": "s:cret",
            "refresh": 0.5
        }}))
        .unwrap();
        assert_eq!(
            ui,
            Ui {
                enable: true,
                path: "/ops/ui".into(),
                credentials: Some(("admin".into(), "s:cret".into())),
                refresh: Duration::from_millis(500),
                stats_path: Some(DEFAULT_STATS_PATH.into()),
            }
        );
    }

    #[test]
    fn stats_default_moved_and_off() {
        let path = |doc: Value| Ui::from_json(&doc).unwrap().stats_path;
        assert_eq!(path(json!({})), Some("/balancer/stats".into()));
        assert_eq!(path(json!({"stats": {}})), Some("/balancer/stats".into()));
        assert_eq!(
            path(json!({"stats": {"path": "/ops/sluice"}})),
            Some("/ops/sluice".into())
        );
        assert_eq!(path(json!({"stats": {"enable": false}})), None);
        assert_eq!(
            path(json!({"stats": {"enable": true, "path": "/s"}, "ui": {"enable": true}})),
            Some("/s".into())
        );
    }

    /// The exact text a user sees for each bad `ui`.
    #[test]
    fn ui_error_texts() {
        let cases: &[(Value, &str)] = &[
            (json!({"ui": true}), "ui: must be a map of dashboard settings, got true"),
            (
                json!({"ui": {"passwd": "x"}}),
                "ui.passwd: unknown key; the dashboard's keys are enable, path, username, password, refresh",
            ),
            (json!({"ui": {"enable": "yes"}}), "ui.enable: must be true or false, got \"yes\""),
            (
                json!({"ui": {"path": "ui"}}),
                "ui.path: must be a path starting with '/', without a query string, got \"ui\"",
            ),
            (
                json!({"ui": {"username": "admin"}}),
                "ui.password: missing: set both username and password, or neither",
            ),
            (
                json!({"ui": {"password": "x"}}),
                "ui.username: missing: set both username and password, or neither",
            ),
            (json!({"ui": {"username": "", "password": "x"}}), "ui.username: must be a non-empty string, got \"\""),
            (
                json!({"ui": {"username": "a:b", "password": "x"}}),
                "ui.username: must not contain ':' (HTTP Basic separates it from the password with one)",
            ),
            (json!({"ui": {"refresh": 0}}), "ui.refresh: must be a number of seconds from 0.1 to 60, got 0"),
            (json!({"stats": false}), "stats: must be a map of stats settings, got false"),
            (
                json!({"stats": {"enabled": false}}),
                "stats.enabled: unknown key; the stats' keys are enable, path",
            ),
            (json!({"stats": {"enable": "no"}}), "stats.enable: must be true or false, got \"no\""),
            (
                json!({"stats": {"path": "stats"}}),
                "stats.path: must be a path starting with '/', without a query string, got \"stats\"",
            ),
            (
                json!({"stats": {"enable": false}, "ui": {"enable": true}}),
                "ui.enable: the dashboard reads the stats JSON, which `stats.enable: false` turns off",
            ),
            (
                json!({"stats": {"path": "/ops"}, "ui": {"enable": true, "path": "/ops"}}),
                "ui.path: is the stats path too (\"/ops\"): give each its own",
            ),
        ];
        for (input, want) in cases {
            let got = Ui::from_json(input)
                .expect_err(&input.to_string())
                .to_string();
            assert_eq!(&got, want, "input: {input}");
        }
    }
}
