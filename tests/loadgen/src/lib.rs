//! Fires bursts of concurrent HTTP/1.1 requests, one connection each, and
//! records what became of every one of them. The e2e tests assert on these
//! outcomes; the demo and the benchmarks print them. [`closed_loop`] keeps
//! a number of clients busy for a while instead, some of them giving up on
//! requests at random moments.

pub mod closed_loop;

pub use closed_loop::{run_closed_loop, run_closed_loop_blocking, ClosedLoop, LoopReport};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Pause between opening the connections and sending the first request.
const SETTLE: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct Burst {
    pub addr: SocketAddr,
    pub path: String,
    pub method: String,
    pub requests: usize,
    /// Time between the starts of consecutive requests.
    pub spacing: Duration,
    /// Drop the request (close its connection) after this long if no
    /// response has arrived: a client that gives up.
    pub abort_after: Option<Duration>,
    /// Give up on a response after this long (reported as status 0).
    pub timeout: Duration,
    /// Number the requests from here in their `x-seq` header.
    pub first_seq: usize,
    /// Request body (sent with `content-type: application/json`) if not empty.
    pub body: Bytes,
}

impl Burst {
    pub fn new(addr: SocketAddr, path: &str, requests: usize) -> Burst {
        Burst {
            addr,
            path: path.to_string(),
            method: "GET".to_string(),
            requests,
            spacing: Duration::ZERO,
            abort_after: None,
            timeout: Duration::from_secs(60),
            first_seq: 0,
            body: Bytes::new(),
        }
    }
}

/// What became of one request.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub seq: usize,
    /// HTTP status; 0 for a transport error, a timeout or an abort.
    pub status: u16,
    /// `x-sluice-reason` of a local reply from the filter.
    pub reason: Option<String>,
    /// `x-sluice-wait-ms` of a request that queued before admission.
    pub wait_ms: Option<u64>,
    pub retry_after: Option<String>,
    /// From sending the request to the end of the response (or the abort).
    pub latency_ms: f64,
    /// When it was sent, from the start of the burst.
    pub sent_at_ms: f64,
    pub aborted: bool,
    pub error: Option<String>,
    pub body: String,
}

/// Runs the burst and returns the outcomes in `seq` order.
///
/// Every connection is opened first; then one dispatcher sends the requests
/// in `seq` order, sleeping at least `spacing` between two sends, so requests
/// meant to arrive a millisecond apart are not reordered by connect time or
/// by two timers firing in the same tick.
pub async fn run(burst: &Burst) -> Vec<Outcome> {
    let mut connecting = Vec::with_capacity(burst.requests);
    for _ in 0..burst.requests {
        let addr = burst.addr;
        connecting.push(tokio::spawn(async move { connect(addr).await }));
    }
    let mut conns = Vec::with_capacity(burst.requests);
    for c in connecting {
        conns.push(c.await.expect("connect task panicked"));
    }
    // Let the proxy accept every connection before the first request is
    // timed, so ordered arrivals are not reordered by a late accept.
    tokio::time::sleep(SETTLE).await;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(burst.requests);
    for (i, conn) in conns.into_iter().enumerate() {
        if i > 0 && !burst.spacing.is_zero() {
            tokio::time::sleep(burst.spacing).await;
        }
        let seq = burst.first_seq + i;
        let mut o = Outcome {
            seq,
            status: 0,
            reason: None,
            wait_ms: None,
            retry_after: None,
            latency_ms: 0.0,
            sent_at_ms: start.elapsed().as_secs_f64() * 1e3,
            aborted: false,
            error: None,
            body: String::new(),
        };
        let (mut sender, conn_task) = match conn {
            Ok(c) => c,
            Err(e) => {
                o.error = Some(format!("connect: {e}"));
                tasks.push(tokio::spawn(async move { o }));
                continue;
            }
        };
        let sent = Instant::now();
        // Queued on the connection now, in order; written by its task at once.
        let response = request(burst, seq).map(|req| sender.send_request(req));
        let b = burst.clone();
        tasks.push(tokio::spawn(async move {
            let limit = b.abort_after.unwrap_or(b.timeout).min(b.timeout);
            let result = match response {
                Ok(fut) => tokio::time::timeout(limit, read(fut, &mut o)).await,
                Err(e) => Ok(Err(e)),
            };
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => o.error = Some(e.to_string()),
                Err(_) if b.abort_after.is_some_and(|a| a <= b.timeout) => o.aborted = true,
                Err(_) => o.error = Some(format!("no response within {limit:?}")),
            }
            o.latency_ms = sent.elapsed().as_secs_f64() * 1e3;
            // Dropping the connection closes the socket: on abort, Envoy sees
            // a downstream reset, exactly like a client that went away.
            drop(sender);
            conn_task.abort();
            o
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("request task panicked"));
    }
    out
}

/// Blocking wrapper for tests and tools without a runtime of their own.
///
/// On one thread: a request is written by its connection's task, and with a
/// second runtime thread the task of request 1 could write before that of
/// request 0 when the thread holding 0 is descheduled, so a burst meant to
/// arrive in order would not. One thread writes them in the order sent.
pub fn run_blocking(burst: &Burst) -> Vec<Outcome> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run(burst))
}

