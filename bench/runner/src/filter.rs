//! `make bench`: the filter side by side with its references, one run, one
//! machine, one markdown table.
//!
//! - hot path: requests/s through Sluice (endpoint under capacity) against
//!   an empty proxy-wasm filter and Sluice with `metrics: false`, two
//!   proxies under load at the same moment (the goals), and one after
//!   another with plain Envoy too, with Envoy's CPU time per request;
//! - saturation: for two shapes of endpoint, the handover gap (how long a
//!   freed slot stays empty while requests wait, on the backend's clock and
//!   on Envoy's) and the throughput, Sluice against HAProxy's `maxconn`
//!   queue on the same backend and load, at each Envoy `--concurrency`;
//! - queue timeouts: how late the 504 (Sluice, from Envoy's access log) and
//!   HAProxy's 503 (from its log) come after the timeout;
//! - queue depth: what Sluice adds to Envoy's CPU per request with 20,
//!   1,000 and 10,000 requests waiting (and with 3 classes × 64 tenants),
//!   over an empty filter whose requests wait in Envoy's own connection
//!   pool, at the same connection count.

use crate::access_log;
use crate::figures::{gap_from_backend, median, Percentiles, Table};
use crate::haproxy::Haproxy;
use crate::machine;
use crate::readme;
use crate::wrk::{cpu_time, wrk, wrk_run, wrk_run_script};
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde_json::json;
use sluice_backend::handover::GapSummary;
use sluice_harness::{
    empty_wasm_path, wait_until, Backend, Envoy, FrontProxy, Redis, SyncService, SYNC_CLUSTER,
};
use sluice_loadgen::{run_blocking, Burst, Outcome};
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct Opts {
    /// Seconds of load per hot-path and saturation measurement.
    #[arg(long, default_value_t = 8)]
    pub seconds: u32,
    /// Rounds of the four hot-path variants, interleaved, each round in a
    /// rotated order; the median counts.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Envoy worker threads for the hot path.
    #[arg(long, default_value_t = 2)]
    pub concurrency: u32,
    /// Envoy worker threads (and HAProxy's nbthread) for saturation and
    /// queue timeouts, each in turn.
    #[arg(long, value_delimiter = ',', default_values_t = [2, 4])]
    pub concurrencies: Vec<u32>,
    /// Connections for the hot-path load.
    #[arg(long, default_value_t = 32)]
    pub connections: u32,
    /// Bursts of 40 requests that time out in the queue, per proxy and
    /// concurrency.
    #[arg(long, default_value_t = 5)]
    pub timeout_waves: usize,
    /// Only these parts.
    #[arg(long, value_delimiter = ',', value_enum,
          default_values_t = [Part::HotPath, Part::Saturation, Part::Timeout, Part::QueueDepth])]
    pub only: Vec<Part>,
    /// Queue depths (requests waiting) of the queue-depth rows.
    #[arg(long, value_delimiter = ',', default_values_t = [20, 1000, 10000])]
    pub depths: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    HotPath,
    Saturation,
    Timeout,
    QueueDepth,
}

/// An endpoint of known capacity and service time, saturated by closed-loop
/// clients.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    capacity: u32,
    service_ms: u32,
    clients: u32,
}

const SCENARIOS: [Scenario; 2] = [
    Scenario {
        capacity: 8,
        service_ms: 20,
        clients: 64,
    },
    Scenario {
        capacity: 5,
        service_ms: 50,
        clients: 40,
    },
];

impl Scenario {
    fn label(&self) -> String {
        format!(
            "cap {} × {} ms, {} clients",
            self.capacity, self.service_ms, self.clients
        )
    }

    fn route(&self) -> String {
        format!(
            "/work:capacity={},service_ms={}",
            self.capacity, self.service_ms
        )
    }

    fn ideal_rps(&self) -> f64 {
        f64::from(self.capacity) * 1000.0 / f64::from(self.service_ms)
    }
}

/// The queue timeout of the lateness measurements.
const QUEUE_TIMEOUT_MS: f64 = 200.0;

