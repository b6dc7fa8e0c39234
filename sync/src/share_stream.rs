//! The `Share` RPC: every Share stream of a service feeds that service's
//! [`Allocator`] (one per service in this process, docs/sync.md "Shares
//! among Envoy replicas"), and each stream carries its Envoy's grants.
//!
//! The stream layer's contract with the allocator: `join` before the first
//! report counts, `report` on each, `leave` only when the stream ends after
//! a report marked `final`, `lost` on any other end (a reset, shutdown, a
//! bad report). A tick lets leases run out. The pools are the service's
//! capacities and instance set, from the same view `Watch` streams.

use crate::allocator::{Election, Role};
use crate::api::{
    PoolAssignment, PoolShare, ShareGrant, ShareReport, StreamRef as WireStreamRef, WatcherShare,
};
use crate::auth::Token;
use crate::grpc::{check_service, shown_node};
use crate::services::{stopping, Services};
use crate::shares::{self, Allocator, PoolKey, PoolReport, Report, StreamRef, WatcherId};
use crate::snapshots::ServiceView;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

/// How often leases are checked and pools compared with the service's view.
/// A lease that ran out frees its slots at most this late.
const TICK: Duration = Duration::from_millis(50);
/// A report naming more pools is refused (its keys are kept per watcher).
pub const MAX_POOLS_PER_REPORT: usize = 4096;

/// Every service's allocator, and the streams that feed it.
pub struct ShareHub {
    services: Arc<Services>,
    settings: shares::Settings,
    /// Unique to this process: a stream named in `replaces` by an Envoy
    /// that held a grant of an earlier sync is not taken for one of ours.
    epoch: u64,
    /// The allocators' clock; they all start at 0, the process start.
    clock: Instant,
    /// Watcher ids never repeat in a process, so an allocator dropped and
    /// made again (same epoch) cannot take an old stream for a new one.
    next_watcher: AtomicU64,
    by_service: Mutex<HashMap<String, Arc<Mutex<ServiceShares>>>>,
    /// With several replicas (`--advertise`): who allocates each service,
    /// and the token to forward streams with.
    election: Option<(Arc<Election>, Option<Token>)>,
}

/// One open stream's hold on its service's allocator.
struct Joined {
    id: WatcherId,
    grants: watch::Receiver<Option<ShareGrant>>,
    entry: Arc<Mutex<ServiceShares>>,
}

struct ServiceShares {
    alloc: Allocator,
    /// The open streams, where their grants go.
    streams: BTreeMap<WatcherId, watch::Sender<Option<ShareGrant>>>,
    /// `node` of every watcher the allocator may still count.
    nodes: BTreeMap<WatcherId, String>,
    /// What was last given to `set_pools`.
    pools: BTreeMap<PoolKey, u32>,
}

impl ShareHub {
    pub fn new(services: Arc<Services>, settings: shares::Settings) -> Arc<ShareHub> {
        Arc::new(ShareHub::build(services, settings, None))
    }

    fn build(
        services: Arc<Services>,
        settings: shares::Settings,
        election: Option<(Arc<Election>, Option<Token>)>,
    ) -> ShareHub {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        ShareHub {
            services,
            settings,
            epoch,
            clock: Instant::now(),
            next_watcher: AtomicU64::new(1),
            by_service: Mutex::new(HashMap::new()),
            election,
        }
    }

    /// A hub that allocates only the services whose lease it holds and
    /// forwards the other services' streams to their allocator.
    pub fn with_election(
        services: Arc<Services>,
        settings: shares::Settings,
        election: Arc<Election>,
        token: Option<Token>,
    ) -> Arc<ShareHub> {
        Arc::new(ShareHub::build(services, settings, Some((election, token))))
    }

    /// This replica just took `service`'s lease: its allocator starts now,
    /// with a restart's grace, whatever it knew from an earlier term (the
    /// other replica's grants are not in it).
    fn take_over(&self, service: &str) {
        let mut by_service = self.by_service.lock().expect("shares lock");
        by_service.insert(
            service.to_string(),
            Arc::new(Mutex::new(ServiceShares {
                alloc: Allocator::new(self.settings, self.now(), self.epoch),
                streams: BTreeMap::new(),
                nodes: BTreeMap::new(),
                pools: BTreeMap::new(),
            })),
        );
    }

