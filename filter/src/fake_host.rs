//! An in-process Envoy for the filter's native tests, in the spirit of
//! coraza-proxy-wasm's `proxytest`: the whole filter (root, worker, streams)
//! runs against it in plain `cargo test`.
//!
//! [`FakeEnvoy`] is the process: shared data (the core's [`MemSharedData`],
//! with Envoy's CAS rules), shared queues and a clock that only moves when a
//! test says so. [`FakeWorker`] is one worker thread's VM: its root context
//! and a [`FakeHost`] that records what each stream was told (resumes,
//! local replies, response headers) and fails like Envoy does: a gone stream
//! refuses `set_effective_context`. It panics on what crashes or confuses
//! Envoy: resuming a request that is not paused, or twice, or answering it
//! after that.

use crate::host::Host;
use crate::root::Root;
use crate::stream::Stream;
use proxy_wasm::types::{Action, MetricType, Status};
use sluice_core::admission::{self, EndpointState};
use sluice_core::shared_data::{MemSharedData, SharedData, StoreError};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

/// The context id of every fake VM's root context.
const ROOT_CONTEXT: u32 = 1;

/// What every worker of one Envoy process shares.
pub struct FakeEnvoy {
    pub store: MemSharedData,
    clock_ns: AtomicU64,
    queues: Mutex<Queues>,
    /// Callout tokens are unique in the process.
    next_token: AtomicU64,
    metrics: Mutex<Metrics>,
}

/// Envoy's stats as wasm sees them: one per name for the whole process.
#[derive(Default)]
struct Metrics {
    ids: HashMap<String, u32>,
    /// By id - 1.
    all: Vec<Metric>,
}

struct Metric {
    name: String,
    kind: MetricType,
    value: u64,
    /// A histogram's samples.
    samples: Vec<u64>,
}

impl Metrics {
    fn get(&mut self, id: u32) -> &mut Metric {
        let i = id.checked_sub(1).expect("metric id 0 is never handed out");
        self.all.get_mut(i as usize).expect("defined metric id")
    }
}

#[derive(Default)]
struct Queues {
    /// (vm_id, name) -> queue id.
    ids: HashMap<(String, String), u32>,
    messages: HashMap<u32, VecDeque<Vec<u8>>>,
}

impl FakeEnvoy {
    pub fn new() -> Arc<FakeEnvoy> {
        Arc::new(FakeEnvoy {
            store: MemSharedData::new(),
            // Any start will do; not zero, which the filter reads as "no clock".
            clock_ns: AtomicU64::new(1_700_000_000_000_000_000),
            queues: Mutex::new(Queues::default()),
            next_token: AtomicU64::new(1),
            metrics: Mutex::new(Metrics::default()),
        })
    }

