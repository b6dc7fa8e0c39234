//! Sluice's numbers in Envoy's own stats, per endpoint: counters of what
//! became of each request, gauges of what is in flight and queued and of
//! the capacity, and a histogram of the time waited in the queue.
//!
//! Names are `sluice.<service>.<path>.<metric>`; Envoy shows them as
//! `wasmcustom.sluice.…`, and the `stats_tags` in docs/metrics.md turn the
//! service and the path into tags, so `/stats/prometheus` shows
//! `sluice_in_flight{service="demo",endpoint="/predict"} 4`. Every VM defines
//! the same names, and Envoy keeps one stat per name for the whole process,
//! so counters from all workers add up.
//!
//! Gauges are never moved by ±1, which wraps (u64) when a -1 lands before its
//! +1 from another worker. [`Metered`] wraps the worker's host: whenever an
//! endpoint's shared record is written (by any admission operation, whoever
//! calls it), it sets the gauges from the value just written. Last writer
//! wins, so a writer that records late could leave an older value behind;
//! each writer therefore reads the record again after recording and records
//! again if it moved. The last record of a gauge is always followed by such a
//! read, so once traffic stops every gauge equals the record.

use crate::host::Host;
use crate::routes::Routes;
use proxy_wasm::types::{MetricType, Status};
use sluice_core::admission::{self, EndpointState};
use sluice_core::shared_data::{SharedData, StoreError};
use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

/// First segment of every name (after Envoy's `wasmcustom.`).
pub const PREFIX: &str = "sluice";

/// What became of a request, one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Every request of the endpoint, whatever became of it.
    Requests,
    AdmittedAtOnce,
    AdmittedAfterWait,
    /// 504: waited `queue_timeout`.
    QueueTimeout,
    /// 503: `max_queue` already waiting.
    QueueFull,
    /// 503: the backend is known to be down.
    Unhealthy,
    /// Let through unaccounted because the shared record failed us.
    FailedOpen,
}

impl Counter {
    pub const ALL: [Counter; 7] = [
        Counter::Requests,
        Counter::AdmittedAtOnce,
        Counter::AdmittedAfterWait,
        Counter::QueueTimeout,
        Counter::QueueFull,
        Counter::Unhealthy,
        Counter::FailedOpen,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Counter::Requests => "requests",
            Counter::AdmittedAtOnce => "admitted_at_once",
            Counter::AdmittedAfterWait => "admitted_after_wait",
            Counter::QueueTimeout => "queue_timeout",
            Counter::QueueFull => "queue_full",
            Counter::Unhealthy => "unhealthy",
            Counter::FailedOpen => "failed_open",
        }
    }
}

/// Gauge and histogram suffixes.
pub const IN_FLIGHT: &str = "in_flight";
pub const QUEUED: &str = "queued";
pub const CAPACITY: &str = "capacity";
/// Milliseconds each queued request waited, until it got a slot or its 504.
pub const QUEUE_WAIT_MS: &str = "queue_wait_ms";

/// The full name of one endpoint's metric, without Envoy's `wasmcustom.`.
pub fn metric_name(service: &str, path: &str, suffix: &str) -> String {
    format!("{PREFIX}.{service}.{path}.{suffix}")
}

/// One endpoint's metric ids in this VM.
struct Ids {
    counters: [u32; Counter::ALL.len()],
    capacity: u32,
    in_flight: u32,
    queued: u32,
    queue_wait_ms: u32,
}

/// What the gauges show of a record: slots in use (granted ones included,
/// as in the stats JSON), requests waiting, and the capacity in force (0:
/// none yet), which sync or a newer configuration may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gauges {
    in_flight: u32,
    queued: u32,
    capacity: u32,
}

impl Gauges {
    fn of(bytes: &[u8]) -> Option<Gauges> {
        // An empty value is what Envoy's remove leaves: the neutral record.
        let state = if bytes.is_empty() {
            EndpointState::default()
        } else {
            EndpointState::decode(bytes).ok()?
        };
        Some(Gauges {
            in_flight: state.active,
            queued: state.queued(),
            capacity: state.capacity.unwrap_or(0),
        })
    }
}

/// Reads after a gauge write before giving up on catching up with other
/// writers; only reached if the record changes on every read.
const MAX_CATCH_UP: u32 = 8;

