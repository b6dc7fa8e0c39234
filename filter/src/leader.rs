//! One leader among the plugin's root contexts of an Envoy process holds the
//! sync stream and runs the health checks, so each Envoy opens one stream,
//! not one per worker (N+1 root contexts at `--concurrency N`).
//!
//! The lease is one shared-data key, `sluice:<service>:leader`: the holder
//! (worker index, the VM's start time to tell a reused index apart, and when
//! its configuration first appeared) and an expiry. Every root context tries
//! it on each base tick: the holder renews it; anyone takes it once it has
//! expired or been released (`on_done`); a VM of a newer configuration
//! takes it at once, so a listener update moves leadership in one tick while
//! the old VMs drain. Writes are CAS, so two takers cannot both win.

use crate::health::{self, HealthCheck};
use crate::host::Host;
use crate::status;
use crate::sync_stream::SyncClient;
use crate::worker::{Worker, BASE_TICK};
use serde_json::json;
use sluice_core::admission::WorkerId;
use sluice_core::shared_data::{SharedData, StoreError};
use sluice_core::sync_config::CalloutConfig;
use std::rc::Rc;
use std::time::Duration;

/// How long a lease lasts without renewal: ten base ticks, so a busy
/// worker's late tick does not lose it, and a vanished leader is replaced
/// within a second.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// How often, at most, the leader sets the gauges from the records.
pub const GAUGE_PERIOD: Duration = Duration::from_millis(10);

pub fn lease_key(service: &str) -> String {
    format!("sluice:{service}:leader")
}

fn config_key(service: &str) -> String {
    format!("sluice:{service}:config")
}

/// Who holds (or wants) the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub worker: WorkerId,
    /// Host time at which this VM was configured.
    pub started_ns: u64,
    /// When this VM's configuration first appeared in the process.
    pub config_since_ns: u64,
}

const LEASE_LEN: usize = 2 + 8 + 8 + 8;

fn encode(h: &Holder, expiry_ns: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEASE_LEN);
    out.extend_from_slice(&h.worker.to_le_bytes());
    out.extend_from_slice(&h.started_ns.to_le_bytes());
    out.extend_from_slice(&h.config_since_ns.to_le_bytes());
    out.extend_from_slice(&expiry_ns.to_le_bytes());
    out
}

