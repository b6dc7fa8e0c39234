//! The leader's health check of the upstream (fastapi-balancer's
//! `health_endpoint`): a `GET` every `health_check_interval` through Envoy
//! (`dispatch_http_call`). After `unhealthy_threshold` consecutive failures
//! every endpoint record is marked unhealthy, so every worker answers new
//! requests 503 at once and hands back its queued ones to answer the same
//! way; after `healthy_threshold` consecutive successes the marks go.

use crate::admin::status::unix_ms;
use crate::host::Host;
use crate::worker::Worker;
use serde_json::{json, Value};
use sluice_core::admission;
use sluice_core::sync_config::HealthConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No verdict yet: requests go as usual.
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

pub struct HealthCheck {
    config: HealthConfig,
    state: Health,
    /// The call in flight and when it was sent.
    pending: Option<(u32, u64)>,
    next_check_ns: u64,
    failures: u32,
    successes: u32,
    last_check_ns: Option<u64>,
    /// HTTP status of the last answer; `None` for a timeout or no answer.
    last_status: Option<u32>,
    since_ns: u64,
}

impl HealthCheck {
    pub fn new(config: HealthConfig) -> HealthCheck {
        HealthCheck {
            config,
            state: Health::Unknown,
            pending: None,
            next_check_ns: 0,
            failures: 0,
            successes: 0,
            last_check_ns: None,
            last_status: None,
            since_ns: 0,
        }
    }

    /// This VM became the leader: check at once, carrying on from the marks
    /// a former leader left (recovery still takes `healthy_threshold`).
    pub fn start<H: Host>(&mut self, worker: &Worker<H>, now_ns: u64) {
        let marked = worker
            .routes
            .endpoints
            .iter()
            .any(|r| admission::snapshot(&worker.host, &r.key).is_ok_and(|s| s.unhealthy));
        self.state = if marked {
            Health::Unhealthy
        } else {
            Health::Unknown
        };
        self.pending = None;
        self.next_check_ns = now_ns;
        self.failures = 0;
        self.successes = 0;
        self.since_ns = now_ns;
    }

    /// Sends the next check when due. Whether the status changed.
    pub fn tick<H: Host>(&mut self, worker: &Worker<H>, now_ns: u64) -> bool {
        if let Some((_, sent_ns)) = self.pending {
            // Envoy answers a timed-out call itself; this is a backstop for
            // an answer that never comes.
            let limit = sent_ns
                .saturating_add(self.config.timeout.as_nanos() as u64)
                .saturating_add(1_000_000_000);
            if now_ns < limit {
                return false;
            }
            self.pending = None;
            return self.record(worker, None, now_ns);
        }
        if now_ns < self.next_check_ns {
            return false;
        }
        self.next_check_ns = now_ns.saturating_add(self.config.interval.as_nanos() as u64);
        let headers = vec![
            (":method", "GET"),
            (":path", self.config.endpoint.as_str()),
            (":authority", self.config.cluster.as_str()),
            ("user-agent", "sluice-health"),
        ];
        match worker
            .host
            .dispatch_http_call(&self.config.cluster, headers, self.config.timeout)
        {
            Ok(token) => {
                self.pending = Some((token, now_ns));
                false
            }
            Err(e) => {
                log::warn!("health: cannot call {}: {e:?}", self.config.cluster);
                self.record(worker, None, now_ns)
            }
        }
    }

    /// The answer to call `token`: its `:status`, `None` when Envoy gave up
    /// (timeout, no connection). Whether the status changed.
    pub fn on_response<H: Host>(
        &mut self,
        worker: &Worker<H>,
        token: u32,
        status: Option<u32>,
        now_ns: u64,
    ) -> bool {
        match self.pending {
            Some((t, _)) if t == token => {
                self.pending = None;
                self.record(worker, status, now_ns)
            }
            _ => false,
        }
    }

    fn record<H: Host>(&mut self, worker: &Worker<H>, status: Option<u32>, now_ns: u64) -> bool {
        self.last_check_ns = Some(now_ns);
        self.last_status = status;
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let next = match self.state {
            Health::Unhealthy if self.successes >= self.config.healthy_threshold => Health::Healthy,
            Health::Unknown if ok => Health::Healthy,
            Health::Healthy | Health::Unknown
                if self.failures >= self.config.unhealthy_threshold =>
            {
                Health::Unhealthy
            }
            s => s,
        };
        if next != self.state {
            log::warn!(
                "health: {} is {} (last status {status:?})",
                self.config.endpoint,
                next.as_str()
            );
            self.state = next;
            self.since_ns = now_ns;
            mark(worker, next == Health::Unhealthy);
        }
        // Every check moves the counters the stats show.
        true
    }

    pub fn status(&self) -> Value {
        json!({
            "state": self.state.as_str(),
            "endpoint": self.config.endpoint,
            "cluster": self.config.cluster,
            "consecutive_failures": self.failures,
            "consecutive_successes": self.successes,
            "last_status": self.last_status,
            "last_check_unix_ms": self.last_check_ns.map(unix_ms),
            "since_unix_ms": unix_ms(self.since_ns),
        })
    }
}

/// Marks (or clears) every endpoint of the configuration, waking the workers
/// whose waiters must now be answered (or admitted).
pub fn mark<H: Host>(worker: &Worker<H>, unhealthy: bool) {
    for route in &worker.routes.endpoints {
        match admission::set_unhealthy(&worker.host, &route.key, unhealthy, worker.host.now_ns()) {
            Ok(wakeups) => worker.wake(&wakeups),
            Err(e) => log::warn!("health: cannot mark {}: {e}", route.path),
        }
    }
}
