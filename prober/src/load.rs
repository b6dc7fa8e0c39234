//! The load generator: a closed loop on exactly N keep-alive connections.
//!
//! Each of the N workers owns one HTTP/1.1 connection and sends the next
//! request as soon as the previous response has been read in full, so the
//! target sees exactly N requests in flight (less the client's own turnaround).
//! A worker drives its connection in its own task (no separate connection
//! task, no channel hop per request), which is what keeps the client cheap
//! enough to measure a fast endpoint on the same two cores.

use crate::success::{ResponseShape, SuccessCheck, MAX_CHECKED_BODY};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Largest latency the histograms hold, in microseconds (one hour).
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// How long to wait for a TCP connection before counting an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a connection could not be opened, so a dead target is not
/// hammered in a spin.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// Where to send: a resolved address and the `Host` header to send with it.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
}

/// One request, sent again and again.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub method: Method,
    /// Path and query, e.g. `/predict`.
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// What a successful response is (default: any 2xx).
    pub check: Arc<SuccessCheck>,
}

/// How one level is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelTiming {
    /// Load before measuring starts: connections opened, caches warm,
    /// the target's queue in its steady state.
    pub warmup: Duration,
    /// How long the measurement lasts at least.
    pub duration: Duration,
    /// Keep measuring past `duration` until this many requests were measured...
    pub min_samples: u64,
    /// ...but never longer than this.
    pub max_duration: Duration,
    /// A request without a full response after this long counts as an error
    /// (and is recorded in the histogram at this latency).
    pub request_timeout: Duration,
    /// End the window early (after half of `duration`, half a second at
    /// most) once this share of at least [`DECISIVE_SAMPLES`] measured
    /// requests failed: the level fails
    /// whatever follows, and a service that answers errors fast would
    /// otherwise take a barrage of them for the whole window.
    pub stop_at_error_rate: Option<f64>,
}

/// Measured requests needed before a level may stop early on errors.
pub const DECISIVE_SAMPLES: u64 = 200;

/// What one run of one level measured.
#[derive(Debug, Clone)]
pub struct LevelStats {
    pub concurrency: usize,
    /// Requests started inside the measurement window (all of them finished
    /// or timed out before the level ended).
    pub requests: u64,
    /// Of those: unexpected statuses (non-2xx by default), bodies failing
    /// the body check, transport errors and timeouts.
    pub errors: u64,
    /// Answers with an unexpected status, by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Answers with an expected status whose body failed the body check.
    pub check_failures: u64,
    /// The measured responses counted as successful: their size and type.
    pub shape: ResponseShape,
    pub transport_errors: u64,
    /// Of the transport errors: failed connection attempts.
    pub connect_errors: u64,
    pub timeouts: u64,
    /// Responses that arrived inside the window, whenever sent.
    pub completed_in_window: u64,
    /// Of those, the 2xx ones: the throughput reported (a fast 503 is no work done).
    pub ok_in_window: u64,
    pub window: Duration,
    /// Latency of every measured request, microseconds.
    pub latency_us: Histogram<u64>,
    /// CPU time this process used during the window, seconds.
    pub cpu_seconds: f64,
    /// Time this process's threads spent ready to run but waiting for a CPU
    /// during the window, seconds (`None` where the kernel does not say).
    pub cpu_wait_seconds: Option<f64>,
    /// Threads that generated the load.
    pub threads: usize,
    /// One example of a transport error, for the report.
    pub first_error: Option<String>,
    /// Transport errors by kind (`reset`, `refused`, `timeout`, `closed`, …).
    pub transport_kinds: BTreeMap<&'static str, u64>,
    /// The `Location` of the first redirect answered: redirects are not
    /// followed, so they count as errors and the report says where they point.
    pub redirect: Option<String>,
}

impl LevelStats {
    pub fn empty(concurrency: usize, threads: usize) -> LevelStats {
        LevelStats {
            concurrency,
            requests: 0,
            errors: 0,
            statuses: BTreeMap::new(),
            check_failures: 0,
            shape: ResponseShape::default(),
            transport_errors: 0,
            connect_errors: 0,
            timeouts: 0,
            completed_in_window: 0,
            ok_in_window: 0,
            window: Duration::ZERO,
            latency_us: new_histogram(),
            cpu_seconds: 0.0,
            cpu_wait_seconds: None,
            threads,
            first_error: None,
            transport_kinds: BTreeMap::new(),
            redirect: None,
        }
    }

