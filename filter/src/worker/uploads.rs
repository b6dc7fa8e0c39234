//! Request bodies still arriving after their request took a slot: a client
//! sending its body at a byte a second (slowloris) would hold backend
//! capacity for ever, and Envoy's `stream_idle_timeout` never fires while
//! each byte resets it. Each admitted request whose body has not ended is
//! watched until `max_upload_time` after its admission; then the filter
//! answers `408` and the slot goes back at once (the backend has only
//! been reading, never computing: it gets the reset).

use super::Worker;
use crate::host::Host;
use sluice_core::EndpointId;
use std::cell::RefCell;

#[derive(Default)]
pub struct Uploads {
    /// (context id, endpoint, deadline once admitted).
    pending: RefCell<Vec<(u32, EndpointId, Option<u64>)>>,
    /// Streams answered 408 here, whose slot goes back at once.
    timed_out: RefCell<Vec<u32>>,
}

impl Uploads {
    pub fn next_due(&self) -> Option<u64> {
        self.pending
            .borrow()
            .iter()
            .filter_map(|&(_, _, at)| at)
            .min()
    }
}

impl<H: Host> Worker<H> {
    /// Request `context_id` of `endpoint` has a body still to come; it is
    /// timed from `admitted_ns` (`None` while it waits in the queue).
    pub fn upload_pending(&self, context_id: u32, endpoint: EndpointId, admitted_ns: Option<u64>) {
        let limit = self.routes.route(endpoint).max_upload_time;
        if limit.is_zero() {
            return;
        }
        let deadline = admitted_ns.map(|at| at.saturating_add(limit.as_nanos() as u64));
        self.uploads
            .pending
            .borrow_mut()
            .push((context_id, endpoint, deadline));
        if deadline.is_some() {
            self.schedule(false);
        }
    }

    /// A queued request with a body still to come was resumed at `now_ns`.
    pub(super) fn upload_admitted(&self, context_id: u32, now_ns: u64) {
        let mut pending = self.uploads.pending.borrow_mut();
        if let Some(entry) = pending.iter_mut().find(|(c, _, _)| *c == context_id) {
            let limit = self.routes.route(entry.1).max_upload_time;
            entry.2 = Some(now_ns.saturating_add(limit.as_nanos() as u64));
        }
    }

    /// The body of `context_id` ended (or its stream did).
    pub fn upload_done(&self, context_id: u32) {
        self.uploads
            .pending
            .borrow_mut()
            .retain(|(c, _, _)| *c != context_id);
    }

    /// Whether `context_id` was answered 408 for its body (once).
    pub fn take_upload_timeout(&self, context_id: u32) -> bool {
        let mut timed_out = self.uploads.timed_out.borrow_mut();
        match timed_out.iter().position(|&c| c == context_id) {
            Some(i) => {
                timed_out.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Answers 408 to the admitted requests whose body is late.
    pub(super) fn expire_uploads(&self) {
        let now = self.host.now_ns();
        let late: Vec<(u32, EndpointId)> = {
            let mut pending = self.uploads.pending.borrow_mut();
            let (late, kept) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|&(_, _, at)| at.is_some_and(|at| at <= now));
            *pending = kept;
            late.into_iter().map(|(c, ep, _)| (c, ep)).collect()
        };
        for (context_id, ep) in late {
            let route = self.routes.route(ep);
            if self.host.set_effective_context(context_id).is_err() {
                continue;
            }
            self.uploads.timed_out.borrow_mut().push(context_id);
            let limit_ms = route.max_upload_time.as_millis() as u64;
            let body = serde_json::json!({
                "error": "request body not received in time",
                "reason": "upload-timeout",
                "endpoint": route.path,
                "max_upload_time_ms": limit_ms,
            })
            .to_string()
                + "\n";
            let headers = vec![
                ("content-type", "application/json"),
                ("x-sluice-reason", "upload-timeout"),
                ("connection", "close"),
            ];
            if let Err(e) = self.host.send_local_reply(
                408,
                None,
                crate::replies::details::UPLOAD_TIMEOUT,
                headers,
                body.as_bytes(),
            ) {
                log::warn!("cannot send the 408 reply: {e:?}");
            }
        }
    }
}
