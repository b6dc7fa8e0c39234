//! `make bench-isolation`, seed 004's case (learn-fastapi-async: small
//! requests waited behind 25 MB uploads on the same endpoint, p95 658 ms
//! against 40 ms): one endpoint, small (1 KB) and 25 MB bodies mixed.
//!
//! The backend has 4 workers (`capacity=4,overload=queue`) and a service
//! time that grows with the body it reads (`ms_per_mb`): a 25 MB upload
//! holds a worker for about a second, a 1 KB request for 5 ms. Closed-loop
//! clients keep uploading 25 MB bodies (more than the workers take) while
//! an open-loop stream sends 1 KB ones. Small requests' latency is taken
//! idle, then under the uploads, on Envoy's access log and the client's
//! clock, through Sluice configured four ways:
//! - plain FIFO, capacity 4 requests: four uploads take every worker, and a
//!   small request queues behind the uploads waiting;
//! - fair queueing over two tenants (uploads, small), still 4 requests: the
//!   grants alternate between the tenants, but each one an upload gets
//!   holds a worker for a second, so the small tenant gets about as few
//!   grants as the uploads, fewer than it sends, and its queue grows;
//! - cost by size, capacity 80 units of 1 MB: at most three uploads run, but
//!   one FIFO in units (no backfill past the head) keeps small requests
//!   behind the uploads waiting;
//! - cost by size and the two tenants: three uploads run, the fourth
//!   worker's units stay for small requests, which are first in their
//!   tenant's turn.

use crate::access_log;
use crate::figures::{Percentiles, Table};
use crate::isolation::Opts;
use serde_json::{json, Value};
use sluice_harness::http::Request;
use sluice_harness::{Backend, Envoy, FrontProxy};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PATH: &str = "/upload";
const WORKERS: u32 = 4;
const SMALL_BYTES: usize = 1000;
const BIG_BYTES: usize = 25_000_000;
const SERVICE_MS: u32 = 5;
const MS_PER_MB: u32 = 40;
const UPLOAD_CLIENTS: usize = 6;
/// Units of 1 MB: three 25 MB uploads and room for small requests.
const COST_CAPACITY: u32 = 80;
/// Time for the uploads to fill the queue before small requests are timed.
const SETTLE: Duration = Duration::from_millis(3000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Fifo,
    Tenants,
    Cost,
    CostTenants,
}

impl Setup {
    fn label(self) -> String {
        match self {
            Setup::Fifo => format!("plain FIFO, capacity {WORKERS} requests"),
            Setup::Tenants => {
                format!("tenants (uploads, small), capacity {WORKERS} requests")
            }
            Setup::Cost => format!("cost by size, capacity {COST_CAPACITY} × 1 MB"),
            Setup::CostTenants => {
                format!("cost by size + tenants, capacity {COST_CAPACITY} × 1 MB")
            }
        }
    }

    fn config(self) -> Value {
        let cost = matches!(self, Setup::Cost | Setup::CostTenants);
        let mut endpoint = json!({"capacity": WORKERS, "queue_timeout": 120, "max_queue": 1000});
        if cost {
            endpoint["capacity"] = json!(COST_CAPACITY);
            endpoint["cost"] = json!({"unit_bytes": 1_000_000});
        }
        let mut config = json!({"service": "bench", "endpoints": {PATH: endpoint}});
        if matches!(self, Setup::Tenants | Setup::CostTenants) {
            config["tenants"] = json!({"header": "x-tenant"});
        }
        config
    }
}

/// One setup's small requests, idle and under the uploads.
struct Run {
    idle_log: Percentiles,
    flooded_log: Percentiles,
    idle_client: Percentiles,
    flooded_client: Percentiles,
    uploads_per_s: f64,
}

