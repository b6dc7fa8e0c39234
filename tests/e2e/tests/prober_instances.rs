//! `sluice-prober probe --each-instance`: the real prober against two real
//! `sluice-backend` instances of different capacities (2 and 4 slots of
//! 20 ms each), listed in `instances.hosts`. Each is measured on its own,
//! at `http://ADDR/PATH`: the file gets `instance_capacity` with each
//! figure (and `capacity`, the lowest), Redis the `instance_capacity:ADDR`
//! fields in the endpoint's record.

use serde_json::Value;
use sluice_harness::{bin_path, Backend, Redis, RespValue, ScratchDir};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn hget(redis: &Redis, key: &str, field: &str) -> Option<String> {
    match redis.command(&["HGET", key, field]) {
        RespValue::Bulk(Some(b)) => Some(String::from_utf8(b).unwrap()),
        _ => None,
    }
}

#[test]
fn each_instance_is_measured_on_its_own_and_recorded() {
    let small = Backend::start(&["/k:capacity=2,service_ms=20"]);
    let large = Backend::start(&["/k:capacity=4,service_ms=20"]);
    let redis = Redis::start();
    let (a, b) = (small.addr().to_string(), large.addr().to_string());
    let dir = ScratchDir::new("prober-instances");
    let config = dir.path().join("sluice.yaml");
    let text = format!(
        "service: fleet\n\
         storage: {{type: redis, url: \"{}\"}}\n\
         instances:\n  hosts: [\"{a}\", \"{b}\"]\n\
         # the endpoint under test\n\
         endpoints:\n  /k:\n    method: GET\n",
        redis.url()
    );
    std::fs::write(&config, &text).unwrap();

    let started = Instant::now();
    let mut child = Command::new(bin_path("sluice-prober"))
        .args(["probe", "--config"])
        .arg(&config)
        .args(["--each-instance", "--latency-threshold-ms", "30"])
        .args([
            "--error-threshold",
            "0.05",
            "--warmup",
            "0.2",
            "--duration",
            "0.8",
        ])
        .args([
            "--min-samples",
            "50",
            "--max-duration",
            "2",
            "--json",
            "--quiet",
        ])
        .env_remove("SLUICE_REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sluice-prober");
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("sluice-prober --each-instance ran past {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    eprintln!("--each-instance took {:?}", started.elapsed());
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let endpoint = &doc["endpoints"][0];
    let measured: Vec<(String, u64)> = endpoint["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["address"].as_str().unwrap().to_string(),
                i["capacity"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(measured, [(a.clone(), 2), (b.clone(), 4)], "{doc:#}");
    assert_eq!(endpoint["capacity"], 2, "the lowest, capacity was not set");

    // One at a time: each backend saw only its own probe's connections.
    for (backend, k) in [(&small, 2), (&large, 4)] {
        let seen = backend.path_stats("/k");
        let most = seen["max_in_flight"].as_u64().unwrap();
        assert!(most > k, "the search went past {k} on its instance: {seen}");
        assert_eq!(seen["max_serving"].as_u64(), Some(k), "{seen}");
        assert!(seen["completed"].as_u64().unwrap_or(0) > 0, "{seen}");
    }

    // The file: its lines kept, the figures added.
    let written = std::fs::read_to_string(&config).unwrap();
    assert!(written.contains("# the endpoint under test\n"), "{written}");
    // Sorted by address, as the prober writes the map.
    let mut pairs = [(a.as_str(), 2), (b.as_str(), 4)];
    pairs.sort();
    let flow = pairs
        .iter()
        .map(|(addr, c)| format!("\"{addr}\": {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    assert!(
        written.contains(&format!("    instance_capacity: {{{flow}}}\n")),
        "{written}"
    );
    let reread = sluice_core::config::yaml::parse(&written).unwrap();
    assert_eq!(reread["endpoints"]["/k"]["capacity"], 2);
    let config_ok = sluice_core::config::Config::from_json_str(&reread.to_string());
    assert!(
        config_ok.is_ok(),
        "the file the filter reads: {config_ok:?}"
    );

    // Redis: the endpoint's record with a field per instance.
    let key = "sluice:{fleet}:capacity:/k";
    assert_eq!(hget(&redis, key, "capacity").as_deref(), Some("2"));
    assert_eq!(
        hget(&redis, key, &format!("instance_capacity:{a}")).as_deref(),
        Some("2")
    );
    assert_eq!(
        hget(&redis, key, &format!("instance_capacity:{b}")).as_deref(),
        Some("4")
    );
}
