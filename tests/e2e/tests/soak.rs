//! Soak: Sluice in Envoy (`--concurrency 4`) at 3× overload for a while,
//! with clients giving up at random moments (while queued and while in
//! flight) and a listener update (file-based LDS, new root contexts while
//! old streams run) at a fixed interval.
//!
//! Asserted: the backend never had more than capacity inside (but for the
//! abort overlap below), and the filter's counters come back to zero. Printed: what the clients got,
//! Envoy's RSS at the start and the end, its wasm VMs, and the worker
//! indices the filter allocated (one shared queue each).
//!
//! `make test` runs 60 s. `make soak` runs `SOAK_MINUTES` (10) through
//! these variables: `SLUICE_SOAK_SECS` (60), `SLUICE_SOAK_UPDATE_SECS`
//! (a quarter of the run, at most 60), `SLUICE_SOAK_DRAIN_SECS` (Envoy's
//! `--drain-time-s`, 10: old listeners finish draining between updates,
//! so their root contexts really end; Envoy's default is 600),
//! `SLUICE_SOAK_ABORT_PERCENT` (10).

use serde_json::{json, Value};
use sluice_harness::{Backend, Envoy, FrontProxy};
use sluice_loadgen::{run_closed_loop_blocking, ClosedLoop, LoopReport};
use std::time::{Duration, Instant};

/// (path, capacity, service ms, queue timeout s, abort within ms): the slow
/// endpoint's waits exceed its queue timeout, so it answers 504s as well.
const ENDPOINTS: [(&str, u32, u32, f64, u64); 2] =
    [("/predict", 8, 50, 1.0, 300), ("/slow", 2, 200, 0.3, 600)];
const OVERLOAD: u32 = 3;
/// When a client leaves while its request is in flight, Envoy logs the
/// stream (the filter's `on_log`, which releases the slot) before it
/// destroys the filters (the router's reset, which closes the upstream
/// connection). Another worker can send the next request in between, so
/// the backend holds one too many for a moment: about 0.1 ms, up to 2 ms
/// on a busy 2-core machine (measured here). A leaked or doubly granted
/// slot would hold a whole service time (50 ms and more): spells over
/// capacity must end sooner than this.
const ABORT_OVERLAP: Duration = Duration::from_millis(20);

fn env_secs(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be whole seconds, got {v:?}")),
        Err(_) => default,
    }
}

/// Two configurations that differ only where it does not matter, so each
/// update makes Envoy build a new filter chain with the same capacities.
fn plugin_config(generation: u32) -> String {
    let mut endpoints = serde_json::Map::new();
    for (path, capacity, _, queue_timeout, _) in ENDPOINTS {
        endpoints.insert(
            path.to_string(),
            json!({"capacity": capacity, "queue_timeout": queue_timeout, "max_queue": 1000}),
        );
    }
    // An in-flight request abandoned after running longer than any recent
    // one is held until `abandon_hold` after its admission (docs/filter.md,
    // "Abandoned requests"): on two busy cores some of the 50 ms requests
    // run longer than that. 2 s, the backend's longest real time with room
    // to spare, instead of the default 30 s, so that the counters' return
    // to zero below is a check for leaks, not a wait for the cap.
    json!({"service": "soak", "max_queue": 1000 + generation % 2, "abandon_hold": 2, "endpoints": endpoints})
        .to_string()
}

fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Worker indices allocated so far: each root context logs its own at its
/// first tick (`... worker N`), and registers a shared queue under it.
fn worker_indices(envoy: &Envoy) -> usize {
    envoy
        .log()
        .lines()
        .filter_map(|l| l.rsplit_once(" worker ")?.1.trim().parse::<u32>().ok())
        .map(|id| id as usize + 1)
        .max()
        .unwrap_or(0)
}

struct Snapshot {
    rss_kb: u64,
    hwm_kb: u64,
    vms_active: i64,
    vms_created: i64,
    worker_indices: usize,
}

fn snapshot(envoy: &Envoy) -> Snapshot {
    let (rss_kb, hwm_kb) = rss_kb(envoy.pid());
    Snapshot {
        rss_kb,
        hwm_kb,
        vms_active: envoy
            .stat("wasm.envoy.wasm.runtime.v8.active")
            .unwrap_or(-1),
        vms_created: envoy
            .stat("wasm.envoy.wasm.runtime.v8.created")
            .unwrap_or(-1),
        worker_indices: worker_indices(envoy),
    }
}

fn sluice_stats(envoy: &Envoy) -> Value {
    let res = envoy
        .request("GET", "/balancer/stats")
        .send()
        .expect("stats request");
    serde_json::from_slice(&res.body).expect("stats JSON")
}

