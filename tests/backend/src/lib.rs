//! A backend that behaves like a compute-heavy service of known capacity, for
//! Sluice's tests, demo and benchmarks.
//!
//! Each `--route` gives a path a number of slots (`capacity`), a service time
//! (fixed, or exponential around it with `service_dist=exponential`, seeded
//! by `seed` so a run repeats) and what happens beyond capacity (`queue` FIFO inside the backend, or
//! `reject` with 503, or `error200`: 200 with an error body). `--workers K` adds one pool of K workers that every
//! routed request holds while it is served, like the worker processes of a
//! uvicorn app: a flood on one path then delays all the others.
//! `GET /__backend/stats` tells what the backend saw: how many requests were
//! inside at once, the `x-seq` headers in arrival order, how long each slot
//! of a saturated path stayed empty between two requests (`handover_gap`,
//! see [`handover`]), and how long requests took from arrival to answer.
//! Paths are decoded the way an application server routes them (`app_path`),
//! and with `on_disconnect=finish` a route keeps working on, and counting, a
//! request whose client left, as a thread-pool server does. With
//! `ms_per_mb`, a request's service time grows with the size of its body
//! (read whole first), like an upload endpoint's.
//! `GET /__backend/health` answers 200, or 503 after `POST
//! /__backend/health/fail` until `POST /__backend/health/ok`: a backend whose
//! health check starts failing, for Sluice's health tests.

pub mod app_path;
pub mod handover;
pub mod path_stats;
pub mod precise_sleep;
pub mod route;
pub mod service_time;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use path_stats::{PathState, Paths};
use route::{parse_service_ms, OnDisconnect, Overload, RouteSpec};
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Every response body: whole (`Full`) or streamed tokens.
type Body = UnsyncBoxBody<Bytes, Infallible>;

pub const STATS_PATH: &str = "/__backend/stats";
pub const RESET_PATH: &str = "/__backend/reset";
/// 200 while healthy, 503 while failing.
pub const HEALTH_PATH: &str = "/__backend/health";
pub const HEALTH_FAIL_PATH: &str = "/__backend/health/fail";
pub const HEALTH_OK_PATH: &str = "/__backend/health/ok";
/// With `--trace`: every routed request's id and wall-clock times.
pub const TRACE_PATH: &str = "/__backend/trace";
/// Overrides the service time of one request (float milliseconds).
pub const SERVICE_MS_HEADER: &str = "x-service-ms";
/// Recorded in the path's `arrivals`, in the order requests arrive.
pub const SEQ_HEADER: &str = "x-seq";
/// Every response carries the instance's `--name`, so a test (or a person
/// with curl) behind a load balancer sees which instance answered.
pub const NAME_HEADER: &str = "x-backend-name";

#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub routes: Vec<RouteSpec>,
    /// Runtime worker threads; 1 runs everything on the calling thread.
    pub threads: usize,
    /// Workers shared by every routed path (FIFO); `None`: no such limit.
    pub workers: Option<usize>,
    /// Keep each routed request's `x-request-id` with its arrival and
    /// departure on the wall clock (`GET /__backend/trace`), so a benchmark
    /// can line the backend up with Envoy's access log.
    pub trace: bool,
    /// Sent back in [`NAME_HEADER`] on every response.
    pub name: Option<String>,
}

/// Serves until the process is killed. Prints `listening on ADDR` once the
/// socket is bound: harnesses read that line to learn the port.
pub fn run(opts: Options) -> anyhow::Result<()> {
    let runtime = if opts.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let server = Server::bind(&opts).await?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {}", server.local_addr())?;
        stdout.flush()?;
        drop(stdout);
        server.serve().await
    })
}

/// A bound, not yet serving backend. Tests run it in-process:
/// `tokio::spawn(Server::bind(&opts).await?.serve())`.
pub struct Server {
    listener: TcpListener,
    app: Arc<App>,
}

