//! `make bench-sync`: how long a capacity written to Redis takes to be in
//! force on every worker of two Envoys (`--concurrency 4` each), through the
//! real `sluice-sync` and the filter's gRPC stream.
//!
//! "Seen by a worker" is made observable with the stats page: every worker
//! answers `GET /balancer/stats` itself, from the endpoint's shared record
//! (the very record its admissions read), and says which worker it is
//! (`served_by_worker`). A keep-alive connection stays on the worker that
//! accepted it, so one polling connection per worker, found by reconnecting
//! until each worker has one, watches that worker. The capacity alternates
//! between two values; for each change the clock starts just before the
//! prober's own write (`RedisRecords::put`: DEL, HSET, SADD, INCR version and
//! PUBLISH in one MULTI) and stops, per worker, at the first stats response
//! showing the new value. Each poller waits 1 ms between requests, so a
//! figure is late by up to that plus one request.

use anyhow::{bail, Context as _};
use clap::Parser;
use serde_json::{json, Value};
use sluice_core::capacity_record::{CapacityRecord, Source};
use sluice_harness::{Backend, Envoy, FrontProxy, Redis, SyncService, SYNC_CLUSTER};
use sluice_prober::redis_records::RedisRecords;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SERVICE: &str = "bench";
const PATH: &str = "/k";
const VALUES: [u32; 2] = [40, 41];
const POLL_GAP: Duration = Duration::from_millis(1);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(about = "Redis write -> capacity in force on every worker of two Envoys")]
struct Opts {
    /// Capacity changes to time.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// Envoys following the same service.
    #[arg(long, default_value_t = 2)]
    envoys: usize,
}

fn main() -> anyhow::Result<()> {
    run(&Opts::parse())
}

/// The last capacity one (Envoy, worker) showed, and when it first did.
type Seen = Arc<Mutex<BTreeMap<(usize, u64), (u64, Instant)>>>;

