//! `classes`: request classes, each with a priority, served highest first
//! from one endpoint's queue (see `docs/config.md#classes`). A request's
//! class is named by a header (`class_header`), else by its endpoint's
//! `class`, else it is `default_class`. Absent: one class, one FIFO.

use super::check::{self, unknown_keys, ConfigError, ConfigWarning};
use super::document::{Document, Section};
use super::shown;
use crate::admission::Class;
#[cfg(feature = "schema")]
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::Duration;

/// The request header that names a request's class.
pub const DEFAULT_CLASS_HEADER: &str = "x-sluice-class";
/// The class of a request that names none (or one not configured).
pub const DEFAULT_CLASS: &str = "default";
/// Classes one configuration may have: each endpoint keeps stats per class,
/// so their number bounds the stats' size.
pub const MAX_CLASSES: usize = 16;

/// One class as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Class", deny_unknown_fields))]
#[serde(default)]
pub struct ClassDoc {
    /// Higher is served first (0 to 255); equal priorities share one FIFO.
    #[cfg_attr(feature = "schema", schemars(with = "u8", extend("default" = 0)))]
    pub priority: Option<Value>,
    /// Seconds a request of this class may wait, if less than its
    /// endpoint's `queue_timeout` (the lesser of the two applies).
    #[cfg_attr(
        feature = "schema",
        schemars(with = "f64", range(min = 0.001, max = 86400))
    )]
    pub queue_timeout: Option<Value>,
    /// At most this many of its requests wait per endpoint (the endpoint's
    /// `max_queue` bounds every class together as well).
    #[cfg_attr(
        feature = "schema",
        schemars(with = "u32", range(min = 0, max = 10000))
    )]
    pub max_queue: Option<Value>,
    /// Never queued: admitted when a slot is free, refused at once
    /// (queue-full, `x-sluice-reason: shed`) when none is.
    #[cfg_attr(feature = "schema", schemars(with = "bool", extend("default" = false)))]
    pub sheddable: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// The classes by name, in file order.
pub type ClassesDoc = indexmap::IndexMap<String, Option<Section<ClassDoc>>>;

/// One class, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassSpec {
    pub name: String,
    pub priority: u8,
    pub queue_timeout: Option<Duration>,
    pub max_queue: Option<u32>,
    pub sheddable: bool,
}

/// `classes`, `class_header` and `default_class`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Classes {
    /// Lower-case, as Envoy hands headers to filters.
    pub header: String,
    /// Index of the default class in `list`.
    pub default: u8,
    pub list: Vec<ClassSpec>,
}