/// The worker's host, plus its metrics: every call goes through to `H`;
/// writes of endpoint records also set the gauges.
pub struct Metered<H> {
    host: H,
    /// By endpoint index; `None` if Envoy refused to define them.
    ids: Vec<Option<Ids>>,
    /// Shared-data key of each endpoint record -> endpoint index.
    by_key: HashMap<String, usize>,
    /// The endpoint record read last and what it showed: the state that the
    /// next write of it (same read-modify-write) replaces.
    last_read: Cell<Option<(usize, Gauges)>>,
}

impl<H: Host> Metered<H> {
    /// Defines every endpoint's metrics (once per VM, at configuration) and
    /// sets the capacity gauges.
    pub fn new(host: H, routes: &Routes) -> Metered<H> {
        let mut ids = Vec::with_capacity(routes.endpoints.len());
        let mut by_key = HashMap::new();
        for (i, r) in routes.endpoints.iter().enumerate() {
            by_key.insert(r.key.clone(), i);
            // The capacity in force, if the record exists already (sync or a
            // newer configuration may have set it); else this configuration's.
            let capacity = admission::snapshot(&host, &r.key)
                .ok()
                .and_then(|s| s.capacity)
                .or(r.configured)
                .unwrap_or(0);
            match define(&host, &routes.service, &r.path, capacity) {
                Ok(endpoint_ids) => ids.push(Some(endpoint_ids)),
                Err(e) => {
                    log::warn!("no metrics for {}: Envoy refused them ({e:?})", r.path);
                    ids.push(None);
                }
            }
        }
        Metered {
            host,
            ids,
            by_key,
            last_read: Cell::new(None),
        }
    }

    /// Adds one to an outcome counter of endpoint `ep`.
    pub fn count(&self, ep: usize, counter: Counter) {
        if let Some(ids) = &self.ids[ep] {
            let id = ids.counters[counter as usize];
            if let Err(e) = self.host.increment_metric(id, 1) {
                log::debug!("increment_metric {counter:?}: {e:?}");
            }
        }
    }

    /// A request of `ep` left the queue (with a slot or a 504) after waiting
    /// since `since_ns`.
    pub fn waited(&self, ep: usize, since_ns: u64) {
        if let Some(ids) = &self.ids[ep] {
            let waited = Duration::from_nanos(self.host.now_ns().saturating_sub(since_ns));
            let _ = self
                .host
                .record_metric(ids.queue_wait_ms, waited.as_millis() as u64);
        }
    }

    /// Sets the gauges of `ep` after a write that took its record from
    /// `before` (if known) to `after`; then catches up with later writers.
    fn publish(&self, ep: usize, key: &str, before: Option<Gauges>, after: Gauges) {
        let Some(ids) = &self.ids[ep] else { return };
        // Only the gauges this write moved: the writer of every other change
        // publishes (and catches up on) its own.
        let mut in_flight =
            (before.map(|b| b.in_flight) != Some(after.in_flight)).then_some(after.in_flight);
        let mut queued = (before.map(|b| b.queued) != Some(after.queued)).then_some(after.queued);
        let mut capacity =
            (before.map(|b| b.capacity) != Some(after.capacity)).then_some(after.capacity);
        for _ in 0..MAX_CATCH_UP {
            if let Some(v) = capacity {
                let _ = self.host.record_metric(ids.capacity, u64::from(v));
            }
            if let Some(v) = in_flight {
                let _ = self.host.record_metric(ids.in_flight, u64::from(v));
            }
            if let Some(v) = queued {
                let _ = self.host.record_metric(ids.queued, u64::from(v));
            }
            if in_flight.is_none() && queued.is_none() && capacity.is_none() {
                return;
            }
            let Ok(Some((bytes, _))) = self.host.get(key) else {
                return;
            };
            let Some(now) = Gauges::of(&bytes) else {
                return;
            };
            in_flight = in_flight
                .filter(|&v| v != now.in_flight)
                .map(|_| now.in_flight);
            queued = queued.filter(|&v| v != now.queued).map(|_| now.queued);
            capacity = capacity
                .filter(|&v| v != now.capacity)
                .map(|_| now.capacity);
        }
    }
}