pub fn run(o: &Opts) -> anyhow::Result<()> {
    machine::require("wrk")?;
    machine::require("haproxy")?;
    let mut t = Table::new(&["measure", "value", "goal", "detail"]);

    if o.only.contains(&Part::HotPath) {
        hot_path_rows(o, &mut t)?;
    }
    if o.only.contains(&Part::Saturation) {
        for s in SCENARIOS {
            saturation_rows(o, s, &mut t)?;
        }
    }
    if o.only.contains(&Part::Timeout) {
        for &c in &o.concurrencies {
            timeout_rows(o, c, &mut t)?;
        }
    }
    let publish = |section: &str, what: &str, table: &Table| {
        let out = format!(
            "{}; {what}--concurrency {}, {} s per measurement\n\n{}",
            machine::header("make bench"),
            o.concurrency,
            o.seconds,
            table.render()
        );
        readme::publish(section, &out)
    };
    if o.only.iter().any(|p| *p != Part::QueueDepth) {
        publish("filter", "hot path at ", &t)?;
    }
    // Its own section: a run of this part alone keeps the rows above.
    if o.only.contains(&Part::QueueDepth) {
        let mut q = Table::new(&["measure", "value", "goal", "detail"]);
        queue_depth_rows(o, &mut q)?;
        publish("queue-depth", "", &q)?;
    }
    Ok(())
}