    pub fn advance(&self, by: Duration) {
        self.clock_ns
            .fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    /// The decoded admission record of `key`.
    pub fn record(&self, key: &str) -> EndpointState {
        admission::snapshot(&self.store, key).expect("record decodes")
    }

    /// Panics unless the record is back to neutral: no slot in use, nobody
    /// waiting (granted or not).
    pub fn assert_neutral(&self, key: &str) {
        let r = self.record(key);
        assert_eq!(
            (r.active, r.waiters.as_slice()),
            (0, &[][..]),
            "{key}: {r:?}"
        );
    }

    /// A counter's or gauge's value by name (without `wasmcustom.`); panics
    /// if nobody defined it.
    pub fn metric(&self, name: &str) -> u64 {
        let mut m = self.metrics.lock().unwrap();
        let id = *m
            .ids
            .get(name)
            .unwrap_or_else(|| panic!("no metric {name}"));
        m.get(id).value
    }

    /// Whether anyone defined a metric of this name.
    pub fn has_metric(&self, name: &str) -> bool {
        self.metrics.lock().unwrap().ids.contains_key(name)
    }

    /// A histogram's samples by name.
    pub fn samples(&self, name: &str) -> Vec<u64> {
        let mut m = self.metrics.lock().unwrap();
        let id = *m
            .ids
            .get(name)
            .unwrap_or_else(|| panic!("no metric {name}"));
        m.get(id).samples.clone()
    }

    fn has_messages(&self, queue_id: u32) -> bool {
        let q = self.queues.lock().unwrap();
        q.messages.get(&queue_id).is_some_and(|m| !m.is_empty())
    }
}

/// A local reply as the client would get it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u32,
    /// The gRPC status code it was sent with (`send_local_reply`'s `grpc_status`).
    pub grpc_status: Option<u32>,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{} body is not JSON ({e}): {}", self.status, self.body))
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One stream as the host sees it.
#[derive(Debug, Default)]
struct StreamRecord {
    request_headers: Vec<(String, String)>,
    response_headers: Vec<(String, String)>,
    /// Returned `Pause` from its request headers and not continued since.
    paused: bool,
    resumes: u32,
    replies: Vec<Reply>,
    /// Envoy has deleted the context.
    gone: bool,
    /// `resume_http_request` fails for it.
    fail_resume: bool,
    /// The response's `:status` and `response.code_details`, as Envoy
    /// reports them (`None`: a 200 from the backend).
    status: Option<u32>,
    code_details: Option<String>,
    /// Host time (ns) its first byte reached Envoy (`request.time`).
    arrived_ns: u64,
    /// The host that served it, as `upstream.address` reports it.
    upstream_address: Option<String>,
}

/// A gRPC stream a VM opened.
#[derive(Debug, Clone)]
pub struct GrpcStream {
    pub token: u32,
    /// The serialized GrpcService it was opened with.
    pub grpc_service: Vec<u8>,
    pub service_name: String,
    pub method: String,
    /// Messages sent, and whether the last one ended the stream.
    pub sent: Vec<Vec<u8>>,
    pub end_stream: bool,
    pub cancelled: bool,
}

/// An HTTP callout a VM dispatched.
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// One worker VM's view of the host. Cheap to clone: the root context and
/// the worker hold the same one.
#[derive(Clone)]
pub struct FakeHost(Rc<HostState>);

struct HostState {
    envoy: Arc<FakeEnvoy>,
    vm_id: String,
    /// The stream whose callback runs, or `ROOT_CONTEXT`.
    current: Cell<u32>,
    streams: RefCell<HashMap<u32, StreamRecord>>,
    tick_period: Cell<Duration>,
    /// Every hostcall this VM made, by name, in order (see
    /// [`FakeHost::take_calls`]).
    calls: RefCell<Vec<&'static str>>,
    /// Queues this VM registered (it is notified of them).
    queues: RefCell<Vec<u32>>,
    grpc: RefCell<Vec<GrpcStream>>,
    http_calls: RefCell<Vec<HttpCall>>,
    /// `open_grpc_stream` fails (the cluster does not exist).
    fail_grpc_open: Cell<bool>,
}

impl FakeHost {
    /// A local reply, as `send_local_reply` makes it (it counts as
    /// `send_http_response`, the SDK's name).
    fn record_reply(
        &self,
        status: u32,
        grpc_status: Option<u32>,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), Status> {
        self.called("send_http_response");
        self.with_current(|id, s| {
            assert!(
                s.resumes == 0 && s.replies.is_empty(),
                "stream {id} answered after it was resumed or answered: {s:?}"
            );
            s.replies.push(Reply {
                status,
                grpc_status,
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: String::from_utf8(body.to_vec()).expect("UTF-8 body"),
            });
            Ok(())
        })
    }

    fn new(envoy: &Arc<FakeEnvoy>, vm_id: &str) -> FakeHost {
        FakeHost(Rc::new(HostState {
            envoy: Arc::clone(envoy),
            vm_id: vm_id.to_string(),
            current: Cell::new(ROOT_CONTEXT),
            streams: RefCell::new(HashMap::new()),
            tick_period: Cell::new(Duration::ZERO),
            queues: RefCell::new(Vec::new()),
            calls: RefCell::new(Vec::new()),
            grpc: RefCell::new(Vec::new()),
            http_calls: RefCell::new(Vec::new()),
            fail_grpc_open: Cell::new(false),
        }))
    }

