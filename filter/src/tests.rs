//! The whole filter against the fake host: every way a request can end
//! releases what it holds exactly once and leaves the shared record neutral.
//!
//! A double release while another request holds a slot would lower `active`
//! below what the test expects; one with no slot in use is logged as an
//! error. So each test checks the record after every step, and that nothing
//! was logged at warn or above.

use crate::fake_host::{take_problems, FakeEnvoy, FakeStream, FakeWorker};
use crate::stream::STATS_PATH;
use crate::worker::{BASE_TICK, FAST_TICK};
use proxy_wasm::types::Action;
use serde_json::{json, Value};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

const PATH: &str = "/predict";
const KEY: &str = "sluice:t:ep:/predict";

fn config(capacity: u32, queue_timeout: f64, max_queue: u32) -> Value {
    config_for(PATH, capacity, queue_timeout, max_queue)
}

fn config_for(path: &str, capacity: u32, queue_timeout: f64, max_queue: u32) -> Value {
    json!({"service": "t", "endpoints": {
        path: {"capacity": capacity, "queue_timeout": queue_timeout, "max_queue": max_queue},
    }})
}

/// `(active, waiting, granted)` of the record.
fn counts(envoy: &FakeEnvoy) -> (u32, usize, usize) {
    let r = envoy.record(KEY);
    let granted = r.waiters.iter().filter(|w| w.granted).count();
    (r.active, r.waiters.len() - granted, granted)
}

fn admitted(w: &FakeWorker) -> FakeStream {
    let s = w.request("POST", PATH);
    assert_eq!(s.action, Action::Continue, "expected a free slot");
    s
}

fn queued(w: &FakeWorker) -> FakeStream {
    let s = w.request("POST", PATH);
    assert_eq!(s.action, Action::Pause, "expected to queue");
    assert!(s.is_waiting());
    s
}

fn assert_quiet() {
    let problems = take_problems();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn response_done_releases_once() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(2, 1.0, 10));
    let mut a = admitted(&w);
    assert_eq!(counts(&envoy), (1, 0, 0));
    a.respond();
    // Released when the upstream response is complete, before on_log.
    assert_eq!(counts(&envoy), (0, 0, 0));
    a.reset(); // on_log: nothing left to release
    envoy.assert_neutral(KEY);
    assert_eq!(a.response_header("x-sluice-wait-ms"), None);
    assert_quiet();
}

#[test]
fn reset_while_in_flight_releases_once() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(2, 1.0, 10));
    let mut a = admitted(&w);
    let mut b = admitted(&w);
    a.reset();
    assert_eq!(counts(&envoy), (1, 0, 0));
    b.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn reset_while_queued_leaves_the_queue_holding_nothing() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let mut a = admitted(&w);
    let mut b = queued(&w);
    assert_eq!(counts(&envoy), (1, 1, 0));
    b.reset();
    assert_eq!(counts(&envoy), (1, 0, 0));
    a.complete();
    envoy.assert_neutral(KEY);
    // Nobody left to hand the slot to: back to the base tick.
    w.tick();
    assert_eq!(w.host.tick_period(), BASE_TICK);
    assert_quiet();
}

#[test]
fn granted_slot_resumes_the_waiter_on_its_own_worker() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let w2 = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let mut a = admitted(&w1);
    let mut b = queued(&w2);
    assert_eq!(w2.host.tick_period(), FAST_TICK);
    envoy.advance(Duration::from_millis(7));
    a.complete();
    // Handed over, not freed: the slot stays counted for b.
    assert_eq!(counts(&envoy), (1, 0, 1));
    assert!(!w1.deliver_wake_ups(), "the wake-up goes to b's worker");
    assert!(w2.deliver_wake_ups());
    assert_eq!(b.resumes(), 1);
    assert_eq!(counts(&envoy), (1, 0, 0));
    b.complete();
    assert_eq!(b.response_header("x-sluice-wait-ms").as_deref(), Some("7"));
    envoy.assert_neutral(KEY);
    w2.tick();
    assert_eq!(w2.host.tick_period(), BASE_TICK);
    assert_quiet();
}

