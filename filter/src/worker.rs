//! One worker: what a root context shares with its HTTP contexts, and the
//! duties that run on its event loop. Only the worker that paused a request
//! can resume it (Envoy), so each keeps its own waiters, claims the slots
//! handed to them, times them out, and wakes the other workers whose waiters
//! its releases served.

use crate::admin::Dashboard;
use crate::host::Host;
use crate::metrics::{Counter, Metrics};
use crate::replies::LocalReply;
use crate::routes::Routes;
use sluice_core::abandon::{self, hold_ns, HeldSlots, RecentDurations};
use sluice_core::admission::{self, Wakeups, Withdrawn, WorkerId};
use sluice_core::config::Ui;
use sluice_core::waiters::{LocalWaiter, LocalWaiters};
use sluice_core::{config_seen, shared_keys, worker_ids};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// The longest tick while requests wait: the backstop for lost wake-ups.
/// Queue timeouts and held slots set it shorter, to the millisecond they
/// are due (see [`Worker::schedule`]).
pub const FAST_TICK: Duration = Duration::from_millis(5);
/// Tick otherwise: the leader's lease, sync watchdog and health checks.
pub const BASE_TICK: Duration = Duration::from_millis(100);

/// A tick later than this after its planned time is late: Envoy's timers
/// on libevent's coarse clock come up to a kernel tick (4 ms at 250 Hz)
/// late, on its precise one (`EVENT_PRECISE_TIMER=1`) within about 0.1 ms.
const LATE_TICK_NS: u64 = 1_500_000;
/// A tick later than this says nothing about the timer: a starved worker,
/// a clock step, a test that moved the clock.
const STRAY_TICK_NS: u64 = 6_000_000;
/// How many ticks each judgement takes.
const JUDGED_TICKS: u32 = 32;

/// `ns` as a tick period: whole milliseconds (Envoy's unit), rounded up so
/// that the tick is never early, and at least 1 ms.
fn ceil_ms(ns: u64) -> Duration {
    Duration::from_millis(ns.div_ceil(1_000_000).max(1))
}

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

pub struct Worker<H> {
    pub host: H,
    /// Counted in memory; sent on the tick.
    pub metrics: Metrics,
    /// Taken at this VM's first tick (see [`Worker::id`]).
    id: Cell<Option<WorkerId>>,
    vm_id: String,
    pub routes: Routes,
    pub dashboard: Dashboard,
    /// Each with its fate and the body bytes it counts in `max_queued_bytes`.
    waiters: RefCell<LocalWaiters<(Rc<Cell<Fate>>, u64)>>,
    /// Other workers' wake-up queues, resolved once.
    peers: RefCell<HashMap<WorkerId, u32>>,
    /// The tick period last set (zero: none yet).
    period: Cell<Duration>,
    /// Host time (ns) at which the tick is due next; `u64::MAX`: none.
    next_tick_ns: Cell<u64>,
    /// Configured, first tick not yet run: tick soon to take the index.
    starting: Cell<bool>,
    /// The HTTP context whose callback runs, while it runs worker code that
    /// may resume other requests: the host's effective context goes back to
    /// it afterwards.
    stream: Cell<Option<u32>>,
    /// A claim of granted tickets is under way (claims do not nest: one
    /// asked for meanwhile runs as another round).
    claiming: Cell<bool>,
    reclaim: Cell<bool>,
    /// Per endpoint: how long this worker's recent requests took upstream.
    durations: RefCell<Vec<RecentDurations>>,
    /// Slots of abandoned requests, released when the backend is most
    /// likely done with them.
    held: RefCell<HeldSlots>,
    /// The period when nobody waits ([`BASE_TICK`] once the root has duties).
    idle_tick: Cell<Duration>,
    /// Ticks judged in this round and how many of them were late; `None`
    /// once found late.
    tick_lateness: Cell<Option<(u32, u32)>>,
    /// The tick planned last is for a deadline or a held slot.
    timed_tick: Cell<bool>,
}

