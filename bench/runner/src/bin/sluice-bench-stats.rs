//! What the stats page costs Envoy with many endpoints: Envoy's own CPU
//! time (utime + stime of all its threads, from /proc) per `GET
//! /balancer/stats`, one client after another on a keep-alive connection,
//! and Envoy's CPU while 8 clients ask as fast as they can. Prints figures;
//! it asserts nothing (a timed test would be flaky on shared cores).
//!
//!     cargo build --release -p sluice-bench -p sluice-backend && make wasm
//!     target/release/sluice-bench-stats [--endpoints 1001] [--requests 200]
//!         [--seconds 3] [--baseline path/to/older/sluice_filter.wasm]
//!
//! `--baseline` measures another build of the filter the same way, e.g. the
//! one before the stats cache (`git stash; make wasm; cp …`).

use serde_json::json;
use sluice_bench::cpu_time;
use sluice_harness::{wasm_path, Backend, Envoy, FrontProxy};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    endpoints: usize,
    requests: usize,
    seconds: u64,
    baseline: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        endpoints: 1001,
        requests: 200,
        seconds: 3,
        baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoints" => a.endpoints = value().parse().expect("--endpoints N"),
            "--requests" => a.requests = value().parse().expect("--requests N"),
            "--seconds" => a.seconds = value().parse().expect("--seconds N"),
            "--baseline" => a.baseline = Some(PathBuf::from(value())),
            other => panic!("unknown flag {other}; see the comment at the top of this file"),
        }
    }
    a
}

/// One GET of the stats on a keep-alive connection; the body's length.
fn get_stats(stream: &mut TcpStream) -> usize {
    let reply = sluice_harness::http::keep_alive_get(stream, "/balancer/stats");
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body.len()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

struct Figures {
    body_bytes: usize,
    cpu_ms_per_request: f64,
    flood_rps: f64,
    flood_cpu_percent: f64,
}

fn measure(wasm: PathBuf, a: &Args) -> Figures {
    let backend = Backend::start(&["/ep/0:service_ms=1"]);
    let endpoints: serde_json::Map<String, serde_json::Value> = (0..a.endpoints)
        .map(|i| (format!("/ep/{i}"), json!({"capacity": 4})))
        .collect();
    let config = json!({"service": "bench", "endpoints": endpoints});
    let proxy = FrontProxy::with_wasm(backend.port(), Some(wasm), config.to_string());
    let envoy = Envoy::start(&proxy, 2);
    let mut stream = connect(envoy.listener_addr());
    let mut body_bytes = 0;
    for _ in 0..20 {
        body_bytes = get_stats(&mut stream);
    }
    let cpu = || cpu_time(envoy.pid()).expect("Envoy's CPU time");
    let before = cpu();
    for _ in 0..a.requests {
        get_stats(&mut stream);
    }
    let cpu_ms_per_request = (cpu() - before).as_secs_f64() * 1000.0 / a.requests as f64;

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let addr = envoy.listener_addr();
    let before = cpu();
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            std::thread::spawn(move || {
                let mut s = connect(addr);
                while !stop.load(Ordering::Relaxed) {
                    get_stats(&mut s);
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(a.seconds));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = (cpu() - before).as_secs_f64();
    Figures {
        body_bytes,
        cpu_ms_per_request,
        flood_rps: served.load(Ordering::Relaxed) as f64 / elapsed,
        flood_cpu_percent: cpu_s / elapsed * 100.0,
    }
}

fn main() {
    let a = args();
    let mut runs = vec![("this build".to_string(), wasm_path())];
    if let Some(b) = &a.baseline {
        runs.push((format!("baseline ({})", b.display()), b.clone()));
    }
    println!(
        "Stats page, {} endpoints, Envoy --concurrency 2: CPU per request over {} sequential requests; \
         then 8 keep-alive clients for {} s",
        a.endpoints, a.requests, a.seconds
    );
    println!();
    println!(
        "| filter | body bytes | Envoy CPU ms per stats request | 8 clients: stats/s | \
         8 clients: Envoy CPU % | 8 clients: CPU ms per stats request |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, wasm) in runs {
        let f = measure(wasm, &a);
        println!(
            "| {label} | {} | {:.2} | {:.0} | {:.0} | {:.2} |",
            f.body_bytes,
            f.cpu_ms_per_request,
            f.flood_rps,
            f.flood_cpu_percent,
            f.flood_cpu_percent * 10.0 / f.flood_rps
        );
    }
}
