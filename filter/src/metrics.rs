//! Sluice's numbers in Envoy's own stats, per endpoint: counters of what
//! became of each request, gauges of what is in flight and queued and of
//! the capacity, and a histogram of the time waited in the queue.
//!
//! Names are `sluice.<service>.<path>.<metric>`, and an outcome's
//! `sluice.<service>.<path>.<outcome>.outcomes_total`; Envoy shows them as
//! `wasmcustom.sluice.…`, and the `stats_tags` in docs/metrics.md turn the
//! service, the path and the outcome into the tags `sluice_service`,
//! `sluice_endpoint` and `outcome` (not `service`/`endpoint`, which
//! Prometheus Operator sets on every target), so `/stats/prometheus` shows
//! `sluice_in_flight{sluice_service="demo",sluice_endpoint="/predict"} 4` and
//! `sluice_outcomes_total{…,outcome="queue_full"} 2`. With `classes`, each
//! request's counters and its wait carry its class,
//! `sluice.<service>.<path>.#<class>.<outcome>.outcomes_total`, which a fifth
//! tag cuts out as `sluice_class` (`#`: no configured path holds one, so the
//! path still ends where the class begins). Every VM defines the
//! same names, and Envoy keeps one stat per name for the whole process, so
//! counters from all workers add up.
//!
//! None of this costs the request path a hostcall. Counters add up in the
//! worker's memory and go to Envoy on its next tick ([`Metrics::flush`],
//! at most a base tick, 100 ms, behind; and at the VM's end). Gauges are
//! never moved by ±1, which wraps (u64) when a -1 lands before its +1 from
//! another worker: the leader sets them from the endpoint records on its
//! tick ([`Metrics::publish_gauges`]). One writer, reading the records that
//! admission writes: once traffic stops, every gauge equals the record by
//! the leader's next tick. A scrape sees numbers at most one tick old,
//! which a Prometheus interval of seconds never notices.

use crate::host::Host;
use crate::routes::Routes;
use proxy_wasm::types::{MetricType, Status};
use sluice_core::admission::{self, EndpointState, Instance};
use sluice_core::EndpointId;
use std::cell::RefCell;
use std::net::SocketAddr;
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
    /// Picked for an instance, sent by Envoy to another host (not an
    /// outcome: the request was admitted).
    PicksMissed,
    /// Refused at once: a sheddable class and no free slot.
    Shed,
    /// Pushed out of a full queue by a request of a higher class.
    PushedOut,
    /// 504: its own deadline passed while it waited.
    Deadline,
    /// 413: it costs more than the whole capacity and its endpoint has
    /// `cost.over_capacity: refuse`.
    TooCostly,
}

impl Counter {
    pub const ALL: [Counter; 12] = [
        Counter::Requests,
        Counter::AdmittedAtOnce,
        Counter::AdmittedAfterWait,
        Counter::QueueTimeout,
        Counter::QueueFull,
        Counter::Unhealthy,
        Counter::FailedOpen,
        Counter::PicksMissed,
        Counter::Shed,
        Counter::PushedOut,
        Counter::Deadline,
        Counter::TooCostly,
    ];

    /// The end of the metric's name: `requests_total`, or the outcome then
    /// `outcomes_total`, which the `outcome` tag cuts out.
    pub fn suffix(self) -> &'static str {
        match self {
            Counter::Requests => "requests_total",
            Counter::AdmittedAtOnce => "admitted_at_once.outcomes_total",
            Counter::AdmittedAfterWait => "admitted_after_wait.outcomes_total",
            Counter::QueueTimeout => "queue_timeout.outcomes_total",
            Counter::QueueFull => "queue_full.outcomes_total",
            Counter::Unhealthy => "unhealthy.outcomes_total",
            Counter::FailedOpen => "failed_open.outcomes_total",
            Counter::PicksMissed => "picks_missed_total",
            Counter::Shed => "shed.outcomes_total",
            Counter::PushedOut => "pushed_out.outcomes_total",
            Counter::Deadline => "deadline.outcomes_total",
            Counter::TooCostly => "too_costly.outcomes_total",
        }
    }

    /// The `outcome` label of `sluice_outcomes_total`; `None` for
    /// `sluice_requests_total`.
    pub fn outcome(self) -> Option<&'static str> {
        self.suffix().strip_suffix(".outcomes_total")
    }

    /// Its name in the stats JSON: the outcome, or `requests` /
    /// `picks_missed`.
    pub fn label(self) -> &'static str {
        self.outcome()
            .unwrap_or_else(|| self.suffix().trim_end_matches("_total"))
    }
}

