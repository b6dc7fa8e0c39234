//! The stats document at `stats.path` (default `/balancer/stats`), a
//! superset of fastapi-balancer's. Read from shared data, so every worker
//! answers with the whole process's numbers.
//!
//! Its cost grows with the endpoints (a shared-data read and a JSON object
//! each: about 13 ms of Envoy CPU for 1,001), and anyone who can reach the
//! path may ask for it as often as they like. So a worker that took long to
//! build a body serves that body again for [`REUSE_FACTOR`] times as long
//! as it took to build: whatever the request rate, the stats take at most
//! about 1/(1 + REUSE_FACTOR) of each worker, and the numbers are at most
//! that old (~0.25 s at 1,001 endpoints). A body that took less than
//! [`CACHE_ABOVE`] to build (tens of endpoints) is never reused: small
//! configurations see every change at once, as before.

use super::status;
use crate::host::Host;
use crate::metrics::{Counter, Metrics};
use crate::replies::details;
use crate::routes::Routes;
use serde_json::json;
use sluice_core::admission::{self, WorkerId};
use std::cell::RefCell;
use std::time::Duration;

/// A body that cost this much to build is reused for this many times its
/// cost.
pub const REUSE_FACTOR: u32 = 20;
/// Bodies quicker to build than this are never reused.
pub const CACHE_ABOVE: Duration = Duration::from_millis(1);

/// One worker's last stats body, while it may be served again.
#[derive(Default)]
pub struct Cache {
    last: RefCell<Option<Cached>>,
}

struct Cached {
    /// The document without `served_by_worker`, serialised.
    body: String,
    /// Host time (ns) until which it is served again.
    until_ns: u64,
}

/// Answers the current request with the stats, served by `worker` (the
/// numbers are the whole process's; the worker is there so a client can
/// tell who read them, e.g. to time how fast a change reaches each worker).
pub fn send<H: Host>(
    host: &H,
    routes: &Routes,
    metrics: &Metrics,
    worker: Option<WorkerId>,
    cache: &Cache,
) {
    let body = cache.body(host, routes, metrics);
    // `{"served_by_worker":N,` + the rest of the cached object.
    let served_by = serde_json::Value::from(worker);
    let body = match body.strip_prefix('{') {
        Some(rest) if rest.starts_with('}') => format!("{{\"served_by_worker\":{served_by}}}"),
        Some(rest) => format!("{{\"served_by_worker\":{served_by},{rest}"),
        None => body,
    };
    let headers = vec![
        ("content-type", "application/json"),
        ("x-sluice-reason", "stats"),
        ("cache-control", "no-store"),
    ];
    if let Err(e) = host.send_local_reply(200, None, details::STATS, headers, body.as_bytes()) {
        log::warn!("cannot send the 200 reply: {e:?}");
    }
}

impl Cache {
    /// The body to serve now: the last one while it is young enough, else
    /// a new one.
    fn body<H: Host>(&self, host: &H, routes: &Routes, metrics: &Metrics) -> String {
        let start = host.now_ns();
        if let Some(c) = &*self.last.borrow() {
            if start < c.until_ns {
                return c.body.clone();
            }
        }
        let body = document(host, routes, metrics, start).to_string();
        let cost = host.now_ns().saturating_sub(start);
        *self.last.borrow_mut() = (cost >= CACHE_ABOVE.as_nanos() as u64).then(|| Cached {
            body: body.clone(),
            until_ns: host
                .now_ns()
                .saturating_add(cost.saturating_mul(u64::from(REUSE_FACTOR))),
        });
        body
    }
}

/// Each instance of an endpoint's record, as the dashboard shows it.
fn instances(s: &admission::EndpointState, now_ns: u64) -> Vec<serde_json::Value> {
    s.instances
        .iter()
        .map(|i| {
            let ejected = i.ejected(now_ns);
            let mut entry = json!({
                "address": i.address.to_string(),
                "capacity": i.own_capacity.or(s.capacity),
                "capacity_source": if i.own_from_sync { "sync" } else if i.own_capacity.is_some() { "instance" } else { "endpoint" },
                "in_flight": i.active,
                "ejected": ejected,
                "ejected_for_ms": if ejected { (i.eject_until_ns - now_ns) / 1_000_000 } else { 0 },
                "failures": i.strikes,
                "picks_missed": i.picks_missed,
                "gone": i.gone,
            });
            if i.share.is_some() {
                entry["share"] = share(i.share, &s.share_lease, now_ns);
            }
            entry
        })
        .collect()
}

/// This Envoy's share of a pool (`sync.shares`): the grant's slots, its
/// fallback, and what it admits now; `null`: not shared.
fn share(
    share: Option<admission::Share>,
    lease: &admission::ShareLease,
    now_ns: u64,
) -> serde_json::Value {
    match share {
        None => serde_json::Value::Null,
        Some(sh) => json!({
            "slots": sh.slots,
            "fallback": sh.fallback,
            "admits": sh.at(lease, now_ns),
        }),
    }
}