fn hot_path_rows(o: &Opts, t: &mut Table) -> anyhow::Result<()> {
    eprintln!(
        "hot path: {} rounds of {} s per variant ...",
        o.rounds, o.seconds
    );
    let backend = Backend::start_with_args(&["--threads", "1", "--route", "/fast"]);
    let config =
        json!({"service": "bench", "endpoints": {"/fast": {"capacity": 100000}}}).to_string();
    let mut plain = FrontProxy::without_wasm(backend.port());
    plain.stream_idle_timeout_secs = 60;
    let mut empty = FrontProxy::new(backend.port(), "{}");
    empty.wasm_path = Some(empty_wasm_path());
    // The empty filter making Sluice's hostcalls and nothing else: splits
    // Sluice's cost into the host's and its own code's.
    let mut hostcalls = FrontProxy::new(backend.port(), json!({"hostcalls": true}).to_string());
    hostcalls.wasm_path = Some(empty_wasm_path());
    let sluice = FrontProxy::new(backend.port(), config.clone());
    // Envoy's timers on the coarse clock, libevent's default: what the
    // precise ones cost on the request path.
    let mut coarse = FrontProxy::new(backend.port(), config);
    coarse.precise_timers = false;
    let unmetered = FrontProxy::new(
        backend.port(),
        json!({"service": "bench", "metrics": false,
               "endpoints": {"/fast": {"capacity": 100000}}})
        .to_string(),
    );
    // Sluice following a real sluice-sync (Redis behind it): the sync
    // stream is the leader's, off the request path, and the capacity in
    // force is in the record every admission reads anyway.
    let redis = Redis::start();
    let sync = SyncService::start(&redis.url(), &[]);
    let mut synced = FrontProxy::new(
        backend.port(),
        json!({"service": "bench", "sync": {"cluster": SYNC_CLUSTER},
               "endpoints": {"/fast": {"capacity": 100000}}})
        .to_string(),
    );
    synced.extra_clusters_yaml = sync.cluster_yaml();
    let variants = [
        (&plain, "plain Envoy"),
        (&empty, "empty wasm filter"),
        (&sluice, "Sluice"),
        (&unmetered, "Sluice, metrics: false"),
    ];
    // Per variant: requests/s, and Envoy's own CPU time per request (all
    // its threads, from /proc): the second is what the filter costs, and
    // does not move when a neighbour takes the shared cores for a while.
    let mut rps = vec![Vec::new(); variants.len()];
    let mut cpu_us = vec![Vec::new(); variants.len()];
    for round in 0..o.rounds {
        // Interleaved, so drift in the machine's load hits all four alike,
        // and rotated, so that none always runs after the same one.
        for k in 0..variants.len() {
            let i = (k + round) % variants.len();
            let (proxy, name) = variants[i];
            let envoy = Envoy::start(proxy, o.concurrency);
            // Warm up connections, VMs and caches before measuring.
            wrk(envoy.listener_port(), "/fast", o.connections, 1)?;
            let before = cpu_time(envoy.pid())?;
            let run = wrk_run(envoy.listener_port(), "/fast", o.connections, o.seconds)?;
            let used = cpu_time(envoy.pid())?.saturating_sub(before);
            let per_request = used.as_secs_f64() * 1e6 / run.requests.max(1) as f64;
            eprintln!(
                "  round {round}: {:>6.0} req/s, Envoy {per_request:>5.1} µs CPU per request: {name}",
                run.rps
            );
            rps[i].push(run.rps);
            cpu_us[i].push(per_request);
        }
    }
    let rps: Vec<f64> = rps.into_iter().map(median).collect();
    let cpu: Vec<f64> = cpu_us.into_iter().map(median).collect();
    // Side by side at the same moment: what the goals are judged by.
    for (what, goal, a, b) in [
        ("Sluice / empty wasm filter", "≥ 0.95", &sluice, &empty),
        (
            "empty filter making Sluice's 8 hostcalls / empty wasm filter",
            "—",
            &hostcalls,
            &empty,
        ),
        (
            "Sluice / empty filter making Sluice's 8 hostcalls",
            "—",
            &sluice,
            &hostcalls,
        ),
        (
            "Sluice / Sluice with `metrics: false`",
            "≥ 0.98",
            &sluice,
            &unmetered,
        ),
        (
            "Sluice with sync / Sluice without",
            "≥ 0.98",
            &synced,
            &sluice,
        ),
        (
            "Sluice / Sluice on libevent's coarse timers (no EVENT_PRECISE_TIMER)",
            "—",
            &sluice,
            &coarse,
        ),
    ] {
        let mut ratios = Vec::new();
        for round in 0..o.rounds {
            // Which one starts first alternates.
            let (ra, rb) = if round % 2 == 0 {
                paired(a, b, o)?
            } else {
                let (rb, ra) = paired(b, a, o)?;
                (ra, rb)
            };
            eprintln!("  pair round {round}: {ra:>6.0} / {rb:>6.0} req/s at once: {what}");
            ratios.push(ra / rb);
        }
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        t.row(vec![
            format!("hot path, side by side at the same moment: {what} (req/s)"),
            format!("{:.3}", median(ratios)),
            goal.into(),
            format!(
                "median of {} rounds: {}; in each, both proxies under load at once, {} connections each",
                o.rounds,
                shown.join(", "),
                (o.connections / 2).max(1)
            ),
        ]);
    }
    // One after another: absolute figures.
    let [plain, empty, sluice, unmetered] = [rps[0], rps[1], rps[2], rps[3]];
    for (what, a, b) in [
        ("Sluice / empty wasm filter", sluice, empty),
        ("Sluice / Sluice with `metrics: false`", sluice, unmetered),
        ("Sluice / plain Envoy", sluice, plain),
        ("empty wasm filter / plain Envoy", empty, plain),
    ] {
        t.row(vec![
            format!("hot path, one after another: {what} (req/s)"),
            format!("{:.3}", a / b),
            "—".into(),
            format!("{a:.0} / {b:.0}; medians of {} rounds", o.rounds),
        ]);
    }
    t.row(vec![
        "hot path: Envoy's CPU per request, µs: plain / empty wasm filter / Sluice / Sluice `metrics: false`".into(),
        format!(
            "{:.1} / {:.1} / {:.1} / {:.1}",
            cpu[0], cpu[1], cpu[2], cpu[3]
        ),
        "—".into(),
        format!(
            "Sluice costs {:+.1} µs over the empty filter ({:.3} of its CPU per request), metrics {:+.1} µs; medians of {} rounds",
            cpu[2] - cpu[1],
            cpu[1] / cpu[2],
            cpu[2] - cpu[3],
            o.rounds
        ),
    ]);
    Ok(())
}

/// Two proxies under load at the same moment, each from its own wrk with
/// half the connections, sharing the machine's cores: whatever the
/// machine's neighbours do hits both alike, so the ratio of their
/// throughputs says what each costs per request, not when it happened to
/// run. Requests/s of `a` and of `b`.
fn paired(a: &FrontProxy, b: &FrontProxy, o: &Opts) -> anyhow::Result<(f64, f64)> {
    let (ea, eb) = (
        Envoy::start(a, o.concurrency),
        Envoy::start(b, o.concurrency),
    );
    let (pa, pb) = (ea.listener_port(), eb.listener_port());
    let connections = (o.connections / 2).max(1);
    let both = |seconds: u32| -> anyhow::Result<(f64, f64)> {
        std::thread::scope(|s| {
            let left = s.spawn(|| wrk(pa, "/fast", connections, seconds));
            let right = wrk(pb, "/fast", connections, seconds);
            let left = left.join().expect("wrk thread panicked");
            Ok((left?, right?))
        })
    };
    // Warm up connections, VMs and caches before measuring.
    both(1)?;
    both(o.seconds)
}

