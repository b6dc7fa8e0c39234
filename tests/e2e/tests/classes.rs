//! Request classes through the real Envoy (1.40, `--concurrency 4`): a
//! backend that records the order requests really arrive in (its trace,
//! by `x-request-id`), so "served first" is the backend's word, not the
//! client's. Priority across workers, sheddable requests, push-out of a
//! full queue, and a request's own deadline.

use serde_json::{json, Value};
use sluice_harness::http::{HttpResponse, Request};
use sluice_harness::{wait_until, Backend, Envoy, FrontProxy};
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PATH: &str = "/predict";

fn start(max_queue: u32) -> (Backend, Envoy) {
    let backend = Backend::start_with_args(&[
        "--trace",
        "--route",
        &format!("{PATH}:capacity=1000,service_ms=20"),
    ]);
    let config = json!({
        "service": "classes",
        "abandon_hold": 0,
        "classes": {
            "interactive": {"priority": 10},
            "default": {"priority": 5},
            "batch": {"priority": 0},
            "background": {"sheddable": true},
        },
        "deadline_header": "x-deadline-ms",
        "endpoints": {PATH: {"capacity": 1, "queue_timeout": 20, "max_queue": max_queue}},
    });
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 4);
    (backend, envoy)
}

/// The endpoint's stats, read up to their content-length (Envoy holds a
/// local reply's connection for its 1 s delayed close: reading to the end
/// would make every poll a second long).
fn stats(envoy: &Envoy) -> Value {
    let mut conn = std::net::TcpStream::connect(envoy.listener_addr()).unwrap();
    sluice_harness::http::keep_alive_get(&mut conn, "/balancer/stats").json()["endpoints"][PATH]
        .clone()
}

/// A request in its own thread (its own connection, so Envoy spreads them
/// over its workers), with its id and class.
fn send(addr: SocketAddr, id: &str, headers: &[(&str, &str)]) -> JoinHandle<HttpResponse> {
    let mut r = Request::new("POST", addr, PATH).header("x-request-id", id);
    for (k, v) in headers {
        r = r.header(k, v);
    }
    std::thread::spawn(move || r.send().expect("a response"))
}

