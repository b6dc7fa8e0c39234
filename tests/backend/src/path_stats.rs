//! Per-path state: the capacity slots and the counters `/__backend/stats`
//! reports.

use crate::handover::{GapSummary, HandoverGaps, OverCapacity};
use crate::route::{OnDisconnect, Overload, RouteSpec, ServiceDist};
use crate::service_time::ServiceTimes;
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

/// `x-seq` values kept per path; a long benchmark must not grow without bound.
pub const MAX_ARRIVALS: usize = 100_000;
/// Paths without a route are counted too, up to this many distinct ones, so a
/// client sending random paths cannot exhaust memory.
const MAX_UNROUTED_PATHS: usize = 10_000;

/// A count of requests in some phase, and the most seen at once.
#[derive(Default)]
pub struct Gauge {
    now: AtomicU64,
    max: AtomicU64,
}

impl Gauge {
    /// Counts a request into the phase until the returned guard drops, which
    /// also happens when hyper drops the handler because the client left.
    pub fn enter(&self) -> GaugeGuard<'_> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        GaugeGuard(self)
    }

    fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn max(&self) -> u64 {
        self.max.load(Ordering::SeqCst)
    }

    /// Restarts the maximum from the current count (zero when idle), so it
    /// never reads below the requests still inside.
    fn reset_max(&self) {
        self.max.store(self.now(), Ordering::SeqCst);
    }
}

pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Capacity slots of a route with a `capacity`.
pub struct Slots {
    /// tokio's semaphore hands out permits in the order they were asked for,
    /// which is the FIFO queue `overload=queue` promises.
    pub semaphore: Semaphore,
    pub overload: Overload,
}

pub struct PathState {
    pub slots: Option<Slots>,
    /// Given with `--route`: its requests take a worker of `--workers`.
    pub routed: bool,
    pub service_times: ServiceTimes,
    pub on_disconnect: OnDisconnect,
    /// See [`RouteSpec::slow`]: (every, service time).
    pub slow: Option<(u64, Duration)>,
    /// See [`RouteSpec::tokens`].
    pub tokens: Option<u32>,
    /// See [`RouteSpec::ms_per_mb`].
    pub ms_per_mb: f64,
    /// Requests that arrived, for `slow`.
    started: AtomicU64,
    /// The 200 body for the default service time, rendered once.
    pub default_body: Bytes,
    service_ms: f64,
    path: String,
    pub in_flight: Gauge,
    pub serving: Gauge,
    completed: AtomicU64,
    rejected: AtomicU64,
    arrivals: Mutex<Vec<String>>,
    /// Only for a path with a capacity: "full" needs one.
    gaps: Option<Mutex<HandoverGaps>>,
    /// From arrival to answer, of the requests answered 200, nanoseconds.
    latency: Mutex<Histogram<u64>>,
    /// The clock of `gaps`: nanoseconds since this instant.
    epoch: Instant,
    /// With `--trace`: each request's id and wall-clock times, to line up
    /// with a proxy's log.
    trace: Option<Mutex<Vec<TraceEntry>>>,
}

/// One request as the backend saw it, on the wall clock (the clock of
/// Envoy's `%START_TIME%`), microseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    /// Its `x-request-id` (Envoy sets one on every request it forwards).
    pub id: String,
    pub arrived_us: u64,
    pub departed_us: u64,
    /// When it took its slot of the path's `capacity` (its worker too, with
    /// `--workers`) and its service time began; 0 if it left before. Its
    /// slot was busy from then to `departed_us`: the backend's utilisation.
    pub served_us: u64,
}

impl PathState {
    fn new(
        path: &str,
        capacity: Option<usize>,
        service_ms: f64,
        overload: Overload,
        epoch: Instant,
    ) -> Self {
        PathState {
            on_disconnect: OnDisconnect::Cancel,
            slow: None,
            tokens: None,
            ms_per_mb: 0.0,
            started: AtomicU64::new(0),
            slots: capacity.map(|k| Slots {
                semaphore: Semaphore::new(k),
                overload,
            }),
            routed: false,
            service_times: ServiceTimes::new(
                Duration::from_secs_f64(service_ms / 1000.0),
                ServiceDist::Fixed,
                1,
            ),
            default_body: ok_body(path, service_ms),
            service_ms,
            path: path.to_string(),
            in_flight: Gauge::default(),
            serving: Gauge::default(),
            completed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            arrivals: Mutex::new(Vec::new()),
            gaps: capacity.map(|k| Mutex::new(HandoverGaps::new(k as u64))),
            latency: Mutex::new(Histogram::new(3).expect("a valid histogram")),
            epoch,
            trace: None,
        }
    }