/// Gauge and histogram suffixes.
pub const IN_FLIGHT: &str = "in_flight";
pub const QUEUED: &str = "queued";
pub const CAPACITY: &str = "capacity";
/// 1 while the endpoint's record is marked unhealthy (its requests get 503).
pub const BACKEND_UNHEALTHY: &str = "backend_unhealthy";
/// The sync version of the capacity in force (0: none from sync).
pub const SYNC_VERSION: &str = "sync_version";
/// 1 while the leader's sync stream is connected, else 0; only with `sync`.
pub const SYNC_CONNECTED: &str = "sync_connected";
/// What this Envoy's shares of the endpoint's pools admit now (the sum
/// over its instances); only once the endpoint is shared (`sync.shares`).
pub const SHARE: &str = "share";
/// Milliseconds each queued request waited, until it got a slot or its 504.
/// Milliseconds, not seconds: an Envoy histogram records integers and
/// cannot rescale them for Prometheus (docs/metrics.md says how to query
/// seconds).
pub const QUEUE_WAIT_MS: &str = "queue_wait_milliseconds";
/// With `classes`: requests of the class waiting for a slot
/// (`sluice_class_queued{sluice_class=…}`; `queued` is their sum).
pub const CLASS_QUEUED: &str = "class_queued";
/// With `tenants`: how many flows have requests waiting, and how many wait
/// in the busiest one. Per endpoint, never per tenant: bounded whatever
/// the number of tenants.
pub const TENANT_GAUGES: [&str; 2] = ["tenant_flows_waiting", "tenant_busiest_flow_queued"];
/// Per instance (`sluice_instance` tag): its capacity for the endpoint, its
/// requests in flight, 1 while it is ejected.
pub const INSTANCE_GAUGES: [&str; 3] = [
    "instance_capacity",
    "instance_in_flight",
    "instance_ejected",
];

/// The full name of one endpoint's metric, without Envoy's `wasmcustom.`.
pub fn metric_name(service: &str, path: &str, suffix: &str) -> String {
    format!("{PREFIX}.{service}.{path}.{suffix}")
}

/// The full name of one class's metric: `#<class>` before the suffix, which
/// the `sluice_class` tag cuts out; `None`: no classes, the endpoint's name.
pub fn class_metric_name(service: &str, path: &str, class: Option<&str>, suffix: &str) -> String {
    match class {
        Some(class) => format!("{PREFIX}.{service}.{path}.#{class}.{suffix}"),
        None => metric_name(service, path, suffix),
    }
}

/// The full name of one instance's gauge: `@<address>` before the suffix,
/// which the `sluice_instance` tag cuts out.
pub fn instance_metric_name(service: &str, path: &str, address: &str, suffix: &str) -> String {
    format!("{PREFIX}.{service}.{path}.@{address}.{suffix}")
}

/// One instance's gauges as they stand in a record at `now_ns`.
fn instance_gauges(state: &EndpointState, i: &Instance, now_ns: u64) -> [u64; 3] {
    let capacity = if i.gone {
        0
    } else {
        i.own_capacity.or(state.capacity).unwrap_or(0)
    };
    [
        u64::from(capacity),
        u64::from(i.active),
        u64::from(i.ejected(now_ns)),
    ]
}

/// One endpoint's metric ids in this VM.
struct Ids {
    /// By class index (one entry without `classes`), then by [`Counter`].
    counters: Vec<[u32; Counter::ALL.len()]>,
    /// The wait histogram, by class index.
    queue_wait_ms: Vec<u32>,
    /// With `classes`: each class's queue depth, by class index.
    class_queued: Vec<u32>,
    /// With `tenants`: [`TENANT_GAUGES`].
    tenants: Option<[u32; 2]>,
    capacity: u32,
    in_flight: u32,
    queued: u32,
    backend_unhealthy: u32,
    sync_version: u32,
}

