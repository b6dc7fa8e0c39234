//! How a worker gives slots back: at once when a request completes or is
//! cut, or, for an abandoned request, once the backend has most likely
//! finished it (see `sluice_core::abandon`). It measures its own requests'
//! upstream durations for that, and publishes them for workers with none.

use super::Worker;
use crate::host::Host;
use crate::metrics::Counter;
use sluice_core::abandon::{self, hold_ns, Durations, HeldSlots, RecentDurations};
use sluice_core::admission::{Backlog, Outcome};
use sluice_core::holding::Slot;
use sluice_core::shared_keys;
use sluice_core::EndpointId;
use std::cell::RefCell;

pub struct Slots {
    /// Per endpoint: how long this worker's recent requests took upstream.
    durations: RefCell<Vec<RecentDurations>>,
    /// Slots of abandoned requests, released when the backend is most
    /// likely done with them.
    held: RefCell<HeldSlots>,
}

impl Slots {
    pub fn new(endpoints: usize) -> Slots {
        Slots {
            durations: RefCell::new(vec![RecentDurations::default(); endpoints]),
            held: RefCell::new(HeldSlots::default()),
        }
    }

    pub fn next_due(&self) -> Option<u64> {
        self.held.borrow().next_due()
    }
}

impl<H: Host> Worker<H> {
    /// Whether to read the clock for a request admitted now, to time it
    /// (see [`RecentDurations::time_next`]).
    pub fn time_next(&self, endpoint: EndpointId) -> bool {
        self.slots.durations.borrow_mut()[endpoint.0].time_next()
    }

    /// How long a request refused behind `backlog` should wait before it
    /// retries, in ms: the time the requests ahead take to drain through
    /// the slots, `(ahead + 1) × mean duration / slots`, from this
    /// worker's recent durations of the endpoint (else the estimate
    /// another worker published). `None` until anything is known.
    pub fn retry_after_ms(&self, ep: EndpointId, backlog: Backlog) -> Option<u64> {
        let route = self.routes.route(ep);
        let mean = self.slots.durations.borrow()[ep.0].mean_ns().or_else(|| {
            abandon::published(&self.host, &shared_keys::upstream_estimate(&route.key))
        })?;
        if backlog.slots == 0 {
            return None;
        }
        let ns = u64::from(backlog.ahead + 1).saturating_mul(mean) / u64::from(backlog.slots);
        Some(ns.div_ceil(1_000_000).max(1))
    }

    /// The least a request queued behind `backlog` can wait, in ns: it needs
    /// `ahead + 1` slots to turn over, at most `slots` at a time, each
    /// taking at least the shortest recent duration; the first turn-over
    /// may come at once. `None` until anything is known.
    pub fn least_wait_ns(&self, ep: EndpointId, backlog: Backlog) -> Option<u64> {
        let shortest = self.slots.durations.borrow()[ep.0].min_ns()?;
        if backlog.slots == 0 {
            return None;
        }
        let turns = (backlog.ahead + 1).div_ceil(backlog.slots) - 1;
        Some(u64::from(turns).saturating_mul(shortest))
    }

    /// The request holding `slot` got its whole response: the backend is
    /// done with it, and its duration (if it was timed) feeds the estimate,
    /// which the tick publishes.
    pub fn complete(&self, slot: Slot) {
        if let Some(admitted_ns) = slot.admitted_ns() {
            let took = self.host.now_ns().saturating_sub(admitted_ns);
            self.slots.durations.borrow_mut()[slot.endpoint().0].record(took);
        }
        self.release_with(slot, Outcome::Served);
    }

    /// Envoy could not get a response from the slot's instance (refused,
    /// reset): the backend never ran it, so the slot goes back at once and
    /// the instance is ejected for its back-off.
    pub fn fail(&self, slot: Slot) {
        self.release_with(slot, Outcome::Failed);
    }

