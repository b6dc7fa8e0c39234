//! The filter in the real Envoy (1.40, V8) in front of the test backend.
//! Every assertion that matters is made from the backend's side: what it saw,
//! how many at once, in which order.

use serde_json::{json, Value};
use sluice_harness::{Backend, Envoy, FrontProxy};
use sluice_loadgen::{run_blocking, summarize, Burst, Outcome};
use std::time::{Duration, Instant};

fn plugin_config(capacity: u32, queue_timeout: f64, max_queue: u32) -> Value {
    json!({
        "service": "e2e",
        "endpoints": {
            "/predict": {"capacity": capacity, "queue_timeout": queue_timeout, "max_queue": max_queue},
            "/post-only": {"capacity": 1, "methods": ["POST"]},
        }
    })
}

fn start(backend: &Backend, config: &Value, concurrency: u32) -> Envoy {
    let proxy = FrontProxy::new(backend.port(), config.to_string());
    Envoy::start(&proxy, concurrency)
}

fn path_stats(backend: &Backend, path: &str) -> Value {
    backend.stats()["paths"][path].clone()
}

/// The filter's own view, from any worker.
fn sluice_stats(envoy: &Envoy) -> Value {
    let res = envoy
        .request("GET", "/balancer/stats")
        .send()
        .expect("stats request");
    assert_eq!(res.status, 200);
    assert_eq!(
        res.header("x-sluice-reason"),
        Some("stats"),
        "every local reply says why"
    );
    let body = res.text();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("stats is not JSON ({e}): {body}"))
}

/// Polls until the filter reports nothing in flight and nothing queued.
fn assert_drains_to_zero(envoy: &Envoy) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = sluice_stats(envoy);
        let ep = &s["endpoints"]["/predict"];
        if ep["active_requests"] == 0 && ep["queued"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counters never came back to zero: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(outcomes: &[Outcome], status: u16) -> usize {
    outcomes.iter().filter(|o| o.status == status).count()
}

fn capacity_holds(concurrency: u32) {
    let backend = Backend::start(&["/predict:service_ms=40"]);
    let envoy = start(&backend, &plugin_config(3, 30.0, 1000), concurrency);
    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 60);
    burst.spacing = Duration::from_micros(500);
    let outcomes = run_blocking(&burst);
    let s = summarize(&outcomes);
    assert_eq!(s.ok, 60, "every request is served in the end: {s:?}");
    assert!(
        s.queued_then_admitted > 0,
        "the burst must have queued: {s:?}"
    );
    let seen = path_stats(&backend, "/predict");
    assert_eq!(
        seen["max_in_flight"], 3,
        "backend saw more (or fewer) than capacity at once: {seen}"
    );
    assert_eq!(seen["completed"], 60);
    assert_drains_to_zero(&envoy);
}

#[test]
fn capacity_holds_with_one_worker() {
    capacity_holds(1);
}

#[test]
fn capacity_holds_across_four_workers() {
    capacity_holds(4);
}

#[test]
fn fifo_admission_across_workers() {
    let backend = Backend::start(&["/predict:service_ms=15"]);
    let envoy = start(&backend, &plugin_config(1, 30.0, 1000), 4);
    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 40);
    burst.spacing = Duration::from_millis(2);
    let outcomes = run_blocking(&burst);
    assert_eq!(count(&outcomes, 200), 40);
    let arrivals: Vec<String> = path_stats(&backend, "/predict")["arrivals"]
        .as_array()
        .expect("arrivals")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    assert_eq!(
        arrivals, expected,
        "backend saw requests out of arrival order"
    );
    // The connections really were spread over several workers.
    let workers_used = envoy.workers_that_served();
    assert!(
        workers_used > 1,
        "all requests went to one worker; the test proves nothing"
    );
}