/// What the gauges show of a record: slots in use (granted ones included,
/// as in the stats JSON), requests waiting, and the capacity in force (0:
/// none yet), which sync or a newer configuration may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gauges {
    in_flight: u32,
    queued: u32,
    capacity: u32,
    unhealthy: bool,
    sync_version: u64,
}

impl Gauges {
    fn of(bytes: &[u8], now_ns: u64) -> Option<(Gauges, EndpointState)> {
        // An empty value is what Envoy's remove leaves: the neutral record.
        let state = if bytes.is_empty() {
            EndpointState::default()
        } else {
            EndpointState::decode(bytes).ok()?
        };
        let gauges = Gauges {
            in_flight: state.active,
            queued: state.queued(),
            // With instances, the sum of those that can be picked.
            capacity: state.total_capacity(now_ns).unwrap_or(0),
            unhealthy: state.unhealthy,
            sync_version: state.sync_version,
        };
        Some((gauges, state))
    }
}

/// One instance's gauge ids ([`INSTANCE_GAUGES`]) in this VM.
type InstanceIds = (SocketAddr, [u32; 3]);

/// One VM's metric ids and the counts it has not sent yet; the host is
/// the worker's, passed in.
pub struct Metrics {
    /// By endpoint index; `None` if Envoy refused to define them.
    ids: Vec<Option<Ids>>,
    /// Shared-data key of each endpoint's record, by endpoint index.
    keys: Vec<String>,
    /// Counts not yet sent to Envoy, by endpoint index, class index and
    /// [`Counter`].
    pending: RefCell<Vec<Vec<[u64; Counter::ALL.len()]>>>,
    /// `sync_connected` by endpoint index, defined by the leader the first
    /// time it has a sync stream to report on (never without `sync`).
    sync_connected: RefCell<Option<Vec<Option<u32>>>>,
    /// `(service, path)` by endpoint index, to define that late.
    names: Vec<(String, String)>,
    /// Per endpoint index, the instances whose gauges this VM defined (as
    /// they appear: discovery adds them) and their ids.
    instances: RefCell<Vec<Vec<InstanceIds>>>,
    /// Per endpoint index, the `share` gauge, defined once it is shared.
    shares: RefCell<Vec<Option<u32>>>,
}

impl Metrics {
    /// Defines every endpoint's metrics (once per VM, at configuration) and
    /// sets the capacity gauges; none with `metrics: false`.
    pub fn new<H: Host>(host: &H, routes: &Routes) -> Metrics {
        let mut ids = Vec::with_capacity(routes.endpoints.len());
        for r in &routes.endpoints {
            if !routes.metrics {
                ids.push(None);
                continue;
            }
            // The capacity in force, if the record exists already (sync or a
            // newer configuration may have set it); else this configuration's.
            let capacity = admission::snapshot(host, &r.key)
                .ok()
                .and_then(|s| s.capacity)
                .or(r.configured)
                .unwrap_or(0);
            match define(host, routes, &r.path, capacity) {
                Ok(endpoint_ids) => ids.push(Some(endpoint_ids)),
                Err(e) => {
                    log::warn!("no metrics for {}: Envoy refused them ({e:?})", r.path);
                    ids.push(None);
                }
            }
        }
        Metrics {
            ids,
            keys: routes.endpoints.iter().map(|r| r.key.clone()).collect(),
            pending: RefCell::new(vec![
                vec![[0; Counter::ALL.len()]; class_count(routes)];
                routes.endpoints.len()
            ]),
            sync_connected: RefCell::new(None),
            names: routes
                .endpoints
                .iter()
                .map(|r| (routes.service.clone(), r.path.clone()))
                .collect(),
            instances: RefCell::new(vec![Vec::new(); routes.endpoints.len()]),
            shares: RefCell::new(vec![None; routes.endpoints.len()]),
        }
    }

    /// Adds one to an outcome counter of endpoint `ep` for a request of
    /// class `class` (its index; 0 without classes), in memory: the next
    /// [`flush`](Self::flush) sends it.
    pub fn count(&self, ep: EndpointId, class: u8, counter: Counter) {
        let mut pending = self.pending.borrow_mut();
        let by_class = &mut pending[ep.0];
        // A class index from a newer configuration than this VM's: the
        // default's counters rather than none.
        let i = usize::from(class).min(by_class.len() - 1);
        by_class[i][counter as usize] += 1;
    }