/// One saturated run: what the clients got and what the backend saw.
struct Saturation {
    rps: f64,
    max_in_flight: u64,
    /// On the backend's clock.
    gap: GapSummary,
    /// On Envoy's clock (Sluice only).
    envoy_gap: Option<GapSummary>,
    /// The backend's trace against Envoy's access log (Sluice only).
    parts: Option<access_log::HandoverParts>,
}

fn saturation_rows(o: &Opts, s: Scenario, t: &mut Table) -> anyhow::Result<()> {
    eprintln!("saturation: {} ...", s.label());
    let direct = {
        let backend = Backend::start(&[&s.route()]);
        saturate(backend.port(), &backend, s.capacity, o.seconds)?
    };
    t.row(vec![
        format!(
            "{}: the backend alone, {} clients straight to it: throughput / ideal",
            s.label(),
            s.capacity
        ),
        format!("{:.3}", direct.rps / s.ideal_rps()),
        "ceiling".into(),
        format!(
            "{:.1} / {:.0} req/s; gap (client's turnaround) p50 / p99 {}",
            direct.rps,
            s.ideal_rps(),
            gap_ms(&direct.gap)
        ),
    ]);
    for &c in &o.concurrencies {
        let sluice = saturation_sluice(s, c, o.seconds)?;
        let haproxy = saturation_haproxy(s, c, o.seconds)?;
        let at = format!("{}, --concurrency {c}", s.label());
        let envoy_gap = sluice.envoy_gap.as_ref().map_or("—".into(), gap_ms);
        t.row(vec![
            format!("{at}: handover gap p50 / p99, Sluice (backend's clock)"),
            gap_ms(&sluice.gap),
            "—".into(),
            format!(
                "{} gaps, max {:.2} ms; on Envoy's clock (response in → next request out) {envoy_gap}",
                sluice.gap.count, sluice.gap.max_ms
            ),
        ]);
        if let Some(p) = &sluice.parts {
            let part = |x: &Percentiles| format!("{:.2} / {:.2}", x.p50, x.p99);
            t.row(vec![
                format!(
                    "{at}: where Sluice's gap goes, p50 / p99 ms: backend done → Envoy has the response; \
                     in Envoy (release … next request written upstream); → backend reads it"
                ),
                format!(
                    "{}; {}; {}",
                    part(&p.response_in),
                    part(&p.in_envoy),
                    part(&p.request_out)
                ),
                "—".into(),
                format!(
                    "{} of {} handovers matched by x-request-id (backend's trace × access log, wall clock)",
                    p.matched, p.handovers
                ),
            ]);
        }
        t.row(vec![
            format!(
                "{at}: handover gap p50 / p99, HAProxy maxconn {} (backend's clock)",
                s.capacity
            ),
            gap_ms(&haproxy.gap),
            "reference".into(),
            format!(
                "{} gaps, max {:.2} ms; nbthread {c}",
                haproxy.gap.count, haproxy.gap.max_ms
            ),
        ]);
        t.row(vec![
            format!("{at}: utilisation Sluice / HAProxy (req/s)"),
            format!("{:.3}", sluice.rps / haproxy.rps),
            "≥ 1".into(),
            format!(
                "{:.1} / {:.1} req/s; ideal {:.0}, Sluice {:.3} of it, HAProxy {:.3}",
                sluice.rps,
                haproxy.rps,
                s.ideal_rps(),
                sluice.rps / s.ideal_rps(),
                haproxy.rps / s.ideal_rps()
            ),
        ]);
        // The proxies' own network path, with nothing to queue: as many
        // clients as the capacity, so each freed slot waits for its client's
        // next request through the proxy. This gap holds two trips through
        // the proxy (response out, request in) where a handover holds one
        // of each half; it shows what the proxy itself costs, filter or not.
        let (plain, haproxy_alone) = turnaround(s, c, o.seconds)?;
        t.row(vec![
            format!(
                "{at}: no queue ({} clients), gap p50 / p99 through plain Envoy / through HAProxy (backend's clock)",
                s.capacity
            ),
            format!("{} / {}", gap_ms(&plain.gap), gap_ms(&haproxy_alone.gap)),
            "—".into(),
            format!(
                "the proxies' own round trip (backend → proxy → client → proxy → backend); straight to the backend {}",
                gap_ms(&direct.gap)
            ),
        ]);
        t.row(vec![
            format!("{at}: backend's max concurrency, Sluice / HAProxy"),
            format!("{} / {}", sluice.max_in_flight, haproxy.max_in_flight),
            format!("= {}", s.capacity),
            String::new(),
        ]);
    }
    Ok(())
}

