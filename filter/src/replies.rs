//! The replies the filter makes itself: each says why in `x-sluice-reason`
//! and in a JSON body, built with serde_json so that any endpoint path
//! (quotes, backslashes) stays valid JSON.

use crate::host::Host;
use crate::routes::{Route, Routes};
use crate::status;
use serde_json::json;
use sluice_core::admission::{self, WorkerId};
use sluice_core::shared_data::SharedData;

/// A local reply, instead of the upstream's.
pub enum LocalReply<'a> {
    /// 503: `max_queue` requests already wait.
    QueueFull(&'a Route),
    /// 504: waited `queue_timeout` without getting a slot.
    QueueTimeout(&'a Route),
    /// 503: the backend failed its health checks (new or queued request).
    Unhealthy(&'a Route),
    /// 200: the stats document, served by worker `.1` (the numbers are the
    /// whole process's; the worker is there so a client can tell who read
    /// them, e.g. to time how fast a change reaches each worker).
    /// With the index of the worker that answers, if it has one yet.
    Stats(&'a Routes, Option<WorkerId>),
}

impl LocalReply<'_> {
    pub fn status(&self) -> u32 {
        match self {
            LocalReply::QueueFull(_) => 503,
            LocalReply::QueueTimeout(_) => 504,
            LocalReply::Unhealthy(_) => 503,
            LocalReply::Stats(..) => 200,
        }
    }

    /// The `x-sluice-reason` header and the body's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            LocalReply::QueueFull(_) => "queue-full",
            LocalReply::QueueTimeout(_) => "queue-timeout",
            LocalReply::Unhealthy(_) => "unhealthy",
            LocalReply::Stats(..) => "stats",
        }
    }

    /// Answers the host's current request with this reply.
    pub fn send<H: Host>(&self, host: &H) {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("x-sluice-reason", self.reason()),
        ];
        let retry_after;
        match self {
            LocalReply::QueueFull(route) => {
                // Come back once a whole queue timeout has passed.
                retry_after = route
                    .queue_timeout
                    .as_secs_f64()
                    .ceil()
                    .max(1.0)
                    .to_string();
                headers.push(("retry-after", &retry_after));
            }
            LocalReply::QueueTimeout(_) | LocalReply::Unhealthy(_) => {}
            LocalReply::Stats(..) => headers.push(("cache-control", "no-store")),
        }
        let body = self.body(host, host.now_ns());
        if let Err(e) = host.send_http_response(self.status(), headers, body.as_bytes()) {
            log::warn!("cannot send the {} reply: {e:?}", self.status());
        }
    }

    /// The JSON body; the stats are read from `store`, so every worker
    /// answers with the whole process's numbers (ages as of `now_ns`).
    pub fn body<S: SharedData>(&self, store: &S, now_ns: u64) -> String {
        match self {
            LocalReply::QueueFull(route) => line(json!({
                "error": "too many requests waiting",
                "reason": self.reason(),
                "endpoint": route.path,
                "max_queue": route.max_queue,
            })),
            LocalReply::QueueTimeout(route) => line(json!({
                "error": "timed out waiting for a slot",
                "reason": self.reason(),
                "endpoint": route.path,
                "queue_timeout_ms": route.queue_timeout.as_millis() as u64,
            })),
            LocalReply::Unhealthy(route) => line(json!({
                "error": "backend unhealthy",
                "reason": self.reason(),
                "endpoint": route.path,
            })),
            LocalReply::Stats(routes, worker) => {
                let mut doc = stats(store, routes, now_ns);
                doc["served_by_worker"] = (*worker).into();
                doc.to_string()
            }
        }
    }
}

/// A document on one line, as curl users expect.
fn line(doc: serde_json::Value) -> String {
    format!("{doc}\n")
}

/// A superset of fastapi-balancer's stats document. The capacity is the one
/// in force (shared record); `null` while an endpoint has none (it passes).
fn stats<S: SharedData>(store: &S, routes: &Routes, now_ns: u64) -> serde_json::Value {
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
