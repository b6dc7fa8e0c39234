//! The leader's gRPC stream to the sync service (`CapacitySync.Watch`):
//! opened from `on_tick` (never `on_configure`, which also runs in the
//! short-lived canary VM), reopened with backoff, watched for silence, and
//! each snapshot applied to the endpoints' shared records.
//!
//! Fail static: while the stream is down, the records keep the last
//! capacities; the status says since when.

use crate::admin::status::unix_ms;
use crate::host::Host;
use crate::worker::Worker;
use prost::Message;
use serde_json::{json, Value};
use sluice_core::admission;
use sluice_core::sync_api::{Snapshot, WatchRequest, SERVICE_NAME, WATCH_METHOD};
use sluice_core::sync_config::{SyncConfig, SyncToken};
use std::net::SocketAddr;
use std::time::Duration;

/// First reopen delay; doubles per failed attempt up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `envoy.config.core.v3.GrpcService`, only what the callout needs. Envoy
/// reads `open_grpc_stream`'s first argument as this message first; a bare
/// cluster name only works by accident (one named `envoy` aborts Envoy 1.40).
#[derive(Clone, PartialEq, prost::Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
    /// Headers Envoy adds to every stream it opens for this service.
    #[prost(message, repeated, tag = "5")]
    initial_metadata: Vec<HeaderValue>,
}

/// `envoy.config.core.v3.HeaderValue`.
#[derive(Clone, PartialEq, prost::Message)]
struct HeaderValue {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// `envoy.config.core.v3.GrpcService.EnvoyGrpc`.
#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
}

/// The serialized `GrpcService{envoy_grpc{cluster_name}}`, with
/// `authorization: Bearer <token>` as initial metadata when sync wants a
/// token (sync's `--token-file`).
pub fn grpc_service(cluster: &str, token: Option<&SyncToken>) -> Vec<u8> {
    GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.to_string(),
        }),
        initial_metadata: token
            .map(|t| HeaderValue {
                key: "authorization".to_string(),
                value: format!("Bearer {}", t.secret()),
            })
            .into_iter()
            .collect(),
    }
    .encode_to_vec()
}

/// gRPC's UNAUTHENTICATED: sync refused the token (or its absence).
const UNAUTHENTICATED: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// No stream; the next attempt at this host time.
    Waiting { retry_at_ns: u64 },
    /// Opened at `opened_ns`; `last_ns` is the last message (or the open).
    Open {
        token: u32,
        last_ns: u64,
        got_message: bool,
    },
}

pub struct SyncClient {
    config: SyncConfig,
    grpc_service: Vec<u8>,
    node: String,
    conn: Conn,
    /// Failed attempts since the last message: the backoff exponent.
    failures: u32,
    /// The newest snapshot version applied (or found in the records).
    version: u64,
    last_message_ns: Option<u64>,
    /// Since when no stream delivers (set at start and at each loss).
    disconnected_since_ns: Option<u64>,
    stale: bool,
    /// Ever connected since this VM leads: "connecting" vs "disconnected".
    connected_once: bool,
    /// The gRPC status of the last stream that closed, until a message
    /// arrives: why the filter is not connected.
    last_close_status: Option<u32>,
}

impl SyncClient {
    pub fn new(config: SyncConfig, node: String) -> SyncClient {
        SyncClient {
            grpc_service: grpc_service(&config.cluster, config.token.as_ref()),
            config,
            node,
            conn: Conn::Waiting { retry_at_ns: 0 },
            failures: 0,
            version: 0,
            last_message_ns: None,
            disconnected_since_ns: None,
            stale: false,
            connected_once: false,
            last_close_status: None,
        }
    }

    /// This VM became the leader: connect at once, starting from the newest
    /// version the records hold (a former leader may have applied it).
    pub fn start<H: Host>(&mut self, worker: &Worker<H>, now_ns: u64) {
        self.version = worker
            .routes
            .endpoints
            .iter()
            .filter_map(|r| admission::snapshot(&worker.host, &r.key).ok())
            .map(|s| s.sync_version)
            .max()
            .unwrap_or(0);
        self.conn = Conn::Waiting {
            retry_at_ns: now_ns,
        };
        self.failures = 0;
        self.disconnected_since_ns = Some(now_ns);
        self.connected_once = false;
    }