impl Server {
    pub async fn bind(opts: &Options) -> anyhow::Result<Server> {
        for (i, route) in opts.routes.iter().enumerate() {
            if opts.routes[..i].iter().any(|r| r.path == route.path) {
                bail!("--route {} is given twice", route.path);
            }
        }
        let listener =
            listen(opts.listen).with_context(|| format!("cannot listen on {}", opts.listen))?;
        let name = match &opts.name {
            None => None,
            Some(name) => Some(
                HeaderValue::from_str(name)
                    .with_context(|| format!("--name {name:?} is not a valid header value"))?,
            ),
        };
        let app = Arc::new(App {
            paths: Paths::new(&opts.routes, opts.trace),
            workers: opts.workers.map(Semaphore::new),
            name,
            failing: AtomicBool::new(false),
        });
        Ok(Server { listener, app })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub async fn serve(self) -> anyhow::Result<()> {
        loop {
            let (stream, _) = match self.listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors under a benchmark: back off
                    // instead of spinning or dying.
                    eprintln!("sluice-backend: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Responses are small and latency is what the tests measure.
            let _ = stream.set_nodelay(true);
            let app = self.app.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let app = app.clone();
                    async move {
                        let mut response = Arc::clone(&app).handle(req).await;
                        if let Some(name) = &app.name {
                            response.headers_mut().insert(NAME_HEADER, name.clone());
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                // Errors here are clients going away mid-request: nothing to do.
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

/// Binds with an accept backlog of 4096 rather than the usual 128: a proxy
/// opening a few hundred upstream connections at once while this process
/// waits for a CPU overflows 128, and each dropped SYN costs the 1 s
/// retransmit, past Envoy's `connect_timeout` (a 503 the test never asked
/// for). The kernel still caps it at `net.core.somaxconn`.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As std's and tokio's own bind do: a port just freed can be reused.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

struct App {
    paths: Paths,
    /// tokio's semaphore is FIFO: a request waits for a worker behind every
    /// request that asked before it, whatever its path.
    workers: Option<Semaphore>,
    name: Option<HeaderValue>,
    /// The health endpoint answers 503.
    failing: AtomicBool,
}

impl App {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, STATS_PATH) => {
                return json(StatusCode::OK, self.paths.stats_json().to_string());
            }
            (&Method::POST, RESET_PATH) => {
                self.paths.reset();
                return json(StatusCode::OK, r#"{"reset":true}"#);
            }
            (&Method::GET, HEALTH_PATH) => {
                return if self.failing.load(Ordering::SeqCst) {
                    json(StatusCode::SERVICE_UNAVAILABLE, r#"{"healthy":false}"#)
                } else {
                    json(StatusCode::OK, r#"{"healthy":true}"#)
                };
            }
            (&Method::POST, HEALTH_FAIL_PATH | HEALTH_OK_PATH) => {
                let fail = req.uri().path() == HEALTH_FAIL_PATH;
                self.failing.store(fail, Ordering::SeqCst);
                return json(StatusCode::OK, format!("{{\"healthy\":{}}}", !fail));
            }
            (&Method::GET, TRACE_PATH) => {
                return json(StatusCode::OK, self.paths.trace_json().to_string());
            }
            (_, STATS_PATH | RESET_PATH | TRACE_PATH) => {
                return json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    r#"{"error":"use GET /__backend/stats, GET /__backend/trace or POST /__backend/reset"}"#,
                );
            }
            _ => {}
        }
        let Some(state) = self.paths.get(&app_path::app_path(req.uri().path())) else {
            // Too many distinct paths to keep counters for: serve, uncounted.
            return json(StatusCode::OK, r#"{"untracked":true}"#);
        };
        let service_ms = match req.headers().get(SERVICE_MS_HEADER) {
            None => None,
            Some(value) => match value.to_str().ok().and_then(parse_service_ms) {
                Some(ms) => Some(ms),
                None => {
                    return json(StatusCode::BAD_REQUEST, r#"{"error":"bad x-service-ms"}"#);
                }
            },
        };
        if let Some(seq) = req.headers().get(SEQ_HEADER) {
            state.record_arrival(&String::from_utf8_lossy(seq.as_bytes()));
        }
        if let Some(tokens) = state.tokens {
            return stream_tokens(state, req, tokens).await;
        }
        match state.on_disconnect {
            OnDisconnect::Cancel => self.serve(state, req, service_ms).await,
            // A task of its own outlives the handler, which hyper drops when
            // the client goes away: the work, and its count, go on.
            OnDisconnect::Finish => {
                tokio::spawn(async move { self.serve(state, req, service_ms).await })
                    .await
                    .unwrap_or_else(|_| json(StatusCode::INTERNAL_SERVER_ERROR, "{}"))
            }
        }
    }

    /// Reads the body, takes a slot (and a worker), works for the service time.
    async fn serve(
        &self,
        state: Arc<PathState>,
        req: Request<Incoming>,
        service_ms: Option<f64>,
    ) -> Response<Body> {
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok());
        let mut inside = state.enter(request_id);

        let body_bytes = match req.into_body().collect().await {
            Ok(body) => body.to_bytes().len(),
            Err(_) => return json(StatusCode::BAD_REQUEST, r#"{"error":"body not read"}"#),
        };

        let _slot = match &state.slots {
            None => None,
            Some(slots) => match slots.overload {
                Overload::Queue => Some(
                    slots
                        .semaphore
                        .acquire()
                        .await
                        .expect("the semaphore is never closed"),
                ),
                Overload::Reject => match slots.semaphore.try_acquire() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        state.count_rejected();
                        return json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            r#"{"error":"over capacity"}"#,
                        );
                    }
                },
                Overload::Error200 => match slots.semaphore.try_acquire() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        state.count_rejected();
                        return json(StatusCode::OK, r#"{"error":"over capacity"}"#);
                    }
                },
            },
        };
        // A request waiting for its path's slot holds no worker: the path's
        // own limit comes first, as in an app with a per-endpoint semaphore.
        let _worker = match &self.workers {
            Some(pool) if state.routed => {
                Some(pool.acquire().await.expect("the semaphore is never closed"))
            }
            _ => None,
        };
        let _serving = inside.start_serving();
        let (service_time, body) = match service_ms {
            None => (state.next_service_time(), state.default_body.clone()),
            Some(ms) => (Duration::from_secs_f64(ms / 1000.0), state.body_for(ms)),
        };
        // An upload's work grows with its size (`ms_per_mb`).
        let service_time =
            service_time + Duration::from_secs_f64(state.ms_per_mb * body_bytes as f64 / 1e9);
        if !service_time.is_zero() {
            precise_sleep::sleep(service_time).await;
        }
        state.count_completed(inside.arrived);
        json(StatusCode::OK, body)
    }
}

/// Answers with `tokens` chunks, one every `service_ms / tokens` once the
/// request holds its path's slot, headers first (as a model streams
/// tokens). The generation runs in a task of its own: with
/// `on_disconnect=finish` it goes on, counted in flight, after the client
/// left; with `cancel` it stops at the first token nobody receives.
async fn stream_tokens(
    state: Arc<PathState>,
    req: Request<Incoming>,
    tokens: u32,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(tokens as usize + 1);
    let (started_tx, started_rx) = oneshot::channel();
    let finish = state.on_disconnect == OnDisconnect::Finish;
    tokio::spawn(async move {
        let mut inside = state.enter(None);
        if req.into_body().collect().await.is_err() {
            return;
        }
        let _slot = match &state.slots {
            None => None,
            Some(slots) => Some(
                slots
                    .semaphore
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            ),
        };
        let _serving = inside.start_serving();
        let _ = started_tx.send(());
        // Each token at its time from the start, so that the sleeps'
        // overshoots do not add up: a generation takes its service time.
        let started = std::time::Instant::now();
        let total = state.next_service_time();
        for i in 0..tokens {
            let due = total * (i + 1) / tokens;
            precise_sleep::sleep(due.saturating_sub(started.elapsed())).await;
            let received = tx.send(Bytes::from(format!("token {i}\n"))).await.is_ok();
            if !received && !finish {
                return;
            }
        }
        state.count_completed(inside.arrived);
    });
    if started_rx.await.is_err() {
        return json(StatusCode::BAD_REQUEST, r#"{"error":"body not read"}"#);
    }
    let mut response = Response::new(BodyExt::boxed_unsync(Tokens(rx)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A response body of the tokens a generation sends, as they come.
struct Tokens(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Tokens {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|token| token.map(|t| Ok(Frame::data(t))))
    }
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
