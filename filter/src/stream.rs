//! One request (an HTTP context): admitted, queued or answered on arrival,
//! and whatever it holds released exactly once at its end.

use crate::admin;
use crate::host::{Envoy, Host};
use crate::metrics::Counter;
use crate::path::request_path;
use crate::replies::LocalReply;
use crate::routes::{Route, Routes};
use crate::worker::{Waiting, Worker};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use sluice_core::admission::Pin;
use sluice_core::config::{CostSource, Sticky, DEFAULT_INSTANCE_HEADER};
use sluice_core::holding::{self, Arrival, Slot, Ticket};
use std::net::SocketAddr;
use std::rc::Rc;

/// Where one request stands, and who owns what it holds.
enum State {
    /// Not a watched endpoint (or already finished): holds nothing.
    Untracked,
    /// This stream owns the slot: admitted at once (timed if one of the
    /// requests [`Worker::time_next`] picks), or taken from the worker after
    /// a resume.
    Holding(Slot),
    /// Paused at `since_ns`. The worker owns its ticket, then the slot it
    /// was resumed with ([`Worker::take_resumed`]), or nothing once it was
    /// answered.
    Parked { since_ns: u64 },
}

/// How a request that holds a slot ended.
#[derive(Clone, Copy)]
enum End {
    /// Its whole response went through: the backend is done.
    Complete,
    /// Before the end of the backend's response (client gone before or
    /// during it, or Envoy answered for it): the backend may still be
    /// computing, or still generating a streamed response.
    Abandoned,
    /// Envoy could not get a response started from the instance (connection
    /// refused, reset): it never ran the request, and is ejected.
    Failed,
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

    #[cfg(test)]
    pub fn on_request_headers(&mut self) -> Action {
        self.on_request_headers_with(true)
    }

