//! The autoscaling manifests in `deploy/autoscaling/` against the KEDA and
//! Kubernetes schemas (and prometheus-adapter's rules), offline and strictly,
//! with the deployment files' validator, `scripts/validate_manifests.py k8s`
//! (`make deps` installs its Python packages).

use sluice_harness::{venv_program, workspace_root, ScratchDir};
use std::path::Path;
use std::process::{Command, Output};

fn validate(files: &[&Path]) -> Output {
    Command::new(venv_program("python3"))
        .arg(workspace_root().join("scripts/validate_manifests.py"))
        .arg("k8s")
        .args(files)
        .output()
        .expect("running python3")
}

fn manifest(name: &str) -> std::path::PathBuf {
    workspace_root().join("deploy/autoscaling").join(name)
}

const MANIFESTS: [&str; 3] = [
    "keda-scaledobject.yaml",
    "hpa.yaml",
    "prometheus-adapter-rules.yaml",
];

#[test]
fn autoscaling_manifests_pass_the_schemas() {
    let paths: Vec<_> = MANIFESTS.iter().map(|m| manifest(m)).collect();
    let files: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let out = validate(&files);
    let report = String::from_utf8_lossy(&out.stdout);
    let problems = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}{problems}");
    // Each document was checked against its schema, none skipped.
    for want in [
        "ScaledObject demo/demo-predict (KEDA",
        "HorizontalPodAutoscaler demo/demo-predict (Kubernetes",
        "ConfigMap monitoring/prometheus-adapter (Kubernetes",
        "ConfigMap monitoring/prometheus-adapter data.config.yaml (prometheus-adapter rules)",
    ] {
        assert!(report.contains(want), "not checked: {want}\n{report}");
    }
}

/// A misspelt field, or a number where KEDA wants a string, fails.
#[test]
fn a_misspelt_field_fails_in_every_manifest() {
    let scratch = ScratchDir::new("autoscaling");
    let cases = [
        (
            "keda-scaledobject.yaml",
            "minReplicaCount:",
            "minReplicaCout:",
            "'minReplicaCout' was unexpected",
        ),
        (
            "keda-scaledobject.yaml",
            "threshold: \"3\"",
            "threshold: 3",
            "threshold: 3 is not of type 'string'",
        ),
        (
            "keda-scaledobject.yaml",
            "metricType:",
            "metricTyp:",
            "'metricTyp' was unexpected",
        ),
        (
            "hpa.yaml",
            "averageValue:",
            "averageValu:",
            "'averageValu' was unexpected",
        ),
        (
            "hpa.yaml",
            "stabilizationWindowSeconds:",
            "stabilisationWindowSeconds:",
            "'stabilisationWindowSeconds' was unexpected",
        ),
        (
            "prometheus-adapter-rules.yaml",
            "metricsQuery:",
            "metricQuery:",
            "'metricQuery' was unexpected",
        ),
    ];
    for (i, (file, from, to, want)) in cases.iter().enumerate() {
        let text = std::fs::read_to_string(manifest(file)).unwrap();
        assert!(text.contains(from), "{file} has no {from}");
        let bad = scratch.path().join(format!("{i}-{file}"));
        std::fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        let out = validate(&[&bad]);
        let report = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} with {to} passed");
        assert!(report.contains(want), "{file} with {to}: {report}");
    }
}