fn decode(b: &[u8]) -> Option<(Holder, u64)> {
    if b.len() != LEASE_LEN {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    Some((
        Holder {
            worker: u16::from_le_bytes([b[0], b[1]]),
            started_ns: u64_at(2),
            config_since_ns: u64_at(10),
        },
        u64_at(18),
    ))
}

/// Reads the lease: its holder and expiry, `None` when free (missing,
/// released, or unreadable).
#[cfg(test)]
pub fn read_lease<S: SharedData>(store: &S, service: &str) -> Option<(Holder, u64)> {
    match store.get(&lease_key(service)) {
        Ok(Some((bytes, _))) => decode(&bytes),
        _ => None,
    }
}

/// When the configuration `text` first appeared in this process: the same
/// text seen again (every VM of one configuration) keeps the first time, a
/// different one starts a new generation.
pub fn config_since<S: SharedData>(store: &S, service: &str, text: &str, now_ns: u64) -> u64 {
    let hash = fnv1a(text.as_bytes());
    let key = config_key(service);
    loop {
        let (value, cas) = match store.get(&key) {
            Ok(Some(v)) => v,
            Ok(None) => (Vec::new(), 0),
            Err(_) => return now_ns,
        };
        if value.len() == 16 && value[..8] == hash.to_le_bytes() {
            return u64::from_le_bytes(value[8..].try_into().unwrap());
        }
        let mut new = hash.to_le_bytes().to_vec();
        new.extend_from_slice(&now_ns.to_le_bytes());
        match store.set(&key, &new, cas) {
            Ok(()) => return now_ns,
            Err(StoreError::CasMismatch) => continue,
            Err(_) => return now_ns,
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Takes or renews the lease for `me`; whether `me` holds it now.
pub fn renew<S: SharedData>(store: &S, service: &str, me: &Holder, now_ns: u64) -> bool {
    let key = lease_key(service);
    let expiry = now_ns.saturating_add(LEASE_TTL.as_nanos() as u64);
    loop {
        let (value, cas) = match store.get(&key) {
            Ok(Some(v)) => v,
            Ok(None) => (Vec::new(), 0),
            Err(_) => return false,
        };
        let may = match decode(&value) {
            None => true,
            Some((h, _)) if h == *me => true,
            Some((_, until)) if until <= now_ns => true,
            // A newer configuration's VM takes over from a draining one.
            Some((h, _)) => h.config_since_ns < me.config_since_ns,
        };
        if !may {
            return false;
        }
        match store.set(&key, &encode(me, expiry), cas) {
            Ok(()) => return true,
            Err(StoreError::CasMismatch) => continue,
            Err(_) => return false,
        }
    }
}

/// Gives the lease up if `me` holds it, so another takes over at its next
/// tick instead of waiting for the expiry.
pub fn release<S: SharedData>(store: &S, service: &str, me: &Holder) {
    let key = lease_key(service);
    if let Ok(Some((value, cas))) = store.get(&key) {
        if decode(&value).is_some_and(|(h, _)| h == *me) {
            let _ = store.set(&key, b"", cas);
        }
    }
}

/// A root context's candidacy and, while it leads, its duties.
pub struct Leader<H> {
    worker: Rc<Worker<H>>,
    me: Holder,
    leading: bool,
    since_ns: u64,
    /// The lease is looked at once per base tick, not on every 5 ms tick
    /// of a worker with waiters.
    next_lease_check_ns: u64,
    /// When the gauges are set from the records next.
    next_gauges_ns: u64,
    sync: Option<SyncClient>,
    health: Option<HealthCheck>,
}

impl<H: Host> Leader<H> {
    pub fn new(worker: Rc<Worker<H>>, me: Holder, callouts: CalloutConfig) -> Leader<H> {
        let node = format!("sluice-filter worker {}", me.worker);
        Leader {
            worker,
            me,
            leading: false,
            since_ns: 0,
            next_lease_check_ns: 0,
            next_gauges_ns: 0,
            sync: callouts.sync.map(|c| SyncClient::new(c, node)),
            health: callouts.health.map(HealthCheck::new),
        }
    }

    fn service(&self) -> &str {
        &self.worker.routes.service
    }

    /// Every base tick: the lease, then the duties.
    pub fn tick(&mut self) {
        let now = self.worker.host.now_ns();
        let mut changed = false;
        let holds = if now >= self.next_lease_check_ns {
            self.next_lease_check_ns = now.saturating_add(BASE_TICK.as_nanos() as u64 * 9 / 10);
            renew(&self.worker.host, self.service(), &self.me, now)
        } else {
            self.leading
        };
        match (self.leading, holds) {
            (false, true) => {
                self.take_office(now);
                // Without sync or health checks there is nothing to report,
                // unless a former configuration's leader reported something
                // that is no longer true.
                changed = self.sync.is_some()
                    || self.health.is_some()
                    || status::exists(&self.worker.host, self.service());
            }
            (true, false) => {
                log::info!("worker {} no longer leads", self.me.worker);
                self.leave_office();
                return;
            }
            _ => {}
        }
        if !self.leading {
            return;
        }
        // The one writer of the gauges; not more often than GAUGE_PERIOD
        // when this worker ticks fast for its own waiters.
        if now >= self.next_gauges_ns {
            self.next_gauges_ns = now.saturating_add(GAUGE_PERIOD.as_nanos() as u64);
            self.worker.metrics.publish_gauges(&self.worker.host);
        }
        if let Some(s) = &mut self.sync {
            changed |= s.tick(&self.worker.host, now);
        }
        if let Some(h) = &mut self.health {
            changed |= h.tick(&self.worker, now);
        }
        if changed {
            self.write_status();
        }
    }

    fn take_office(&mut self, now: u64) {
        log::info!(
            "worker {} leads service {:?}",
            self.me.worker,
            self.service()
        );
        self.leading = true;
        self.since_ns = now;
        self.next_gauges_ns = now;
        if let Some(s) = &mut self.sync {
            s.start(&self.worker, now);
            s.tick(&self.worker.host, now);
        }
        match &mut self.health {
            Some(h) => h.start(&self.worker, now),
            // Health checks are off in this configuration: no mark stays
            // from one that had them.
            None => health::mark(&self.worker, false),
        }
    }

    fn leave_office(&mut self) {
        self.leading = false;
        if let Some(s) = &mut self.sync {
            s.stop(&self.worker.host);
        }
    }

    /// The root context ends (`on_done`): hand over at once.
    pub fn done(&mut self) {
        if self.leading {
            self.leave_office();
            release(&self.worker.host, self.service(), &self.me);
        }
    }

    pub fn on_grpc_message(&mut self, token: u32, bytes: &[u8]) {
        // A callout of a former term: not ours to act on any more.
        if !self.leading {
            return;
        }
        let now = self.worker.host.now_ns();
        if let Some(s) = &mut self.sync {
            if s.on_message(&self.worker, token, bytes, now) {
                self.write_status();
            }
        }
    }

    pub fn on_grpc_close(&mut self, token: u32, grpc_status: u32) {
        if !self.leading {
            return;
        }
        let now = self.worker.host.now_ns();
        if let Some(s) = &mut self.sync {
            if s.on_close(token, grpc_status, now) {
                self.write_status();
            }
        }
    }

    pub fn on_http_response(&mut self, token: u32, status: Option<u32>) {
        if !self.leading {
            return;
        }
        let now = self.worker.host.now_ns();
        if let Some(h) = &mut self.health {
            if h.on_response(&self.worker, token, status, now) {
                self.write_status();
            }
        }
    }

    fn write_status(&self) {
        let off = || json!({"state": "off"});
        let doc = json!({
            "leader": {
                "worker": self.me.worker,
                "since_unix_ms": status::unix_ms(self.since_ns),
            },
            "sync": self.sync.as_ref().map_or_else(off, |s| s.status()),
            "health": self.health.as_ref().map_or_else(off, |h| h.status()),
        });
        status::write(&self.worker.host, self.service(), &doc);
    }
}
