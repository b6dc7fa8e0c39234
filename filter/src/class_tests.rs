//! Request classes and deadlines through the whole filter (fake host):
//! the order slots go in across workers, shedding, push-out and the
//! replies each gets, per-class queue timeouts and a request's own deadline.

use crate::admin::STATS_PATH;
use crate::fake_host::{take_problems, FakeEnvoy, FakeStream, FakeWorker};
use proxy_wasm::types::Action;
use serde_json::{json, Value};
use std::time::Duration;

const PATH: &str = "/predict";
const KEY: &str = "sluice:t:ep:/predict";

fn config(max_queue: u32) -> Value {
    json!({
        "service": "t",
        "classes": {
            "interactive": {"priority": 10, "queue_timeout": 0.2},
            "default": {"priority": 5},
            "batch": {"priority": 0, "max_queue": 3},
            "background": {"sheddable": true},
        },
        "deadline_header": "x-deadline-ms",
        "endpoints": {PATH: {"capacity": 1, "queue_timeout": 5, "max_queue": max_queue}},
    })
}

fn send(w: &FakeWorker, class: Option<&str>) -> FakeStream {
    match class {
        Some(c) => w.request_with("POST", PATH, &[("x-sluice-class", c)]),
        None => w.request("POST", PATH),
    }
}

