//! The filter's benchmark: every figure is a ratio or a count measured side
//! by side in one run on this machine, printed as a markdown table.
//!
//! - hot-path cost: requests/s through Sluice (endpoint under capacity) over
//!   requests/s through an empty proxy-wasm filter and through plain Envoy;
//! - slot utilisation under saturation against HAProxy's `maxconn` queue;
//! - the backend's maximum concurrency in that run;
//! - how late the 504s of queue timeouts are.

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;
use sluice_harness::{empty_wasm_path, free_port, Backend, Envoy, FrontProxy, ScratchDir};
use sluice_loadgen::{run_blocking, Burst};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Parser, Debug, Clone)]
#[command(name = "sluice-bench")]
pub struct Opts {
    /// Seconds of load per hot-path measurement.
    #[arg(long, default_value_t = 8)]
    pub seconds: u32,
    /// Rounds of the three hot-path variants, interleaved; the median counts.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    pub concurrency: u32,
    /// Connections for the hot-path load.
    #[arg(long, default_value_t = 32)]
    pub connections: u32,
}

pub fn run(o: &Opts) -> anyhow::Result<()> {
    which("wrk")?;
    which("haproxy")?;
    let mut rows = Vec::new();

    eprintln!(
        "hot path: {} rounds of {} s per variant ...",
        o.rounds, o.seconds
    );
    let hot = hot_path(o)?;
    rows.push(format!(
        "| hot path: Sluice / empty wasm filter (req/s) | {:.3} | ≥ 0.95 | {:.0} / {:.0} |",
        hot.sluice / hot.empty,
        hot.sluice,
        hot.empty
    ));
    rows.push(format!(
        "| hot path: Sluice / plain Envoy (req/s) | {:.3} | — | {:.0} / {:.0} |",
        hot.sluice / hot.plain,
        hot.sluice,
        hot.plain
    ));
    rows.push(format!(
        "| hot path: empty wasm filter / plain Envoy (req/s) | {:.3} | — | {:.0} / {:.0} |",
        hot.empty / hot.plain,
        hot.empty,
        hot.plain
    ));

    eprintln!("saturation: capacity 8, 20 ms service, 64 closed-loop clients ...");
    let ideal = 8.0 / 0.020;
    let sluice = saturation_sluice(o)?;
    let haproxy = saturation_haproxy(o)?;
    let direct = saturation_direct(o)?;
    rows.push(format!(
        "| saturation: Sluice throughput / ideal 8 per 20 ms | {:.3} | ≥ 0.97 | {:.1} / {:.0} req/s |",
        sluice.rps / ideal,
        sluice.rps,
        ideal
    ));
    rows.push(format!(
        "| saturation: HAProxy maxconn 8 throughput / ideal | {:.3} | reference | {:.1} / {:.0} req/s |",
        haproxy.rps / ideal,
        haproxy.rps,
        ideal
    ));
    rows.push(format!(
        "| saturation: the backend alone, 8 clients straight to it / ideal | {:.3} | ceiling | {:.1} / {:.0} req/s |",
        direct.rps / ideal,
        direct.rps,
        ideal
    ));
    rows.push(format!(
        "| saturation: backend's max concurrency, Sluice / HAProxy | {} / {} | = 8 | |",
        sluice.max_in_flight, haproxy.max_in_flight
    ));

    eprintln!("queue-timeout precision: 200 ms timeout ...");
    let late = timeout_lateness(o)?;
    rows.push(format!(
        "| 504 lateness after a 200 ms queue timeout, p50 / p99 / max | {:.1} / {:.1} / {:.1} ms | tens of ms | {} timeouts |",
        late.p50, late.p99, late.max, late.n
    ));

    println!(
        "`make bench`, {}: {}, {} cores; Envoy {}, --concurrency {}\n",
        utc_now(),
        cpu_model(),
        cores(),
        envoy_version(),
        o.concurrency,
    );
    println!("| measure | value | goal | detail |");
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

struct HotPath {
    plain: f64,
    empty: f64,
    sluice: f64,
}

fn hot_path(o: &Opts) -> anyhow::Result<HotPath> {
    let backend = Backend::start_with_args(&["--threads", "1", "--route", "/fast"]);
    let config =
        json!({"service": "bench", "endpoints": {"/fast": {"capacity": 100000}}}).to_string();
    let mut plain = FrontProxy::without_wasm(backend.port());
    plain.stream_idle_timeout_secs = 60;
    let mut empty = FrontProxy::new(backend.port(), "{}");
    empty.wasm_path = Some(empty_wasm_path());
    let sluice = FrontProxy::new(backend.port(), config);
    let (mut p, mut e, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..o.rounds {
        // Interleaved, so drift in the machine's load hits all three alike.
        for (proxy, out) in [(&plain, &mut p), (&empty, &mut e), (&sluice, &mut s)] {
            let envoy = Envoy::start(proxy, o.concurrency);
            // Warm up connections, VMs and caches before measuring.
            wrk(envoy.listener_port(), "/fast", o.connections, 1)?;
            let rps = wrk(envoy.listener_port(), "/fast", o.connections, o.seconds)?;
            eprintln!("  round {round}: {:>6.0} req/s {}", rps, name(proxy));
            out.push(rps);
        }
    }
    Ok(HotPath {
        plain: median(p),
        empty: median(e),
        sluice: median(s),
    })
}

fn name(p: &FrontProxy) -> &'static str {
    match &p.wasm_path {
        None => "plain Envoy",
        Some(w) if w == &empty_wasm_path() => "empty wasm filter",
        Some(_) => "Sluice",
    }
}

struct Saturation {
    rps: f64,
    max_in_flight: u64,
}

const SATURATION_ROUTE: &str = "/work:service_ms=20";

fn saturation_sluice(o: &Opts) -> anyhow::Result<Saturation> {
    let backend = Backend::start(&[SATURATION_ROUTE]);
    let config =
        json!({"service": "bench", "endpoints": {"/work": {"capacity": 8, "queue_timeout": 30}}});
    let envoy = Envoy::start(
        &FrontProxy::new(backend.port(), config.to_string()),
        o.concurrency,
    );
    saturate(envoy.listener_port(), &backend, o)
}

fn saturation_haproxy(o: &Opts) -> anyhow::Result<Saturation> {
    let backend = Backend::start(&[SATURATION_ROUTE]);
    let haproxy = Haproxy::start(backend.port(), 8)?;
    saturate(haproxy.port, &backend, o)
}

/// What this machine allows: exactly 8 closed-loop clients straight to the
/// backend, no proxy and no queue.
fn saturation_direct(o: &Opts) -> anyhow::Result<Saturation> {
    let backend = Backend::start(&[SATURATION_ROUTE]);
    saturate_with(backend.port(), &backend, o, 8)
}

fn saturate(port: u16, backend: &Backend, o: &Opts) -> anyhow::Result<Saturation> {
    saturate_with(port, backend, o, 64)
}

fn saturate_with(
    port: u16,
    backend: &Backend,
    o: &Opts,
    clients: u32,
) -> anyhow::Result<Saturation> {
    wrk(port, "/work", clients, 1)?;
    backend.reset();
    let rps = wrk(port, "/work", clients, o.seconds)?;
    let max_in_flight = backend.path_stats("/work")["max_in_flight"]
        .as_u64()
        .unwrap_or(0);
    Ok(Saturation { rps, max_in_flight })
}

struct Lateness {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn timeout_lateness(o: &Opts) -> anyhow::Result<Lateness> {
    let backend = Backend::start(&["/slow:service_ms=5000"]);
    let config =
        json!({"service": "bench", "endpoints": {"/slow": {"capacity": 1, "queue_timeout": 0.2}}});
    let envoy = Envoy::start(
        &FrontProxy::new(backend.port(), config.to_string()),
        o.concurrency,
    );
    let mut late = Vec::new();
    // Several waves, so the figure covers tick phases and both workers.
    for wave in 0..5 {
        let mut burst = Burst::new(envoy.listener_addr(), "/slow", 41);
        burst.spacing = Duration::from_millis(3);
        burst.first_seq = wave * 100;
        burst.timeout = Duration::from_secs(10);
        for out in run_blocking(&burst) {
            if out.status == 504 {
                late.push(out.latency_ms - 200.0);
            }
        }
    }
    if late.is_empty() {
        bail!("no request timed out in the queue");
    }
    late.sort_by(f64::total_cmp);
    let at = |q: f64| late[((late.len() as f64 * q).ceil() as usize).clamp(1, late.len()) - 1];
    Ok(Lateness {
        n: late.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: *late.last().unwrap(),
    })
}

/// Runs wrk (one thread: the machine has two cores to share) and returns
/// requests per second.
fn wrk(port: u16, path: &str, connections: u32, seconds: u32) -> anyhow::Result<f64> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk saw errors ({}): {text}", line.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}

/// HAProxy with `maxconn` on the server and a queue, as its users run it.
struct Haproxy {
    child: Child,
    port: u16,
    _dir: ScratchDir,
}

impl Haproxy {
    fn start(backend_port: u16, maxconn: u32) -> anyhow::Result<Haproxy> {
        let port = free_port();
        let dir = ScratchDir::new("haproxy");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4096\n\
                 defaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout queue 30s\n\
                 frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
                 backend be\n  server s1 127.0.0.1:{backend_port} maxconn {maxconn}\n"
            ),
        )?;
        let log = dir.path().join("haproxy.log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting haproxy")?;
        let mut h = Haproxy {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..200 {
            if sluice_harness::port_accepts(port) {
                return Ok(h);
            }
            if h.child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "haproxy did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn which(tool: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        bail!("{tool} is not installed: run `make deps`");
    }
    Ok(())
}

fn envoy_version() -> String {
    Command::new("envoy")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            // "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let after = text.split("version: ").nth(1)?.to_string();
            after.split('/').nth(1).map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

/// The date the figures were taken, so a pasted table says when.
fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// The machine the figures come from ("model name" in /proc/cpuinfo).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}
