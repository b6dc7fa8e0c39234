//! Cost per request through the real Envoy (1.40, `--concurrency 4`): an
//! endpoint whose capacity counts MB of body (`cost.unit_bytes`), 25 MB
//! uploads and 1 KB requests mixed. The backend traces what it really runs
//! (arrival and departure by `x-request-id`), and each request's id names
//! its cost, so the units in flight over time are the backend's word: they
//! never exceed the capacity. A small request of another tenant does not
//! wait behind a queue of big ones. A request costing more than the whole
//! capacity runs alone, or where configured is refused `413 too-costly`
//! without reaching the backend. The filter reads the cost from the
//! `content-length` header: Envoy never buffers a whole body for it (a
//! paused request's body waits under Envoy's flow control).

use serde_json::{json, Value};
use sluice_harness::http::{HttpResponse, Request};
use sluice_harness::{wait_until, Backend, Envoy, FrontProxy, TracedRequest};
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PATH: &str = "/upload";
/// Refuses what costs more than its capacity (`over_capacity: refuse`).
const STRICT: &str = "/strict";
const MB: usize = 1_000_000;
/// Units of 1 MB: two 25 MB uploads at once, with room for small ones.
const CAPACITY: u64 = 52;
const BIG_MB: usize = 25;

fn start() -> (Backend, Envoy) {
    // No limit of its own: the trace shows what Sluice lets in. Each MB of
    // body adds 8 ms of service (a 25 MB upload: about 230 ms).
    let backend = Backend::start_with_args(&[
        "--trace",
        "--route",
        &format!("{PATH}:service_ms=30,ms_per_mb=8"),
        "--route",
        &format!("{STRICT}:service_ms=1"),
    ]);
    let config = json!({
        "service": "cost",
        "abandon_hold": 0,
        "tenants": {"header": "x-tenant"},
        "endpoints": {PATH: {
            "capacity": CAPACITY, "queue_timeout": 60, "max_queue": 1000,
            "cost": {"unit_bytes": MB, "header": "x-cost"},
        },
        STRICT: {"capacity": CAPACITY, "cost": {"header": "x-cost", "over_capacity": "refuse"}},
        },
    });
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 4);
    (backend, envoy)
}

/// The endpoint's stats, read up to their content-length.
fn stats(envoy: &Envoy) -> Value {
    let mut conn = std::net::TcpStream::connect(envoy.listener_addr()).unwrap();
    sluice_harness::http::keep_alive_get(&mut conn, "/balancer/stats").json()["endpoints"][PATH]
        .clone()
}

/// An upload of `bytes` in its own thread (its own connection, so Envoy
/// spreads them over its workers); its id ends with its cost in units.
fn upload(addr: SocketAddr, tenant: &str, n: usize, bytes: usize) -> JoinHandle<HttpResponse> {
    let id = format!("{tenant}-{n}-{}", bytes.div_ceil(MB));
    let r = Request::new("POST", addr, PATH)
        .header("x-request-id", &id)
        .header("x-tenant", tenant)
        .body(vec![b'x'; bytes])
        .timeout(Duration::from_secs(60));
    std::thread::spawn(move || r.send().expect("a response"))
}

fn cost_of(r: &TracedRequest) -> u64 {
    r.id.rsplit('-').next().unwrap().parse().unwrap()
}

/// The most units the backend held at once: each request's cost from its
/// arrival to its departure.
fn most_units(trace: &[TracedRequest]) -> u64 {
    // At equal times departures sort first.
    let mut events: Vec<(u64, i64)> = trace
        .iter()
        .flat_map(|r| {
            let c = cost_of(r) as i64;
            [(r.arrived_us, c), (r.departed_us, -c)]
        })
        .collect();
    events.sort_unstable_by_key(|&(t, d)| (t, d));
    let (mut inside, mut most) = (0i64, 0i64);
    for (_, d) in events {
        inside += d;
        most = most.max(inside);
    }
    most as u64
}

fn waited_ms(r: &HttpResponse) -> u64 {
    r.header("x-sluice-wait-ms")
        .map_or(0, |v| v.parse().unwrap())
}

