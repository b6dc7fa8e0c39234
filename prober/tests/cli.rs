//! The prober as a user runs it: config files written back, errors and exit
//! codes, Redis, sweep, push, and every JSON output against its schema.
//!
//! The backend route `/k2` holds 2 slots of 20 ms; with a 30 ms p99 the
//! capacity is 2. Levels are 0.1 s + 0.3 s so each probe takes ~3 s.

mod common;

use common::{
    assert_matches_schema, load_schema, prober, prober_with_env, schema_errors, serial, Run,
};
use serde_json::{json, Value};
use sluice_harness::{free_port, Backend, Redis, RespValue};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(40);
const ROUTES: &[&str] = &[
    "/k2:capacity=2,service_ms=20",
    "/slow:service_ms=50",
    "/fixed:capacity=5,service_ms=20",
];
const FAST_LEVELS: &[&str] = &[
    "--latency-threshold-ms",
    "30",
    "--warmup",
    "0.1",
    "--duration",
    "0.3",
    "--min-samples",
    "0",
];

const CONFIG: &str = "\
# Demo service: only /k2 needs measuring.
service: demo                 # the Redis namespace
queue_timeout: 30
max_queue: 1000
ui: { enable: true, path: /balancer/ui }

endpoints:
  # the model endpoint
  /k2:
    method: GET
    queue_timeout: 120        # per-endpoint override
  /fixed:
    capacity: 5               # set by hand
# end of endpoints
";

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-prober-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn url(b: &Backend) -> String {
    format!("http://{}", b.addr())
}

/// `probe` of the file `cfg` against `url` with short levels, then `extra`.
fn probe_args<'a>(url: &'a str, cfg: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["probe"];
    args.extend_from_slice(FAST_LEVELS);
    args.extend_from_slice(&["--url", url, "--config", cfg.to_str().unwrap()]);
    args.extend_from_slice(extra);
    args
}

fn probe_config(url: &str, cfg: &Path, extra: &[&str]) -> Run {
    prober(&probe_args(url, cfg, extra), LIMIT)
}