    fn token(&self) -> u32 {
        self.0.envoy.next_token.fetch_add(1, Ordering::SeqCst) as u32
    }

    fn assert_root(&self, what: &str) {
        assert_eq!(
            self.0.current.get(),
            ROOT_CONTEXT,
            "{what} from a stream context"
        );
    }

    fn called(&self, name: &'static str) {
        self.0.calls.borrow_mut().push(name);
    }

    /// The hostcalls this VM made since the last call of this, in order.
    pub fn take_calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.0.calls.borrow_mut())
    }

    pub fn tick_period(&self) -> Duration {
        self.0.tick_period.get()
    }

    fn with_current<R>(&self, f: impl FnOnce(u32, &mut StreamRecord) -> R) -> R {
        let id = self.0.current.get();
        assert_ne!(id, ROOT_CONTEXT, "a stream hostcall from a root context");
        let mut streams = self.0.streams.borrow_mut();
        let s = streams.get_mut(&id).expect("current stream exists");
        assert!(!s.gone, "hostcall on deleted stream {id}");
        f(id, s)
    }

    fn stream<R>(&self, id: u32, f: impl FnOnce(&mut StreamRecord) -> R) -> R {
        f(self
            .0
            .streams
            .borrow_mut()
            .get_mut(&id)
            .expect("known stream"))
    }
}

impl SharedData for FakeHost {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.called("get");
        self.0.envoy.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.called("set");
        self.0.envoy.store.set(key, value, cas)
    }
}

impl Host for FakeHost {
    fn now_ns(&self) -> u64 {
        self.called("now_ns");
        self.0.envoy.clock_ns.load(Ordering::SeqCst)
    }

    fn set_tick_period(&self, period: Duration) -> Result<(), Status> {
        self.called("set_tick_period");
        self.0.tick_period.set(period);
        Ok(())
    }

    fn register_shared_queue(&self, name: &str) -> Result<u32, Status> {
        self.called("register_shared_queue");
        let mut q = self.0.envoy.queues.lock().unwrap();
        let next = q.ids.len() as u32 + 1;
        let id = *q
            .ids
            .entry((self.0.vm_id.clone(), name.to_string()))
            .or_insert(next);
        q.messages.entry(id).or_default();
        self.0.queues.borrow_mut().push(id);
        Ok(id)
    }

    fn resolve_shared_queue(&self, vm_id: &str, name: &str) -> Result<Option<u32>, Status> {
        self.called("resolve_shared_queue");
        let q = self.0.envoy.queues.lock().unwrap();
        Ok(q.ids.get(&(vm_id.to_string(), name.to_string())).copied())
    }

    fn enqueue_shared_queue(&self, queue_id: u32, message: &[u8]) -> Result<(), Status> {
        self.called("enqueue_shared_queue");
        let mut q = self.0.envoy.queues.lock().unwrap();
        let queue = q.messages.get_mut(&queue_id).ok_or(Status::NotFound)?;
        queue.push_back(message.to_vec());
        Ok(())
    }

    fn dequeue_shared_queue(&self, queue_id: u32) -> Result<Option<Vec<u8>>, Status> {
        self.called("dequeue_shared_queue");
        let mut q = self.0.envoy.queues.lock().unwrap();
        let queue = q.messages.get_mut(&queue_id).ok_or(Status::NotFound)?;
        Ok(queue.pop_front())
    }

    fn set_effective_context(&self, context_id: u32) -> Result<(), Status> {
        self.called("set_effective_context");
        let streams = self.0.streams.borrow();
        match streams.get(&context_id) {
            Some(s) if !s.gone => {
                self.0.current.set(context_id);
                Ok(())
            }
            _ => Err(Status::BadArgument),
        }
    }

    fn resume_http_request(&self) -> Result<(), Status> {
        self.called("resume_http_request");
        self.with_current(|id, s| {
            assert!(
                s.paused && s.replies.is_empty(),
                "stream {id} resumed while not paused: {s:?}"
            );
            if s.fail_resume {
                return Err(Status::InternalFailure);
            }
            s.paused = false;
            s.resumes += 1;
            Ok(())
        })
    }