    /// `end_of_stream`: the request has no body still to come.
    pub fn on_request_headers_with(&mut self, end_of_stream: bool) -> Action {
        let worker = Rc::clone(&self.worker);
        let host = &worker.host;
        let Some(raw_path) = host.get_http_request_header(":path") else {
            return Action::Continue;
        };
        let path = request_path(&raw_path);
        if admin::answer(
            host,
            &worker.dashboard,
            &worker.routes,
            &worker.metrics,
            worker.taken_id(),
            &path,
        ) {
            return Action::Pause;
        }
        let Some(ep) = worker
            .routes
            .find_path(&path, || host.get_http_request_header(":method"))
        else {
            return Action::Continue;
        };
        let route = worker.routes.route(ep);
        // A websocket lives as long as its client likes, mostly idle: with
        // `count_upgrades: false` it does not take a slot at all. Only a GET
        // can be upgraded (HTTP/2's extended CONNECT reaches filters as one):
        // a POST with an `Upgrade` header is served as a plain request, so it
        // counts like one.
        if !route.count_upgrades
            && host.get_http_request_header("upgrade").is_some()
            && host.get_http_request_header(":method").as_deref() == Some("GET")
        {
            return Action::Continue;
        }
        let mut class = worker
            .routes
            .class_of(route, |name| host.get_http_request_header(name));
        let class_index = class.index;
        let count = |counter| worker.metrics.count(ep, class_index, counter);
        count(Counter::Requests);
        let Some(worker_id) = worker.id() else {
            // Fail open: without an index nobody could wake this request.
            return Action::Continue;
        };
        let steering = worker.routes.steering.as_ref();
        // Time only matters to instances (ejection back-offs) and shares
        // (leases): no hostcall without them.
        let now = if worker.routes.needs_clock() {
            host.now_ns()
        } else {
            0
        };
        let pin = steering
            .and_then(|s| s.sticky.as_ref())
            .and_then(|sticky| session_pin(host, sticky));
        // Only an endpoint with `cost` reads its cost header or length.
        if let Some(cost) = &route.cost {
            let (units, source) =
                cost.of(|name| host.get_http_request_header(name), !end_of_stream);
            if source == CostSource::BadHeader {
                log::debug!(
                    "{}: the cost header is not a positive integer; the request costs {units}",
                    route.path
                );
            }
            class.cost = units;
            class.over_capacity = cost.over_capacity;
        }
        // The capacity in force is in the record this reads anyway.
        match holding::acquire_as(
            host,
            &route.key,
            ep,
            route.max_queue,
            worker_id,
            pin,
            class,
            now,
        ) {
            Ok((arrival, wakeups)) => {
                if !wakeups.is_empty() {
                    worker.in_stream(self.context_id, || worker.wake(&wakeups));
                }
                match arrival {
                    Arrival::Admitted(slot) => {
                        steer(&worker, slot.instance());
                        count(Counter::AdmittedAtOnce);
                        let admitted_ns = worker.time_next(ep).then(|| host.now_ns());
                        if !end_of_stream {
                            let now = admitted_ns.unwrap_or_else(|| host.now_ns());
                            worker.upload_pending(self.context_id, ep, Some(now));
                        }
                        self.state = State::Holding(slot.timed(admitted_ns));
                        Action::Continue
                    }
                    Arrival::Queued(ticket, backlog) => {
                        let since_ns = arrived_ns(host);
                        let expires_ns = deadline_ns(host, &worker.routes, since_ns);
                        if let Some(at) = expires_ns.filter(|_| worker.routes.refuse_unreachable) {
                            let left = at.saturating_sub(host.now_ns());
                            if worker.least_wait_ns(ep, backlog).is_some_and(|w| w > left) {
                                return self.leave_queue_unreachable(ticket, class.index);
                            }
                        }
                        let bytes = match queue_bytes(host, route, end_of_stream) {
                            Ok(bytes) => bytes,
                            Err(QueueBytesFull) => {
                                return self.leave_full_queue(ticket, class.index);
                            }
                        };
                        let waiting = Waiting {
                            since_ns,
                            bytes,
                            expires_ns,
                            class: class.index,
                        };
                        worker.add_waiter(self.context_id, ticket, waiting);
                        if !end_of_stream {
                            worker.upload_pending(self.context_id, ep, None);
                        }
                        self.state = State::Parked { since_ns };
                        // Resumed later by this worker's root context with
                        // exactly one of resume_http_request or a 504.
                        Action::Pause
                    }
                    Arrival::QueueFull(backlog) => {
                        count(Counter::QueueFull);
                        LocalReply::QueueFull(route)
                            .send_with_retry(host, worker.retry_after_ms(ep, backlog));
                        Action::Pause
                    }
                    Arrival::Shed(backlog) => {
                        count(Counter::Shed);
                        LocalReply::Shed(route)
                            .send_with_retry(host, worker.retry_after_ms(ep, backlog));
                        Action::Pause
                    }
                    Arrival::Unhealthy => {
                        count(Counter::Unhealthy);
                        LocalReply::Unhealthy(route).send(host);
                        Action::Pause
                    }
                    Arrival::TooCostly(capacity) => {
                        count(Counter::TooCostly);
                        LocalReply::TooCostly(route, class.cost, capacity).send(host);
                        Action::Pause
                    }
                }
            }
            Err(e) => {
                // Fail open: shared data trouble must not take the service down.
                steer(&worker, None);
                count(Counter::FailedOpen);
                log::warn!(
                    "acquire on {}: {e}; letting the request through",
                    route.path
                );
                Action::Continue
            }
        }
    }

    /// The request's own deadline comes before the soonest it could get a
    /// slot: it gives its ticket back and is answered `deadline` at once
    /// rather than at its deadline, unless a slot was granted to the ticket
    /// in the meantime.
    fn leave_queue_unreachable(&mut self, ticket: Ticket, class: u8) -> Action {
        self.give_back(ticket, class, Some(Counter::Deadline), |route| {
            LocalReply::Deadline(route)
        })
    }

