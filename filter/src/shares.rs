//! The leader's `Share` stream to sync (`sync.shares: true`): this Envoy's
//! part of every pool the Envoys of the service share (docs/sync.md,
//! "Shares among Envoy replicas").
//!
//! It reports the demand of every pool from the records every
//! [`REPORT_INTERVAL`], and at once when a pool's demand changed in a way
//! that lets sync move slots ([`prompt`]: a queue starts or ends, a share
//! was lowered, requests above a lowered share end), and writes each grant into the records, where the request
//! path enforces it: the share while the lease runs, then the fallback,
//! then 0, at the host's time on every admission, so an expired lease holds
//! even if no leader ticks. The grant it enforces survives a reconnect and
//! a change of leader VM (shared data), so the next stream names it in
//! `replaces` and keeps its share.

use crate::admin::status::unix_ms;
use crate::host::Host;
use crate::sync_stream::{backoff, grpc_service};
use crate::worker::Worker;
use prost::Message;
use serde_json::{json, Value};
use sluice_core::admission::{self, EndpointShares, EndpointState, Share, ShareLease};
use sluice_core::sync_api::{PoolDemand, ShareGrant, ShareReport, SERVICE_NAME, SHARE_METHOD};
use sluice_core::sync_config::SyncConfig;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

/// How often the leader reports (sync's `report_interval_ms`).
pub const REPORT_INTERVAL: Duration = Duration::from_millis(200);
/// How often the leader's worker ticks while it shares: a change of
/// demand that sync must hear of at once is reported within this.
pub const SHARE_TICK: Duration = Duration::from_millis(10);
/// The least time between two reports sent for a change of demand (a
/// request waiting on a share of 0 and a lowered share excepted): under load the triggers fire
/// on every completion above a lowered share, and each report costs sync
/// an allocation.
pub const PROMPT_GAP: Duration = Duration::from_millis(20);
/// Reports of a stream whose send time is kept, to anchor leases.
const SENT_KEPT: usize = 64;

/// The grant this Envoy enforces, in shared data so that a new leader VM
/// takes it over (`sluice:<service>:shares`).
#[derive(Clone, PartialEq, prost::Message)]
struct Held {
    #[prost(message, optional, tag = "1")]
    grant: Option<ShareGrant>,
    /// Host time the lease ends; then the fallback until `fallback_until_ns`.
    #[prost(uint64, tag = "2")]
    until_ns: u64,
    #[prost(uint64, tag = "3")]
    fallback_until_ns: u64,
}

fn held_key(service: &str) -> String {
    format!("sluice:{service}:shares")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Waiting { retry_at_ns: u64 },
    Open { token: u32, last_grant_ns: u64 },
}

pub struct ShareClient {
    config: SyncConfig,
    grpc_service: Vec<u8>,
    node: String,
    conn: Conn,
    failures: u32,
    /// Per stream: the last report's number, the newest version applied,
    /// whether a grant arrived, and when recent reports were sent.
    seq: u64,
    applied_version: u64,
    granted_on_stream: bool,
    sent: VecDeque<(u64, u64)>,
    next_report_ns: u64,
    last_report_ns: u64,
    /// Every pool as the last report gave it, to report a change of
    /// demand at once ([`prompt`]).
    reported: Vec<(String, Demand)>,
    held: Held,
    last_grant_ns: Option<u64>,
    grants: u64,
    reports: u64,
}

impl ShareClient {
    pub fn new(config: SyncConfig, node: String) -> ShareClient {
        ShareClient {
            grpc_service: grpc_service(&config.cluster, config.token.as_ref()),
            config,
            node,
            conn: Conn::Waiting { retry_at_ns: 0 },
            failures: 0,
            seq: 0,
            applied_version: 0,
            granted_on_stream: false,
            sent: VecDeque::new(),
            next_report_ns: 0,
            last_report_ns: 0,
            reported: Vec::new(),
            held: Held::default(),
            last_grant_ns: None,
            grants: 0,
            reports: 0,
        }
    }

    /// This VM became the leader: take over the grant a former leader
    /// enforced, and connect at once.
    pub fn start<H: Host>(&mut self, host: &H, now_ns: u64) {
        self.held = match host.get(&held_key(&self.config.service)) {
            Ok(Some((bytes, _))) => Held::decode(bytes.as_slice()).unwrap_or_default(),
            _ => Held::default(),
        };
        self.conn = Conn::Waiting {
            retry_at_ns: now_ns,
        };
        self.failures = 0;
    }