    /// Sends the counts made since the last flush to Envoy: on every tick
    /// of the worker and at the VM's end.
    pub fn flush<H: Host>(&self, host: &H) {
        let mut pending = self.pending.borrow_mut();
        for (ep, by_class) in pending.iter_mut().enumerate() {
            for (class, counts) in by_class.iter_mut().enumerate() {
                let Some(ids) = &self.ids[ep] else {
                    *counts = [0; Counter::ALL.len()];
                    continue;
                };
                for (i, n) in counts.iter_mut().enumerate() {
                    if *n == 0 {
                        continue;
                    }
                    if let Err(e) = host.increment_metric(ids.counters[class][i], *n as i64) {
                        log::debug!("increment_metric {:?}: {e:?}", Counter::ALL[i]);
                    }
                    *n = 0;
                }
            }
        }
    }

    /// Sets every endpoint's gauges from its record, and `sync_connected`
    /// from the leader's stream (`None`: no `sync`): the leader's job, on
    /// its tick.
    pub fn publish_gauges<H: Host>(&self, host: &H, sync_connected: Option<bool>) {
        let now = host.now_ns();
        for (ep, (ids, key)) in self.ids.iter().zip(&self.keys).enumerate() {
            let Some(ids) = ids else { continue };
            let Ok(Some((bytes, _))) = host.get(key) else {
                continue;
            };
            let Some((g, state)) = Gauges::of(&bytes, now) else {
                continue;
            };
            self.publish_instances(host, ep, &state, now);
            self.publish_share(host, ep, &state, now);
            for (class, id) in ids.class_queued.iter().enumerate() {
                let _ = host.record_metric(*id, u64::from(state.queued_of(class as u8)));
            }
            if let Some(tenant_ids) = ids.tenants {
                let (waiting, busiest) = flows_waiting(&state);
                let _ = host.record_metric(tenant_ids[0], u64::from(waiting));
                let _ = host.record_metric(tenant_ids[1], u64::from(busiest));
            }
            let _ = host.record_metric(ids.capacity, u64::from(g.capacity));
            let _ = host.record_metric(ids.in_flight, u64::from(g.in_flight));
            let _ = host.record_metric(ids.queued, u64::from(g.queued));
            let _ = host.record_metric(ids.backend_unhealthy, u64::from(g.unhealthy));
            let _ = host.record_metric(ids.sync_version, g.sync_version);
        }
        if let Some(connected) = sync_connected {
            let mut defined = self.sync_connected.borrow_mut();
            let ids = defined.get_or_insert_with(|| {
                self.ids
                    .iter()
                    .zip(&self.names)
                    .map(|(ids, (service, path))| {
                        ids.as_ref()?;
                        let name = metric_name(service, path, SYNC_CONNECTED);
                        host.define_metric(MetricType::Gauge, &name).ok()
                    })
                    .collect()
            });
            for id in ids.iter().flatten() {
                let _ = host.record_metric(*id, u64::from(connected));
            }
        }
    }

    /// Sets endpoint `ep`'s `share` gauge, defining it the first time the
    /// record is shared (never without `sync.shares`).
    fn publish_share<H: Host>(&self, host: &H, ep: usize, state: &EndpointState, now: u64) {
        let mut shares = self.shares.borrow_mut();
        if shares[ep].is_none() {
            if state.share.is_none() {
                return;
            }
            let (service, path) = &self.names[ep];
            shares[ep] = host
                .define_metric(MetricType::Gauge, &metric_name(service, path, SHARE))
                .ok();
        }
        let Some(id) = shares[ep] else { return };
        let lease = &state.share_lease;
        let admits = if state.picks_instances() {
            state
                .instances
                .iter()
                .filter(|i| !i.gone)
                .filter_map(|i| i.share)
                .map(|sh| u64::from(sh.at(lease, now)))
                .sum()
        } else {
            state.share.map_or(0, |sh| u64::from(sh.at(lease, now)))
        };
        let _ = host.record_metric(id, admits);
    }