    pub fn settings(&self) -> &shares::Settings {
        &self.settings
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn existing(&self, service: &str) -> Option<Arc<Mutex<ServiceShares>>> {
        self.by_service
            .lock()
            .expect("shares lock")
            .get(service)
            .cloned()
    }

    /// A stream of `service` opened: its id, where its grants will be, and
    /// its service's allocator.
    fn join(&self, service: &str, node: &str) -> Joined {
        let id = self.next_watcher.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let now = self.now();
        // Joined under the map's lock, so the tick cannot drop this
        // allocator as idle between finding it and joining it.
        let mut by_service = self.by_service.lock().expect("shares lock");
        let entry = by_service
            .entry(service.to_string())
            .or_insert_with(|| {
                // Started at the process start: whatever an earlier sync
                // granted has run out by then + lease + fallback.
                Arc::new(Mutex::new(ServiceShares {
                    alloc: Allocator::new(self.settings, 0, self.epoch),
                    streams: BTreeMap::new(),
                    nodes: BTreeMap::new(),
                    pools: BTreeMap::new(),
                }))
            })
            .clone();
        {
            let mut shares = entry.lock().expect("service shares lock");
            shares.alloc.join(id, now);
            shares.streams.insert(id, tx);
            shares.nodes.insert(id, node.to_string());
        }
        drop(by_service);
        Joined {
            id,
            grants: rx,
            entry,
        }
    }

    fn report(&self, service: &str, joined: &Joined, report: &ShareReport) {
        let now = self.now();
        let mut entry = joined.entry.lock().expect("service shares lock");
        entry.alloc.report(joined.id, from_wire(report), now);
        self.update(service, &mut entry, now);
    }

    /// The stream ended: after a final report (`leave`) or not (`lost`).
    fn end(&self, service: &str, joined: &Joined, after_final: bool) {
        let now = self.now();
        let mut entry = joined.entry.lock().expect("service shares lock");
        entry.streams.remove(&joined.id);
        if after_final {
            entry.alloc.leave(joined.id, now);
        } else {
            entry.alloc.lost(joined.id, now);
        }
        self.update(service, &mut entry, now);
    }

    /// Pools from the service's view, then the grants that changed, each
    /// handed to its stream. Nothing before the view was first read.
    fn update(&self, service: &str, entry: &mut ServiceShares, now: u64) {
        let view = self.services.get(service).and_then(|s| s.current());
        if view.is_none() {
            // Not read from Redis yet (a sync just started): a grant now
            // would list no pool, and an Envoy applying it would drop the
            // shares it holds. Unanswered, it keeps them under its lease.
            return;
        }
        let pools = pools_of(view.as_ref(), &entry.alloc.reported_pools());
        if pools != entry.pools {
            entry.alloc.set_pools(&pools, now);
            entry.pools = pools;
        }
        for (id, grant) in entry.alloc.grants(now) {
            if let Some(stream) = entry.streams.get(&id) {
                stream.send_replace(Some(to_wire(&grant)));
            }
        }
    }

    /// Leases run out, views change: every service is looked at every
    /// tick (50 ms). An allocator that counts nobody and has no stream is
    /// dropped. Runs until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.tick(),
                _ = stopping(&mut shutdown) => return,
            }
        }
    }

    pub fn tick(&self) {
        let now = self.now();
        let entries: Vec<(String, Arc<Mutex<ServiceShares>>)> = self
            .by_service
            .lock()
            .expect("shares lock")
            .iter()
            .map(|(name, entry)| (name.clone(), entry.clone()))
            .collect();
        let metrics = self.services.metrics();
        for (service, entry) in entries {
            let mut guard = entry.lock().expect("service shares lock");
            guard.alloc.tick(now);
            self.update(&service, &mut guard, now);
            let counted: BTreeSet<WatcherId> = guard.alloc.watchers().map(|(id, _)| id).collect();
            guard.nodes.retain(|id, _| counted.contains(id));
            if guard.streams.is_empty() && guard.alloc.is_empty() {
                drop(guard);
                let mut by_service = self.by_service.lock().expect("shares lock");
                // A stream may have joined since: only drop the idle one.
                let idle = by_service.get(&service).is_some_and(|e| {
                    Arc::ptr_eq(e, &entry)
                        && e.try_lock()
                            .is_ok_and(|g| g.streams.is_empty() && g.alloc.is_empty())
                });
                if idle {
                    by_service.remove(&service);
                    metrics.forget_shares(&service);
                }
                continue;
            }
            let pools: Vec<_> = assignment_of(&guard, now)
                .into_iter()
                .map(|p| crate::metrics::PoolFigures {
                    path: p.path,
                    address: p.address,
                    capacity: p.capacity,
                    granted: p.granted,
                    unaccounted: p.unaccounted,
                    watchers: p.watchers.iter().filter(|w| w.held > 0).count() as u32,
                })
                .collect();
            metrics.set_shares(&service, guard.streams.len(), &pools);
        }
    }

    /// Every pool of `service` and each watcher's part (Fetch); empty when
    /// no Envoy shares it.
    pub fn assignment(&self, service: &str) -> Vec<PoolAssignment> {
        let Some(entry) = self.existing(service) else {
            return Vec::new();
        };
        let now = self.now();
        let mut entry = entry.lock().expect("service shares lock");
        entry.alloc.tick(now);
        assignment_of(&entry, now)
    }

    /// Serves one Share stream: reports from `inbound`, grants to `tx`.
    pub async fn serve_stream(
        self: Arc<Self>,
        mut inbound: Streaming<ShareReport>,
        tx: mpsc::Sender<Result<ShareGrant, Status>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let first = tokio::select! {
            message = inbound.message() => message,
            _ = stopping(&mut shutdown) => return,
            _ = tx.closed() => return,
        };
        let first = match first {
            Ok(Some(report)) => report,
            Ok(None) => return,
            Err(status) => {
                debug!(%status, "share stream ended before its first report");
                return;
            }
        };
        if let Err(status) = check_report(&first, None) {
            let _ = tx.send(Err(status)).await;
            return;
        }
        let service = first.service.clone();
        let node = shown_node(&first.node);
        let mut lost = None;
        if let Some((election, token)) = &self.election {
            match election.role(&service).await {
                Ok(Role::Allocator { taken }) => {
                    if taken {
                        self.take_over(&service);
                    }
                    lost = election.lost(&service);
                }
                Ok(Role::Forward(to)) => {
                    debug!(service = %service, node = %node, allocator = %to, "forwarding a share stream");
                    forward(&to, token.as_ref(), first, inbound, tx, shutdown).await;
                    return;
                }
                Err(e) => {
                    let status = Status::unavailable(format!(
                        "no allocator for service {service:?} known ({e}): reconnect"
                    ));
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        }
        // Resolves once this replica stops allocating the service (never
        // without an election); the lease's record dropped counts too.
        let handed_over = async move {
            match lost {
                Some(mut lost) => {
                    let _ = lost.wait_for(|l| *l).await.map(|_| ());
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(handed_over);
        // Held while the stream lives: the service is read and not forgotten.
        let _watching = match self.services.watch(&service, 0) {
            Ok(watching) => watching,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::resource_exhausted(e.to_string())))
                    .await;
                return;
            }
        };
        let mut joined = self.join(&service, &node);
        let id = joined.id;
        info!(service = %service, node = %node, watcher = id, "share stream opened");
        self.report(&service, &joined, &first);
        let mut after_final = first.r#final;
        let ended = loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(report)) => {
                        if let Err(status) = check_report(&report, Some(&service)) {
                            let _ = tx.send(Err(status)).await;
                            break Ended::Lost("a bad report");
                        }
                        after_final = report.r#final;
                        self.report(&service, &joined, &report);
                    }
                    Ok(None) if after_final => break Ended::Left,
                    Ok(None) => break Ended::Lost("ended without a final report"),
                    Err(_) => break Ended::Lost("reset"),
                },
                changed = joined.grants.changed() => {
                    if changed.is_err() {
                        break Ended::Lost("dropped");
                    }
                    let grant = joined.grants.borrow_and_update().clone();
                    if let Some(grant) = grant {
                        debug!(service = %service, node = %node, watcher = id,
                               version = grant.share_version, seq = grant.lease_for_seq, "granting");
                        if tx.send(Ok(grant)).await.is_err() {
                            break Ended::Lost("gone");
                        }
                    }
                }
                _ = stopping(&mut shutdown) => {
                    let status = Status::unavailable("sluice-sync is shutting down: reconnect");
                    let _ = tx.send(Err(status)).await;
                    break Ended::Lost("shutting down");
                }
                _ = &mut handed_over => {
                    let status = Status::unavailable(
                        "this sluice-sync no longer allocates the service's shares: reconnect",
                    );
                    let _ = tx.send(Err(status)).await;
                    break Ended::Lost("handed over");
                }
                _ = tx.closed() => break Ended::Lost("gone"),
            }
        };
        self.end(&service, &joined, matches!(ended, Ended::Left));
        let how = match ended {
            Ended::Left => "left after a final report",
            Ended::Lost(how) => how,
        };
        info!(service = %service, node = %node, watcher = id, how, "share stream ended");
    }
}