    /// This VM no longer leads: drop the stream (sync counts it as lost);
    /// the records keep enforcing the grant under its lease.
    pub fn stop<H: Host>(&mut self, host: &H) {
        if let Conn::Open { token, .. } = self.conn {
            let _ = host.cancel_grpc_stream(token);
        }
        self.conn = Conn::Waiting {
            retry_at_ns: u64::MAX,
        };
    }

    /// The VM ends (Envoy shuts down): every share to 0 first, then a final
    /// report, then the end of the stream (docs/sync.md: "To leave").
    pub fn leave<H: Host>(&mut self, worker: &Worker<H>) {
        let now = worker.host.now_ns();
        self.held = Held::default();
        self.enforce(worker, now);
        self.save(&worker.host);
        if let Conn::Open { token, .. } = self.conn {
            let report = self.report(worker, now, true);
            if worker
                .host
                .send_grpc_stream_message(token, &report, true)
                .is_err()
            {
                let _ = worker.host.cancel_grpc_stream(token);
            }
        }
        self.conn = Conn::Waiting {
            retry_at_ns: u64::MAX,
        };
    }

    fn save<H: Host>(&self, host: &H) {
        let key = held_key(&self.config.service);
        let cas = match host.get(&key) {
            Ok(Some((_, cas))) => cas,
            _ => 0,
        };
        // The leader is the one writer; a conflict is a former leader's
        // last write, which this one replaces.
        if let Err(e) = host.set(&key, &self.held.encode_to_vec(), cas) {
            log::debug!("shares: cannot save the grant: {e}");
        }
    }

    /// Opens the stream when due, reports when due, and keeps the records
    /// following the grant. Whether the status changed.
    pub fn tick<H: Host>(&mut self, worker: &Worker<H>, now_ns: u64) -> bool {
        let mut changed = false;
        match self.conn {
            Conn::Waiting { retry_at_ns } if now_ns >= retry_at_ns => {
                self.open(worker, now_ns);
                changed = true;
            }
            Conn::Waiting { .. } => {}
            Conn::Open {
                token,
                last_grant_ns,
            } => {
                let silent = now_ns.saturating_sub(last_grant_ns);
                if silent > self.config.heartbeat_timeout.as_nanos() as u64 {
                    log::warn!(
                        "shares: no grant for {} ms on {}; reopening",
                        silent / 1_000_000,
                        self.config.cluster
                    );
                    let _ = worker.host.cancel_grpc_stream(token);
                    self.lost(now_ns);
                    changed = true;
                } else if now_ns >= self.next_report_ns || self.changed_at_once(worker, now_ns) {
                    self.send_report(worker, token, now_ns);
                }
            }
        }
        self.enforce(worker, now_ns);
        changed
    }

    fn open<H: Host>(&mut self, worker: &Worker<H>, now_ns: u64) {
        match worker
            .host
            .open_grpc_stream(&self.grpc_service, SERVICE_NAME, SHARE_METHOD)
        {
            Ok(token) => {
                log::debug!("shares: stream {token} opened to {}", self.config.cluster);
                self.conn = Conn::Open {
                    token,
                    last_grant_ns: now_ns,
                };
                self.seq = 0;
                self.applied_version = 0;
                self.granted_on_stream = false;
                self.sent.clear();
                // Sync joins a stream on its first report.
                self.send_report(worker, token, now_ns);
            }
            Err(e) => {
                log::warn!(
                    "shares: cannot open a stream to {}: {e:?}",
                    self.config.cluster
                );
                self.lost(now_ns);
            }
        }
    }

    fn lost(&mut self, now_ns: u64) {
        let delay = backoff(self.failures, now_ns);
        self.failures = self.failures.saturating_add(1);
        self.conn = Conn::Waiting {
            retry_at_ns: now_ns.saturating_add(delay.as_nanos() as u64),
        };
    }

    fn send_report<H: Host>(&mut self, worker: &Worker<H>, token: u32, now_ns: u64) {
        let report = self.report(worker, now_ns, false);
        self.next_report_ns = now_ns.saturating_add(REPORT_INTERVAL.as_nanos() as u64);
        self.last_report_ns = now_ns;
        if let Err(e) = worker.host.send_grpc_stream_message(token, &report, false) {
            log::warn!("shares: cannot send a report: {e:?}; reopening");
            let _ = worker.host.cancel_grpc_stream(token);
            self.lost(now_ns);
            return;
        }
        self.reports += 1;
        self.sent.push_back((self.seq, now_ns));
        while self.sent.len() > SENT_KEPT {
            self.sent.pop_front();
        }
    }