#[test]
fn soak_at_three_times_overload_with_aborts_and_listener_updates() {
    let secs = env_secs("SLUICE_SOAK_SECS", 60);
    let update_every = env_secs("SLUICE_SOAK_UPDATE_SECS", (secs / 4).clamp(1, 60));
    let drain_secs = env_secs("SLUICE_SOAK_DRAIN_SECS", 10);
    let abort_share = env_secs("SLUICE_SOAK_ABORT_PERCENT", 10) as f64 / 100.0;
    let routes: Vec<String> = ENDPOINTS
        .iter()
        .map(|(path, capacity, service_ms, _, _)| {
            format!("{path}:capacity={capacity},service_ms={service_ms}")
        })
        .collect();
    let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
    let backend = Backend::start(&routes);
    let mut proxy = FrontProxy::new(backend.port(), plugin_config(0));
    proxy.use_lds = true;
    let mut opts = proxy.envoy_options(4);
    opts.extra_args = vec!["--drain-time-s".into(), drain_secs.to_string()];
    let envoy = Envoy::start_with(opts);
    let start = snapshot(&envoy);

    let loops: Vec<_> = ENDPOINTS
        .iter()
        .enumerate()
        .map(|(i, &(path, capacity, _, _, abort_within_ms))| {
            let mut spec = ClosedLoop::new(
                envoy.listener_addr(),
                path,
                (OVERLOAD * capacity) as usize,
                Duration::from_secs(secs),
            );
            spec.abort_share = abort_share;
            spec.abort_within = Duration::from_millis(abort_within_ms);
            spec.timeout = Duration::from_secs(30);
            spec.seed = 1000 * (i as u64 + 1);
            std::thread::spawn(move || run_closed_loop_blocking(&spec))
        })
        .collect();

    let began = Instant::now();
    let mut generation = 0;
    let mut next_update = Duration::from_secs(update_every);
    while began.elapsed() + Duration::from_secs(1) < Duration::from_secs(secs) {
        if began.elapsed() >= next_update {
            generation += 1;
            proxy.plugin_config_json = plugin_config(generation);
            envoy.update_lds(&proxy);
            let (rss, _) = rss_kb(envoy.pid());
            eprintln!(
                "soak: {:>4} s, listener update {generation}, Envoy RSS {} MB",
                began.elapsed().as_secs(),
                rss / 1024
            );
            next_update += Duration::from_secs(update_every);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let reports: Vec<LoopReport> = loops.into_iter().map(|l| l.join().unwrap()).collect();

    // The filter's counters come back to zero once the clients are gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    let stats = loop {
        let s = sluice_stats(&envoy);
        let idle = ENDPOINTS.iter().all(|(path, ..)| {
            s["endpoints"][path]["active_requests"] == 0 && s["endpoints"][path]["queued"] == 0
        });
        if idle {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "counters never came back to zero: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The last update's old listener ends its drain: its root contexts go.
    std::thread::sleep(Duration::from_secs(drain_secs + 2));
    let end = snapshot(&envoy);

    let backend_stats = backend.stats();
    println!(
        "\nsoak: {secs} s at {OVERLOAD}x overload, Envoy --concurrency 4, {generation} listener updates \
         (every {update_every} s, --drain-time-s {drain_secs}), {:.0}% of requests abandoned at random",
        abort_share * 100.0
    );
    println!("| endpoint | capacity | backend max in flight | sent | 200 | 504 | 503 | aborted | errors | after: active / queued |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for ((path, capacity, ..), r) in ENDPOINTS.iter().zip(&reports) {
        let seen = &backend_stats["paths"][path];
        let ep = &stats["endpoints"][path];
        println!(
            "| {path} | {capacity} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            seen["max_in_flight"],
            r.sent,
            r.status(200),
            r.status(504),
            r.status(503),
            r.aborted,
            r.errors,
            ep["active_requests"],
            ep["queued"]
        );
        let over = &seen["over_capacity"];
        if over["episodes"].as_u64().unwrap_or(0) > 0 {
            println!("  {path}: over capacity at the backend: {over}");
        }
        if let Some(e) = &r.first_error {
            println!("  {path}: first client error: {e}");
        }
    }
    println!(
        "Envoy RSS: {} MB at the start, {} MB at the end (peak {} MB)",
        start.rss_kb / 1024,
        end.rss_kb / 1024,
        end.hwm_kb.max(start.hwm_kb) / 1024
    );
    println!(
        "wasm VMs active / created: {} / {} at the start, {} / {} at the end",
        start.vms_active, start.vms_created, end.vms_active, end.vms_created
    );
    println!(
        "worker indices allocated (one shared queue each): {} at the start, {} at the end",
        start.worker_indices, end.worker_indices
    );
    // Every key the filter writes in this configuration (no sync, health
    // checks or max_queued_bytes; Envoy with precise timers, or there is
    // also the once-per-process mark of the coarse-timer warning): none is
    // per request, per VM or per update. Worker indices are reused through
    // the free list, whose value is bounded by the indices in use.
    let mut keys = vec![
        "sluice:config-logged".to_string(),
        "sluice:workers".into(),
        "sluice:workers:free".into(),
        "sluice:soak:leader".into(),
        "sluice:soak:config".into(),
    ];
    for (path, ..) in ENDPOINTS {
        keys.push(format!("sluice:soak:ep:{path}"));
        keys.push(format!("sluice:soak:ep:{path}:upstream-ns"));
    }
    println!(
        "shared-data keys: not observable from outside (Envoy's admin API does not list \
         shared data, and proxy-wasm has no call to enumerate keys); by construction {} \
         at the start and the end: {}",
        keys.len(),
        keys.join(", ")
    );

    for ((path, capacity, ..), r) in ENDPOINTS.iter().zip(&reports) {
        let seen = &backend_stats["paths"][path];
        let max = seen["max_in_flight"].as_u64().unwrap();
        let over = &seen["over_capacity"];
        let longest_ms = over["longest_ms"].as_f64().unwrap();
        if abort_share == 0.0 {
            assert!(
                max <= u64::from(*capacity),
                "{path}: the backend had {max} inside at once, capacity {capacity}: {over}"
            );
        } else {
            assert!(
                longest_ms < ABORT_OVERLAP.as_secs_f64() * 1000.0,
                "{path}: the backend had {max} inside at once, capacity {capacity}, \
                 longer than an abort overlap: {over}"
            );
        }
        assert!(r.status(200) > 0, "{path}: nothing was served: {r:?}");
        let unexpected: Vec<_> = r
            .statuses
            .keys()
            .filter(|s| ![200, 504].contains(*s))
            .collect();
        assert!(unexpected.is_empty(), "{path}: unexpected statuses: {r:?}");
    }
}