#[test]
fn the_backend_never_holds_more_units_than_the_capacity() {
    let (backend, envoy) = start();
    let addr = envoy.listener_addr();
    let mut handles = Vec::new();
    for i in 0..6 {
        handles.push(upload(addr, "a", i, BIG_MB * MB));
        handles.push(upload(addr, "a", 100 + i, 10 * MB));
        handles.push(upload(addr, "a", 200 + i, 1000));
        handles.push(upload(addr, "a", 300 + i, 1000));
    }
    let mut peak_stats = 0;
    let started = Instant::now();
    while handles.iter().any(|h| !h.is_finished()) && started.elapsed() < Duration::from_secs(60) {
        let units = stats(&envoy)["cost"]["units_in_flight"].as_u64().unwrap();
        assert!(units <= CAPACITY, "the record holds {units} units");
        peak_stats = peak_stats.max(units);
        std::thread::sleep(Duration::from_millis(20));
    }
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let trace = backend.trace(PATH);
    assert_eq!(trace.len(), 24);
    let most = most_units(&trace);
    println!(
        "units the backend held at once: at most {most} of {CAPACITY} (stats peak {peak_stats}); {} requests at once",
        sluice_harness::most_at_once(&trace)
    );
    assert!(most <= CAPACITY, "the backend held {most} units");
    // Not one at a time: two big ones (50 units) or a big one and smaller
    // ones ran together.
    assert!(most > 25 + 10, "at most {most} units at once: no overlap");
    let s = stats(&envoy);
    assert_eq!(s["cost"]["units_in_flight"], 0, "{s}");
}

#[test]
fn a_small_request_of_another_tenant_does_not_wait_behind_big_ones() {
    let (backend, envoy) = start();
    let addr = envoy.listener_addr();
    let flood: Vec<_> = (0..10).map(|i| upload(addr, "a", i, BIG_MB * MB)).collect();
    wait_until(Duration::from_secs(30), "tenant a's uploads queued", || {
        (stats(&envoy)["cost"]["queued_units"].as_u64() >= Some(6 * 25)).then_some(())
    });
    let sent_us = wall_us();
    let small = upload(addr, "b", 0, 1000).join().unwrap();
    assert_eq!(small.status, 200, "{}", small.text());
    let queued_then = stats(&envoy)["cost"]["queued_units"].as_u64().unwrap();
    for h in flood {
        assert_eq!(h.join().unwrap().status, 200);
    }
    let trace = backend.trace(PATH);
    let b = trace.iter().find(|r| r.id.starts_with("b-")).unwrap();
    // a's uploads the backend took between b's sending and b's arrival: the
    // slot freed next goes to b; one more may have been granted just then.
    let overtaking: Vec<&str> = trace
        .iter()
        .filter(|r| r.id.starts_with("a-") && r.arrived_us > sent_us && r.arrived_us < b.arrived_us)
        .map(|r| r.id.as_str())
        .collect();
    println!(
        "tenant b's 1 KB request waited {} ms (x-sluice-wait-ms; a 25 MB upload is served in about 230 ms) with {queued_then} units of a's still queued after it; a's uploads that reached the backend first: {overtaking:?}",
        waited_ms(&small)
    );
    assert!(queued_then >= 25, "a's queue drained too soon to tell");
    assert!(overtaking.len() <= 1, "{overtaking:?}");
    // At most about one big upload's service (the next release), far from
    // the several seconds of a's queue ahead of it in a FIFO.
    assert!(waited_ms(&small) < 1500, "{} ms", waited_ms(&small));
    assert!(most_units(&trace) <= CAPACITY);
}

fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[test]
fn a_request_costing_more_than_the_capacity_runs_alone_or_is_refused() {
    let (backend, envoy) = start();
    let addr = envoy.listener_addr();
    // 60 units (by its cost header) among small ones: it runs alone.
    let mut handles: Vec<_> = (0..4).map(|i| upload(addr, "a", i, 1000)).collect();
    let big = Request::new("POST", addr, PATH)
        .header("x-request-id", "big-60")
        .header("x-tenant", "a")
        .header("x-cost", "60")
        .header("x-service-ms", "300");
    handles.push(std::thread::spawn(move || big.send().expect("a response")));
    handles.extend((4..12).map(|i| upload(addr, "a", i, 1000)));
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let trace = backend.trace(PATH);
    assert_eq!(trace.len(), 13);
    let big = trace.iter().find(|r| r.id == "big-60").unwrap();
    let beside: Vec<&str> = trace
        .iter()
        .filter(|r| {
            r.id != big.id && r.arrived_us < big.departed_us && r.departed_us > big.arrived_us
        })
        .map(|r| r.id.as_str())
        .collect();
    assert!(
        beside.is_empty(),
        "ran beside the 60-unit request: {beside:?}"
    );

    // Refused at once where over_capacity is refuse; the backend never sees it.
    let refused = Request::new("POST", addr, STRICT)
        .header("x-cost", &(CAPACITY + 1).to_string())
        .send()
        .unwrap();
    assert_eq!(refused.status, 413, "{}", refused.text());
    assert_eq!(refused.header("x-sluice-reason"), Some("too-costly"));
    let body = refused.json();
    assert_eq!(body["cost"], CAPACITY + 1);
    assert_eq!(body["capacity"], CAPACITY);
    let whole = Request::new("POST", addr, STRICT)
        .header("x-cost", &CAPACITY.to_string())
        .send()
        .unwrap();
    assert_eq!(
        whole.status, 200,
        "the whole capacity is no reason to refuse"
    );
    assert_eq!(backend.trace(STRICT).len(), 1);
}