    /// This level's throughput, for the knee and the USL fit.
    pub fn point(&self) -> crate::scaling::Point {
        crate::scaling::Point {
            concurrency: self.concurrency as f64,
            rps: self.rps(),
        }
    }

    /// Successful responses per second.
    pub fn rps(&self) -> f64 {
        self.per_second(self.ok_in_window)
    }

    /// All responses per second, errors included.
    pub fn total_rps(&self) -> f64 {
        self.per_second(self.completed_in_window)
    }

    fn per_second(&self, count: u64) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            count as f64 / secs
        } else {
            0.0
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            // Nothing came back at all: as bad as it gets.
            1.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// Latency at quantile `q` (0..1) in milliseconds; 0 without samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latency_us.is_empty() {
            0.0
        } else {
            self.latency_us.value_at_quantile(q) as f64 / 1000.0
        }
    }

    pub fn max_ms(&self) -> f64 {
        self.latency_us.max() as f64 / 1000.0
    }

    /// Cores this process kept busy during the window.
    pub fn cpu_cores(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.cpu_seconds / secs
        } else {
            0.0
        }
    }

    /// Share of the window the load threads were running or waiting for a
    /// CPU, rather than idle waiting for responses (0..1, per thread).
    pub fn busy(&self) -> f64 {
        let capacity = self.window.as_secs_f64() * self.threads as f64;
        if capacity <= 0.0 {
            return 0.0;
        }
        (self.cpu_seconds + self.cpu_wait_seconds.unwrap_or(0.0)) / capacity
    }

    /// True when the prober itself, not the target, was the limit: its load
    /// threads never waited for a response, they were always running (or
    /// queued for a CPU the target was also using).
    pub fn client_bound(&self) -> bool {
        self.busy() >= 0.9
    }

    /// Adds another run of the same level (a confirmation re-run).
    pub fn merge(&mut self, other: &LevelStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (code, n) in &other.statuses {
            *self.statuses.entry(*code).or_default() += n;
        }
        self.check_failures += other.check_failures;
        self.shape.merge(&other.shape);
        self.transport_errors += other.transport_errors;
        self.connect_errors += other.connect_errors;
        self.timeouts += other.timeouts;
        self.completed_in_window += other.completed_in_window;
        self.ok_in_window += other.ok_in_window;
        self.window += other.window;
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share their bounds");
        self.cpu_seconds += other.cpu_seconds;
        self.cpu_wait_seconds = match (self.cpu_wait_seconds, other.cpu_wait_seconds) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        for (kind, n) in &other.transport_kinds {
            *self.transport_kinds.entry(kind).or_default() += n;
        }
        if self.redirect.is_none() {
            self.redirect.clone_from(&other.redirect);
        }
    }

    /// Every measured attempt failed to connect: the target is gone.
    pub fn unreachable(&self) -> bool {
        self.connect_errors > 0 && self.connect_errors == self.requests
    }

    /// A short account of the errors, e.g. `503 x812, reset x3, timeout x2`.
    pub fn error_summary(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(code, n)| format!("{code} x{n}"))
            .collect();
        if self.check_failures > 0 {
            parts.push(format!("body check failed x{}", self.check_failures));
        }
        let mut named = 0;
        for (kind, n) in &self.transport_kinds {
            parts.push(format!("{kind} x{n}"));
            named += n;
        }
        if self.transport_errors > named {
            parts.push(format!("transport x{}", self.transport_errors - named));
        }
        if self.timeouts > 0 {
            parts.push(format!("timeout x{}", self.timeouts));
        }
        if let Some(to) = &self.redirect {
            parts.push(format!(
                "redirects to {to} are not followed: probe the path it points to"
            ));
        }
        parts.join(", ")
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Set on SIGINT/SIGTERM (see `interrupt`): the level in progress stops at
/// once, abandoning requests in flight. An `Arc` because signal-hook's flag
/// handlers hold one.
static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// Stops the level in progress and every later one.
pub fn interrupt() {
    INTERRUPTED.store(true, Relaxed);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Relaxed)
}