    /// This VM no longer leads (or its VM ends): drop the stream.
    pub fn stop<H: Host>(&mut self, host: &H) {
        if let Conn::Open { token, .. } = self.conn {
            // No close callback follows a cancel.
            let _ = host.cancel_grpc_stream(token);
        }
        self.conn = Conn::Waiting {
            retry_at_ns: u64::MAX,
        };
    }

    /// Opens the stream when due; the watchdog. Whether the status changed.
    pub fn tick<H: Host>(&mut self, host: &H, now_ns: u64) -> bool {
        match self.conn {
            Conn::Waiting { retry_at_ns } if now_ns >= retry_at_ns => {
                self.open(host, now_ns);
                false
            }
            Conn::Waiting { .. } => false,
            Conn::Open { token, last_ns, .. } => {
                let silent = now_ns.saturating_sub(last_ns);
                if silent > self.config.heartbeat_timeout.as_nanos() as u64 {
                    // A hung server or connection fires nothing (Envoy);
                    // the heartbeat is what tells.
                    log::warn!(
                        "sync: no message for {} ms on {}; reopening",
                        silent / 1_000_000,
                        self.config.cluster
                    );
                    let _ = host.cancel_grpc_stream(token);
                    self.lost(now_ns);
                    true
                } else {
                    false
                }
            }
        }
    }

    fn open<H: Host>(&mut self, host: &H, now_ns: u64) {
        let request = WatchRequest {
            service: self.config.service.clone(),
            node: self.node.clone(),
            last_version: self.version,
        }
        .encode_to_vec();
        let opened = host
            .open_grpc_stream(&self.grpc_service, SERVICE_NAME, WATCH_METHOD)
            .and_then(
                |token| match host.send_grpc_stream_message(token, &request, true) {
                    Ok(()) => Ok(token),
                    Err(e) => {
                        let _ = host.cancel_grpc_stream(token);
                        Err(e)
                    }
                },
            );
        match opened {
            Ok(token) => {
                log::debug!("sync: stream {token} opened to {}", self.config.cluster);
                self.conn = Conn::Open {
                    token,
                    last_ns: now_ns,
                    got_message: false,
                };
            }
            Err(e) => {
                log::warn!(
                    "sync: cannot open a stream to {}: {e:?}",
                    self.config.cluster
                );
                self.lost(now_ns);
            }
        }
    }

    /// The stream is gone: try again after a backoff with jitter.
    fn lost(&mut self, now_ns: u64) {
        if self.disconnected_since_ns.is_none() {
            self.disconnected_since_ns = Some(now_ns);
        }
        let delay = backoff(self.failures, now_ns);
        self.failures = self.failures.saturating_add(1);
        self.conn = Conn::Waiting {
            retry_at_ns: now_ns.saturating_add(delay.as_nanos() as u64),
        };
    }

    /// Envoy closed stream `token` (server gone, stream ended, or refused).
    pub fn on_close(&mut self, token: u32, grpc_status: u32, now_ns: u64) -> bool {
        match self.conn {
            Conn::Open { token: t, .. } if t == token => {
                if grpc_status == UNAUTHENTICATED {
                    log::warn!(
                        "sync: {} refused the stream: unauthenticated ({}); reopening",
                        self.config.cluster,
                        if self.config.token.is_some() {
                            "sync.token is not the token sync was started with"
                        } else {
                            "sync wants a token: set sync.token"
                        }
                    );
                } else {
                    log::warn!(
                        "sync: stream to {} closed with gRPC status {grpc_status}; reopening",
                        self.config.cluster
                    );
                }
                self.last_close_status = Some(grpc_status);
                self.lost(now_ns);
                true
            }
            _ => false,
        }
    }

