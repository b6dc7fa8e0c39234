//! The leader lease, the sync stream, snapshots and health checks, against
//! the fake host: one stream per process, handover, older snapshots
//! ignored, raises admitting queued requests FIFO, lowers cutting none,
//! fail static, and the fast 503s of an unhealthy backend.

use crate::fake_host::{take_problems, FakeEnvoy, FakeStream, FakeWorker};
use crate::sync_stream::grpc_service;
use proxy_wasm::types::Action;
use serde_json::{json, Value};
use sluice_core::admission::CapacitySource;
use sluice_core::lease::{read as read_lease, LEASE_TTL};
use sluice_core::sync_api::{EndpointCapacity, Snapshot, WatchRequest};
use std::time::Duration;

use prost::Message;

const PATH: &str = "/predict";
const KEY: &str = "sluice:t:ep:/predict";
const TICK: Duration = Duration::from_millis(100);

fn config(capacity: Option<u32>) -> Value {
    json!({"service": "t", "queue_timeout": 30, "max_queue": 1000,
        "sync": {"cluster": "sluice_sync", "heartbeat_timeout": 3},
        "endpoints": {PATH: {"capacity": capacity}}})
}

fn health_config(capacity: u32) -> Value {
    json!({"service": "t", "queue_timeout": 30,
        "health_endpoint": "/health", "health_check_interval": 1,
        "health": {"cluster": "backend", "unhealthy_threshold": 2, "healthy_threshold": 2},
        "endpoints": {PATH: {"capacity": capacity}}})
}