    fn send_local_reply(
        &self,
        status: u32,
        grpc_status: Option<u32>,
        _details: &str,
        headers: Vec<(&str, &str)>,
        body: &[u8],
    ) -> Result<(), Status> {
        self.record_reply(status, grpc_status, headers, body)
    }

    fn get_http_request_header(&self, name: &str) -> Option<String> {
        self.called("get_http_request_header");
        self.with_current(|_, s| header(&s.request_headers, name).map(str::to_string))
    }

    fn get_http_response_header(&self, name: &str) -> Option<String> {
        self.called("get_http_response_header");
        self.with_current(|_, s| {
            if name == ":status" {
                return Some(s.status.unwrap_or(200).to_string());
            }
            header(&s.response_headers, name).map(str::to_string)
        })
    }

    fn get_property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.called("get_property");
        self.with_current(|_, s| match path {
            ["request", "time"] => Some(s.arrived_ns.to_le_bytes().to_vec()),
            ["upstream", "address"] => s.upstream_address.clone().map(String::into_bytes),
            ["response", "code_details"] => Some(
                s.code_details
                    .clone()
                    .unwrap_or_else(|| "via_upstream".into())
                    .into_bytes(),
            ),
            _ => None,
        })
    }

    fn set_http_request_header(&self, name: &str, value: Option<&str>) {
        self.called("set_http_request_header");
        self.with_current(|_, s| {
            s.request_headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            if let Some(v) = value {
                s.request_headers.push((name.to_string(), v.to_string()));
            }
        })
    }

    fn set_http_response_header(&self, name: &str, value: &str) {
        self.called("set_http_response_header");
        self.with_current(|_, s| {
            s.response_headers
                .retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            s.response_headers
                .push((name.to_string(), value.to_string()));
        })
    }

    fn open_grpc_stream(
        &self,
        grpc_service: &[u8],
        service_name: &str,
        method: &str,
    ) -> Result<u32, Status> {
        self.called("open_grpc_stream");
        self.assert_root("open_grpc_stream");
        if self.0.fail_grpc_open.get() {
            return Err(Status::InternalFailure);
        }
        let token = self.token();
        self.0.grpc.borrow_mut().push(GrpcStream {
            token,
            grpc_service: grpc_service.to_vec(),
            service_name: service_name.to_string(),
            method: method.to_string(),
            sent: Vec::new(),
            end_stream: false,
            cancelled: false,
        });
        Ok(token)
    }

    fn send_grpc_stream_message(
        &self,
        token: u32,
        message: &[u8],
        end_stream: bool,
    ) -> Result<(), Status> {
        self.called("send_grpc_stream_message");
        let mut grpc = self.0.grpc.borrow_mut();
        let s = grpc
            .iter_mut()
            .find(|s| s.token == token && !s.cancelled)
            .ok_or(Status::NotFound)?;
        assert!(!s.end_stream, "message after end of stream");
        s.sent.push(message.to_vec());
        s.end_stream = end_stream;
        Ok(())
    }

    fn cancel_grpc_stream(&self, token: u32) -> Result<(), Status> {
        self.called("cancel_grpc_stream");
        let mut grpc = self.0.grpc.borrow_mut();
        let s = grpc
            .iter_mut()
            .find(|s| s.token == token && !s.cancelled)
            .ok_or(Status::NotFound)?;
        s.cancelled = true;
        Ok(())
    }

    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: Vec<(&str, &str)>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        self.called("dispatch_http_call");
        self.assert_root("dispatch_http_call");
        let token = self.token();
        self.0.http_calls.borrow_mut().push(HttpCall {
            token,
            cluster: cluster.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timeout,
        });
        Ok(token)
    }
    fn define_metric(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        self.called("define_metric");
        let mut m = self.0.envoy.metrics.lock().unwrap();
        if let Some(&id) = m.ids.get(name) {
            let existing = m.get(id);
            assert_eq!(existing.kind, kind, "{name} defined again as another type");
            return Ok(id);
        }
        m.all.push(Metric {
            name: name.to_string(),
            kind,
            value: 0,
            samples: Vec::new(),
        });
        let id = m.all.len() as u32;
        m.ids.insert(name.to_string(), id);
        Ok(id)
    }

    fn increment_metric(&self, id: u32, offset: i64) -> Result<(), Status> {
        self.called("increment_metric");
        let mut m = self.0.envoy.metrics.lock().unwrap();
        let metric = m.get(id);
        match metric.kind {
            // Envoy refuses to lower a counter.
            MetricType::Counter if offset < 0 => return Err(Status::BadArgument),
            MetricType::Histogram => return Err(Status::BadArgument),
            _ => {}
        }
        // A u64 gauge in Envoy wraps below 0 (asserts in debug builds).
        metric.value = metric
            .value
            .checked_add_signed(offset)
            .unwrap_or_else(|| panic!("{} wrapped: {} + {offset}", metric.name, metric.value));
        Ok(())
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), Status> {
        self.called("record_metric");
        let mut m = self.0.envoy.metrics.lock().unwrap();
        let metric = m.get(id);
        match metric.kind {
            MetricType::Gauge => metric.value = value,
            MetricType::Histogram => metric.samples.push(value),
            // Envoy does not record into a counter.
            _ => return Err(Status::BadArgument),
        }
        Ok(())
    }

    fn get_metric(&self, id: u32) -> Result<u64, Status> {
        self.called("get_metric");
        let mut m = self.0.envoy.metrics.lock().unwrap();
        let metric = m.get(id);
        match metric.kind {
            MetricType::Histogram => Err(Status::BadArgument),
            _ => Ok(metric.value),
        }
    }
}