/// Relays a Share stream to the replica that allocates its service: the
/// first report and every later one there, its grants (and its end) back.
async fn forward(
    to: &str,
    token: Option<&Token>,
    first: ShareReport,
    mut inbound: Streaming<ShareReport>,
    tx: mpsc::Sender<Result<ShareGrant, Status>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let unavailable = |what: String| Status::unavailable(format!("{what}: reconnect"));
    let channel = match tonic::transport::Endpoint::from_shared(format!("http://{to}")) {
        Ok(e) => e.connect_timeout(FORWARD_CONNECT_TIMEOUT).connect().await,
        Err(e) => {
            let _ = tx
                .send(Err(unavailable(format!("allocator address {to:?}: {e}"))))
                .await;
            return;
        }
    };
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            let _ = tx
                .send(Err(unavailable(format!("the allocator at {to}: {e}"))))
                .await;
            return;
        }
    };
    let (out, out_rx) = mpsc::channel::<ShareReport>(16);
    let _ = out.send(first).await;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    if let Some(token) = token {
        if let Ok(value) = token.bearer().parse() {
            request.metadata_mut().insert("authorization", value);
        }
    }
    let mut client = crate::api::capacity_sync_client::CapacitySyncClient::new(channel);
    let mut grants = match client.share(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    let mut out = Some(out);
    loop {
        tokio::select! {
            message = inbound.message(), if out.is_some() => match message {
                Ok(Some(report)) => {
                    if out.as_ref().expect("open").send(report).await.is_err() {
                        break;
                    }
                }
                // The Envoy half-closed (after its final report): so does
                // the relay, and the allocator's answer ends the stream.
                Ok(None) => out = None,
                Err(_) => break,
            },
            grant = grants.message() => match grant {
                Ok(Some(grant)) => {
                    if tx.send(Ok(grant)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            },
            _ = stopping(&mut shutdown) => {
                let _ = tx.send(Err(unavailable("sluice-sync is shutting down".into()))).await;
                break;
            }
            _ = tx.closed() => break,
        }
    }
}

/// A forwarding replica gives up on the allocator this soon.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How a Share stream ended: only `Left` frees its slots before its lease.
enum Ended {
    Left,
    Lost(&'static str),
}

/// A report is for one service (the stream's first names it), names at most
/// [`MAX_POOLS_PER_REPORT`] pools, each with a path.
fn check_report(report: &ShareReport, service: Option<&str>) -> Result<(), Status> {
    match service {
        None => check_service(&report.service)?,
        Some(service) if report.service != service => {
            return Err(Status::invalid_argument(format!(
                "report for service {:?} on a share stream of {service:?}: one service per stream",
                report.service
            )))
        }
        Some(_) => {}
    }
    if report.pools.len() > MAX_POOLS_PER_REPORT {
        warn!(service = %report.service, pools = report.pools.len(), "refused a share report naming too many pools");
        return Err(Status::invalid_argument(format!(
            "report names {} pools, more than {MAX_POOLS_PER_REPORT}",
            report.pools.len()
        )));
    }
    if let Some(pool) = report.pools.iter().find(|p| p.path.is_empty()) {
        return Err(Status::invalid_argument(format!(
            "report names a pool without a path (address {:?})",
            pool.address
        )));
    }
    Ok(())
}

fn pool_key(path: &str, address: &str) -> PoolKey {
    if address.is_empty() {
        PoolKey::endpoint(path)
    } else {
        PoolKey::instance(path, address)
    }
}

fn from_wire(report: &ShareReport) -> Report {
    Report {
        seq: report.seq,
        applied_version: report.applied_version,
        pools: report
            .pools
            .iter()
            .map(|p| {
                (
                    pool_key(&p.path, &p.address),
                    PoolReport {
                        holding: p.holding,
                        in_flight: p.in_flight,
                        queued: p.queued,
                    },
                )
            })
            .collect(),
        replaces: report.replaces.map(|r| StreamRef {
            epoch: r.epoch,
            watcher: r.watcher,
        }),
    }
}

fn to_wire(grant: &shares::Grant) -> ShareGrant {
    ShareGrant {
        share_version: grant.share_version,
        shares: grant
            .shares
            .iter()
            .map(|(key, &share)| PoolShare {
                path: key.path.clone(),
                address: key.address.clone().unwrap_or_default(),
                share,
            })
            .collect(),
        lease_ms: grant.lease_ms,
        lease_for_seq: grant.lease_for_seq,
        fallback_for_ms: grant.fallback_for_ms,
        watchers: grant.watchers,
        stream: Some(WireStreamRef {
            epoch: grant.stream.epoch,
            watcher: grant.stream.watcher,
        }),
    }
}

fn assignment_of(entry: &ServiceShares, now: u64) -> Vec<PoolAssignment> {
    let alloc = &entry.alloc;
    let watchers: Vec<(WatcherId, bool)> = alloc.watchers().collect();
    alloc
        .pools()
        .map(|(key, capacity)| {
            let parts: Vec<WatcherShare> = watchers
                .iter()
                .map(|&(id, connected)| {
                    let reported = alloc.reported(id, key);
                    WatcherShare {
                        stream: Some(WireStreamRef {
                            epoch: alloc.epoch(),
                            watcher: id,
                        }),
                        node: entry.nodes.get(&id).cloned().unwrap_or_default(),
                        share: alloc.share(id, key),
                        held: alloc.held(id, key, now),
                        in_flight: reported.in_flight,
                        queued: reported.queued,
                        connected,
                    }
                })
                .collect();
            PoolAssignment {
                path: key.path.clone(),
                address: key.address.clone().unwrap_or_default(),
                capacity,
                granted: parts.iter().map(|w| w.share).sum(),
                unaccounted: alloc.unaccounted(key, now),
                watchers: parts,
            }
        })
        .collect()
}

/// The pools of a service and their capacities: with a discovered instance
/// set, every endpoint on every instance (its own figure, else the
/// endpoint's); otherwise the filter holds the set (`instances.hosts`), so
/// the instances are those with a figure in Redis and those the Envoys
/// report, and an endpoint with none of either (or that an Envoy reports
/// without an address) is one pool. A reported pool of an endpoint without
/// a capacity is not shared: the filter does not limit it.
pub fn pools_of(
    view: Option<&ServiceView>,
    reported: &BTreeSet<PoolKey>,
) -> BTreeMap<PoolKey, u32> {
    let mut pools = BTreeMap::new();
    let Some(view) = view else {
        return pools;
    };
    for endpoint in &view.endpoints {
        let path = endpoint.path.as_str();
        let figure = |address: &str| {
            view.instances
                .iter()
                .find(|i| i.address == address)
                .and_then(|i| i.capacities.iter().find(|c| c.path == path))
                .map_or(endpoint.capacity, |c| c.capacity)
        };
        let mut addresses: BTreeSet<&str> =
            view.instances.iter().map(|i| i.address.as_str()).collect();
        let mut whole = false;
        if view.discovered {
            whole = addresses.is_empty();
        } else {
            for key in reported.iter().filter(|k| k.path == path) {
                match &key.address {
                    Some(address) => {
                        addresses.insert(address);
                    }
                    None => whole = true,
                }
            }
            whole |= addresses.is_empty();
        }
        if whole {
            pools.insert(PoolKey::endpoint(path), endpoint.capacity);
        }
        for address in addresses {
            pools.insert(PoolKey::instance(path, address), figure(address));
        }
    }
    pools
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{EndpointCapacity, Instance};

    fn endpoint(path: &str, capacity: u32) -> EndpointCapacity {
        EndpointCapacity {
            path: path.into(),
            capacity,
            source: "probe".into(),
            measured_at: 1,
        }
    }

    fn view(discovered: bool) -> ServiceView {
        ServiceView {
            version: 3,
            endpoints: vec![endpoint("/a", 4), endpoint("/b", 2)],
            instances: vec![
                Instance {
                    address: "10.0.0.1:80".into(),
                    capacities: vec![endpoint("/a", 8)],
                },
                Instance {
                    address: "10.0.0.2:80".into(),
                    capacities: vec![],
                },
            ],
            discovered,
            ..Default::default()
        }
    }

    #[test]
    fn discovered_instances_make_every_pool_with_their_own_figures() {
        let reported = BTreeSet::from([
            PoolKey::instance("/a", "10.0.0.9:80"),
            PoolKey::endpoint("/b"),
        ]);
        let pools = pools_of(Some(&view(true)), &reported);
        assert_eq!(
            pools,
            BTreeMap::from([
                (PoolKey::instance("/a", "10.0.0.1:80"), 8),
                (PoolKey::instance("/a", "10.0.0.2:80"), 4),
                (PoolKey::instance("/b", "10.0.0.1:80"), 2),
                (PoolKey::instance("/b", "10.0.0.2:80"), 2),
            ]),
            "the discovered set is the set: reported strangers are not pools"
        );
    }

    #[test]
    fn without_discovery_reported_instances_and_endpoints_join() {
        let reported = BTreeSet::from([
            PoolKey::instance("/a", "10.0.0.9:80"),
            PoolKey::endpoint("/b"),
            PoolKey::endpoint("/unknown"),
        ]);
        let pools = pools_of(Some(&view(false)), &reported);
        assert_eq!(
            pools,
            BTreeMap::from([
                (PoolKey::instance("/a", "10.0.0.1:80"), 8),
                (PoolKey::instance("/a", "10.0.0.2:80"), 4),
                (PoolKey::instance("/a", "10.0.0.9:80"), 4),
                (PoolKey::endpoint("/b"), 2),
                (PoolKey::instance("/b", "10.0.0.1:80"), 2),
                (PoolKey::instance("/b", "10.0.0.2:80"), 2),
            ])
        );
        let plain = ServiceView {
            instances: vec![],
            ..view(false)
        };
        assert_eq!(
            pools_of(Some(&plain), &BTreeSet::new()),
            BTreeMap::from([(PoolKey::endpoint("/a"), 4), (PoolKey::endpoint("/b"), 2)])
        );
        assert_eq!(
            pools_of(
                Some(&plain),
                &BTreeSet::from([PoolKey::instance("/a", "10.0.0.9:80")])
            ),
            BTreeMap::from([
                (PoolKey::instance("/a", "10.0.0.9:80"), 4),
                (PoolKey::endpoint("/b"), 2)
            ]),
            "an endpoint the Envoys report instances of is not also one pool"
        );
        assert!(pools_of(None, &reported).is_empty(), "never read: nothing");
    }

    #[test]
    fn reports_are_checked() {
        let report = |service: &str, pools: usize, path: &str| ShareReport {
            service: service.into(),
            pools: (0..pools)
                .map(|i| crate::api::PoolDemand {
                    path: path.into(),
                    address: format!("10.0.0.1:{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        assert!(check_report(&report("demo", 1, "/a"), None).is_ok());
        let cases = [
            (report("", 0, "/a"), None, "service is empty"),
            (
                report("other", 0, "/a"),
                Some("demo"),
                "one service per stream",
            ),
            (
                report("demo", MAX_POOLS_PER_REPORT + 1, "/a"),
                Some("demo"),
                "more than 4096",
            ),
            (report("demo", 1, ""), None, "without a path"),
        ];
        for (report, service, want) in cases {
            let status = check_report(&report, service).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(want), "{}", status.message());
        }
    }
}
