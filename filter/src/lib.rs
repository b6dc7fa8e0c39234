//! Sluice as an Envoy proxy-wasm HTTP filter.
//!
//! This file only wires proxy-wasm callbacks to the host-independent pieces in
//! `sluice-core`: the admission record in shared data (one per endpoint, seen
//! by every worker), and this worker's own paused requests. See
//! `docs/filter.md` for the design and the Envoy behaviour it relies on.

mod host;
mod routes;

use host::HostSharedData;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use routes::Routes;
use sluice_core::admission::{self, Acquired, Limits, Wakeups, Withdrawn, WorkerId};
use sluice_core::config::Config;
use sluice_core::waiters::{LocalWaiter, LocalWaiters};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// Tick while requests wait: the backstop for lost wake-ups and the clock of
/// queue timeouts, so it bounds how late a 504 can be.
const FAST_TICK: Duration = Duration::from_millis(5);
/// Counter from which each root context takes its worker index. Envoy gives a
/// VM no worker id, and a shared queue notifies only the last VM that
/// registered its name, so every root context needs a name of its own.
const WORKERS_KEY: &str = "sluice:workers";
/// Where the filter answers with its stats JSON (fastapi-balancer's path).
const STATS_PATH: &str = "/balancer/stats";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(SluiceRoot::default()));
}}

/// What became of a paused request; shared between its HTTP context and the
/// root context that finishes the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Waiting,
    /// Resumed with a slot at this host time (ns): it must release at its end.
    Admitted(u64),
    /// Answered locally (504): it holds nothing.
    Answered,
}

/// One root context: everything its HTTP contexts share.
struct Worker {
    id: WorkerId,
    vm_id: String,
    routes: Routes,
    waiters: RefCell<LocalWaiters<Rc<Cell<Fate>>>>,
    /// Other workers' wake-up queues, resolved once.
    peers: RefCell<HashMap<WorkerId, u32>>,
    fast_tick: Cell<bool>,
}

#[derive(Default)]
struct SluiceRoot {
    worker: Option<Rc<Worker>>,
}

impl Context for SluiceRoot {}