fn snapshot(version: u64, capacity: u32) -> Vec<u8> {
    Snapshot {
        service: "t".into(),
        version,
        endpoints: vec![EndpointCapacity {
            path: PATH.into(),
            capacity,
            source: "probe".into(),
            measured_at: 1,
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

fn heartbeat(version: u64) -> Vec<u8> {
    Snapshot {
        service: "t".into(),
        version,
        heartbeat: true,
        ..Default::default()
    }
    .encode_to_vec()
}

/// Every worker ticks once, in order, then the clock moves a base tick.
fn tick_all(envoy: &FakeEnvoy, workers: &[&FakeWorker]) {
    for w in workers {
        w.tick();
    }
    envoy.advance(TICK);
}

/// The only open stream among `workers`, and whose it is.
fn the_stream(workers: &[&FakeWorker]) -> (usize, u32) {
    let open: Vec<_> = workers
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.open_stream().map(|s| (i, s.token)))
        .collect();
    assert_eq!(open.len(), 1, "exactly one stream per process: {open:?}");
    open[0]
}

fn assert_quiet() {
    let problems = take_problems();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn configure_opens_nothing_the_first_tick_of_one_root_opens_the_stream() {
    let envoy = FakeEnvoy::new();
    // The canary: configured, then destroyed before any tick.
    let canary = FakeWorker::start(&envoy, &config(Some(2)));
    assert!(canary.grpc_streams().is_empty(), "never from on_configure");
    drop(canary);
    let ws: Vec<_> = (0..3)
        .map(|_| FakeWorker::start(&envoy, &config(Some(2))))
        .collect();
    let refs: Vec<_> = ws.iter().collect();
    for _ in 0..5 {
        tick_all(&envoy, &refs);
    }
    let (leader, token) = the_stream(&refs);
    assert_eq!(leader, 0, "the first to tick leads");
    let s = ws[0].open_stream().unwrap();
    assert_eq!(s.token, token);
    assert_eq!(s.grpc_service, grpc_service("sluice_sync", None));
    assert_eq!(
        (s.service_name.as_str(), s.method.as_str()),
        ("sluice.sync.v1.CapacitySync", "Watch")
    );
    assert!(s.end_stream, "server streaming: the request ends our side");
    let req = WatchRequest::decode(s.sent[0].as_slice()).unwrap();
    assert_eq!((req.service.as_str(), req.last_version), ("t", 0));
    assert_eq!(ws[1].stats()["sync"]["state"], "connecting");
    assert_quiet();
}

#[test]
fn on_done_hands_over_at_the_next_tick_and_expiry_after_the_ttl() {
    let envoy = FakeEnvoy::new();
    let ws: Vec<_> = (0..3)
        .map(|_| FakeWorker::start(&envoy, &config(Some(2))))
        .collect();
    let refs: Vec<_> = ws.iter().collect();
    tick_all(&envoy, &refs);
    assert_eq!(the_stream(&refs).0, 0);
    // Its VM ends: the lease is released, the next tick of another takes it.
    ws[0].done();
    assert!(read_lease(&envoy.store, "t").is_none());
    ws[1].tick();
    assert_eq!(the_stream(&refs).0, 1);
    // Worker 1 stops ticking (stuck, or gone without on_done): worker 2
    // takes over only once the lease has expired.
    let mut waited = Duration::ZERO;
    while ws[2].open_stream().is_none() {
        assert!(waited <= LEASE_TTL, "no takeover after {waited:?}");
        envoy.advance(TICK);
        waited += TICK;
        ws[2].tick();
    }
    assert!(
        waited >= LEASE_TTL - TICK,
        "taken over early, after {waited:?}"
    );
    // Worker 1 comes back: it lost the lease and drops its stream.
    ws[1].tick();
    assert_eq!(the_stream(&refs).0, 2);
    assert_quiet();
}

#[test]
fn a_newer_configuration_takes_the_lead_at_once() {
    let envoy = FakeEnvoy::new();
    let old = FakeWorker::start(&envoy, &config(Some(2)));
    old.tick();
    envoy.advance(TICK);
    // A listener update: new VMs with a new configuration; the old one
    // drains and keeps ticking.
    let new = FakeWorker::start(&envoy, &config(Some(3)));
    new.tick();
    old.tick();
    assert_eq!(the_stream(&[&old, &new]).0, 1, "no wait for the drain");
    old.tick();
    assert_eq!(the_stream(&[&old, &new]).0, 1, "and it stays");
    assert_quiet();
}

#[test]
fn snapshots_set_the_capacity_an_older_one_is_ignored() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(Some(2)));
    let other = FakeWorker::start(&envoy, &config(Some(2)));
    w.tick();
    let token = w.open_stream().unwrap().token;
    w.grpc_message(token, &snapshot(5, 3));
    let r = envoy.record(KEY);
    assert_eq!(
        (r.capacity, r.source, r.sync_version),
        (Some(3), CapacitySource::Sync, 5)
    );
    w.grpc_message(token, &snapshot(4, 9));
    assert_eq!(envoy.record(KEY).capacity, Some(3), "older: ignored");
    w.grpc_message(token, &heartbeat(5));
    // Every worker enforces it: three in flight on the other worker.
    let held: Vec<FakeStream> = (0..3).map(|_| other.request("POST", PATH)).collect();
    assert!(held.iter().all(|s| s.action == Action::Continue));
    let mut fourth = other.request("POST", PATH);
    assert_eq!(fourth.action, Action::Pause);
    let doc = other.stats();
    assert_eq!(doc["endpoints"][PATH]["capacity"], 3);
    assert_eq!(doc["endpoints"][PATH]["capacity_source"], "sync");
    assert_eq!(doc["sync"]["state"], "connected");
    assert_eq!(doc["sync"]["version"], 5);
    assert_eq!(doc["sync"]["last_message_age_ms"], 0);
    fourth.reset();
    for mut s in held {
        s.complete();
    }
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_raise_admits_the_queue_at_once_in_fifo_order() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &config(Some(1)));
    let w2 = FakeWorker::start(&envoy, &config(Some(1)));
    w1.tick();
    let token = w1.open_stream().unwrap().token;
    let mut first = w1.request("POST", PATH);
    let mut queued: Vec<FakeStream> = (0..6)
        .map(|i| if i % 2 == 0 { &w1 } else { &w2 }.request("POST", PATH))
        .collect();
    assert!(queued.iter().all(|s| s.is_waiting()));
    // Raised to 4: the three oldest waiters now, the rest still wait.
    w1.grpc_message(token, &snapshot(1, 4));
    w1.deliver_wake_ups();
    w2.deliver_wake_ups();
    let resumed: Vec<_> = queued.iter().map(|s| s.resumes()).collect();
    assert_eq!(resumed, [1, 1, 1, 0, 0, 0], "FIFO across workers");
    // Raised further: all of them.
    w1.grpc_message(token, &snapshot(2, 100));
    w1.deliver_wake_ups();
    w2.deliver_wake_ups();
    assert!(queued.iter().all(|s| s.resumes() == 1));
    first.complete();
    for s in &mut queued {
        s.complete();
    }
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_lower_cuts_nothing_and_admits_below_the_new_capacity() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(Some(4)));
    w.tick();
    let token = w.open_stream().unwrap().token;
    let mut held: Vec<FakeStream> = (0..4).map(|_| w.request("POST", PATH)).collect();
    w.grpc_message(token, &snapshot(1, 2));
    let mut waiting = w.request("POST", PATH);
    assert!(waiting.is_waiting());
    assert!(held.iter().all(|s| s.replies().is_empty()), "nothing cut");
    // 4 -> 3 -> 2 in flight: still no room; one more release makes room.
    held[0].complete();
    held[1].complete();
    w.deliver_wake_ups();
    assert!(waiting.is_waiting());
    held[2].complete();
    w.deliver_wake_ups();
    assert_eq!(waiting.resumes(), 1);
    held[3].complete();
    waiting.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn without_a_configured_capacity_requests_pass_until_sync_gives_one() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(None));
    w.tick();
    let token = w.open_stream().unwrap().token;
    let mut passed: Vec<FakeStream> = (0..10).map(|_| w.request("POST", PATH)).collect();
    assert!(passed.iter().all(|s| s.action == Action::Continue));
    assert_eq!(w.stats()["endpoints"][PATH]["capacity"], Value::Null);
    w.grpc_message(token, &snapshot(1, 2));
    let mut next = w.request("POST", PATH);
    assert!(next.is_waiting(), "10 in flight, capacity 2");
    for s in &mut passed {
        s.complete();
    }
    w.deliver_wake_ups();
    assert_eq!(next.resumes(), 1);
    next.complete();
    envoy.assert_neutral(KEY);
    take_problems(); // the config warns that the capacity is not set
}