/// Turns SIGINT and SIGTERM into [`interrupt`], so a probe can report what
/// it finished. A second signal ends the process at once.
pub fn stop_on_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    for sig in [SIGINT, SIGTERM] {
        // First the exit, checked before the flag is set by the second
        // handler: only a signal that finds it already set exits.
        flag::register_conditional_shutdown(
            sig,
            crate::error::exit::INTERRUPTED.into(),
            Arc::clone(&INTERRUPTED),
        )
        .and_then(|_| flag::register(sig, Arc::clone(&INTERRUPTED)))
        .expect("cannot install the SIGINT/SIGTERM handlers");
    }
}

struct Shared {
    target: Target,
    request: RequestSpec,
    request_timeout: Duration,
    phase: AtomicU8,
    /// Requests measured so far, so the controller can wait for `min_samples`.
    measured: AtomicU64,
    /// Of those, the failed ones, so the controller can stop a lost cause.
    failed: AtomicU64,
    /// Anything that came back at all, warm-up included (a response, a
    /// reset), but not a timeout: with none after `request_timeout` the
    /// level is judged at once instead of waiting out a window of timeouts.
    answered: AtomicU64,
    /// Set with `phase = STOP` when requests in flight are to be dropped
    /// rather than waited for (interrupted, or nothing answers).
    abandon: AtomicBool,
    /// One per load thread, woken when `abandon` is set.
    wake: Vec<tokio::sync::Notify>,
}

#[derive(Default)]
struct WorkerTally {
    requests: u64,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    check_failures: u64,
    shape: ResponseShape,
    transport_errors: u64,
    connect_errors: u64,
    timeouts: u64,
    completed_in_window: u64,
    ok_in_window: u64,
    first_error: Option<String>,
    transport_kinds: BTreeMap<&'static str, u64>,
    redirect: Option<String>,
}

/// Runs one level: `concurrency` connections in a closed loop, warm-up, then
/// the measured window. Blocks the calling thread for the whole level.
///
/// The connections are spread over `threads` OS threads, each with its own
/// single-threaded Tokio runtime (wrk's model: no work stealing, no
/// cross-thread wake-ups on the request path). The calling thread only keeps
/// time.
pub fn run_level(
    target: &Target,
    request: &RequestSpec,
    concurrency: usize,
    timing: &LevelTiming,
    threads: usize,
) -> std::io::Result<LevelStats> {
    let shared = Arc::new(Shared {
        target: target.clone(),
        request: request.clone(),
        request_timeout: timing.request_timeout,
        phase: AtomicU8::new(WARMUP),
        measured: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        abandon: AtomicBool::new(false),
        wake: (0..threads.clamp(1, concurrency.max(1)))
            .map(|_| tokio::sync::Notify::new())
            .collect(),
    });
    let threads = threads.clamp(1, concurrency.max(1));
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        let connections = concurrency / threads + usize::from(t < concurrency % threads);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let for_thread = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("sluice-load-{t}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let workers: Vec<_> = (0..connections)
                        .map(|_| tokio::spawn(worker(for_thread.clone(), t)))
                        .collect();
                    let mut results = Vec::with_capacity(workers.len());
                    for w in workers {
                        // A worker panicking is a bug in this file: say so.
                        results.push(w.await.expect("load worker panicked"));
                    }
                    results
                })
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                // Let the threads already running wind down before failing.
                shared.phase.store(STOP, Relaxed);
                for h in handles {
                    let _ = h.join();
                }
                return Err(e);
            }
        }
    }

    let level_start = Instant::now();
    // Nothing at all came back within a request timeout: the level has
    // failed, and waiting out its window would only add timeouts.
    let silent =
        || level_start.elapsed() >= timing.request_timeout && shared.answered.load(Relaxed) == 0;
    let mut abandon = false;
    while level_start.elapsed() < timing.warmup {
        if interrupted() || silent() {
            abandon = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10).min(timing.warmup));
    }
    let cpu_start = process_cpu_seconds();
    let wait_start = process_cpu_wait_seconds();
    let start = Instant::now();
    shared.phase.store(MEASURE, Relaxed);
    // Half a second at least (less for very short levels), so the
    // throughput of the requests that did succeed is still a fair figure.
    let decisive_after = (timing.duration / 2).min(Duration::from_millis(500));
    let lost_cause = |elapsed: Duration| {
        let measured = shared.measured.load(Relaxed);
        timing.stop_at_error_rate.is_some_and(|limit| {
            elapsed >= decisive_after
                && measured >= DECISIVE_SAMPLES
                && shared.failed.load(Relaxed) as f64 > limit * measured as f64
        })
    };
    loop {
        let elapsed = start.elapsed();
        let enough = elapsed >= timing.duration
            && (shared.measured.load(Relaxed) >= timing.min_samples
                || elapsed >= timing.max_duration);
        if abandon || enough || lost_cause(elapsed) {
            break;
        }
        if interrupted() || silent() {
            abandon = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10).min(timing.duration));
    }
    if abandon {
        shared.abandon.store(true, Relaxed);
    }
    shared.phase.store(STOP, Relaxed);
    if abandon {
        for w in &shared.wake {
            w.notify_waiters();
        }
    }
    let window = start.elapsed();
    let cpu_seconds = process_cpu_seconds() - cpu_start;
    let cpu_wait_seconds = match (wait_start, process_cpu_wait_seconds()) {
        (Some(a), Some(b)) => Some((b - a).max(0.0)),
        _ => None,
    };

    let mut stats = LevelStats::empty(concurrency, threads);
    stats.window = window;
    stats.cpu_seconds = cpu_seconds;
    stats.cpu_wait_seconds = cpu_wait_seconds;
    for h in handles {
        let results = h.join().expect("load thread panicked");
        for (tally, hist) in results {
            stats.requests += tally.requests;
            stats.errors += tally.errors;
            for (code, n) in tally.statuses {
                *stats.statuses.entry(code).or_default() += n;
            }
            stats.check_failures += tally.check_failures;
            stats.shape.merge(&tally.shape);
            stats.transport_errors += tally.transport_errors;
            stats.connect_errors += tally.connect_errors;
            stats.timeouts += tally.timeouts;
            stats.completed_in_window += tally.completed_in_window;
            stats.ok_in_window += tally.ok_in_window;
            stats
                .latency_us
                .add(&hist)
                .expect("histograms share their bounds");
            if stats.first_error.is_none() {
                stats.first_error = tally.first_error;
            }
            for (kind, n) in tally.transport_kinds {
                *stats.transport_kinds.entry(kind).or_default() += n;
            }
            if stats.redirect.is_none() {
                stats.redirect = tally.redirect;
            }
        }
    }
    Ok(stats)
}