fn run(opts: &Opts) -> anyhow::Result<()> {
    let redis = Redis::start();
    let sync = SyncService::start(&redis.url(), &[]);
    let backend = Backend::start(&["/k:service_ms=1"]);
    let config = json!({
        "service": SERVICE,
        "sync": {"cluster": SYNC_CLUSTER},
        "endpoints": {PATH: {"capacity": 10}},
    });
    let envoys: Vec<Envoy> = (0..opts.envoys)
        .map(|_| {
            let mut proxy = FrontProxy::new(backend.port(), config.to_string());
            proxy.extra_clusters_yaml = sync.cluster_yaml();
            Envoy::start(&proxy, opts.concurrency)
        })
        .collect();
    let mut records =
        RedisRecords::connect(&redis.url(), SERVICE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let put = |records: &mut RedisRecords, capacity: u32| {
        let record = CapacityRecord {
            capacity,
            p99_ms: None,
            rps: None,
            error_rate: None,
            measured_at: 0,
            source: Source::Manual,
        };
        records
            .put(PATH, &record)
            .map_err(|e| anyhow::anyhow!("{e}"))
    };

    let seen: Seen = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut pollers = Vec::new();
    for (e, envoy) in envoys.iter().enumerate() {
        for conn in connections_to_every_worker(envoy.listener_addr(), opts.concurrency)? {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            pollers.push(std::thread::spawn(move || poll(e, conn, &seen, &stop)));
        }
    }
    let watched = envoys.len() * opts.concurrency as usize;
    eprintln!(
        "watching {watched} workers of {} Envoys; {} changes",
        envoys.len(),
        opts.changes
    );

    // Warm up: sync connected and a first value everywhere.
    put(&mut records, VALUES[1])?;
    wait_all(&seen, watched, u64::from(VALUES[1]), Instant::now())
        .context("the first value never arrived")?;

    let mut every_worker = Vec::new();
    let mut one_worker = Vec::new();
    for i in 0..opts.changes {
        let value = VALUES[i % 2];
        std::thread::sleep(Duration::from_millis(20 + (i as u64 * 7) % 30));
        let t0 = Instant::now();
        put(&mut records, value)?;
        let per_worker = wait_all(&seen, watched, u64::from(value), t0)
            .with_context(|| format!("change {i} to {value}"))?;
        every_worker.push(*per_worker.iter().max().unwrap());
        one_worker.extend(per_worker);
        if (i + 1) % 50 == 0 {
            eprintln!("{} changes", i + 1);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        let _ = p.join();
    }

    let mut out = format!("{}\n\n", sluice_bench::machine::header("make bench-sync"));
    out += &format!(
        "Redis write (prober's MULTI) to the new capacity in force, {} changes, {} Envoys x {} workers\n\n",
        opts.changes,
        envoys.len(),
        opts.concurrency
    );
    out += "| seen by | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|\n";
    for (name, samples) in [
        (
            "every worker of every Envoy (slowest of each change)",
            &mut every_worker,
        ),
        ("one worker (each worker, each change)", &mut one_worker),
    ] {
        samples.sort();
        out += &format!(
            "| {name} | {:.1} | {:.1} | {:.1} |\n",
            ms(percentile(samples, 0.50)),
            ms(percentile(samples, 0.99)),
            ms(*samples.last().unwrap()),
        );
    }
    out += &format!("\n(stats polled every {POLL_GAP:?} per worker; figures include that)\n");
    sluice_bench::readme::publish("sync", &out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Waits until `watched` workers all show `value` first seen after `t0`;
/// how long after `t0` each did.
fn wait_all(seen: &Seen, watched: usize, value: u64, t0: Instant) -> anyhow::Result<Vec<Duration>> {
    loop {
        {
            let seen = seen.lock().unwrap();
            let done: Vec<Duration> = seen
                .values()
                .filter(|(v, at)| *v == value && *at >= t0)
                .map(|(_, at)| *at - t0)
                .collect();
            if done.len() == watched {
                return Ok(done);
            }
        }
        if t0.elapsed() > CHANGE_TIMEOUT {
            bail!("not every worker showed {value} within {CHANGE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

/// One keep-alive connection per worker: connect, ask who serves it, keep
/// it if that worker has none yet.
fn connections_to_every_worker(addr: SocketAddr, workers: u32) -> anyhow::Result<Vec<Conn>> {
    let mut by_worker = BTreeMap::new();
    for _ in 0..500 {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        };
        let (worker, _) = stats(&mut conn)?;
        by_worker.entry(worker).or_insert(conn);
        if by_worker.len() == workers as usize {
            return Ok(by_worker.into_values().collect());
        }
    }
    let got: BTreeSet<_> = by_worker.keys().collect();
    bail!("500 connections reached only workers {got:?} of {addr}")
}

fn poll(envoy: usize, mut conn: Conn, seen: &Seen, stop: &AtomicBool) -> anyhow::Result<()> {
    while !stop.load(Ordering::SeqCst) {
        let (worker, capacity) = stats(&mut conn)?;
        let now = Instant::now();
        let mut seen = seen.lock().unwrap();
        let entry = seen.entry((envoy, worker)).or_insert((capacity, now));
        if entry.0 != capacity {
            *entry = (capacity, now);
        }
        drop(seen);
        std::thread::sleep(POLL_GAP);
    }
    Ok(())
}

/// `GET /balancer/stats` on the connection: (serving worker, capacity).
fn stats(conn: &mut Conn) -> anyhow::Result<(u64, u64)> {
    conn.writer
        .write_all(b"GET /balancer/stats HTTP/1.1\r\nhost: bench\r\n\r\n")?;
    let mut line = String::new();
    conn.reader.read_line(&mut line)?;
    if !line.starts_with("HTTP/1.1 200") {
        bail!("stats: {line:?}");
    }
    let mut length = 0;
    loop {
        line.clear();
        conn.reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            }
        }
    }
    let mut body = vec![0; length];
    conn.reader.read_exact(&mut body)?;
    let doc: Value = serde_json::from_slice(&body)?;
    let worker = doc["served_by_worker"]
        .as_u64()
        .context("served_by_worker")?;
    let capacity = doc["endpoints"][PATH]["capacity"].as_u64().unwrap_or(0);
    Ok((worker, capacity))
}