    /// Sets endpoint `ep`'s per-instance gauges from its record, defining
    /// those of instances new to this VM; an instance no longer in the
    /// record reads 0 (Envoy cannot drop a stat).
    fn publish_instances<H: Host>(&self, host: &H, ep: usize, state: &EndpointState, now: u64) {
        let mut defined = self.instances.borrow_mut();
        let defined = &mut defined[ep];
        for inst in &state.instances {
            if defined.iter().any(|(a, _)| *a == inst.address) {
                continue;
            }
            let (service, path) = &self.names[ep];
            let address = inst.address.to_string();
            let mut ids = [0; 3];
            for (id, suffix) in ids.iter_mut().zip(INSTANCE_GAUGES) {
                let name = instance_metric_name(service, path, &address, suffix);
                match host.define_metric(MetricType::Gauge, &name) {
                    Ok(i) => *id = i,
                    Err(e) => {
                        log::debug!("no gauge {name}: {e:?}");
                        return;
                    }
                }
            }
            defined.push((inst.address, ids));
        }
        for (address, ids) in defined.iter() {
            let values = state
                .instance_index(address)
                .map_or([0; 3], |i| instance_gauges(state, &state.instances[i], now));
            for (id, v) in ids.iter().zip(values) {
                let _ = host.record_metric(*id, v);
            }
        }
    }

    /// A request of `ep` and class `class` left the queue (with a slot or a
    /// 504) after waiting since `since_ns`.
    pub fn waited<H: Host>(&self, host: &H, ep: EndpointId, class: u8, since_ns: u64) {
        if let Some(ids) = &self.ids[ep.0] {
            let waited = Duration::from_nanos(host.now_ns().saturating_sub(since_ns));
            let i = usize::from(class).min(ids.queue_wait_ms.len() - 1);
            let _ = host.record_metric(ids.queue_wait_ms[i], waited.as_millis() as u64);
        }
    }

    /// What Envoy's counters say of endpoint `ep`'s class `class` (every
    /// worker's counts up to its last tick): `(counter, value)` for each
    /// [`Counter`]; empty with `metrics: false`.
    pub fn read_counters<H: Host>(&self, host: &H, ep: usize, class: u8) -> Vec<(Counter, u64)> {
        let Some(ids) = &self.ids[ep] else {
            return Vec::new();
        };
        let Some(by_counter) = ids.counters.get(usize::from(class)) else {
            return Vec::new();
        };
        Counter::ALL
            .iter()
            .zip(by_counter)
            .filter_map(|(c, id)| host.get_metric(*id).ok().map(|v| (*c, v)))
            .collect()
    }
}

/// Classes a request can be counted in: 1 without `classes`.
fn class_count(routes: &Routes) -> usize {
    routes.classes.as_ref().map_or(1, |c| c.list.len().max(1))
}

/// Requests waiting in each tenant flow (0 without tenants: every waiter
/// is in flow 0).
pub fn queued_by_flow(state: &EndpointState) -> [u32; 256] {
    let mut by_flow = [0u32; 256];
    for w in state.waiters.iter().filter(|w| w.waiting()) {
        by_flow[usize::from(w.flow)] += 1;
    }
    by_flow
}

/// With tenants: how many flows have requests waiting, and how many wait in
/// the busiest one.
fn flows_waiting(state: &EndpointState) -> (u32, u32) {
    let by_flow = queued_by_flow(state);
    let waiting = by_flow.iter().filter(|&&n| n > 0).count() as u32;
    (waiting, by_flow.iter().copied().max().unwrap_or(0))
}

