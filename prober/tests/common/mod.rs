//! Shared by the prober's integration tests: running the binary, keeping
//! load-generating tests from overlapping, checking JSON against the
//! committed schemas.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tests that generate load run one at a time even when the test harness
/// runs tests in parallel: two probes sharing two cores would distort each
/// other's latencies.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `sluice-prober ARGS` (the binary Cargo built for these tests) and
/// waits for it, at most `limit`.
pub fn prober(args: &[&str], limit: Duration) -> Run {
    prober_with_env(args, &[], limit)
}

/// `prober` with these environment variables set (and SLUICE_REDIS_URL
/// removed unless given, so the caller's environment cannot leak in).
pub fn prober_with_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let start = Instant::now();
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-prober"));
    command.env_remove("SLUICE_REDIS_URL");
    command.envs(env.iter().copied());
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run sluice-prober");
    let pid = child.id();
    // Kill it by pid if it overruns, so a hung probe fails the test instead
    // of hanging CI.
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // A zombie (exited, not yet reaped) is done.
                if stat.split_whitespace().nth(2) == Some("Z") {
                    return false;
                }
            }
        }
        let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        true
    });
    let out = child.wait_with_output().expect("waiting for sluice-prober");
    let killed = watchdog.join().unwrap_or(false);
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    };
    assert!(
        !killed,
        "sluice-prober {args:?} ran past {limit:?} and was killed; stderr:\n{}",
        run.stderr
    );
    run
}

pub fn schema_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schema")
        .join(name)
}

pub fn load_schema(name: &str) -> Value {
    let text = std::fs::read_to_string(schema_path(name)).expect("schema file");
    serde_json::from_str(&text).expect("schema is JSON")
}

/// Checks `doc` against the committed schema `name`; panics with every
/// violation.
pub fn assert_matches_schema(name: &str, doc: &Value) {
    let schema = load_schema(name);
    let mut errors = Vec::new();
    validate(&schema, &schema, doc, "$", &mut errors);
    assert!(
        errors.is_empty(),
        "output does not match {name}:\n{}\n\ndocument:\n{}",
        errors.join("\n"),
        serde_json::to_string_pretty(doc).unwrap()
    );
}

/// A JSON Schema (2020-12) validator for the keywords our schemas use.
///
/// The `jsonschema` crate would pull ~60 crates and two minutes of build
/// into every CI run for one check; this covers exactly the keywords in
/// prober/schema/ and panics on any other, so a schema change cannot slip
/// past it unchecked.
pub fn validate(root: &Value, schema: &Value, doc: &Value, at: &str, errors: &mut Vec<String>) {
    let Some(s) = schema.as_object() else {
        panic!("schema at {at} is not an object");
    };
    for key in s.keys() {
        assert!(
            matches!(
                key.as_str(),
                "$schema"
                    | "title"
                    | "description"
                    | "$defs"
                    | "type"
                    | "properties"
                    | "required"
                    | "additionalProperties"
                    | "items"
                    | "enum"
                    | "const"
                    | "minimum"
                    | "maximum"
                    | "exclusiveMinimum"
                    | "anyOf"
                    | "$ref"
            ),
            "the test validator does not know the schema keyword {key:?} (at {at})"
        );
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r
            .strip_prefix("#/$defs/")
            .unwrap_or_else(|| panic!("unsupported $ref {r}"));
        let target = &root["$defs"][name];
        assert!(!target.is_null(), "$ref {r} points nowhere");
        validate(root, target, doc, at, errors);
    }
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        let ok = any.iter().any(|sub| {
            let mut e = Vec::new();
            validate(root, sub, doc, at, &mut e);
            e.is_empty()
        });
        if !ok {
            errors.push(format!("{at}: matches none of anyOf"));
        }
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => panic!("bad type at {at}"),
        };
        let fits = types.iter().any(|t| match *t {
            "object" => doc.is_object(),
            "array" => doc.is_array(),
            "string" => doc.is_string(),
            "number" => doc.is_number(),
            "integer" => doc.is_i64() || doc.is_u64(),
            "boolean" => doc.is_boolean(),
            "null" => doc.is_null(),
            other => panic!("unknown type {other} at {at}"),
        });
        if !fits {
            errors.push(format!("{at}: expected {types:?}, got {doc}"));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(doc) {
            errors.push(format!("{at}: {doc} is not one of {e:?}"));
        }
    }
    if let Some(c) = s.get("const") {
        if c != doc {
            errors.push(format!("{at}: expected {c}, got {doc}"));
        }
    }
    if let Some(n) = doc.as_f64() {
        if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
            if n < min {
                errors.push(format!("{at}: {n} < minimum {min}"));
            }
        }
        if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
            if n > max {
                errors.push(format!("{at}: {n} > maximum {max}"));
            }
        }
        if let Some(min) = s.get("exclusiveMinimum").and_then(Value::as_f64) {
            if n <= min {
                errors.push(format!("{at}: {n} <= exclusiveMinimum {min}"));
            }
        }
    }
    if let Some(obj) = doc.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errors.push(format!("{at}: missing required {r:?}"));
                }
            }
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => validate(root, sub, v, &format!("{at}.{k}"), errors),
                None => {
                    if s.get("additionalProperties") == Some(&Value::Bool(false)) {
                        errors.push(format!("{at}: unexpected property {k:?}"));
                    }
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), doc.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            validate(root, items, v, &format!("{at}[{i}]"), errors);
        }
    }
}