#[test]
fn queue_timeout_answers_504_once_and_holds_nothing() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 0.3, 10));
    let mut a = admitted(&w);
    let mut b = queued(&w);
    envoy.advance(Duration::from_millis(299));
    w.tick();
    assert!(b.is_waiting(), "504 before the queue timeout");
    envoy.advance(Duration::from_millis(1));
    w.tick();
    let reply = b.reply();
    assert_eq!(reply.status, 504);
    assert_eq!(reply.header("x-sluice-reason"), Some("queue-timeout"));
    assert_eq!(
        reply.body,
        "{\"error\":\"timed out waiting for a slot\",\"reason\":\"queue-timeout\",\"endpoint\":\"/predict\",\"queue_timeout_ms\":300}\n"
    );
    assert_eq!(counts(&envoy), (1, 0, 0));
    w.tick();
    assert_eq!(b.replies().len(), 1, "answered once");
    b.complete(); // the 504 goes out through the filter's response callbacks
    assert_eq!(counts(&envoy), (1, 0, 0));
    assert_eq!(b.resumes(), 0);
    a.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn queue_full_answers_503_with_retry_after_and_holds_nothing() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 2.5, 1));
    let mut a = admitted(&w);
    let mut b = queued(&w);
    let mut c = w.request("POST", PATH);
    assert_eq!(c.action, Action::Pause);
    let reply = c.reply();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-sluice-reason"), Some("queue-full"));
    assert_eq!(reply.header("retry-after"), Some("3"));
    assert_eq!(
        reply.body,
        "{\"error\":\"too many requests waiting\",\"reason\":\"queue-full\",\"endpoint\":\"/predict\",\"max_queue\":1}\n",
        "the body documented in docs/filter.md"
    );
    assert_eq!(counts(&envoy), (1, 1, 0));
    c.complete();
    assert_eq!(counts(&envoy), (1, 1, 0));
    b.reset();
    a.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn granted_then_reset_before_the_resume_gives_the_slot_back() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let w2 = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let mut a = admitted(&w1);
    let mut b = queued(&w2);
    a.complete();
    assert_eq!(counts(&envoy), (1, 0, 1));
    // b's client goes away before its worker claims the slot.
    b.reset();
    envoy.assert_neutral(KEY);
    // The wake-up still arrives: nothing left to claim.
    assert!(w2.deliver_wake_ups());
    w2.tick();
    assert_eq!(b.resumes(), 0);
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn resume_failure_releases_the_granted_slot() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let w2 = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let mut a = admitted(&w1);
    let b = queued(&w2);
    // Envoy deleted b's context before our on_log ran for it.
    b.vanish();
    a.complete();
    assert!(w2.deliver_wake_ups());
    assert_eq!(b.resumes(), 0);
    envoy.assert_neutral(KEY);
    w2.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn resume_failure_then_on_log_releases_once() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let mut a = admitted(&w);
    let mut b = queued(&w);
    let mut c = queued(&w);
    b.fail_resume();
    a.complete();
    assert!(w.deliver_wake_ups());
    assert_eq!(b.resumes(), 0);
    // b's resume failed, so its slot was released and handed on to c,
    // whose wake-up is the next event.
    assert_eq!(counts(&envoy), (1, 0, 1));
    assert!(w.deliver_wake_ups());
    assert_eq!(c.resumes(), 1);
    assert_eq!(counts(&envoy), (1, 0, 0));
    b.reset(); // its on_log still comes: nothing more to release
    assert_eq!(counts(&envoy), (1, 0, 0));
    c.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn two_workers_race_for_the_last_slot() {
    for round in 0..100 {
        let envoy = FakeEnvoy::new();
        let cfg = config(1, 5.0, 10);
        // Envoy's main thread creates the record before the workers start.
        drop(FakeWorker::start(&envoy, &cfg));
        let start = Arc::new(Barrier::new(2));
        let both_arrived = Arc::new(Barrier::new(2));
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            for _ in 0..2 {
                let (envoy, cfg, tx) = (Arc::clone(&envoy), cfg.clone(), tx.clone());
                let (start, both_arrived) = (Arc::clone(&start), Arc::clone(&both_arrived));
                scope.spawn(move || {
                    let w = FakeWorker::start(&envoy, &cfg);
                    start.wait();
                    let mut s = w.request("POST", PATH);
                    both_arrived.wait();
                    let first = s.action;
                    if first == Action::Pause {
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while s.resumes() == 0 {
                            assert!(Instant::now() < deadline, "never resumed");
                            if !w.deliver_wake_ups() {
                                std::thread::yield_now();
                            }
                        }
                    }
                    s.complete();
                    tx.send((first, s.resumes(), take_problems())).unwrap();
                });
            }
        });
        drop(tx);
        let mut results: Vec<_> = rx.iter().collect();
        results.sort_by_key(|(first, ..)| *first == Action::Pause);
        let firsts: Vec<_> = results.iter().map(|(first, ..)| *first).collect();
        assert_eq!(firsts, [Action::Continue, Action::Pause], "round {round}");
        assert_eq!(results[1].1, 1, "round {round}: the waiter resumed once");
        for (.., problems) in &results {
            assert!(problems.is_empty(), "round {round}: {problems:#?}");
        }
        envoy.assert_neutral(KEY);
    }
}

