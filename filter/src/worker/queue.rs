//! A worker's own paused requests. Only the worker that paused a request can
//! resume it (Envoy), so it owns their tickets, claims the slots granted to
//! them, times them out, and keeps the slot of each resumed one until that
//! request's stream takes it ([`Worker::take_resumed`]): every holding has
//! one owner at a time.

use super::Worker;
use crate::host::Host;
use crate::metrics::Counter;
use crate::replies::LocalReply;
use sluice_core::holding::{Slot, Ticket};
use sluice_core::waiters::{Left, LocalWaiter, LocalWaiters};
use std::cell::{Cell, RefCell};

/// What the worker keeps of each waiter besides its ticket.
#[derive(Debug, Clone, Copy)]
pub struct Waiting {
    /// When it was paused (its arrival in Envoy).
    pub since_ns: u64,
    /// The bytes it counts in its endpoint's `max_queued_bytes`.
    pub bytes: u64,
    /// Its own deadline (`grpc-timeout`, `x-envoy-expected-rq-timeout-ms`,
    /// `deadline_header`), past which it is never sent upstream, even with
    /// a slot.
    pub expires_ns: Option<u64>,
    /// Its class (an index into the configuration's classes).
    pub class: u8,
}

impl Waiting {
    fn expired(&self, now_ns: u64) -> bool {
        self.expires_ns.is_some_and(|at| at <= now_ns)
    }
}

type QueuedBytes = Waiting;

#[derive(Default)]
pub struct Queue {
    waiters: RefCell<LocalWaiters<QueuedBytes>>,
    /// Slots of resumed requests, by context id, until their streams take them.
    resumed: RefCell<Vec<(u32, Slot)>>,
    /// A claim is under way (claims do not nest: one asked for meanwhile
    /// runs as another round).
    claiming: Cell<bool>,
    reclaim: Cell<bool>,
}

impl Queue {
    pub fn next_deadline(&self) -> Option<u64> {
        self.waiters.borrow().next_deadline()
    }
}

impl<H: Host> Worker<H> {
    /// Keeps a paused request until its ticket is granted or it times out
    /// (its queue timeout, or its own deadline if that comes first).
    /// `waiting.bytes` were added to the endpoint's queued-bytes counter and
    /// come off it when the request leaves the queue, however it leaves.
    pub fn add_waiter(&self, context_id: u32, ticket: Ticket, waiting: Waiting) {
        let route = self.routes.route(ticket.endpoint());
        let queue_timeout = self.routes.queue_timeout(route, waiting.class);
        let queue_deadline = waiting
            .since_ns
            .saturating_add(queue_timeout.as_nanos() as u64);
        self.queue.waiters.borrow_mut().push(LocalWaiter {
            context_id,
            ticket,
            deadline_ns: waiting
                .expires_ns
                .map_or(queue_deadline, |at| at.min(queue_deadline)),
            handle: waiting,
        });
        self.schedule(false);
    }

    /// The slot of request `context_id` if this worker resumed it.
    pub fn take_resumed(&self, context_id: u32) -> Option<Slot> {
        let mut resumed = self.queue.resumed.borrow_mut();
        let i = resumed.iter().position(|(c, _)| *c == context_id)?;
        Some(resumed.swap_remove(i).1)
    }

    /// A waiter is out of the local list: its bytes leave the queue too.
    fn dequeued(&self, w: &Left<QueuedBytes>) {
        let route = self.routes.route(w.endpoint);
        if let (Some((_, key)), true) = (&route.queued_bytes, w.handle.bytes > 0) {
            if let Err(e) = sluice_core::queued_bytes::sub(&self.host, key, w.handle.bytes) {
                log::error!("queued bytes of {}: {e}", route.path);
            }
        }
    }

    /// The client of a waiting request went away: it leaves the queue, and
    /// a slot granted to it in the meantime goes back.
    pub fn leave_queue(&self, context_id: u32) {
        let waiter = self.queue.waiters.borrow_mut().remove_context(context_id);
        if let Some(w) = waiter {
            let (ticket, left) = w.split();
            self.dequeued(&left);
            let route = self.routes.route(left.endpoint);
            match ticket.withdraw(&self.host, &route.key) {
                Ok(Some(slot)) => self.release(slot),
                Ok(None) => {}
                Err(e) => log::error!("withdraw on {}: {e}", route.path),
            }
        }
    }

    /// Resumes this worker's requests whose tickets were granted, and
    /// answers those of an unhealthy backend 503. From a stream's callback
    /// (a release on this worker granted a slot to one of its waiters), the
    /// host's effective context is that stream's again afterwards; Envoy
    /// defers the resumes until the callback returns.
    pub fn claim_granted(&self) {
        if self.queue.claiming.replace(true) {
            self.queue.reclaim.set(true);
            return;
        }
        self.claim_once();
        while self.queue.reclaim.replace(false) {
            self.claim_once();
        }
        self.queue.claiming.set(false);
        if let Some(context_id) = self.stream.get() {
            if let Err(e) = self.host.set_effective_context(context_id) {
                log::warn!("cannot return to stream {context_id}: {e:?}");
            }
        }
    }

