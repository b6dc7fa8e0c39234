//! `sync.shares` against the fake host: the leader's Share stream beside
//! Watch, reports from the records, grants enforced under their lease (a
//! share of 0 admits nothing), the fallback, a reconnect naming the old
//! stream, a new leader VM taking the grant over, and the final report.

use crate::fake_host::{take_problems, FakeEnvoy, FakeWorker, GrpcStream};
use proxy_wasm::types::Action;
use serde_json::{json, Value};
use sluice_core::sync_api::{
    EndpointCapacity, PoolShare, ShareGrant, ShareReport, Snapshot, StreamRef,
};
use std::time::Duration;

use prost::Message;

const PATH: &str = "/predict";
const KEY: &str = "sluice:t:ep:/predict";
const MS: Duration = Duration::from_millis(1);

fn config(shares: bool) -> Value {
    json!({"service": "t", "queue_timeout": 30, "max_queue": 1000,
        "sync": {"cluster": "sluice_sync", "heartbeat_timeout": 3, "shares": shares},
        "endpoints": {PATH: {}}})
}

fn snapshot(capacity: u32) -> Vec<u8> {
    Snapshot {
        service: "t".into(),
        version: 1,
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

fn open(w: &FakeWorker, method: &str) -> Option<GrpcStream> {
    w.grpc_streams()
        .into_iter()
        .find(|s| !s.cancelled && s.method == method)
}

fn reports(s: &GrpcStream) -> Vec<ShareReport> {
    s.sent
        .iter()
        .map(|b| ShareReport::decode(b.as_slice()).unwrap())
        .collect()
}

fn grant(version: u64, share: u32, lease_ms: u64, for_seq: u64, fallback_ms: u64) -> Vec<u8> {
    ShareGrant {
        share_version: version,
        shares: vec![PoolShare {
            path: PATH.into(),
            address: String::new(),
            share,
        }],
        lease_ms,
        lease_for_seq: for_seq,
        fallback_for_ms: fallback_ms,
        watchers: 2,
        stream: Some(StreamRef {
            epoch: 7,
            watcher: 3,
        }),
    }
    .encode_to_vec()
}

/// A leader with its Watch stream fed a capacity of `capacity`, ticking.
fn leader(envoy: &std::sync::Arc<FakeEnvoy>, capacity: u32) -> FakeWorker {
    let w = FakeWorker::start(envoy, &config(true));
    w.tick();
    let watch = open(&w, "Watch").expect("the Watch stream");
    w.grpc_message(watch.token, &snapshot(capacity));
    envoy.advance(10 * MS);
    w.tick();
    w
}

#[test]
fn without_shares_only_watch_is_opened_and_the_capacity_holds_whole() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config(false));
    w.tick();
    let watch = open(&w, "Watch").unwrap();
    w.grpc_message(watch.token, &snapshot(2));
    w.tick();
    assert!(open(&w, "Share").is_none());
    assert_eq!(envoy.record(KEY).share, None);
    let a = w.request("GET", PATH);
    let b = w.request("GET", PATH);
    assert_eq!((a.action, b.action), (Action::Continue, Action::Continue));
    assert!(w.stats()["endpoints"][PATH].get("share").is_none());
    assert!(!envoy.has_metric("sluice.t./predict.share"));
    assert_quiet();
}

