//! Instances against the fake host: the filter steers each admitted request
//! to the instance it picked (the override header), resumes a waiter with
//! the instance a freed slot is on, ejects an instance Envoy could not
//! reach, corrects the books when Envoy sent a request elsewhere, and keeps
//! sticky sessions on their instance.

use crate::admin::STATS_PATH;
use crate::fake_host::{take_problems, FakeEnvoy, FakeStream, FakeWorker};
use proxy_wasm::types::Action;
use serde_json::{json, Value};
use std::time::Duration;

const PATH: &str = "/predict";
const KEY: &str = "sluice:t:ep:/predict";
const A: &str = "127.0.0.1:8001";
const B: &str = "127.0.0.1:8002";
const HEADER: &str = "x-sluice-host";

fn config(capacity: u32, extra: Value) -> Value {
    let mut instances = json!({"hosts": [A, B]});
    for (k, v) in extra.as_object().unwrap() {
        instances[k] = v.clone();
    }
    json!({"service": "t", "instances": instances, "endpoints": {
        PATH: {"capacity": capacity, "queue_timeout": 5, "max_queue": 10},
    }})
}

/// Slots in use per instance, in the record's order (A, B).
fn in_flight(envoy: &FakeEnvoy) -> Vec<u32> {
    envoy
        .record(KEY)
        .instances
        .iter()
        .map(|i| i.active)
        .collect()
}

fn steered(s: &FakeStream) -> String {
    s.request_header(HEADER).expect("steered")
}

/// The request goes to the instance it was steered to, and completes.
fn served(s: &mut FakeStream) {
    let on = steered(s);
    s.served_by(&on);
    s.complete();
}

fn stats(w: &FakeWorker) -> Value {
    let mut s = w.request("GET", STATS_PATH);
    let body = s.reply().json();
    s.reset();
    body["endpoints"][PATH].clone()
}

#[test]
fn each_request_is_steered_to_an_instance_with_room_and_waiters_follow_freed_slots() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, json!({})));
    // A client's own header never steers.
    let mut a = w.request_with("POST", PATH, &[(HEADER, "10.0.0.1:1")]);
    let mut b = w.request("POST", PATH);
    let (on_a, on_b) = (steered(&a), steered(&b));
    assert_ne!(on_a, on_b);
    assert!([A, B].contains(&on_a.as_str()) && [A, B].contains(&on_b.as_str()));
    assert_eq!(in_flight(&envoy), vec![1, 1]);
    let mut c = w.request("POST", PATH);
    assert_eq!(c.action, Action::Pause, "both instances full");
    assert_eq!(c.request_header(HEADER), None, "not steered while it waits");
    // b's instance frees up: c resumes, steered there.
    b.served_by(&on_b);
    b.complete();
    assert_eq!(c.resumes(), 1);
    assert_eq!(steered(&c), on_b);
    assert_eq!(in_flight(&envoy), vec![1, 1]);
    let st = stats(&w);
    assert_eq!(st["total_capacity"], 2);
    assert_eq!(st["instances_source"], "config");
    assert_eq!(st["instances"].as_array().unwrap().len(), 2);
    assert_eq!(st["instances"][0]["address"], A);
    assert_eq!(st["instances"][0]["in_flight"], 1);
    for s in [&mut a, &mut c] {
        served(s);
    }
    envoy.assert_neutral(KEY);
    assert_eq!(in_flight(&envoy), vec![0, 0]);
    assert!(take_problems().is_empty());
}