    /// A message on stream `token`: a snapshot to apply, or a heartbeat.
    /// Whether the status changed.
    pub fn on_message<H: Host>(
        &mut self,
        worker: &Worker<H>,
        token: u32,
        bytes: &[u8],
        now_ns: u64,
    ) -> bool {
        let Conn::Open { token: t, .. } = self.conn else {
            return false;
        };
        if t != token {
            return false;
        }
        self.conn = Conn::Open {
            token,
            last_ns: now_ns,
            got_message: true,
        };
        self.failures = 0;
        self.last_close_status = None;
        self.last_message_ns = Some(now_ns);
        if self.disconnected_since_ns.take().is_some() {
            log::info!("sync: connected to {}", self.config.cluster);
        }
        self.connected_once = true;
        let snapshot = match Snapshot::decode(bytes) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("sync: undecodable message ({} bytes): {e}", bytes.len());
                return true;
            }
        };
        self.stale = snapshot.stale;
        if snapshot.heartbeat {
            return true;
        }
        if snapshot.service != self.config.service {
            log::warn!(
                "sync: snapshot of service {:?}, expected {:?}; ignored",
                snapshot.service,
                self.config.service
            );
            return true;
        }
        if snapshot.version < self.version {
            log::debug!(
                "sync: snapshot version {} older than {}; ignored",
                snapshot.version,
                self.version
            );
            return true;
        }
        self.apply(worker, &snapshot);
        self.version = snapshot.version;
        true
    }

    fn apply<H: Host>(&self, worker: &Worker<H>, snapshot: &Snapshot) {
        for e in &snapshot.endpoints {
            let Some(route) = worker.routes.endpoints.iter().find(|r| r.path == e.path) else {
                // Sync knows endpoints this configuration does not watch.
                log::debug!("sync: {} is not configured here; ignored", e.path);
                continue;
            };
            if e.capacity == 0 {
                log::warn!("sync: {} has capacity 0; ignored", e.path);
                continue;
            }
            match admission::apply_sync(
                &worker.host,
                &route.key,
                e.capacity,
                snapshot.version,
                worker.host.now_ns(),
            ) {
                Ok(Some(wakeups)) => worker.wake(&wakeups),
                Ok(None) => log::debug!("sync: {} holds a newer version", e.path),
                Err(e) => log::warn!("sync: cannot apply to {}: {e}", route.path),
            }
        }
        self.apply_instances(worker, snapshot);
    }

    /// A set sync discovered (DNS) replaces the configuration's, at once on
    /// every worker; per-instance figures from Redis apply to either.
    fn apply_instances<H: Host>(&self, worker: &Worker<H>, snapshot: &Snapshot) {
        if !snapshot.discovered && snapshot.instances.is_empty() {
            return;
        }
        let addresses: Vec<(SocketAddr, &sluice_core::sync_api::Instance)> = snapshot
            .instances
            .iter()
            .filter_map(|i| match i.address.parse() {
                Ok(a) => Some((a, i)),
                Err(_) => {
                    log::warn!("sync: instance {:?} is not IP:port; ignored", i.address);
                    None
                }
            })
            .take(admission::MAX_INSTANCES)
            .collect();
        let now = worker.host.now_ns();
        for route in &worker.routes.endpoints {
            let from_redis = |i: &sluice_core::sync_api::Instance| {
                i.capacities
                    .iter()
                    .find(|c| c.path == route.path && c.capacity > 0)
                    .map(|c| c.capacity)
            };
            let result = if snapshot.discovered {
                let hosts: Vec<(SocketAddr, Option<u32>)> = addresses
                    .iter()
                    .map(|&(a, i)| {
                        let configured = route
                            .instance_capacity
                            .iter()
                            .find(|(b, _)| *b == a)
                            .map(|&(_, c)| c);
                        (a, from_redis(i).or(configured))
                    })
                    .collect();
                admission::set_instances(
                    &worker.host,
                    &route.key,
                    &hosts,
                    admission::InstanceSource::Sync,
                    now,
                )
            } else {
                let capacities: Vec<(SocketAddr, u32)> = addresses
                    .iter()
                    .filter_map(|&(a, i)| Some((a, from_redis(i)?)))
                    .collect();
                admission::set_instance_capacities(&worker.host, &route.key, &capacities, now)
            };
            match result {
                Ok(wakeups) => worker.wake(&wakeups),
                Err(e) => log::warn!("sync: cannot apply instances to {}: {e}", route.path),
            }
        }
    }

    /// The `sync` object of the status.
    pub fn status(&self) -> Value {
        let state = match self.conn {
            Conn::Open {
                got_message: true, ..
            } => "connected",
            _ if self.connected_once => "disconnected",
            _ => "connecting",
        };
        json!({
            "state": state,
            "cluster": self.config.cluster,
            "service": self.config.service,
            "version": self.version,
            "stale": self.stale,
            "last_message_unix_ms": self.last_message_ns.map(unix_ms),
            "disconnected_since_unix_ms": self.disconnected_since_ns.map(unix_ms),
            "last_close_grpc_status": self.last_close_status,
            "refused": (self.last_close_status == Some(UNAUTHENTICATED)).then_some("unauthenticated"),
        })
    }
}

