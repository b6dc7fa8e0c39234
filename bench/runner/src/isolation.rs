//! `make bench-isolation`: does a flood on one endpoint hurt the others?
//!
//! One backend with a pool of 3 workers (like a uvicorn app with 3 worker
//! processes): `/large` takes 500 ms of a worker (an inference call),
//! `/small` 5 ms. Closed-loop clients flood `/large` at 3× its capacity of
//! 2 while an open-loop stream calls `/small`. Small requests' latency is
//! taken first with no flood (idle), then under it, four ways: straight to
//! the backend, through plain Envoy, through HAProxy (one `maxconn` for its
//! one server: it cannot tell endpoints apart), and through Sluice with a
//! capacity per endpoint. Latency is read on three clocks: the client's,
//! the proxy's log (Envoy's access log, HAProxy's `Ta`), and the backend's
//! (arrival to answer, so it holds any wait for a worker).

use crate::access_log;
use crate::figures::{latency_from_backend, Percentiles, Table};
use crate::haproxy::Haproxy;
use crate::machine;
use crate::readme;
use clap::Args;
use serde_json::json;
use sluice_harness::{Backend, Envoy, FrontProxy};
use sluice_loadgen::{run_blocking, run_closed_loop_blocking, Burst, ClosedLoop};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct Opts {
    /// Seconds of the small-request stream, idle and again under the flood.
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// Small requests per second (open loop: sent on time, whatever the
    /// answers do).
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// Envoy worker threads (and HAProxy's nbthread).
    #[arg(long, default_value_t = 2)]
    pub concurrency: u32,
    /// Leave out seed 004's case (small and 25 MB bodies on one endpoint).
    #[arg(long)]
    pub skip_cost: bool,
    /// Only seed 004's case.
    #[arg(long)]
    pub only_cost: bool,
}

const WORKERS: u32 = 3;
const LARGE_CAPACITY: u32 = 2;
const LARGE_MS: u32 = 500;
const SMALL_MS: u32 = 5;
const FLOOD_CLIENTS: usize = 3 * LARGE_CAPACITY as usize;
/// Time for the flood to fill the queues before small requests are timed.
const SETTLE: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Direct,
    PlainEnvoy,
    Haproxy,
    Sluice,
}

impl Setup {
    fn label(self) -> String {
        match self {
            Setup::Direct => "straight to the backend".into(),
            Setup::PlainEnvoy => "plain Envoy".into(),
            Setup::Haproxy => format!("HAProxy, server maxconn {WORKERS}"),
            Setup::Sluice => {
                format!("Sluice, /large capacity {LARGE_CAPACITY}, /small capacity 8")
            }
        }
    }
}

/// Small requests' latency in one phase, on each clock.
#[derive(Default)]
struct Phase {
    client: Percentiles,
    /// `None` straight to the backend: no proxy, no log.
    proxy_log: Option<Percentiles>,
    backend: Percentiles,
    /// `/large` answers per second during the phase, on the backend's clock.
    large_rps: f64,
}

pub fn run(o: &Opts) -> anyhow::Result<()> {
    if o.only_cost {
        // The section is the whole isolation table's: print, do not publish.
        let (cost, _) = crate::isolation_cost::run(o)?;
        let command = "sluice-bench isolation --only-cost";
        println!(
            "{}; --concurrency {}, --seconds {}\n\n{cost}",
            machine::header(command),
            o.concurrency,
            o.seconds
        );
        return Ok(());
    }
    machine::require("haproxy")?;
    let mut t = Table::new(&[
        "small requests",
        "clock",
        "idle p50 / p99 ms",
        "flooded p50 / p99 ms",
        "flooded p99 / idle p99",
        "/large req/s flooded",
    ]);
    let mut verdict = None;
    for setup in [
        Setup::Direct,
        Setup::PlainEnvoy,
        Setup::Haproxy,
        Setup::Sluice,
    ] {
        eprintln!("isolation: {} ...", setup.label());
        let (idle, flooded) = measure(setup, o)?;
        let clocks = [
            ("proxy's log", idle.proxy_log, flooded.proxy_log),
            ("client", Some(idle.client), Some(flooded.client)),
            ("backend", Some(idle.backend), Some(flooded.backend)),
        ];
        for (clock, idle_p, flooded_p) in clocks {
            let (Some(i), Some(f)) = (idle_p, flooded_p) else {
                continue;
            };
            let ratio = f.p99 / i.p99;
            if setup == Setup::Sluice && clock == "proxy's log" {
                verdict = Some(ratio);
            }
            t.row(vec![
                setup.label(),
                clock.into(),
                format!("{:.1} / {:.1}", i.p50, i.p99),
                format!("{:.1} / {:.1}", f.p50, f.p99),
                format!("{ratio:.2}"),
                format!("{:.1}", flooded.large_rps),
            ]);
        }
    }
    let mut out = format!(
        "{}; --concurrency {}\n\n",
        machine::header("make bench-isolation"),
        o.concurrency
    );
    out += &format!(
        "Backend: {WORKERS} workers shared by /small ({SMALL_MS} ms) and /large ({LARGE_MS} ms). \
         Flood: {FLOOD_CLIENTS} closed-loop clients on /large (3× its capacity of {LARGE_CAPACITY}). \
         Small: {} req/s open loop, {} s idle then {} s flooded. \
         Goal: through Sluice, small p99 flooded ≤ 2× idle.\n\n",
        o.rate, o.seconds, o.seconds
    );
    out += &t.render();
    if let Some(ratio) = verdict {
        let met = if ratio <= 2.0 { "met" } else { "NOT met" };
        out += &format!(
            "\nSluice, Envoy's access log: flooded p99 / idle p99 = {ratio:.2}: goal {met}.\n"
        );
    }
    if !o.skip_cost {
        let (cost, _) = crate::isolation_cost::run(o)?;
        out += "\n";
        out += &cost;
    }
    readme::publish("isolation", &out)
}