fn define<H: Host>(host: &H, service: &str, path: &str, capacity: u32) -> Result<Ids, Status> {
    let name = |suffix| metric_name(service, path, suffix);
    let mut counters = [0; Counter::ALL.len()];
    for c in Counter::ALL {
        counters[c as usize] = host.define_metric(MetricType::Counter, &name(c.suffix()))?;
    }
    let capacity_id = host.define_metric(MetricType::Gauge, &name(CAPACITY))?;
    // What the record holds now; every write that changes it sets it again.
    host.record_metric(capacity_id, u64::from(capacity))?;
    Ok(Ids {
        counters,
        capacity: capacity_id,
        in_flight: host.define_metric(MetricType::Gauge, &name(IN_FLIGHT))?,
        queued: host.define_metric(MetricType::Gauge, &name(QUEUED))?,
        queue_wait_ms: host.define_metric(MetricType::Histogram, &name(QUEUE_WAIT_MS))?,
    })
}

impl<H: Host> SharedData for Metered<H> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let value = self.host.get(key)?;
        if let Some(&ep) = self.by_key.get(key) {
            let seen = value.as_ref().and_then(|(bytes, _)| Gauges::of(bytes));
            self.last_read.set(seen.map(|g| (ep, g)));
        }
        Ok(value)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.host.set(key, value, cas)?;
        if let Some(&ep) = self.by_key.get(key) {
            let before = match self.last_read.take() {
                Some((read_ep, g)) if read_ep == ep => Some(g),
                _ => None,
            };
            if let Some(after) = Gauges::of(value) {
                self.publish(ep, key, before, after);
            }
        }
        Ok(())
    }
}

