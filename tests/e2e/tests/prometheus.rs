//! The queries we ship, run by a real Prometheus (Debian's `prometheus`)
//! scraping a real Envoy with Sluice under load, against what the backend
//! really had: the KEDA and prometheus-adapter queries of
//! `deploy/autoscaling/` and every query of `docs/autoscaling.md`.
//! The queries are read from those files, not copied here. Prometheus
//! scrapes with the target labels Prometheus Operator sets (`namespace`,
//! `pod`, `service`, `endpoint`, `container`), so a label of ours that
//! clashed with one would show up as `exported_…` and fail.
//! Needs `make wasm`, `cargo build --release -p sluice-backend` and
//! `make deps` (Prometheus).

use serde_json::{json, Value};
use sluice_harness::{
    wait_until, workspace_root, Backend, Envoy, FrontProxy, Prometheus, ScrapeTarget,
};
use sluice_loadgen::{run_blocking, Burst};
use std::path::PathBuf;
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

#[test]
fn shipped_queries_return_what_the_backend_really_had() {
    // Each request holds its slot 8 s: 3 in flight and 2 waiting for as
    // long as the test looks.
    let backend = Backend::start(&["/predict:service_ms=8000"]);
    let config = json!({"service": "demo", "endpoints": {
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
        &[],
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
    wait_until(Duration::from_secs(10), "Prometheus sees 3 in flight", || {
        (value(&keda_query) == Some(CAPACITY as f64)).then_some(())
    });
    // rate() needs two samples in its window: three scrapes, to be sure.
    wait_until(Duration::from_secs(10), "three scrapes", || {
        let n = value("max(count_over_time(sluice_requests_total[1m]))");
        (n >= Some(3.0)).then_some(())
    });

    // prometheus-adapter's rule, as the adapter fills it in for the HPA's
    // pods of namespace demo; the HPA asks for the name the rule serves.
    let adapter = yaml("deploy/autoscaling/prometheus-adapter-rules.yaml");
    let rules: Value = yaml_serde::from_str(adapter["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let rule = &rules["rules"][0];
    let series_query = rule["seriesQuery"].as_str().unwrap();
    let series = prometheus.query(series_query).expect(series_query);
    assert_eq!(series["result"].as_array().map(Vec::len), Some(1), "{series}");
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
    assert_eq!(value(&metrics_query), Some(in_flight as f64), "{metrics_query}");
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

    // And the backend still had what the queries said.
    assert_eq!(really(), (in_flight, queued), "{checked:#?}");
}

