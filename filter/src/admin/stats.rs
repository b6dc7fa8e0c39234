//! The stats document at `stats.path` (default `/balancer/stats`), a
//! superset of fastapi-balancer's. Read from shared data, so every worker answers with
//! the whole process's numbers.

use super::status;
use crate::host::Host;
use crate::replies::details;
use crate::routes::Routes;
use serde_json::json;
use sluice_core::admission::{self, WorkerId};
use sluice_core::shared_data::SharedData;

/// Answers the current request with the stats, served by `worker` (the
/// numbers are the whole process's; the worker is there so a client can
/// tell who read them, e.g. to time how fast a change reaches each worker).
pub fn send<H: Host>(host: &H, routes: &Routes, worker: Option<WorkerId>) {
    let mut doc = document(host, routes, host.now_ns());
    doc["served_by_worker"] = worker.into();
    let headers = vec![
        ("content-type", "application/json"),
        ("x-sluice-reason", "stats"),
        ("cache-control", "no-store"),
    ];
    if let Err(e) = host.send_local_reply(200, details::STATS, headers, doc.to_string().as_bytes()) {
        log::warn!("cannot send the 200 reply: {e:?}");
    }
}

/// The capacity is the one in force (shared record); `null` while an
/// endpoint has none (it passes). Ages as of `now_ns`.
fn document<S: SharedData>(store: &S, routes: &Routes, now_ns: u64) -> serde_json::Value {
    let mut endpoints = serde_json::Map::new();
    for r in &routes.endpoints {
        let mut entry = match admission::snapshot(store, &r.key) {
            Ok(s) => json!({
                "capacity": s.capacity,
                "capacity_source": s.source.as_str(),
                "configured_capacity": r.configured,
                "active_requests": s.active,
                "available_slots": s.capacity.map(|c| c.saturating_sub(s.active)),
                "queued": s.queued(),
                "max_queue": r.max_queue,
                "queue_timeout": r.queue_timeout.as_secs_f64(),
                "sync_version": s.sync_version,
                "unhealthy": s.unhealthy,
            }),
            Err(e) => json!({ "capacity": r.configured, "error": e.to_string() }),
        };
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