fn gap_ms(g: &GapSummary) -> String {
    if g.count == 0 {
        return "no gaps".into();
    }
    format!("{:.2} / {:.2} ms", g.p50_ms, g.p99_ms)
}

fn saturation_sluice(s: Scenario, concurrency: u32, seconds: u32) -> anyhow::Result<Saturation> {
    let backend = Backend::start_with_args(&["--trace", "--route", &s.route()]);
    let config = json!({"service": "bench",
        "endpoints": {"/work": {"capacity": s.capacity, "queue_timeout": 30}}});
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    let log = access_log::enable(&mut proxy);
    let envoy = Envoy::start(&proxy, concurrency);
    let mut run = saturate(envoy.listener_port(), &backend, s.clients, seconds)?;
    let entries = access_log::read_settled(&log);
    let measured = entries.iter().filter(|e| e.path == MEASURED_PATH);
    run.envoy_gap = Some(access_log::upstream_gaps(measured, s.capacity.into()));
    let trace = backend_trace(&backend, "/work")?;
    run.parts = Some(access_log::handover_parts(
        &trace,
        &entries,
        s.capacity.into(),
    ));
    Ok(run)
}

/// `GET /__backend/trace` of a backend started with `--trace`.
fn backend_trace(backend: &Backend, path: &str) -> anyhow::Result<Vec<access_log::TraceRow>> {
    let response = sluice_harness::http::get(backend.addr(), "/__backend/trace")?;
    let rows = response.json()["paths"][path]
        .as_array()
        .cloned()
        .unwrap_or_default();
    rows.iter()
        .map(|r| Some((r[0].as_str()?.to_string(), r[1].as_u64()?, r[2].as_u64()?)))
        .collect::<Option<Vec<_>>>()
        .context("a malformed row in the backend's trace")
}

fn saturation_haproxy(s: Scenario, concurrency: u32, seconds: u32) -> anyhow::Result<Saturation> {
    let backend = Backend::start(&[&s.route()]);
    through_haproxy(&backend, s, concurrency, s.clients, seconds)
}

/// `clients` closed-loop clients through HAProxy's `maxconn` queue for
/// the scenario's capacity, in front of `backend`.
fn through_haproxy(
    backend: &Backend,
    s: Scenario,
    concurrency: u32,
    clients: u32,
    seconds: u32,
) -> anyhow::Result<Saturation> {
    let haproxy = Haproxy::start(
        backend.port(),
        s.capacity,
        concurrency,
        Duration::from_secs(30),
    )?;
    saturate(haproxy.port, backend, clients, seconds)
}

/// Plain Envoy and HAProxy with only `capacity` clients: nobody queues.
fn turnaround(
    s: Scenario,
    concurrency: u32,
    seconds: u32,
) -> anyhow::Result<(Saturation, Saturation)> {
    let backend = Backend::start(&[&s.route()]);
    let plain = {
        let proxy = FrontProxy::without_wasm(backend.port());
        let envoy = Envoy::start(&proxy, concurrency);
        saturate(envoy.listener_port(), &backend, s.capacity, seconds)?
    };
    let alone = through_haproxy(&backend, s, concurrency, s.capacity, seconds)?;
    Ok((plain, alone))
}

/// The measured requests carry a query string the warm-up's lack, so the
/// access log tells them apart (Sluice and the backend ignore it).
const MEASURED_PATH: &str = "/work?measured";

fn saturate(
    port: u16,
    backend: &Backend,
    clients: u32,
    seconds: u32,
) -> anyhow::Result<Saturation> {
    wrk(port, "/work", clients, 1)?;
    // Requests of the warm-up whose clients wrk closed may still be inside
    // the backend; let them go before the maximum restarts.
    wait_until(Duration::from_secs(10), "the backend to be idle", || {
        (backend.path_stats("/work")["in_flight"] == 0).then_some(())
    });
    backend.reset();
    let rps = wrk(port, MEASURED_PATH, clients, seconds)?;
    let seen = backend.path_stats("/work");
    Ok(Saturation {
        rps,
        max_in_flight: seen["max_in_flight"].as_u64().unwrap_or(0),
        gap: gap_from_backend(&seen),
        envoy_gap: None,
        parts: None,
    })
}