#[test]
fn a_share_of_0_admits_nothing_until_a_grant_and_the_grant_holds_for_its_lease() {
    let envoy = FakeEnvoy::new();
    let w = leader(&envoy, 10);
    let share = open(&w, "Share").expect("the Share stream beside Watch");
    assert_eq!(share.service_name, "sluice.sync.v1.CapacitySync");
    assert!(!share.end_stream, "bidirectional: our side stays open");
    let first = &reports(&share)[0];
    assert_eq!(
        (first.service.as_str(), first.seq, first.replaces),
        ("t", 1, None)
    );
    // Shared, nothing granted: the request waits (a share, not "no limit").
    let mut r1 = w.request("GET", PATH);
    assert_eq!(r1.action, Action::Pause);
    // It is reported at once, not at the next interval.
    envoy.advance(MS);
    w.tick();
    let sent = reports(&open(&w, "Share").unwrap());
    let last = sent.last().unwrap();
    assert_eq!(last.pools.len(), 1);
    let p = &last.pools[0];
    assert_eq!(
        (
            p.path.as_str(),
            p.address.as_str(),
            p.holding,
            p.in_flight,
            p.queued
        ),
        (PATH, "", 0, 0, 1)
    );
    // Granted 2 for 500 ms from that report's send time.
    w.grpc_message(share.token, &grant(1, 2, 500, last.seq, 0));
    w.deliver_wake_ups();
    assert_eq!(r1.resumes(), 1, "the raise admits the waiter");
    let r2 = w.request("GET", PATH);
    assert_eq!(r2.action, Action::Continue);
    let r3 = w.request("GET", PATH);
    assert_eq!(
        r3.action,
        Action::Pause,
        "the share, not the capacity of 10"
    );
    let doc = w.stats();
    assert_eq!(doc["endpoints"][PATH]["share"]["slots"], 2);
    assert_eq!(doc["endpoints"][PATH]["share"]["admits"], 2);
    assert!(
        doc["endpoints"][PATH]["share_lease_left_ms"]
            .as_u64()
            .unwrap()
            > 400
    );
    assert_eq!(doc["sync"]["shares"]["state"], "granted");
    let left = doc["sync"]["shares"]["lease_left_ms"].as_u64().unwrap();
    assert!(left > 400 && left <= 500, "{left}");
    w.tick();
    envoy.advance(20 * MS);
    w.tick();
    assert_eq!(envoy.metric("sluice.t./predict.share"), 2);
    // The next report acknowledges version 1 and holds 2.
    envoy.advance(200 * MS);
    w.tick();
    let last = reports(&open(&w, "Share").unwrap()).pop().unwrap();
    assert_eq!(last.applied_version, 1);
    assert_eq!(
        (
            last.pools[0].holding,
            last.pools[0].in_flight,
            last.pools[0].queued
        ),
        (2, 2, 1)
    );
    // No renewal: past the lease (no fallback) it admits nothing, on every
    // worker, whatever the leader does.
    assert_eq!(r3.resumes(), 0);
    envoy.advance(400 * MS);
    assert_eq!(envoy.record(KEY).limit(envoy_now(&w)), 0);
    r1.complete();
    w.deliver_wake_ups();
    assert_eq!(r3.resumes(), 0, "a freed slot goes nowhere past the lease");
    assert_quiet();
}

fn envoy_now(w: &FakeWorker) -> u64 {
    use crate::host::Host;
    w.host.now_ns()
}

#[test]
fn after_the_lease_the_fallback_then_nothing() {
    let envoy = FakeEnvoy::new();
    let w = leader(&envoy, 10);
    let share = open(&w, "Share").unwrap();
    let seq = reports(&share).last().unwrap().seq;
    // Share 8 of 10 among 2 watchers: fallback min(8, 10 / 2) = 5.
    w.grpc_message(share.token, &grant(1, 8, 100, seq, 100));
    let t0 = envoy_now(&w);
    let r = envoy.record(KEY);
    assert_eq!(r.limit(t0), 8);
    assert_eq!(r.limit(t0 + 150_000_000), 5);
    assert_eq!(r.limit(t0 + 250_000_000), 0);
    assert_quiet();
}