    /// The next report (its `seq` taken), from the records as they are now.
    fn report<H: Host>(&mut self, worker: &Worker<H>, now_ns: u64, last: bool) -> Vec<u8> {
        self.seq += 1;
        let mut pools = Vec::new();
        let mut reported = Vec::new();
        for route in &worker.routes.endpoints {
            let Ok(s) = admission::snapshot(&worker.host, &route.key) else {
                continue;
            };
            for p in demand(&s, now_ns) {
                reported.push((route.path.clone(), p));
                pools.push(PoolDemand {
                    path: route.path.clone(),
                    address: p.address.map(|a| a.to_string()).unwrap_or_default(),
                    holding: if last { 0 } else { p.holding },
                    in_flight: p.in_flight,
                    queued: if last { 0 } else { p.queued },
                });
            }
        }
        self.reported = reported;
        ShareReport {
            service: self.config.service.clone(),
            node: self.node.clone(),
            seq: self.seq,
            applied_version: self.applied_version,
            sent_at_unix_ms: (unix_ms(now_ns)) as i64,
            replaces: if self.granted_on_stream {
                None
            } else {
                self.held.grant.as_ref().and_then(|g| g.stream)
            },
            r#final: last,
            pools,
        }
        .encode_to_vec()
    }

    /// Whether a pool's demand changed since the last report in a way
    /// sync must hear of now, not at the next interval ([`prompt`]), and
    /// the report may go ([`Prompt::Now`] at once, any other change
    /// [`PROMPT_GAP`] after the last report).
    fn changed_at_once<H: Host>(&self, worker: &Worker<H>, now_ns: u64) -> bool {
        let gap_over = now_ns
            >= self
                .last_report_ns
                .saturating_add(PROMPT_GAP.as_nanos() as u64);
        worker.routes.endpoints.iter().any(|route| {
            let Ok(s) = admission::snapshot(&worker.host, &route.key) else {
                return false;
            };
            demand(&s, now_ns).iter().any(|now| {
                let before = self
                    .reported
                    .iter()
                    .find(|(path, p)| *path == route.path && p.address == now.address)
                    .map(|(_, p)| *p);
                match prompt(before, now) {
                    Prompt::Now => true,
                    Prompt::AfterGap => gap_over,
                    Prompt::No => false,
                }
            })
        })
    }

    pub fn on_close(&mut self, token: u32, grpc_status: u32, now_ns: u64) -> bool {
        match self.conn {
            Conn::Open { token: t, .. } if t == token => {
                log::warn!(
                    "shares: stream to {} closed with gRPC status {grpc_status}; reopening",
                    self.config.cluster
                );
                self.lost(now_ns);
                true
            }
            _ => false,
        }
    }

    /// Whether `token` is this client's stream.
    pub fn owns(&self, token: u32) -> bool {
        matches!(self.conn, Conn::Open { token: t, .. } if t == token)
    }

    /// A grant on the current stream. Whether the status changed.
    pub fn on_message<H: Host>(&mut self, worker: &Worker<H>, bytes: &[u8], now_ns: u64) -> bool {
        let Conn::Open { token, .. } = self.conn else {
            return false;
        };
        let grant = match ShareGrant::decode(bytes) {
            Ok(g) => g,
            Err(e) => {
                log::warn!("shares: undecodable grant ({} bytes): {e}", bytes.len());
                return false;
            }
        };
        self.conn = Conn::Open {
            token,
            last_grant_ns: now_ns,
        };
        self.failures = 0;
        self.last_grant_ns = Some(now_ns);
        self.grants += 1;
        if grant.share_version < self.applied_version {
            return false;
        }
        // The lease runs from when this Envoy sent the report it answers;
        // a report too old to be known anchors nothing (already over).
        let anchor = self
            .sent
            .iter()
            .find(|(seq, _)| *seq == grant.lease_for_seq)
            .map(|&(_, at)| at);
        let (until_ns, fallback_until_ns) = match anchor {
            Some(at) => {
                let until = at.saturating_add(grant.lease_ms.saturating_mul(1_000_000));
                (
                    until,
                    until.saturating_add(grant.fallback_for_ms.saturating_mul(1_000_000)),
                )
            }
            None => (0, 0),
        };
        if grant.share_version == self.applied_version && self.granted_on_stream {
            // The same shares: only the lease is renewed (never shortened).
            self.held.until_ns = self.held.until_ns.max(until_ns);
            self.held.fallback_until_ns = self.held.fallback_until_ns.max(fallback_until_ns);
        } else {
            self.applied_version = grant.share_version;
            self.granted_on_stream = true;
            self.held = Held {
                grant: Some(grant),
                until_ns,
                fallback_until_ns,
            };
        }
        self.enforce(worker, now_ns);
        self.save(&worker.host);
        // A lowered share is acknowledged now, not at the next tick.
        if self.changed_at_once(worker, now_ns) {
            self.send_report(worker, token, now_ns);
        }
        true
    }