#[test]
fn queue_timeout_gives_504_on_time_without_reaching_the_backend() {
    let backend = Backend::start(&["/predict:service_ms=1500"]);
    let envoy = start(&backend, &plugin_config(1, 0.3, 1000), 2);
    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 8);
    burst.spacing = Duration::from_millis(1);
    let outcomes = run_blocking(&burst);
    assert_eq!(outcomes[0].status, 200);
    for o in &outcomes[1..] {
        assert_eq!(o.status, 504, "{o:?}");
        assert_eq!(o.reason.as_deref(), Some("queue-timeout"));
        let body: Value = serde_json::from_str(&o.body).expect("504 body is JSON");
        assert_eq!(body["reason"], "queue-timeout");
        // Envoy times the wait on its system clock from the request's
        // arrival (`request.time`), the client on its monotonic one: they
        // may disagree by a few microseconds (seen: 299.9997 ms), never by
        // a tenth of a millisecond.
        assert!(o.latency_ms >= 299.9, "504 before the queue timeout: {o:?}");
        assert!(o.latency_ms < 360.0, "504 more than 60 ms late: {o:?}");
    }
    let seen = path_stats(&backend, "/predict");
    assert_eq!(
        seen["arrivals"],
        json!(["0"]),
        "timed-out requests reached the backend: {seen}"
    );
    assert_drains_to_zero(&envoy);
}

/// The resolution of `CLOCK_MONOTONIC_COARSE`, which libevent times Envoy's
/// timers by unless `EVENT_PRECISE_TIMER` is set: a kernel tick (4 ms at
/// 250 Hz, 1 ms at 1000 Hz).
fn coarse_clock_resolution() -> Duration {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec into `res`, which outlives the call.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) };
    assert_eq!(rc, 0, "clock_getres(CLOCK_MONOTONIC_COARSE)");
    Duration::new(res.tv_sec as u64, res.tv_nsec as u32)
}

/// Without `EVENT_PRECISE_TIMER=1` Envoy's timers run on the kernel's coarse
/// clock, and on a kernel whose coarse clock moves in steps of 2 ms or more
/// every 504 comes that much late: the filter notices from its ticks while a
/// request waits and names the remedy once in Envoy's log. With the variable
/// set (as the harness and every shipped deployment do) it says nothing.
#[test]
fn coarse_envoy_timers_are_named_in_envoys_log() {
    const NEEDLE: &str = "set EVENT_PRECISE_TIMER=1 in Envoy's environment";
    let coarse = coarse_clock_resolution() >= Duration::from_millis(2);
    for precise in [false, true] {
        let backend = Backend::start(&["/predict:service_ms=1200"]);
        let mut proxy = FrontProxy::new(backend.port(), plugin_config(1, 0.8, 10).to_string());
        proxy.precise_timers = precise;
        let envoy = Envoy::start(&proxy, 1);
        // One request holds the slot, the other waits 800 ms: over a
        // hundred ticks planned for its deadline.
        let mut burst = Burst::new(envoy.listener_addr(), "/predict", 2);
        burst.spacing = Duration::from_millis(20);
        let outcomes = run_blocking(&burst);
        assert_eq!(
            outcomes.iter().map(|o| o.status).collect::<Vec<_>>(),
            [200, 504]
        );
        if !precise && coarse {
            envoy.wait_for_log(NEEDLE, Duration::from_secs(5));
            assert_eq!(envoy.log().matches(NEEDLE).count(), 1, "once per process");
        } else {
            // The log is flushed every 100 ms.
            std::thread::sleep(Duration::from_millis(500));
            assert!(
                !envoy.log().contains(NEEDLE),
                "precise timers: {precise}, coarse clock {:?}: {}",
                coarse_clock_resolution(),
                envoy.log()
            );
        }
    }
}