fn queued_in(envoy: &Envoy, class: &str) -> u64 {
    stats(envoy)["classes"][class]["queued"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn high_priority_requests_reach_the_backend_before_every_waiting_low_one() {
    let (backend, envoy) = start(1000);
    let addr = envoy.listener_addr();
    let class = |c: &'static str| [("x-sluice-class", c)];
    let lows: Vec<_> = (0..50)
        .map(|i| send(addr, &format!("low-{i}"), &class("batch")))
        .collect();
    wait_until(
        Duration::from_secs(10),
        "most of 50 low ones to queue",
        || (queued_in(&envoy, "batch") >= 40).then_some(()),
    );
    let highs: Vec<_> = (0..5)
        .map(|i| send(addr, &format!("high-{i}"), &class("interactive")))
        .collect();
    wait_until(
        Duration::from_secs(10),
        "the 5 high ones to queue or run",
        || {
            let t = backend.trace(PATH);
            let high_seen = t.iter().filter(|r| r.id.starts_with("high-")).count() as u64;
            (queued_in(&envoy, "interactive") + high_seen == 5).then_some(())
        },
    );
    // Every low one the backend had not seen by now was waiting behind the
    // high ones.
    let seen_before: Vec<String> = backend.trace(PATH).into_iter().map(|r| r.id).collect();
    for h in lows.into_iter().chain(highs) {
        assert_eq!(h.join().unwrap().status, 200);
    }
    let trace = backend.trace(PATH);
    assert_eq!(trace.len(), 55);
    let mut by_arrival = trace.clone();
    by_arrival.sort_by_key(|r| r.arrived_us);
    let order: Vec<&str> = by_arrival.iter().map(|r| r.id.as_str()).collect();
    let first_high = order.iter().position(|id| id.starts_with("high-")).unwrap();
    let last_high = order
        .iter()
        .rposition(|id| id.starts_with("high-"))
        .unwrap();
    println!(
        "arrival order at the backend: {first_high} low ones before the first high, the 5 high ones at {first_high}..={last_high}"
    );
    // The 5 high ones one after the other: no low one between them.
    assert_eq!(last_high - first_high, 4, "{order:?}");
    // Before them, only low ones the backend had seen when the high ones
    // were queued, and at most one more: the one slot (capacity 1) may
    // have been granted to a low one just then, on its way to the backend.
    let unseen_before: Vec<&&str> = order[..first_high]
        .iter()
        .filter(|id| !seen_before.iter().any(|s| s == **id))
        .collect();
    assert!(
        unseen_before.len() <= 1,
        "low requests still waiting reached the backend before the high ones: {unseen_before:?}\n{order:?}"
    );
    // Within a class, FIFO: the low ones in the order they queued cannot be
    // checked from here (threads race to connect), but the high ones came
    // after the lows admitted before them, and at most 1 (the capacity) ran
    // at once.
    assert_eq!(sluice_harness::most_at_once(&trace), 1);
}

#[test]
fn sheddable_refused_at_once_while_saturated_and_lower_classes_pushed_out() {
    let (backend, envoy) = start(3);
    let addr = envoy.listener_addr();
    // Idle: a sheddable request is admitted.
    let idle = send(addr, "shed-idle", &[("x-sluice-class", "background")])
        .join()
        .unwrap();
    assert_eq!(idle.status, 200, "{idle:?}");
    // Saturated: one runs, three batch ones wait (the queue is full).
    let mut running = vec![send(
        addr,
        "hold",
        &[("x-sluice-class", "default"), ("x-service-ms", "2000")],
    )];
    wait_until(Duration::from_secs(5), "the one slot taken", || {
        (stats(&envoy)["active_requests"] == 1).then_some(())
    });
    for i in 0..3 {
        running.push(send(
            addr,
            &format!("batch-{i}"),
            &[("x-sluice-class", "batch")],
        ));
    }
    wait_until(Duration::from_secs(5), "three batch ones waiting", || {
        (queued_in(&envoy, "batch") == 3).then_some(())
    });
    let t = Instant::now();
    let shed = send(addr, "shed-busy", &[("x-sluice-class", "background")])
        .join()
        .unwrap();
    let shed_took = t.elapsed();
    assert_eq!(shed.status, 503, "{shed:?}");
    assert_eq!(shed.header("x-sluice-reason"), Some("shed"));
    // At once: not after a wait for a slot (the holder runs 2 s).
    assert!(shed_took < Duration::from_millis(500), "{shed_took:?}");
    // A full queue: a batch one more is refused, an interactive one pushes
    // the newest batch one out.
    let full = send(addr, "batch-full", &[("x-sluice-class", "batch")])
        .join()
        .unwrap();
    assert_eq!(full.header("x-sluice-reason"), Some("queue-full"));
    let high = send(addr, "high", &[("x-sluice-class", "interactive")]);
    let results: Vec<HttpResponse> = running.into_iter().map(|h| h.join().unwrap()).collect();
    let high = high.join().unwrap();
    assert_eq!(high.status, 200);
    let pushed: Vec<&HttpResponse> = results
        .iter()
        .filter(|r| r.header("x-sluice-reason") == Some("pushed-out"))
        .collect();
    assert_eq!(pushed.len(), 1, "{results:?}");
    assert_eq!(pushed[0].status, 503);
    let ids: Vec<String> = backend.trace(PATH).into_iter().map(|r| r.id).collect();
    for never in ["shed-busy", "batch-full"] {
        assert!(
            !ids.iter().any(|i| i == never),
            "{never} reached the backend"
        );
    }
    assert_eq!(ids.len(), 1 + 1 + 2 + 1, "{ids:?}");
}

#[test]
fn a_requests_own_deadline_ends_its_wait_and_it_never_reaches_the_backend() {
    let (backend, envoy) = start(100);
    let addr = envoy.listener_addr();
    // Hold the slot long enough: a slow request on the same endpoint.
    let hold = std::thread::spawn(move || {
        Request::new("POST", addr, PATH)
            .header("x-request-id", "hold")
            .header("x-service-ms", "3000")
            .send()
            .unwrap()
    });
    wait_until(Duration::from_secs(5), "the slot taken", || {
        (stats(&envoy)["active_requests"] == 1).then_some(())
    });
    // (Envoy's x-envoy-expected-rq-timeout-ms is read too, but Envoy
    // removes x-envoy-* headers from a request it takes as external, as
    // this loopback client's is: the filter's own tests cover it.)
    // Whatever its class: a high one waits no longer past its deadline.
    for (id, class) in [("own", "batch"), ("own-interactive", "interactive")] {
        let t = Instant::now();
        let r = send(
            addr,
            id,
            &[("x-deadline-ms", "300"), ("x-sluice-class", class)],
        )
        .join()
        .unwrap();
        let took = t.elapsed();
        assert_eq!(r.status, 504, "{id}: {r:?} {}", r.text());
        assert_eq!(r.header("x-sluice-reason"), Some("deadline"));
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(600),
            "{id}: {took:?}"
        );
    }
    assert_eq!(hold.join().unwrap().status, 200);
    let ids: Vec<String> = backend.trace(PATH).into_iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        vec!["hold".to_string()],
        "an expired one reached the backend"
    );
}

