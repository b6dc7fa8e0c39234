//! The whole filter against the fake host: every way a request can end
//! releases what it holds exactly once and leaves the shared record neutral.
//!
//! A double release while another request holds a slot would lower `active`
//! below what the test expects; one with no slot in use is logged as an
//! error. So each test checks the record after every step, and that nothing
//! was logged at warn or above.

use crate::admin::STATS_PATH;
use crate::fake_host::{take_problems, FakeEnvoy, FakeStream, FakeWorker};
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

/// With `abandon_hold: 0` an abandoned request's slot goes back at once.
#[test]
fn reset_while_in_flight_releases_once() {
    let envoy = FakeEnvoy::new();
    let mut cfg = config(2, 1.0, 10);
    cfg["endpoints"][PATH]["abandon_hold"] = json!(0);
    let w = FakeWorker::start(&envoy, &cfg);
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
        "{\"error\":\"timed out waiting for a slot\",\"detail\":\"timed out waiting for a slot\",\"reason\":\"queue-timeout\",\"endpoint\":\"/predict\",\"queue_timeout_ms\":300}\n"
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

/// `Retry-After` follows the measured drain: the requests ahead times the
/// mean duration, over the slots.
#[test]
fn retry_after_is_the_time_the_queue_ahead_takes_to_drain() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(2, 30.0, 4));
    for _ in 0..4 {
        let mut a = admitted(&w);
        envoy.advance(Duration::from_millis(300));
        a.complete();
    }
    let mut running: Vec<FakeStream> = (0..2).map(|_| admitted(&w)).collect();
    let mut waiting: Vec<FakeStream> = (0..4).map(|_| queued(&w)).collect();
    let reply = w.request("POST", PATH).reply();
    // (4 ahead + itself) × 300 ms / 2 slots = 750 ms.
    assert_eq!(reply.json()["retry_after_ms"], 750);
    assert_eq!(reply.header("retry-after"), Some("1"));
    for s in running.iter_mut().chain(waiting.iter_mut()) {
        w.deliver_wake_ups();
        s.complete();
    }
    w.deliver_wake_ups();
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
        "{\"error\":\"too many requests waiting\",\"detail\":\"too many requests waiting\",\"reason\":\"queue-full\",\"endpoint\":\"/predict\",\"max_queue\":1,\"retry_after_ms\":2500}\n",
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
    // The slot goes to b on this same worker, claimed at once; b's resume
    // fails, so its slot is released and handed on to c, resumed at once
    // too: no wake-up goes through the queue.
    a.complete();
    assert_eq!(b.resumes(), 0);
    assert_eq!(c.resumes(), 1);
    assert!(!w.deliver_wake_ups());
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

const MS: Duration = Duration::from_millis(1);

fn config_with_hold(capacity: u32, abandon_hold: f64) -> Value {
    let mut cfg = config(capacity, 30.0, 10);
    cfg["endpoints"][PATH]["abandon_hold"] = json!(abandon_hold);
    cfg
}

/// One request that takes `took` from admission to the end of its response,
/// so the worker knows how long the backend takes.
fn served_in(envoy: &FakeEnvoy, w: &FakeWorker, took: Duration) {
    let mut s = admitted(w);
    envoy.advance(took);
    s.complete();
}

/// `b`, admitted on an endpoint whose requests take 300 ms, is abandoned
/// 100 ms in: its slot is held, and goes to a waiter of this same worker
/// 200 ms later (when the backend is done), not before, exactly once, at
/// once. The waiter, holding that slot.
fn abandoned_at_100_ms_is_held_200_ms(
    envoy: &FakeEnvoy,
    w: &FakeWorker,
    mut b: FakeStream,
) -> FakeStream {
    envoy.advance(100 * MS);
    b.reset(); // the client gives up; the backend goes on for ~200 ms
    assert_eq!(counts(envoy), (1, 0, 0), "held, not released");
    assert_eq!(w.host.tick_period(), FAST_TICK, "the tick releases it");
    let c = queued(w);
    envoy.advance(199 * MS);
    w.tick();
    assert!(c.is_waiting(), "released before the backend was done");
    envoy.advance(MS);
    w.tick();
    assert_eq!(counts(envoy), (1, 0, 0));
    assert_eq!(c.resumes(), 1);
    c
}