/// One worker thread's VM, configured. Not `Send`, like the real one: a
/// test with several threads starts each worker on its own thread.
pub struct FakeWorker {
    pub host: FakeHost,
    root: Root<FakeHost>,
    next_context: Cell<u32>,
}

impl FakeWorker {
    /// A VM of `vm_id` ""; the first one started plays Envoy's main thread,
    /// which creates the records before traffic.
    pub fn start(envoy: &Arc<FakeEnvoy>, config: &serde_json::Value) -> FakeWorker {
        capture_logs();
        let host = FakeHost::new(envoy, "");
        let mut root = Root::new(host.clone());
        root.configure(&config.to_string(), String::new())
            .expect("configuration accepted");
        FakeWorker {
            host,
            root,
            next_context: Cell::new(ROOT_CONTEXT + 1),
        }
    }

    /// A new request; its request headers have been through the filter.
    pub fn request(&self, method: &str, path: &str) -> FakeStream {
        self.request_with(method, path, &[])
    }

    /// The stats document at the default stats path, as a client reads it.
    pub fn stats(&self) -> serde_json::Value {
        let mut s = self.request("GET", crate::admin::STATS_PATH);
        let doc = s.reply().json();
        s.complete();
        doc
    }

    /// A new request with more headers.
    pub fn request_with(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> FakeStream {
        self.request_arrived(method, path, headers, Duration::ZERO)
    }

    /// A request whose first byte reached Envoy `ago` before its headers
    /// reach the filter (a busy worker).
    pub fn request_arrived(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        ago: Duration,
    ) -> FakeStream {
        let id = self.next_context.get();
        self.next_context.set(id + 1);
        let mut request_headers = vec![
            (":method".to_string(), method.to_string()),
            (":path".to_string(), path.to_string()),
        ];
        request_headers.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let now = self.host.0.envoy.clock_ns.load(Ordering::SeqCst);
        let record = StreamRecord {
            request_headers,
            arrived_ns: now.saturating_sub(ago.as_nanos() as u64),
            ..StreamRecord::default()
        };
        self.host.0.streams.borrow_mut().insert(id, record);
        let mut stream = FakeStream {
            id,
            host: self.host.clone(),
            state: self.root.new_stream(id).expect("configured"),
            action: Action::Continue,
        };
        stream.action = stream.in_callback(|s| s.on_request_headers());
        if stream.action == Action::Pause {
            stream.host.stream(id, |s| s.paused = true);
        }
        stream
    }

    /// Its worker index.
    pub fn worker_id(&self) -> u16 {
        self.root.worker_id().expect("configured")
    }

    /// Envoy's timer fired (whatever the period: tests move the clock).
    pub fn tick(&self) {
        self.in_root(|r| r.tick());
    }

    /// Delivers `on_queue_ready` for each of this VM's queues that has
    /// messages, as Envoy's event loop would; whether any had.
    pub fn deliver_wake_ups(&self) -> bool {
        let queues = self.host.0.queues.borrow().clone();
        let mut delivered = false;
        for q in queues {
            if self.host.0.envoy.has_messages(q) {
                self.in_root(|r| r.wake_up(q));
                delivered = true;
            }
        }
        delivered
    }

    /// Envoy ends this VM (`on_done`): after a config update's drain, or at
    /// shutdown. Its open streams are reset with no close callback.
    pub fn done(&self) {
        self.in_root(|r| r.done());
        for s in self.host.0.grpc.borrow_mut().iter_mut() {
            s.cancelled = true;
        }
    }

    /// The gRPC streams this VM opened, oldest first.
    pub fn grpc_streams(&self) -> Vec<GrpcStream> {
        self.host.0.grpc.borrow().clone()
    }

    /// The one stream open (not cancelled), if any.
    pub fn open_stream(&self) -> Option<GrpcStream> {
        let open: Vec<_> = self
            .grpc_streams()
            .into_iter()
            .filter(|s| !s.cancelled)
            .collect();
        assert!(open.len() <= 1, "more than one open stream: {open:?}");
        open.into_iter().next()
    }

    /// The sync service sends `message` on stream `token`.
    pub fn grpc_message(&self, token: u32, message: &[u8]) {
        self.in_root(|r| r.on_grpc_message(token, message));
    }

    /// The stream ends (server gone, or it ended it) with `status`.
    pub fn grpc_close(&self, token: u32, status: u32) {
        let closed = {
            let mut grpc = self.host.0.grpc.borrow_mut();
            let s = grpc.iter_mut().find(|s| s.token == token).expect("known");
            let was_open = !s.cancelled;
            s.cancelled = true;
            was_open
        };
        if closed {
            self.in_root(|r| r.on_grpc_close(token, status));
        }
    }

    /// Makes `open_grpc_stream` fail (or work again).
    pub fn fail_grpc_open(&self, fail: bool) {
        self.host.0.fail_grpc_open.set(fail);
    }

    /// The HTTP callouts this VM dispatched, oldest first.
    pub fn http_calls(&self) -> Vec<HttpCall> {
        self.host.0.http_calls.borrow().clone()
    }

    /// The answer to callout `token`: its status, `None` for Envoy giving up.
    pub fn http_response(&self, token: u32, status: Option<u32>) {
        self.in_root(|r| r.on_http_response(token, status));
    }

    fn in_root(&self, f: impl FnOnce(&Root<FakeHost>)) {
        self.host.0.current.set(ROOT_CONTEXT);
        f(&self.root);
        self.host.0.current.set(ROOT_CONTEXT);
    }
}

/// A request in flight, driven by the test the way Envoy drives it.
pub struct FakeStream {
    pub id: u32,
    host: FakeHost,
    state: Stream<FakeHost>,
    /// What its request headers callback returned.
    pub action: Action,
}

impl FakeStream {
    fn in_callback<R>(&mut self, f: impl FnOnce(&mut Stream<FakeHost>) -> R) -> R {
        assert!(!self.is_gone(), "callback on deleted stream {}", self.id);
        self.host.0.current.set(self.id);
        let r = f(&mut self.state);
        // In Envoy the effective context lasts until the callback returns:
        // one that resumed another request must have come back to its own.
        assert_eq!(
            self.host.0.current.get(),
            self.id,
            "callback of stream {} ends in another stream's context",
            self.id
        );
        self.host.0.current.set(ROOT_CONTEXT);
        r
    }

