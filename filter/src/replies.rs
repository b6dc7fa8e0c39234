//! The replies the filter makes for a request instead of the upstream:
//! each says why in `x-sluice-reason` and in a JSON body, built with
//! serde_json so that any endpoint path (quotes, backslashes) stays valid
//! JSON. They are made off the admitted request's path.

use crate::host::Host;
use crate::routes::Route;
use serde_json::json;

/// A local reply, instead of the upstream's.
pub enum LocalReply<'a> {
    /// 503: `max_queue` requests already wait.
    QueueFull(&'a Route),
    /// 504: waited `queue_timeout` without getting a slot.
    QueueTimeout(&'a Route),
    /// 503: the backend failed its health checks (new or queued request).
    Unhealthy(&'a Route),
}

impl LocalReply<'_> {
    pub fn status(&self) -> u32 {
        match self {
            LocalReply::QueueFull(_) => 503,
            LocalReply::QueueTimeout(_) => 504,
            LocalReply::Unhealthy(_) => 503,
        }
    }

    /// The `x-sluice-reason` header and the body's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            LocalReply::QueueFull(_) => "queue-full",
            LocalReply::QueueTimeout(_) => "queue-timeout",
            LocalReply::Unhealthy(_) => "unhealthy",
        }
    }

    /// Envoy's response-code details for it (`%RESPONSE_CODE_DETAILS%` in
    /// the access log): one word per kind of reply.
    pub fn details(&self) -> &'static str {
        match self {
            LocalReply::QueueFull(_) => details::QUEUE_FULL,
            LocalReply::QueueTimeout(_) => details::QUEUE_TIMEOUT,
            LocalReply::Unhealthy(_) => details::UNHEALTHY,
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
        }
        let body = self.body();
        if let Err(e) =
            host.send_local_reply(self.status(), self.details(), headers, body.as_bytes())
        {
            log::warn!("cannot send the {} reply: {e:?}", self.status());
        }
    }

    pub fn body(&self) -> String {
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
        }
    }
}

/// `%RESPONSE_CODE_DETAILS%` of every reply the filter makes itself.
pub mod details {
    /// 503: `max_queue` (or `max_queued_bytes`) already waiting.
    pub const QUEUE_FULL: &str = "sluice_queue_full";
    /// 504: waited `queue_timeout`.
    pub const QUEUE_TIMEOUT: &str = "sluice_queue_timeout";
    /// 503: the backend failed its health checks.
    pub const UNHEALTHY: &str = "sluice_unhealthy";
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