    /// The queue has no room for this request's body (`max_queued_bytes`):
    /// it gives its ticket back and gets `503 queue-full`, unless a slot was
    /// granted to the ticket in the meantime.
    fn leave_full_queue(&mut self, ticket: Ticket, class: u8) -> Action {
        self.give_back(ticket, class, None, |route| LocalReply::QueueFull(route))
    }

    /// Leaves the queue at once, answered with `reply` (and counted as
    /// `outcome` of `class`), or goes ahead with the slot granted to the ticket
    /// meanwhile.
    fn give_back(
        &mut self,
        ticket: Ticket,
        class: u8,
        outcome: Option<Counter>,
        reply: impl for<'r> FnOnce(&'r Route) -> LocalReply<'r>,
    ) -> Action {
        let worker = Rc::clone(&self.worker);
        let host = &worker.host;
        let ep = ticket.endpoint();
        let route = worker.routes.route(ep);
        match ticket.withdraw(host, &route.key) {
            Ok(Some(slot)) => {
                steer(&worker, slot.instance());
                self.state = State::Holding(slot.timed(Some(host.now_ns())));
                Action::Continue
            }
            Ok(None) => {
                if let Some(c) = outcome {
                    worker.metrics.count(ep, class, c);
                }
                reply(route).send(host);
                Action::Pause
            }
            Err(e) => {
                // Fail open, as for acquire: let it through unaccounted.
                log::warn!(
                    "withdraw on {}: {e}; letting the request through",
                    route.path
                );
                Action::Continue
            }
        }
    }

    // The slot is released as soon as the upstream response is complete,
    // before the client has read it: a client that reads slowly holds its
    // slot only while Envoy's buffers fill (see docs/filter.md).
    pub fn on_response_headers(&mut self, end_of_stream: bool) -> Action {
        if matches!(self.state, State::Untracked) {
            return Action::Continue;
        }
        // A resumed request takes its slot from the worker, and tells the
        // client how long it queued: the number users tune queue_timeout
        // and capacity by.
        if let State::Parked { since_ns } = self.state {
            if let Some(slot) = self.worker.take_resumed(self.context_id) {
                let at_ns = slot.admitted_ns().unwrap_or(since_ns);
                let waited_ms = at_ns.saturating_sub(since_ns) / 1_000_000;
                self.worker
                    .host
                    .set_http_response_header("x-sluice-wait-ms", &waited_ms.to_string());
                self.state = State::Holding(slot);
            }
        }
        if let State::Holding(slot) = &mut self.state {
            if slot.instance().is_some() {
                self.worker.check_pick(slot);
            }
        }
        if self.instance_failed() {
            self.finish(End::Failed);
            return Action::Continue;
        }
        if self.answered_for_the_backend() {
            // Envoy gave up on the backend (route timeout, idle timeout),
            // which goes on computing.
            self.finish(End::Abandoned);
            return Action::Continue;
        }
        if end_of_stream {
            self.finish(End::Complete);
        }
        Action::Continue
    }

    /// Whether this response is Envoy's 503 for an instance it could not get
    /// a response from (refused or reset): only asked of a request counted
    /// on an instance, and only about a 503.
    fn instance_failed(&self) -> bool {
        let State::Holding(slot) = &self.state else {
            return false;
        };
        if slot.instance().is_none() {
            return false;
        }
        let host = &self.worker.host;
        host.get_http_response_header(":status").as_deref() == Some("503")
            && host
                .get_property(&["response", "code_details"])
                .is_some_and(|d| d.starts_with(b"upstream_reset_before_response_started"))
    }

    /// Whether this response is Envoy's own timeout reply rather than the
    /// backend's. Only timeouts are asked about, so the common response
    /// costs one header lookup.
    fn answered_for_the_backend(&self) -> bool {
        let host = &self.worker.host;
        match host.get_http_response_header(":status").as_deref() {
            Some("504" | "408") => {}
            _ => return false,
        }
        host.get_property(&["response", "code_details"])
            .is_some_and(|details| details != b"via_upstream")
    }

    /// The request body: once it has all arrived, its upload is no longer
    /// timed (`max_upload_time`).
    pub fn on_request_body(&mut self, end_of_stream: bool) -> Action {
        if end_of_stream && !matches!(self.state, State::Untracked) {
            self.worker.upload_done(self.context_id);
        }
        Action::Continue
    }

    pub fn on_response_body(&mut self, end_of_stream: bool) -> Action {
        if end_of_stream {
            self.finish(End::Complete);
        }
        Action::Continue
    }

    pub fn on_response_trailers(&mut self) -> Action {
        self.finish(End::Complete);
        Action::Continue
    }

    /// Envoy's `on_log`: every stream ends here, normal or reset (client gone
    /// while queued or in flight); a second call finds nothing to release.
    /// A slot still held here lost its client before the end of the
    /// response: a backend streaming tokens goes on generating after the
    /// client leaves (its headers say nothing about its work being done),
    /// so the slot is held like that of any abandoned request.
    pub fn on_end(&mut self) {
        self.finish(End::Abandoned);
        self.worker.upload_done(self.context_id);
    }

    /// Releases (or holds, if abandoned) whatever the request holds, exactly
    /// once.
    fn finish(&mut self, how: End) {
        let worker = &self.worker;
        let slot = match std::mem::replace(&mut self.state, State::Untracked) {
            State::Untracked => return,
            State::Holding(slot) => slot,
            State::Parked { .. } => match worker.take_resumed(self.context_id) {
                Some(slot) => slot,
                // Still waiting (it leaves the queue), or answered (nothing).
                None => {
                    return worker
                        .in_stream(self.context_id, || worker.leave_queue(self.context_id));
                }
            },
        };
        // A release may hand the slot to a waiter of this worker, which it
        // resumes at once.
        worker.in_stream(self.context_id, || match how {
            End::Complete => worker.complete(slot),
            End::Failed => worker.fail(slot),
            // Answered 408 for a late body: the backend was only reading.
            End::Abandoned if worker.take_upload_timeout(self.context_id) => worker.release(slot),
            // An untimed request admitted at once was admitted when it
            // arrived, give or take its worker's delay; if Envoy cannot
            // say, now, which holds the slot longest.
            End::Abandoned => {
                let host = &worker.host;
                let admitted_ns = slot
                    .admitted_ns()
                    .or_else(|| request_time_ns(host))
                    .unwrap_or_else(|| host.now_ns());
                worker.abandon(slot, admitted_ns)
            }
        });
    }
}

