//! `make demo`: a service that can really do 4 requests at a time (300 ms
//! each), hit by a burst of 12 — first straight, then through Envoy with
//! Sluice holding it to its capacity.

use serde_json::json;
use sluice_harness::{Backend, Envoy, FrontProxy};
use sluice_loadgen::{run_blocking, summarize, table, Burst, Outcome};
use std::net::SocketAddr;
use std::time::Duration;

const CAPACITY: u32 = 4;
const BURST: usize = 12;
const QUEUE_TIMEOUT: f64 = 0.5;

fn main() {
    println!("A backend with {CAPACITY} workers, 300 ms per request (more wait inside it).");
    let backend = Backend::start(&[&format!("/predict:capacity={CAPACITY},service_ms=300")]);

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
    let config = json!({
        "service": "demo",
        "endpoints": {"/predict": {"capacity": CAPACITY, "queue_timeout": QUEUE_TIMEOUT, "max_queue": 100}}
    });
    println!("\n== With Sluice in Envoy: capacity {CAPACITY}, queue_timeout {QUEUE_TIMEOUT} s ==");
    println!("plugin configuration: {config}");
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 2);
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
        "backend: at most {} requests inside at once (capacity {CAPACITY}); it served {}",
        seen["max_in_flight"], seen["completed"]
    );
    match envoy.get("/balancer/stats") {
        Ok(stats) => println!("GET /balancer/stats → {}", stats.trim()),
        Err(e) => println!("GET /balancer/stats failed: {e}"),
    }
}

fn burst(addr: SocketAddr) -> Vec<Outcome> {
    let mut b = Burst::new(addr, "/predict", BURST);
    b.spacing = Duration::from_millis(2);
    run_blocking(&b)
}

fn print_outcomes(outcomes: &[Outcome]) {
    print!("{}", table(outcomes));
}