    /// Makes every record follow the grant held: each endpoint whose
    /// capacity comes from sync, or that the grant names, is shared.
    fn enforce<H: Host>(&self, worker: &Worker<H>, now_ns: u64) {
        let lease = ShareLease {
            until_ns: self.held.until_ns,
            fallback_until_ns: self.held.fallback_until_ns,
        };
        let grant = self.held.grant.as_ref();
        let watchers = grant.map_or(1, |g| g.watchers.max(1));
        for route in &worker.routes.endpoints {
            let Ok(s) = admission::snapshot(&worker.host, &route.key) else {
                continue;
            };
            let named = |path: &str, address: &str| {
                grant.and_then(|g| {
                    g.shares
                        .iter()
                        .find(|p| p.path == path && p.address == address)
                        .map(|p| p.share)
                })
            };
            let listed = grant.is_some_and(|g| g.shares.iter().any(|p| p.path == route.path));
            let shared =
                s.capacity.is_some() && (s.source == admission::CapacitySource::Sync || listed);
            let want = shared.then(|| {
                // After the lease: min(share, capacity / watchers).
                let share = |slots: u32, capacity: u32| Share {
                    slots,
                    fallback: slots.min(capacity / watchers),
                };
                EndpointShares {
                    endpoint: share(named(&route.path, "").unwrap_or(0), s.capacity.unwrap_or(0)),
                    instances: s
                        .instances
                        .iter()
                        .map(|i| {
                            let slots = named(&route.path, &i.address.to_string()).unwrap_or(0);
                            (i.address, share(slots, s.capacity_of(i)))
                        })
                        .collect(),
                    lease,
                }
            });
            if !differs(&s, want.as_ref()) {
                continue;
            }
            match admission::set_shares(&worker.host, &route.key, want.as_ref(), now_ns) {
                Ok(wakeups) => worker.wake(&wakeups),
                Err(e) => log::warn!("shares: cannot apply to {}: {e}", route.path),
            }
        }
    }

    /// The `shares` object of the sync status.
    pub fn status(&self) -> Value {
        let state = match self.conn {
            Conn::Open { .. } if self.granted_on_stream => "granted",
            Conn::Open { .. } => "waiting_for_grant",
            Conn::Waiting { .. } => "disconnected",
        };
        let grant = self.held.grant.as_ref();
        json!({
            "state": state,
            "share_version": self.applied_version,
            // Times, not what is left: the status is written on changes
            // only; the stats page works out what is left when it is read.
            "lease_until_unix_ms": (self.held.until_ns > 0).then(|| unix_ms(self.held.until_ns)),
            "fallback_until_unix_ms": (self.held.fallback_until_ns > 0)
                .then(|| unix_ms(self.held.fallback_until_ns)),
            "watchers": grant.map(|g| g.watchers),
            "last_grant_unix_ms": self.last_grant_ns.map(unix_ms),
            "reports": self.reports,
            "grants": self.grants,
        })
    }
}

/// Ends sharing in every record that still has shares (a leader whose
/// configuration has no `sync.shares`): the capacities hold whole again.
pub fn unshare<H: Host>(worker: &Worker<H>, now_ns: u64) {
    for route in &worker.routes.endpoints {
        let Ok(s) = admission::snapshot(&worker.host, &route.key) else {
            continue;
        };
        if !differs(&s, None) {
            continue;
        }
        log::info!("shares: {} is no longer shared", route.path);
        match admission::set_shares(&worker.host, &route.key, None, now_ns) {
            Ok(wakeups) => worker.wake(&wakeups),
            Err(e) => log::warn!("shares: cannot unshare {}: {e}", route.path),
        }
    }
}