impl RootContext for SluiceRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let config = match Config::from_json_str(&text) {
            Ok(c) => c,
            Err(e) => {
                // Returning false fails plugin start: Envoy refuses the config.
                log::error!("invalid configuration: {e}");
                return false;
            }
        };
        for w in &config.warnings {
            log::warn!("{w}");
        }
        let routes = Routes::new(&config);
        // Create every endpoint's record before traffic. Envoy runs this on
        // the main thread before any worker VM exists, and a write to a
        // missing key ignores CAS, so creating later could race.
        for key in routes.keys() {
            if let Err(e) = admission::ensure(&HostSharedData, key) {
                log::error!("shared data {key}: {e}");
                return false;
            }
        }
        let id = match allocate_worker_id() {
            Ok(id) => id,
            Err(e) => {
                log::error!("cannot allocate a worker index: {e}");
                return false;
            }
        };
        if let Err(e) = hostcalls::register_shared_queue(&queue_name(id)) {
            log::error!("cannot register wake-up queue: {e:?}");
            return false;
        }
        let vm_id = self
            .get_property(vec!["plugin_vm_id"])
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        log::info!(
            "service {:?}, {} endpoints, worker {id}",
            config.service,
            config.endpoints.len()
        );
        self.worker = Some(Rc::new(Worker {
            id,
            vm_id,
            routes,
            waiters: RefCell::new(LocalWaiters::default()),
            peers: RefCell::new(HashMap::new()),
            fast_tick: Cell::new(false),
        }));
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        // The messages carry nothing: being woken means "claim your grants".
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        if let Some(w) = &self.worker {
            w.claim_granted();
        }
    }

    fn on_tick(&mut self) {
        let Some(w) = &self.worker else { return };
        w.claim_granted();
        w.expire_waiters();
        if w.waiters.borrow().is_empty() {
            w.set_fast_tick(false);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        Some(Box::new(SluiceStream {
            worker,
            context_id,
            state: Stream::Untracked,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

fn queue_name(id: WorkerId) -> String {
    format!("sluice:wake:{id}")
}

fn allocate_worker_id() -> Result<WorkerId, String> {
    loop {
        let (value, cas) = hostcalls::get_shared_data(WORKERS_KEY).map_err(|s| format!("{s:?}"))?;
        let next = match value {
            Some(b) if b.len() == 4 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            // First VM ever (main thread, before workers): see on_configure.
            _ => 0,
        };
        let id = WorkerId::try_from(next)
            .map_err(|_| "more than 65535 plugin VMs since start".to_string())?;
        match hostcalls::set_shared_data(WORKERS_KEY, Some(&(next + 1).to_le_bytes()), cas) {
            Ok(()) => return Ok(id),
            Err(proxy_wasm::types::Status::CasMismatch) => continue,
            Err(s) => return Err(format!("{s:?}")),
        }
    }
}

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Worker {
    /// The stats document (a superset of fastapi-balancer's), read from the
    /// shared records, so every worker answers with the same numbers.
    fn stats_json(&self) -> String {
        let mut endpoints = serde_json::Map::new();
        for r in &self.routes.endpoints {
            let entry = match admission::snapshot(&HostSharedData, &r.key) {
                Ok(s) => serde_json::json!({
                    "capacity": r.capacity,
                    "active_requests": s.active,
                    "available_slots": r.capacity.saturating_sub(s.active),
                    "queued": s.queued(),
                    "max_queue": r.max_queue,
                    "queue_timeout": r.queue_timeout.as_secs_f64(),
                }),
                Err(e) => serde_json::json!({ "capacity": r.capacity, "error": e.to_string() }),
            };
            endpoints.insert(r.path.clone(), entry);
        }
        serde_json::json!({ "service": self.routes.service, "endpoints": endpoints }).to_string()
    }

    /// Tells each worker that it has granted tickets to claim.
    fn wake(&self, wakeups: &Wakeups) {
        for &peer in wakeups.workers() {
            let queue = self.peer_queue(peer);
            match queue.map(|q| hostcalls::enqueue_shared_queue(q, Some(b"w"))) {
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
        let q = hostcalls::resolve_shared_queue(&self.vm_id, &queue_name(peer)).ok()??;
        self.peers.borrow_mut().insert(peer, q);
        Some(q)
    }

    fn set_fast_tick(&self, fast: bool) {
        if self.fast_tick.get() != fast {
            self.fast_tick.set(fast);
            let period = if fast { FAST_TICK } else { Duration::ZERO };
            if let Err(e) = hostcalls::set_tick_period(period) {
                log::warn!("cannot set tick period: {e:?}");
            }
        }
    }

    /// Resumes this worker's requests whose tickets were granted.
    fn claim_granted(&self) {
        let endpoints = self.waiters.borrow().endpoints();
        for ep in endpoints {
            let route = &self.routes.endpoints[ep];
            let capacity = route.capacity;
            match admission::claim(&HostSharedData, &route.key, self.id, capacity) {
                Ok((tickets, wakeups)) => {
                    self.wake(&wakeups);
                    for ticket in tickets {
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
        let expired = self.waiters.borrow_mut().take_expired(now_ns());
        for w in expired {
            let route = &self.routes.endpoints[w.endpoint];
            match admission::withdraw(&HostSharedData, &route.key, w.ticket) {
                // NotFound cannot happen unless the record was reset under
                // us; the request must be answered either way, never left paused.
                Ok(Withdrawn::Removed | Withdrawn::NotFound) => {
                    w.handle.set(Fate::Answered);
                    if hostcalls::set_effective_context(w.context_id).is_ok() {
                        let waited = route.queue_timeout.as_millis();
                        let body = format!(
                            "{{\"error\":\"timed out waiting for a slot\",\"reason\":\"queue-timeout\",\"endpoint\":\"{}\",\"queue_timeout_ms\":{waited}}}\n",
                            route.path
                        );
                        let _ = hostcalls::send_http_response(
                            504,
                            vec![
                                ("content-type", "application/json"),
                                ("x-sluice-reason", "queue-timeout"),
                            ],
                            Some(body.as_bytes()),
                        );
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
                    if hostcalls::set_effective_context(w.context_id).is_ok() {
                        let _ = hostcalls::resume_http_request();
                    }
                }
            }
        }
    }

    /// Continues a paused request that now holds a slot. Exactly once: the
    /// waiter was removed from the local list before this call.
    fn resume(&self, w: LocalWaiter<Rc<Cell<Fate>>>) {
        w.handle.set(Fate::Admitted(now_ns()));
        let resumed = hostcalls::set_effective_context(w.context_id).is_ok()
            && hostcalls::resume_http_request().is_ok();
        if !resumed {
            // The stream is gone (on_log will not run again for it).
            w.handle.set(Fate::Answered);
            self.release(w.endpoint);
        }
    }

    fn release(&self, ep: usize) {
        let route = &self.routes.endpoints[ep];
        match admission::release(&HostSharedData, &route.key, route.capacity) {
            Ok(wakeups) => self.wake(&wakeups),
            Err(e) => log::error!("release on {}: {e}", route.path),
        }
    }
}

/// Where one request stands.
enum Stream {
    /// Not a watched endpoint (or already finished).
    Untracked,
    Holding(usize),
    /// Paused at `since_ns`; its fate is decided by the root context.
    Queued {
        ep: usize,
        fate: Rc<Cell<Fate>>,
        since_ns: u64,
    },
}

struct SluiceStream {
    worker: Rc<Worker>,
    context_id: u32,
    state: Stream,
}

impl SluiceStream {
    /// Releases whatever the request holds, exactly once.
    fn finish(&mut self) {
        match std::mem::replace(&mut self.state, Stream::Untracked) {
            Stream::Untracked => {}
            Stream::Holding(ep) => self.worker.release(ep),
            Stream::Queued { ep, fate, .. } => match fate.get() {
                Fate::Admitted(_) => self.worker.release(ep),
                Fate::Answered => {}
                Fate::Waiting => {
                    // Client gone while queued: leave the queue.
                    let waiter = self
                        .worker
                        .waiters
                        .borrow_mut()
                        .remove_context(self.context_id);
                    if let Some(w) = waiter {
                        let route = &self.worker.routes.endpoints[ep];
                        match admission::withdraw(&HostSharedData, &route.key, w.ticket) {
                            Ok(Withdrawn::Granted) => self.worker.release(ep),
                            Ok(_) => {}
                            Err(e) => log::error!("withdraw on {}: {e}", route.path),
                        }
                    }
                }
            },
        }
    }

    fn reject_queue_full(&self, ep: usize) {
        let route = &self.worker.routes.endpoints[ep];
        let retry_after = route
            .queue_timeout
            .as_secs_f64()
            .ceil()
            .max(1.0)
            .to_string();
        let body = format!(
            "{{\"error\":\"too many requests waiting\",\"reason\":\"queue-full\",\"endpoint\":\"{}\",\"max_queue\":{}}}\n",
            route.path, route.max_queue
        );
        self.send_http_response(
            503,
            vec![
                ("content-type", "application/json"),
                ("x-sluice-reason", "queue-full"),
                ("retry-after", &retry_after),
            ],
            Some(body.as_bytes()),
        );
    }
}

impl Context for SluiceStream {}

impl HttpContext for SluiceStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let worker = Rc::clone(&self.worker);
        let Some(path) = self.get_http_request_header(":path") else {
            return Action::Continue;
        };
        let Some(ep) = worker
            .routes
            .find(&path, || self.get_http_request_header(":method"))
        else {
            if path.split('?').next() == Some(STATS_PATH) {
                let body = worker.stats_json();
                self.send_http_response(
                    200,
                    vec![
                        ("content-type", "application/json"),
                        ("cache-control", "no-store"),
                        ("x-sluice-reason", "stats"),
                    ],
                    Some(body.as_bytes()),
                );
                return Action::Pause;
            }
            return Action::Continue;
        };
        let route = &worker.routes.endpoints[ep];
        let limits = Limits {
            capacity: route.capacity,
            max_queue: route.max_queue,
        };
        match admission::acquire(&HostSharedData, &route.key, limits, worker.id) {
            Ok((acquired, wakeups)) => {
                worker.wake(&wakeups);
                match acquired {
                    Acquired::Admitted => {
                        self.state = Stream::Holding(ep);
                        Action::Continue
                    }
                    Acquired::Queued { ticket } => {
                        let fate = Rc::new(Cell::new(Fate::Waiting));
                        let since_ns = now_ns();
                        let deadline_ns =
                            since_ns.saturating_add(route.queue_timeout.as_nanos() as u64);
                        worker.waiters.borrow_mut().push(LocalWaiter {
                            context_id: self.context_id,
                            endpoint: ep,
                            ticket,
                            deadline_ns,
                            handle: Rc::clone(&fate),
                        });
                        worker.set_fast_tick(true);
                        self.state = Stream::Queued { ep, fate, since_ns };
                        // Resumed later by this worker's root context with
                        // exactly one of resume_http_request or a 504.
                        Action::Pause
                    }
                    Acquired::QueueFull => {
                        self.reject_queue_full(ep);
                        Action::Pause
                    }
                }
            }
            Err(e) => {
                // Fail open: shared data trouble must not take the service down.
                log::warn!(
                    "acquire on {}: {e}; letting the request through",
                    route.path
                );
                Action::Continue
            }
        }
    }

    // The slot is released as soon as the upstream response is complete: the
    // backend is done with the request even if the client is slow to read.
    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Tell the client how long it queued: the number users tune
        // queue_timeout and capacity by.
        if let Stream::Queued { fate, since_ns, .. } = &self.state {
            if let Fate::Admitted(at_ns) = fate.get() {
                let waited_ms = at_ns.saturating_sub(*since_ns) / 1_000_000;
                self.set_http_response_header("x-sluice-wait-ms", Some(&waited_ms.to_string()));
            }
        }
        if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.finish();
        Action::Continue
    }

    // Every stream ends here, normal or reset (client gone while queued or in
    // flight); a second call finds nothing to release.
    fn on_log(&mut self) {
        self.finish();
    }
}
