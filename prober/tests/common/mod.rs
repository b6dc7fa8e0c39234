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

/// Checks `doc` against the committed schema `name` (with the `jsonschema`
/// crate); panics with every violation.
pub fn assert_matches_schema(name: &str, doc: &Value) {
    let errors = schema_errors(&load_schema(name), doc);
    assert!(
        errors.is_empty(),
        "output does not match {name}:\n{}\n\ndocument:\n{}",
        errors.join("\n"),
        serde_json::to_string_pretty(doc).unwrap()
    );
}

/// Every violation of `schema` by `doc`, as `path: message`.
pub fn schema_errors(schema: &Value, doc: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(schema).expect("a valid JSON Schema");
    validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}
