//! sluice-sync's own Prometheus metrics, served on `--metrics-addr` at
//! `/metrics` (OpenMetrics text, which Prometheus scrapes as it is).
//!
//! Counters end in `_total`, durations are in seconds, and the service is
//! the label `sluice_service` (a `service` label would collide with the
//! target label the Prometheus Operator adds). Series of a service go away
//! when sync forgets the service, so random names cannot grow them.

use crate::services::{stopping, Services};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub sluice_service: String,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Kind {
    /// A new state of the service.
    state,
    /// Nothing changed: the periodic heartbeat.
    heartbeat,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SentLabels {
    pub sluice_service: String,
    pub kind: Kind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub sluice_service: String,
    pub path: String,
    /// Empty for an endpoint without instances.
    pub address: String,
}

/// One pool's figures, as [`Metrics::set_shares`] takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFigures {
    pub path: String,
    pub address: String,
    pub capacity: u32,
    pub granted: u32,
    pub unaccounted: u32,
    /// Watchers sync counts as holding part of the pool.
    pub watchers: u32,
}

pub struct Metrics {
    registry: Registry,
    share_watchers: Family<ServiceLabels, Gauge>,
    share_capacity: Family<PoolLabels, Gauge>,
    share_granted: Family<PoolLabels, Gauge>,
    share_unaccounted: Family<PoolLabels, Gauge>,
    share_pool_watchers: Family<PoolLabels, Gauge>,
    /// The pool series set per service, so a pool that goes loses them;
    /// held while they are rewritten, and while a scrape encodes.
    share_pools: std::sync::Mutex<std::collections::HashMap<String, Vec<PoolLabels>>>,
    watchers: Family<ServiceLabels, Gauge>,
    sent: Family<SentLabels, Counter>,
    redis_up: Gauge,
    services: Gauge,
    write_to_send: Histogram,
    discovered_instances: Family<ServiceLabels, Gauge>,
    discovery_stale: Family<ServiceLabels, Gauge>,
    dns_lookup_failures: Family<ServiceLabels, Counter>,
    kubernetes_watch_failures: Family<ServiceLabels, Counter>,
    kubernetes_relists: Family<ServiceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sluice_sync");
        let watchers = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "watchers",
            "Open Watch streams, per service",
            watchers.clone(),
        );
        let sent = Family::<SentLabels, Counter>::default();
        registry.register(
            "snapshots_sent",
            "Snapshots sent to watchers, per service; kind is state (a new state) or heartbeat",
            sent.clone(),
        );
        let redis_up = Gauge::default();
        registry.register(
            "redis_up",
            "1 while Redis answers, 0 while the snapshots served are stale",
            redis_up.clone(),
        );
        let services = Gauge::default();
        registry.register(
            "services",
            "Services sync remembers (watched, or in their idle grace period)",
            services.clone(),
        );
        // 0.5 ms to ~16 s.
        let write_to_send = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "write_to_send_seconds",
            "Time from a write's update message on Redis to the snapshot sent to a watcher",
            write_to_send.clone(),
        );
        let discovered_instances = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "discovered_instances",
            "Instances discovery (DNS or Kubernetes) holds for the service (the last set resolved or listed)",
            discovered_instances.clone(),
        );
        let discovery_stale = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "discovery_stale",
            "1 while the last DNS lookup, or the Kubernetes list or watch, failed and the last set is served",
            discovery_stale.clone(),
        );
        let dns_lookup_failures = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "dns_lookup_failures",
            "DNS lookups of the service's name that failed or answered no address",
            dns_lookup_failures.clone(),
        );
        let kubernetes_watch_failures = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "kubernetes_watch_failures",
            "Lists and watches of the service's EndpointSlices that failed (each retried with backoff)",
            kubernetes_watch_failures.clone(),
        );
        let kubernetes_relists = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "kubernetes_relists",
            "Watches of the service's EndpointSlices whose version was gone (410), so listed again",
            kubernetes_relists.clone(),
        );
        let share_watchers = Family::<ServiceLabels, Gauge>::default();
        registry.register(
            "share_watchers",
            "Open Share streams (Envoys sharing the capacity), per service",
            share_watchers.clone(),
        );
        let share_capacity = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "share_capacity",
            "The capacity of a shared pool (an instance's slots for an endpoint; address empty: the endpoint's)",
            share_capacity.clone(),
        );
        let share_granted = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "share_granted",
            "The sum of the shares of a pool last sent to its watchers",
            share_granted.clone(),
        );
        let share_unaccounted = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "share_unaccounted",
            "After a restart, the part of a pool kept from everyone until the grace ends",
            share_unaccounted.clone(),
        );
        let share_pool_watchers = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "share_pool_watchers",
            "Watchers sync counts as holding part of a pool",
            share_pool_watchers.clone(),
        );
        Metrics {
            registry,
            share_watchers,
            share_capacity,
            share_granted,
            share_unaccounted,
            share_pool_watchers,
            share_pools: std::sync::Mutex::new(std::collections::HashMap::new()),
            watchers,
            sent,
            redis_up,
            services,
            write_to_send,
            discovered_instances,
            discovery_stale,
            dns_lookup_failures,
            kubernetes_watch_failures,
            kubernetes_relists,
        }
    }

    fn service(service: &str) -> ServiceLabels {
        ServiceLabels {
            sluice_service: service.to_string(),
        }
    }

    pub fn watcher_joined(&self, service: &str) {
        self.watchers.get_or_create(&Self::service(service)).inc();
    }

    pub fn watcher_left(&self, service: &str) {
        self.watchers.get_or_create(&Self::service(service)).dec();
    }

    pub fn sent(&self, service: &str, kind: Kind) {
        self.sent
            .get_or_create(&SentLabels {
                sluice_service: service.to_string(),
                kind,
            })
            .inc();
    }

    pub fn write_to_send(&self, elapsed: Duration) {
        self.write_to_send.observe(elapsed.as_secs_f64());
    }

    /// What discovery holds for `service` now.
    pub fn discovered(&self, service: &str, instances: usize, stale: bool) {
        let labels = Self::service(service);
        self.discovered_instances
            .get_or_create(&labels)
            .set(instances as i64);
        self.discovery_stale
            .get_or_create(&labels)
            .set(i64::from(stale));
    }

    pub fn kubernetes_watch_failed(&self, service: &str) {
        self.kubernetes_watch_failures
            .get_or_create(&Self::service(service))
            .inc();
    }

    pub fn kubernetes_relisted(&self, service: &str) {
        self.kubernetes_relists
            .get_or_create(&Self::service(service))
            .inc();
    }

    pub fn dns_lookup_failed(&self, service: &str) {
        self.dns_lookup_failures
            .get_or_create(&Self::service(service))
            .inc();
    }

    /// What the allocator of `service` holds now: its open streams and each
    /// pool's figures; pools no longer listed lose their series.
    pub fn set_shares(&self, service: &str, streams: usize, pools: &[PoolFigures]) {
        let mut all = self.share_pools.lock().expect("share metrics lock");
        let labels: Vec<PoolLabels> = pools
            .iter()
            .map(|p| PoolLabels {
                sluice_service: service.to_string(),
                path: p.path.clone(),
                address: p.address.clone(),
            })
            .collect();
        if let Some(before) = all.get(service) {
            for gone in before.iter().filter(|l| !labels.contains(l)) {
                self.remove_pool(gone);
            }
        }
        for (l, p) in labels.iter().zip(pools) {
            self.share_capacity
                .get_or_create(l)
                .set(i64::from(p.capacity));
            self.share_granted
                .get_or_create(l)
                .set(i64::from(p.granted));
            self.share_unaccounted
                .get_or_create(l)
                .set(i64::from(p.unaccounted));
            self.share_pool_watchers
                .get_or_create(l)
                .set(i64::from(p.watchers));
        }
        self.share_watchers
            .get_or_create(&Self::service(service))
            .set(streams as i64);
        all.insert(service.to_string(), labels);
    }

    /// Nobody shares `service` any more: its share series go.
    pub fn forget_shares(&self, service: &str) {
        let mut all = self.share_pools.lock().expect("share metrics lock");
        for l in all.remove(service).unwrap_or_default() {
            self.remove_pool(&l);
        }
        self.share_watchers.remove(&Self::service(service));
    }

    fn remove_pool(&self, labels: &PoolLabels) {
        self.share_capacity.remove(labels);
        self.share_granted.remove(labels);
        self.share_unaccounted.remove(labels);
        self.share_pool_watchers.remove(labels);
    }

    /// Drops the series of a service sync forgot (the discovery series stay:
    /// discovery runs whether or not anyone watches).
    pub fn forget(&self, service: &str) {
        self.watchers.remove(&Self::service(service));
        for kind in [Kind::state, Kind::heartbeat] {
            self.sent.remove(&SentLabels {
                sluice_service: service.to_string(),
                kind,
            });
        }
    }

    /// The text a scrape gets, with the gauges that are read, not counted,
    /// brought up to date.
    pub fn encode(&self, services: &Services) -> String {
        self.redis_up.set(i64::from(services.redis_up()));
        self.services.set(services.len() as i64);
        // Not halfway through a rewrite of the share series.
        let _shares = self.share_pools.lock().expect("share metrics lock");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Serves `GET /metrics` until shutdown.
pub async fn serve(
    listener: TcpListener,
    services: Arc<Services>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    warn!(%error, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopping(&mut shutdown) => return,
        };
        let services = services.clone();
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |request: Request<Incoming>| {
                let services = services.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&request, &services)) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await
            {
                debug!(%error, ?peer, "metrics connection ended with an error");
            }
        });
    }
}

