//! The queries we ship, run by a real Prometheus (Debian's `prometheus`)
//! scraping a real Envoy with Sluice under load, against what the backend
//! really had: the KEDA and prometheus-adapter queries of
//! `deploy/autoscaling/`, every query of `docs/autoscaling.md`, every
//! expression of the Grafana dashboard (`deploy/grafana/`) and the rules of
//! the PrometheusRule (`deploy/alerts/`, loaded into the same Prometheus).
//! The queries are read from those files, not copied here. Prometheus
//! scrapes with the target labels Prometheus Operator sets (`namespace`,
//! `pod`, `service`, `endpoint`, `container`), so a label of ours that
//! clashed with one would show up as `exported_…` and fail. Also
//! `promtool test rules` on the alert rules' unit tests.
//! Needs `make wasm`, `cargo build --release -p sluice-backend` and
//! `make deps` (Prometheus).

use serde_json::{json, Value};
use sluice_harness::{
    wait_until, workspace_root, Backend, Envoy, FrontProxy, Prometheus, ScrapeTarget, ScratchDir,
};
use sluice_loadgen::{run_blocking, Burst};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const CAPACITY: u64 = 3;
const SENT: u64 = 5;

fn repo_file(path: &str) -> PathBuf {
    workspace_root().join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    yaml_serde::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The PromQL of every ```promql block of a Markdown file; a line that
/// starts with a space continues the expression above it.
fn markdown_queries(path: &str) -> Vec<String> {
    let text = read(path);
    let mut queries: Vec<String> = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = line.trim() == "```promql";
            continue;
        }
        if !in_block || line.trim().is_empty() {
            continue;
        }
        match queries.last_mut() {
            Some(last) if line.starts_with(' ') => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ => queries.push(line.trim().to_string()),
        }
    }
    queries
}

/// The PrometheusRule's `spec` as a plain rule file (what promtool and
/// Prometheus read).
fn rule_file() -> String {
    let rule = yaml("deploy/alerts/prometheus-rule.yaml");
    assert_eq!(rule["kind"], "PrometheusRule");
    yaml_serde::to_string(&rule["spec"]).unwrap()
}

/// The dashboard's expressions, with Grafana's variables as a user who
/// picked this namespace, service and endpoint would have them.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/sluice-dashboard.json"))
        .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            exprs.push((
                format!("{} {}", panel["title"], target["refId"]),
                expr.replace("$namespace", "demo")
                    .replace("$service", "demo")
                    .replace("$endpoint", "/predict")
                    .replace("$__rate_interval", "1m"),
            ));
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        // label_values(SELECTOR, LABEL): Grafana's; the selector is PromQL.
        let Some(q) = var["query"]["query"].as_str() else {
            continue;
        };
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("unexpected variable query {q}"));
        exprs.push((
            format!("variable {}", var["name"]),
            format!(
                "count by ({}) ({})",
                inner.1,
                inner
                    .0
                    .replace("$namespace", "demo")
                    .replace("$service", "demo")
            ),
        ));
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    exprs
}