impl<H: Host> Worker<H> {
    pub fn new(host: H, vm_id: String, routes: Routes) -> Worker<H> {
        let durations = vec![RecentDurations::default(); routes.endpoints.len()];
        Worker {
            id: Cell::new(None),
            durations: RefCell::new(durations),
            held: RefCell::new(HeldSlots::default()),
            metrics: Metrics::new(&host, &routes),
            host,
            vm_id,
            routes,
            dashboard: Dashboard::new(&Ui::default()),
            waiters: RefCell::new(LocalWaiters::default()),
            peers: RefCell::new(HashMap::new()),
            period: Cell::new(Duration::ZERO),
            next_tick_ns: Cell::new(u64::MAX),
            starting: Cell::new(false),
            stream: Cell::new(None),
            claiming: Cell::new(false),
            reclaim: Cell::new(false),
            idle_tick: Cell::new(Duration::ZERO),
            tick_lateness: Cell::new(Some((0, 0))),
            timed_tick: Cell::new(false),
        }
    }

    /// The tick when nobody waits; starts it now.
    pub fn set_idle_tick(&self, period: Duration) {
        self.idle_tick.set(period);
        self.schedule(false);
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
        let queue = shared_keys::wake_queue(id);
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
        self.starting.set(true);
        self.schedule(false);
    }

    pub fn tick(&self) {
        self.judge_timer();
        self.starting.set(false);
        if self.id.get().is_none() {
            self.id();
        }
        self.claim_granted();
        self.expire_waiters();
        self.release_held();
        self.publish_estimates();
        self.metrics.flush(&self.host);
        self.schedule(true);
    }

    /// Runs `f`, worker code called from the callback of HTTP context
    /// `context_id` that may resume other requests of this worker.
    pub fn in_stream<R>(&self, context_id: u32, f: impl FnOnce() -> R) -> R {
        let outer = self.stream.replace(Some(context_id));
        let r = f();
        self.stream.set(outer);
        r
    }

    /// Judges Envoy's timer by how late the ticks that answer deadlines
    /// come (queue timeouts, held slots), 32 at a time, and says once per
    /// process if most come late enough to make queue timeouts late: Envoy
    /// started without `EVENT_PRECISE_TIMER=1`.
    fn judge_timer(&self) {
        let Some((judged, late)) = self.tick_lateness.get() else {
            return;
        };
        if !self.timed_tick.get() {
            return;
        }
        let lateness = self.host.now_ns().saturating_sub(self.next_tick_ns.get());
        if lateness > STRAY_TICK_NS {
            return;
        }
        let (judged, late) = (judged + 1, late + u32::from(lateness > LATE_TICK_NS));
        if judged < JUDGED_TICKS {
            self.tick_lateness.set(Some((judged, late)));
            return;
        }
        if late * 2 <= judged {
            self.tick_lateness.set(Some((0, 0)));
            return;
        }
        self.tick_lateness.set(None);
        if config_seen::first_at(&self.host, shared_keys::COARSE_TIMER_LOGGED, "") {
            log::warn!(
                "Envoy's timers fire late: {late} of {judged} ticks came more than 1.5 ms after \
                 their time, so queue timeouts will be answered late too. Unless its workers \
                 are overloaded, Envoy's event loop (libevent) is timing them by the kernel's \
                 coarse clock, up to 4 ms behind: set EVENT_PRECISE_TIMER=1 in Envoy's \
                 environment (docs/filter.md, \"Timer precision\")"
            );
        }
    }

    /// Sets the tick to what is due next: the nearest queue deadline or held
    /// slot, rounded up to Envoy's millisecond, but at most [`FAST_TICK`]
    /// while anyone waits; the idle tick otherwise. Setting a period
    /// restarts Envoy's timer from now, so outside a tick (`from_tick`
    /// false: a request started waiting) it only moves the tick sooner.
    fn schedule(&self, from_tick: bool) {
        let now = self.host.now_ns();
        let due = [
            self.waiters.borrow().next_deadline(),
            self.held.borrow().next_due(),
        ]
        .into_iter()
        .flatten()
        .min();
        let period = match due {
            Some(at) => FAST_TICK.min(ceil_ms(at.saturating_sub(now))),
            None if self.starting.get() => FAST_TICK,
            None => self.idle_tick.get(),
        };
        let next = if period.is_zero() {
            u64::MAX
        } else {
            now.saturating_add(period.as_nanos() as u64)
        };
        if !from_tick && next >= self.next_tick_ns.get() {
            return;
        }
        self.next_tick_ns.set(next);
        self.timed_tick.set(due.is_some());
        // From a tick Envoy re-arms the timer with the period after the
        // callback; from elsewhere only a new period restarts it.
        if from_tick && period == self.period.get() {
            return;
        }
        self.period.set(period);
        if let Err(e) = self.host.set_tick_period(period) {
            log::warn!("cannot set tick period: {e:?}");
        }
    }