enum Outcome {
    /// A full response.
    Status(Answer),
    Connect(&'static str, String),
    Transport(&'static str, String),
    Timeout,
}

/// A response read to its end.
struct Answer {
    status: u16,
    /// The `Location` of a redirect.
    location: Option<String>,
    content_type: Option<String>,
    body_bytes: usize,
    /// The body passed the body check (or there is none).
    body_ok: bool,
}

/// What kind of transport failure `e` is, for the report: a count of
/// `transport` alone says nothing about what to look at.
fn transport_kind(e: &(dyn std::error::Error + 'static)) -> &'static str {
    use std::io::ErrorKind;
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                ErrorKind::ConnectionReset => "reset",
                ErrorKind::ConnectionRefused => "refused",
                ErrorKind::ConnectionAborted => "aborted",
                ErrorKind::TimedOut => "timed out",
                ErrorKind::BrokenPipe => "broken pipe",
                _ => "transport",
            };
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() {
                return "closed";
            }
            if h.is_parse() {
                return "bad response";
            }
        }
        cur = err.source();
    }
    "transport"
}

type Connection = (
    http1::SendRequest<Full<Bytes>>,
    http1::Connection<TokioIo<TcpStream>, Full<Bytes>>,
);

/// Opens one keep-alive connection; a failure is the outcome of the request it
/// was opened for.
async fn open(addr: SocketAddr) -> Result<Connection, Outcome> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(Outcome::Connect(
                transport_kind(&e),
                format!("connect: {e}"),
            ))
        }
        Err(_) => {
            return Err(Outcome::Connect(
                "connect timeout",
                "connect: timed out".into(),
            ))
        }
    };
    // Latency of small requests, not Nagle's delay, is what we measure.
    let _ = stream.set_nodelay(true);
    http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Outcome::Transport(transport_kind(&e), format!("handshake: {e}")))
}

