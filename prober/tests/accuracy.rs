//! The prober against the workspace's test backend, whose capacity is known:
//! K slots of 20 ms each. With a 30 ms p99 threshold the first level past K
//! makes some requests wait a whole service time (≈ 40 ms), so the answer
//! must be exactly K; with `overload=reject` the 503s past K trip the error
//! threshold instead.
//!
//! Levels are short here (0.2 s warm-up, 0.8 s measured) so each probe takes
//! seconds; the defaults suit real services. Probes run one at a time.

mod common;

use common::{assert_matches_schema, prober, serial};
use serde_json::Value;
use sluice_harness::Backend;
use std::time::Duration;

/// Every probe must finish well inside this (the bound is 30 s).
const PROBE_LIMIT: Duration = Duration::from_secs(30);

fn probe_capacity(route: &str, path: &str) -> Value {
    let backend = Backend::start(&[route]);
    let url = format!("http://{}", backend.addr());
    let run = prober(
        &[
            "probe",
            "--url",
            &url,
            "--endpoint",
            path,
            "--latency-threshold-ms",
            "30",
            "--error-threshold",
            "0.05",
            "--warmup",
            "0.2",
            "--duration",
            "0.8",
            "--min-samples",
            "50",
            "--max-duration",
            "2",
            "--json",
            "--quiet",
        ],
        PROBE_LIMIT + Duration::from_secs(5),
    );
    let doc = run.json();
    assert_matches_schema("probe-output.schema.json", &doc);
    assert!(
        run.elapsed < PROBE_LIMIT,
        "the probe of {route} took {:?}",
        run.elapsed
    );
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);

    // The closed loop holds exactly N connections: the most the backend ever
    // saw inside at once is the highest level the probe ran.
    let runs = doc["endpoints"][0]["runs"].as_array().unwrap().clone();
    let highest = runs
        .iter()
        .map(|r| r["concurrency"].as_u64().unwrap())
        .max()
        .unwrap();
    let seen = backend.path_stats(path);
    assert_eq!(
        seen["max_in_flight"].as_u64(),
        Some(highest),
        "backend saw {seen}"
    );
    doc
}

fn assert_capacity(k: u64) {
    let _one_at_a_time = serial();
    let path = format!("/k{k}");
    let doc = probe_capacity(&format!("{path}:capacity={k},service_ms=20"), &path);
    let e = &doc["endpoints"][0];
    assert_eq!(
        e["capacity"].as_u64(),
        Some(k),
        "runs: {}",
        serde_json::to_string_pretty(&e["runs"]).unwrap()
    );
    assert_eq!(e["outcome"], "measured");
    // The re-run confirmed both sides of the boundary.
    let confirms: Vec<u64> = e["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["stage"] == "confirm")
        .map(|r| r["concurrency"].as_u64().unwrap())
        .collect();
    assert!(
        confirms.contains(&k) && confirms.contains(&(k + 1)),
        "{confirms:?}"
    );
    // Advisory figures: a throughput knee at the capacity (give or take a
    // level: throughput at K and K+1 is the same, so noise picks), a USL fit.
    let knee = e["knee"]["concurrency"].as_u64().unwrap();
    assert!(
        knee.abs_diff(k) <= 1.max(k / 10),
        "knee {knee} for capacity {k}"
    );
    if k > 1 {
        let usl = &e["usl"];
        assert!(usl["sigma"].as_f64().unwrap() >= 0.0 && usl["kappa"].as_f64().unwrap() >= 0.0);
    }
}

#[test]
fn capacity_1() {
    assert_capacity(1);
}

#[test]
fn capacity_4() {
    assert_capacity(4);
}

#[test]
fn capacity_7() {
    assert_capacity(7);
}

#[test]
fn capacity_16() {
    assert_capacity(16);
}

#[test]
fn capacity_37() {
    assert_capacity(37);
}

#[test]
fn reject_mode_capacity_comes_from_the_error_threshold() {
    let _one_at_a_time = serial();
    let doc = probe_capacity("/r7:capacity=7,service_ms=20,overload=reject", "/r7");
    let e = &doc["endpoints"][0];
    assert_eq!(e["capacity"].as_u64(), Some(7));
    // Level 8 failed on errors (503s), not latency.
    let eight = e["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["concurrency"] == 8)
        .expect("level 8 ran")
        .clone();
    let why = eight["failures"][0].as_str().unwrap();
    assert!(
        why.starts_with("error rate") && why.contains("503"),
        "{why}"
    );
}