fn start_tenants() -> (Backend, Envoy) {
    let backend = Backend::start_with_args(&[
        "--trace",
        "--route",
        &format!("{PATH}:capacity=1000,service_ms=20"),
    ]);
    let config = json!({
        "service": "tenants",
        "abandon_hold": 0,
        "tenants": {"header": "x-tenant", "weights": {"heavy": 3}},
        "endpoints": {PATH: {"capacity": 2, "queue_timeout": 30, "max_queue": 1000}},
    });
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 4);
    (backend, envoy)
}

fn waited_ms(r: &HttpResponse) -> u64 {
    r.header("x-sluice-wait-ms")
        .map_or(0, |v| v.parse().unwrap())
}

#[test]
fn a_tenant_behind_another_ones_flood_waits_about_two_service_times() {
    let (_backend, envoy) = start_tenants();
    let addr = envoy.listener_addr();
    let flood: Vec<_> = (0..200)
        .map(|i| send(addr, &format!("a-{i}"), &[("x-tenant", "a")]))
        .collect();
    wait_until(Duration::from_secs(10), "tenant a's flood queued", || {
        (stats(&envoy)["queued"].as_u64() >= Some(150)).then_some(())
    });
    // b's requests one after another, while a's queue is still long: each
    // takes the next turn, not the back of the queue (about 4 s of a's).
    let b_waits: Vec<u64> = (0..5)
        .map(|i| {
            let r = send(addr, &format!("b-{i}"), &[("x-tenant", "b")])
                .join()
                .unwrap();
            assert_eq!(r.status, 200, "{r:?}");
            waited_ms(&r)
        })
        .collect();
    let still_queued = stats(&envoy)["queued"].as_u64().unwrap();
    let a_waits: Vec<u64> = flood
        .into_iter()
        .map(|h| waited_ms(&h.join().unwrap()))
        .collect();
    println!(
        "tenant b waited {b_waits:?} ms (Envoy's x-sluice-wait-ms; service 20 ms, 2 slots) behind a queue of a's that still held {still_queued}; a's longest wait {} ms",
        a_waits.iter().max().unwrap()
    );
    assert!(still_queued > 50, "a's queue drained too soon to tell");
    // About two service times: the slot after the one running, on either
    // of the two slots; 60 ms leaves Envoy's timer and this machine a
    // margin, against the seconds a FIFO would make it wait.
    assert!(b_waits.iter().all(|&w| w <= 60), "{b_waits:?}");
}

