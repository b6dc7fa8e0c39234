//! `make demo`: a service that can really do 4 requests at a time (300 ms
//! each). The whole path runs as local processes: the backend, Redis,
//! sluice-sync and Envoy start; the prober measures the backend and pushes
//! its capacity to Redis; the stats show it arrive in Envoy (no restart);
//! then a burst of 12, first straight to the backend, then through Envoy
//! with Sluice holding it to the measured capacity.

use serde_json::{json, Value};
use sluice_harness::{
    bin_path, unique_scratch_path, wait_until, Backend, Envoy, FrontProxy, Redis, SyncService,
    SYNC_CLUSTER,
};
use sluice_loadgen::{run_blocking, summarize, table, Burst, Outcome};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

const CAPACITY: u32 = 4;
const BURST: usize = 12;
const QUEUE_TIMEOUT: f64 = 0.5;

fn main() {
    println!("A backend with {CAPACITY} workers, 300 ms per request (more wait inside it).");
    let backend = Backend::start(&[&format!("/predict:capacity={CAPACITY},service_ms=300")]);
    let redis = Redis::start();
    let sync = SyncService::start(&redis.url(), &[]);
    println!("Redis on {}, sluice-sync on {}", redis.url(), sync.addr());

    // Envoy knows the endpoint but not its capacity: sync will tell it.
    let config = json!({
        "service": "demo",
        "queue_timeout": QUEUE_TIMEOUT,
        "max_queue": 100,
        "sync": {"cluster": SYNC_CLUSTER},
        "endpoints": {"/predict": {}},
    });
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    proxy.extra_clusters_yaml = sync.cluster_yaml();
    let envoy = Envoy::start(&proxy, 2);
    println!("Envoy with Sluice, plugin configuration: {config}");
    wait_until(Duration::from_secs(10), "Envoy connected to sync", || {
        (stats(&envoy)["sync"]["state"] == "connected").then_some(())
    });
    println!("\n== Stats before measuring ==");
    print_stats(&envoy);

    println!("\n== sluice-prober probe --redis: measure the backend, push the capacity ==");
    let dir = unique_scratch_path("demo");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join("sluice.yaml");
    std::fs::write(
        &file,
        "service: demo\nendpoints:\n  /predict:\n    method: GET\n",
    )
    .expect("write sluice.yaml");
    let url = format!("http://{}", backend.addr());
    let out = Command::new(bin_path("sluice-prober"))
        .args(["probe", "--url", &url, "--config"])
        .arg(&file)
        .args(["--redis", &redis.url(), "--latency-threshold-ms", "450"])
        .args(["--warmup", "0.3", "--duration", "1.2", "--min-samples", "0"])
        .output()
        .expect("run sluice-prober");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    let arrived = wait_until(Duration::from_secs(5), "the capacity in Envoy", || {
        let s = stats(&envoy);
        (s["endpoints"]["/predict"]["capacity_source"] == "sync").then_some(s)
    });
    println!("\n== Stats after: the capacity arrived through sync, no restart ==");
    print_stats(&envoy);
    let measured = arrived["endpoints"]["/predict"]["capacity"].clone();
    let _ = std::fs::remove_dir_all(&dir);

    backend.reset();
    println!("\n== Without Sluice: {BURST} requests at once, straight to the backend ==");
    let outcomes = burst(backend.addr());
    print_outcomes(&outcomes);
    let seen = backend.path_stats("/predict");
    println!(
        "backend: up to {} requests inside at once for {} workers; the last one took {:.0} ms",
        seen["max_in_flight"],
        CAPACITY,
        outcomes.iter().map(|o| o.latency_ms).fold(0.0, f64::max)
    );

    backend.reset();
    println!(
        "\n== With Sluice in Envoy: measured capacity {measured}, queue_timeout {QUEUE_TIMEOUT} s =="
    );
    let outcomes = burst(envoy.listener_addr());
    print_outcomes(&outcomes);
    let s = summarize(&outcomes);
    let seen = backend.path_stats("/predict");
    println!(
        "admitted at once: {}, queued then admitted: {}, timed out in the queue (504): {}, queue full (503): {}",
        s.ok - s.queued_then_admitted,
        s.queued_then_admitted,
        s.queue_timeout,
        s.queue_full
    );
    println!(
        "backend: at most {} requests inside at once (capacity {measured}); it served {}",
        seen["max_in_flight"], seen["completed"]
    );
}

fn stats(envoy: &Envoy) -> Value {
    envoy
        .get("/balancer/stats")
        .ok()
        .and_then(|body| serde_json::from_str(&body).ok())
        .unwrap_or(Value::Null)
}

/// The parts of the stats the demo is about.
fn print_stats(envoy: &Envoy) {
    let s = stats(envoy);
    let ep = &s["endpoints"]["/predict"];
    println!(
        "GET /balancer/stats → /predict capacity {} (source {}), sync {} at version {}",
        ep["capacity"], ep["capacity_source"], s["sync"]["state"], s["sync"]["version"]
    );
}

fn burst(addr: SocketAddr) -> Vec<Outcome> {
    let mut b = Burst::new(addr, "/predict", BURST);
    b.spacing = Duration::from_millis(2);
    run_blocking(&b)
}

fn print_outcomes(outcomes: &[Outcome]) {
    print!("{}", table(outcomes));
}