impl<H: Host> Host for Metered<H> {
    fn now_ns(&self) -> u64 {
        self.host.now_ns()
    }
    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        self.host.set_tick_period(period)
    }
    fn register_shared_queue(&self, name: &str) -> Result<u32, Status> {
        self.host.register_shared_queue(name)
    }
    fn resolve_shared_queue(&self, vm_id: &str, name: &str) -> Result<Option<u32>, Status> {
        self.host.resolve_shared_queue(vm_id, name)
    }
    fn enqueue_shared_queue(&self, queue_id: u32, message: &[u8]) -> Result<(), Status> {
        self.host.enqueue_shared_queue(queue_id, message)
    }
    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, Status> {
        self.host.dequeue_shared_queue(queue_id)
    }
    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        self.host.set_effective_context(context_id)
    }
    fn resume_http_request(&self) -> Result<(), Status> {
        self.host.resume_http_request()
    }
    fn send_http_response(
        &self,
        status: u32,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), Status> {
        self.host.send_http_response(status, headers, body)
    }
    fn get_http_request_header(&self, name: &str) -> Option<String> {
        self.host.get_http_request_header(name)
    }
    fn set_http_response_header(&self, name: &str, value: &str) {
        self.host.set_http_response_header(name, value)
    }
    fn get_http_response_header(&self, name: &str) -> Option<String> {
        self.host.get_http_response_header(name)
    }
    fn get_property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.host.get_property(path)
    }
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        self.host.define_metric(kind, name)
    }
    fn increment_metric(&self, id: u32, offset: i64) -> Result<(), Status> {
        self.host.increment_metric(id, offset)
    }
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        self.host.record_metric(id, value)
    }
    fn open_grpc_stream(
        &self,
        grpc_service: &[u8],
        service_name: &str,
        method: &str,
    ) -> Result<u32, Status> {
        self.host
            .open_grpc_stream(grpc_service, service_name, method)
    }
    fn send_grpc_stream_message(
        &self,
        token: u32,
        message: &[u8],
        end_stream: bool,
    ) -> Result<(), Status> {
        self.host
            .send_grpc_stream_message(token, message, end_stream)
    }
    fn cancel_grpc_stream(&self, token: u32) -> Result<(), Status> {
        self.host.cancel_grpc_stream(token)
    }
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        self.host.dispatch_http_call(cluster, headers, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::{take_problems, FakeEnvoy, FakeWorker};
    use proxy_wasm::types::Action;
    use serde_json::json;

    const PATH: &str = "/v1/model.json";

    fn config(capacity: u32, queue_timeout: f64, max_queue: u32) -> serde_json::Value {
        json!({"service": "t", "endpoints": {
            PATH: {"capacity": capacity, "queue_timeout": queue_timeout, "max_queue": max_queue},
        }})
    }

    fn metric(envoy: &FakeEnvoy, suffix: &str) -> u64 {
        envoy.metric(&metric_name("t", PATH, suffix))
    }

    fn counters(envoy: &FakeEnvoy) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| (c.suffix(), metric(envoy, c.suffix())))
            .collect()
    }

    /// `(in_flight, queued)` gauges.
    fn gauges(envoy: &FakeEnvoy) -> (u64, u64) {
        (metric(envoy, IN_FLIGHT), metric(envoy, QUEUED))
    }

    #[test]
    fn counter_ids_are_indexed_by_declaration_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?}");
        }
    }

    #[test]
    fn names_keep_the_path_whole_for_the_tag_regexes() {
        assert_eq!(
            metric_name("demo", "/v1/model.json", IN_FLIGHT),
            "sluice.demo./v1/model.json.in_flight"
        );
    }

    #[test]
    fn every_outcome_is_counted_and_gauges_follow_the_record() {
        let envoy = FakeEnvoy::new();
        let w = FakeWorker::start(&envoy, &config(1, 0.3, 1));
        assert_eq!(metric(&envoy, CAPACITY), 1);
        let mut a = w.request("POST", PATH);
        assert_eq!(a.action, Action::Continue);
        assert_eq!(gauges(&envoy), (1, 0));
        let mut b = w.request("POST", PATH);
        assert_eq!(gauges(&envoy), (1, 1));
        let mut c = w.request("POST", PATH);
        assert_eq!(c.reply().status, 503);
        envoy.advance(Duration::from_millis(300));
        w.tick();
        assert_eq!(b.reply().status, 504);
        assert_eq!(gauges(&envoy), (1, 0));
        // A second worker's waiter gets a's slot after 7 ms.
        let w2 = FakeWorker::start(&envoy, &config(1, 0.3, 1));
        let mut d = w2.request("POST", PATH);
        assert_eq!(d.action, Action::Pause);
        envoy.advance(Duration::from_millis(7));
        a.complete();
        // Handed over: still one slot in use, nobody waiting for one.
        assert_eq!(gauges(&envoy), (1, 0));
        assert!(w2.deliver_wake_ups());
        assert_eq!(d.resumes(), 1);
        d.complete();
        for s in [&mut b, &mut c] {
            s.complete();
        }
        assert_eq!(gauges(&envoy), (0, 0));
        assert_eq!(
            counters(&envoy),
            [
                ("requests", 4),
                ("admitted_at_once", 1),
                ("admitted_after_wait", 1),
                ("queue_timeout", 1),
                ("queue_full", 1),
                ("unhealthy", 0),
                ("failed_open", 0),
            ]
        );
        assert_eq!(
            envoy.samples(&metric_name("t", PATH, QUEUE_WAIT_MS)),
            [300, 7]
        );
        assert!(take_problems().is_empty());
    }

    #[test]
    fn a_late_gauge_write_is_corrected_by_its_writer() {
        let envoy = FakeEnvoy::new();
        let w1 = FakeWorker::start(&envoy, &config(2, 1.0, 10));
        let w2 = FakeWorker::start(&envoy, &config(2, 1.0, 10));
        let mut a = w2.request("POST", PATH);
        assert_eq!(gauges(&envoy), (1, 0));
        // w1 admits b (the record goes 1 -> 2), but before w1 sets the gauge
        // to 2, w2 releases a (2 -> 1) and sets it to 1. w1's 2 lands last.
        w1.host.before_next_record(move || a.complete());
        let mut b = w1.request("POST", PATH);
        assert_eq!(envoy.record(&format!("sluice:t:ep:{PATH}")).active, 1);
        assert_eq!(gauges(&envoy), (1, 0), "a stale in-flight gauge");
        b.complete();
        assert_eq!(gauges(&envoy), (0, 0));
    }

    #[test]
    fn gauges_stay_exact_under_racing_workers() {
        let envoy = FakeEnvoy::new();
        let cfg = config(3, 5.0, 1000);
        drop(FakeWorker::start(&envoy, &cfg));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let (envoy, cfg) = (Arc::clone(&envoy), cfg.clone());
                scope.spawn(move || {
                    let w = FakeWorker::start(&envoy, &cfg);
                    for _ in 0..200 {
                        let mut s = w.request("POST", PATH);
                        while s.action == Action::Pause && s.resumes() == 0 {
                            if !w.deliver_wake_ups() {
                                w.tick();
                                std::thread::yield_now();
                            }
                        }
                        s.complete();
                    }
                    while w.deliver_wake_ups() {}
                });
            }
        });
        assert_eq!(gauges(&envoy), (0, 0));
        assert_eq!(metric(&envoy, "requests"), 800);
        assert_eq!(
            metric(&envoy, "admitted_at_once") + metric(&envoy, "admitted_after_wait"),
            800
        );
    }

    use std::sync::Arc;
}