    /// At the response headers of a request counted on an instance: which
    /// host Envoy really sent it to (`upstream.address`). One it was not
    /// picked for (the pick was not in Envoy's cluster and its fallback
    /// chose another) is counted, and the slot moves to what runs it.
    pub fn check_pick(&self, slot: &mut Slot) {
        let Some(picked) = slot.instance() else {
            return;
        };
        let Some(served) = self.host.get_property(&["upstream", "address"]) else {
            return;
        };
        let served = std::str::from_utf8(&served)
            .ok()
            .and_then(|s| s.parse::<std::net::SocketAddr>().ok());
        if served == Some(picked) {
            return;
        }
        let ep = slot.endpoint();
        let route = self.routes.route(ep);
        // Not a request's outcome: the same counter for every class.
        self.metrics.count(ep, 0, Counter::PicksMissed);
        log::info!(
            "{}: picked {picked}, Envoy sent it to {}; is {picked} in the cluster?",
            route.path,
            served.map_or_else(|| "another host".to_string(), |a| a.to_string())
        );
        let ejection = self.routes.ejection();
        match slot.missed(&self.host, &route.key, served, ejection, self.host.now_ns()) {
            Ok(wakeups) => self.wake(&wakeups),
            Err(e) => log::error!("missed pick on {}: {e}", route.path),
        }
    }

    /// The request holding `slot`, admitted at `admitted_ns`, was abandoned
    /// before its response (client gone, or Envoy answered for the backend):
    /// the slot is held until the backend has most likely finished it.
    pub fn abandon(&self, slot: Slot, admitted_ns: u64) {
        let now = self.host.now_ns();
        let ep = slot.endpoint();
        let route = self.routes.route(ep);
        let estimate = self.slots.durations.borrow()[ep.0]
            .estimate_ns()
            .or_else(|| {
                abandon::published(&self.host, &shared_keys::upstream_estimate(&route.key))
            });
        let elapsed = now.saturating_sub(admitted_ns);
        // Off the request path (an abandon), so one more shared read: any
        // worker's request that outlived the estimate uncovers the endpoint
        // for every worker.
        let outlived_key = shared_keys::outlived(&route.key);
        let durations = if abandon::outlived(estimate, elapsed) {
            if let Err(e) = abandon::mark_outlived(&self.host, &outlived_key, now) {
                log::debug!("cannot mark {outlived_key}: {e}");
            }
            Durations::Uncovered
        } else if abandon::uncovered(&self.host, &outlived_key, now) {
            Durations::Uncovered
        } else {
            estimate.map_or(Durations::Unknown, Durations::Estimate)
        };
        let hold = hold_ns(durations, elapsed, route.abandon_hold);
        if hold == 0 {
            self.release(slot);
            return;
        }
        log::debug!(
            "{}: abandoned after {} ms; slot held {} ms more",
            route.path,
            now.saturating_sub(admitted_ns) / 1_000_000,
            hold / 1_000_000
        );
        self.slots
            .held
            .borrow_mut()
            .hold(slot, now.saturating_add(hold));
        // The tick releases it.
        self.schedule(false);
    }

    pub(super) fn release_held(&self) {
        let due = self.slots.held.borrow_mut().take_due(self.host.now_ns());
        for slot in due {
            self.release(slot);
        }
    }

    /// The VM is going away: nothing will tick for its held slots, so they
    /// go back now rather than never.
    pub fn release_all_held(&self) {
        let all = self.slots.held.borrow_mut().take_all();
        for slot in all {
            self.release(slot);
        }
    }

    /// Publishes the upstream-duration estimates that changed since the
    /// last tick, for workers that have none of their own.
    pub(super) fn publish_estimates(&self) {
        let mut durations = self.slots.durations.borrow_mut();
        for (ep, d) in durations.iter_mut().enumerate() {
            if let Some(estimate) = d.take_unpublished() {
                let key = shared_keys::upstream_estimate(&self.routes.route(EndpointId(ep)).key);
                if let Err(e) = abandon::publish(&self.host, &key, estimate) {
                    log::debug!("cannot publish {key}: {e}");
                }
            }
        }
    }

    /// Gives `slot` back; the release may hand it to a waiter of this worker
    /// (claimed at once) or of another (woken).
    pub fn release(&self, slot: Slot) {
        self.release_with(slot, Outcome::Unknown);
    }

    fn release_with(&self, slot: Slot, outcome: Outcome) {
        let route = self.routes.route(slot.endpoint());
        let instance = slot.instance();
        let ejection = self.routes.ejection();
        let now = if instance.is_some() || self.routes.shares {
            self.host.now_ns()
        } else {
            0
        };
        match slot.release(&self.host, &route.key, outcome, ejection, now) {
            Ok(released) => {
                if released.ejected {
                    log::warn!(
                        "{}: instance {} failed; not picked for a while",
                        route.path,
                        instance.map(|a| a.to_string()).unwrap_or_default()
                    );
                }
                self.wake(&released.wakeups)
            }
            Err(e) => log::error!("release on {}: {e}", route.path),
        }
    }
}