impl Classes {
    pub fn from_document(
        doc: &Document,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Result<Option<Classes>, ConfigError> {
        let map = match &doc.classes {
            None => {
                for (key, v) in [
                    ("class_header", &doc.class_header),
                    ("default_class", &doc.default_class),
                ] {
                    if v.is_some() {
                        return Err(ConfigError::new(
                            key,
                            "is set but there are no classes; define them under classes:",
                        ));
                    }
                }
                return Ok(None);
            }
            Some(Section::Map(m)) => m,
            Some(Section::Bad(v)) => {
                return Err(ConfigError::new(
                    "classes",
                    format!(
                        "must be a map from class name to its settings, got {}",
                        shown(v)
                    ),
                ))
            }
        };
        if map.is_empty() {
            return Err(ConfigError::new(
                "classes",
                "is empty; leave it out for one class, or name at least one",
            ));
        }
        if map.len() > MAX_CLASSES {
            return Err(ConfigError::new(
                "classes",
                format!(
                    "has {} classes, more than the {MAX_CLASSES} an endpoint keeps stats for",
                    map.len()
                ),
            ));
        }
        let mut list = Vec::with_capacity(map.len());
        for (name, spec) in map {
            list.push(class(name, spec.as_ref(), warnings)?);
        }
        let header = check::header_name(doc.class_header.as_ref(), "class_header")?
            .unwrap_or_else(|| DEFAULT_CLASS_HEADER.to_string());
        let default_name = check::text(doc.default_class.as_ref(), "default_class")?;
        let wanted = default_name.as_deref().unwrap_or(DEFAULT_CLASS);
        let Some(default) = list.iter().position(|c| c.name == wanted) else {
            let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
            return Err(ConfigError::new(
                "default_class",
                match default_name {
                    Some(n) => format!("{n:?} is not one of the classes ({})", names.join(", ")),
                    None => format!(
                        "must name the class of requests that name none: there is no class \
                         {DEFAULT_CLASS:?} among {}",
                        names.join(", ")
                    ),
                },
            ));
        };
        Ok(Some(Classes {
            header,
            default: default as u8,
            list,
        }))
    }

    /// The index of the class called `name`.
    pub fn index(&self, name: &str) -> Option<u8> {
        self.list
            .iter()
            .position(|c| c.name == name)
            .map(|i| i as u8)
    }

    /// The class `index` as the admission record takes it.
    pub fn admission(&self, index: u8) -> Class {
        match self.list.get(usize::from(index)) {
            Some(c) => Class {
                index,
                priority: c.priority,
                max_queue: c.max_queue,
                sheddable: c.sheddable,
                ..Class::DEFAULT
            },
            None => Class::DEFAULT,
        }
    }
}

fn class(
    name: &str,
    spec: Option<&Section<ClassDoc>>,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<ClassSpec, ConfigError> {
    let key = |field: &str| format!("classes.{name}.{field}");
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ConfigError::new(
            format!("classes.{name}"),
            "a class name is letters, digits, '-' and '_' (it is a header value and a metric tag)",
        ));
    }
    let empty = ClassDoc::default();
    let fields = match spec {
        None => &empty,
        Some(Section::Map(m)) => m,
        Some(Section::Bad(v)) => {
            return Err(ConfigError::new(
                format!("classes.{name}"),
                format!("must be a map of class settings, got {}", shown(v)),
            ))
        }
    };
    warnings.extend(unknown_keys(&fields.unknown, &format!("classes.{name}.")));
    let priority = match &fields.priority {
        None | Some(Value::Null) => 0,
        Some(v) => check::integer(v, &key("priority"), 0, 255)? as u8,
    };
    let queue_timeout = match &fields.queue_timeout {
        None | Some(Value::Null) => None,
        Some(v) => Some(check::seconds(
            v,
            &key("queue_timeout"),
            check::QUEUE_TIMEOUT,
        )?),
    };
    let max_queue = match &fields.max_queue {
        None | Some(Value::Null) => None,
        Some(v) => Some(check::integer(
            v,
            &key("max_queue"),
            0,
            u64::from(super::enforcement::MAX_QUEUE_LIMIT),
        )? as u32),
    };
    let sheddable = check::flag(fields.sheddable.as_ref(), &key("sheddable"), false)?;
    Ok(ClassSpec {
        name: name.to_string(),
        priority,
        queue_timeout,
        max_queue,
        sheddable,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use serde_json::json;
    use std::time::Duration;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn err(v: serde_json::Value) -> String {
        Config::from_json(&v).unwrap_err().to_string()
    }

    #[test]
    fn classes_with_their_defaults_and_an_endpoint_class() {
        let c = Config::from_json(&json!({
            "classes": {
                "interactive": {"priority": 10, "queue_timeout": 2},
                "default": {"priority": 5},
                "batch": {"max_queue": 50, "sheddable": true},
            },
            "class_header": "X-Priority",
            "endpoints": {"/a": {"capacity": 1}, "/b": {"capacity": 1, "class": "batch"}},
        }))
        .unwrap();
        let classes = c.classes.as_ref().unwrap();
        assert_eq!(classes.header, "x-priority");
        assert_eq!(classes.default, 1);
        let batch = &classes.list[2];
        assert_eq!(
            (batch.priority, batch.max_queue, batch.sheddable),
            (0, Some(50), true)
        );
        assert_eq!(classes.list[0].queue_timeout, Some(Duration::from_secs(2)));
        assert_eq!(classes.admission(0).priority, 10);
        assert_eq!(
            (c.endpoints[0].class, c.endpoints[1].class),
            (None, Some(2))
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn bad_classes_name_the_key() {
        assert_eq!(
            err(json!({"classes": {"a": {"priority": 300}}, "default_class": "a"})),
            "classes.a.priority: must be an integer from 0 to 255, got 300"
        );
        assert_eq!(
            err(json!({"classes": {"a": {}, "b": {}}})),
            "default_class: must name the class of requests that name none: there is no class \"default\" among a, b"
        );
        assert_eq!(
            err(json!({"classes": {"a": {}}, "default_class": "z"})),
            "default_class: \"z\" is not one of the classes (a)"
        );
        assert_eq!(
            err(json!({"classes": {"a b": {}}})),
            "classes.a b: a class name is letters, digits, '-' and '_' (it is a header value and a metric tag)"
        );
        assert_eq!(
            err(json!({"default_class": "a"})),
            "default_class: is set but there are no classes; define them under classes:"
        );
        assert_eq!(
            err(json!({"classes": {"default": {}}, "endpoints": {"/a": {"class": "vip"}}})),
            "endpoints./a.class: \"vip\" is not one of the classes (default)"
        );
        assert_eq!(
            err(json!({"classes": {"default": {}}, "class_header": "a b"})),
            "class_header: must be an HTTP header name, got \"a b\""
        );
        let many: serde_json::Map<String, serde_json::Value> =
            (0..17).map(|i| (format!("c{i}"), json!({}))).collect();
        assert!(err(json!({"classes": many})).starts_with("classes: has 17 classes"));
    }
}