#[test]
fn reply_bodies_are_json_carrying_the_configured_path() {
    let path = r#"/say"hi"\now"#;
    let key = format!("sluice:t:ep:{path}");
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_for(path, 1, 0.1, 1));
    let mut a = w.request("POST", path);
    let mut b = w.request("POST", path);
    let mut c = w.request("POST", path);
    let full = c.reply();
    assert_eq!(full.status, 503);
    assert_eq!(full.json()["endpoint"], path);

    let mut stats = w.request("GET", STATS_PATH);
    let reply = stats.reply();
    assert_eq!(reply.header("x-sluice-reason"), Some("stats"));
    let doc = reply.json();
    assert_eq!(doc["endpoints"][path]["active_requests"], 1);
    assert_eq!(doc["endpoints"][path]["queued"], 1);

    envoy.advance(Duration::from_millis(100));
    w.tick();
    let timeout = b.reply();
    assert_eq!(timeout.status, 504);
    assert_eq!(timeout.json()["endpoint"], path);

    for s in [&mut a, &mut b, &mut c, &mut stats] {
        s.complete();
    }
    envoy.assert_neutral(&key);
    assert_quiet();
}

#[test]
fn unwatched_requests_touch_nothing() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let mut a = admitted(&w);
    let mut other = w.request("GET", "/health");
    assert_eq!(other.action, Action::Continue);
    assert!(other.replies().is_empty());
    other.complete();
    assert_eq!(counts(&envoy), (1, 0, 0));
    a.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn every_vm_gets_its_own_worker_index_and_wake_up_queue() {
    let envoy = FakeEnvoy::new();
    let workers: Vec<_> = (0..3)
        .map(|_| FakeWorker::start(&envoy, &config(1, 1.0, 10)))
        .collect();
    // A waiter on each of the last two workers: each wake-up reaches only
    // its own worker.
    let mut holder = admitted(&workers[0]);
    let mut b = queued(&workers[1]);
    let mut c = queued(&workers[2]);
    holder.complete();
    assert!(!workers[2].deliver_wake_ups());
    assert!(workers[1].deliver_wake_ups());
    assert_eq!((b.resumes(), c.resumes()), (1, 0));
    b.complete();
    assert!(workers[2].deliver_wake_ups());
    assert_eq!(c.resumes(), 1);
    c.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}
