//! The leader's duties (the sync stream, health checks, the gauges), run by
//! the root context that holds the lease ([`sluice_core::lease`]). Every
//! root context stands for it on each base tick and releases it in
//! `on_done`.

use crate::admin::status;
use crate::health::{self, HealthCheck};
use crate::host::Host;
use crate::shares::{ShareClient, SHARE_TICK};
use crate::sync_stream::SyncClient;
use crate::worker::{Worker, BASE_TICK};
use serde_json::json;
use sluice_core::lease::{self, Holder};
use sluice_core::sync_config::CalloutConfig;
use std::rc::Rc;
use std::time::Duration;

/// How often, at most, the leader sets the gauges from the records.
pub const GAUGE_PERIOD: Duration = Duration::from_millis(10);

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
    /// Without `sync.shares`: when to look for records still shared.
    next_unshare_ns: u64,
    sync: Option<SyncClient>,
    /// With `sync.shares`: this Envoy's part of the shared capacities.
    shares: Option<ShareClient>,
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
            next_unshare_ns: 0,
            shares: callouts
                .sync
                .as_ref()
                .filter(|c| c.shares)
                .map(|c| ShareClient::new(c.clone(), node.clone())),
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
            lease::renew(&self.worker.host, self.service(), &self.me, now)
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
            let sync_connected = self
                .sync
                .as_ref()
                .map(|s| s.status()["state"] == "connected");
            self.worker
                .metrics
                .publish_gauges(&self.worker.host, sync_connected);
        }
        if let Some(s) = &mut self.sync {
            changed |= s.tick(&self.worker.host, now);
        }
        match &mut self.shares {
            Some(s) => changed |= s.tick(&self.worker, now),
            // A configuration without `sync.shares` after one with it: the
            // records' shares would run out and admit nothing. Looked at
            // every base tick, as the former leader (still draining) may
            // write shares until it sees it lost the lease.
            None if now >= self.next_unshare_ns => {
                self.next_unshare_ns = now.saturating_add(BASE_TICK.as_nanos() as u64);
                crate::shares::unshare(&self.worker, now);
            }
            None => {}
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
        match &mut self.shares {
            Some(s) => {
                s.start(&self.worker.host, now);
                // Reports and grants ride this worker's tick.
                self.worker.set_idle_tick(SHARE_TICK);
            }
            None => self.next_unshare_ns = now,
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
        if let Some(s) = &mut self.shares {
            s.stop(&self.worker.host);
            self.worker.set_idle_tick(BASE_TICK);
        }
    }

    /// The root context ends (`on_done`): hand over at once.
    pub fn done(&mut self) {
        if self.leading {
            if let Some(s) = &mut self.shares {
                s.leave(&self.worker);
            }
            self.leave_office();
            lease::release(&self.worker.host, self.service(), &self.me);
        }
    }

    pub fn on_grpc_message(&mut self, token: u32, bytes: &[u8]) {
        // A callout of a former term: not ours to act on any more.
        if !self.leading {
            return;
        }
        let now = self.worker.host.now_ns();
        if let Some(s) = self.shares.as_mut().filter(|s| s.owns(token)) {
            if s.on_message(&self.worker, bytes, now) {
                self.write_status();
            }
            return;
        }
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
        if let Some(s) = self.shares.as_mut().filter(|s| s.owns(token)) {
            if s.on_close(token, grpc_status, now) {
                self.write_status();
            }
            return;
        }
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
            "sync": self.sync.as_ref().map_or_else(off, |s| {
                let mut doc = s.status();
                if let Some(shares) = &self.shares {
                    doc["shares"] = shares.status();
                }
                doc
            }),
            "health": self.health.as_ref().map_or_else(off, |h| h.status()),
        });
        status::write(&self.worker.host, self.service(), &doc);
    }
}