    /// Counts a request inside the path (in flight, and for the handover
    /// gap) until the returned guard drops: when the handler returns, or
    /// when hyper drops it because the client left.
    /// `request_id` is kept only on a traced path (`--trace`).
    pub fn enter(&self, request_id: Option<&str>) -> Inside<'_> {
        let arrived = Instant::now();
        let traced = match (&self.trace, request_id) {
            (Some(_), Some(id)) => Some((id.to_string(), wall_us())),
            _ => None,
        };
        let in_flight = self.in_flight.enter();
        if let Some(gaps) = &self.gaps {
            // The time is read under the lock, so the tracker sees arrivals
            // and departures of every runtime thread in time order.
            let mut gaps = gaps.lock().unwrap();
            gaps.arrive(self.nanos(Instant::now()));
        }
        Inside {
            state: self,
            arrived,
            traced,
            served_us: 0,
            _in_flight: in_flight,
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// The 200 body for this request's service time.
    pub fn body_for(&self, service_ms: f64) -> Bytes {
        if service_ms == self.service_ms {
            self.default_body.clone()
        } else {
            ok_body(&self.path, service_ms)
        }
    }

    /// The service time of the request starting now: the route's (drawn
    /// from its `service_dist`), or its slow one for every `slow_every`-th
    /// request.
    pub fn next_service_time(&self) -> Duration {
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        match self.slow {
            Some((every, slow)) if n.is_multiple_of(every) => slow,
            _ => self.service_times.next(),
        }
    }

    pub fn record_arrival(&self, seq: &str) {
        let mut arrivals = self.arrivals.lock().unwrap();
        if arrivals.len() < MAX_ARRIVALS {
            arrivals.push(seq.to_string());
        }
    }

    /// A 200 answer to the request that entered at `arrived`.
    pub fn count_completed(&self, arrived: Instant) {
        self.completed.fetch_add(1, Ordering::SeqCst);
        let took = arrived.elapsed().as_nanos() as u64;
        let _ = self.latency.lock().unwrap().record(took);
    }

    pub fn count_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::SeqCst);
    }

    fn to_json(&self) -> Value {
        json!({
            "in_flight": self.in_flight.now(),
            "max_in_flight": self.in_flight.max(),
            "serving": self.serving.now(),
            "max_serving": self.serving.max(),
            "completed": self.completed.load(Ordering::SeqCst),
            "rejected": self.rejected.load(Ordering::SeqCst),
            "arrivals": *self.arrivals.lock().unwrap(),
            "handover_gap": self.gaps.as_ref().map(|g| gap_json(g.lock().unwrap().summary())),
            "over_capacity": self.gaps.as_ref().map(|g| over_json(g.lock().unwrap().over_capacity())),
            "latency": latency_json(&self.latency.lock().unwrap()),
        })
    }

    fn reset(&self) {
        self.started.store(0, Ordering::SeqCst);
        self.service_times.reset();
        self.in_flight.reset_max();
        self.serving.reset_max();
        self.completed.store(0, Ordering::SeqCst);
        self.rejected.store(0, Ordering::SeqCst);
        self.arrivals.lock().unwrap().clear();
        if let Some(gaps) = &self.gaps {
            gaps.lock().unwrap().reset();
        }
        self.latency.lock().unwrap().reset();
        if let Some(trace) = &self.trace {
            trace.lock().unwrap().clear();
        }
    }

    /// `[[id, arrived_us, departed_us, served_us], ...]` in order of
    /// departure.
    fn trace_json(&self) -> Option<Value> {
        let trace = self.trace.as_ref()?.lock().unwrap();
        let rows: Vec<Value> = trace
            .iter()
            .map(|e| json!([e.id, e.arrived_us, e.departed_us, e.served_us]))
            .collect();
        Some(Value::Array(rows))
    }
}

/// A request inside a path; see [`PathState::enter`].
pub struct Inside<'a> {
    state: &'a PathState,
    pub arrived: Instant,
    /// Request id and wall-clock arrival, on a traced path.
    traced: Option<(String, u64)>,
    /// See [`TraceEntry::served_us`].
    served_us: u64,
    _in_flight: GaugeGuard<'a>,
}