fn measure(setup: Setup, o: &Opts) -> anyhow::Result<(Phase, Phase)> {
    let backend = Backend::start_with_args(&[
        "--workers",
        &WORKERS.to_string(),
        "--route",
        &format!("/small:service_ms={SMALL_MS}"),
        "--route",
        &format!("/large:service_ms={LARGE_MS}"),
    ]);
    // Each setup keeps its proxy (if any) alive for both phases; its log
    // is read while it runs.
    let mut envoy_log = None;
    let mut _envoy = None;
    let mut haproxy = None;
    let addr: SocketAddr = match setup {
        Setup::Direct => backend.addr(),
        Setup::PlainEnvoy | Setup::Sluice => {
            let mut proxy = if setup == Setup::Sluice {
                let config = json!({"service": "bench", "endpoints": {
                    "/large": {"capacity": LARGE_CAPACITY, "queue_timeout": 60},
                    "/small": {"capacity": 8, "queue_timeout": 5}}});
                FrontProxy::new(backend.port(), config.to_string())
            } else {
                FrontProxy::without_wasm(backend.port())
            };
            envoy_log = Some(access_log::enable(&mut proxy));
            let envoy = Envoy::start(&proxy, o.concurrency);
            let addr = envoy.listener_addr();
            _envoy = Some(envoy);
            addr
        }
        Setup::Haproxy => {
            let h = Haproxy::start(
                backend.port(),
                WORKERS,
                o.concurrency,
                Duration::from_secs(60),
            )?;
            let addr = ([127, 0, 0, 1], h.port).into();
            haproxy = Some(h);
            addr
        }
    };
    // Warm up connections (and Envoy's VMs) on both paths.
    let mut warm = Burst::new(addr, "/small?warmup", 10);
    warm.spacing = Duration::from_millis(10);
    run_blocking(&warm);

    let proxy_log = |tag: &str| -> Option<Percentiles> {
        let path = format!("/small?{tag}");
        if let Some(log) = &envoy_log {
            let entries = access_log::read_settled(log);
            let ms = entries
                .iter()
                .filter(|e| e.path == path && e.status == 200)
                .map(|e| e.total_ms());
            return Some(Percentiles::of(ms.collect()));
        }
        haproxy.as_ref().map(|h| {
            let lines = h.log_lines();
            let ms = lines
                .iter()
                .filter(|l| l.uri == path && l.status == 200)
                .map(|l| l.ta_ms as f64);
            Percentiles::of(ms.collect())
        })
    };

    let idle = small_stream(addr, &backend, "idle", o);
    let idle = Phase {
        proxy_log: proxy_log("idle"),
        ..idle
    };

    let mut flood = ClosedLoop::new(
        addr,
        "/large?flood",
        FLOOD_CLIENTS,
        SETTLE + Duration::from_secs(u64::from(o.seconds) + 1),
    );
    flood.timeout = Duration::from_secs(60);
    let flooding = std::thread::spawn(move || run_closed_loop_blocking(&flood));
    std::thread::sleep(SETTLE);
    let flooded = small_stream(addr, &backend, "flooded", o);
    let report = flooding.join().expect("flood thread");
    if report.errors > 0 {
        anyhow::bail!("the flood saw errors: {report:?}");
    }
    let flooded = Phase {
        proxy_log: proxy_log("flooded"),
        ..flooded
    };
    Ok((idle, flooded))
}

/// `rate` small requests a second for `seconds`, each on its own
/// connection, sent on schedule whatever the answers do.
fn small_stream(addr: SocketAddr, backend: &Backend, tag: &str, o: &Opts) -> Phase {
    backend.reset();
    let started = Instant::now();
    let mut burst = Burst::new(
        addr,
        &format!("/small?{tag}"),
        (o.rate * o.seconds) as usize,
    );
    burst.spacing = Duration::from_secs_f64(1.0 / f64::from(o.rate));
    burst.timeout = Duration::from_secs(30);
    let outcomes = run_blocking(&burst);
    let elapsed = started.elapsed().as_secs_f64();
    let failed = outcomes.iter().filter(|r| r.status != 200).count();
    if failed > 0 {
        eprintln!("  {failed} small requests failed ({tag})");
    }
    let stats = backend.stats();
    let large_done = stats["paths"]["/large"]["completed"].as_u64().unwrap_or(0);
    Phase {
        client: Percentiles::of(
            outcomes
                .iter()
                .filter(|r| r.status == 200)
                .map(|r| r.latency_ms)
                .collect(),
        ),
        proxy_log: None,
        backend: latency_from_backend(&stats["paths"]["/small"]),
        large_rps: large_done as f64 / elapsed,
    }
}