fn timeout_rows(o: &Opts, concurrency: u32, t: &mut Table) -> anyhow::Result<()> {
    eprintln!("queue timeouts at --concurrency {concurrency} ...");
    for (precise, how, goal) in [
        (true, "", "≤ 3 ms at p99"),
        (
            false,
            ", on libevent's coarse timers (Envoy without EVENT_PRECISE_TIMER)",
            "—",
        ),
    ] {
        let (log, client) = timeouts_sluice(concurrency, o.timeout_waves, precise)?;
        t.row(vec![
            format!(
                "504 lateness after a 200 ms queue timeout, p50 / p99 / max, Sluice at --concurrency {concurrency}{how} (Envoy's access log)"
            ),
            lateness_ms(&log),
            goal.into(),
            format!(
                "{} timeouts; the client saw p50 / p99 / max {}",
                log.n,
                lateness_ms(&client)
            ),
        ]);
    }
    let (log, client) = timeouts_haproxy(concurrency, o.timeout_waves)?;
    t.row(vec![
        format!(
            "503 lateness after `timeout queue 200ms`, p50 / p99 / max, HAProxy nbthread {concurrency} (its log, Ta)"
        ),
        lateness_ms(&log),
        "reference".into(),
        format!(
            "{} timeouts; the client saw p50 / p99 / max {}",
            log.n,
            lateness_ms(&client)
        ),
    ]);
    Ok(())
}

fn lateness_ms(p: &Percentiles) -> String {
    format!("{:.1} / {:.1} / {:.1} ms", p.p50, p.p99, p.max)
}

/// A slot held for a second and bursts of 40 behind it: all of them time
/// out. Several waves, so the figure covers timer phases and every worker.
fn timeout_bursts(addr: std::net::SocketAddr, waves: usize) -> Vec<Outcome> {
    let mut all = Vec::new();
    for wave in 0..waves {
        let mut burst = Burst::new(addr, "/slow", 41);
        burst.spacing = Duration::from_millis(3);
        burst.first_seq = wave * 100;
        burst.timeout = Duration::from_secs(10);
        all.extend(run_blocking(&burst));
    }
    all
}

const SLOW_ROUTE: &str = "/slow:service_ms=1000";

fn client_lateness(outcomes: &[Outcome], status: u16) -> Percentiles {
    Percentiles::of(
        outcomes
            .iter()
            .filter(|o| o.status == status)
            .map(|o| o.latency_ms - QUEUE_TIMEOUT_MS)
            .collect(),
    )
}

fn timeouts_sluice(
    concurrency: u32,
    waves: usize,
    precise_timers: bool,
) -> anyhow::Result<(Percentiles, Percentiles)> {
    let backend = Backend::start(&[SLOW_ROUTE]);
    let config = json!({"service": "bench",
        "endpoints": {"/slow": {"capacity": 1, "queue_timeout": QUEUE_TIMEOUT_MS / 1000.0}}});
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    proxy.precise_timers = precise_timers;
    let log = access_log::enable(&mut proxy);
    let envoy = Envoy::start(&proxy, concurrency);
    let outcomes = timeout_bursts(envoy.listener_addr(), waves);
    let late: Vec<f64> = access_log::read_settled(&log)
        .iter()
        .filter(|e| e.reason.as_deref() == Some("queue-timeout"))
        .map(|e| e.total_ms() - QUEUE_TIMEOUT_MS)
        .collect();
    if late.is_empty() {
        bail!("no request timed out in Sluice's queue");
    }
    Ok((Percentiles::of(late), client_lateness(&outcomes, 504)))
}