fn answer(request: &Request<Incoming>, services: &Services) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            OPENMETRICS,
            services.metrics().encode(services),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "sluice-sync serves its metrics at /metrics\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions_and_forgotten_services_leave() {
        let (services, _requests) = Services::new(10);
        let m = services.metrics();
        m.watcher_joined("demo");
        m.watcher_joined("demo");
        m.watcher_left("demo");
        m.sent("demo", Kind::state);
        m.sent("demo", Kind::heartbeat);
        m.write_to_send(Duration::from_millis(3));
        m.discovered("disc", 3, false);
        m.discovered("disc", 2, true);
        m.dns_lookup_failed("disc");
        m.kubernetes_watch_failed("disc");
        m.kubernetes_relisted("disc");
        m.kubernetes_relisted("disc");
        let pool = |address: &str, granted| PoolFigures {
            path: "/p".into(),
            address: address.into(),
            capacity: 12,
            granted,
            unaccounted: 2,
            watchers: 3,
        };
        m.set_shares(
            "shared",
            4,
            &[pool("10.0.0.1:80", 9), pool("10.0.0.2:80", 5)],
        );
        m.set_shares("shared", 3, &[pool("10.0.0.1:80", 10)]);
        let text = m.encode(&services);
        for line in [
            "# TYPE sluice_sync_watchers gauge",
            "sluice_sync_watchers{sluice_service=\"demo\"} 1",
            "# TYPE sluice_sync_snapshots_sent counter",
            "sluice_sync_snapshots_sent_total{sluice_service=\"demo\",kind=\"state\"} 1",
            "sluice_sync_snapshots_sent_total{sluice_service=\"demo\",kind=\"heartbeat\"} 1",
            "sluice_sync_redis_up 0",
            "sluice_sync_services 0",
            "# TYPE sluice_sync_write_to_send_seconds histogram",
            "sluice_sync_write_to_send_seconds_count 1",
            "sluice_sync_write_to_send_seconds_bucket{le=\"0.004\"} 1",
            "# TYPE sluice_sync_discovered_instances gauge",
            "sluice_sync_discovered_instances{sluice_service=\"disc\"} 2",
            "sluice_sync_discovery_stale{sluice_service=\"disc\"} 1",
            "sluice_sync_dns_lookup_failures_total{sluice_service=\"disc\"} 1",
            "sluice_sync_kubernetes_watch_failures_total{sluice_service=\"disc\"} 1",
            "sluice_sync_kubernetes_relists_total{sluice_service=\"disc\"} 2",
            "sluice_sync_share_watchers{sluice_service=\"shared\"} 3",
            "sluice_sync_share_capacity{sluice_service=\"shared\",path=\"/p\",address=\"10.0.0.1:80\"} 12",
            "sluice_sync_share_granted{sluice_service=\"shared\",path=\"/p\",address=\"10.0.0.1:80\"} 10",
            "sluice_sync_share_unaccounted{sluice_service=\"shared\",path=\"/p\",address=\"10.0.0.1:80\"} 2",
            "sluice_sync_share_pool_watchers{sluice_service=\"shared\",path=\"/p\",address=\"10.0.0.1:80\"} 3",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(!text.contains("10.0.0.2:80"), "a pool gone: {text}");
        m.forget("demo");
        m.forget_shares("shared");
        let text = m.encode(&services);
        assert!(!text.contains("demo"), "{text}");
        assert!(!text.contains("shared"), "{text}");
    }
}
