//! The CapacitySync gRPC service: `Watch` streams a service's snapshots
//! from its view in [`Services`], `Fetch` answers with it once (and the
//! shares given out), `Share` is served by [`ShareHub`].

use crate::api::capacity_sync_server::CapacitySync;
use crate::api::{FetchRequest, ShareGrant, ShareReport, Snapshot, WatchRequest};
use crate::metrics::Kind;
use crate::services::{stopping, Services, TooManyServices, Watching};
use crate::share_stream::ShareHub;
use crate::snapshots::heartbeat;
use sluice_core::redis_keys::check_service_name;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

/// How long `Fetch` waits for the first read of a service it names first.
const FETCH_WAIT: Duration = Duration::from_secs(2);
/// Snapshots queued for one watcher. A slow watcher only delays itself; it
/// always gets the newest view next (older ones are never queued).
const SEND_QUEUE: usize = 2;
/// Longer names are refused: they become Redis keys and log fields.
pub const MAX_SERVICE_NAME: usize = 128;
/// `node` only names the caller in logs: longer is cut.
const MAX_NODE_NAME: usize = 128;
/// Redis's counters are signed 64-bit: no version a client holds can be
/// above this.
pub const MAX_VERSION: u64 = i64::MAX as u64;

pub struct CapacitySyncService {
    services: Arc<Services>,
    shares: Arc<ShareHub>,
    heartbeat_interval: Duration,
    shutdown: watch::Receiver<bool>,
}

impl CapacitySyncService {
    pub fn new(
        services: Arc<Services>,
        shares: Arc<ShareHub>,
        heartbeat_interval: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> CapacitySyncService {
        CapacitySyncService {
            services,
            shares,
            heartbeat_interval,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl CapacitySync for CapacitySyncService {
    type WatchStream = ReceiverStream<Result<Snapshot, Status>>;
    type ShareStream = ReceiverStream<Result<ShareGrant, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        check_service(&request.service)?;
        check_last_version(request.last_version)?;
        let node = shown_node(&request.node);
        let watching = self
            .services
            .watch(&request.service, request.last_version)
            .map_err(refused)?;
        info!(
            service = %request.service, node = %node,
            last_version = request.last_version, peer = ?peer, "watcher connected"
        );
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let watcher = Watcher {
            service: request.service,
            node,
            watching,
            services: self.services.clone(),
            tx,
            heartbeat_interval: self.heartbeat_interval,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(watcher.run());
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<Snapshot>, Status> {
        let service = request.into_inner().service;
        check_service(&service)?;
        // Held for the call only: then forgotten after the idle grace.
        let watching = self.services.watch(&service, 0).map_err(refused)?;
        let mut views = watching.entry().subscribe();
        let first_read = tokio::time::timeout(FETCH_WAIT, async {
            loop {
                if let Some(view) = views.borrow_and_update().clone() {
                    return Some(view);
                }
                if views.changed().await.is_err() {
                    return None;
                }
            }
        });
        match first_read.await {
            Ok(Some(view)) => {
                let mut snapshot = view.snapshot(&service, now_unix_ms());
                snapshot.assignment = self.shares.assignment(&service);
                Ok(Response::new(snapshot))
            }
            _ => Err(Status::unavailable(format!(
                "no capacities for service {service:?} yet: Redis has not answered since sluice-sync started"
            ))),
        }
    }

    async fn share(
        &self,
        request: Request<Streaming<ShareReport>>,
    ) -> Result<Response<Self::ShareStream>, Status> {
        share_stream(self.shares.clone(), request, self.shutdown.clone()).await
    }
}

/// The service is in the stream's first report, so it is checked there,
/// not here: a bad one ends the stream with `INVALID_ARGUMENT`.
async fn share_stream(
    shares: Arc<ShareHub>,
    request: Request<Streaming<ShareReport>>,
    shutdown: watch::Receiver<bool>,
) -> Result<Response<ReceiverStream<Result<ShareGrant, Status>>>, Status> {
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    tokio::spawn(shares.serve_stream(request.into_inner(), tx, shutdown));
    Ok(Response::new(ReceiverStream::new(rx)))
}

fn refused(e: TooManyServices) -> Status {
    Status::resource_exhausted(e.to_string())
}

/// A service name is 1 to [`MAX_SERVICE_NAME`] bytes of printable ASCII
/// without braces (it is a Redis key's hash tag) or spaces.
pub fn check_service(service: &str) -> Result<(), Status> {
    if service.is_empty() {
        return Err(Status::invalid_argument(
            "service is empty: name the service (`service:` of sluice.yaml)",
        ));
    }
    if service.len() > MAX_SERVICE_NAME {
        return Err(Status::invalid_argument(format!(
            "service is longer than {MAX_SERVICE_NAME} bytes"
        )));
    }
    check_service_name(service).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !service.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "service {service:?} holds a character that is not printable ASCII: \
             use letters, digits and punctuation such as - _ . : /"
        )));
    }
    Ok(())
}

/// A `last_version` no Redis counter can reach is a bad request, not news.
fn check_last_version(last_version: u64) -> Result<(), Status> {
    if last_version > MAX_VERSION {
        return Err(Status::invalid_argument(format!(
            "last_version {last_version} is above any version Redis can hold ({MAX_VERSION}): \
             send the version of the last snapshot you applied, or 0"
        )));
    }
    Ok(())
}

/// `node` as logged: control characters escaped, cut to a bounded length
/// (Watch and Share streams alike).
pub(crate) fn shown_node(node: &str) -> String {
    let mut shown: String = node.escape_default().collect();
    if shown.len() > MAX_NODE_NAME {
        let mut end = MAX_NODE_NAME;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push_str("...");
    }
    shown
}

/// One `Watch` stream.
struct Watcher {
    service: String,
    node: String,
    /// Keeps the service remembered while the stream lives.
    watching: Watching,
    services: Arc<Services>,
    tx: mpsc::Sender<Result<Snapshot, Status>>,
    heartbeat_interval: Duration,
    shutdown: watch::Receiver<bool>,
}

impl Watcher {
    /// Sends the current view (if the service was read yet), then each new
    /// one, and a heartbeat whenever nothing was sent for a heartbeat
    /// interval. Ends when the client goes away, or on shutdown with
    /// UNAVAILABLE so the client reconnects (to another replica).
    async fn run(self) {
        let metrics = self.services.metrics().clone();
        metrics.watcher_joined(&self.service);
        self.follow().await;
        metrics.watcher_left(&self.service);
    }

