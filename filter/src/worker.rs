//! One worker: what a root context shares with its HTTP contexts, and the
//! duties that run on its event loop. Only the worker that paused a request
//! can resume it (Envoy), so each keeps its own waiters, claims the slots
//! handed to them, times them out, and wakes the other workers whose waiters
//! its releases served.

use crate::abandon::{self, hold_ns, HeldSlots, RecentDurations};
use crate::dashboard::Dashboard;
use crate::host::Host;
use crate::metrics::{Counter, Metered};
use crate::replies::LocalReply;
use crate::routes::Routes;
use crate::worker_ids;
use sluice_core::admission::{self, Wakeups, Withdrawn, WorkerId};
use sluice_core::config::Ui;
use sluice_core::waiters::{LocalWaiter, LocalWaiters};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// Tick while requests wait: the backstop for lost wake-ups and the clock of
/// queue timeouts, so it bounds how late a 504 can be.
pub const FAST_TICK: Duration = Duration::from_millis(5);
/// Tick otherwise: the leader's lease, sync watchdog and health checks.
pub const BASE_TICK: Duration = Duration::from_millis(100);

/// What became of a paused request; shared between its HTTP context and the
/// worker that finishes the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Waiting,
    /// Resumed with a slot at this host time (ns): it must release at its end.
    Admitted(u64),
    /// Answered locally (504), or let through unaccounted: it holds nothing.
    Answered,
}

/// The shared queue through which other workers wake worker `id`. Envoy
/// notifies only the last VM that registered a name, so each has its own.
pub fn queue_name(id: WorkerId) -> String {
    format!("sluice:wake:{id}")
}

pub struct Worker<H> {
    /// Writes of endpoint records through it also set the gauges.
    pub host: Metered<H>,
    /// Taken at this VM's first tick (see [`Worker::id`]).
    id: Cell<Option<WorkerId>>,
    vm_id: String,
    pub routes: Routes,
    pub dashboard: Dashboard,
    /// Each with its fate and the body bytes it counts in `max_queued_bytes`.
    waiters: RefCell<LocalWaiters<(Rc<Cell<Fate>>, u64)>>,
    /// Other workers' wake-up queues, resolved once.
    peers: RefCell<HashMap<WorkerId, u32>>,
    fast_tick: Cell<bool>,
    /// Per endpoint: how long this worker's recent requests took upstream.
    durations: RefCell<Vec<RecentDurations>>,
    /// Slots of abandoned requests, released when the backend is most
    /// likely done with them.
    held: RefCell<HeldSlots>,
    /// The period when nobody waits ([`BASE_TICK`] once the root has duties).
    idle_tick: Cell<Duration>,
}

impl<H: Host> Worker<H> {
    pub fn new(host: H, vm_id: String, routes: Routes) -> Worker<H> {
        let durations = vec![RecentDurations::default(); routes.endpoints.len()];
        Worker {
            id: Cell::new(None),
            durations: RefCell::new(durations),
            held: RefCell::new(HeldSlots::default()),
            host: Metered::new(host, &routes),
            vm_id,
            routes,
            dashboard: Dashboard::new(&Ui::default()),
            waiters: RefCell::new(LocalWaiters::default()),
            peers: RefCell::new(HashMap::new()),
            fast_tick: Cell::new(false),
            idle_tick: Cell::new(Duration::ZERO),
        }
    }

    /// The tick when nobody waits; starts it now.
    pub fn set_idle_tick(&self, period: Duration) {
        self.idle_tick.set(period);
        if !self.fast_tick.get() {
            if let Err(e) = self.host.set_tick_period(period) {
                log::warn!("cannot set tick period: {e:?}");
            }
        }
    }

    /// This worker's index, taken (and its wake-up queue registered) at the
    /// VM's first tick, which `on_configure` asks for: the canary Envoy
    /// starts and drops at each configuration without `on_done` never ticks,
    /// so it never uses up an index, and the work stays off the request path.
    /// A watched request before that tick takes it itself. `None` if none
    /// could be taken; the caller fails open.
    pub fn id(&self) -> Option<WorkerId> {
        if let Some(id) = self.id.get() {
            return Some(id);
        }
        let id = match worker_ids::allocate(&self.host) {
            Ok(id) => id,
            Err(e) => {
                log::error!("cannot allocate a worker index: {e}");
                return None;
            }
        };
        let queue = queue_name(id);
        // Envoy registers the queue for the root context even when asked
        // from a stream's callback: on_queue_ready goes to the root.
        if let Err(e) = self.host.register_shared_queue(&queue) {
            log::error!("cannot register wake-up queue {queue}: {e:?}");
            let _ = worker_ids::free(&self.host, id);
            return None;
        }
        log::debug!("worker {id} is woken through {queue}");
        // Once per VM (the soak test counts them).
        log::info!("this VM is worker {id}");
        self.id.set(Some(id));
        Some(id)
    }

    /// The index this worker took, if it took one.
    pub fn taken_id(&self) -> Option<WorkerId> {
        self.id.get()
    }

    /// From `on_configure`: tick once soon, to take the index.
    pub fn start(&self) {
        self.set_fast_tick(true);
    }

