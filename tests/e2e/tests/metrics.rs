//! The filter's metrics in the real Envoy, read from the admin
//! `/stats/prometheus` as Prometheus scrapes it, with the `stats_tags` every
//! Envoy configuration of the repo carries (`STATS_TAGS_YAML`).

use serde_json::{json, Value};
use sluice_harness::{wait_until, Backend, Envoy, FrontProxy};
use sluice_loadgen::{run_blocking, Burst, Outcome};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One sample of the exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of `/stats/prometheus` (comments skipped).
fn scrape(envoy: &Envoy) -> Vec<Sample> {
    let res = envoy
        .admin_get("/stats/prometheus")
        .expect("admin /stats/prometheus");
    assert_eq!(res.status, 200);
    res.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unparsable sample: {l}")))
        .collect()
}

/// `name{a="x",b="y"} 4`; label values here never hold `"` or `,`.
fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let labels = labels
        .split("\",")
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect::<Option<_>>()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value: value.parse().ok()?,
    })
}

/// The value of `name` for this service and endpoint (and extra labels).
fn value(
    samples: &[Sample],
    name: &str,
    service: &str,
    endpoint: &str,
    extra: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.get("sluice_service").map(String::as_str) == Some(service)
                && s.labels.get("sluice_endpoint").map(String::as_str) == Some(endpoint)
                && extra
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
        })
        .map(|s| s.value)
}

fn sluice(samples: &[Sample], metric: &str) -> Option<f64> {
    value(samples, &format!("sluice_{metric}"), "e2e", "/predict", &[])
}

/// `sluice_outcomes_total{outcome=...}` of e2e's /predict.
fn outcome(samples: &[Sample], outcome: &str) -> Option<f64> {
    value(
        samples,
        "sluice_outcomes_total",
        "e2e",
        "/predict",
        &[("outcome", outcome)],
    )
}

fn count(outcomes: &[Outcome], status: u16) -> usize {
    outcomes.iter().filter(|o| o.status == status).count()
}