#[test]
fn abandoned_slot_is_held_for_the_rest_of_the_recent_duration_then_released_once() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_with_hold(1, 30.0));
    served_in(&envoy, &w, 300 * MS);
    let b = admitted(&w);
    let mut c = abandoned_at_100_ms_is_held_200_ms(&envoy, &w, b);
    assert!(!w.deliver_wake_ups());
    for _ in 0..3 {
        envoy.advance(100 * MS);
        w.tick();
    }
    assert_eq!(counts(&envoy), (1, 0, 0));
    c.complete();
    envoy.assert_neutral(KEY);
    w.tick();
    assert_eq!(w.host.tick_period(), BASE_TICK);
    assert_quiet();
}

/// A request abandoned after every recent duration is slower than any
/// measured (the slow ones are the ones clients give up on, and are never
/// measured): held to `abandon_hold` from its admission.
#[test]
fn abandoned_after_the_recent_duration_is_held_to_the_cap() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_with_hold(1, 3.0));
    served_in(&envoy, &w, 300 * MS);
    let mut b = admitted(&w);
    envoy.advance(400 * MS);
    b.reset();
    envoy.advance(2_599 * MS);
    w.tick();
    assert_eq!(counts(&envoy), (1, 0, 0), "released before abandon_hold");
    envoy.advance(MS);
    w.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn abandon_hold_caps_the_hold_and_stands_in_for_an_unknown_duration() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_with_hold(2, 1.0));
    // Nothing finished yet: held the cold hold (1 s), within the cap.
    let mut a = admitted(&w);
    envoy.advance(400 * MS);
    a.reset();
    envoy.advance(999 * MS);
    w.tick();
    assert_eq!(counts(&envoy), (1, 0, 0));
    envoy.advance(MS);
    w.tick();
    envoy.assert_neutral(KEY);
    // A backend that took 10 s: held no longer than the 1 s cap.
    served_in(&envoy, &w, Duration::from_secs(10));
    let mut b = admitted(&w);
    b.reset();
    envoy.advance(999 * MS);
    w.tick();
    assert_eq!(counts(&envoy), (1, 0, 0));
    envoy.advance(MS);
    w.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn envoys_own_timeout_reply_counts_as_abandoned() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_with_hold(1, 30.0));
    served_in(&envoy, &w, 300 * MS);
    let mut b = admitted(&w);
    envoy.advance(100 * MS);
    b.envoy_timeout();
    assert_eq!(counts(&envoy), (1, 0, 0));
    envoy.advance(200 * MS);
    w.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

/// A client that leaves during a streamed response leaves a backend that
/// goes on generating: held for the rest of the recent duration too.
#[test]
fn a_response_cut_short_is_held_like_an_abandoned_request() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_with_hold(1, 30.0));
    served_in(&envoy, &w, 300 * MS);
    let mut b = admitted(&w);
    envoy.advance(100 * MS);
    // The backend sent its headers; the client left during the body.
    b.cut_during_response();
    assert_eq!(counts(&envoy), (1, 0, 0), "held, not released");
    envoy.advance(199 * MS);
    w.tick();
    assert_eq!(counts(&envoy), (1, 0, 0));
    envoy.advance(MS);
    w.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn an_abandoned_waiter_that_was_admitted_is_held_too() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_with_hold(1, 30.0));
    served_in(&envoy, &w, 300 * MS);
    let mut a = admitted(&w);
    let mut b = queued(&w);
    a.complete();
    assert_eq!(b.resumes(), 1);
    envoy.advance(50 * MS);
    b.reset();
    assert_eq!(counts(&envoy), (1, 0, 0));
    envoy.advance(250 * MS);
    w.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_vm_going_away_releases_what_it_holds() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_with_hold(1, 30.0));
    let mut a = admitted(&w);
    a.reset();
    assert_eq!(counts(&envoy), (1, 0, 0));
    w.done();
    envoy.assert_neutral(KEY);
    // Nothing left for a late tick to release again.
    envoy.advance(Duration::from_secs(60));
    w.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn stats_path_wins_over_a_catch_all_prefix_for_get_and_head_only() {
    let key = "sluice:t:ep:/";
    let envoy = FakeEnvoy::new();
    let cfg = json!({"service": "t", "endpoints": {"/": {"match": "prefix", "capacity": 1}}});
    let w = FakeWorker::start(&envoy, &cfg);
    for method in ["GET", "HEAD"] {
        let mut s = w.request(method, "/balancer/stats?x=1");
        assert_eq!(
            s.reply().header("x-sluice-reason"),
            Some("stats"),
            "{method}"
        );
        s.complete();
    }
    // Other methods are the application's: this one counts against "/".
    let mut post = w.request("POST", STATS_PATH);
    assert_eq!(post.action, Action::Continue);
    assert!(post.replies().is_empty());
    assert_eq!(envoy.record(key).active, 1);
    post.complete();
    envoy.assert_neutral(key);
    assert_quiet();
}