#[test]
fn an_older_grant_is_ignored_and_the_same_version_only_renews() {
    let envoy = FakeEnvoy::new();
    let w = leader(&envoy, 10);
    let share = open(&w, "Share").unwrap();
    let seq = reports(&share).last().unwrap().seq;
    w.grpc_message(share.token, &grant(2, 4, 1000, seq, 0));
    w.grpc_message(share.token, &grant(1, 9, 1000, seq, 0));
    assert_eq!(envoy.record(KEY).share.unwrap().slots, 4);
    envoy.advance(200 * MS);
    w.tick();
    let seq2 = reports(&open(&w, "Share").unwrap()).last().unwrap().seq;
    assert!(seq2 > seq);
    let before = envoy.record(KEY).share_lease.until_ns;
    w.grpc_message(share.token, &grant(2, 9, 1000, seq2, 0));
    let r = envoy.record(KEY);
    assert_eq!(r.share.unwrap().slots, 4, "same version: shares unchanged");
    assert!(r.share_lease.until_ns > before, "but the lease is renewed");
    assert_quiet();
}

#[test]
fn a_reconnect_keeps_the_grant_and_names_the_old_stream() {
    let envoy = FakeEnvoy::new();
    let w = leader(&envoy, 10);
    let share = open(&w, "Share").unwrap();
    let seq = reports(&share).last().unwrap().seq;
    w.grpc_message(share.token, &grant(1, 3, 2000, seq, 0));
    w.grpc_close(share.token, 14);
    assert!(take_problems()
        .iter()
        .any(|p| p.contains("closed with gRPC status 14")));
    assert!(open(&w, "Share").is_none());
    assert_eq!(envoy.record(KEY).share.unwrap().slots, 3, "kept");
    envoy.advance(150 * MS);
    w.tick();
    let again = open(&w, "Share").expect("reopened after the backoff");
    let first = &reports(&again)[0];
    assert_eq!(
        (first.seq, first.applied_version, first.replaces),
        (
            1,
            0,
            Some(StreamRef {
                epoch: 7,
                watcher: 3
            })
        )
    );
    assert_eq!(first.pools[0].holding, 3);
    assert_eq!(envoy.record(KEY).limit(envoy_now(&w)), 3);
    assert_quiet();
}

#[test]
fn a_new_leader_vm_takes_the_grant_over() {
    let envoy = FakeEnvoy::new();
    let a = leader(&envoy, 10);
    let b = FakeWorker::start(&envoy, &config(true));
    b.tick();
    let share = open(&a, "Share").unwrap();
    let seq = reports(&share).last().unwrap().seq;
    a.grpc_message(share.token, &grant(1, 3, 5000, seq, 0));
    // A's VM vanishes without on_done: its lease in shared data runs out.
    drop(a);
    for _ in 0..30 {
        envoy.advance(100 * MS);
        b.tick();
    }
    let s = open(&b, "Share").expect("b leads and shares");
    let first = &reports(&s)[0];
    assert_eq!(first.replaces.map(|r| r.watcher), Some(3));
    assert_eq!(envoy.record(KEY).limit(envoy_now(&b)), 3, "still enforced");
    assert_quiet();
}