type Connection = (
    http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
);

async fn connect(addr: SocketAddr) -> anyhow::Result<Connection> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    Ok((sender, tokio::spawn(conn)))
}

fn request(b: &Burst, seq: usize) -> anyhow::Result<hyper::Request<Full<Bytes>>> {
    Ok(hyper::Request::builder()
        .method(b.method.as_str())
        .uri(b.path.as_str())
        .header("host", b.addr.to_string())
        .header("x-seq", seq.to_string())
        .header("content-type", "application/json")
        .body(Full::new(b.body.clone()))?)
}

async fn read(
    response: impl std::future::Future<Output = hyper::Result<hyper::Response<hyper::body::Incoming>>>,
    o: &mut Outcome,
) -> anyhow::Result<()> {
    let res = response.await?;
    o.status = res.status().as_u16();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    o.reason = header("x-sluice-reason");
    o.retry_after = header("retry-after");
    o.wait_ms = header("x-sluice-wait-ms").and_then(|v| v.parse().ok());
    let body = res.into_body().collect().await?.to_bytes();
    o.body = String::from_utf8_lossy(&body).into_owned();
    Ok(())
}

/// Counts of outcomes, for people and for JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub ok: usize,
    pub queued_then_admitted: usize,
    pub queue_timeout: usize,
    pub queue_full: usize,
    pub other_status: usize,
    pub aborted: usize,
    pub errors: usize,
    pub max_wait_ms: u64,
}

pub fn summarize(outcomes: &[Outcome]) -> Summary {
    let mut s = Summary {
        requests: outcomes.len(),
        ..Summary::default()
    };
    for o in outcomes {
        match (o.status, o.reason.as_deref()) {
            _ if o.aborted => s.aborted += 1,
            (0, _) => s.errors += 1,
            (200..=299, _) => {
                s.ok += 1;
                if let Some(w) = o.wait_ms {
                    s.queued_then_admitted += 1;
                    s.max_wait_ms = s.max_wait_ms.max(w);
                }
            }
            (504, Some("queue-timeout")) => s.queue_timeout += 1,
            (503, Some("queue-full")) => s.queue_full += 1,
            _ => s.other_status += 1,
        }
    }
    s
}

/// One line per request, for people: status, the filter's reason, how long
/// it queued, and its total time.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "{:>4}  {:>6}  {:<14} {:>8} {:>10}\n",
        "req", "status", "x-sluice", "wait_ms", "total_ms"
    );
    for o in outcomes {
        out.push_str(&format!(
            "{:>4}  {:>6}  {:<14} {:>8} {:>10.0}\n",
            o.seq,
            o.status,
            o.reason.as_deref().unwrap_or("-"),
            o.wait_ms.map_or("-".into(), |w| w.to_string()),
            o.latency_ms
        ));
    }
    out
}