/// `push` of the file `cfg` to `redis`, then `extra`.
fn push(cfg: &Path, redis: &Redis, extra: &[&str]) -> Run {
    let url = redis.url();
    let mut args = vec!["push", "--config", cfg.to_str().unwrap(), "--redis", &url];
    args.extend_from_slice(extra);
    prober(&args, LIMIT)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

fn hash(redis: &Redis, key: &str) -> Value {
    match redis.command(&["HGETALL", key]) {
        RespValue::Array(Some(items)) => {
            let mut m = serde_json::Map::new();
            for pair in items.chunks(2) {
                m.insert(
                    pair[0].as_str().unwrap(),
                    Value::String(pair[1].as_str().unwrap()),
                );
            }
            Value::Object(m)
        }
        other => panic!("HGETALL {key}: {other:?}"),
    }
}

fn members(redis: &Redis, key: &str) -> Vec<String> {
    match redis.command(&["SMEMBERS", key]) {
        RespValue::Array(Some(items)) => {
            let mut v: Vec<String> = items.iter().filter_map(RespValue::as_str).collect();
            v.sort();
            v
        }
        other => panic!("SMEMBERS {key}: {other:?}"),
    }
}

#[test]
fn writes_the_capacity_back_keeping_everything_else() {
    let _serial = serial();
    let backend = Backend::start(ROUTES);
    let dir = Scratch::new("roundtrip");
    let cfg = dir.file("sluice.yaml", CONFIG);
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = probe_config(&url(&backend), &cfg, &[]);
    assert_eq!(
        run.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );

    let text = read(&cfg);
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("    capacity: 2  # sluice-prober: p99 "))
        .unwrap_or_else(|| panic!("no capacity line:\n{text}"));
    // Inserted after /k2's last setting, and nothing else changed at all.
    assert_eq!(
        lines[at - 1],
        "    queue_timeout: 120        # per-endpoint override"
    );
    let mut without: Vec<&str> = lines.clone();
    without.remove(at);
    assert_eq!(without.join("\n") + "\n", CONFIG);
    let mode = std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "permissions kept");

    // The human report says what happened to each endpoint.
    assert!(run.stdout.contains("capacity 2: p99 "), "{}", run.stdout);
    let fixed: Vec<&str> = run
        .stdout
        .lines()
        .find(|l| l.starts_with("/fixed "))
        .unwrap_or_else(|| panic!("{}", run.stdout))
        .split_whitespace()
        .collect();
    assert_eq!(fixed, ["/fixed", "5", "-", "-", "kept_file", "-", "off"]);
    assert!(
        run.stdout.contains("capacities written to"),
        "{}",
        run.stdout
    );

    // A second run measures nothing: both endpoints have a capacity now.
    let again = probe_config(&url(&backend), &cfg, &["--json"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let doc = again.json();
    assert_matches_schema("probe-output.schema.json", &doc);
    for e in doc["endpoints"].as_array().unwrap() {
        assert_eq!(e["outcome"], "kept_file", "{e}");
        assert_eq!(e["runs"], json!([]));
    }
    assert_eq!(doc["endpoints"][0]["source"], "probe");
    assert_eq!(doc["endpoints"][1]["source"], "manual");
    assert_eq!(doc["config_written"], false);
    assert_eq!(read(&cfg), text);
}

#[test]
fn creates_a_config_from_flags() {
    let _serial = serial();
    let backend = Backend::start(ROUTES);
    let dir = Scratch::new("create");
    let cfg = dir.0.join("new.yaml");
    let run = probe_config(
        &url(&backend),
        &cfg,
        &[
            "--endpoint",
            "/k2",
            "--method",
            "POST",
            "--header",
            "X-Api-Key: abc",
            "--body",
            r#"{"input": "sample"}"#,
            "--service",
            "demo",
            "--json",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_matches_schema("probe-output.schema.json", &run.json());
    let text = read(&cfg);
    let doc: yaml_serde::Value = yaml_serde::from_str(&text).unwrap();
    let doc: Value = serde_json::to_value(doc).unwrap();
    assert_eq!(doc["service"], "demo");
    assert_eq!(doc["latency_threshold_ms"], 30);
    let k2 = &doc["endpoints"]["/k2"];
    assert_eq!(k2["method"], "POST");
    assert_eq!(k2["headers"]["X-Api-Key"], "abc");
    assert_eq!(k2["body"], json!({"input": "sample"}));
    assert_eq!(k2["capacity"], 2, "{text}");
    // The new file is a valid config for the filter too.
    sluice_core::config::Config::from_json(&doc).unwrap();
    let mode = std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
}

#[test]
fn a_broken_config_is_exit_2_and_left_alone() {
    let dir = Scratch::new("broken");
    let cases = [
        (
            "endpoints:\n  /k2:\n    method: GET\n   oops\n",
            "bad.yaml:4:4: not valid YAML",
        ),
        (
            "endpoints:\n  /k2:\n    capacity: -3\n",
            "bad.yaml:3: endpoints./k2.capacity: must be a positive integer, got -3",
        ),
        (
            "latency_threshold_ms: fast\nendpoints:\n  /k2:\n",
            "bad.yaml:1: latency_threshold_ms: must be a number of milliseconds greater than 0, got \"fast\"",
        ),
    ];
    for (text, want) in cases {
        let cfg = dir.file("bad.yaml", text);
        // Nothing listens there: the config must be rejected before the URL
        // is even tried.
        let url = format!("http://127.0.0.1:{}", free_port());
        let run = prober(
            &["probe", "--url", &url, "--config", cfg.to_str().unwrap()],
            LIMIT,
        );
        assert_eq!(run.code, 2, "{text:?}: {}", run.stderr);
        let shown = run
            .stderr
            .replace(&*dir.0.to_string_lossy(), "")
            .replace("/bad.yaml", "bad.yaml");
        assert!(shown.contains(want), "{text:?}: got {shown}");
        assert_eq!(read(&cfg), text);
    }
}

#[test]
fn bad_usage_is_exit_2() {
    for args in [
        vec!["probe"],
        vec![
            "probe",
            "--url",
            "https://example.invalid",
            "--endpoint",
            "/a",
        ],
        vec!["probe", "--url", "http://127.0.0.1:1"],
        vec![
            "probe",
            "--url",
            "http://127.0.0.1:1",
            "--endpoint",
            "/a",
            "--error-threshold",
            "7",
        ],
        vec![
            "sweep",
            "--url",
            "http://127.0.0.1:1",
            "--endpoint",
            "/a",
            "--levels",
            "0,1",
        ],
        vec!["frobnicate"],
    ] {
        let run = prober(&args, LIMIT);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(!run.stderr.trim().is_empty(), "{args:?} says why");
    }
    let run = prober(
        &[
            "probe",
            "--config",
            "/nonexistent/x.yaml",
            "--url",
            "http://127.0.0.1:1",
        ],
        LIMIT,
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("does not exist; pass --endpoint"),
        "{}",
        run.stderr
    );
}

#[test]
fn an_unreachable_target_is_exit_3_and_leaves_the_file() {
    let dir = Scratch::new("unreachable");
    let cfg = dir.file("sluice.yaml", CONFIG);
    let url = format!("http://127.0.0.1:{}", free_port());
    let run = probe_config(&url, &cfg, &[]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("cannot reach {url}")),
        "{}",
        run.stderr
    );
    assert_eq!(read(&cfg), CONFIG);
}

#[test]
fn no_passing_level_is_exit_4() {
    let _serial = serial();
    let backend = Backend::start(ROUTES);
    let dir = Scratch::new("nopass");
    let text = "endpoints:\n  /slow:\n  /k2:\n";
    let cfg = dir.file("sluice.yaml", text);
    let run = probe_config(&url(&backend), &cfg, &["--json"]);
    assert_eq!(run.code, 4, "{}", run.stderr);
    let doc = run.json();
    assert_matches_schema("probe-output.schema.json", &doc);
    assert_eq!(doc["exit_code"], 4);
    assert_eq!(doc["endpoints"][0]["outcome"], "no_passing_level");
    assert!(
        run.stderr
            .contains("/slow: no concurrency level met the thresholds"),
        "{}",
        run.stderr
    );
    // The endpoint that did pass is still written.
    assert_eq!(doc["endpoints"][1]["capacity"], 2);
    let written = read(&cfg);
    assert!(
        written.starts_with("endpoints:\n  /slow:\n  /k2:\n    capacity: 2  # "),
        "{written}"
    );
}

/// Reads one message published on `channel`, within `timeout`.
fn subscribe(port: u16, channel: &str) -> std::sync::mpsc::Receiver<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let cmd = format!(
        "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n",
        channel.len()
    );
    stream.write_all(cmd.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    // The subscription confirmation: *3, $9 subscribe, channel, :1.
    let mut line = String::new();
    for _ in 0..6 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if line.starts_with('{') {
                let _ = tx.send(line.trim().to_string());
            }
            line.clear();
        }
    });
    rx
}