#[test]
fn weights_three_to_one_get_about_three_to_one_of_the_slots() {
    let (backend, envoy) = start_tenants();
    let addr = envoy.listener_addr();
    let mut handles = Vec::new();
    for i in 0..100 {
        handles.push(send(addr, &format!("heavy-{i}"), &[("x-tenant", "heavy")]));
        handles.push(send(addr, &format!("light-{i}"), &[("x-tenant", "light")]));
    }
    wait_until(Duration::from_secs(10), "both tenants queued", || {
        (stats(&envoy)["queued"].as_u64() >= Some(180)).then_some(())
    });
    let queued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    for h in handles {
        assert_eq!(h.join().unwrap().status, 200);
    }
    // The slots handed out while both still had requests waiting: the
    // first 100 arrivals after both had queued.
    let mut trace = backend.trace(PATH);
    trace.retain(|r| r.arrived_us > queued_at);
    trace.sort_by_key(|r| r.arrived_us);
    let window = &trace[..100];
    let heavy = window.iter().filter(|r| r.id.starts_with("heavy-")).count();
    println!(
        "weights 3:1: heavy got {heavy} of 100 slots, light {}",
        100 - heavy
    );
    assert!((68..=82).contains(&heavy), "heavy got {heavy} of 100");
}

/// `Retry-After` from the measured drain: a client refused by a full
/// queue is told how long the requests ahead take to drain through the
/// slots; the advice is compared with when the queue really emptied (the
/// backend's own clock), and a retry at that time is admitted.
#[test]
fn retry_after_follows_the_measured_drain_of_the_queue() {
    let backend = Backend::start_with_args(&[
        "--trace",
        "--route",
        &format!("{PATH}:capacity=1000,service_ms=200"),
    ]);
    let config = json!({
        "service": "retry",
        "endpoints": {PATH: {"capacity": 2, "queue_timeout": 30, "max_queue": 10}},
    });
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 4);
    let addr = envoy.listener_addr();
    // Durations measured on every worker: 16 requests, two at a time.
    for round in 0..8 {
        let pair: Vec<_> = (0..2)
            .map(|i| send(addr, &format!("warm-{round}-{i}"), &[]))
            .collect();
        for h in pair {
            assert_eq!(h.join().unwrap().status, 200);
        }
    }
    let waiting: Vec<_> = (0..12)
        .map(|i| send(addr, &format!("q-{i}"), &[]))
        .collect();
    wait_until(Duration::from_secs(5), "10 waiting", || {
        (stats(&envoy)["queued"] == 10).then_some(())
    });
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    let refused_at = now_us();
    let full = send(addr, "refused", &[]).join().unwrap();
    assert_eq!(full.status, 503, "{full:?}");
    let advice_ms = full.json()["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms");
    let header: u64 = full.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(
        header,
        advice_ms.div_ceil(1000),
        "Retry-After rounds the advice up"
    );
    std::thread::sleep(Duration::from_millis(advice_ms));
    let retry = send(addr, "retry", &[]).join().unwrap();
    for h in waiting {
        assert_eq!(h.join().unwrap().status, 200);
    }
    // When the last of those ahead got its slot: a request at the back of
    // the queue would have been admitted then.
    let trace = backend.trace(PATH);
    let last_ahead = trace
        .iter()
        .filter(|r| r.id.starts_with("q-"))
        .map(|r| r.arrived_us)
        .max()
        .unwrap();
    let real_ms = (last_ahead.saturating_sub(refused_at)) / 1000;
    println!(
        "Retry-After: advised {advice_ms} ms (header {header} s); the queue ahead really drained in {real_ms} ms; the retry got {} after waiting {:?} ms",
        retry.status,
        retry.header("x-sluice-wait-ms")
    );
    assert!(
        advice_ms <= 2 * real_ms.max(1) && real_ms <= 2 * advice_ms,
        "advised {advice_ms} ms, drained in {real_ms} ms"
    );
    assert_eq!(
        retry.status, 200,
        "the retry at the advised time found room: {retry:?}"
    );
}
