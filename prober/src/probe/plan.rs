//! Which endpoints a probe looks at, and how a capacity found for one goes
//! into the file.

use crate::cli::ProbeArgs;
use crate::config_edit::Edit;
use crate::config_file::{ConfigFile, EndpointSpec};
use crate::error::ProberError;
use crate::settings::Settings;
use crate::target;
use serde_json::{Map, Value};

/// One endpoint to look at, and whether the file already holds it.
pub(super) struct Planned {
    pub(super) spec: EndpointSpec,
    pub(super) in_file: bool,
}

pub(super) fn plan(
    args: &ProbeArgs,
    file: Option<&ConfigFile>,
) -> Result<Vec<Planned>, ProberError> {
    let flags_given = args.request.method.is_some()
        || !args.request.headers.is_empty()
        || args.request.body.is_some();
    if args.endpoints.is_empty() {
        let Some(file) = file else {
            return Err(ProberError::Usage(
                "nothing to probe: pass --config FILE or --endpoint PATH".into(),
            ));
        };
        if flags_given {
            return Err(ProberError::Usage(
                "--method, --header and --body describe endpoints given with --endpoint".into(),
            ));
        }
        if file.endpoints.is_empty() {
            return Err(ProberError::Usage(format!(
                "{}: no endpoints to probe (add them under `endpoints:` or pass --endpoint)",
                file.path.display()
            )));
        }
        return Ok(file
            .endpoints
            .iter()
            .map(|e| Planned {
                spec: e.clone(),
                in_file: true,
            })
            .collect());
    }
    let mut out: Vec<Planned> = Vec::new();
    for path in &args.endpoints {
        target::check_path(path)?;
        if out.iter().any(|p| &p.spec.path == path) {
            continue;
        }
        match file.and_then(|f| f.endpoint(path)) {
            Some(spec) => {
                if flags_given {
                    return Err(ProberError::Usage(format!(
                        "endpoint {path} is already in {}: change its method, headers and body there, \
                         not with --method/--header/--body",
                        file.map(|f| f.path.display().to_string()).unwrap_or_default()
                    )));
                }
                out.push(Planned {
                    spec: spec.clone(),
                    in_file: true,
                });
            }
            None => out.push(Planned {
                spec: target::spec_from_flags(
                    path,
                    args.request.method.as_deref(),
                    &args.request.headers,
                    args.request.body.as_deref(),
                )?,
                in_file: false,
            }),
        }
    }
    Ok(out)
}

/// Settings of a new endpoint as they go into the file.
fn new_endpoint_settings(spec: &EndpointSpec, capacity: u32) -> Map<String, Value> {
    let mut m = Map::new();
    if spec.method != "GET" {
        m.insert("method".into(), Value::String(spec.method.clone()));
    }
    if !spec.headers.is_empty() {
        let h: Map<String, Value> = spec
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        m.insert("headers".into(), Value::Object(h));
    }
    if let Some(b) = &spec.body {
        m.insert("body".into(), b.clone());
    }
    m.insert("capacity".into(), Value::from(capacity));
    m
}

pub(super) fn edit_for(p: &Planned, capacity: u32, note: String) -> Edit {
    if p.in_file {
        Edit::SetCapacity {
            path: p.spec.path.clone(),
            capacity,
            note,
        }
    } else {
        Edit::AddEndpoint {
            path: p.spec.path.clone(),
            settings: new_endpoint_settings(&p.spec, capacity),
            note,
        }
    }
}

/// Top-level keys of a config created from flags: what was given on the
/// command line and would be needed to repeat the probe.
pub(super) fn new_file_top(
    args: &ProbeArgs,
    settings: &Settings,
    service: &str,
) -> Map<String, Value> {
    let mut top = Map::new();
    if args.service.is_some() {
        top.insert("service".into(), Value::from(service));
    }
    if args.error_threshold.is_some() {
        top.insert(
            "error_threshold".into(),
            Value::from(settings.thresholds.error_rate),
        );
    }
    if args.latency_threshold_ms.is_some() {
        top.insert(
            "latency_threshold_ms".into(),
            number(settings.thresholds.p99_ms),
        );
    }
    top
}

fn number(v: f64) -> Value {
    if v.fract() == 0.0 && (0.0..1e15).contains(&v) {
        Value::from(v as u64)
    } else {
        Value::from(v)
    }
}