/// Steers the current request to the instance its slot is on: sets the
/// header Envoy's `override_host` policy reads, or, with instances but
/// none picked (failing open), removes one the client sent, so that no
/// client chooses an instance itself.
pub fn steer<H: Host>(worker: &Worker<H>, on: Option<SocketAddr>) {
    let header = worker
        .routes
        .steering
        .as_ref()
        .map_or(DEFAULT_INSTANCE_HEADER, |s| s.header.as_str());
    match on {
        Some(a) => worker
            .host
            .set_http_request_header(header, Some(&a.to_string())),
        None if worker.routes.steering.is_some() => {
            worker.host.set_http_request_header(header, None)
        }
        None => {}
    }
}

/// The session a sticky request belongs to: its sticky header's value, or
/// its cookie's; `None` without one (picked like any other).
fn session_pin<H: Host>(host: &H, sticky: &Sticky) -> Option<Pin> {
    match sticky {
        Sticky::Header(name) => host
            .get_http_request_header(name)
            .filter(|v| !v.is_empty())
            .map(|v| Pin::of(v.as_bytes())),
        Sticky::Cookie(name) => {
            let cookies = host.get_http_request_header("cookie")?;
            cookie(&cookies, name).map(|v| Pin::of(v.as_bytes()))
        }
    }
}

/// The value of cookie `name` in a `cookie` header, if set and not empty.
fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
        .filter(|v| !v.is_empty())
}