#[test]
fn queue_full_gives_503_with_retry_after() {
    let backend = Backend::start(&["/predict:service_ms=600"]);
    let envoy = start(&backend, &plugin_config(1, 5.0, 2), 2);
    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 6);
    burst.spacing = Duration::from_millis(3);
    let outcomes = run_blocking(&burst);
    let statuses: Vec<u16> = outcomes.iter().map(|o| o.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 503, 503, 503]);
    for o in &outcomes[3..] {
        assert_eq!(o.reason.as_deref(), Some("queue-full"));
        assert_eq!(o.retry_after.as_deref(), Some("5"));
        assert!(o.latency_ms < 100.0, "503 must be immediate: {o:?}");
    }
    assert_eq!(path_stats(&backend, "/predict")["completed"], 3);
    assert_drains_to_zero(&envoy);
}

#[test]
fn aborted_clients_leak_nothing() {
    let backend = Backend::start(&["/predict:service_ms=3000"]);
    // This backend stops working when its client leaves, so abandoned slots
    // need no hold (hardening.rs tests the hold).
    let mut config = plugin_config(200, 60.0, 1000);
    config["endpoints"]["/predict"]["abandon_hold"] = json!(0);
    let envoy = start(&backend, &config, 4);
    let addr = envoy.listener_addr();
    // 200 fill every slot and 200 wait; then every client gives up.
    let mut burst = Burst::new(addr, "/predict", 400);
    burst.abort_after = Some(Duration::from_millis(2500));
    let running = std::thread::spawn(move || run_blocking(&burst));
    wait_for_filter_state(&envoy, 200, 200);
    let s = summarize(&running.join().unwrap());
    assert_eq!(s.aborted, 400, "{s:?}");
    assert_drains_to_zero(&envoy);
    // And the slots are really free: a new full house is admitted at once,
    // all 200 inside the backend together, none of them queued.
    backend.reset();
    let again = Burst::new(addr, "/predict", 200);
    let running = std::thread::spawn(move || run_blocking(&again));
    wait_for_filter_state(&envoy, 200, 0);
    let outcomes = running.join().unwrap();
    let refused: Vec<_> = outcomes.iter().filter(|o| o.status != 200).collect();
    assert!(
        refused.is_empty(),
        "{:?}; the first refused: {:?}",
        summarize(&outcomes),
        refused.first()
    );
    assert!(
        outcomes.iter().all(|o| o.wait_ms.is_none()),
        "a freed slot was not free: some requests queued"
    );
    assert_eq!(path_stats(&backend, "/predict")["max_in_flight"], 200);
    assert_drains_to_zero(&envoy);
}

