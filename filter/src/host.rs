//! The hostcalls the filter makes, behind one trait, so the worker and stream
//! state machines run natively against a fake host in tests (the way
//! coraza-proxy-wasm runs its filter against `proxytest`).
//!
//! [`Envoy`] is the real host: a zero-sized type whose methods are the
//! `proxy_wasm::hostcalls` themselves, so generic code over [`Host`] compiles
//! to the same calls as before, with no `dyn` and no allocation of its own.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, MetricType, Status};
use sluice_core::shared_data::{SharedData, StoreError};
use std::time::{Duration, UNIX_EPOCH};

/// What the filter asks of Envoy besides the proxy-wasm callbacks. Shared
/// data is the core's [`SharedData`]: the host is the store.
///
/// "The current stream" is the one whose callback is running, or the one
/// named by the last [`Host::set_effective_context`] in a root callback.
pub trait Host: SharedData {
    /// Host time in ns since the epoch (0 if the host cannot say).
    fn now_ns(&self) -> u64;
    /// How often `on_tick` runs; zero stops it.
    fn set_tick_period(&self, period: Duration) -> Result<(), Status>;

    /// A wake-up queue this VM is notified of (`on_queue_ready`).
    fn register_shared_queue(&self, name: &str) -> Result<u32, Status>;
    /// Another VM's queue, `None` if nobody registered it.
    fn resolve_shared_queue(&self, vm_id: &str, name: &str) -> Result<Option<u32>, Status>;
    fn enqueue_shared_queue(&self, queue_id: u32, message: &[u8]) -> Result<(), Status>;
    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, Status>;

    /// Makes `context_id` the current stream, from a root callback. Fails
    /// with `BadArgument` when the stream is gone.
    fn set_effective_context(&self, context_id: u32) -> Result<(), Status>;
    /// Continues the current (paused) request.
    fn resume_http_request(&self) -> Result<(), Status>;
    /// Answers the current request locally; the upstream never sees it.
    /// `details` is what Envoy logs as `%RESPONSE_CODE_DETAILS%` (one word,
    /// e.g. `sluice_queue_timeout`), so Sluice's 504 is told apart from an
    /// upstream's. With `grpc_status`, for a gRPC request, Envoy answers
    /// trailers-only (HTTP 200, `grpc-status`, the body as `grpc-message`,
    /// `headers` alongside) instead of deriving the code from `status`
    /// (503 and 504 would both become `UNAVAILABLE`).
    fn send_local_reply(
        &self,
        status: u32,
        grpc_status: Option<u32>,
        details: &str,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), Status>;
    fn get_http_request_header(&self, name: &str) -> Option<String>;
    fn get_http_response_header(&self, name: &str) -> Option<String>;
    fn set_http_response_header(&self, name: &str, value: &str);
    /// Sets a request header (`None`: removes it), before the request goes
    /// upstream (the instance steering header).
    fn set_http_request_header(&self, name: &str, value: Option<&str>);
    /// A property of the current stream, e.g. `["response", "code_details"]`.
    fn get_property(&self, path: &[&str]) -> Option<Vec<u8>>;

    // Callouts, from a root context (the leader's). Their results arrive in
    // the root context's callbacks, which hand them to `leader`.

    /// Opens a gRPC stream. `grpc_service` is a serialized
    /// `envoy.config.core.v3.GrpcService` (never a bare cluster name).
    fn open_grpc_stream(
        &self,
        grpc_service: &[u8],
        service_name: &str,
        method: &str,
    ) -> Result<u32, Status>;
    fn send_grpc_stream_message(
        &self,
        token: u32,
        message: &[u8],
        end_stream: bool,
    ) -> Result<(), Status>;
    /// Resets the stream; no close callback follows.
    fn cancel_grpc_stream(&self, token: u32) -> Result<(), Status>;
    /// An HTTP request to `cluster`; `headers` include the pseudo-headers.
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        timeout: Duration,
    ) -> Result<u32, Status>;

    /// An Envoy stat (`wasmcustom.<name>`). The same name from every VM is
    /// one process-wide stat.
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status>;
    /// Adds to a counter or gauge (a gauge is a u64: below 0 wraps).
    fn increment_metric(&self, id: u32, offset: i64) -> Result<(), Status>;
    /// Sets a gauge, or adds a sample to a histogram.
    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status>;
    /// A counter's or gauge's value, the whole process's (a histogram has
    /// none: Envoy answers an error).
    fn get_metric(&self, id: u32) -> Result<u64, Status>;
}

/// The real host: Envoy's hostcalls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Envoy;

impl SharedData for Envoy {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), cas)) => Ok(Some((bytes, cas.unwrap_or(0)))),
            // A key Envoy "removed" still exists with an empty value.
            Ok((None, Some(cas))) => Ok(Some((Vec::new(), cas))),
            Ok((None, None)) => Ok(None),
            Err(s) => Err(StoreError::Host(format!("{s:?}"))),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), Some(cas)) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(s) => Err(StoreError::Host(format!("{s:?}"))),
        }
    }
}