#[test]
fn encoded_spellings_take_the_endpoints_slots() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let mut a = w.request("POST", "/pre%64ict");
    assert_eq!(a.action, Action::Continue);
    let mut b = w.request("POST", "/x/../predict");
    assert!(b.is_waiting());
    b.reset();
    a.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn upgrades_take_no_slot_when_not_counted() {
    let envoy = FakeEnvoy::new();
    let mut cfg = config(1, 1.0, 10);
    cfg["endpoints"][PATH]["count_upgrades"] = json!(false);
    let w = FakeWorker::start(&envoy, &cfg);
    let mut ws = w.request_with("GET", PATH, &[("upgrade", "websocket")]);
    assert_eq!(ws.action, Action::Continue);
    envoy.assert_neutral(KEY);
    let mut plain = admitted(&w);
    plain.complete();
    ws.reset();
    envoy.assert_neutral(KEY);
    // Only a GET is upgraded: a POST asking for one is a plain request.
    let mut post = w.request_with("POST", PATH, &[("upgrade", "websocket")]);
    assert_eq!(envoy.record(KEY).active, 1);
    post.complete();
    envoy.assert_neutral(KEY);
    // Counted by default.
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    let mut ws = w.request_with("GET", PATH, &[("upgrade", "websocket")]);
    assert_eq!(envoy.record(KEY).active, 1);
    // Cut by its client: held like an abandoned request (cold: 1 s).
    ws.cut_during_response();
    envoy.advance(Duration::from_secs(1));
    w.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn configuration_warnings_are_logged_once_per_configuration() {
    let envoy = FakeEnvoy::new();
    let mut cfg = config(1, 1.0, 10);
    cfg["colour"] = json!("red");
    take_problems();
    // The main thread, then each worker: one warning, not one per VM.
    for _ in 0..3 {
        FakeWorker::start(&envoy, &cfg);
    }
    assert_eq!(take_problems(), vec!["WARN: colour: unknown key, ignored"]);
    // A new configuration is logged again, once.
    cfg["colour"] = json!("blue");
    for _ in 0..3 {
        FakeWorker::start(&envoy, &cfg);
    }
    assert_eq!(take_problems().len(), 1);
}

#[test]
fn max_queued_bytes_refuses_bodies_the_queue_has_no_room_for() {
    let envoy = FakeEnvoy::new();
    let mut cfg = config(1, 0.5, 10);
    cfg["endpoints"][PATH]["max_queued_bytes"] = json!(1000);
    let w = FakeWorker::start(&envoy, &cfg);
    let bytes = || {
        let mut s = w.request("GET", STATS_PATH);
        let n = s.reply().json()["endpoints"][PATH]["queued_bytes"].clone();
        s.complete();
        n
    };
    let post = |n: &str| w.request_with("POST", PATH, &[("content-length", n)]);
    // Admitted requests are not queued: their bodies do not count.
    let mut a = post("5000");
    assert_eq!(a.action, Action::Continue);
    let mut b = post("600");
    assert!(b.is_waiting());
    let mut c = post("401");
    assert_eq!(c.reply().status, 503);
    assert_eq!(c.reply().header("x-sluice-reason"), Some("queue-full"));
    assert_eq!(counts(&envoy), (1, 1, 0), "c gave its ticket back");
    let mut d = post("400");
    assert!(d.is_waiting());
    let mut e = w.request("POST", PATH); // no content-length: not counted
    assert!(e.is_waiting());
    assert_eq!(bytes(), 1000);
    // Leaving the queue in every way takes the bytes off: admitted...
    a.complete();
    assert_eq!(b.resumes(), 1);
    assert_eq!(bytes(), 400);
    // ...gone...
    d.reset();
    assert_eq!(bytes(), 0);
    let mut f = post("900");
    assert!(f.is_waiting());
    assert_eq!(bytes(), 900);
    // ...timed out.
    envoy.advance(Duration::from_millis(500));
    w.tick();
    assert_eq!(e.reply().status, 504);
    assert_eq!(f.reply().status, 504);
    assert_eq!(bytes(), 0);
    for s in [&mut b, &mut c, &mut e, &mut f] {
        s.complete();
    }
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_new_vm_reuses_the_index_of_one_that_is_gone_and_is_woken_through_it() {
    let envoy = FakeEnvoy::new();
    let cfg = config(1, 1.0, 10);
    // The main thread's VM serves no watched request: it takes no index.
    let _main = FakeWorker::start(&envoy, &cfg);
    let first = FakeWorker::start(&envoy, &cfg);
    let old = FakeWorker::start(&envoy, &cfg);
    let mut a = admitted(&first);
    queued(&old).reset();
    assert_eq!((first.worker_id(), old.worker_id()), (0, 1));
    // A listener update: the old worker VM drains and goes away.
    old.done();
    let new = FakeWorker::start(&envoy, &cfg);
    let idle = FakeWorker::start(&envoy, &cfg);
    let mut b = queued(&new);
    assert_eq!(new.worker_id(), 1);
    queued(&idle).reset();
    assert_eq!(idle.worker_id(), 2);
    // Wake-ups to index 1 now reach the new VM.
    a.complete();
    assert!(new.deliver_wake_ups());
    assert_eq!(b.resumes(), 1);
    b.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_new_worker_holds_for_the_estimate_the_others_published() {
    let envoy = FakeEnvoy::new();
    let cfg = config_with_hold(1, 30.0);
    let old = FakeWorker::start(&envoy, &cfg);
    served_in(&envoy, &old, 300 * MS);
    // Its tick publishes the estimate.
    old.tick();
    // A VM from a configuration update: nothing measured yet itself.
    let new = FakeWorker::start(&envoy, &cfg);
    let mut b = admitted(&new);
    envoy.advance(100 * MS);
    b.reset();
    envoy.advance(199 * MS);
    new.tick();
    assert_eq!(counts(&envoy), (1, 0, 0));
    envoy.advance(MS);
    new.tick();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn the_first_tick_takes_the_index_before_any_request() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    assert_eq!(w.host.tick_period(), FAST_TICK, "asked for at configure");
    w.tick();
    assert_eq!(w.worker_id(), 0);
    assert_eq!(
        w.host.tick_period(),
        BASE_TICK,
        "then back to the base tick"
    );
    assert_quiet();
}

/// What an admitted request costs once its worker runs: every hostcall
/// from its request headers to its end, in order. Metrics and the
/// abandoned-request estimate stay in memory until the tick. The README's
/// benchmark section quotes this list.
#[test]
fn an_admitted_request_costs_six_hostcalls_and_one_in_eight_is_timed() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(2, 1.0, 10));
    w.tick();
    // Every request is timed until the worker has 16 durations; nothing
    // below is a first-time cost either.
    for _ in 0..16 {
        admitted(&w).complete();
    }
    w.tick();
    w.host.take_calls();
    let untimed = [
        "get_http_request_header",  // :path
        "get",                      // acquire: the record, capacity in it
        "set",                      // acquire: CAS write
        "get_http_response_header", // :status: Envoy's own timeout reply?
        "get",                      // release
        "set",
    ];
    let timed = [
        "get_http_request_header",
        "get",
        "set",
        "now_ns", // admitted at
        "get_http_response_header",
        "now_ns", // the upstream duration
        "get",
        "set",
    ];
    let mut seen = Vec::new();
    for _ in 0..16 {
        admitted(&w).complete();
        let calls = w.host.take_calls();
        assert!(calls == untimed || calls == timed, "{calls:?}");
        seen.push(calls == timed);
    }
    assert_eq!(seen.iter().filter(|&&t| t).count(), 2, "{seen:?}");
    envoy.assert_neutral(KEY);
    assert_quiet();
}

/// An untimed request (admitted at once, no clock read) that is abandoned
/// is held for the rest of the recent duration counted from its arrival in
/// Envoy, as a timed one is from its admission.
#[test]
fn an_untimed_abandoned_request_is_held_from_its_arrival() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config_with_hold(1, 30.0));
    for _ in 0..16 {
        served_in(&envoy, &w, 300 * MS);
    }
    w.host.take_calls();
    let b = admitted(&w);
    assert!(
        !w.host.take_calls().contains(&"now_ns"),
        "the 17th request is not timed"
    );
    let mut c = abandoned_at_100_ms_is_held_200_ms(&envoy, &w, b);
    c.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn the_tick_comes_when_the_first_waiter_is_due() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 0.0123, 10));
    w.tick();
    assert_eq!(w.host.tick_period(), BASE_TICK);
    let mut a = admitted(&w);
    let mut b = queued(&w);
    assert_eq!(
        w.host.tick_period(),
        FAST_TICK,
        "at most this while anyone waits"
    );
    envoy.advance(5 * MS);
    w.tick();
    assert_eq!(w.host.tick_period(), FAST_TICK, "7.3 ms to go");
    envoy.advance(5 * MS);
    w.tick();
    assert!(b.is_waiting());
    assert_eq!(
        w.host.tick_period(),
        Duration::from_millis(3),
        "2.3 ms to go: rounded up, never early"
    );
    envoy.advance(3 * MS);
    w.tick();
    assert_eq!(b.reply().status, 504);
    assert_eq!(w.host.tick_period(), BASE_TICK, "nobody waits");
    a.complete();
    b.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