/// Polls the filter's stats until `/predict` has exactly this many requests
/// in flight and queued.
fn wait_for_filter_state(envoy: &Envoy, active: u64, queued: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<(u64, u64)> = Vec::new();
    loop {
        let s = sluice_stats(envoy);
        let ep = &s["endpoints"]["/predict"];
        let now = (
            ep["active_requests"].as_u64().unwrap_or(0),
            ep["queued"].as_u64().unwrap_or(0),
        );
        if now == (active, queued) {
            return;
        }
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        assert!(
            Instant::now() < deadline,
            "never reached {active} active and {queued} queued; (active, queued) went {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unwatched_paths_and_methods_pass_while_saturated() {
    let backend = Backend::start(&[
        "/predict:service_ms=800",
        "/other:service_ms=0",
        "/post-only:service_ms=0",
    ]);
    let envoy = start(&backend, &plugin_config(1, 5.0, 10), 2);
    let addr = envoy.listener_addr();
    let saturate = std::thread::spawn(move || run_blocking(&Burst::new(addr, "/predict", 3)));
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let other = run_blocking(&Burst::new(addr, "/other", 5));
    assert!(other.iter().all(|o| o.status == 200 && o.wait_ms.is_none()));
    // GET is not limited on a POST-only endpoint: five at once all pass.
    let gets = run_blocking(&Burst::new(addr, "/post-only", 5));
    assert!(gets.iter().all(|o| o.status == 200 && o.wait_ms.is_none()));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "unwatched traffic waited"
    );
    assert_eq!(count(&saturate.join().unwrap(), 200), 3);
}

#[test]
fn config_reload_mid_burst_keeps_the_limit_and_leaks_nothing() {
    let backend = Backend::start(&["/predict:service_ms=60"]);
    let config = plugin_config(4, 30.0, 1000);
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    proxy.use_lds = true;
    let envoy = Envoy::start(&proxy, 4);
    let addr = envoy.listener_addr();
    let mut burst = Burst::new(addr, "/predict", 120);
    burst.spacing = Duration::from_millis(3);
    let running = std::thread::spawn(move || run_blocking(&burst));
    // Mid-burst: same capacity, a different plugin configuration, so Envoy
    // builds a new filter chain (new root contexts) while old streams run.
    std::thread::sleep(Duration::from_millis(250));
    proxy.plugin_config_json = plugin_config(4, 29.0, 999).to_string();
    envoy.update_lds(&proxy);
    let outcomes = running.join().unwrap();
    let s = summarize(&outcomes);
    assert_eq!(s.ok, 120, "{s:?}");
    let seen = path_stats(&backend, "/predict");
    assert_eq!(seen["max_in_flight"], 4, "{seen}");
    assert_drains_to_zero(&envoy);
    // After the reload, new traffic still gets exactly the capacity.
    backend.reset();
    let outcomes = run_blocking(&Burst::new(addr, "/predict", 12));
    assert_eq!(count(&outcomes, 200), 12);
    assert_eq!(path_stats(&backend, "/predict")["max_in_flight"], 4);
    assert_drains_to_zero(&envoy);
}

#[test]
fn invalid_configuration_is_refused_with_the_key_named() {
    let backend = Backend::start(&["/predict"]);
    let bad = json!({"endpoints": {"/predict": {"capacity": -3}}});
    let proxy = FrontProxy::new(backend.port(), bad.to_string());
    let (status, log) = Envoy::start_expecting_failure(&proxy, 1);
    assert!(!status.success(), "Envoy accepted an invalid configuration");
    assert!(
        log.contains("invalid configuration: endpoints./predict.capacity: must be a positive integer, got -3"),
        "log does not name the problem:\n{log}"
    );
}

/// The filter logs at Envoy's level for its wasm logger, so debug lines
/// show with `--component-log-level wasm:debug` (or `-l debug`).
#[test]
fn filter_debug_lines_show_at_envoys_debug_level() {
    let backend = Backend::start(&["/predict"]);
    let proxy = FrontProxy::new(backend.port(), plugin_config(1, 1.0, 10).to_string());
    let mut opts = proxy.envoy_options(1);
    opts.component_log_level = Some("wasm:debug".to_string());
    let envoy = Envoy::start_with(opts);
    // A worker takes its index (and logs it) at its first tick, or at its
    // first watched request if that comes first.
    let res = envoy.request("GET", "/predict").send().unwrap();
    assert_eq!(res.status, 200);
    envoy.wait_for_log("is woken through sluice:wake:", Duration::from_secs(10));
}

/// A queued request's body arrives while it waits; Envoy asks the filter
/// about each body chunk, and a "continue" there would let it skip the queue.
#[test]
fn requests_with_bodies_wait_their_turn() {
    let backend = Backend::start(&["/predict:service_ms=80"]);
    let envoy = start(&backend, &plugin_config(2, 30.0, 1000), 2);
    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 12);
    burst.method = "POST".into();
    burst.body = format!("{{\"input\": \"{}\"}}", "x".repeat(64 * 1024)).into();
    burst.spacing = Duration::from_millis(1);
    let outcomes = run_blocking(&burst);
    assert_eq!(count(&outcomes, 200), 12, "{:?}", summarize(&outcomes));
    let seen = path_stats(&backend, "/predict");
    assert_eq!(
        seen["max_in_flight"], 2,
        "queued POSTs reached the backend early: {seen}"
    );
    let arrivals: Vec<String> = seen["arrivals"]
        .as_array()
        .expect("arrivals")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(arrivals.len(), 12);
    assert_drains_to_zero(&envoy);
}