    /// The response (upstream's, or the filter's own local reply) goes out
    /// in full, then the stream ends (`on_log`) and Envoy deletes it.
    pub fn complete(&mut self) {
        self.respond();
        self.end();
    }

    /// Response headers, then the last body chunk.
    pub fn respond(&mut self) {
        self.in_callback(|s| {
            s.on_response_headers(false);
            s.on_response_body(true);
        });
    }

    /// Envoy answers for the backend with its own timeout reply (route
    /// timeout: a 504 whose code details are not `via_upstream`), which goes
    /// out in full; then the stream ends.
    pub fn envoy_timeout(&mut self) {
        self.host.stream(self.id, |s| {
            s.status = Some(504);
            s.code_details = Some("upstream_response_timeout".into());
        });
        self.complete();
    }

    /// Only the response headers (more body to come).
    pub fn respond_headers(&mut self) {
        self.in_callback(|s| {
            s.on_response_headers(false);
        });
    }

    /// The last body chunk of a response whose headers went through.
    pub fn finish_body(&mut self) {
        self.in_callback(|s| {
            s.on_response_body(true);
        });
    }

    /// Envoy could not connect to the instance (or it reset before
    /// answering): Envoy's own 503, which goes out in full.
    pub fn upstream_failed(&mut self) {
        self.host.stream(self.id, |s| {
            s.status = Some(503);
            s.code_details =
                Some("upstream_reset_before_response_started{remote_connection_failure}".into());
        });
        self.complete();
    }

