//! `make demo`: a service that can really do 4 requests at a time (300 ms
//! each). The whole path runs as local processes: the backend, Redis,
//! sluice-sync and Envoy start; the prober measures the backend and pushes
//! its capacity to Redis; the stats show it arrive in Envoy (no restart);
//! then a burst of 12, first straight to the backend, then through Envoy
//! with Sluice holding it to the measured capacity.
//!
//! `make demo-watch` (`--watch`) then keeps everything running and sends a
//! burst through Envoy every few seconds, to watch in the dashboard, until
//! Ctrl-C or SIGTERM.

mod teardown;

use serde_json::{json, Value};
use sluice_harness::{
    bin_path, free_port, http, unique_scratch_path, wait_until, Backend, Envoy, FrontProxy, Redis,
    SyncService, SYNC_CLUSTER,
};
use sluice_loadgen::{run_blocking, summarize, table, Burst, Outcome};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CAPACITY: u32 = 4;
const BURST: usize = 12;
const QUEUE_TIMEOUT: f64 = 0.5;

/// Envoy's listener, so the dashboard's address stays the same from run to
/// run. Not 10000: the compose stack and the Envoy recipes take that one,
/// and `docker compose up -d` keeps running.
const DEFAULT_PORT: u16 = 10100;
const PORT_VAR: &str = "SLUICE_DEMO_PORT";
/// The dashboard's credentials. Fixed so a browser remembers them between
/// runs; Envoy listens on loopback only.
const UI_USERNAME: &str = "demo";
const UI_PASSWORD: &str = "sluice";
/// `Authorization` for the demo's own stats requests: base64 of `demo:sluice`.
const UI_AUTHORIZATION: &str = "Basic ZGVtbzpzbHVpY2U=";
/// The dashboard polls this often (seconds): a burst lasts under a second,
/// the default 2 s would mostly miss it.
const UI_REFRESH: f64 = 0.5;
/// While watching: within capacity (green), just over it (2 wait), and the
/// demo's burst (8 wait, 4 time out), in turn.
const WATCH_BURSTS: [usize; 3] = [3, 6, BURST];
const WATCH_EVERY: Duration = Duration::from_secs(3);

const USAGE: &str = "usage: sluice-demo [--watch]

  --watch   after the demo, keep everything running and send a burst
            through Envoy every 3 s, to watch in the dashboard, until
            Ctrl-C or SIGTERM

Environment:
  SLUICE_DEMO_PORT   Envoy's port on 127.0.0.1 (default 10100; 0: any free port)";

#[derive(Debug, PartialEq)]
struct Options {
    watch: bool,
    /// 0: any free port.
    port: u16,
}

impl Options {
    /// `args` without the program name; `port_var` is `$SLUICE_DEMO_PORT`.
    fn parse(args: &[String], port_var: Option<&str>) -> Result<Options, String> {
        let mut watch = false;
        for arg in args {
            match arg.as_str() {
                "--watch" => watch = true,
                other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
            }
        }
        let port = match port_var.map(str::trim) {
            None | Some("") => DEFAULT_PORT,
            Some(text) => text.parse().map_err(|_| {
                format!("{PORT_VAR}: expected a port number (0: any free port), got {text:?}")
            })?,
        };
        Ok(Options { watch, port })
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return;
    }
    let port_var = std::env::var(PORT_VAR).ok();
    let checked = Options::parse(&args, port_var.as_deref()).and_then(|opts| {
        let port = listener_port(opts.port)?;
        Ok((opts, port))
    });
    match checked {
        Ok((opts, port)) => {
            teardown::catch_signals();
            run(&opts, port);
        }
        Err(e) => {
            eprintln!("sluice-demo: {e}");
            std::process::exit(2);
        }
    }
}

/// The port Envoy will listen on, checked before anything starts so that a
/// taken one gets this message rather than Envoy's log.
fn listener_port(wanted: u16) -> Result<u16, String> {
    if wanted == 0 {
        return Ok(free_port());
    }
    match TcpListener::bind(("127.0.0.1", wanted)) {
        Ok(_) => Ok(wanted),
        Err(e) => Err(format!(
            "cannot listen on 127.0.0.1:{wanted} ({e}); is another demo still running? \
             Stop it, or set {PORT_VAR} to another port (0: any free one)"
        )),
    }
}