impl<'a> Inside<'a> {
    /// The request holds its slot (and worker) and its service begins:
    /// counted as serving until the returned guard drops.
    pub fn start_serving(&mut self) -> GaugeGuard<'a> {
        if self.traced.is_some() {
            self.served_us = wall_us();
        }
        self.state.serving.enter()
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        if let Some(gaps) = &self.state.gaps {
            let mut gaps = gaps.lock().unwrap();
            gaps.depart(self.state.nanos(Instant::now()), ());
        }
        if let (Some(trace), Some((id, arrived_us))) = (&self.state.trace, self.traced.take()) {
            let mut trace = trace.lock().unwrap();
            if trace.len() < MAX_ARRIVALS {
                trace.push(TraceEntry {
                    id,
                    arrived_us,
                    departed_us: wall_us(),
                    served_us: self.served_us,
                });
            }
        }
    }
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn gap_json(s: GapSummary) -> Value {
    json!({
        "count": s.count,
        "open": s.open,
        "p50_ms": round_us(s.p50_ms),
        "p99_ms": round_us(s.p99_ms),
        "max_ms": round_us(s.max_ms),
        "mean_ms": round_us(s.mean_ms),
    })
}

fn over_json(o: OverCapacity) -> Value {
    json!({
        "episodes": o.episodes,
        "longest_ms": round_us(o.longest_ns as f64 / 1e6),
        "total_ms": round_us(o.total_ns as f64 / 1e6),
    })
}

fn latency_json(h: &Histogram<u64>) -> Value {
    let ms = |ns: u64| round_us(ns as f64 / 1e6);
    if h.is_empty() {
        return json!({ "count": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0 });
    }
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

/// Milliseconds to the microsecond: finer is noise, and shorter to read.
fn round_us(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

fn ok_body(path: &str, service_ms: f64) -> Bytes {
    Bytes::from(json!({ "path": path, "service_ms": service_ms }).to_string())
}

/// Every path the backend has state for: the routes from the command line,
/// plus each other path the first time it is requested.
pub struct Paths {
    by_path: RwLock<HashMap<String, Arc<PathState>>>,
    epoch: Instant,
}

impl Paths {
    /// `trace`: keep each routed request's id and times (see [`TraceEntry`]).
    pub fn new(routes: &[RouteSpec], trace: bool) -> Paths {
        let epoch = Instant::now();
        let by_path = routes
            .iter()
            .map(|r| {
                let mut state =
                    PathState::new(&r.path, r.capacity, r.service_ms, r.overload, epoch);
                state.routed = true;
                state.service_times = ServiceTimes::new(
                    Duration::from_secs_f64(r.service_ms / 1000.0),
                    r.service_dist,
                    r.seed,
                );
                state.on_disconnect = r.on_disconnect;
                state.slow = r
                    .slow
                    .map(|(every, ms)| (every, Duration::from_secs_f64(ms / 1000.0)));
                state.tokens = r.tokens;
                state.ms_per_mb = r.ms_per_mb;
                if trace {
                    state.trace = Some(Mutex::new(Vec::new()));
                }
                (r.path.clone(), Arc::new(state))
            })
            .collect();
        Paths {
            by_path: RwLock::new(by_path),
            epoch,
        }
    }

    /// The state of `path`, created (unlimited, no service time) for a path
    /// without a route. `None` only once too many distinct paths were seen.
    pub fn get(&self, path: &str) -> Option<Arc<PathState>> {
        if let Some(state) = self.by_path.read().unwrap().get(path) {
            return Some(state.clone());
        }
        let mut by_path = self.by_path.write().unwrap();
        if let Some(state) = by_path.get(path) {
            return Some(state.clone());
        }
        if by_path.len() >= MAX_UNROUTED_PATHS {
            return None;
        }
        let state = Arc::new(PathState::new(path, None, 0.0, Overload::Queue, self.epoch));
        by_path.insert(path.to_string(), state.clone());
        Some(state)
    }

    pub fn stats_json(&self) -> Value {
        let by_path = self.by_path.read().unwrap();
        let sorted: BTreeMap<&str, Value> = by_path
            .iter()
            .map(|(path, state)| (path.as_str(), state.to_json()))
            .collect();
        json!({ "paths": sorted })
    }

    /// `{"paths": {"/p": [[id, arrived_us, departed_us], ...]}}`, traced
    /// paths only.
    pub fn trace_json(&self) -> Value {
        let by_path = self.by_path.read().unwrap();
        let sorted: BTreeMap<&str, Value> = by_path
            .iter()
            .filter_map(|(path, state)| Some((path.as_str(), state.trace_json()?)))
            .collect();
        json!({ "paths": sorted })
    }

    pub fn reset(&self) {
        for state in self.by_path.read().unwrap().values() {
            state.reset();
        }
    }
}