fn assert_quiet() {
    let problems = take_problems();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Completes `holder`, then delivers wake-ups until one of `waiting` is
/// resumed; returns its index.
fn next_served(holder: &mut FakeStream, workers: &[&FakeWorker], waiting: &[FakeStream]) -> usize {
    let before: Vec<u32> = waiting.iter().map(FakeStream::resumes).collect();
    holder.complete();
    for w in workers {
        w.deliver_wake_ups();
    }
    let served: Vec<usize> = (0..waiting.len())
        .filter(|&i| waiting[i].resumes() > before[i])
        .collect();
    assert_eq!(served.len(), 1, "exactly one resumed: {served:?}");
    served[0]
}

#[test]
fn the_highest_class_goes_first_across_workers_fifo_within_one() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &config(100));
    let w2 = FakeWorker::start(&envoy, &config(100));
    let mut holder = send(&w1, None);
    assert_eq!(holder.action, Action::Continue);
    // Arrival order: batch, default, interactive, batch, interactive,
    // unknown class (the default's), split over two workers.
    let waiting = vec![
        send(&w1, Some("batch")),
        send(&w2, None),
        send(&w1, Some("interactive")),
        send(&w2, Some("batch")),
        send(&w2, Some("interactive")),
        send(&w1, Some("no-such-class")),
    ];
    assert!(waiting.iter().all(FakeStream::is_waiting));
    let stats = w1.request("GET", STATS_PATH).reply().json();
    let classes = &stats["endpoints"][PATH]["classes"];
    assert_eq!(classes["batch"]["queued"], 2);
    assert_eq!(classes["interactive"]["queued"], 2);
    assert_eq!(classes["default"]["queued"], 2);
    let mut names = vec![
        "batch-0",
        "default-1",
        "interactive-2",
        "batch-3",
        "interactive-4",
        "unknown-5",
    ];
    let mut waiting = waiting;
    let mut order = Vec::new();
    while !waiting.is_empty() {
        let i = next_served(&mut holder, &[&w1, &w2], &waiting);
        order.push(names.remove(i));
        holder = waiting.remove(i);
    }
    assert_eq!(
        order,
        [
            "interactive-2",
            "interactive-4",
            "default-1",
            "unknown-5",
            "batch-0",
            "batch-3"
        ]
    );
    holder.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn sheddable_requests_are_refused_at_once_when_no_slot_is_free() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(100));
    let mut a = send(&w, Some("background"));
    assert_eq!(a.action, Action::Continue, "a free slot: admitted");
    let shed = send(&w, Some("background"));
    let reply = shed.reply();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-sluice-reason"), Some("shed"));
    assert_eq!(
        reply.json()["detail"],
        "no free slot for a sheddable request"
    );
    assert_eq!(envoy.record(KEY).waiters.len(), 0);
    a.complete();
    w.tick();
    assert_eq!(
        envoy.metric("sluice.t./predict.#background.shed.outcomes_total"),
        1
    );
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_full_queue_pushes_the_lowest_class_out_for_a_higher_one() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &config(2));
    let w2 = FakeWorker::start(&envoy, &config(2));
    let mut holder = send(&w1, None);
    let mut batch_old = send(&w2, Some("batch"));
    let mut batch_new = send(&w2, Some("batch"));
    // Full: another batch request is refused as queue-full.
    let full = send(&w1, Some("batch"));
    assert_eq!(full.reply().header("x-sluice-reason"), Some("queue-full"));
    // An interactive one pushes the newest batch one out; its worker
    // answers it.
    let mut high = send(&w1, Some("interactive"));
    assert!(high.is_waiting());
    assert!(w2.deliver_wake_ups());
    let out = batch_new.reply();
    assert_eq!(out.status, 503);
    assert_eq!(out.header("x-sluice-reason"), Some("pushed-out"));
    assert_eq!(batch_new.resumes(), 0);
    batch_new.reset();
    assert!(batch_old.is_waiting());
    holder.complete();
    w1.deliver_wake_ups();
    assert_eq!(high.resumes(), 1, "the higher class is served first");
    high.complete();
    w2.deliver_wake_ups();
    assert_eq!(batch_old.resumes(), 1);
    batch_old.complete();
    w1.tick();
    w2.tick();
    assert_eq!(
        envoy.metric("sluice.t./predict.#batch.pushed_out.outcomes_total"),
        1
    );
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_class_queue_timeout_and_a_requests_own_deadline_cut_the_wait_short() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(100));
    let mut holder = send(&w, None);
    // interactive: 0.2 s instead of the endpoint's 5 s.
    let mut fast = send(&w, Some("interactive"));
    // Its own deadline: 50 ms from the configured header, and Envoy's.
    let mut own = w.request_with("POST", PATH, &[("x-deadline-ms", "50")]);
    let mut envoys = w.request_with("POST", PATH, &[("x-envoy-expected-rq-timeout-ms", "120")]);
    let mut slow = send(&w, None);
    envoy.advance(Duration::from_millis(60));
    w.tick();
    let r = own.reply();
    assert_eq!(
        (r.status, r.header("x-sluice-reason")),
        (504, Some("deadline"))
    );
    assert!(fast.is_waiting() && envoys.is_waiting());
    envoy.advance(Duration::from_millis(70));
    w.tick();
    assert_eq!(envoys.reply().header("x-sluice-reason"), Some("deadline"));
    envoy.advance(Duration::from_millis(80));
    w.tick();
    let r = fast.reply();
    assert_eq!(
        (r.status, r.header("x-sluice-reason")),
        (504, Some("queue-timeout"))
    );
    assert!(slow.is_waiting(), "the default class waits its 5 s");
    for s in [&mut own, &mut envoys, &mut fast] {
        s.reset();
    }
    holder.complete();
    w.deliver_wake_ups();
    assert_eq!(slow.resumes(), 1);
    slow.complete();
    w.tick();
    assert_eq!(
        envoy.metric("sluice.t./predict.#default.deadline.outcomes_total"),
        2
    );
    assert_eq!(
        envoy.metric("sluice.t./predict.#interactive.queue_timeout.outcomes_total"),
        1
    );
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn tenants_take_turns_within_a_class_and_the_stats_show_the_busiest_flows() {
    let envoy = FakeEnvoy::new();
    let cfg = json!({
        "service": "t",
        "tenants": {"header": "x-tenant", "flows": 16},
        "endpoints": {PATH: {"capacity": 1, "queue_timeout": 5, "max_queue": 100}},
    });
    let w = FakeWorker::start(&envoy, &cfg);
    let tenant = |t: &str| w.request_with("POST", PATH, &[("x-tenant", t)]);
    let mut holder = tenant("a");
    let mut waiting: Vec<(String, FakeStream)> =
        (0..10).map(|i| (format!("a{i}"), tenant("a"))).collect();
    waiting.extend((0..3).map(|i| (format!("b{i}"), tenant("b"))));
    let stats = w.request("GET", STATS_PATH).reply().json();
    let busiest = &stats["endpoints"][PATH]["tenants"]["busiest_flows"];
    assert_eq!(busiest[0]["queued"], 10, "{stats}");
    assert_eq!(busiest[1]["queued"], 3, "{stats}");
    let mut order = Vec::new();
    for _ in 0..6 {
        holder.complete();
        w.deliver_wake_ups();
        let i = waiting
            .iter()
            .position(|(_, s)| s.resumes() == 1)
            .expect("one resumed");
        let (name, s) = waiting.remove(i);
        order.push(name);
        holder = s;
    }
    // b's three take every other slot instead of waiting behind a's ten;
    // b goes first, since a already had the slot that was running.
    assert_eq!(order, ["b0", "a0", "b1", "a1", "b2", "a2"]);
    holder.complete();
    for (_, s) in &mut waiting {
        w.deliver_wake_ups();
        s.complete();
    }
    w.deliver_wake_ups();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_deadline_the_queue_cannot_meet_is_refused_at_once() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(100));
    // The endpoint's requests take 300 ms.
    for _ in 0..3 {
        let mut a = send(&w, None);
        envoy.advance(Duration::from_millis(300));
        a.complete();
    }
    let mut holder = send(&w, None);
    let mut ahead: Vec<FakeStream> = (0..3).map(|_| send(&w, None)).collect();
    // 3 ahead, 1 slot: at least 3 more turns of 300 ms before its slot.
    let hopeless = w.request_with("POST", PATH, &[("x-deadline-ms", "500")]);
    let r = hopeless.reply();
    assert_eq!(
        (r.status, r.header("x-sluice-reason")),
        (504, Some("deadline"))
    );
    assert_eq!(envoy.record(KEY).queued(), 3, "it left the queue");
    let mut reachable = w.request_with("POST", PATH, &[("x-deadline-ms", "1500")]);
    assert!(
        reachable.is_waiting(),
        "900 ms at least, 1500 ms given: it waits"
    );
    reachable.reset();
    holder.complete();
    for s in &mut ahead {
        w.deliver_wake_ups();
        s.complete();
    }
    w.tick();
    assert_eq!(
        envoy.metric("sluice.t./predict.#default.deadline.outcomes_total"),
        1
    );
    envoy.assert_neutral(KEY);
    assert_quiet();
}