fn run(opts: &Options, port: u16) {
    println!("A backend with {CAPACITY} workers, 300 ms per request (more wait inside it).");
    let backend = Backend::start(&[&format!("/predict:capacity={CAPACITY},service_ms=300")]);
    teardown::register(backend.pid());
    let redis = Redis::start();
    teardown::register(redis.pid());
    let sync = SyncService::start(&redis.url(), &[]);
    teardown::register(sync.pid());
    println!("Redis on {}, sluice-sync on {}", redis.url(), sync.addr());

    // Envoy knows the endpoint but not its capacity: sync will tell it.
    let config = json!({
        "service": "demo",
        "queue_timeout": QUEUE_TIMEOUT,
        "max_queue": 100,
        "sync": {"cluster": SYNC_CLUSTER},
        "endpoints": {"/predict": {}},
        "ui": {
            "enable": true,
            "username": UI_USERNAME,
            "password": UI_PASSWORD,
            "refresh": UI_REFRESH,
        },
    });
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    proxy.listener_port = port;
    proxy.extra_clusters_yaml = sync.cluster_yaml();
    let envoy_options = proxy.envoy_options(2);
    let ready_timeout = envoy_options.ready_timeout;
    let mut envoy = Envoy::spawn(envoy_options);
    teardown::register(envoy.pid());
    if let Err(e) = envoy.wait_ready(ready_timeout) {
        panic!("Envoy did not start: {e}");
    }
    println!("Envoy with Sluice, plugin configuration: {config}");
    let dashboard = format!(
        "Dashboard: http://{}/balancer/ui  (user {UI_USERNAME}, password {UI_PASSWORD})",
        envoy.listener_addr()
    );
    println!("{dashboard}");
    wait_until(Duration::from_secs(10), "Envoy connected to sync", || {
        (stats(&envoy)["sync"]["state"] == "connected").then_some(())
    });
    println!("\n== Stats before measuring ==");
    print_stats(&envoy);

    println!("\n== sluice-prober probe --redis: measure the backend, push the capacity ==");
    let dir = unique_scratch_path("demo");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join("sluice.yaml");
    std::fs::write(
        &file,
        "service: demo\nendpoints:\n  /predict:\n    method: GET\n",
    )
    .expect("write sluice.yaml");
    let url = format!("http://{}", backend.addr());
    let prober = Command::new(bin_path("sluice-prober"))
        .args(["probe", "--url", &url, "--config"])
        .arg(&file)
        .args(["--redis", &redis.url(), "--latency-threshold-ms", "450"])
        .args(["--warmup", "0.3", "--duration", "1.2", "--min-samples", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sluice-prober");
    let prober_pid = prober.id();
    teardown::register(prober_pid);
    let out = prober.wait_with_output().expect("run sluice-prober");
    teardown::unregister(prober_pid);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    let arrived = wait_until(Duration::from_secs(5), "the capacity in Envoy", || {
        let s = stats(&envoy);
        (s["endpoints"]["/predict"]["capacity_source"] == "sync").then_some(s)
    });
    println!("\n== Stats after: the capacity arrived through sync, no restart ==");
    print_stats(&envoy);
    let measured = arrived["endpoints"]["/predict"]["capacity"].clone();
    let _ = std::fs::remove_dir_all(&dir);

    backend.reset();
    println!("\n== Without Sluice: {BURST} requests at once, straight to the backend ==");
    let outcomes = burst(backend.addr(), BURST);
    print_outcomes(&outcomes);
    let seen = backend.path_stats("/predict");
    println!(
        "backend: up to {} requests inside at once for {} workers; the last one took {:.0} ms",
        seen["max_in_flight"],
        CAPACITY,
        outcomes.iter().map(|o| o.latency_ms).fold(0.0, f64::max)
    );

    backend.reset();
    println!(
        "\n== With Sluice in Envoy: measured capacity {measured}, queue_timeout {QUEUE_TIMEOUT} s =="
    );
    let outcomes = burst(envoy.listener_addr(), BURST);
    print_outcomes(&outcomes);
    let s = summarize(&outcomes);
    let seen = backend.path_stats("/predict");
    println!(
        "admitted at once: {}, queued then admitted: {}, timed out in the queue (504): {}, queue full (503): {}",
        s.ok - s.queued_then_admitted,
        s.queued_then_admitted,
        s.queue_timeout,
        s.queue_full
    );
    println!(
        "backend: at most {} requests inside at once (capacity {measured}); it served {}",
        seen["max_in_flight"], seen["completed"]
    );

    // From here a signal is the main thread's to handle: the processes
    // drop when this function returns.
    teardown::main_ends_them();
    if opts.watch {
        watch(&envoy, &dashboard);
        println!("Stopped: Envoy, sluice-sync, Redis and the backend end now.");
    } else {
        println!("\nTo watch it in the dashboard, keep it running: make demo-watch");
    }
}

/// A burst through Envoy every few seconds until SIGINT or SIGTERM, one
/// line each, so the dashboard's chart moves.
fn watch(envoy: &Envoy, dashboard: &str) {
    println!(
        "\n== Watching: a burst of {} requests in turn every {} s; Ctrl-C stops ==",
        WATCH_BURSTS.map(|n| n.to_string()).join(", "),
        WATCH_EVERY.as_secs()
    );
    println!("{dashboard}");
    let started = Instant::now();
    for size in WATCH_BURSTS.iter().cycle() {
        let outcomes = burst(envoy.listener_addr(), *size);
        if teardown::stop_requested() {
            break;
        }
        let s = summarize(&outcomes);
        let queued = match s.queued_then_admitted {
            0 => "none queued".to_string(),
            n => format!("{n} after queueing up to {} ms", s.max_wait_ms),
        };
        let other = match s.requests - s.ok - s.queue_timeout {
            0 => String::new(),
            n => format!(", {n} other (503 or errors)"),
        };
        println!(
            "{:>5.0} s  {size:>2} requests: {} admitted at once, {queued}, {} timed out in the queue (504){other}",
            started.elapsed().as_secs_f64(),
            s.ok - s.queued_then_admitted,
            s.queue_timeout,
        );
        teardown::sleep_unless_stopped(WATCH_EVERY);
        if teardown::stop_requested() {
            break;
        }
    }
}

/// `GET /balancer/stats` with the dashboard's credentials (they guard the
/// stats too); `Null` while Envoy does not answer.
fn stats(envoy: &Envoy) -> Value {
    let response = http::Request::new("GET", envoy.listener_addr(), "/balancer/stats")
        .header("authorization", UI_AUTHORIZATION)
        .send();
    match response {
        Ok(r) if r.status == 401 => panic!("Envoy refused the demo's own credentials: {r:?}"),
        Ok(r) => serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// The parts of the stats the demo is about.
fn print_stats(envoy: &Envoy) {
    let s = stats(envoy);
    let ep = &s["endpoints"]["/predict"];
    println!(
        "GET /balancer/stats → /predict capacity {} (source {}), sync {} at version {}",
        ep["capacity"], ep["capacity_source"], s["sync"]["state"], s["sync"]["version"]
    );
}

fn burst(addr: SocketAddr, requests: usize) -> Vec<Outcome> {
    let mut b = Burst::new(addr, "/predict", requests);
    b.spacing = Duration::from_millis(2);
    run_blocking(&b)
}

fn print_outcomes(outcomes: &[Outcome]) {
    print!("{}", table(outcomes));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], port_var: Option<&str>) -> Result<Options, String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Options::parse(&args, port_var)
    }

    #[test]
    fn options() {
        let run = |watch, port| Ok(Options { watch, port });
        assert_eq!(parse(&[], None), run(false, DEFAULT_PORT));
        assert_eq!(parse(&["--watch"], Some("")), run(true, DEFAULT_PORT));
        assert_eq!(parse(&[], Some("10200")), run(false, 10200));
        assert_eq!(parse(&[], Some("0")), run(false, 0));
        assert_eq!(
            parse(&[], Some("ten")),
            Err("SLUICE_DEMO_PORT: expected a port number (0: any free port), got \"ten\"".into())
        );
        assert!(parse(&[], Some("70000")).is_err());
        let unknown = parse(&["--wach"], None).unwrap_err();
        assert!(
            unknown.starts_with("unknown argument \"--wach\"\n\nusage: sluice-demo"),
            "{unknown}"
        );
    }
}