fn timeouts_haproxy(concurrency: u32, waves: usize) -> anyhow::Result<(Percentiles, Percentiles)> {
    let backend = Backend::start(&[SLOW_ROUTE]);
    let haproxy = Haproxy::start(
        backend.port(),
        1,
        concurrency,
        Duration::from_millis(QUEUE_TIMEOUT_MS as u64),
    )?;
    let outcomes = timeout_bursts(([127, 0, 0, 1], haproxy.port).into(), waves);
    let late: Vec<f64> = haproxy
        .log_lines()
        .iter()
        .filter(|l| l.status == 503 && l.termination.starts_with("sQ"))
        .map(|l| l.ta_ms as f64 - QUEUE_TIMEOUT_MS)
        .collect();
    if late.is_empty() {
        bail!("no request timed out in HAProxy's queue");
    }
    Ok((Percentiles::of(late), client_lateness(&outcomes, 503)))
}

/// Slots of the queue-depth rows, and the backend's time per request.
const DEPTH_CAPACITY: u32 = 20;
const DEPTH_SERVICE_MS: u32 = 10;
/// The empty filter's most connections to the backend: with 10,020
/// clients, what fits in Envoy's 20,000 file descriptors.
const EMPTY_POOL_MAX: u32 = 8000;

/// wrk's script for the classes × tenants row: each request of a random
/// one of 3 classes and 64 tenants.
const CLASSES_TENANTS_LUA: &str = r#"
local classes = {"interactive", "default", "batch"}
request = function()
  wrk.headers["x-sluice-class"] = classes[math.random(3)]
  wrk.headers["x-tenant"] = "tenant-" .. math.random(64)
  return wrk.format(nil)
end
"#;