#[test]
fn gauges_mid_burst_and_counters_after_match_what_clients_saw() {
    // 4 slots; 6 may wait 2 s; each request takes 1.5 s. A burst of 14: 4 in
    // at once, 6 wait (4 of them get the slots at 1.5 s, 2 time out at 2 s),
    // 4 are refused at once.
    let backend = Backend::start(&["/predict:service_ms=1500"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/predict": {"capacity": 4, "queue_timeout": 2, "max_queue": 6},
    }});
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 4);
    let before = scrape(&envoy);
    assert_eq!(sluice(&before, "capacity"), Some(4.0), "{before:#?}");
    assert_eq!(sluice(&before, "in_flight"), Some(0.0));

    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 14);
    burst.spacing = Duration::from_millis(2);
    let running = std::thread::spawn(move || run_blocking(&burst));
    // Mid-burst (before the first slot frees at 1.5 s): the gauges show the
    // full house and the queue, as the filter's own stats do.
    // All 14 arrived (the last 4 refused), before the first slot frees.
    wait_until(
        Duration::from_secs(1),
        "4 in flight, 6 queued, 14 seen",
        || {
            let s = scrape(&envoy);
            let seen = sluice(&s, "requests_total") == Some(14.0);
            (seen && sluice(&s, "in_flight") == Some(4.0) && sluice(&s, "queued") == Some(6.0))
                .then_some(())
        },
    );
    let stats: Value = envoy
        .request("GET", "/balancer/stats")
        .send()
        .unwrap()
        .json();
    assert_eq!(stats["endpoints"]["/predict"]["active_requests"], 4);
    assert_eq!(stats["endpoints"]["/predict"]["queued"], 6);

    let outcomes = running.join().unwrap();
    let after_wait = outcomes
        .iter()
        .filter(|o| o.status == 200 && o.wait_ms.is_some())
        .count();
    let (ok, timeouts, full) = (
        count(&outcomes, 200),
        count(&outcomes, 504),
        count(&outcomes, 503),
    );
    assert_eq!(
        (ok, after_wait, timeouts, full),
        (8, 4, 2, 4),
        "{outcomes:#?}"
    );

    // Counts reach Envoy on each worker's tick and the gauges on the
    // leader's (100 ms at most): within a second, everything has settled.
    let settled = Instant::now() + Duration::from_secs(1);
    let end = loop {
        let s = scrape(&envoy);
        let done = sluice(&s, "requests_total") == Some(outcomes.len() as f64)
            && sluice(&s, "in_flight") == Some(0.0);
        if done || Instant::now() > settled {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut counters: Vec<(&str, Option<f64>)> = vec![("requests", sluice(&end, "requests_total"))];
    counters.extend(
        [
            "admitted_at_once",
            "admitted_after_wait",
            "queue_timeout",
            "queue_full",
            "unhealthy",
            "failed_open",
        ]
        .iter()
        .map(|m| (*m, outcome(&end, m))),
    );
    let clients_saw = |n: usize| Some(n as f64);
    assert_eq!(
        counters,
        [
            ("requests", clients_saw(outcomes.len())),
            ("admitted_at_once", clients_saw(ok - after_wait)),
            ("admitted_after_wait", clients_saw(after_wait)),
            ("queue_timeout", clients_saw(timeouts)),
            ("queue_full", clients_saw(full)),
            ("unhealthy", Some(0.0)),
            ("failed_open", Some(0.0)),
        ]
    );
    assert_eq!(
        (sluice(&end, "in_flight"), sluice(&end, "queued")),
        (Some(0.0), Some(0.0)),
        "gauges back to zero"
    );

    // Histograms reach the admin output at Envoy's stats flush (5 s).
    let waits = wait_until(Duration::from_secs(12), "the queue-wait histogram", || {
        let s = scrape(&envoy);
        (sluice(&s, "queue_wait_milliseconds_count") == Some(6.0)).then_some(s)
    });
    // Everyone who waited waited at least 1.4 s: none in the 1 s bucket.
    let under_1s = value(
        &waits,
        "sluice_queue_wait_milliseconds_bucket",
        "e2e",
        "/predict",
        &[("le", "1000")],
    );
    assert_eq!(under_1s, Some(0.0), "{waits:#?}");
}

/// The tag regexes keep a service name with dots and a path with dots and
/// slashes whole, and leave a bare metric name.
#[test]
fn dotted_service_and_path_come_out_whole_as_labels() {
    let path = "/v1/models/m.v2/predict";
    let backend = Backend::start(&[path]);
    let config = json!({"service": "team.e2e", "endpoints": {path: {"capacity": 2}}});
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 2);
    for _ in 0..3 {
        assert_eq!(envoy.request("GET", path).send().unwrap().status, 200);
    }
    // Counted at the worker's next tick (100 ms at most).
    let settled = Instant::now() + Duration::from_secs(1);
    let samples = loop {
        let s = scrape(&envoy);
        let seen = value(&s, "sluice_requests_total", "team.e2e", path, &[]) == Some(3.0);
        if seen || Instant::now() > settled {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        value(&samples, "sluice_requests_total", "team.e2e", path, &[]),
        Some(3.0),
        "{:#?}",
        samples
            .iter()
            .filter(|s| s.name.contains("sluice"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        value(&samples, "sluice_capacity", "team.e2e", path, &[]),
        Some(2.0)
    );
    // The outcome is a label of one counter, and the path stays whole in
    // its name too.
    assert_eq!(
        value(
            &samples,
            "sluice_outcomes_total",
            "team.e2e",
            path,
            &[("outcome", "admitted_at_once")]
        ),
        Some(3.0)
    );
    // No metric keeps a piece of a path or an outcome in its name.
    for s in samples.iter().filter(|s| s.name.starts_with("sluice_")) {
        assert!(
            [
                "sluice_requests_total",
                "sluice_outcomes_total",
                "sluice_in_flight",
                "sluice_queued",
                "sluice_capacity",
                "sluice_backend_unhealthy",
                "sluice_sync_version",
                "sluice_picks_missed_total",
            ]
            .contains(&s.name.as_str())
                || s.name.starts_with("sluice_queue_wait_milliseconds_"),
            "{s:?}"
        );
    }
}

/// With `classes` and `tenants`: each request's counters and its wait carry
/// its class (`sluice_class`), each class's queue has a gauge, the tenants'
/// flows two bounded gauges, and the stats JSON shows the same counts per
/// class as Envoy's counters. Capacity 1, 800 ms a request: one interactive
/// request holds the slot; four batch requests (1 s queue timeout) wait
/// behind two interactive ones, which take 1.6 s between them, so all four
/// time out; a sheddable probe is refused at once.
#[test]
fn with_classes_every_request_metric_carries_its_class() {
    use sluice_harness::http::Request;
    let backend = Backend::start(&["/predict:service_ms=800"]);
    let config = json!({"service": "e2e",
        "abandon_hold": 0,
        "classes": {
            "interactive": {"priority": 10},
            "batch": {"priority": 1, "queue_timeout": 1},
            "probe": {"sheddable": true},
        },
        "default_class": "interactive",
        "tenants": {"header": "x-tenant"},
        "endpoints": {"/predict": {"capacity": 1, "queue_timeout": 10, "max_queue": 20}},
    });
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 4);
    let addr = envoy.listener_addr();
    let send = |class: &'static str, tenant: &'static str| {
        let r = Request::new("POST", addr, "/predict")
            .header("x-sluice-class", class)
            .header("x-tenant", tenant);
        std::thread::spawn(move || r.send().expect("a response").status)
    };
    let first = send("interactive", "alpha");
    wait_until(
        Duration::from_secs(2),
        "the first request in flight",
        || (sluice(&scrape(&envoy), "in_flight") == Some(1.0)).then_some(()),
    );
    let mut batch: Vec<_> = (0..3).map(|_| send("batch", "alpha")).collect();
    batch.push(send("batch", "omega"));
    let interactive: Vec<_> = (0..2).map(|_| send("interactive", "alpha")).collect();
    let by_class = |s: &[Sample], metric: &str, class: &str| {
        value(s, metric, "e2e", "/predict", &[("sluice_class", class)])
    };
    // Mid-burst: the queue per class, and two tenants' flows waiting, the
    // busiest (alpha's) with five.
    let mid = wait_until(Duration::from_secs(1), "6 queued", || {
        let s = scrape(&envoy);
        (sluice(&s, "queued") == Some(6.0)).then_some(s)
    });
    assert_eq!(by_class(&mid, "sluice_class_queued", "batch"), Some(4.0));
    assert_eq!(
        by_class(&mid, "sluice_class_queued", "interactive"),
        Some(2.0)
    );
    assert_eq!(by_class(&mid, "sluice_class_queued", "probe"), Some(0.0));
    assert_eq!(sluice(&mid, "tenant_flows_waiting"), Some(2.0), "{mid:#?}");
    assert_eq!(sluice(&mid, "tenant_busiest_flow_queued"), Some(5.0));
    let probe = send("probe", "omega");
    assert_eq!(probe.join().unwrap(), 503, "shed while saturated");

    let statuses = |hs: Vec<std::thread::JoinHandle<u16>>| -> Vec<u16> {
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    };
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(
        statuses(batch),
        [504; 4],
        "batch timed out behind interactive"
    );
    assert_eq!(statuses(interactive), [200; 2]);

    let want = [
        ("interactive", "admitted_at_once", 1.0),
        ("interactive", "admitted_after_wait", 2.0),
        ("batch", "queue_timeout", 4.0),
        ("probe", "shed", 1.0),
        ("batch", "admitted_at_once", 0.0),
    ];
    let end = wait_until(
        Duration::from_secs(2),
        "the counts on Envoy's counters",
        || {
            let s = scrape(&envoy);
            (by_class(&s, "sluice_requests_total", "batch") == Some(4.0)
                && by_class(&s, "sluice_outcomes_total", "interactive").is_some()
                && sluice(&s, "in_flight") == Some(0.0))
            .then_some(s)
        },
    );
    for (class, outcome, n) in want {
        let got = value(
            &end,
            "sluice_outcomes_total",
            "e2e",
            "/predict",
            &[("sluice_class", class), ("outcome", outcome)],
        );
        assert_eq!(got, Some(n), "{class} {outcome}");
    }
    for (class, n) in [("interactive", 3.0), ("batch", 4.0), ("probe", 1.0)] {
        assert_eq!(
            by_class(&end, "sluice_requests_total", class),
            Some(n),
            "{class}"
        );
    }
    // Every request counter of the endpoint carries a class: summing over
    // `sluice_class` gives the endpoint's figures, never twice.
    let unclassed: Vec<_> = end
        .iter()
        .filter(|s| s.name == "sluice_requests_total" || s.name == "sluice_outcomes_total")
        .filter(|s| s.labels.get("sluice_endpoint").map(String::as_str) == Some("/predict"))
        .filter(|s| !s.labels.contains_key("sluice_class"))
        .collect();
    assert!(unclassed.is_empty(), "{unclassed:#?}");
    // The stats JSON reads the same counters.
    let stats: Value = envoy
        .request("GET", "/balancer/stats")
        .send()
        .unwrap()
        .json();
    let classes = &stats["endpoints"]["/predict"]["classes"];
    assert_eq!(
        classes["batch"]["outcomes"]["queue_timeout"], 4,
        "{classes}"
    );
    assert_eq!(classes["interactive"]["outcomes"]["admitted_after_wait"], 2);
    assert_eq!(classes["probe"]["outcomes"]["shed"], 1);
    assert_eq!(classes["probe"]["outcomes"]["requests"], 1);
    // The waits, per class, at Envoy's stats flush (5 s).
    let waits = wait_until(Duration::from_secs(12), "the wait histograms", || {
        let s = scrape(&envoy);
        let batch = by_class(&s, "sluice_queue_wait_milliseconds_count", "batch");
        (batch == Some(4.0)).then_some(s)
    });
    assert_eq!(
        by_class(
            &waits,
            "sluice_queue_wait_milliseconds_count",
            "interactive"
        ),
        Some(2.0)
    );
}

/// Every Envoy bootstrap in the repo carries the same tag regexes as the
/// rendered front proxy, so the metrics have the same labels everywhere.
#[test]
fn every_envoy_bootstrap_in_the_repo_carries_the_stats_tags() {
    fn walk(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if !name.starts_with('.') && !name.starts_with("target") && name != "node_modules" {
                    walk(&path, found);
                }
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                found.push(path);
            }
        }
    }
    let root = sluice_harness::workspace_root();
    let mut files = Vec::new();
    walk(&root, &mut files);
    let regexes: Vec<&str> = sluice_harness::STATS_TAGS_YAML
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("regex:") || l.starts_with("- tag_name:"))
        .collect();
    let bootstraps: Vec<_> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            text.lines().any(|l| l.starts_with("static_resources:"))
        })
        .collect();
    assert!(
        !bootstraps.is_empty(),
        "no Envoy bootstrap found under {}",
        root.display()
    );
    for file in bootstraps {
        let text = std::fs::read_to_string(file).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for want in &regexes {
            assert!(
                lines.contains(want),
                "{} lacks `{want}` (copy stats_config from STATS_TAGS_YAML)",
                file.display()
            );
        }
    }
}