#[test]
fn a_new_configuration_applies_to_old_vms_at_once_and_sync_wins_after() {
    let envoy = FakeEnvoy::new();
    let old = FakeWorker::start(&envoy, &config(Some(4)));
    let mut held: Vec<FakeStream> = (0..4).map(|_| old.request("POST", PATH)).collect();
    // LDS lowers it to 2; the old VM keeps serving keep-alive connections.
    let new = FakeWorker::start(&envoy, &config(Some(2)));
    for mut s in held.drain(..3) {
        s.complete();
    }
    let more = old.request("POST", PATH);
    assert_eq!(more.action, Action::Continue, "1 in flight, capacity 2");
    let over = old.request("POST", PATH);
    assert!(over.is_waiting(), "the old VM enforces the new capacity");
    // Another VM of the same new configuration changes nothing; sync does.
    let again = FakeWorker::start(&envoy, &config(Some(2)));
    new.tick();
    let token = new.open_stream().unwrap().token;
    new.grpc_message(token, &snapshot(1, 8));
    drop(again);
    old.deliver_wake_ups();
    assert_eq!(over.resumes(), 1);
    let again = FakeWorker::start(&envoy, &config(Some(2)));
    assert_eq!(
        envoy.record(KEY).capacity,
        Some(8),
        "same config: sync stays"
    );
    drop(again);
    for mut s in held.into_iter().chain([more, over]) {
        s.complete();
    }
    old.request("POST", PATH).complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn fail_static_reopens_with_backoff_and_the_watchdog_cancels_a_silent_stream() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(Some(2)));
    w.tick();
    let first = w.open_stream().unwrap().token;
    w.grpc_message(first, &snapshot(3, 5));
    // The server goes away: capacities stay, the stats say since when.
    w.grpc_close(first, 14);
    assert_eq!(envoy.record(KEY).capacity, Some(5));
    let doc = w.stats();
    assert_eq!(doc["sync"]["state"], "disconnected");
    assert!(doc["sync"]["disconnected_since_unix_ms"].as_u64().is_some());
    // Reopened within the first backoff (50-100 ms), asking from version 3.
    envoy.advance(Duration::from_millis(100));
    w.tick();
    let second = w.open_stream().expect("reopened").token;
    let req = WatchRequest::decode(w.open_stream().unwrap().sent[0].as_slice()).unwrap();
    assert_eq!(req.last_version, 3);
    // Opened, but silent past the heartbeat timeout: cancelled and reopened.
    envoy.advance(Duration::from_millis(3100));
    w.tick();
    assert!(w.open_stream().is_none(), "watchdog cancelled it");
    assert!(w
        .grpc_streams()
        .iter()
        .any(|s| s.token == second && s.cancelled));
    // Opening fails while the cluster is unusable: backoff doubles.
    w.fail_grpc_open(true);
    let mut opened_at = Vec::new();
    for _ in 0..100 {
        envoy.advance(Duration::from_millis(10));
        w.tick();
    }
    w.fail_grpc_open(false);
    for i in 0..200 {
        envoy.advance(Duration::from_millis(10));
        w.tick();
        if w.open_stream().is_some() {
            opened_at.push(i);
            break;
        }
    }
    assert!(!opened_at.is_empty(), "reopens once the cluster works");
    let token = w.open_stream().unwrap().token;
    w.grpc_message(token, &heartbeat(3));
    assert_eq!(w.stats()["sync"]["state"], "connected");
    take_problems(); // the losses are logged as warnings, on purpose
}