#[test]
fn leaving_sets_every_share_to_0_then_sends_a_final_report() {
    let envoy = FakeEnvoy::new();
    let w = leader(&envoy, 10);
    let share = open(&w, "Share").unwrap();
    let seq = reports(&share).last().unwrap().seq;
    w.grpc_message(share.token, &grant(1, 3, 2000, seq, 0));
    w.done();
    let s = w
        .grpc_streams()
        .into_iter()
        .find(|s| s.token == share.token)
        .unwrap();
    let last = reports(&s).pop().unwrap();
    assert!(last.r#final);
    assert!(s.end_stream, "the final report ends our side");
    assert_eq!((last.pools[0].holding, last.pools[0].in_flight), (0, 0));
    assert_eq!(envoy.record(KEY).share.unwrap().slots, 0);
    assert_quiet();
}

/// Logged problems, but the configuration's own warning (no capacity in
/// sluice.yaml: sync gives it).
fn assert_quiet() {
    let problems: Vec<String> = take_problems()
        .into_iter()
        .filter(|p| !p.contains("capacity: not set"))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn with_instances_each_instance_is_a_pool_with_its_own_share() {
    const A: &str = "127.0.0.1:8001";
    const B: &str = "127.0.0.1:8002";
    let envoy = FakeEnvoy::new();
    let mut doc = config(true);
    doc["instances"] = json!({"hosts": [A, B]});
    let w = FakeWorker::start(&envoy, &doc);
    w.tick();
    let watch = open(&w, "Watch").unwrap();
    w.grpc_message(watch.token, &snapshot(4));
    envoy.advance(10 * MS);
    w.tick();
    // Shared, nothing granted: a request waits, and is reported on both
    // instances (any would serve it).
    let mut r1 = w.request("GET", PATH);
    assert_eq!(r1.action, Action::Pause);
    envoy.advance(MS);
    w.tick();
    let share = open(&w, "Share").unwrap();
    let last = reports(&share).pop().unwrap();
    let pools: Vec<_> = last
        .pools
        .iter()
        .map(|p| (p.address.as_str(), p.holding, p.queued))
        .collect();
    assert_eq!(pools, [(A, 0, 1), (B, 0, 1)]);
    // Granted 1 on B only: the waiter goes to B, the next waits.
    let g = ShareGrant {
        share_version: 1,
        shares: vec![PoolShare {
            path: PATH.into(),
            address: B.into(),
            share: 1,
        }],
        lease_ms: 1000,
        lease_for_seq: last.seq,
        fallback_for_ms: 0,
        watchers: 3,
        stream: None,
    };
    w.grpc_message(share.token, &g.encode_to_vec());
    w.deliver_wake_ups();
    assert_eq!(r1.resumes(), 1);
    assert_eq!(r1.request_header("x-sluice-host").as_deref(), Some(B));
    let r2 = w.request("GET", PATH);
    assert_eq!(r2.action, Action::Pause, "A holds 0, B is full");
    let st = w.stats();
    let instances = st["endpoints"][PATH]["instances"].as_array().unwrap();
    assert_eq!(instances[0]["share"]["admits"], 0);
    assert_eq!(instances[1]["share"]["admits"], 1);
    r1.served_by(B);
    r1.complete();
    assert_quiet();
}

#[test]
fn a_configuration_without_shares_after_one_with_them_unshares_the_records() {
    let envoy = FakeEnvoy::new();
    let old = leader(&envoy, 10);
    let share = open(&old, "Share").unwrap();
    let seq = reports(&share).last().unwrap().seq;
    old.grpc_message(share.token, &grant(1, 3, 500, seq, 0));
    assert_eq!(envoy.record(KEY).share.unwrap().slots, 3);
    // A listener update turns shares off: its VM leads at once.
    let new = FakeWorker::start(&envoy, &config(false));
    new.tick();
    // The old leader sees it lost the lease at its next lease check, and
    // may write its shares again until then.
    old.tick();
    envoy.advance(Duration::from_millis(100));
    old.tick();
    new.tick();
    assert!(open(&new, "Share").is_none());
    assert!(open(&old, "Share").is_none(), "the old leader left office");
    let r = envoy.record(KEY);
    assert_eq!(r.share, None, "not left to run out and admit nothing");
    envoy.advance(Duration::from_secs(2));
    assert_eq!(envoy.record(KEY).limit(envoy_now(&new)), 10);
    assert_quiet();
}

#[test]
fn changes_of_demand_that_free_slots_are_reported_at_once_not_at_the_interval() {
    let envoy = FakeEnvoy::new();
    let w = leader(&envoy, 10);
    let share = open(&w, "Share").unwrap();
    let sent = || reports(&open(&w, "Share").unwrap());
    let seq = sent().last().unwrap().seq;
    w.grpc_message(share.token, &grant(1, 2, 5000, seq, 0));
    envoy.advance(30 * MS);
    w.tick();
    let quiet = sent().len();
    let tick = |ms: u32| {
        envoy.advance(ms * MS);
        w.tick();
    };
    tick(30);
    assert_eq!(sent().len(), quiet, "nothing changed: the interval");
    // A queue starts on a share of 2: reported within a tick.
    let mut r1 = w.request("GET", PATH);
    let mut r2 = w.request("GET", PATH);
    let mut r3 = w.request("GET", PATH);
    assert_eq!(r3.action, Action::Pause);
    tick(10);
    let last = sent().pop().unwrap();
    assert_eq!(sent().len(), quiet + 1);
    let p = &last.pools[0];
    assert_eq!((p.holding, p.in_flight, p.queued), (2, 2, 1));
    // Lowered to 1: acknowledged as the grant arrives, within PROMPT_GAP
    // of the last report.
    tick(1);
    w.grpc_message(share.token, &grant(2, 1, 5000, last.seq, 0));
    let ack = sent().pop().unwrap();
    assert_eq!(sent().len(), quiet + 2);
    assert_eq!((ack.applied_version, ack.pools[0].holding), (2, 1));
    // The same version again only renews: no report.
    w.grpc_message(share.token, &grant(2, 1, 5000, ack.seq, 0));
    tick(10);
    assert_eq!(sent().len(), quiet + 2);
    tick(10);
    // A request above the lowered share ends: sync counted it.
    r1.complete();
    w.deliver_wake_ups();
    assert_eq!(r3.resumes(), 0, "1 in flight of a share of 1");
    tick(25);
    let p = sent().pop().unwrap().pools.remove(0);
    assert_eq!(sent().len(), quiet + 3);
    assert_eq!((p.holding, p.in_flight, p.queued), (1, 1, 1));
    tick(25);
    assert_eq!(sent().len(), quiet + 3, "at its share, queue unchanged");
    // The queue ends: what it holds may be spare.
    r2.complete();
    w.deliver_wake_ups();
    assert_eq!(r3.resumes(), 1);
    tick(25);
    let p = sent().pop().unwrap().pools.remove(0);
    assert_eq!(sent().len(), quiet + 4);
    assert_eq!((p.holding, p.in_flight, p.queued), (1, 1, 0));
    // The last request ends: its slot is spare here.
    r3.complete();
    tick(25);
    let p = sent().pop().unwrap().pools.remove(0);
    assert_eq!(sent().len(), quiet + 5);
    assert_eq!((p.holding, p.in_flight, p.queued), (1, 0, 0));
    tick(100);
    assert_eq!(sent().len(), quiet + 5, "idle: the interval");
    assert_quiet();
}

#[test]
fn a_growing_queue_is_reported_when_its_demand_doubles() {
    let envoy = FakeEnvoy::new();
    let w = leader(&envoy, 10);
    let share = open(&w, "Share").unwrap();
    let sent = || reports(&open(&w, "Share").unwrap());
    let seq = sent().last().unwrap().seq;
    w.grpc_message(share.token, &grant(1, 1, 5000, seq, 0));
    let tick = |ms: u32| {
        envoy.advance(ms * MS);
        w.tick();
    };
    tick(30);
    let mut held = vec![w.request("GET", PATH), w.request("GET", PATH)];
    tick(25);
    let quiet = sent().len();
    let p = sent().pop().unwrap().pools.remove(0);
    assert_eq!((p.in_flight, p.queued), (1, 1), "the queue started");
    held.push(w.request("GET", PATH));
    tick(25);
    assert_eq!(sent().len(), quiet, "demand 2 to 3: the interval");
    held.push(w.request("GET", PATH));
    tick(25);
    assert_eq!(sent().len(), quiet + 1, "demand doubled: at once");
    assert_eq!(sent().pop().unwrap().pools[0].queued, 3);
    for r in held.iter_mut() {
        r.reset();
    }
    assert_quiet();
}