    /// Whether to read the clock for a request admitted now, to time it
    /// (see [`RecentDurations::time_next`]).
    pub fn time_next(&self, endpoint: usize) -> bool {
        self.durations.borrow_mut()[endpoint].time_next()
    }

    /// A request admitted at `admitted_ns` (if it was timed) got its whole
    /// response: the backend is done with it, and its duration feeds the
    /// estimate (which the tick publishes).
    pub fn complete(&self, endpoint: usize, admitted_ns: Option<u64>) {
        if let Some(admitted_ns) = admitted_ns {
            let took = self.host.now_ns().saturating_sub(admitted_ns);
            self.durations.borrow_mut()[endpoint].record(took);
        }
        self.release(endpoint);
    }

    /// Publishes the upstream-duration estimates that changed since the
    /// last tick, for workers that have none of their own.
    fn publish_estimates(&self) {
        let mut durations = self.durations.borrow_mut();
        for (ep, d) in durations.iter_mut().enumerate() {
            if let Some(estimate) = d.take_unpublished() {
                let key = shared_keys::upstream_estimate(&self.routes.endpoints[ep].key);
                if let Err(e) = abandon::publish(&self.host, &key, estimate) {
                    log::debug!("cannot publish {key}: {e}");
                }
            }
        }
    }

    /// A request admitted at `admitted_ns` was abandoned before its response
    /// (client gone, or Envoy answered for the backend): its slot is held
    /// until the backend has most likely finished it, then released once.
    pub fn abandon(&self, endpoint: usize, admitted_ns: u64) {
        let now = self.host.now_ns();
        let estimate = self.durations.borrow()[endpoint].estimate_ns().or_else(|| {
            let key = shared_keys::upstream_estimate(&self.routes.endpoints[endpoint].key);
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
        self.schedule(false);
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
        self.schedule(false);
        fate
    }

    /// A waiter is out of the local list: its bytes leave the queue too.
    fn dequeued(&self, w: &LocalWaiter<(Rc<Cell<Fate>>, u64)>) {
        let bytes = w.handle.1;
        let route = &self.routes.endpoints[w.endpoint];
        if let (Some((_, key)), true) = (&route.queued_bytes, bytes > 0) {
            if let Err(e) = sluice_core::queued_bytes::sub(&self.host, key, bytes) {
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

    /// Tells each worker that it has granted tickets to claim; this one
    /// claims its own at once, with no round trip through its queue.
    pub fn wake(&self, wakeups: &Wakeups) {
        let me = self.id.get();
        for &peer in wakeups.workers() {
            if Some(peer) == me {
                self.claim_granted();
                continue;
            }
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
            .resolve_shared_queue(&self.vm_id, &shared_keys::wake_queue(peer))
            .ok()??;
        self.peers.borrow_mut().insert(peer, q);
        Some(q)
    }

    /// Resumes this worker's requests whose tickets were granted, and
    /// answers those of an unhealthy backend 503. From a stream's callback
    /// (a release on this worker granted a slot to one of its waiters), the
    /// host's effective context is that stream's again afterwards; Envoy
    /// defers the resumes until the callback returns.
    pub fn claim_granted(&self) {
        if self.claiming.replace(true) {
            self.reclaim.set(true);
            return;
        }
        loop {
            self.claim_once();
            if !self.reclaim.replace(false) {
                break;
            }
        }
        self.claiming.set(false);
        if let Some(context_id) = self.stream.get() {
            if let Err(e) = self.host.set_effective_context(context_id) {
                log::warn!("cannot return to stream {context_id}: {e:?}");
            }
        }
    }

    fn claim_once(&self) {
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
                    self.metrics.count(w.endpoint, Counter::FailedOpen);
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
        self.metrics.count(w.endpoint, how);
        self.metrics.waited(&self.host, w.endpoint, since_ns);
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