impl Host for Envoy {
    fn now_ns(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        hostcalls::set_tick_period(period)
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, Status> {
        hostcalls::register_shared_queue(name)
    }

    fn resolve_shared_queue(&self, vm_id: &str, name: &str) -> Result<Option<u32>, Status> {
        hostcalls::resolve_shared_queue(vm_id, name)
    }

    fn enqueue_shared_queue(&self, queue_id: u32, message: &[u8]) -> Result<(), Status> {
        hostcalls::enqueue_shared_queue(queue_id, Some(message))
    }

    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, Status> {
        hostcalls::dequeue_shared_queue(queue_id)
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        hostcalls::set_effective_context(context_id)
    }

    fn resume_http_request(&self) -> Result<(), Status> {
        hostcalls::resume_http_request()
    }

    // The SDK's send_http_response passes no details nor gRPC status (and
    // panics on an error status): the hostcall itself, with them.
    fn send_local_reply(
        &self,
        status: u32,
        grpc_status: Option<u32>,
        details: &str,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), Status> {
        // -1: no gRPC status; for a gRPC request Envoy derives one from
        // `status`.
        let grpc_status = match grpc_status {
            None => -1,
            Some(code) => i32::try_from(code).map_err(|_| Status::BadArgument)?,
        };
        local_response(status, grpc_status, details, headers, body)
    }

    // The SDK's HttpContext methods unwrap these; so do we.
    fn get_http_request_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name).unwrap()
    }

    fn get_http_response_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpResponseHeaders, name).unwrap()
    }

    fn set_http_response_header(&self, name: &str, value: &str) {
        hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value)).unwrap()
    }

    fn set_http_request_header(&self, name: &str, value: Option<&str>) {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value).unwrap()
    }

    // Not the trait method, which panics on a serialization failure.
    fn get_property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn open_grpc_stream(
        &self,
        grpc_service: &[u8],
        service_name: &str,
        method: &str,
    ) -> Result<u32, Status> {
        // The SDK takes the first argument as `&str` but hands Envoy its
        // bytes, which Envoy parses as a GrpcService first. Short names
        // serialize to valid UTF-8 (lengths below 128 are single bytes).
        let upstream = std::str::from_utf8(grpc_service).map_err(|_| Status::BadArgument)?;
        hostcalls::open_grpc_stream(upstream, service_name, method, Vec::new())
    }

    // The hostcalls, not the trait wrappers, which panic on any error.
    fn send_grpc_stream_message(
        &self,
        token: u32,
        message: &[u8],
        end_stream: bool,
    ) -> Result<(), Status> {
        hostcalls::send_grpc_stream_message(token, Some(message), end_stream)
    }

    fn cancel_grpc_stream(&self, token: u32) -> Result<(), Status> {
        hostcalls::cancel_grpc_stream(token)
    }

    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        hostcalls::dispatch_http_call(cluster, headers, None, Vec::new(), timeout)
    }

    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        hostcalls::define_metric(kind, name)
    }

    fn increment_metric(&self, id: u32, offset: i64) -> Result<(), Status> {
        hostcalls::increment_metric(id, offset)
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        hostcalls::record_metric(id, value)
    }

    fn get_metric(&self, id: u32) -> Result<u64, Status> {
        hostcalls::get_metric(id)
    }
}

/// The local-reply hostcall. Envoy takes a `grpc_status` from 0 to 16 as
/// the code of a gRPC request's reply, anything else as none
/// (`Context::sendLocalResponse` in Envoy's wasm extension).
fn local_response(
    status: u32,
    grpc_status: i32,
    details: &str,
    headers: Vec<(&str, &str)>,
    body: &[u8],
) -> Result<(), Status> {
    let headers = serialize_headers(&headers);
    // SAFETY: every pointer is to a live buffer of the length passed;
    // the host copies them before returning.
    let status = unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            grpc_status,
        )
    };
    match status {
        Status::Ok => Ok(()),
        other => Err(other),
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    // The ABI's local reply (proxy-wasm ABI 0.2.1), as the SDK declares it.
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
}

/// A header map as the proxy-wasm ABI passes it: the number of pairs, each
/// pair's key and value lengths (u32, little-endian), then each key and
/// value followed by a NUL (the SDK's private `serialize_map`).
fn serialize_headers(headers: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 10)
        .sum::<usize>();
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        bytes.extend_from_slice(&(k.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        bytes.extend_from_slice(k.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(v.as_bytes());
        bytes.push(0);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::serialize_headers;

    #[test]
    fn headers_serialize_as_the_abi_reads_them() {
        let bytes = serialize_headers(&[("a", "bc"), ("de", "")]);
        let mut want = vec![2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"a\0bc\0de\0\0");
        assert_eq!(bytes, want);
    }
}
