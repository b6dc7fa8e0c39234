//! One worker: what a root context shares with its HTTP contexts, and the
//! duties that run on its event loop. Split by duty: the [`ticker`], the
//! [`peers`] it wakes, its local [`queue`] of paused requests, and how it
//! gives [`slots`] back.

mod peers;
mod queue;
mod slots;
mod ticker;
mod uploads;

pub use queue::Waiting;
pub use ticker::BASE_TICK;
#[cfg(test)]
pub use ticker::FAST_TICK;

use crate::admin::Dashboard;
use crate::host::Host;
use crate::metrics::Metrics;
use crate::routes::Routes;
use peers::Peers;
use queue::Queue;
use slots::Slots;
use sluice_core::admission::{Wakeups, WorkerId};
use sluice_core::config::Ui;
use sluice_core::{shared_keys, worker_ids};
use std::cell::Cell;
use std::time::Duration;
use ticker::Ticker;
use uploads::Uploads;

pub struct Worker<H> {
    pub host: H,
    /// Counted in memory; sent on the tick.
    pub metrics: Metrics,
    pub routes: Routes,
    pub dashboard: Dashboard,
    /// Taken at this VM's first tick (see [`Worker::id`]).
    id: Cell<Option<WorkerId>>,
    /// The HTTP context whose callback runs, while it runs worker code that
    /// may resume other requests: the host's effective context goes back to
    /// it afterwards.
    stream: Cell<Option<u32>>,
    ticker: Ticker,
    peers: Peers,
    queue: Queue,
    slots: Slots,
    uploads: Uploads,
}

impl<H: Host> Worker<H> {
    pub fn new(host: H, vm_id: String, routes: Routes) -> Worker<H> {
        Worker {
            metrics: Metrics::new(&host, &routes),
            slots: Slots::new(routes.endpoints.len()),
            host,
            routes,
            dashboard: Dashboard::new(&Ui::default()),
            id: Cell::new(None),
            stream: Cell::new(None),
            ticker: Ticker::new(),
            peers: Peers::new(vm_id),
            queue: Queue::default(),
            uploads: Uploads::default(),
        }
    }

    /// The tick when nobody waits; starts it now.
    pub fn set_idle_tick(&self, period: Duration) {
        self.ticker.set_idle(period);
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
        self.ticker.start();
        self.schedule(false);
    }

    pub fn tick(&self) {
        self.ticker.ticked(&self.host);
        if self.id.get().is_none() {
            self.id();
        }
        self.claim_granted();
        self.expire_waiters();
        self.expire_uploads();
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

    /// Sets the tick to the nearest queue deadline or held slot.
    fn schedule(&self, from_tick: bool) {
        let due = [
            self.queue.next_deadline(),
            self.slots.next_due(),
            self.uploads.next_due(),
        ]
        .into_iter()
        .flatten()
        .min();
        self.ticker.schedule(&self.host, due, from_tick);
    }

    /// Tells each worker that it has granted tickets to claim; this one
    /// claims its own at once, with no round trip through its queue.
    pub fn wake(&self, wakeups: &Wakeups) {
        let me = self.id.get();
        for &peer in wakeups.workers() {
            if Some(peer) == me {
                self.claim_granted();
            } else {
                self.peers.wake(&self.host, peer);
            }
        }
    }
}