#[test]
fn shipped_queries_return_what_the_backend_really_had() {
    // Each request holds its slot 8 s: 3 in flight and 2 waiting for as
    // long as the test looks.
    let backend = Backend::start(&["/predict:service_ms=8000"]);
    // With classes, so the per-class panels have series to show: every
    // request is of the default class.
    let config = json!({"service": "demo",
    "classes": {"default": {"priority": 1}, "interactive": {"priority": 10}},
    "endpoints": {
        "/predict": {"capacity": CAPACITY, "queue_timeout": 20, "max_queue": 10},
    }});
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 2);
    let operator_labels = [
        ("namespace", "demo"),
        ("pod", "demo-0"),
        ("service", "demo-envoy-stats"),
        ("endpoint", "http-envoy-prom"),
        ("container", "istio-proxy"),
    ];
    let prometheus = Prometheus::start(
        &[ScrapeTarget {
            job: "envoy".into(),
            addr: envoy.admin_addr(),
            metrics_path: "/stats/prometheus".into(),
            labels: operator_labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }],
        &[&rule_file()],
    );

    let mut burst = Burst::new(envoy.listener_addr(), "/predict", SENT as usize);
    burst.spacing = Duration::from_millis(5);
    burst.timeout = Duration::from_secs(60);
    // Outlives the test: Envoy going away ends it.
    std::thread::spawn(move || run_blocking(&burst));

    // What the backend really runs, and so what really waits.
    let really = || {
        let s = backend.path_stats("/predict");
        let in_flight = s["in_flight"].as_u64().unwrap_or(0);
        let done = s["completed"].as_u64().unwrap_or(0);
        (in_flight, SENT - in_flight - done)
    };
    wait_until(Duration::from_secs(5), "the backend runs 3", || {
        (really() == (CAPACITY, SENT - CAPACITY)).then_some(())
    });

    let keda = yaml("deploy/autoscaling/keda-scaledobject.yaml");
    let keda_query = keda["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .expect("the KEDA trigger's query")
        .to_string();
    // The scrape every second brings the gauges within ~2 s.
    let value = |expr: &str| -> Option<f64> {
        prometheus
            .query_value(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
    };
    wait_until(
        Duration::from_secs(10),
        "Prometheus sees 3 in flight",
        || (value(&keda_query) == Some(CAPACITY as f64)).then_some(()),
    );
    // rate() needs two samples in its window: three scrapes, to be sure.
    wait_until(Duration::from_secs(10), "three scrapes", || {
        let n = value("max(count_over_time(sluice_requests_total[1m]))");
        (n >= Some(3.0)).then_some(())
    });

    // prometheus-adapter's rule, as the adapter fills it in for the HPA's
    // pods of namespace demo; the HPA asks for the name the rule serves.
    let adapter = yaml("deploy/autoscaling/prometheus-adapter-rules.yaml");
    let rules: Value =
        yaml_serde::from_str(adapter["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let rule = &rules["rules"][0];
    let series_query = rule["seriesQuery"].as_str().unwrap();
    let series = prometheus.query(series_query).expect(series_query);
    assert_eq!(
        series["result"].as_array().map(Vec::len),
        Some(1),
        "{series}"
    );
    let series_name = series_query.split('{').next().unwrap();
    let metrics_query = rule["metricsQuery"]
        .as_str()
        .unwrap()
        .replace("<<.Series>>", series_name)
        .replace("<<.LabelMatchers>>", "namespace=\"demo\",pod=~\"demo-0\"")
        .replace("<<.GroupBy>>", "pod");
    let hpa = yaml("deploy/autoscaling/hpa.yaml");
    assert_eq!(
        hpa["spec"]["metrics"][0]["pods"]["metric"]["name"], rule["name"]["as"],
        "the HPA asks for the metric the adapter serves"
    );

    let (in_flight, queued) = really();
    assert_eq!((in_flight, queued), (CAPACITY, SENT - CAPACITY));
    let mut checked = vec![(keda_query.clone(), value(&keda_query))];
    assert_eq!(
        value(&metrics_query),
        Some(in_flight as f64),
        "{metrics_query}"
    );
    checked.push((metrics_query.clone(), value(&metrics_query)));

    let docs = markdown_queries("docs/autoscaling.md");
    assert!(docs.len() >= 6, "{docs:?}");
    for query in &docs {
        let got = value(query);
        // What each query is about decides what it must return.
        let want = if query.contains("sluice_capacity") {
            Some(Some(in_flight as f64 / CAPACITY as f64))
        } else if query.contains("sluice_in_flight") {
            Some(Some(in_flight as f64))
        } else if query.contains("sluice_queued") {
            Some(Some(queued as f64))
        } else if query.contains("outcome=\"queue_timeout\"") {
            Some(Some(0.0))
        } else {
            None // It parses and runs (no waits finished yet).
        };
        if let Some(want) = want {
            assert_eq!(got, want, "{query}");
        }
        checked.push((query.clone(), got));
    }
    // Nothing of ours was renamed for clashing with a target label.
    let clashes = prometheus
        .query("count({__name__=~\"sluice_.*\", exported_service=~\".+\"}) or count({__name__=~\"sluice_.*\", exported_endpoint=~\".+\"})")
        .unwrap();
    assert_eq!(clashes["result"], json!([]), "{clashes}");

    // Every dashboard expression runs; the gauges show the truth.
    for (what, expr) in dashboard_exprs() {
        let data = prometheus
            .query(&expr)
            .unwrap_or_else(|e| panic!("dashboard {what}: {expr}: {e}"));
        let series = data["result"].as_array().cloned().unwrap_or_default();
        let total: f64 = series
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .sum();
        if expr.starts_with("sum by (sluice_service, sluice_endpoint) (sluice_in_flight") {
            assert_eq!(total, in_flight as f64, "dashboard {what}: {expr}");
        } else if expr.starts_with("sum by (sluice_service, sluice_endpoint) (sluice_queued") {
            assert_eq!(total, queued as f64, "dashboard {what}: {expr}");
        } else if expr.starts_with("sum by (sluice_endpoint, sluice_class) (sluice_class_queued") {
            assert_eq!(total, queued as f64, "dashboard {what}: {expr}");
            assert_eq!(series.len(), 2, "a series per class: {data}");
        } else if expr.starts_with("sum by (sluice_service, sluice_endpoint) (sluice_capacity") {
            assert_eq!(total, CAPACITY as f64, "dashboard {what}: {expr}");
        } else if expr.starts_with("count by") {
            assert_eq!(series.len(), 1, "dashboard {what}: {expr}: {data}");
        }
        checked.push((expr, Some(total)));
    }

    // Prometheus loaded every rule and evaluates them without error.
    wait_until(Duration::from_secs(5), "every rule evaluated", || {
        let groups = prometheus.rules()["data"]["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.len() >= 8
            && rules
                .iter()
                .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z");
        evaluated.then_some(())
    });
    // No alert fires on a healthy Envoy without sync.
    assert_eq!(
        prometheus.query("ALERTS{alertstate=\"firing\"}").unwrap()["result"],
        json!([])
    );
    // And the backend still had what the queries said.
    assert_eq!(really(), (in_flight, queued), "{checked:#?}");
}

/// `promtool check rules` and `promtool test rules` on the alert rules and
/// their committed unit tests.
#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let scratch = ScratchDir::new("promtool");
    std::fs::write(scratch.path().join("rules.yaml"), rule_file()).unwrap();
    std::fs::copy(
        repo_file("deploy/alerts/prometheus-rule.test.yaml"),
        scratch.path().join("prometheus-rule.test.yaml"),
    )
    .unwrap();
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "prometheus-rule.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(scratch.path())
            .output()
            .expect("running promtool (apt-get install prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A broken expectation fails: the unit tests do test something.
    let tests = std::fs::read_to_string(scratch.path().join("prometheus-rule.test.yaml")).unwrap();
    let broken = tests.replacen("severity: critical", "severity: warning", 1);
    assert_ne!(broken, tests);
    std::fs::write(scratch.path().join("broken.test.yaml"), broken).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules", "broken.test.yaml"])
        .current_dir(scratch.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong severity passed");
}

/// The PrometheusRule against Prometheus Operator's CRD schema, strictly
/// (`scripts/validate_manifests.py`, `make deps` installs the schema), and
/// a misspelt field fails.
#[test]
fn the_prometheus_rule_matches_its_crd_strictly() {
    let validate = |path: &std::path::Path| {
        Command::new(sluice_harness::venv_program("python3"))
            .arg(repo_file("scripts/validate_manifests.py"))
            .arg("k8s")
            .arg(path)
            .output()
            .expect("running python3")
    };
    let shipped = repo_file("deploy/alerts/prometheus-rule.yaml");
    let out = validate(&shipped);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("PrometheusRule monitoring/sluice (Prometheus Operator"),
        "not checked against the CRD: {report}"
    );
    // Misspelt fields, one file each, in one run (loading the schemas
    // takes a while).
    let scratch = ScratchDir::new("prometheus-rule");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let cases = [
        (
            "    - alert: SluiceSyncDisconnected",
            "    - alrt: SluiceSyncDisconnected",
            "'alrt' was unexpected",
        ),
        ("  groups:", "  group:", "'group' was unexpected"),
    ];
    let mut files = Vec::new();
    for (i, (from, to, _)) in cases.iter().enumerate() {
        assert!(text.contains(from), "no {from}");
        let bad = scratch.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&bad, text.replacen(from, to, 1)).unwrap();
        files.push(bad);
    }
    let out = Command::new(sluice_harness::venv_program("python3"))
        .arg(repo_file("scripts/validate_manifests.py"))
        .arg("k8s")
        .args(&files)
        .output()
        .expect("running python3");
    let problems = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "misspelt fields passed");
    for (i, (_, to, want)) in cases.iter().enumerate() {
        assert!(
            problems
                .lines()
                .any(|l| l.contains(&format!("bad-{i}.yaml")) && l.contains(want)),
            "{to}: {problems}"
        );
    }
}