/// Setting a period restarts Envoy's timer: a request that starts waiting
/// moves the tick only if it is due sooner than the tick already set.
#[test]
fn a_new_waiter_moves_the_tick_only_sooner() {
    let calls_to =
        |w: &FakeWorker, name: &str| w.host.take_calls().iter().filter(|c| **c == name).count();
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 1.0, 10));
    w.tick();
    let mut a = admitted(&w);
    w.host.take_calls();
    let mut b = queued(&w);
    assert_eq!(
        calls_to(&w, "set_tick_period"),
        1,
        "from the base tick to 5 ms"
    );
    envoy.advance(MS);
    let mut c = queued(&w);
    assert_eq!(calls_to(&w, "set_tick_period"), 0, "due in 4 ms anyway");
    for s in [&mut a, &mut b, &mut c] {
        s.complete();
    }
    envoy.assert_neutral(KEY);
    assert_quiet();
}

/// The queue timeout counts from the request's arrival in Envoy, as the
/// access log's duration does, not from when a busy worker got to its
/// headers.
#[test]
fn the_queue_timeout_counts_from_arrival() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(1, 0.2, 10));
    w.tick();
    let mut a = admitted(&w);
    let mut b = w.request_arrived("POST", PATH, &[], 3 * MS);
    assert!(b.is_waiting());
    envoy.advance(196 * MS);
    w.tick();
    assert!(b.is_waiting(), "199 ms since it arrived");
    assert_eq!(w.host.tick_period(), MS, "due in 1 ms");
    envoy.advance(MS);
    w.tick();
    assert_eq!(b.reply().status, 504);
    a.complete();
    b.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