/// The hot path's cost of the metrics: the filter as built against the same
/// filter without them (`SLUICE_BASELINE_WASM`, e.g. built from the commit
/// before them), in interleaved rounds. On a shared machine throughput swings
/// with the neighbours' load, so it also reports Envoy's own CPU time per
/// request (from /proc), which moves much less. Needs wrk (`make
/// deps-bench`):
/// `SLUICE_BASELINE_WASM=… cargo test --release -p sluice-e2e --test metrics -- --ignored --nocapture`
#[test]
#[ignore]
fn hot_path_cost_of_metrics() {
    let baseline = std::path::PathBuf::from(
        std::env::var("SLUICE_BASELINE_WASM")
            .expect("SLUICE_BASELINE_WASM: the filter without metrics"),
    );
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let backend = Backend::start_with_args(&["--threads", "1", "--route", "/fast"]);
    let config =
        json!({"service": "bench", "endpoints": {"/fast": {"capacity": 100000}}}).to_string();
    let with = FrontProxy::new(backend.port(), config.clone());
    let without = FrontProxy::with_wasm(backend.port(), Some(baseline), config);
    let (mut rps, mut cpu) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for round in 0..rounds {
        for (i, name, proxy) in [(0, "metrics", &with), (1, "baseline", &without)] {
            let envoy = Envoy::start(proxy, 2);
            wrk(envoy.listener_port(), 1);
            let before = cpu_ticks(envoy.pid());
            let (r, requests) = wrk(envoy.listener_port(), 8);
            let us = (cpu_ticks(envoy.pid()) - before) as f64 * 1e6 / ticks_per_second() / requests;
            eprintln!("round {round}: {name:>8} {r:>8.0} req/s {us:>6.1} µs Envoy CPU/request");
            rps[i].push(r);
            cpu[i].push(us);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (r0, r1) = (median(&mut rps[0]), median(&mut rps[1]));
    let (c0, c1) = (median(&mut cpu[0]), median(&mut cpu[1]));
    println!(
        "hot path, with metrics / without (medians of {rounds}): throughput {:.3} ({r0:.0} / {r1:.0} req/s), Envoy CPU per request {:.3} ({c0:.1} / {c1:.1} µs)",
        r0 / r1,
        c0 / c1
    );
}

/// Requests/s and the number of requests.
fn wrk(port: u16, seconds: u32) -> (f64, f64) {
    let out = std::process::Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{seconds}s")])
        .arg(format!("http://127.0.0.1:{port}/fast"))
        .output()
        .expect("wrk (make deps-bench)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Non-2xx"), "{text}");
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok());
    // "  123456 requests in 8.00s, 12.34MB read"
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    match (rps, requests) {
        (Some(r), Some(n)) => (r, n),
        _ => panic!("no figures in wrk's output: {text}"),
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