/// When the request reached Envoy (`request.time`: its first byte), which
/// its queue timeout counts from, as the access log's `%DURATION%` does: a
/// busy worker may see the headers of a burst's last request a while after
/// they arrived. Now, if Envoy cannot say; never more than a second back.
fn arrived_ns<H: Host>(host: &H) -> u64 {
    let now = host.now_ns();
    match request_time_ns(host) {
        Some(ns) => ns.clamp(now.saturating_sub(1_000_000_000), now),
        None => now,
    }
}

/// Envoy's `request.time` (8-byte little-endian unix ns), if it has one.
fn request_time_ns<H: Host>(host: &H) -> Option<u64> {
    host.get_property(&["request", "time"])
        .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
        .map(i64::from_le_bytes)
        .and_then(|ns| u64::try_from(ns).ok())
}

/// The request's own deadline, if it has one, for a request that arrived at
/// `since_ns`: the earliest of its `grpc-timeout` (gRPC and gRPC-Web only),
/// Envoy's `x-envoy-expected-rq-timeout-ms` (set by an Envoy in front that
/// has a route timeout) and the configured `deadline_header`
/// (milliseconds). Looked up only for a request that queues.
fn deadline_ns<H: Host>(host: &H, routes: &Routes, since_ns: u64) -> Option<u64> {
    let grpc = host
        .get_http_request_header("content-type")
        .is_some_and(|t| t.starts_with("application/grpc"))
        .then(|| host.get_http_request_header("grpc-timeout"))
        .flatten()
        .and_then(|t| sluice_core::deadline::grpc_timeout_ns(&t));
    let millis = |name: &str| {
        host.get_http_request_header(name)
            .and_then(|v| sluice_core::deadline::millis_ns(&v))
    };
    let expected = millis("x-envoy-expected-rq-timeout-ms");
    let configured = routes.deadline_header.as_deref().and_then(millis);
    [grpc, expected, configured]
        .into_iter()
        .flatten()
        .min()
        .map(|timeout| since_ns.saturating_add(timeout))
}

/// `max_queued_bytes` would be passed by this request's body.
struct QueueBytesFull;

/// What a body of unknown length (chunked, no `content-length`) counts in
/// `max_queued_bytes` while it waits: the most Envoy buffers for a paused
/// request by default (`per_connection_buffer_limit_bytes`, 1 MiB). Envoy
/// tells the filter nothing of a paused request's body while it arrives, so
/// what is really buffered cannot be counted; this is its bound.
pub const UNKNOWN_BODY_BYTES: u64 = 1 << 20;

/// Counts a request that is about to queue in its endpoint's queued bytes:
/// its `content-length`, or [`UNKNOWN_BODY_BYTES`] for a body of unknown
/// length still to come; the bytes it added (0 without the setting or a
/// body). Fails open on shared-data trouble.
fn queue_bytes<H: Host>(
    host: &H,
    route: &Route,
    end_of_stream: bool,
) -> Result<u64, QueueBytesFull> {
    let Some((cap, key)) = &route.queued_bytes else {
        return Ok(0);
    };
    let n = match host
        .get_http_request_header("content-length")
        .map(|v| v.trim().parse::<u64>().ok())
    {
        Some(Some(n)) => n,
        Some(None) => return Ok(0),
        None if end_of_stream => return Ok(0),
        None => UNKNOWN_BODY_BYTES,
    };
    if n == 0 {
        return Ok(0);
    }
    match sluice_core::queued_bytes::try_add(host, key, n, *cap) {
        Ok(true) => Ok(n),
        Ok(false) => Err(QueueBytesFull),
        Err(e) => {
            log::warn!("queued bytes of {}: {e}; not counted", route.path);
            Ok(0)
        }
    }
}

impl Context for Stream<Envoy> {}

impl HttpContext for Stream<Envoy> {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.on_request_headers_with(end_of_stream)
    }

    fn on_http_request_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
        self.on_request_body(end_of_stream)
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