    async fn follow(&self) {
        let mut shutdown = self.shutdown.clone();
        let mut views = self.watching.entry().subscribe();
        let mut heartbeats = tokio::time::interval(self.heartbeat_interval);
        heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let first = views.borrow_and_update().clone();
        if let Some(view) = first {
            if !self.send(view.snapshot(&self.service, now_unix_ms())).await {
                return;
            }
        }
        heartbeats.reset();
        loop {
            tokio::select! {
                changed = views.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let view = views.borrow_and_update().clone();
                    if let Some(view) = view {
                        let heard_at = self.watching.entry().heard_at();
                        if !self.send(view.snapshot(&self.service, now_unix_ms())).await {
                            break;
                        }
                        if let Some(at) = heard_at {
                            self.services.metrics().write_to_send(at.elapsed());
                        }
                        heartbeats.reset();
                    }
                }
                _ = heartbeats.tick() => {
                    let view = self.watching.entry().current();
                    let beat = heartbeat(&self.service, view.as_ref(), self.services.redis_up(), now_unix_ms());
                    if !self.send(beat).await {
                        break;
                    }
                }
                _ = stopping(&mut shutdown) => {
                    let status = Status::unavailable("sluice-sync is shutting down: reconnect");
                    let _ = self.tx.send(Err(status)).await;
                    info!(service = %self.service, node = %self.node, "watch stream ended: shutting down");
                    return;
                }
                _ = self.tx.closed() => break,
            }
        }
        info!(service = %self.service, node = %self.node, "watcher disconnected");
    }

    /// `false` once the client is gone.
    async fn send(&self, snapshot: Snapshot) -> bool {
        debug!(
            service = %self.service, node = %self.node, version = snapshot.version,
            heartbeat = snapshot.heartbeat, stale = snapshot.stale, "sending"
        );
        let kind = if snapshot.heartbeat {
            Kind::heartbeat
        } else {
            Kind::state
        };
        let sent = self.tx.send(Ok(snapshot)).await.is_ok();
        if sent {
            self.services.metrics().sent(&self.service, kind);
        }
        sent
    }
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
