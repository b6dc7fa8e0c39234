//! One worker: what a root context shares with its HTTP contexts, and the
//! duties that run on its event loop. Only the worker that paused a request
//! can resume it (Envoy), so each keeps its own waiters, claims the slots
//! handed to them, times them out, and wakes the other workers whose waiters
//! its releases served.

use crate::dashboard::Dashboard;
use crate::host::Host;
use crate::metrics::{Counter, Metered};
use crate::replies::LocalReply;
use crate::routes::Routes;
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
    pub id: WorkerId,
    vm_id: String,
    pub routes: Routes,
    pub dashboard: Dashboard,
    waiters: RefCell<LocalWaiters<Rc<Cell<Fate>>>>,
    /// Other workers' wake-up queues, resolved once.
    peers: RefCell<HashMap<WorkerId, u32>>,
    fast_tick: Cell<bool>,
    /// The period when nobody waits ([`BASE_TICK`] once the root has duties).
    idle_tick: Cell<Duration>,
}

impl<H: Host> Worker<H> {
    pub fn new(host: H, id: WorkerId, vm_id: String, routes: Routes) -> Worker<H> {
        Worker {
            host: Metered::new(host, &routes),
            id,
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

    pub fn tick(&self) {
        self.claim_granted();
        self.expire_waiters();
        if self.waiters.borrow().is_empty() {
            self.set_fast_tick(false);
        }
    }

    /// Keeps a paused request until its ticket is granted or it times out.
    pub fn add_waiter(
        &self,
        context_id: u32,
        endpoint: usize,
        ticket: u32,
        since_ns: u64,
    ) -> Rc<Cell<Fate>> {
        let fate = Rc::new(Cell::new(Fate::Waiting));
        let queue_timeout = self.routes.endpoints[endpoint].queue_timeout;
        self.waiters.borrow_mut().push(LocalWaiter {
            context_id,
            endpoint,
            ticket,
            deadline_ns: since_ns.saturating_add(queue_timeout.as_nanos() as u64),
            handle: Rc::clone(&fate),
        });
        self.set_fast_tick(true);
        fate
    }

    /// The client of a waiting request went away: it leaves the queue, and
    /// a slot granted to it in the meantime goes back.
    pub fn leave_queue(&self, context_id: u32, endpoint: usize) {
        let waiter = self.waiters.borrow_mut().remove_context(context_id);
        if let Some(w) = waiter {
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
        for ep in endpoints {
            let route = &self.routes.endpoints[ep];
            match admission::claim(&self.host, &route.key, self.id) {
                Ok(claimed) => {
                    self.wake(&claimed.wakeups);
                    for ticket in claimed.refused {
                        let waiter = self.waiters.borrow_mut().take_ticket(ep, ticket);
                        if let Some(w) = waiter {
                            // Out of the queue, holding nothing: answered once.
                            w.handle.set(Fate::Answered);
                            self.left_queue(&w, Counter::Unhealthy);
                            if self.host.set_effective_context(w.context_id).is_ok() {
                                LocalReply::Unhealthy(route).send(&self.host);
                            }
                        }
                    }
                    for ticket in claimed.granted {
                        let waiter = self.waiters.borrow_mut().take_ticket(ep, ticket);
                        match waiter {
                            Some(w) => self.resume(w),
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
            let route = &self.routes.endpoints[w.endpoint];
            match admission::withdraw(&self.host, &route.key, w.ticket) {
                // NotFound cannot happen unless the record was reset under
                // us; the request must be answered either way, never left paused.
                Ok(Withdrawn::Removed | Withdrawn::NotFound) => {
                    w.handle.set(Fate::Answered);
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
                    w.handle.set(Fate::Answered);
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
    fn resume(&self, w: LocalWaiter<Rc<Cell<Fate>>>) {
        w.handle.set(Fate::Admitted(self.host.now_ns()));
        let resumed = self.host.set_effective_context(w.context_id).is_ok()
            && self.host.resume_http_request().is_ok();
        if resumed {
            self.left_queue(&w, Counter::AdmittedAfterWait);
        } else {
            // The stream is gone (on_log will not run again for it).
            w.handle.set(Fate::Answered);
            self.release(w.endpoint);
        }
    }

    /// Counts how a waiter left the queue, and how long it waited.
    fn left_queue(&self, w: &LocalWaiter<Rc<Cell<Fate>>>, how: Counter) {
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
