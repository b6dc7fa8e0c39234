//! The replies the filter makes for a request instead of the upstream:
//! each says why in `x-sluice-reason` and in a JSON body, built with
//! serde_json so that any endpoint path (quotes, backslashes) stays valid
//! JSON. They are made off the admitted request's path.
//!
//! A gRPC request (`content-type: application/grpc…`) is refused in its own
//! protocol instead: a gRPC status a client can act on, the same reason
//! header, a one-line `grpc-message`, and `grpc-retry-pushback-ms` where a
//! retry later makes sense. Left to itself Envoy would turn our 503 and 504
//! alike into `UNAVAILABLE`, which gRPC clients retry at once.

use crate::host::Host;
use crate::routes::Route;
use serde_json::json;

/// A local reply, instead of the upstream's.
pub enum LocalReply<'a> {
    /// 503 (or the endpoint's `queue_full_status`): `max_queue` requests
    /// already wait.
    QueueFull(&'a Route),
    /// 504: waited `queue_timeout` without getting a slot.
    QueueTimeout(&'a Route),
    /// 503: the backend failed its health checks (new or queued request).
    Unhealthy(&'a Route),
    /// 503 (or `queue_full_status`): a sheddable class, and no slot free.
    Shed(&'a Route),
    /// 503 (or `queue_full_status`): a request of a higher class took this
    /// one's place in a full queue.
    PushedOut(&'a Route),
    /// 504: the request's own deadline (`grpc-timeout`,
    /// `x-envoy-expected-rq-timeout-ms`, `deadline_header`) passed while it
    /// waited; it never reached the backend.
    Deadline(&'a Route),
    /// 413: it costs (first figure) more units than the largest capacity it
    /// could run under (second), and its endpoint's `cost.over_capacity` is
    /// `refuse`. The same request never fits, so no retry advice: 413 says
    /// so (RFC 9110 15.5.14, content too large), where 429 or 503 invite a
    /// retry.
    TooCostly(&'a Route, u32, u32),
}

impl LocalReply<'_> {
    pub fn status(&self) -> u32 {
        match self {
            LocalReply::QueueFull(route)
            | LocalReply::Shed(route)
            | LocalReply::PushedOut(route) => u32::from(route.queue_full_status),
            LocalReply::QueueTimeout(_) | LocalReply::Deadline(_) => 504,
            LocalReply::Unhealthy(_) => 503,
            LocalReply::TooCostly(..) => 413,
        }
    }

    /// The `x-sluice-reason` header and the body's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            LocalReply::QueueFull(_) => "queue-full",
            LocalReply::QueueTimeout(_) => "queue-timeout",
            LocalReply::Unhealthy(_) => "unhealthy",
            LocalReply::Shed(_) => "shed",
            LocalReply::PushedOut(_) => "pushed-out",
            LocalReply::Deadline(_) => "deadline",
            LocalReply::TooCostly(..) => "too-costly",
        }
    }

    /// Envoy's response-code details for it (`%RESPONSE_CODE_DETAILS%` in
    /// the access log): one word per kind of reply.
    pub fn details(&self) -> &'static str {
        match self {
            LocalReply::QueueFull(_) => details::QUEUE_FULL,
            LocalReply::QueueTimeout(_) => details::QUEUE_TIMEOUT,
            LocalReply::Unhealthy(_) => details::UNHEALTHY,
            LocalReply::Shed(_) => details::SHED,
            LocalReply::PushedOut(_) => details::PUSHED_OUT,
            LocalReply::Deadline(_) => details::DEADLINE,
            LocalReply::TooCostly(..) => details::TOO_COSTLY,
        }
    }

    /// The gRPC status of the reply to a gRPC request.
    /// - queue full: `RESOURCE_EXHAUSTED`, the server's own resource (its
    ///   queue) is used up; clients do not retry it unless told to, and the
    ///   pushback says when.
    /// - queue timeout: `DEADLINE_EXCEEDED`, the server's deadline for
    ///   waiting ran out (a client's own `grpc-timeout` ends the same way);
    ///   retrying at once would only wait again.
    /// - unhealthy: `UNAVAILABLE`, the one a client should retry (on
    ///   another instance, with its own backoff).
    /// - too costly: `RESOURCE_EXHAUSTED`, without pushback: the request
    ///   needs more than the whole capacity.
    pub fn grpc_status(&self) -> u32 {
        match self {
            LocalReply::QueueFull(_)
            | LocalReply::Shed(_)
            | LocalReply::PushedOut(_)
            | LocalReply::TooCostly(..) => grpc::RESOURCE_EXHAUSTED,
            LocalReply::QueueTimeout(_) | LocalReply::Deadline(_) => grpc::DEADLINE_EXCEEDED,
            LocalReply::Unhealthy(_) => grpc::UNAVAILABLE,
        }
    }

    /// Milliseconds to wait before retrying, when a retry later makes
    /// sense (queue full, shed, pushed out): `measured_ms`, the time the
    /// queue ahead takes to drain at the endpoint's measured pace
    /// ([`crate::worker::Worker::retry_after_ms`]), or before anything is
    /// measured the endpoint's queue timeout (by then every request now
    /// waiting has been admitted or answered).
    pub fn retry_after_ms(&self, measured_ms: Option<u64>) -> Option<u64> {
        match self {
            LocalReply::QueueFull(route)
            | LocalReply::Shed(route)
            | LocalReply::PushedOut(route) => {
                Some(measured_ms.unwrap_or_else(|| (route.queue_timeout.as_millis() as u64).max(1)))
            }
            LocalReply::QueueTimeout(_)
            | LocalReply::Unhealthy(_)
            | LocalReply::Deadline(_)
            | LocalReply::TooCostly(..) => None,
        }
    }

    /// Answers with this reply, its retry advice not measured.
    pub fn send<H: Host>(&self, host: &H) {
        self.send_with_retry(host, None);
    }

    /// Answers the host's current request with this reply, in gRPC when the
    /// request is gRPC; `retry_ms` is the measured retry advice, if any
    /// (`Retry-After` in whole seconds, rounded up; `grpc-retry-pushback-ms`
    /// and the body's `retry_after_ms` exact).
    pub fn send_with_retry<H: Host>(&self, host: &H, retry_ms: Option<u64>) {
        let retry_ms = self.retry_after_ms(retry_ms);
        let grpc = host
            .get_http_request_header("content-type")
            .is_some_and(|t| is_grpc(&t));
        let sent = if grpc {
            let pushback_ms = retry_ms.map(|ms| ms.to_string());
            let mut headers = vec![("x-sluice-reason", self.reason())];
            if let Some(ms) = &pushback_ms {
                headers.push(("grpc-retry-pushback-ms", ms));
            }
            host.send_local_reply(
                self.status(),
                Some(self.grpc_status()),
                self.details(),
                headers,
                self.grpc_message().as_bytes(),
            )
        } else {
            let retry_after = retry_ms.map(|ms| ms.div_ceil(1000).to_string());
            let mut headers = vec![
                ("content-type", "application/json"),
                ("x-sluice-reason", self.reason()),
            ];
            if let Some(secs) = &retry_after {
                headers.push(("retry-after", secs));
            }
            let mut body = self.body();
            if let Some(ms) = retry_ms {
                // Exact, where the header has whole seconds only.
                let mut doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                doc["retry_after_ms"] = json!(ms);
                body = line(doc);
            }
            host.send_local_reply(
                self.status(),
                None,
                self.details(),
                headers,
                body.as_bytes(),
            )
        };
        if let Err(e) = sent {
            log::warn!("cannot send the {} reply: {e:?}", self.status());
        }
    }

    /// The `grpc-message` of a gRPC refusal: the JSON body's facts on one
    /// line (Envoy percent-encodes it).
    pub fn grpc_message(&self) -> String {
        match self {
            LocalReply::QueueFull(route) => format!(
                "sluice queue-full: too many requests waiting for {} (max_queue {})",
                route.path, route.max_queue
            ),
            LocalReply::QueueTimeout(route) => format!(
                "sluice queue-timeout: timed out waiting for a slot of {} (queue_timeout {} ms)",
                route.path,
                route.queue_timeout.as_millis()
            ),
            LocalReply::Unhealthy(route) => {
                format!(
                    "sluice unhealthy: the backend of {} is unhealthy",
                    route.path
                )
            }
            LocalReply::Shed(route) => format!(
                "sluice shed: no free slot of {} for a sheddable request",
                route.path
            ),
            LocalReply::PushedOut(route) => format!(
                "sluice pushed-out: a request of a higher class took this one's place in the full queue of {}",
                route.path
            ),
            LocalReply::Deadline(route) => format!(
                "sluice deadline: the request's own deadline passed while it waited for a slot of {}",
                route.path
            ),
            LocalReply::TooCostly(route, cost, capacity) => format!(
                "sluice too-costly: the request costs {cost} units, more than the capacity of {} ({capacity})",
                route.path
            ),
        }
    }

    /// The JSON body. `detail` repeats `error` because FastAPI's own
    /// errors put their text there, and so FastAPI clients show it.
    pub fn body(&self) -> String {
        match self {
            LocalReply::QueueFull(route) => line(json!({
                "error": "too many requests waiting",
                "detail": "too many requests waiting",
                "reason": self.reason(),
                "endpoint": route.path,
                "max_queue": route.max_queue,
            })),
            LocalReply::QueueTimeout(route) => line(json!({
                "error": "timed out waiting for a slot",
                "detail": "timed out waiting for a slot",
                "reason": self.reason(),
                "endpoint": route.path,
                "queue_timeout_ms": route.queue_timeout.as_millis() as u64,
            })),
            LocalReply::Unhealthy(route) => line(json!({
                "error": "backend unhealthy",
                "detail": "backend unhealthy",
                "reason": self.reason(),
                "endpoint": route.path,
            })),
            LocalReply::Shed(route) => line(json!({
                "error": "no free slot for a sheddable request",
                "detail": "no free slot for a sheddable request",
                "reason": self.reason(),
                "endpoint": route.path,
            })),
            LocalReply::PushedOut(route) => line(json!({
                "error": "pushed out of the queue by a request of a higher class",
                "detail": "pushed out of the queue by a request of a higher class",
                "reason": self.reason(),
                "endpoint": route.path,
                "max_queue": route.max_queue,
            })),
            LocalReply::Deadline(route) => line(json!({
                "error": "the request's deadline passed while it waited",
                "detail": "the request's deadline passed while it waited",
                "reason": self.reason(),
                "endpoint": route.path,
            })),
            LocalReply::TooCostly(route, cost, capacity) => line(json!({
                "error": "the request costs more than the whole capacity",
                "detail": "the request costs more than the whole capacity",
                "reason": self.reason(),
                "endpoint": route.path,
                "cost": cost,
                "capacity": capacity,
            })),
        }
    }
}

/// Whether Envoy takes the request for gRPC, by its rule
/// (`Grpc::Common::hasGrpcContentType`): `application/grpc`, alone or
/// followed by `+` (`+proto`, `+json`) or `;`. Only then does Envoy use the
/// gRPC status we pass.
pub fn is_grpc(content_type: &str) -> bool {
    content_type
        .strip_prefix("application/grpc")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

/// The gRPC status codes the filter answers with
/// (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>).
pub mod grpc {
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNAVAILABLE: u32 = 14;
}

/// `%RESPONSE_CODE_DETAILS%` of every reply the filter makes itself.
pub mod details {
    /// 503 or 429: `max_queue` (or `max_queued_bytes`) already waiting.
    pub const QUEUE_FULL: &str = "sluice_queue_full";
    /// 504: waited `queue_timeout`.
    pub const QUEUE_TIMEOUT: &str = "sluice_queue_timeout";
    /// 503: the backend failed its health checks.
    pub const UNHEALTHY: &str = "sluice_unhealthy";
    /// 503 or 429: a sheddable request found no free slot.
    pub const SHED: &str = "sluice_shed";
    /// 503 or 429: pushed out of a full queue by a higher class.
    pub const PUSHED_OUT: &str = "sluice_pushed_out";
    /// 504: the request's own deadline passed in the queue.
    pub const DEADLINE: &str = "sluice_deadline";
    /// 413: costs more than the whole capacity (`cost.over_capacity: refuse`).
    pub const TOO_COSTLY: &str = "sluice_too_costly";
    /// 408: an admitted request's body did not arrive within
    /// `max_upload_time` (`worker/uploads.rs`).
    pub const UPLOAD_TIMEOUT: &str = "sluice_upload_timeout";
    /// 200: the stats JSON.
    pub const STATS: &str = "sluice_stats";
    /// 200: the dashboard page.
    pub const DASHBOARD: &str = "sluice_dashboard";
    /// 401: the stats or the dashboard without valid credentials.
    pub const UNAUTHORIZED: &str = "sluice_unauthorized";
}

/// A document on one line, as curl users expect.
fn line(doc: serde_json::Value) -> String {
    format!("{doc}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::{take_problems, FakeEnvoy, FakeWorker};
    use crate::routes::Routes;
    use proxy_wasm::types::Action;
    use serde_json::json;
    use sluice_core::config::Config;
    use std::time::Duration;

    fn route(endpoint: serde_json::Value) -> Route {
        let config = Config::from_json(&json!({"endpoints": {"/p": endpoint}})).unwrap();
        Routes::new(&config).endpoints.remove(0)
    }

    #[test]
    fn grpc_content_types_as_envoy_tells_them() {
        for t in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc(t), "{t}");
        }
        for t in [
            "application/json",
            "application/grpc-web",
            "application/grpcx",
            "text/plain",
            "",
        ] {
            assert!(!is_grpc(t), "{t}");
        }
    }

    #[test]
    fn each_refusal_has_its_status_grpc_code_and_retry() {
        let r = route(json!({"capacity": 1, "queue_timeout": 2.5}));
        let cases = [
            (
                LocalReply::QueueFull(&r),
                503,
                grpc::RESOURCE_EXHAUSTED,
                Some(2500),
            ),
            (
                LocalReply::Shed(&r),
                503,
                grpc::RESOURCE_EXHAUSTED,
                Some(2500),
            ),
            (
                LocalReply::PushedOut(&r),
                503,
                grpc::RESOURCE_EXHAUSTED,
                Some(2500),
            ),
            (LocalReply::Deadline(&r), 504, grpc::DEADLINE_EXCEEDED, None),
            (
                LocalReply::QueueTimeout(&r),
                504,
                grpc::DEADLINE_EXCEEDED,
                None,
            ),
            (LocalReply::Unhealthy(&r), 503, grpc::UNAVAILABLE, None),
        ];
        for (reply, status, code, retry) in cases {
            assert_eq!(reply.status(), status, "{}", reply.reason());
            assert_eq!(reply.grpc_status(), code, "{}", reply.reason());
            // Before anything is measured: the queue timeout; once it is,
            // the measured figure.
            assert_eq!(reply.retry_after_ms(None), retry, "{}", reply.reason());
            assert_eq!(
                reply.retry_after_ms(Some(740)),
                retry.map(|_| 740),
                "{}",
                reply.reason()
            );
            assert!(
                reply
                    .grpc_message()
                    .starts_with(&format!("sluice {}: ", reply.reason())),
                "{}",
                reply.grpc_message()
            );
        }
        let r429 = route(json!({"capacity": 1, "queue_full_status": 429}));
        assert_eq!(LocalReply::QueueFull(&r429).status(), 429);
        // Only queue-full follows the key.
        assert_eq!(LocalReply::Unhealthy(&r429).status(), 503);
    }

    /// Through the whole filter: the gRPC request's refusals carry their
    /// code, the reason and the pushback, and no JSON content type; the
    /// HTTP request's the configured status and `Retry-After`. The timeout
    /// is sent from the worker's tick, for a stream made current there.
    #[test]
    fn grpc_requests_get_grpc_refusals_and_http_ones_the_configured_status() {
        let envoy = FakeEnvoy::new();
        let w = FakeWorker::start(
            &envoy,
            &json!({"service": "t", "endpoints": {"/p": {
                "capacity": 1, "queue_timeout": 0.1, "max_queue": 1, "queue_full_status": 429}}}),
        );
        let grpc = [("content-type", "application/grpc")];
        let mut held = w.request_with("POST", "/p", &grpc);
        assert_eq!(held.action, Action::Continue);
        let mut waiting = w.request_with("POST", "/p", &grpc);
        assert_eq!(waiting.action, Action::Pause);

        let mut full = w.request_with("POST", "/p", &grpc);
        let reply = full.reply();
        assert_eq!(reply.grpc_status, Some(grpc::RESOURCE_EXHAUSTED));
        assert_eq!(reply.header("x-sluice-reason"), Some("queue-full"));
        // Nothing measured yet: the queue timeout, in ms.
        assert_eq!(reply.header("grpc-retry-pushback-ms"), Some("100"));
        assert_eq!(reply.header("content-type"), None);
        assert!(
            reply.body.starts_with("sluice queue-full: "),
            "{}",
            reply.body
        );

        let mut http = w.request_with("POST", "/p", &[("content-type", "application/json")]);
        let reply = http.reply();
        assert_eq!((reply.status, reply.grpc_status), (429, None));
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.json()["reason"], "queue-full");
        assert_eq!(reply.json()["detail"], "too many requests waiting");

        envoy.advance(Duration::from_millis(100));
        w.tick();
        let reply = waiting.reply();
        assert_eq!(reply.grpc_status, Some(grpc::DEADLINE_EXCEEDED));
        assert_eq!(reply.header("x-sluice-reason"), Some("queue-timeout"));
        assert_eq!(reply.header("grpc-retry-pushback-ms"), None);

        for s in [&mut held, &mut waiting, &mut full, &mut http] {
            s.complete();
        }
        envoy.assert_neutral("sluice:t:ep:/p");
        let problems = take_problems();
        assert!(problems.is_empty(), "{problems:#?}");
    }
}