#[test]
fn unhealthy_answers_new_and_queued_requests_503_then_recovers() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &health_config(1));
    let w2 = FakeWorker::start(&envoy, &health_config(1));
    let mut holder = w1.request("POST", PATH);
    let mut queued: Vec<FakeStream> = (0..3).map(|_| w2.request("POST", PATH)).collect();
    w1.tick();
    let call = &w1.http_calls()[0];
    assert_eq!(call.cluster, "backend");
    assert_eq!(call.timeout, Duration::from_secs(1));
    let h = |name: &str| {
        call.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(h(":method").as_deref(), Some("GET"));
    assert_eq!(h(":path").as_deref(), Some("/health"));
    assert!(h(":authority").is_some());
    w1.http_response(call.token, Some(200));
    assert_eq!(w2.stats()["health"]["state"], "healthy");
    // Two failures in a row (a 500, then a timeout): unhealthy.
    envoy.advance(Duration::from_secs(1));
    w1.tick();
    w1.http_response(w1.http_calls()[1].token, Some(500));
    assert!(
        queued.iter().all(|s| s.is_waiting()),
        "one failure is not enough"
    );
    envoy.advance(Duration::from_secs(1));
    w1.tick();
    w1.http_response(w1.http_calls()[2].token, None);
    assert!(w2.deliver_wake_ups(), "the workers with waiters are woken");
    for s in &queued {
        let r = s.reply();
        assert_eq!(
            (r.status, r.header("x-sluice-reason")),
            (503, Some("unhealthy"))
        );
        assert_eq!(r.json()["reason"], "unhealthy");
    }
    let mut fresh = w2.request("POST", PATH);
    assert_eq!(fresh.reply().status, 503, "new requests at once");
    assert_eq!(w2.stats()["health"]["state"], "unhealthy");
    // Two successes: healthy again, requests go through.
    for i in 3..5 {
        envoy.advance(Duration::from_secs(1));
        w1.tick();
        w1.http_response(w1.http_calls()[i].token, Some(204));
    }
    assert_eq!(w2.stats()["health"]["state"], "healthy");
    holder.complete();
    let mut after = w2.request("POST", PATH);
    assert_eq!(after.action, Action::Continue);
    after.complete();
    fresh.complete();
    for s in &mut queued {
        s.complete();
    }
    envoy.assert_neutral(KEY);
    take_problems(); // the transitions are logged as warnings
}

