//! Cost per request through the whole filter (fake host): units by
//! `content-length` or a header, no backfill past the head, a small
//! tenant's turn behind a flood of big requests, `too-costly` refusals, and
//! the stats in units.

use crate::admin::STATS_PATH;
use crate::fake_host::{take_problems, FakeEnvoy, FakeStream, FakeWorker};
use crate::replies::grpc;
use proxy_wasm::types::Action;
use serde_json::{json, Value};

const PATH: &str = "/upload";
const KEY: &str = "sluice:t:ep:/upload";
const MB: u64 = 1_000_000;
const BIG: &str = "25000000";
const SMALL: &str = "1000";

/// Capacity 50 units of 1 MB; `over_capacity` as given.
fn config(over_capacity: &str) -> Value {
    json!({
        "service": "t",
        "tenants": {"header": "x-tenant"},
        "endpoints": {PATH: {"capacity": 50, "queue_timeout": 5, "cost": {
            "header": "x-cost", "unit_bytes": MB, "over_capacity": over_capacity,
        }}},
    })
}

fn upload(w: &FakeWorker, tenant: &str, length: &str) -> FakeStream {
    w.request_with(
        "POST",
        PATH,
        &[("x-tenant", tenant), ("content-length", length)],
    )
}

fn assert_quiet() {
    let problems = take_problems();
    assert!(problems.is_empty(), "{problems:#?}");
}

fn units(envoy: &FakeEnvoy) -> u32 {
    envoy.record(KEY).active
}

#[test]
fn units_by_length_fit_the_capacity_and_nobody_backfills_past_the_head() {
    let envoy = FakeEnvoy::new();
    let w1 = FakeWorker::start(&envoy, &config("alone"));
    let w2 = FakeWorker::start(&envoy, &config("alone"));
    let mut a = upload(&w1, "a", BIG);
    let mut b = upload(&w2, "a", "24000001"); // 25 units, rounded up
    assert_eq!((a.action, b.action), (Action::Continue, Action::Continue));
    assert_eq!(units(&envoy), 50);
    let mut c = upload(&w1, "a", BIG);
    // It would fit 1 unit, but waits behind c (same tenant, FIFO).
    let d = upload(&w2, "a", SMALL);
    assert!(c.is_waiting() && d.is_waiting());
    let stats = w1.request("GET", STATS_PATH).reply().json();
    let cost = &stats["endpoints"][PATH]["cost"];
    assert_eq!(cost["units_in_flight"], 50);
    assert_eq!(cost["capacity_units"], 50);
    assert_eq!(cost["queued_units"], 26);
    assert_eq!(cost["unit_bytes"], MB);
    a.complete();
    w1.deliver_wake_ups();
    w2.deliver_wake_ups();
    assert_eq!(c.resumes(), 1);
    assert!(d.is_waiting(), "25 + 25 + 1 > 50");
    b.complete();
    w2.deliver_wake_ups();
    assert_eq!(d.resumes(), 1);
    assert_eq!(units(&envoy), 26);
    c.complete();
    let mut d = d;
    d.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn a_small_tenant_is_not_behind_a_flood_of_big_requests() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config("alone"));
    let mut held = vec![upload(&w, "a", BIG), upload(&w, "a", BIG)];
    let flood: Vec<FakeStream> = (0..10).map(|_| upload(&w, "a", BIG)).collect();
    let small = upload(&w, "b", SMALL);
    assert!(small.is_waiting());
    held.remove(0).complete();
    w.deliver_wake_ups();
    assert_eq!(small.resumes(), 1, "its tenant's turn comes first");
    assert_eq!(flood[0].resumes(), 0, "25 + 1 + 25 > 50");
    assert_eq!(units(&envoy), 26);
    assert_quiet();
}

#[test]
fn a_request_costing_more_than_the_capacity_runs_alone_or_is_refused() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config("alone"));
    let mut small = upload(&w, "a", SMALL);
    let mut huge = upload(&w, "a", "80000000");
    assert!(huge.is_waiting(), "alone: it waits until nothing else runs");
    small.complete();
    w.deliver_wake_ups();
    assert_eq!(huge.resumes(), 1);
    assert_eq!(units(&envoy), 80);
    let mut next = upload(&w, "a", SMALL);
    assert!(next.is_waiting(), "nothing beside it");
    huge.complete();
    w.deliver_wake_ups();
    assert_eq!(next.resumes(), 1);
    next.complete();
    envoy.assert_neutral(KEY);

    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config("refuse"));
    let refused = upload(&w, "a", "80000000");
    let reply = refused.reply();
    assert_eq!(reply.status, 413);
    assert_eq!(reply.header("x-sluice-reason"), Some("too-costly"));
    assert_eq!(reply.header("retry-after"), None, "it never fits");
    let body = reply.json();
    assert_eq!(
        (body["cost"].clone(), body["capacity"].clone()),
        (json!(80), json!(50))
    );
    envoy.assert_neutral(KEY);
    let grpc_call = w.request_with(
        "POST",
        PATH,
        &[("content-type", "application/grpc"), ("x-cost", "51")],
    );
    assert_eq!(
        grpc_call.reply().grpc_status,
        Some(grpc::RESOURCE_EXHAUSTED)
    );
    // The whole capacity is admitted.
    let mut whole = w.request_with("POST", PATH, &[("x-cost", "50")]);
    assert_eq!(whole.action, Action::Continue);
    whole.complete();
    w.tick();
    assert_eq!(
        envoy.metric("sluice.t./upload.too_costly.outcomes_total"),
        2,
        "both refusals counted"
    );
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn the_cost_header_wins_and_a_bad_one_falls_back_to_the_length() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(&envoy, &config("alone"));
    let mut by_header = w.request_with("POST", PATH, &[("x-cost", "7"), ("content-length", BIG)]);
    assert_eq!(units(&envoy), 7);
    let mut bad = w.request_with(
        "POST",
        PATH,
        &[("x-cost", "lots"), ("content-length", "3000000")],
    );
    assert_eq!(units(&envoy), 10);
    // No header, no length, no body: the least cost.
    let mut bare = w.request("GET", PATH);
    assert_eq!(units(&envoy), 11);
    by_header.complete();
    bad.complete();
    bare.complete();
    envoy.assert_neutral(KEY);
    assert_quiet();
}

#[test]
fn without_cost_the_length_is_never_read() {
    let envoy = FakeEnvoy::new();
    let w = FakeWorker::start(
        &envoy,
        &json!({"service": "t", "endpoints": {PATH: {"capacity": 2}}}),
    );
    w.host.take_calls();
    let mut s = upload(&w, "a", BIG);
    assert_eq!(units(&envoy), 1);
    let calls = w.host.take_calls();
    let header_reads = calls
        .iter()
        .filter(|c| **c == "get_http_request_header")
        .count();
    assert_eq!(header_reads, 1, ":path only: {calls:?}");
    s.complete();
    assert_quiet();
}