    pub fn tick(&self) {
        if self.id.get().is_none() {
            self.id();
        }
        self.claim_granted();
        self.expire_waiters();
        self.release_held();
        if self.waiters.borrow().is_empty() && self.held.borrow().is_empty() {
            self.set_fast_tick(false);
        }
    }

    /// A request admitted at `admitted_ns` got its whole response: the
    /// backend is done with it, and its duration feeds the estimate.
    pub fn complete(&self, endpoint: usize, admitted_ns: u64) {
        let took = self.host.now_ns().saturating_sub(admitted_ns);
        let changed = self.durations.borrow_mut()[endpoint].record(took);
        if let Some(estimate) = changed {
            let key = abandon::estimate_key(&self.routes.endpoints[endpoint].key);
            abandon::publish(&self.host, &key, estimate);
        }
        self.release(endpoint);
    }

    /// A request admitted at `admitted_ns` was abandoned before its response
    /// (client gone, or Envoy answered for the backend): its slot is held
    /// until the backend has most likely finished it, then released once.
    pub fn abandon(&self, endpoint: usize, admitted_ns: u64) {
        let now = self.host.now_ns();
        let estimate = self.durations.borrow()[endpoint].estimate_ns().or_else(|| {
            let key = abandon::estimate_key(&self.routes.endpoints[endpoint].key);
            abandon::published(&self.host, &key)
        });
        let cap = self.routes.endpoints[endpoint].abandon_hold;
        let hold = hold_ns(estimate, now.saturating_sub(admitted_ns), cap);
        if hold == 0 {
            self.release(endpoint);
            return;
        }
        log::debug!(
            "{}: abandoned after {} ms; slot held {} ms more",
            self.routes.endpoints[endpoint].path,
            now.saturating_sub(admitted_ns) / 1_000_000,
            hold / 1_000_000
        );
        self.held
            .borrow_mut()
            .hold(endpoint, now.saturating_add(hold));
        // The tick releases it.
        self.set_fast_tick(true);
    }

    fn release_held(&self) {
        let due = self.held.borrow_mut().take_due(self.host.now_ns());
        for ep in due {
            self.release(ep);
        }
    }

    /// The VM is going away: nothing will tick for its held slots, so they
    /// go back now rather than never.
    pub fn release_all_held(&self) {
        let all = self.held.borrow_mut().take_all();
        for ep in all {
            self.release(ep);
        }
    }

    /// Keeps a paused request until its ticket is granted or it times out.
    /// `queued_bytes` were added to the endpoint's queued-bytes counter and
    /// come off it when the request leaves the queue, however it leaves.
    pub fn add_waiter(
        &self,
        context_id: u32,
        endpoint: usize,
        ticket: u32,
        since_ns: u64,
        queued_bytes: u64,
    ) -> Rc<Cell<Fate>> {
        let fate = Rc::new(Cell::new(Fate::Waiting));
        let queue_timeout = self.routes.endpoints[endpoint].queue_timeout;
        self.waiters.borrow_mut().push(LocalWaiter {
            context_id,
            endpoint,
            ticket,
            deadline_ns: since_ns.saturating_add(queue_timeout.as_nanos() as u64),
            handle: (Rc::clone(&fate), queued_bytes),
        });
        self.set_fast_tick(true);
        fate
    }

    /// A waiter is out of the local list: its bytes leave the queue too.
    fn dequeued(&self, w: &LocalWaiter<(Rc<Cell<Fate>>, u64)>) {
        let bytes = w.handle.1;
        let route = &self.routes.endpoints[w.endpoint];
        if let (Some((_, key)), true) = (&route.queued_bytes, bytes > 0) {
            if let Err(e) = crate::queued_bytes::sub(&self.host, key, bytes) {
                log::error!("queued bytes of {}: {e}", route.path);
            }
        }
    }

    /// The client of a waiting request went away: it leaves the queue, and
    /// a slot granted to it in the meantime goes back.
    pub fn leave_queue(&self, context_id: u32, endpoint: usize) {
        let waiter = self.waiters.borrow_mut().remove_context(context_id);
        if let Some(w) = waiter {
            self.dequeued(&w);
            let route = &self.routes.endpoints[endpoint];
            match admission::withdraw(&self.host, &route.key, w.ticket) {
                Ok(Withdrawn::Granted) => self.release(endpoint),
                Ok(_) => {}
                Err(e) => log::error!("withdraw on {}: {e}", route.path),
            }
        }
    }

    /// Tells each worker that it has granted tickets to claim.
    pub fn wake(&self, wakeups: &Wakeups) {
        for &peer in wakeups.workers() {
            let queue = self.peer_queue(peer);
            match queue.map(|q| self.host.enqueue_shared_queue(q, b"w")) {
                Some(Ok(())) => {}
                // The tick's claim is the backstop: a worker whose wake-up is
                // lost (its VM replaced by a config update) still polls.
                other => log::debug!("cannot wake worker {peer}: {other:?}"),
            }
        }
    }