#[test]
fn an_instance_envoy_cannot_reach_is_ejected_and_its_slot_freed_at_once() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(2, json!({"eject_time": 2})));
    let mut first = w.request("POST", PATH);
    let dead = steered(&first);
    first.upstream_failed();
    let problems = take_problems();
    assert!(
        problems
            .iter()
            .any(|p| p.contains(&dead) && p.contains("failed")),
        "{problems:?}"
    );
    // Every request now goes to the other one, until it is full.
    let mut others: Vec<_> = (0..2).map(|_| w.request("POST", PATH)).collect();
    for s in &others {
        assert_ne!(steered(s), dead);
    }
    let mut waiting = w.request("POST", PATH);
    assert_eq!(waiting.action, Action::Pause, "the live one is full");
    let st = stats(&w);
    let dead_entry = st["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["address"] == dead.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (
            dead_entry["ejected"].clone(),
            dead_entry["in_flight"].clone()
        ),
        (json!(true), json!(0))
    );
    assert_eq!(st["total_capacity"], 2);
    // After its back-off the dead one gets one trial request.
    envoy.advance(Duration::from_secs(2));
    w.tick();
    assert_eq!(waiting.resumes(), 1);
    assert_eq!(steered(&waiting), dead);
    waiting.served_by(&dead);
    waiting.complete();
    for s in others.iter_mut() {
        served(s);
    }
    envoy.assert_neutral(KEY);
    assert!(take_problems().is_empty());
}

#[test]
fn a_pick_envoy_did_not_honour_is_counted_and_the_books_follow() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, json!({})));
    let mut a = w.request("POST", PATH);
    let picked = steered(&a);
    let other = if picked == A { B } else { A };
    // Envoy's fallback sent it to the other instance.
    a.served_by(other);
    a.respond_headers();
    let r = envoy.record(KEY);
    let count = |addr: &str| {
        r.instances
            .iter()
            .find(|i| i.address.to_string() == addr)
            .map(|i| (i.active, i.picks_missed))
            .unwrap()
    };
    assert_eq!((count(&picked), count(other)), ((0, 1), (1, 0)));
    a.finish_body();
    a.reset();
    envoy.assert_neutral(KEY);
    assert_eq!(in_flight(&envoy), vec![0, 0]);
    w.tick();
    assert_eq!(
        envoy.metric(&crate::metrics::metric_name(
            "t",
            PATH,
            "picks_missed_total"
        )),
        1
    );
    let problems = take_problems();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn sticky_sessions_wait_for_their_instance() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, json!({"sticky": {"cookie": "session"}})));
    let cookie = [("cookie", "theme=dark; session=user-7")];
    let mut a = w.request_with("POST", PATH, &cookie);
    let home = steered(&a);
    let mut again = w.request_with("POST", PATH, &cookie);
    assert_eq!(
        again.action,
        Action::Pause,
        "its instance is busy: it waits"
    );
    // Someone without a session goes to the free one meanwhile.
    let mut free = w.request("POST", PATH);
    assert_ne!(steered(&free), home);
    assert_eq!(again.resumes(), 0);
    a.served_by(&home);
    a.complete();
    assert_eq!(again.resumes(), 1);
    assert_eq!(steered(&again), home);
    for s in [&mut again, &mut free] {
        served(s);
    }
    envoy.assert_neutral(KEY);
    assert!(take_problems().is_empty());
}

#[test]
fn per_instance_gauges_follow_the_record() {
    let envoy = FakeEnvoy::new();
    let mut cfg = config(2, json!({}));
    cfg["endpoints"][PATH]["instance_capacity"] = json!({B: 5});
    let w = FakeWorker::start(&envoy, &cfg);
    let mut a = w.request("POST", PATH);
    w.tick();
    let gauge = |addr: &str, suffix: &str| {
        envoy.metric(&crate::metrics::instance_metric_name(
            "t", PATH, addr, suffix,
        ))
    };
    assert_eq!(gauge(A, "instance_capacity"), 2);
    assert_eq!(gauge(B, "instance_capacity"), 5);
    let on = steered(&a);
    assert_eq!(gauge(&on, "instance_in_flight"), 1);
    assert_eq!(gauge(&on, "instance_ejected"), 0);
    assert_eq!(
        envoy.metric(&crate::metrics::metric_name("t", PATH, "capacity")),
        7
    );
    a.served_by(&on);
    a.complete();
    // The leader sets the gauges on its tick, a base tick apart.
    envoy.advance(crate::worker::BASE_TICK * 2);
    w.tick();
    assert_eq!(gauge(&on, "instance_in_flight"), 0);
}