async fn worker(shared: Arc<Shared>, thread: usize) -> (WorkerTally, Histogram<u64>) {
    let mut tally = WorkerTally::default();
    let mut hist = new_histogram();
    while shared.phase.load(Relaxed) != STOP {
        let started = Instant::now();
        let phase_at_start = shared.phase.load(Relaxed);
        let (sender, conn) = match open(shared.target.addr).await {
            Ok(pair) => pair,
            Err(outcome) => {
                account(
                    &shared,
                    &mut tally,
                    &mut hist,
                    phase_at_start,
                    started,
                    outcome,
                );
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        // Drive the connection and the request loop in this one task; the loop
        // drops `sender` when it ends, which lets `conn` finish.
        let requests = request_loop(&shared, thread, sender, &mut tally, &mut hist);
        tokio::pin!(conn);
        tokio::pin!(requests);
        let mut conn_done = false;
        loop {
            tokio::select! {
                _ = &mut conn, if !conn_done => conn_done = true,
                _ = &mut requests => break,
            }
        }
        // An abandoned request may never be answered: do not wait for it.
        if !conn_done && !shared.abandon.load(Relaxed) {
            let _ = conn.await;
        }
    }
    (tally, hist)
}

/// Sends requests on one connection until the level stops or the connection
/// can no longer be used (closed by the target, or an error).
async fn request_loop(
    shared: &Shared,
    thread: usize,
    mut sender: http1::SendRequest<Full<Bytes>>,
    tally: &mut WorkerTally,
    hist: &mut Histogram<u64>,
) {
    let spec = &shared.request;
    loop {
        let phase_at_start = shared.phase.load(Relaxed);
        if phase_at_start == STOP {
            return;
        }
        // A connection the target closed (Connection: close, idle limit) is
        // replaced silently, as any keep-alive client does.
        if sender.ready().await.is_err() {
            return;
        }
        let mut builder = Request::builder()
            .method(spec.method.clone())
            .uri(spec.path.as_str())
            .header(HOST, shared.target.host.as_str());
        for (name, value) in &spec.headers {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(Full::new(spec.body.clone()))
            .expect("request parts were validated when the spec was built");

        let started = Instant::now();
        let exchange = async {
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let location = response
                .status()
                .is_redirection()
                .then(|| response.headers().get(hyper::header::LOCATION))
                .flatten()
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned());
            let content_type = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let check = &spec.check;
            let keep = check.reads_body() && check.status_ok(status);
            // Read the whole body (a response is done when its last byte is
            // in); keep it only to check it, up to the checked size.
            let mut body = response.into_body();
            let mut body_bytes = 0usize;
            let mut kept = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    body_bytes += data.len();
                    if keep && kept.len() <= MAX_CHECKED_BODY {
                        kept.extend_from_slice(&data);
                    }
                }
            }
            Ok::<_, hyper::Error>(Answer {
                status,
                location,
                content_type,
                body_bytes,
                body_ok: !keep || check.body_ok(&kept),
            })
        };
        // Registered before the phase is read again, so a wake-up between
        // the two is not missed.
        let abandoned = shared.wake[thread].notified();
        tokio::pin!(abandoned);
        abandoned.as_mut().enable();
        if shared.abandon.load(Relaxed) {
            return;
        }
        let outcome = tokio::select! {
            r = tokio::time::timeout(shared.request_timeout, exchange) => match r {
                Ok(Ok(answer)) => Outcome::Status(answer),
                Ok(Err(e)) => Outcome::Transport(transport_kind(&e), e.to_string()),
                Err(_) => Outcome::Timeout,
            },
            // A request still waiting is dropped: it has waited at least a
            // request timeout with nothing answering, or the run was interrupted.
            _ = &mut abandoned => Outcome::Timeout,
        };
        let reusable = matches!(outcome, Outcome::Status(..));
        account(shared, tally, hist, phase_at_start, started, outcome);
        if !reusable {
            // After a timeout or a broken exchange the connection's state is
            // unknown: start over on a new one.
            return;
        }
    }
}