/// What Sluice adds to Envoy's CPU per request as its queue deepens: at
/// each depth, Sluice (capacity 20, the rest waiting in its queue) against
/// an empty filter whose requests wait in Envoy's own connection pool (20
/// connections to the backend), with as many wrk connections as waiters
/// plus the slots, interleaved over the rounds. Envoy's CPU time per
/// request (all its threads, from /proc) is the measure: the two carry the
/// same connections, so the difference is Sluice's own.
fn queue_depth_rows(o: &Opts, t: &mut Table) -> anyhow::Result<()> {
    let route =
        format!("/work:capacity={DEPTH_CAPACITY},service_ms={DEPTH_SERVICE_MS},overload=queue");
    let backend = Backend::start_with_args(&["--threads", "1", "--route", &route]);
    let endpoint = json!({"capacity": DEPTH_CAPACITY, "max_queue": 10_000, "queue_timeout": 120});
    let plain = json!({"service": "bench", "endpoints": {"/work": endpoint}});
    let classes = json!({"service": "bench",
        "classes": {
            "interactive": {"priority": 10},
            "default": {"priority": 5},
            "batch": {"priority": 1},
        },
        "tenants": {"header": "x-tenant", "flows": 64},
        "endpoints": {"/work": endpoint}});
    let proxy = |config: Option<&serde_json::Value>| {
        let mut p = match config {
            Some(c) => FrontProxy::new(backend.port(), c.to_string()),
            None => {
                let mut p = FrontProxy::new(backend.port(), "{}");
                p.wasm_path = Some(empty_wasm_path());
                p
            }
        };
        p.route_timeout_secs = 0;
        p
    };
    // Sluice's backend connections: its slots' worth. Capping Envoy's pool
    // at the capacity as well would cost Sluice most of its throughput
    // (measured: 440 of 2000 req/s at 20 waiting): a released slot's next
    // request is resumed before Envoy has the finished request's connection
    // back, so it waits for a new one (docs/filter.md says so).
    let sluice = proxy(Some(&plain));
    let sluice_classes = proxy(Some(&classes));
    // The empty filter sends every request on to the backend, which queues
    // it: one upstream connection each, up to what the process's file
    // descriptors allow beside the clients' (the rest wait in Envoy's pool).
    let empty_for = |connections: u32| {
        let mut p = proxy(None);
        p.upstream_max_connections = Some(connections.min(EMPTY_POOL_MAX));
        p
    };
    let mut cases: Vec<(String, u32, &FrontProxy, Option<&str>)> = o
        .depths
        .iter()
        .map(|&d| (format!("{d} waiting"), d, &sluice, None))
        .collect();
    let deepest = o.depths.iter().copied().max().unwrap_or(1000).min(1000);
    cases.push((
        format!("{deepest} waiting, 3 classes × 64 tenants"),
        deepest,
        &sluice_classes,
        Some(CLASSES_TENANTS_LUA),
    ));
    let script_dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&script_dir)?;
    let mut added = Vec::new();
    for (what, depth, with_sluice, script) in &cases {
        let connections = depth + DEPTH_CAPACITY;
        let script_path = match script {
            Some(text) => {
                let p = script_dir.join("classes.lua");
                std::fs::write(&p, text)?;
                Some(p)
            }
            None => None,
        };
        eprintln!("queue depth: {what} ({connections} connections) ...");
        let empty = empty_for(connections);
        let mut cpu = [Vec::new(), Vec::new()];
        let mut rates = [Vec::new(), Vec::new()];
        for round in 0..o.rounds {
            for k in 0..2 {
                let i = (k + round) % 2;
                let proxy = if i == 0 { &empty } else { *with_sluice };
                let envoy = Envoy::start(proxy, o.concurrency);
                let port = envoy.listener_port();
                // One wrk run: every connection open and the queue at its
                // depth (a wait is depth / 2000 s) before the measured
                // window, which reads Envoy's CPU time and its count of
                // completed requests at both ends. (Two runs would not do:
                // the first run's queue outlives its connections for a
                // while.)
                let warm = 3 + depth / 1000;
                let total = warm + o.seconds + 2;
                let (run, measured) = std::thread::scope(|scope| {
                    let load = scope.spawn(|| {
                        wrk_run_script(port, "/work", connections, total, script_path.as_deref())
                    });
                    std::thread::sleep(Duration::from_secs(warm.into()));
                    let at = || -> anyhow::Result<(Duration, u64)> {
                        Ok((cpu_time(envoy.pid())?, completed(&envoy)?))
                    };
                    let measured = at().and_then(|a| {
                        std::thread::sleep(Duration::from_secs(o.seconds.into()));
                        Ok((a, at()?))
                    });
                    (load.join().expect("wrk thread panicked"), measured)
                });
                run?;
                let ((cpu0, n0), (cpu1, n1)) = measured?;
                let requests = n1.saturating_sub(n0).max(1);
                let per_request = cpu1.saturating_sub(cpu0).as_secs_f64() * 1e6 / requests as f64;
                let rps = requests as f64 / f64::from(o.seconds);
                eprintln!(
                    "  round {round}: {rps:>6.0} req/s, Envoy {per_request:>6.1} µs CPU per request: {}",
                    if i == 0 { "empty filter" } else { "Sluice" }
                );
                rates[i].push(rps);
                cpu[i].push(per_request);
            }
        }
        let [e, s] = cpu.map(median);
        let [e_rps, s_rps] = rates.map(median);
        added.push((what.clone(), *depth, s - e));
        t.row(vec![
            format!(
                "queue depth, cap {DEPTH_CAPACITY} × {DEPTH_SERVICE_MS} ms, {what}: Envoy's CPU per request, µs: empty filter (the backend queues) / Sluice"
            ),
            format!("{e:.1} / {s:.1}"),
            "—".into(),
            format!(
                "Sluice adds {:+.1} µs; {e_rps:.0} / {s_rps:.0} req/s (ideal {}); {connections} wrk connections (the empty filter's: at most {} to the backend, the rest in Envoy's pool), --concurrency {}; medians of {} rounds",
                s - e,
                DEPTH_CAPACITY * 1000 / DEPTH_SERVICE_MS,
                connections.min(EMPTY_POOL_MAX),
                o.concurrency,
                o.rounds
            ),
        ]);
    }
    let _ = std::fs::remove_dir_all(&script_dir);
    let base = added
        .iter()
        .find(|(_, d, _)| *d == *o.depths.iter().min().unwrap_or(&20));
    if let Some((base_what, _, base_added)) = base {
        for (what, _, a) in &added {
            if what == base_what {
                continue;
            }
            t.row(vec![
                format!("queue depth: what Sluice adds per request, {what} / {base_what}"),
                format!("{:.2}", a / base_added),
                "≤ 1.1".into(),
                format!("{a:+.1} µs / {base_added:+.1} µs"),
            ]);
        }
    }
    Ok(())
}

/// Requests Envoy's front listener has completed so far (its own count,
/// read without dumping every stat).
fn completed(envoy: &Envoy) -> anyhow::Result<u64> {
    let name = "http.sluice_front.downstream_rq_completed";
    let res = envoy
        .admin_get(&format!("/stats?filter=^{name}$"))
        .context("Envoy's admin /stats")?;
    res.text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok())
        .with_context(|| format!("no {name} in {}", res.text()))
}