#[test]
fn redis_push_then_skip_unless_force() {
    let _serial = serial();
    let backend = Backend::start(ROUTES);
    let redis = Redis::start();
    let dir = Scratch::new("redis");
    let cfg = dir.file("sluice.yaml", CONFIG);
    let updates = subscribe(redis.port(), "sluice:{demo}:updates");

    let run = probe_config(&url(&backend), &cfg, &["--redis", &redis.url(), "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    assert_matches_schema("probe-output.schema.json", &doc);
    assert_eq!(doc["endpoints"][0]["redis"], "pushed");
    assert_eq!(
        doc["endpoints"][1]["redis"], "pushed",
        "a manual capacity is shared too"
    );

    let k2 = hash(&redis, "sluice:{demo}:capacity:/k2");
    assert_eq!(k2["capacity"], "2");
    assert_eq!(k2["source"], "probe");
    assert!(
        k2["p99_ms"].as_str().unwrap().parse::<f64>().unwrap() < 30.0,
        "{k2}"
    );
    assert!(
        k2["rps"].as_str().unwrap().parse::<f64>().unwrap() > 50.0,
        "{k2}"
    );
    assert_eq!(k2["error_rate"], "0.000000");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at: u64 = k2["measured_at"].as_str().unwrap().parse().unwrap();
    assert!(now.abs_diff(at) < 120, "measured_at {at}, now {now}");
    let fixed = hash(&redis, "sluice:{demo}:capacity:/fixed");
    assert_eq!(fixed["capacity"], "5");
    assert_eq!(fixed["source"], "manual");
    assert!(fixed.get("p99_ms").is_none());
    assert_eq!(
        members(&redis, "sluice:{demo}:endpoints"),
        ["/fixed", "/k2"]
    );
    let first: Value =
        serde_json::from_str(&updates.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    assert_eq!(first["endpoint"], "/k2");
    assert_eq!(first["capacity"], 2);
    assert_eq!(first["source"], "probe");

    // Another machine with the original file: Redis has /k2, so it is not
    // measured again; its capacity is adopted into the file.
    let other = dir.file("other.yaml", CONFIG);
    let run = probe_config(&url(&backend), &other, &["--redis", &redis.url(), "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    let e = &doc["endpoints"][0];
    assert_eq!(e["outcome"], "reused_redis");
    assert_eq!(e["runs"], json!([]));
    assert_eq!(e["redis"], "exists");
    assert!(
        read(&other).contains("    capacity: 2  # sluice-prober: from Redis (probe), "),
        "{}",
        read(&other)
    );

    // --force measures again and overwrites.
    redis.command(&["HSET", "sluice:{demo}:capacity:/k2", "capacity", "99"]);
    let run = probe_config(
        &url(&backend),
        &other,
        &["--redis", &redis.url(), "--force", "--json"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["endpoints"][0]["outcome"], "measured");
    assert_eq!(
        doc["endpoints"][1]["outcome"], "measured",
        "--force probes manual capacities too"
    );
    assert_eq!(doc["endpoints"][1]["capacity"], 5);
    assert_eq!(hash(&redis, "sluice:{demo}:capacity:/k2")["capacity"], "2");
    assert_eq!(
        hash(&redis, "sluice:{demo}:capacity:/fixed")["source"],
        "probe"
    );
}

#[test]
fn a_dead_redis_is_exit_5_before_measuring() {
    let _serial = serial();
    let backend = Backend::start(ROUTES);
    let dir = Scratch::new("deadredis");
    let cfg = dir.file("sluice.yaml", CONFIG);
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let run = probe_config(&url(&backend), &cfg, &["--redis", &dead]);
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("cannot connect to Redis at redis://127.0.0.1:"),
        "{}",
        run.stderr
    );
    assert!(
        run.elapsed < Duration::from_secs(10),
        "failed fast, before measuring"
    );
    assert_eq!(read(&cfg), CONFIG);
    assert_eq!(
        backend.path_stats("/k2")["completed"].as_u64().unwrap_or(0),
        0
    );
}

#[test]
fn redis_dying_mid_probe_keeps_the_file_and_push_catches_up() {
    let _serial = serial();
    let backend = Backend::start(ROUTES);
    let redis = Redis::start();
    let dir = Scratch::new("redisdies");
    let cfg = dir.file("sluice.yaml", "service: demo\nendpoints:\n  /k2:\n");
    let (url, redis_url) = (url(&backend), redis.url());
    let child = Command::new(env!("CARGO_BIN_EXE_sluice-prober"))
        .args(probe_args(&url, &cfg, &["--redis", &redis_url, "--quiet"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The probe connects to Redis first, then measures for ~2.5 s.
    std::thread::sleep(Duration::from_millis(800));
    drop(redis);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        read(&cfg).contains("capacity: 2"),
        "the file is written before the push"
    );

    // A new Redis: push catches up.
    let redis = Redis::start();
    let run = push(&cfg, &redis, &["--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    assert_matches_schema("push-output.schema.json", &doc);
    assert_eq!(doc["endpoints"][0]["redis"], "pushed");
    let k2 = hash(&redis, "sluice:{demo}:capacity:/k2");
    assert_eq!(k2["capacity"], "2");
    assert_eq!(k2["source"], "probe", "the file's note marks it measured");
    assert!(
        k2.get("p99_ms").is_some(),
        "p99 read back from the note: {k2}"
    );
    // Pushing again leaves it; --force overwrites.
    let run = push(&cfg, &redis, &["--json"]);
    assert_eq!(run.json()["endpoints"][0]["redis"], "exists");
    let run = push(&cfg, &redis, &["--force"]);
    assert_eq!(run.code, 0);
    assert!(
        run.stdout.contains("/k2") && run.stdout.contains("pushed"),
        "{}",
        run.stdout
    );
}

#[test]
fn the_redis_url_can_come_from_the_environment_and_the_flag_wins() {
    let redis = Redis::start();
    let dir = Scratch::new("redisenv");
    let cfg = dir.file(
        "s.yaml",
        "service: demo\nendpoints:\n  /fixed:\n    capacity: 5\n",
    );
    let cfg_arg = cfg.to_str().unwrap();
    let from_env = redis.url();
    let run = prober_with_env(
        &["push", "--config", cfg_arg, "--json"],
        &[("SLUICE_REDIS_URL", &from_env)],
        LIMIT,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["endpoints"][0]["redis"], "pushed");
    assert_eq!(
        hash(&redis, "sluice:{demo}:capacity:/fixed")["capacity"],
        "5"
    );

    // The flag wins: a dead Redis in the environment is never tried.
    let other = Redis::start();
    let dead = format!("redis://:hunter2@127.0.0.1:{}", free_port());
    let run = prober_with_env(
        &[
            "push",
            "--config",
            cfg_arg,
            "--redis",
            &other.url(),
            "--json",
        ],
        &[("SLUICE_REDIS_URL", &dead)],
        LIMIT,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        hash(&other, "sluice:{demo}:capacity:/fixed")["capacity"],
        "5"
    );

    // Only the environment: the dead one is used, and its password is not shown.
    let run = prober_with_env(
        &["push", "--config", cfg_arg],
        &[("SLUICE_REDIS_URL", &dead)],
        LIMIT,
    );
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr.contains("redis://:***@127.0.0.1:"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
    // --help names the variable but never shows its value.
    let run = prober_with_env(&["push", "--help"], &[("SLUICE_REDIS_URL", &dead)], LIMIT);
    assert!(run.stdout.contains("SLUICE_REDIS_URL"), "{}", run.stdout);
    assert!(!run.stdout.contains("hunter2"), "{}", run.stdout);
}

/// Finding 13 of issue 22: a backend answering 200 with an error body past
/// its capacity of 4 was probed as the --max-concurrency cap.
#[test]
fn a_body_check_finds_the_capacity_of_a_backend_answering_errors_with_200() {
    let _serial = serial();
    let backend = Backend::start(&["/e4:capacity=4,service_ms=20,overload=error200"]);
    let url = url(&backend);
    let probe = |extra: &[&str]| {
        let mut args = vec!["probe"];
        args.extend_from_slice(FAST_LEVELS);
        args.extend_from_slice(&[
            "--url",
            &url,
            "--endpoint",
            "/e4",
            "--dry-run",
            "--json",
            "--max-concurrency",
            "16",
        ]);
        args.extend_from_slice(extra);
        prober(&args, LIMIT)
    };

    // Status alone: every answer is a 200, so the cap passes; the report
    // says the successful responses changed size past the first level.
    let run = probe(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    assert_matches_schema("probe-output.schema.json", &doc);
    let e = &doc["endpoints"][0];
    assert_eq!(e["capacity"], 16, "{e}");
    let changes = e["response_changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c.as_str().unwrap().contains("bytes on average")),
        "no size change reported: {e}"
    );

    // With a body check the error bodies fail, and the capacity is found.
    for check in [
        &["--expect-json", "path=/e4"][..],
        &[
            "--expect-status",
            "200",
            "--expect-body-contains",
            "service_ms",
        ][..],
    ] {
        let run = probe(check);
        assert_eq!(run.code, 0, "{check:?}: {}", run.stderr);
        let doc = run.json();
        assert_matches_schema("probe-output.schema.json", &doc);
        let e = &doc["endpoints"][0];
        let capacity = e["capacity"].as_u64().unwrap();
        assert!((3..=4).contains(&capacity), "{check:?}: {e}");
        assert_eq!(e["response_changes"], json!([]), "{check:?}: {e}");
        let failed_checks: u64 = e["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["check_failures"].as_u64().unwrap())
            .sum();
        assert!(failed_checks > 0, "{check:?}: {e}");
    }
    // What the backend really did: served at most its 4 slots at once and
    // answered the rest with its 200 error body, which the first probe
    // counted as success.
    let stats = backend.path_stats("/e4");
    assert_eq!(stats["max_serving"], 4, "{stats}");
    assert!(stats["rejected"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn sweep_finds_saturation_and_a_threshold() {
    let _serial = serial();
    let backend = Backend::start(&["/k4:capacity=4,service_ms=20"]);
    let base = [
        "sweep",
        "--url",
        &url(&backend),
        "--endpoint",
        "/k4",
        "--levels",
        "1,2,4,8,16",
        "--warmup",
        "0.1",
        "--duration",
        "0.4",
        "--min-samples",
        "0",
        "--target-rps",
        "1000",
    ];
    let mut args = base.to_vec();
    args.push("--json");
    let run = prober(&args, LIMIT);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc = run.json();
    assert_matches_schema("sweep-output.schema.json", &doc);
    let statuses: Vec<&str> = doc["levels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["status"].as_str().unwrap())
        .collect();
    assert_eq!(&statuses[..3], ["ok", "ok", "ok"], "{doc}");
    assert_eq!(statuses[3], "saturated", "{doc}");
    assert_eq!(doc["saturation"]["concurrency"], 4, "{}", doc["saturation"]);
    assert_eq!(doc["saturation"]["throughput_at"], 4);
    assert_eq!(doc["recommended_threshold"], 3);
    // Little's law at saturation: ~4 in flight = ~195 req/s x ~20 ms.
    let in_flight = doc["littles_law"]["in_flight"].as_f64().unwrap();
    assert!((3.5..=5.0).contains(&in_flight), "{}", doc["littles_law"]);
    // 1000 req/s at ~20 ms is ~20 in flight: 7 instances of 3.
    let instances = doc["sizing"]["instances"].as_u64().unwrap();
    assert!((6..=8).contains(&instances), "{}", doc["sizing"]);

    let run = prober(&base, LIMIT);
    assert_eq!(run.code, 0);
    for want in [
        "conc  p50 ms  p95 ms  p99 ms  req/s  errors  status",
        "saturation point: 4 in flight",
        "recommended autoscaling threshold: 3 requests in flight per instance (75% of 4)",
        "Little's law: in flight = throughput x latency",
        "sizing: 1000 req/s x ",
    ] {
        assert!(
            run.stdout.contains(want),
            "missing {want:?} in:\n{}",
            run.stdout
        );
    }
}

#[test]
fn help_documents_the_exit_codes() {
    for args in [
        vec!["--help"],
        vec!["probe", "--help"],
        vec!["sweep", "--help"],
    ] {
        let run = prober(&args, LIMIT);
        assert_eq!(run.code, 0);
        for code in [
            "0  success",
            "2  bad usage",
            "3  target unreachable",
            "4  no concurrency level",
            "5  Redis unreachable",
        ] {
            assert!(run.stdout.contains(code), "{args:?} lacks {code:?}");
        }
    }
}

#[test]
fn the_schema_check_catches_mistakes() {
    let schema = load_schema("push-output.schema.json");
    let good = json!({
        "command": "push", "version": "0.1.0", "config": "s.yaml", "service": "demo",
        "redis_url": "redis://h", "exit_code": 0,
        "endpoints": [{"path": "/a", "capacity": 3, "source": "manual",
                       "instance_capacity": {"127.0.0.1:8001": 2}, "redis": "pushed"}]
    });
    let errors = |doc: &Value| schema_errors(&schema, doc);
    assert_eq!(errors(&good), Vec::<String>::new());
    let mut bad = good.clone();
    bad["endpoints"][0]["redis"] = json!("maybe");
    bad["endpoints"][0]["capacity"] = json!(0);
    bad["extra"] = json!(1);
    bad.as_object_mut().unwrap().remove("service");
    let e = errors(&bad);
    assert_eq!(e.len(), 4, "{e:?}");
    for at in [
        "/endpoints/0/redis: ",
        "/endpoints/0/capacity: ",
        ": Additional properties",
        ": \"service\" is a required",
    ] {
        assert!(e.iter().any(|line| line.contains(at)), "no {at:?} in {e:?}");
    }
}

/// The committed schemas are the ones the report types generate
/// (`cargo run -p sluice-prober --bin sluice-prober-schema` rewrites them).
#[test]
fn the_committed_schemas_are_the_generated_ones() {
    for (name, schema) in sluice_prober::schema::output_schemas() {
        let committed = std::fs::read_to_string(common::schema_path(name)).unwrap();
        assert!(
            committed == sluice_prober::schema::file_text(&schema),
            "prober/schema/{name} is not what the report types generate: \
             run `cargo run -p sluice-prober --bin sluice-prober-schema`"
        );
    }
}

#[test]
fn a_file_that_cannot_be_written_is_refused_before_any_load() {
    let dir = Scratch::new("readonly");
    let cfg = dir.file("sluice.yaml", CONFIG);
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o444)).unwrap();
    // Nothing listens there: the refusal must come before the URL check.
    let url = format!("http://127.0.0.1:{}", free_port());
    let run = probe_config(&url, &cfg, &[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("is read-only (mode 444)"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout, "");
    assert_eq!(read(&cfg), CONFIG);

    let missing = dir.0.join("no-such-dir/sluice.yaml");
    let run = probe_config(&url, &missing, &["--endpoint", "/k2"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("does not exist"), "{}", run.stderr);
}

#[test]
fn a_write_that_fails_after_measuring_still_reports_the_capacities() {
    let _serial = serial();
    let backend = Backend::start(ROUTES);
    let dir = Scratch::new("writefails");
    let cfg = dir.file("sluice.yaml", CONFIG);
    let for_thread = cfg.clone();
    // Made read-only while the probe runs (it takes seconds).
    let chmod = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::set_permissions(&for_thread, std::fs::Permissions::from_mode(0o444)).unwrap();
    });
    let run = probe_config(&url(&backend), &cfg, &["--json"]);
    chmod.join().unwrap();
    assert_eq!(run.code, 1, "{}", run.stderr);
    let doc = run.json();
    assert_matches_schema("probe-output.schema.json", &doc);
    assert_eq!(doc["config_written"], false);
    assert_eq!(doc["endpoints"][0]["capacity"], 2);
    assert!(
        run.stderr.contains("is read-only")
            && run
                .stderr
                .contains("is unchanged; set by hand: endpoints./k2.capacity: 2"),
        "{}",
        run.stderr
    );
    assert_eq!(read(&cfg), CONFIG);
}

/// Runs a probe and sends it `signal` once it prints a progress line for
/// `endpoint` (stderr is a pipe, so progress comes as plain lines).
fn probe_interrupted(url: &str, cfg: &Path, extra: &[&str], endpoint: &str, signal: &str) -> Run {
    let start = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-prober"))
        .args(probe_args(url, cfg, extra))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let mut stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let mut stderr = String::new();
    let mut sent = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !sent && line.starts_with(endpoint) {
            let ok = Command::new("kill").args([signal, &pid]).status().unwrap();
            assert!(ok.success());
            sent = true;
        }
        stderr.push_str(&line);
        stderr.push('\n');
        assert!(start.elapsed() < LIMIT, "{stderr}");
    }
    let status = child.wait().unwrap();
    assert!(sent, "never saw {endpoint}:\n{stderr}");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr,
        elapsed: start.elapsed(),
    }
}

#[test]
fn an_interrupt_reports_what_was_measured_and_writes_nothing() {
    let _serial = serial();
    let backend = Backend::start(ROUTES);
    let dir = Scratch::new("interrupt");
    let text = "endpoints:\n  /k2:\n  /fixed:\n";
    let cfg = dir.file("sluice.yaml", text);
    let run = probe_interrupted(&url(&backend), &cfg, &["--json"], "/fixed", "-INT");
    assert_eq!(run.code, 130, "{}", run.stderr);
    let doc = run.json();
    assert_matches_schema("probe-output.schema.json", &doc);
    assert_eq!(doc["exit_code"], 130);
    // The exact figure is the accuracy tests' business; here, that it is kept.
    assert_eq!(doc["endpoints"][0]["outcome"], "measured");
    assert_eq!(doc["endpoints"][1]["outcome"], "not_probed");
    assert!(!doc["endpoints"][1]["runs"].as_array().unwrap().is_empty());
    assert_eq!(doc["config_written"], false);
    assert!(
        run.stderr
            .contains("interrupted: 1 of 2 endpoints finished; nothing written"),
        "{}",
        run.stderr
    );
    assert_eq!(read(&cfg), text);

    // With --write-partial (and SIGTERM) the finished endpoint is written.
    let run = probe_interrupted(
        &url(&backend),
        &cfg,
        &["--write-partial"],
        "/fixed",
        "-TERM",
    );
    assert_eq!(run.code, 130, "{}", run.stderr);
    assert!(
        run.stdout.contains("capacities written to"),
        "{}",
        run.stdout
    );
    let written = read(&cfg);
    assert!(
        written.starts_with("endpoints:\n  /k2:\n    capacity: ")
            && written.ends_with("  /fixed:\n"),
        "{written}"
    );
}

/// A one-trick HTTP server on a free port: `answer` (or nothing at all, if
/// `None`) to every request on every connection. Lives as long as the test.
fn fake_server(answer: Option<&'static str>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match std::io::Read::read(&mut conn, &mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if let Some(a) = answer {
                            if conn.write_all(a.as_bytes()).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn an_endpoint_that_never_answers_is_judged_after_one_request_timeout() {
    let _serial = serial();
    let url = fake_server(None);
    let args = [
        "probe",
        "--url",
        &url,
        "--endpoint",
        "/hang",
        "--request-timeout",
        "1",
        "--warmup",
        "0.1",
        "--duration",
        "3",
    ];
    let run = prober(&args, LIMIT);
    assert_eq!(run.code, 4, "{}", run.stderr);
    assert!(run.elapsed < Duration::from_secs(8), "{:?}", run.elapsed);
    // stderr is a pipe here: progress still comes, as plain lines.
    assert!(
        run.stderr.lines().any(|l| l.starts_with("/hang ")),
        "{}",
        run.stderr
    );
}

#[test]
fn a_redirect_says_it_is_not_followed() {
    let _serial = serial();
    let url = fake_server(Some(
        "HTTP/1.1 302 Found\r\nLocation: /login\r\nContent-Length: 0\r\n\r\n",
    ));
    let mut args = vec!["probe", "--url", &url, "--endpoint", "/r"];
    args.extend_from_slice(FAST_LEVELS);
    let run = prober(&args, LIMIT);
    assert_eq!(run.code, 4, "{}", run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(
        all.contains("302 x") && all.contains("redirects to /login are not followed"),
        "{all}"
    );
}

#[test]
fn bad_values_get_clear_messages() {
    let port = free_port().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let base = ["probe", "--url", url.as_str(), "--endpoint", "/a"];
    for (extra, expect) in [
        (
            &["--warmup", "-1"][..],
            "--warmup -1: must be a number of seconds ≥ 0",
        ),
        (&["--threads", "-1"][..], "must be ≥ 0"),
        (&["--error-threshold", "NaN"][..], "got NaN"),
        (
            &["--max-duration", "1", "--duration", "5"][..],
            "max_duration (1 s) must be ≥ duration (5 s)",
        ),
        (
            &["--redis", "redis://h:notaport"][..],
            "not a valid redis:// URL",
        ),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let run = prober(&args, LIMIT);
        assert_eq!(run.code, 2, "{extra:?}: {}", run.stderr);
        assert!(run.stderr.contains(expect), "{extra:?}: {}", run.stderr);
    }
    let secret = format!("http://user:hunter2@127.0.0.1:{port}");
    let run = prober(&["probe", "--url", &secret, "--endpoint", "/a"], LIMIT);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("user:***@") && !run.stderr.contains("hunter2"),
        "{}",
        run.stderr
    );
}