    fn claim_once(&self) {
        let endpoints = self.queue.waiters.borrow().endpoints();
        // Waiters mean an index was taken.
        let Some(id) = self.taken_id() else { return };
        for ep in endpoints {
            let route = self.routes.route(ep);
            let claimed = self.queue.waiters.borrow_mut().claim(
                &self.host,
                &route.key,
                ep,
                id,
                self.host.now_ns(),
            );
            let claimed = match claimed {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("claim on {}: {e}", route.path);
                    continue;
                }
            };
            self.wake(&claimed.wakeups);
            for w in claimed.refused {
                // Out of the queue, holding nothing: answered once.
                self.dequeued(&w);
                self.left_queue(&w, Counter::Unhealthy);
                if self.host.set_effective_context(w.context_id).is_ok() {
                    LocalReply::Unhealthy(route).send(&self.host);
                }
            }
            for w in claimed.pushed_out {
                self.dequeued(&w);
                self.left_queue(&w, Counter::PushedOut);
                if self.host.set_effective_context(w.context_id).is_ok() {
                    LocalReply::PushedOut(route).send(&self.host);
                }
            }
            for (slot, w) in claimed.granted {
                self.dequeued(&w);
                self.resume_unless_expired(slot, w);
            }
            for slot in claimed.orphans {
                // Never keep a slot nobody uses.
                log::warn!(
                    "a granted ticket of {} has no waiter; releasing",
                    route.path
                );
                self.release(slot);
            }
        }
    }

    /// Answers 504 to waiters past their deadline.
    pub(super) fn expire_waiters(&self) {
        let expired = self
            .queue
            .waiters
            .borrow_mut()
            .take_expired(self.host.now_ns());
        for w in expired {
            let (ticket, w) = w.split();
            self.dequeued(&w);
            let route = self.routes.route(w.endpoint);
            match ticket.withdraw(&self.host, &route.key) {
                // Also when the ticket was gone (the record reset under us):
                // the request must be answered, never left paused.
                Ok(None) => self.time_out(&w),
                // The slot arrived just in time: go ahead, unless it is
                // the request's own deadline that passed.
                Ok(Some(slot)) => self.resume_unless_expired(slot, w),
                Err(e) => {
                    // Fail open: a request we cannot account for is let through
                    // rather than left hanging.
                    log::warn!(
                        "withdraw on {}: {e}; letting the request through",
                        route.path
                    );
                    self.metrics
                        .count(w.endpoint, w.handle.class, Counter::FailedOpen);
                    if self.host.set_effective_context(w.context_id).is_ok() {
                        let _ = self.host.resume_http_request();
                    }
                }
            }
        }
    }

    /// A request past its own deadline (`grpc-timeout`) has nobody waiting
    /// for its answer: it gets the queue timeout reply and the slot goes on
    /// to the next waiter, so the backend never runs it.
    fn resume_unless_expired(&self, slot: Slot, w: Left<QueuedBytes>) {
        if !w.handle.expired(self.host.now_ns()) {
            return self.resume(slot, w);
        }
        self.time_out(&w);
        self.release(slot);
    }

    /// Answers a waiter whose time is up: 504 (`DEADLINE_EXCEEDED`), its
    /// own deadline or its queue timeout, whichever it was.
    fn time_out(&self, w: &Left<QueuedBytes>) {
        let route = self.routes.route(w.endpoint);
        let (how, reply) = if w.handle.expired(self.host.now_ns()) {
            (Counter::Deadline, LocalReply::Deadline(route))
        } else {
            (Counter::QueueTimeout, LocalReply::QueueTimeout(route))
        };
        self.left_queue(w, how);
        if self.host.set_effective_context(w.context_id).is_ok() {
            reply.send(&self.host);
        }
    }

    /// Continues a paused request with the slot it now holds; the waiter is
    /// out of the local list already, so this runs once per request.
    fn resume(&self, slot: Slot, w: Left<QueuedBytes>) {
        let now = self.host.now_ns();
        let slot = slot.timed(Some(now));
        self.upload_admitted(w.context_id, now);
        let resumed = self.host.set_effective_context(w.context_id).is_ok() && {
            crate::stream::steer(self, slot.instance());
            self.host.resume_http_request().is_ok()
        };
        if resumed {
            self.left_queue(&w, Counter::AdmittedAfterWait);
            self.queue.resumed.borrow_mut().push((w.context_id, slot));
        } else {
            // The stream is gone (on_log will not run again for it).
            self.release(slot);
        }
    }

    /// Counts how a waiter left the queue, and how long it waited.
    fn left_queue(&self, w: &Left<QueuedBytes>, how: Counter) {
        let class = w.handle.class;
        self.metrics.count(w.endpoint, class, how);
        self.metrics
            .waited(&self.host, w.endpoint, class, w.handle.since_ns);
    }
}