/// 100 ms doubling to 5 s, each drawn between half and all of that (jitter,
/// so that many Envoys do not reconnect in step after a sync restart).
pub fn backoff(failures: u32, seed: u64) -> Duration {
    let full = MIN_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF);
    let half = full / 2;
    let jitter = splitmix64(seed) % (half.as_nanos() as u64 + 1);
    half + Duration::from_nanos(jitter)
}

/// A cheap, well-mixed hash (no randomness hostcall in proxy-wasm).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_service_is_envoy_grpc_with_the_cluster_name() {
        // GrpcService{1: EnvoyGrpc{1: "sync"}}, as Envoy parses it.
        assert_eq!(
            grpc_service("sync", None),
            [0x0a, 6, 0x0a, 4, b's', b'y', b'n', b'c']
        );
        // The name `envoy` is no special case once serialized.
        assert_eq!(grpc_service("envoy", None)[..4], [0x0a, 7, 0x0a, 5]);
    }

    #[test]
    fn a_token_goes_in_the_initial_metadata() {
        let config = sluice_core::config::CalloutConfig::from_json(
            &json!({"sync": {"cluster": "s", "token": "t0k"}}),
            "demo",
        )
        .unwrap();
        let bytes = grpc_service("s", config.sync.unwrap().token.as_ref());
        let decoded = GrpcService::decode(bytes.as_slice()).unwrap();
        assert_eq!(
            decoded.initial_metadata,
            vec![HeaderValue {
                key: "authorization".into(),
                value: "Bearer t0k".into()
            }]
        );
        // Every length a single byte: the host passes it on as text.
        assert!(std::str::from_utf8(&bytes).is_ok());
        let longest = "x".repeat(sluice_core::config::callouts::MAX_TOKEN_LEN);
        let config = sluice_core::config::CalloutConfig::from_json(
            &json!({"sync": {"cluster": "x".repeat(100), "token": longest}}),
            "demo",
        )
        .unwrap();
        let bytes = grpc_service(&"x".repeat(100), config.sync.unwrap().token.as_ref());
        assert!(std::str::from_utf8(&bytes).is_ok());
    }

    #[test]
    fn backoff_doubles_to_five_seconds_with_jitter() {
        for seed in 0..200 {
            let b = backoff(0, seed);
            assert!(b >= Duration::from_millis(50) && b <= MIN_BACKOFF, "{b:?}");
            let b = backoff(3, seed);
            assert!(b >= Duration::from_millis(400) && b <= Duration::from_millis(800));
            let b = backoff(30, seed);
            assert!(b >= Duration::from_millis(2500) && b <= MAX_BACKOFF);
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|s| backoff(4, s)).collect();
        assert!(spread.len() > 40, "jittered");
    }
}