/// Whether the record's shares differ from `want`.
fn differs(s: &EndpointState, want: Option<&EndpointShares>) -> bool {
    match want {
        None => s.share.is_some() || s.instances.iter().any(|i| i.share.is_some()),
        Some(w) => {
            s.share != Some(w.endpoint)
                || s.share_lease != w.lease
                || s.instances.iter().any(|i| {
                    let granted = w
                        .instances
                        .iter()
                        .find(|(a, _)| *a == i.address)
                        .map(|&(_, sh)| sh);
                    i.share != Some(granted.unwrap_or_default())
                })
        }
    }
}

/// When a pool's demand is reported, against the last report of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompt {
    /// At once (each follows a report, so the reports bound their rate):
    /// - a request waits on a share of 0 that the last report did not say
    ///   so of (without a report nothing will ever admit it);
    /// - its share was lowered (a grant applied): sync counts the larger
    ///   share until it is acknowledged, and another Envoy waits for it.
    Now,
    /// At once, but not sooner than [`PROMPT_GAP`] after the last report:
    /// - a queue started: this Envoy needs more than it holds;
    /// - its demand (in flight and queued) doubled while requests queue:
    ///   a burst is growing past what sync last heard (a few reports per
    ///   burst, not one per request);
    /// - a queue ended: what it holds beyond its requests in flight is
    ///   spare, and sync can lower it;
    /// - requests in flight above its share ended: sync counts them until
    ///   a report says they ended;
    /// - requests ended with nothing queued (the last one among them): the
    ///   slots they held are spare here, and may be wanted elsewhere.
    AfterGap,
    /// At the next interval.
    No,
}

/// Whether the change of a pool from `before` (the last report; `None` if
/// it did not name the pool) to `now` is reported before the next interval.
/// Each trigger is an edge against the last report, so one change sends at
/// most one report.
pub fn prompt(before: Option<Demand>, now: &Demand) -> Prompt {
    let before = before.unwrap_or(Demand {
        address: now.address,
        holding: 0,
        in_flight: 0,
        queued: 0,
    });
    let starved = |d: &Demand| d.holding == 0 && d.queued > 0;
    let lowered = now.holding < before.holding;
    if (starved(now) && !starved(&before)) || lowered {
        return Prompt::Now;
    }
    let queue_started = now.queued > 0 && before.queued == 0;
    let queue_ended = now.queued == 0 && before.queued > 0;
    let demand = |d: &Demand| u64::from(d.in_flight) + u64::from(d.queued);
    let doubled = now.queued > 0 && demand(now) >= 2 * demand(&before).max(1);
    let ended = now.in_flight < before.in_flight;
    let drained_above_share = ended && before.in_flight > now.holding;
    let spare_grew = ended && now.queued == 0;
    if queue_started || doubled || queue_ended || drained_above_share || spare_grew {
        Prompt::AfterGap
    } else {
        Prompt::No
    }
}

/// One pool's demand in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    pub address: Option<SocketAddr>,
    pub holding: u32,
    pub in_flight: u32,
    pub queued: u32,
}

/// The pools of a record with a capacity and their demand: each instance
/// (waiters pinned to it, and every unpinned one, which any would serve),
/// or the endpoint without instances.
pub fn demand(s: &EndpointState, now_ns: u64) -> Vec<Demand> {
    if s.capacity.is_none() && s.instances.iter().all(|i| i.own_capacity.is_none()) {
        return Vec::new();
    }
    let holding = |share: Option<Share>| share.map_or(0, |sh| sh.at(&s.share_lease, now_ns));
    if !s.picks_instances() {
        return vec![Demand {
            address: None,
            holding: holding(s.share),
            in_flight: s.active,
            queued: s.queued(),
        }];
    }
    let unpinned = s
        .waiters
        .iter()
        .filter(|w| w.waiting() && !w.pinned)
        .count() as u32;
    s.instances
        .iter()
        .enumerate()
        .filter(|(_, i)| !i.gone)
        .map(|(n, i)| Demand {
            address: Some(i.address),
            holding: holding(i.share),
            in_flight: i.active,
            queued: unpinned
                + s.waiters
                    .iter()
                    .filter(|w| w.waiting() && w.pinned && w.instance == Some(n as u16))
                    .count() as u32,
        })
        .collect()
}