    fn peer_queue(&self, peer: WorkerId) -> Option<u32> {
        if let Some(q) = self.peers.borrow().get(&peer) {
            return Some(*q);
        }
        let q = self
            .host
            .resolve_shared_queue(&self.vm_id, &queue_name(peer))
            .ok()??;
        self.peers.borrow_mut().insert(peer, q);
        Some(q)
    }

    fn set_fast_tick(&self, fast: bool) {
        if self.fast_tick.get() != fast {
            self.fast_tick.set(fast);
            let period = if fast {
                FAST_TICK
            } else {
                self.idle_tick.get()
            };
            if let Err(e) = self.host.set_tick_period(period) {
                log::warn!("cannot set tick period: {e:?}");
            }
        }
    }

    /// Resumes this worker's requests whose tickets were granted, and
    /// answers those of an unhealthy backend 503.
    pub fn claim_granted(&self) {
        let endpoints = self.waiters.borrow().endpoints();
        // Waiters mean an index was taken.
        let Some(id) = self.id.get() else { return };
        for ep in endpoints {
            let route = &self.routes.endpoints[ep];
            match admission::claim(&self.host, &route.key, id) {
                Ok(claimed) => {
                    self.wake(&claimed.wakeups);
                    for ticket in claimed.refused {
                        let waiter = self.waiters.borrow_mut().take_ticket(ep, ticket);
                        if let Some(w) = waiter {
                            // Out of the queue, holding nothing: answered once.
                            w.handle.0.set(Fate::Answered);
                            self.left_queue(&w, Counter::Unhealthy);
                            if self.host.set_effective_context(w.context_id).is_ok() {
                                LocalReply::Unhealthy(route).send(&self.host);
                            }
                        }
                    }
                    for ticket in claimed.granted {
                        let waiter = self.waiters.borrow_mut().take_ticket(ep, ticket);
                        match waiter {
                            Some(w) => {
                                self.dequeued(&w);
                                self.resume(w);
                            }
                            None => {
                                // Not ours any more (cannot happen while on_log
                                // withdraws first); never keep a slot nobody uses.
                                log::warn!("granted ticket {ticket} has no waiter; releasing");
                                self.release(ep);
                            }
                        }
                    }
                }
                Err(e) => log::warn!("claim on {}: {e}", route.path),
            }
        }
    }

    /// Answers 504 to waiters past their deadline.
    fn expire_waiters(&self) {
        let expired = self.waiters.borrow_mut().take_expired(self.host.now_ns());
        for w in expired {
            self.dequeued(&w);
            let route = &self.routes.endpoints[w.endpoint];
            match admission::withdraw(&self.host, &route.key, w.ticket) {
                // NotFound cannot happen unless the record was reset under
                // us; the request must be answered either way, never left paused.
                Ok(Withdrawn::Removed | Withdrawn::NotFound) => {
                    w.handle.0.set(Fate::Answered);
                    self.left_queue(&w, Counter::QueueTimeout);
                    if self.host.set_effective_context(w.context_id).is_ok() {
                        LocalReply::QueueTimeout(route).send(&self.host);
                    }
                }
                // The slot arrived just in time: go ahead.
                Ok(Withdrawn::Granted) => self.resume(w),
                Err(e) => {
                    // Fail open: a request we cannot account for is let through
                    // rather than left hanging.
                    log::warn!(
                        "withdraw on {}: {e}; letting the request through",
                        route.path
                    );
                    w.handle.0.set(Fate::Answered);
                    self.host.count(w.endpoint, Counter::FailedOpen);
                    if self.host.set_effective_context(w.context_id).is_ok() {
                        let _ = self.host.resume_http_request();
                    }
                }
            }
        }
    }

    /// Continues a paused request that now holds a slot. Exactly once: the
    /// waiter was removed from the local list before this call.
    fn resume(&self, w: LocalWaiter<(Rc<Cell<Fate>>, u64)>) {
        let fate = &w.handle.0;
        fate.set(Fate::Admitted(self.host.now_ns()));
        let resumed = self.host.set_effective_context(w.context_id).is_ok()
            && self.host.resume_http_request().is_ok();
        if resumed {
            self.left_queue(&w, Counter::AdmittedAfterWait);
        } else {
            // The stream is gone (on_log will not run again for it).
            fate.set(Fate::Answered);
            self.release(w.endpoint);
        }
    }

    /// Counts how a waiter left the queue, and how long it waited.
    fn left_queue(&self, w: &LocalWaiter<(Rc<Cell<Fate>>, u64)>, how: Counter) {
        let queue_timeout = self.routes.endpoints[w.endpoint].queue_timeout;
        let since_ns = w
            .deadline_ns
            .saturating_sub(queue_timeout.as_nanos() as u64);
        self.host.count(w.endpoint, how);
        self.host.waited(w.endpoint, since_ns);
    }

    /// A request that held a slot of `endpoint` has ended.
    pub fn release(&self, endpoint: usize) {
        let route = &self.routes.endpoints[endpoint];
        match admission::release(&self.host, &route.key) {
            Ok(wakeups) => self.wake(&wakeups),
            Err(e) => log::error!("release on {}: {e}", route.path),
        }
    }
}