fn account(
    shared: &Shared,
    tally: &mut WorkerTally,
    hist: &mut Histogram<u64>,
    phase_at_start: u8,
    started: Instant,
    outcome: Outcome,
) {
    let finished = Instant::now();
    let mut latency = finished - started;
    if !matches!(outcome, Outcome::Timeout) {
        shared.answered.fetch_add(1, Relaxed);
    }
    let check = &shared.request.check;
    let succeeded =
        matches!(&outcome, Outcome::Status(a) if check.status_ok(a.status) && a.body_ok);
    if shared.phase.load(Relaxed) == MEASURE {
        tally.completed_in_window += 1;
        if succeeded {
            tally.ok_in_window += 1;
        }
    }
    if phase_at_start != MEASURE {
        return;
    }
    tally.requests += 1;
    shared.measured.fetch_add(1, Relaxed);
    if !succeeded {
        shared.failed.fetch_add(1, Relaxed);
    }
    match outcome {
        Outcome::Status(a) if succeeded => {
            tally.shape.record(a.body_bytes, a.content_type.as_deref());
        }
        Outcome::Status(a) if check.status_ok(a.status) => {
            tally.errors += 1;
            tally.check_failures += 1;
        }
        Outcome::Status(a) => {
            tally.errors += 1;
            *tally.statuses.entry(a.status).or_default() += 1;
            if tally.redirect.is_none() {
                tally.redirect = a.location;
            }
        }
        Outcome::Connect(kind, e) => {
            tally.errors += 1;
            tally.transport_errors += 1;
            tally.connect_errors += 1;
            *tally.transport_kinds.entry(kind).or_default() += 1;
            if tally.first_error.is_none() {
                tally.first_error = Some(e);
            }
        }
        Outcome::Transport(kind, e) => {
            tally.errors += 1;
            tally.transport_errors += 1;
            *tally.transport_kinds.entry(kind).or_default() += 1;
            if tally.first_error.is_none() {
                tally.first_error = Some(e);
            }
        }
        Outcome::Timeout => {
            tally.errors += 1;
            tally.timeouts += 1;
            latency = shared.request_timeout;
        }
    }
    hist.saturating_record(latency.as_micros().max(1) as u64);
}

/// CPU time (user + system) this process has used, in seconds.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we hand it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Time this process's threads spent runnable but not running, in seconds,
/// summed from `/proc/self/task/*/schedstat` (Linux; `None` elsewhere).
pub fn process_cpu_wait_seconds() -> Option<f64> {
    let mut total_ns: u64 = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        // "<ns on cpu> <ns waiting on a run queue> <timeslices>"
        let wait = text.split_whitespace().nth(1)?.parse::<u64>().ok()?;
        total_ns += wait;
    }
    Some(total_ns as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_with(latencies_ms: &[u64], errors: u64) -> LevelStats {
        let mut s = LevelStats::empty(4, 1);
        for ms in latencies_ms {
            s.latency_us.record(ms * 1000).unwrap();
        }
        s.requests = latencies_ms.len() as u64;
        s.errors = errors;
        s.completed_in_window = latencies_ms.len() as u64;
        s.ok_in_window = latencies_ms.len() as u64 - errors;
        s.window = Duration::from_secs(2);
        s
    }

    #[test]
    fn errors_are_named_by_kind() {
        let mut s = stats_with(&[5, 5, 5, 5], 4);
        s.transport_errors = 3;
        s.transport_kinds.insert("reset", 2);
        s.transport_kinds.insert("refused", 1);
        s.statuses.insert(302, 1);
        s.redirect = Some("/login".into());
        assert_eq!(
            s.error_summary(),
            "302 x1, refused x1, reset x2, redirects to /login are not followed: probe the path it points to"
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(transport_kind(&reset), "reset");
    }

    #[test]
    fn rates_and_quantiles() {
        let s = stats_with(&[10, 10, 10, 40], 1);
        assert_eq!(s.rps(), 1.5);
        assert_eq!(s.total_rps(), 2.0);
        assert_eq!(s.error_rate(), 0.25);
        assert!((s.quantile_ms(0.5) - 10.0).abs() < 0.05);
        assert!((s.quantile_ms(0.99) - 40.0).abs() < 0.05);
        assert_eq!(LevelStats::empty(1, 1).error_rate(), 1.0);
    }

    #[test]
    fn merging_a_rerun_pools_its_samples() {
        let mut a = stats_with(&[10, 10], 0);
        a.statuses.insert(503, 1);
        let mut b = stats_with(&[30, 30], 2);
        b.statuses.insert(503, 2);
        b.timeouts = 1;
        a.merge(&b);
        assert_eq!(a.requests, 4);
        assert_eq!(a.errors, 2);
        assert_eq!(a.window, Duration::from_secs(4));
        assert_eq!(a.statuses[&503], 3);
        assert_eq!(a.error_summary(), "503 x3, timeout x1");
        assert!((a.quantile_ms(0.99) - 30.0).abs() < 0.05);
    }

    #[test]
    fn cpu_time_moves() {
        let before = process_cpu_seconds();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds() > before);
    }
}