    /// Envoy sent it to `address` (`upstream.address`).
    pub fn served_by(&self, address: &str) {
        self.host
            .stream(self.id, |s| s.upstream_address = Some(address.to_string()));
    }

    /// A request header as the filter left it (the steering header).
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.host.stream(self.id, |s| {
            header(&s.request_headers, name).map(str::to_string)
        })
    }

    /// Response headers from the backend, then the client goes away before
    /// the body is through.
    pub fn cut_during_response(&mut self) {
        self.in_callback(|s| s.on_response_headers(false));
        self.end();
    }

    /// The stream ends without a response (client reset, upstream gone):
    /// `on_log`, then Envoy deletes the context.
    pub fn reset(&mut self) {
        self.end();
    }

    fn end(&mut self) {
        self.in_callback(|s| s.on_end());
        self.host.stream(self.id, |s| s.gone = true);
    }

    /// Envoy deletes the context without our `on_log` having run yet, so
    /// `set_effective_context` on it fails.
    pub fn vanish(&self) {
        self.host.stream(self.id, |s| s.gone = true);
    }

    /// `resume_http_request` on it will fail.
    pub fn fail_resume(&self) {
        self.host.stream(self.id, |s| s.fail_resume = true);
    }

    fn is_gone(&self) -> bool {
        self.host.stream(self.id, |s| s.gone)
    }

    pub fn resumes(&self) -> u32 {
        self.host.stream(self.id, |s| s.resumes)
    }

    pub fn replies(&self) -> Vec<Reply> {
        self.host.stream(self.id, |s| s.replies.clone())
    }

    /// The only local reply it got.
    pub fn reply(&self) -> Reply {
        let replies = self.replies();
        assert_eq!(replies.len(), 1, "stream {}: {replies:?}", self.id);
        replies[0].clone()
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        self.host.stream(self.id, |s| {
            header(&s.response_headers, name).map(str::to_string)
        })
    }

    /// Paused, neither resumed nor answered yet.
    pub fn is_waiting(&self) -> bool {
        self.host
            .stream(self.id, |s| s.paused && s.replies.is_empty())
    }
}

thread_local! {
    static LOGGED: RefCell<Vec<(log::Level, String)>> = const { RefCell::new(Vec::new()) };
}

/// Keeps what the filter logs, per test thread, so a test can check that
/// nothing went wrong quietly (a release with no slot in use is logged, not
/// panicked on).
struct CaptureLogger;

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LOGGED.with(|l| {
            l.borrow_mut()
                .push((record.level(), record.args().to_string()))
        });
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CaptureLogger).expect("no other logger in tests");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// Warnings and errors this thread logged since the last call.
pub fn take_problems() -> Vec<String> {
    LOGGED.with(|l| {
        l.borrow_mut()
            .drain(..)
            .filter(|(level, _)| *level <= log::Level::Warn)
            .map(|(level, m)| format!("{level}: {m}"))
            .collect()
    })
}