/// Envoy's timers on libevent's coarse clock come up to a kernel tick late,
/// and so would every 504: the filter notices from the ticks it plans for
/// waiters and says so once per process, naming the remedy; ticks on time,
/// or with nobody waiting, say nothing.
#[test]
fn late_ticks_name_envoys_coarse_timers_once() {
    let ticks = |late: Duration, waiting: bool| {
        let envoy = FakeEnvoy::new();
        let workers = [
            FakeWorker::start(&envoy, &config(1, 10.0, 10)),
            FakeWorker::start(&envoy, &config(1, 10.0, 10)),
        ];
        let mut streams = Vec::new();
        if waiting {
            streams.push(admitted(&workers[0]));
            for w in &workers {
                let s = w.request("POST", PATH);
                assert!(s.is_waiting());
                streams.push(s);
            }
        }
        for w in &workers {
            for _ in 0..40 {
                envoy.advance(w.host.tick_period() + late);
                w.tick();
            }
        }
        for s in &mut streams {
            s.reset();
        }
        take_problems()
    };
    let problems = ticks(Duration::from_micros(2500), true);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("EVENT_PRECISE_TIMER=1"),
        "{problems:?}"
    );
    assert_eq!(
        ticks(Duration::from_micros(100), true),
        Vec::<String>::new()
    );
    assert_eq!(
        ticks(Duration::from_micros(2500), false),
        Vec::<String>::new(),
        "idle ticks answer no deadline"
    );
}