#[test]
fn a_queued_request_is_answered_by_its_own_worker_tick_if_the_wake_up_is_lost() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &health_config(1));
    let w2 = FakeWorker::start(&envoy, &health_config(1));
    let mut holder = w1.request("POST", PATH);
    let mut waiting = w2.request("POST", PATH);
    w1.tick();
    for i in 0..2 {
        envoy.advance(Duration::from_secs(1));
        w1.tick();
        w1.http_response(w1.http_calls()[i].token, Some(503));
    }
    // No wake-up delivered: the 5 ms tick of w2 finds the mark.
    w2.tick();
    assert_eq!(waiting.reply().status, 503);
    waiting.complete();
    holder.complete();
    envoy.assert_neutral(KEY);
    take_problems();
}

#[test]
fn discovered_instances_replace_the_set_and_each_takes_its_figure() {
    use sluice_core::sync_api::Instance;
    let envoy = FakeEnvoy::new();
    let mut cfg = config(Some(2));
    cfg["instances"] = json!({"dns": "backend:8080"});
    cfg["endpoints"][PATH]["instance_capacity"] = json!({"127.0.0.1:9002": 3});
    let w = FakeWorker::start(&envoy, &cfg);
    w.tick();
    let token = w.open_stream().unwrap().token;
    // Before discovery: no instance, the endpoint's capacity for all.
    assert!(envoy.record(KEY).instances.is_empty());
    let discovered = |version: u64, addresses: &[&str]| {
        Snapshot {
            service: "t".into(),
            version,
            discovered: true,
            instances: addresses
                .iter()
                .map(|a| Instance {
                    address: a.to_string(),
                    capacities: if *a == "127.0.0.1:9001" {
                        vec![EndpointCapacity {
                            path: PATH.into(),
                            capacity: 5,
                            source: "probe".into(),
                            measured_at: 1,
                        }]
                    } else {
                        vec![]
                    },
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    w.grpc_message(
        token,
        &discovered(1, &["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]),
    );
    let r = envoy.record(KEY);
    let caps: Vec<_> = r
        .instances
        .iter()
        .map(|i| (i.address.port(), i.own_capacity))
        .collect();
    assert_eq!(caps, vec![(9001, Some(5)), (9002, Some(3)), (9003, None)]);
    assert_eq!(r.total_capacity(0), Some(10));
    assert!(r.instances_from_sync);
    // One leaves while busy, one joins.
    let mut busy: Vec<FakeStream> = (0..10).map(|_| w.request("POST", PATH)).collect();
    assert!(busy.iter().all(|s| s.action == Action::Continue));
    w.grpc_message(token, &discovered(2, &["127.0.0.1:9001", "127.0.0.1:9004"]));
    let r = envoy.record(KEY);
    let gone: Vec<_> = r
        .instances
        .iter()
        .filter(|i| i.gone)
        .map(|i| i.address.port())
        .collect();
    assert_eq!(gone, vec![9002, 9003], "kept until their requests end");
    let mut joined = w.request("POST", PATH);
    assert_eq!(
        joined.request_header("x-sluice-host").as_deref(),
        Some("127.0.0.1:9004")
    );
    joined.complete();
    for s in busy.iter_mut() {
        s.complete();
    }
    let r = envoy.record(KEY);
    let left: Vec<_> = r.instances.iter().map(|i| i.address.port()).collect();
    assert_eq!(left, vec![9001, 9004]);
    envoy.assert_neutral(KEY);
    assert_quiet();
}
