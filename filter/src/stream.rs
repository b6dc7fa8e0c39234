//! One request (an HTTP context): admitted, queued or answered on arrival,
//! and whatever it holds released exactly once at its end.

use crate::host::{Envoy, Host};
use crate::metrics::Counter;
use crate::replies::LocalReply;
use crate::worker::{Fate, Worker};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use sluice_core::admission::{self, Acquired};
use std::cell::Cell;
use std::rc::Rc;

/// Where the filter answers with its stats JSON (fastapi-balancer's path).
pub const STATS_PATH: &str = "/balancer/stats";

/// Where one request stands.
enum State {
    /// Not a watched endpoint (or already finished).
    Untracked,
    Holding(usize),
    /// Paused at `since_ns`; its fate is decided by the worker.
    Queued {
        ep: usize,
        fate: Rc<Cell<Fate>>,
        since_ns: u64,
    },
}

pub struct Stream<H> {
    worker: Rc<Worker<H>>,
    context_id: u32,
    state: State,
}

impl<H: Host> Stream<H> {
    pub fn new(worker: Rc<Worker<H>>, context_id: u32) -> Stream<H> {
        Stream {
            worker,
            context_id,
            state: State::Untracked,
        }
    }

    pub fn on_request_headers(&mut self) -> Action {
        let worker = Rc::clone(&self.worker);
        let host = &worker.host;
        let Some(path) = host.get_http_request_header(":path") else {
            return Action::Continue;
        };
        let Some(ep) = worker
            .routes
            .find(&path, || host.get_http_request_header(":method"))
        else {
            if worker.dashboard.answer(host, &path) {
                return Action::Pause;
            }
            if path.split('?').next() == Some(STATS_PATH) {
                LocalReply::Stats(&worker.routes, worker.id).send(host);
                return Action::Pause;
            }
            return Action::Continue;
        };
        let route = &worker.routes.endpoints[ep];
        host.count(ep, Counter::Requests);
        // The capacity in force is in the record this reads anyway.
        match admission::acquire(host, &route.key, route.max_queue, worker.id) {
            Ok((acquired, wakeups)) => {
                worker.wake(&wakeups);
                match acquired {
                    Acquired::Admitted => {
                        host.count(ep, Counter::AdmittedAtOnce);
                        self.state = State::Holding(ep);
                        Action::Continue
                    }
                    Acquired::Queued { ticket } => {
                        let since_ns = host.now_ns();
                        let fate = worker.add_waiter(self.context_id, ep, ticket, since_ns);
                        self.state = State::Queued { ep, fate, since_ns };
                        // Resumed later by this worker's root context with
                        // exactly one of resume_http_request or a 504.
                        Action::Pause
                    }
                    Acquired::QueueFull => {
                        host.count(ep, Counter::QueueFull);
                        LocalReply::QueueFull(route).send(host);
                        Action::Pause
                    }
                    Acquired::Unhealthy => {
                        host.count(ep, Counter::Unhealthy);
                        LocalReply::Unhealthy(route).send(host);
                        Action::Pause
                    }
                }
            }
            Err(e) => {
                // Fail open: shared data trouble must not take the service down.
                host.count(ep, Counter::FailedOpen);
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
    pub fn on_response_headers(&mut self, end_of_stream: bool) -> Action {
        // Tell the client how long it queued: the number users tune
        // queue_timeout and capacity by.
        if let State::Queued { fate, since_ns, .. } = &self.state {
            if let Fate::Admitted(at_ns) = fate.get() {
                let waited_ms = at_ns.saturating_sub(*since_ns) / 1_000_000;
                self.worker
                    .host
                    .set_http_response_header("x-sluice-wait-ms", &waited_ms.to_string());
            }
        }
        if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    pub fn on_response_body(&mut self, end_of_stream: bool) -> Action {
        if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    pub fn on_response_trailers(&mut self) -> Action {
        self.finish();
        Action::Continue
    }

    /// Envoy's `on_log`: every stream ends here, normal or reset (client gone
    /// while queued or in flight); a second call finds nothing to release.
    pub fn on_end(&mut self) {
        self.finish();
    }

    /// Releases whatever the request holds, exactly once.
    fn finish(&mut self) {
        match std::mem::replace(&mut self.state, State::Untracked) {
            State::Untracked => {}
            State::Holding(ep) => self.worker.release(ep),
            State::Queued { ep, fate, .. } => match fate.get() {
                Fate::Admitted(_) => self.worker.release(ep),
                Fate::Answered => {}
                Fate::Waiting => self.worker.leave_queue(self.context_id, ep),
            },
        }
    }
}

impl Context for Stream<Envoy> {}

impl HttpContext for Stream<Envoy> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.on_request_headers()
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.on_response_headers(end_of_stream)
    }

    fn on_http_response_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        self.on_response_body(end_of_stream)
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        self.on_response_trailers()
    }

    fn on_log(&mut self) {
        self.on_end();
    }
}
