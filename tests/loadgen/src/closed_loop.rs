//! Closed-loop clients: each sends a request on its keep-alive connection,
//! waits for the answer, and sends the next, until the time is up. Some
//! clients give up on a request on purpose (an *abort*: the connection is
//! closed), at a random moment, so that a proxy in front sees clients leave
//! while queued and while in flight.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct ClosedLoop {
    pub addr: SocketAddr,
    pub path: String,
    pub clients: usize,
    /// No request is sent after this; those under way are seen to the end.
    pub duration: Duration,
    /// Share of requests (0 to 1) the client abandons: it closes the
    /// connection after a delay drawn uniformly from `0..abort_within`,
    /// unless the answer came first.
    pub abort_share: f64,
    pub abort_within: Duration,
    /// Give up on an answer after this long (counted as an error).
    pub timeout: Duration,
    /// Seeds the abort draws, so a run can be repeated.
    pub seed: u64,
}

impl ClosedLoop {
    pub fn new(addr: SocketAddr, path: &str, clients: usize, duration: Duration) -> ClosedLoop {
        ClosedLoop {
            addr,
            path: path.to_string(),
            clients,
            duration,
            abort_share: 0.0,
            abort_within: Duration::ZERO,
            timeout: Duration::from_secs(60),
            seed: 1,
        }
    }
}

/// What the clients saw, all together.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoopReport {
    pub sent: u64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Answers by `x-sluice-reason` (local replies of the filter).
    pub reasons: BTreeMap<String, u64>,
    pub aborted: u64,
    /// Connect or transport failures and timeouts; the client reconnects.
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
}

impl LoopReport {
    /// Answers with this status.
    pub fn status(&self, code: u16) -> u64 {
        self.statuses.get(&code).copied().unwrap_or(0)
    }

    /// 2xx answers per second.
    pub fn ok_per_second(&self) -> f64 {
        let ok: u64 = self
            .statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        ok as f64 / self.elapsed_s.max(1e-9)
    }

    fn merge(&mut self, other: LoopReport) {
        self.sent += other.sent;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.reasons {
            *self.reasons.entry(k).or_default() += v;
        }
        self.aborted += other.aborted;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

pub async fn run_closed_loop(spec: &ClosedLoop) -> LoopReport {
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut tasks = Vec::with_capacity(spec.clients);
    for i in 0..spec.clients {
        let spec = spec.clone();
        let seed = spec.seed.wrapping_add(i as u64);
        tasks.push(tokio::spawn(
            async move { client(&spec, deadline, seed).await },
        ));
    }
    let mut report = LoopReport::default();
    for t in tasks {
        report.merge(t.await.expect("client task panicked"));
    }
    report.elapsed_s = start.elapsed().as_secs_f64();
    report
}

/// On a runtime of its own (one thread), for tools without one.
pub fn run_closed_loop_blocking(spec: &ClosedLoop) -> LoopReport {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(run_closed_loop(spec))
}

type Connection = (
    http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
);

async fn client(spec: &ClosedLoop, deadline: Instant, seed: u64) -> LoopReport {
    let mut report = LoopReport::default();
    let mut rng = XorShift::new(seed);
    let mut conn: Option<Connection> = None;
    while Instant::now() < deadline {
        // A proxy that drains a listener closes its keep-alive connections:
        // open a new one, as any client would.
        if conn.as_ref().is_none_or(|(s, _)| s.is_closed()) {
            if let Some((_, task)) = conn.take() {
                task.abort();
            }
            match connect(spec.addr).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    failed(&mut report, format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let (sender, _) = conn.as_mut().expect("connected above");
        let request = hyper::Request::builder()
            .uri(spec.path.as_str())
            .header("host", spec.addr.to_string())
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let abort_at = (rng.unit() < spec.abort_share)
            .then(|| spec.abort_within.mul_f64(rng.unit()))
            .filter(|at| *at < spec.timeout);
        report.sent += 1;
        let answer = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let reason = response
                .headers()
                .get("x-sluice-reason")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>((status, reason))
        };
        match tokio::time::timeout(abort_at.unwrap_or(spec.timeout), answer).await {
            Ok(Ok((status, reason))) => {
                *report.statuses.entry(status).or_default() += 1;
                if let Some(r) = reason {
                    *report.reasons.entry(r).or_default() += 1;
                }
            }
            Ok(Err(e)) => {
                failed(&mut report, e.to_string());
                drop_connection(&mut conn);
            }
            Err(_) if abort_at.is_some() => {
                // Closing the socket is what a client that gives up does:
                // the proxy sees a downstream reset.
                report.aborted += 1;
                drop_connection(&mut conn);
            }
            Err(_) => {
                failed(&mut report, format!("no answer within {:?}", spec.timeout));
                drop_connection(&mut conn);
            }
        }
    }
    drop_connection(&mut conn);
    report
}

fn failed(report: &mut LoopReport, e: String) {
    report.errors += 1;
    report.first_error.get_or_insert(e);
}

fn drop_connection(conn: &mut Option<Connection>) {
    if let Some((sender, task)) = conn.take() {
        drop(sender);
        task.abort();
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Connection> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    Ok((sender, tokio::spawn(conn)))
}

/// xorshift64*: enough randomness to spread aborts, and repeatable.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Any seed but 0; spread small seeds over the bits.
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_enough_and_repeatable() {
        let mut a = XorShift::new(7);
        let draws: Vec<f64> = (0..10_000).map(|_| a.unit()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let below_half = draws.iter().filter(|d| **d < 0.5).count();
        assert!((4_700..5_300).contains(&below_half), "{below_half}");
        let mut b = XorShift::new(7);
        assert_eq!(b.unit(), draws[0]);
    }
}