/// An endpoint with `cost`: its units in flight and waiting against its
/// capacity in units (`active_requests` and `available_slots` count units
/// too), and how a request's cost is found.
fn cost_entry(
    cost: &sluice_core::config::Cost,
    s: &admission::EndpointState,
    now_ns: u64,
) -> serde_json::Value {
    let capacity = s.total_capacity(now_ns);
    json!({
        "units_in_flight": s.active,
        "capacity_units": capacity,
        "available_units": capacity.map(|c| c.saturating_sub(s.active)),
        "queued_units": s.queued_units(),
        "header": cost.header,
        "unit_bytes": cost.unit_bytes,
        "min": cost.min,
        "without_length": cost.without_length,
        "over_capacity": match cost.over_capacity {
            admission::OverCapacity::Alone => "alone",
            admission::OverCapacity::Refuse => "refuse",
        },
    })
}

/// The capacity is the one in force (shared record); `null` while an
/// endpoint has none (it passes). Ages as of `now_ns`.
fn document<H: Host>(
    store: &H,
    routes: &Routes,
    metrics: &Metrics,
    now_ns: u64,
) -> serde_json::Value {
    let mut endpoints = serde_json::Map::new();
    for (ep, r) in routes.endpoints.iter().enumerate() {
        // One read of the record for everything below.
        let state = admission::snapshot(store, &r.key);
        let mut entry = match &state {
            Ok(s) => json!({
                "capacity": s.capacity,
                "capacity_source": s.source.as_str(),
                "configured_capacity": r.configured,
                // With instances, the sum of those that can be picked now.
                "total_capacity": s.total_capacity(now_ns),
                "active_requests": s.active,
                "available_slots": s.total_capacity(now_ns).map(|c| c.saturating_sub(s.active)),
                "queued": s.queued(),
                "max_queue": r.max_queue,
                "queue_timeout": r.queue_timeout.as_secs_f64(),
                "sync_version": s.sync_version,
                "unhealthy": s.unhealthy,
                "instances_source": if s.instances.is_empty() {
                    None
                } else if s.instances_from_sync {
                    Some("sync")
                } else {
                    Some("config")
                },
                "instances": instances(s, now_ns),
            }),
            Err(e) => json!({ "capacity": r.configured, "error": e.to_string() }),
        };
        // Only when shared (`sync.shares`): the document is otherwise as
        // it was.
        if let Ok(s) = &state {
            if s.share.is_some() {
                entry["share"] = share(s.share, &s.share_lease, now_ns);
                entry["share_lease_left_ms"] =
                    json!(s.share_lease.until_ns.saturating_sub(now_ns) / 1_000_000);
                entry["share_fallback_left_ms"] =
                    json!(s.share_lease.fallback_until_ns.saturating_sub(now_ns) / 1_000_000);
            }
        }
        // Only with `cost`: the record's counts are units, not requests.
        if let (Some(cost), Ok(s)) = (&r.cost, &state) {
            entry["cost"] = cost_entry(cost, s, now_ns);
        }
        if let (Some(classes), Ok(s)) = (&routes.classes, &state) {
            let by_class: serde_json::Map<String, serde_json::Value> = classes
                .list
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let i = i as u8;
                    let mut class = json!({
                        "priority": c.priority,
                        "sheddable": c.sheddable,
                        "queued": s.queued_of(i),
                        "max_queue": c.max_queue,
                        "queue_timeout": routes.queue_timeout(r, i).as_secs_f64(),
                    });
                    // What became of the class's requests: Envoy's counters,
                    // every worker's up to its last tick (none with
                    // `metrics: false`).
                    let counts = metrics.read_counters(store, ep, i);
                    if !counts.is_empty() {
                        class["outcomes"] = counts
                            .into_iter()
                            .filter(|(c, _)| *c != Counter::PicksMissed)
                            .map(|(c, n)| (c.label().to_string(), json!(n)))
                            .collect();
                    }
                    (c.name.clone(), class)
                })
                .collect();
            entry["classes"] = json!(by_class);
        }
        if let (Some(t), Ok(s)) = (&routes.tenants, &state) {
            // The busiest flows (tenants hash onto them): at most 5, so the
            // document stays small whatever the number of tenants.
            let by_flow = crate::metrics::queued_by_flow(s);
            let mut busiest: Vec<(usize, u32)> = by_flow[..usize::from(t.flows)]
                .iter()
                .copied()
                .enumerate()
                .filter(|&(_, n)| n > 0)
                .collect();
            busiest.sort_by_key(|&(f, n)| (std::cmp::Reverse(n), f));
            busiest.truncate(5);
            entry["tenants"] = json!({
                "flows": t.flows,
                "busiest_flows": busiest
                    .into_iter()
                    .map(|(flow, queued)| json!({"flow": flow, "queued": queued}))
                    .collect::<Vec<_>>(),
            });
        }
        if let Some((cap, key)) = &r.queued_bytes {
            entry["max_queued_bytes"] = json!(cap);
            entry["queued_bytes"] = json!(sluice_core::queued_bytes::total(store, key));
        }
        endpoints.insert(r.path.clone(), entry);
    }
    let service = status::for_stats(store, &routes.service, now_ns);
    json!({
        "service": routes.service,
        "sync": service.sync,
        "health": service.health,
        "leader": service.leader,
        "endpoints": endpoints,
    })
}