/// The seed-004 table, and Sluice's cost-by-size ratio (flooded p99 over
/// idle p99, Envoy's access log).
pub fn run(o: &Opts) -> anyhow::Result<(String, Option<f64>)> {
    let mut t = Table::new(&[
        "Sluice on one endpoint",
        "clock",
        "small idle p50 / p99 ms",
        "small with uploads p50 / p99 ms",
        "p99 / idle p99",
        "25 MB uploads/s",
    ]);
    let mut verdict = None;
    for setup in [Setup::Fifo, Setup::Tenants, Setup::Cost, Setup::CostTenants] {
        eprintln!("isolation, seed 004: {} ...", setup.label());
        let r = measure(setup, o)?;
        for (clock, i, f) in [
            ("proxy's log", r.idle_log, r.flooded_log),
            ("client", r.idle_client, r.flooded_client),
        ] {
            let ratio = f.p99 / i.p99;
            if setup == Setup::CostTenants && clock == "proxy's log" {
                verdict = Some(ratio);
            }
            t.row(vec![
                setup.label(),
                clock.into(),
                format!("{:.1} / {:.1}", i.p50, i.p99),
                format!("{:.1} / {:.1}", f.p50, f.p99),
                format!("{ratio:.2}"),
                format!("{:.2}", r.uploads_per_s),
            ]);
        }
    }
    let mut out = format!(
        "Seed 004's case: one endpoint `{PATH}`, a backend of {WORKERS} workers whose service \
         time is {SERVICE_MS} ms + {MS_PER_MB} ms per MB of body (a 25 MB upload: about 1 s). \
         {UPLOAD_CLIENTS} closed-loop clients upload 25 MB bodies; small: 1 KB bodies, {} req/s \
         open loop, {} s idle then {} s with the uploads. Goal: with cost by size, small p99 ≤ 2× \
         idle.\n\n",
        o.rate, o.seconds, o.seconds
    );
    out += &t.render();
    if let Some(ratio) = verdict {
        let met = if ratio <= 2.0 { "met" } else { "NOT met" };
        out += &format!(
            "\nCost by size + tenants, Envoy's access log: small p99 with uploads / idle p99 = \
             {ratio:.2}: goal {met}.\n"
        );
    }
    Ok((out, verdict))
}

fn measure(setup: Setup, o: &Opts) -> anyhow::Result<Run> {
    let backend = Backend::start_with_args(&[
        "--route",
        &format!(
            "{PATH}:capacity={WORKERS},overload=queue,service_ms={SERVICE_MS},ms_per_mb={MS_PER_MB}"
        ),
    ]);
    let mut proxy = FrontProxy::new(backend.port(), setup.config().to_string());
    let log = access_log::enable(&mut proxy);
    let envoy = Envoy::start(&proxy, o.concurrency);
    let addr = envoy.listener_addr();
    small_stream(addr, "warmup", 10, 50.0);
    let idle_client = small_stream(addr, "idle", o.rate * o.seconds, f64::from(o.rate));

    let uploads_from = Instant::now();
    let until = uploads_from + SETTLE + Duration::from_secs(u64::from(o.seconds) + 1);
    let uploads: Vec<_> = (0..UPLOAD_CLIENTS)
        .map(|_| std::thread::spawn(move || upload_loop(addr, until)))
        .collect();
    std::thread::sleep(SETTLE);
    let flooded_client = small_stream(addr, "flooded", o.rate * o.seconds, f64::from(o.rate));
    let mut uploaded = 0;
    for u in uploads {
        uploaded += u.join().expect("upload thread")?;
    }
    let upload_secs = uploads_from.elapsed().as_secs_f64();
    let entries = access_log::read_settled(&log);
    let small_log = |tag: &str| {
        let path = format!("{PATH}?{tag}");
        Percentiles::of(
            entries
                .iter()
                .filter(|e| e.path == path && e.status == 200)
                .map(|e| e.total_ms())
                .collect(),
        )
    };
    drop(envoy);
    Ok(Run {
        idle_log: small_log("idle"),
        flooded_log: small_log("flooded"),
        idle_client,
        flooded_client,
        uploads_per_s: f64::from(uploaded) / upload_secs,
    })
}

/// 25 MB uploads one after another until `until`; how many got a 200.
fn upload_loop(addr: SocketAddr, until: Instant) -> anyhow::Result<u32> {
    let r = Request::new("POST", addr, &format!("{PATH}?upload"))
        .header("x-tenant", "uploads")
        .body(vec![b'x'; BIG_BYTES])
        .timeout(Duration::from_secs(120));
    let mut ok = 0;
    while Instant::now() < until {
        let response = r.send()?;
        if response.status != 200 {
            anyhow::bail!("an upload got {}: {}", response.status, response.text());
        }
        ok += 1;
    }
    Ok(ok)
}

/// `n` small requests at `rate` a second, each on its own connection and
/// thread, sent on schedule whatever the answers do; the client's latency.
fn small_stream(addr: SocketAddr, tag: &str, n: u32, rate: f64) -> Percentiles {
    let request = Arc::new(
        Request::new("POST", addr, &format!("{PATH}?{tag}"))
            .header("x-tenant", "small")
            .body(vec![b'x'; SMALL_BYTES])
            .timeout(Duration::from_secs(120)),
    );
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let at = start + Duration::from_secs_f64(f64::from(i) / rate);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let request = Arc::clone(&request);
            std::thread::spawn(move || {
                let sent = Instant::now();
                let r = request.send();
                (r.map(|r| r.status).unwrap_or(0), sent.elapsed())
            })
        })
        .collect();
    let mut ms = Vec::new();
    let mut failed = 0;
    for h in handles {
        match h.join().expect("small request thread") {
            (200, took) => ms.push(took.as_secs_f64() * 1000.0),
            _ => failed += 1,
        }
    }
    if failed > 0 {
        eprintln!("  {failed} small requests failed ({tag})");
    }
    Percentiles::of(ms)
}