fn define<H: Host>(host: &H, routes: &Routes, path: &str, capacity: u32) -> Result<Ids, Status> {
    let service = &routes.service;
    let name = |suffix| metric_name(service, path, suffix);
    // With classes, each request's counters and its wait are per class; the
    // picks missed stay the endpoint's (what Envoy did, not the request).
    let classes: Vec<Option<&str>> = match &routes.classes {
        Some(c) => c.list.iter().map(|c| Some(c.name.as_str())).collect(),
        None => vec![None],
    };
    let picks_missed =
        host.define_metric(MetricType::Counter, &name(Counter::PicksMissed.suffix()))?;
    let mut counters = Vec::with_capacity(classes.len());
    let mut queue_wait_ms = Vec::with_capacity(classes.len());
    for class in &classes {
        let mut ids = [0; Counter::ALL.len()];
        for c in Counter::ALL {
            ids[c as usize] = match c {
                Counter::PicksMissed => picks_missed,
                c => host.define_metric(
                    MetricType::Counter,
                    &class_metric_name(service, path, *class, c.suffix()),
                )?,
            };
        }
        counters.push(ids);
        queue_wait_ms.push(host.define_metric(
            MetricType::Histogram,
            &class_metric_name(service, path, *class, QUEUE_WAIT_MS),
        )?);
    }
    let class_queued = match &routes.classes {
        Some(_) => classes
            .iter()
            .map(|class| {
                let name = class_metric_name(service, path, *class, CLASS_QUEUED);
                host.define_metric(MetricType::Gauge, &name)
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let tenants = match &routes.tenants {
        Some(_) => Some([
            host.define_metric(MetricType::Gauge, &name(TENANT_GAUGES[0]))?,
            host.define_metric(MetricType::Gauge, &name(TENANT_GAUGES[1]))?,
        ]),
        None => None,
    };
    let capacity_id = host.define_metric(MetricType::Gauge, &name(CAPACITY))?;
    // What the record holds now; every write that changes it sets it again.
    host.record_metric(capacity_id, u64::from(capacity))?;
    Ok(Ids {
        counters,
        queue_wait_ms,
        class_queued,
        tenants,
        capacity: capacity_id,
        in_flight: host.define_metric(MetricType::Gauge, &name(IN_FLIGHT))?,
        queued: host.define_metric(MetricType::Gauge, &name(QUEUED))?,
        backend_unhealthy: host.define_metric(MetricType::Gauge, &name(BACKEND_UNHEALTHY))?,
        sync_version: host.define_metric(MetricType::Gauge, &name(SYNC_VERSION))?,
    })
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
            .map(|c| (c.label(), metric(envoy, c.suffix())))
            .collect()
    }

    const REQUESTS: &str = "requests_total";

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
        assert_eq!(
            metric_name("demo", "/p", Counter::QueueFull.suffix()),
            "sluice.demo./p.queue_full.outcomes_total"
        );
        assert_eq!(Counter::Requests.outcome(), None);
        assert_eq!(Counter::FailedOpen.outcome(), Some("failed_open"));
    }

    /// Time enough for the leader to set the gauges again at its tick.
    const SETTLE: Duration = crate::leader::GAUGE_PERIOD;

    #[test]
    fn every_outcome_is_counted_and_gauges_follow_the_record() {
        let envoy = FakeEnvoy::new();
        let w = FakeWorker::start(&envoy, &config(1, 0.3, 1));
        // Its first tick takes an index and the lease: it leads, and the
        // leader sets the gauges.
        w.tick();
        assert_eq!(metric(&envoy, CAPACITY), 1);
        let mut a = w.request("POST", PATH);
        assert_eq!(a.action, Action::Continue);
        let mut b = w.request("POST", PATH);
        assert!(b.is_waiting());
        let mut c = w.request("POST", PATH);
        assert_eq!(c.reply().status, 503);
        // The request path made no metric hostcall: counts wait in memory
        // for the tick, gauges for the leader's.
        assert_eq!(metric(&envoy, REQUESTS), 0);
        assert_eq!(gauges(&envoy), (0, 0));
        envoy.advance(SETTLE);
        w.tick();
        assert_eq!(gauges(&envoy), (1, 1));
        assert_eq!(metric(&envoy, REQUESTS), 3);
        envoy.advance(Duration::from_millis(300) - SETTLE);
        w.tick();
        assert_eq!(b.reply().status, 504);
        envoy.advance(SETTLE);
        w.tick();
        assert_eq!(gauges(&envoy), (1, 0));
        // A second worker's waiter gets a's slot after 7 ms.
        let w2 = FakeWorker::start(&envoy, &config(1, 0.3, 1));
        w2.tick();
        let mut d = w2.request("POST", PATH);
        assert_eq!(d.action, Action::Pause);
        envoy.advance(Duration::from_millis(7));
        a.complete();
        assert!(w2.deliver_wake_ups());
        assert_eq!(d.resumes(), 1);
        envoy.advance(SETTLE);
        w.tick();
        w2.tick();
        // Handed over: still one slot in use, nobody waiting for one.
        assert_eq!(gauges(&envoy), (1, 0));
        d.complete();
        for s in [&mut b, &mut c] {
            s.complete();
        }
        envoy.advance(SETTLE);
        w.tick();
        w2.tick();
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
                ("picks_missed", 0),
                ("shed", 0),
                ("pushed_out", 0),
                ("deadline", 0),
                ("too_costly", 0),
            ]
        );
        assert_eq!(
            envoy.samples(&metric_name("t", PATH, QUEUE_WAIT_MS)),
            [300, 7]
        );
        assert!(take_problems().is_empty());
    }

    #[test]
    fn metrics_false_defines_none_and_admission_is_unchanged() {
        let envoy = FakeEnvoy::new();
        let mut cfg = config(1, 0.3, 1);
        cfg["metrics"] = json!(false);
        let w = FakeWorker::start(&envoy, &cfg);
        w.tick();
        let mut a = w.request("POST", PATH);
        assert_eq!(a.action, Action::Continue);
        let mut b = w.request("POST", PATH);
        assert!(b.is_waiting());
        a.complete();
        assert_eq!(b.resumes(), 1);
        b.complete();
        w.tick();
        for suffix in [IN_FLIGHT, QUEUED, CAPACITY, QUEUE_WAIT_MS, REQUESTS] {
            assert!(
                !envoy.has_metric(&metric_name("t", PATH, suffix)),
                "{suffix}"
            );
        }
        assert!(take_problems().is_empty());
    }

    #[test]
    fn only_the_leader_sets_gauges_and_its_successor_takes_over() {
        let envoy = FakeEnvoy::new();
        let w1 = FakeWorker::start(&envoy, &config(2, 1.0, 10));
        w1.tick();
        let w2 = FakeWorker::start(&envoy, &config(2, 1.0, 10));
        w2.tick();
        let mut a = w2.request("POST", PATH);
        envoy.advance(SETTLE);
        w2.tick();
        assert_eq!(gauges(&envoy), (0, 0), "w2 does not lead");
        w1.tick();
        assert_eq!(gauges(&envoy), (1, 0), "the leader does");
        // The leader's VM goes away; w2 takes the lease when it next looks
        // at it, once per base tick.
        w1.done();
        let mut b = w2.request("POST", PATH);
        envoy.advance(crate::worker::BASE_TICK);
        w2.tick();
        assert_eq!(gauges(&envoy), (2, 0));
        a.complete();
        b.complete();
        envoy.advance(SETTLE);
        w2.tick();
        assert_eq!(gauges(&envoy), (0, 0));
    }

    #[test]
    fn counts_and_gauges_stay_exact_under_racing_workers() {
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
                    // The VM's end sends what its last tick did not.
                    w.done();
                });
            }
        });
        let w = FakeWorker::start(&envoy, &cfg);
        envoy.advance(sluice_core::lease::LEASE_TTL);
        w.tick();
        assert_eq!(gauges(&envoy), (0, 0));
        assert_eq!(metric(&envoy, REQUESTS), 800);
        assert_eq!(
            metric(&envoy, Counter::AdmittedAtOnce.suffix())
                + metric(&envoy, Counter::AdmittedAfterWait.suffix()),
            800
        );
    }

    /// With classes, a request's counters and wait are its class's
    /// (`#<class>` in the name), the picks missed the endpoint's; each
    /// class's queue has a gauge, the tenants' flows two.
    #[test]
    fn with_classes_counters_and_waits_are_per_class() {
        let envoy = FakeEnvoy::new();
        let cfg = json!({"service": "t",
            "classes": {"hi": {"priority": 5}, "lo": {"priority": 1}},
            "default_class": "lo",
            "tenants": {"header": "x-tenant"},
            "endpoints": {PATH: {"capacity": 1, "queue_timeout": 1.0, "max_queue": 10}},
        });
        let w = FakeWorker::start(&envoy, &cfg);
        w.tick();
        let class =
            |c: &str, suffix: &str| envoy.metric(&class_metric_name("t", PATH, Some(c), suffix));
        let mut a = w.request_with("POST", PATH, &[("x-sluice-class", "hi")]);
        assert_eq!(a.action, Action::Continue);
        let mut lo: Vec<_> = ["x", "x", "y"]
            .iter()
            .map(|t| w.request_with("POST", PATH, &[("x-tenant", t)]))
            .collect();
        let mut hi = w.request_with("POST", PATH, &[("x-sluice-class", "hi"), ("x-tenant", "x")]);
        envoy.advance(SETTLE);
        w.tick();
        assert_eq!(class("hi", CLASS_QUEUED), 1);
        assert_eq!(class("lo", CLASS_QUEUED), 3);
        assert_eq!(metric(&envoy, QUEUED), 4);
        // x (3 waiting: two lo, one hi) and y (one).
        assert_eq!(metric(&envoy, TENANT_GAUGES[0]), 2);
        assert_eq!(metric(&envoy, TENANT_GAUGES[1]), 3);
        envoy.advance(Duration::from_millis(5));
        a.complete();
        assert_eq!(hi.resumes(), 1, "the higher class first");
        envoy.advance(Duration::from_secs(1));
        w.tick();
        for s in lo.iter_mut() {
            assert_eq!(s.reply().status, 504);
        }
        hi.complete();
        envoy.advance(SETTLE);
        w.tick();
        assert_eq!(class("hi", REQUESTS), 2);
        assert_eq!(class("hi", Counter::AdmittedAtOnce.suffix()), 1);
        assert_eq!(class("hi", Counter::AdmittedAfterWait.suffix()), 1);
        assert_eq!(class("lo", REQUESTS), 3);
        assert_eq!(class("lo", Counter::QueueTimeout.suffix()), 3);
        assert_eq!(class("lo", Counter::AdmittedAtOnce.suffix()), 0);
        assert_eq!(
            envoy.samples(&class_metric_name("t", PATH, Some("hi"), QUEUE_WAIT_MS)),
            [(SETTLE + Duration::from_millis(5)).as_millis() as u64]
        );
        assert_eq!(
            envoy
                .samples(&class_metric_name("t", PATH, Some("lo"), QUEUE_WAIT_MS))
                .len(),
            3
        );
        // No endpoint-wide copy of a per-class counter: sums never double.
        assert!(!envoy.has_metric(&metric_name("t", PATH, REQUESTS)));
        assert!(envoy.has_metric(&metric_name("t", PATH, Counter::PicksMissed.suffix())));
        // The stats JSON reads the same counters from Envoy.
        let stats = w.stats();
        let classes = &stats["endpoints"][PATH]["classes"];
        assert_eq!(classes["lo"]["outcomes"]["queue_timeout"], 3, "{classes}");
        assert_eq!(classes["hi"]["outcomes"]["admitted_after_wait"], 1);
        assert_eq!(classes["hi"]["outcomes"]["requests"], 2);
        assert!(take_problems().is_empty());
    }

    /// `sync_connected` follows the leader's stream (and is not defined
    /// without `sync`); `sync_version` follows the record.
    #[test]
    fn sync_gauges_follow_the_stream_and_the_record() {
        use prost::Message;
        use sluice_core::sync_api::{EndpointCapacity, Snapshot};
        let envoy = FakeEnvoy::new();
        let plain = FakeWorker::start(&envoy, &config(2, 1.0, 10));
        plain.tick();
        assert!(!envoy.has_metric(&metric_name("t", PATH, SYNC_CONNECTED)));
        plain.done();

        let envoy = FakeEnvoy::new();
        let mut cfg = config(2, 1.0, 10);
        cfg["sync"] = json!({"cluster": "sluice_sync"});
        let w = FakeWorker::start(&envoy, &cfg);
        w.tick();
        let connected = || metric(&envoy, SYNC_CONNECTED);
        assert!(envoy.has_metric(&metric_name("t", PATH, SYNC_CONNECTED)));
        assert_eq!(connected(), 0, "connecting");
        let token = w.open_stream().expect("the leader's stream").token;
        let snapshot = Snapshot {
            service: "t".into(),
            version: 7,
            endpoints: vec![EndpointCapacity {
                path: PATH.into(),
                capacity: 5,
                source: "probe".into(),
                measured_at: 1,
            }],
            ..Default::default()
        };
        w.grpc_message(token, &snapshot.encode_to_vec());
        envoy.advance(SETTLE);
        w.tick();
        assert_eq!(connected(), 1);
        assert_eq!(metric(&envoy, SYNC_VERSION), 7);
        assert_eq!(metric(&envoy, CAPACITY), 5);
        w.grpc_close(token, 14);
        envoy.advance(SETTLE);
        w.tick();
        assert_eq!(connected(), 0, "disconnected");
        assert_eq!(metric(&envoy, BACKEND_UNHEALTHY), 0);
    }

    use std::sync::Arc;
}
