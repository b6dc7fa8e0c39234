//! docs/sluice.schema.json is the schema the configuration types generate,
//! and every configuration in the repo passes it: the filter's plugin
//! `configuration` in each Envoy config, Istio's `pluginConfig`, each
//! `sluice.yaml`, and the full documents in README.md and docs/config.md.
//! No process is started.

use serde_json::Value;
use sluice_core::config::{schema_json, yaml};
use sluice_harness::{files_under, workspace_root};
use std::fs;
use std::path::Path;

const SCHEMA: &str = "docs/sluice.schema.json";
const REGENERATE: &str =
    "cargo run -p sluice-core --features schema --bin sluice-schema > docs/sluice.schema.json";

/// Every sluice document inside one parsed YAML (or JSON) tree: the JSON
/// string of a `configuration` of the sluice filter, and `pluginConfig`.
fn embedded(v: &Value, found: &mut Vec<Value>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(config)) = m.get("configuration") {
                let sluice = m
                    .get("vm_config")
                    .map(|vm| vm.to_string().contains("sluice"))
                    .unwrap_or(false);
                if let (true, Some(Value::String(text))) = (sluice, config.get("value")) {
                    found.push(serde_json::from_str(text).unwrap_or_else(|e| {
                        panic!("plugin configuration is not JSON: {e}\n{text}")
                    }));
                }
            }
            if let Some(doc) = m.get("pluginConfig") {
                found.push(doc.clone());
            }
            for child in m.values() {
                embedded(child, found);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| embedded(i, found)),
        _ => {}
    }
}

/// The documents of a multi-document YAML file.
fn yaml_documents(text: &str) -> Vec<Value> {
    text.split("\n---")
        .filter(|d| !d.trim().is_empty())
        .map(|d| yaml::parse(d).unwrap_or_else(|e| panic!("{e}\n{d}")))
        .collect()
}

/// Fenced `yaml` or `json` blocks of a markdown page that are whole
/// sluice documents (they have a top-level `endpoints`).
fn markdown_documents(text: &str) -> Vec<Value> {
    let mut found = Vec::new();
    let mut block: Option<(String, String)> = None;
    for line in text.lines() {
        match &mut block {
            None => {
                if let Some(lang) = line.trim_start().strip_prefix("```") {
                    block = Some((lang.trim().to_string(), String::new()));
                }
            }
            Some((lang, body)) => {
                if line.trim_start().starts_with("```") {
                    let doc = match lang.as_str() {
                        "yaml" if body.lines().any(|l| l.starts_with("endpoints:")) => {
                            yaml::parse(body).ok()
                        }
                        "json" => serde_json::from_str::<Value>(body).ok(),
                        _ => None,
                    };
                    if let Some(doc) = doc.filter(|d| d.get("endpoints").is_some()) {
                        found.push(doc);
                    }
                    block = None;
                } else {
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
    }
    found
}

/// Every configuration in the repo, named by where it is.
fn every_configuration(root: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut yamls = Vec::new();
    for dir in ["envoy", "deploy", "bench", "tests"] {
        yamls.extend(files_under(&root.join(dir), &["yaml", "yml"]));
    }
    yamls.push(root.join("docker-compose.yml"));
    for path in yamls {
        let name = path.strip_prefix(root).unwrap().display().to_string();
        let text = fs::read_to_string(&path).unwrap();
        let docs = yaml_documents(&text);
        if path.file_name().is_some_and(|f| f == "sluice.yaml") {
            out.extend(docs.iter().map(|d| (name.clone(), d.clone())));
            continue;
        }
        let mut found = Vec::new();
        docs.iter().for_each(|d| embedded(d, &mut found));
        out.extend(found.into_iter().map(|d| (name.clone(), d)));
    }
    // The pages that show whole documents (others show the stats JSON).
    for path in [root.join("README.md"), root.join("docs/config.md")] {
        let name = path.strip_prefix(root).unwrap().display().to_string();
        let docs = markdown_documents(&fs::read_to_string(&path).unwrap());
        out.extend(docs.into_iter().map(|d| (name.clone(), d)));
    }
    out
}

fn validator() -> jsonschema::Validator {
    let text = fs::read_to_string(workspace_root().join(SCHEMA)).unwrap();
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

/// Schema errors of `doc`, one line each, empty when it passes.
fn problems(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let committed = fs::read_to_string(workspace_root().join(SCHEMA)).unwrap_or_default();
    assert!(
        committed == schema_json(),
        "{SCHEMA} is not what the configuration types generate; regenerate it with\n  {REGENERATE}"
    );
}

#[test]
fn every_configuration_in_the_repo_passes_the_schema() {
    let root = workspace_root();
    let v = validator();
    let configurations = every_configuration(&root);
    let mut failures = Vec::new();
    for (name, doc) in &configurations {
        let p = problems(&v, doc);
        if !p.is_empty() {
            failures.push(format!("{name}:\n  {}", p.join("\n  ")));
        }
        eprintln!("checked {name}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Each kind of place is searched: a search that finds nothing is a bug.
    for place in [
        "envoy/front-proxy/envoy.yaml",
        "envoy/compose/sluice.yaml",
        "envoy/front-proxy-sync/sluice.yaml",
        "deploy/istio/app/wasmplugin.yaml",
        "deploy/istio/app/envoyfilter.yaml",
        "docs/config.md",
    ] {
        assert!(
            configurations.iter().any(|(name, _)| name == place),
            "no configuration found in {place}"
        );
    }
}

/// The schema says no where the parsers say no (a few of their table rows).
#[test]
fn the_schema_refuses_what_the_parsers_refuse() {
    let v = validator();
    let bad = [
        r#"{"queue_timeout": 0}"#,
        r#"{"max_queue": 20000}"#,
        r#"{"endpoints": {"predict": {}}}"#,
        r#"{"endpoints": {"/p": {"capacity": 0}}}"#,
        r#"{"endpoints": {"/p": {"match": "regex"}}}"#,
        r#"{"endpoints": {"/p": {"methods": []}}}"#,
        r#"{"ui": {"passwd": "x"}}"#,
        r#"{"ui": {"refresh": 0}}"#,
        r#"{"sync": {"heartbeat_timeout": 0}}"#,
        r#"{"health": {"unhealthy_threshold": 0}}"#,
        r#"{"storage": {"type": "etcd"}}"#,
        r#"{"probe": {"warmpu": 1}}"#,
        r#"{"error_threshold": 5}"#,
    ];
    for text in bad {
        let doc: Value = serde_json::from_str(text).unwrap();
        assert!(!problems(&v, &doc).is_empty(), "the schema accepts {text}");
    }
    let good: Value = serde_json::from_str(
        r#"{"service": "demo", "endpoints": {"/p": {"capacity": 2, "methods": ["post"]}, "/q": null},
            "ui": {"enable": true}, "probe": {"warmup": 0}, "abandon_hold": 0}"#,
    )
    .unwrap();
    assert_eq!(problems(&v, &good), Vec::<String>::new());
}
