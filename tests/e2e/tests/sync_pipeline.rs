//! Capacities going live: the prober writes Redis, the real `sluice-sync`
//! streams them, and the filter in the real Envoy (`--concurrency 4`)
//! enforces them on every worker without a restart. Also what happens when
//! sync dies, when a listener update lowers a capacity under long
//! keep-alive connections, and when the backend's health check fails.
//! Assertions are made from the backend's side where it matters.

use serde_json::{json, Value};
use sluice_harness::{
    bin_path, unique_scratch_path, wait_until, Backend, Envoy, FrontProxy, KeepAliveClients, Redis,
    SyncService, SYNC_CLUSTER,
};
use sluice_loadgen::{run_blocking, summarize, Burst, Outcome};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const SERVICE: &str = "e2e";
const PATH: &str = "/k";
const WORKERS: u32 = 4;

/// The plugin configuration: `/k` with `capacity` (none: sync decides),
/// watching sync if `sync`, and whatever `extra` adds at the top level.
fn config(capacity: Option<u32>, sync: bool, extra: Value) -> Value {
    let mut doc = json!({
        "service": SERVICE,
        "queue_timeout": 30,
        "max_queue": 1000,
        "endpoints": {PATH: {"capacity": capacity}},
    });
    if sync {
        doc["sync"] = json!({"cluster": SYNC_CLUSTER, "heartbeat_timeout": 3});
    }
    if let Value::Object(m) = extra {
        for (k, v) in m {
            doc[k] = v;
        }
    }
    doc
}

/// Redis, sync, a backend and one Envoy with the sync cluster.
struct Stack {
    redis: Redis,
    sync: SyncService,
    backend: Backend,
}

impl Stack {
    fn start(backend_routes: &[&str]) -> Stack {
        let redis = Redis::start();
        let sync = SyncService::start(&redis.url(), &[]);
        let backend = Backend::start(backend_routes);
        Stack {
            redis,
            sync,
            backend,
        }
    }

    fn proxy(&self, config: &Value) -> FrontProxy {
        let mut proxy = FrontProxy::new(self.backend.port(), config.to_string());
        proxy.extra_clusters_yaml = self.sync.cluster_yaml();
        proxy
    }

    fn envoy(&self, config: &Value) -> Envoy {
        Envoy::start(&self.proxy(config), WORKERS)
    }

    /// `sluice-prober push --force` of `capacity` for `path`, as an operator
    /// would push a hand-set value.
    fn push(&self, path: &str, capacity: u32) {
        let dir = unique_scratch_path("push");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sluice.yaml");
        std::fs::write(
            &file,
            format!("service: {SERVICE}\nendpoints:\n  {path}:\n    capacity: {capacity}\n"),
        )
        .unwrap();
        prober(&[
            "push",
            "--force",
            "--config",
            file.to_str().unwrap(),
            "--redis",
            &self.redis.url(),
        ]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn prober(args: &[&str]) -> String {
    let out = Command::new(bin_path("sluice-prober"))
        .args(args)
        .output()
        .expect("run sluice-prober");
    assert!(
        out.status.success(),
        "sluice-prober {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The filter's stats, served by whichever worker takes the connection.
/// Fetched with the load generator, which reads a response by its length:
/// the harness client waits for EOF, which Envoy's delayed close holds back
/// for a second after a local reply.
fn stats(envoy: &Envoy) -> Value {
    let got = run_blocking(&Burst::new(envoy.listener_addr(), "/balancer/stats", 1));
    let o = &got[0];
    assert_eq!(o.status, 200, "{o:?}");
    serde_json::from_str(&o.body).unwrap_or_else(|e| panic!("stats ({e}): {}", o.body))
}

/// Polls the stats (several connections, so several workers) until `/k`
/// has `capacity` from sync; how long that took.
fn wait_capacity(envoy: &Envoy, capacity: u32, timeout: Duration) -> Duration {
    let start = Instant::now();
    wait_until(timeout, &format!("capacity {capacity} from sync"), || {
        let ep = &stats(envoy)["endpoints"][PATH];
        (ep["capacity"] == capacity && ep["capacity_source"] == "sync").then_some(())
    });
    start.elapsed()
}

fn wait_sync_state(envoy: &Envoy, state: &str, timeout: Duration) -> Value {
    wait_until(timeout, &format!("sync state {state}"), || {
        let s = stats(envoy);
        (s["sync"]["state"] == state).then_some(s)
    })
}

fn burst(envoy: &Envoy, n: usize) -> Vec<Outcome> {
    let mut b = Burst::new(envoy.listener_addr(), PATH, n);
    b.spacing = Duration::from_micros(500);
    run_blocking(&b)
}

fn max_in_flight(backend: &Backend) -> u64 {
    backend.path_stats(PATH)["max_in_flight"]
        .as_u64()
        .unwrap_or(0)
}

fn statuses(outcomes: &[Outcome]) -> Vec<u16> {
    outcomes.iter().map(|o| o.status).collect()
}

fn scratch_file(name: &str, text: &str) -> PathBuf {
    let dir = unique_scratch_path("sync-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn probe_then_bursts_never_exceed_the_measured_capacity() {
    // The backend takes 3 at once; more wait inside it (latency grows).
    let stack = Stack::start(&["/k:capacity=3,service_ms=100"]);
    let envoy = stack.envoy(&config(None, true, json!({})));
    wait_sync_state(&envoy, "connected", Duration::from_secs(10));
    // Unmeasured: requests pass, the backend sees more than 3 at once.
    let outcomes = burst(&envoy, 30);
    assert!(outcomes.iter().all(|o| o.status == 200));
    assert!(max_in_flight(&stack.backend) > 3, "nothing limits it yet");

    // The prober measures the backend itself and pushes to Redis.
    let file = scratch_file(
        "sluice.yaml",
        &format!("service: {SERVICE}\nendpoints:\n  {PATH}:\n    method: GET\n"),
    );
    let url = format!("http://{}", stack.backend.addr());
    prober(&[
        "probe",
        "--latency-threshold-ms",
        "160",
        "--warmup",
        "0.2",
        "--duration",
        "0.8",
        "--min-samples",
        "0",
        "--url",
        &url,
        "--config",
        file.to_str().unwrap(),
        "--redis",
        &stack.redis.url(),
        "--quiet",
    ]);
    let measured: u32 = stack
        .redis
        .command(&[
            "HGET",
            &format!("sluice:{{{SERVICE}}}:capacity:{PATH}"),
            "capacity",
        ])
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("the prober pushed a capacity");
    assert_eq!(measured, 3, "the backend's real capacity");

    // Without restarting Envoy, every worker enforces it.
    wait_capacity(&envoy, measured, Duration::from_secs(5));
    stack.backend.reset();
    let outcomes = burst(&envoy, 30);
    let s = summarize(&outcomes);
    assert_eq!(s.ok, 30, "{s:?}");
    assert!(s.queued_then_admitted > 0, "the burst queued: {s:?}");
    assert_eq!(max_in_flight(&stack.backend), u64::from(measured));
    assert!(envoy.workers_that_served() > 1);
}

#[test]
fn pushed_raise_admits_100_queued_at_once_in_fifo_order() {
    let stack = Stack::start(&["/k:service_ms=4000"]);
    let envoy = stack.envoy(&config(Some(1), true, json!({})));
    wait_sync_state(&envoy, "connected", Duration::from_secs(10));
    let addr = envoy.listener_addr();
    let load = std::thread::spawn(move || {
        let mut b = Burst::new(addr, PATH, 101);
        b.spacing = Duration::from_millis(3);
        run_blocking(&b)
    });
    wait_until(Duration::from_secs(10), "100 queued", || {
        (stats(&envoy)["endpoints"][PATH]["queued"] == 100).then_some(())
    });
    // Raised by 50: exactly the 50 oldest waiters go, at once, whichever
    // worker each waits on (they are granted in ticket order in one write;
    // across workers they reach the backend concurrently).
    let pushed = Instant::now();
    stack.push(PATH, 51);
    wait_until(Duration::from_secs(2), "51 at the backend", || {
        (stack.backend.path_stats(PATH)["in_flight"] == 51).then_some(())
    });
    let admitted_in = pushed.elapsed();
    assert!(
        admitted_in < Duration::from_secs(1),
        "50 went in {admitted_in:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let mut arrived: Vec<usize> = stack
        .backend
        .arrivals(PATH)
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    arrived.sort();
    assert_eq!(arrived, (0..=50).collect::<Vec<_>>(), "the oldest 50, FIFO");
    // Raised past the queue: all the others at once.
    let pushed = Instant::now();
    stack.push(PATH, 101);
    wait_until(Duration::from_secs(2), "all 101 at the backend", || {
        (stack.backend.path_stats(PATH)["in_flight"] == 101).then_some(())
    });
    let admitted_in = pushed.elapsed();
    assert!(
        admitted_in < Duration::from_secs(1),
        "the rest went in {admitted_in:?}"
    );
    let outcomes = load.join().unwrap();
    assert!(
        outcomes.iter().all(|o| o.status == 200),
        "{:?}",
        statuses(&outcomes)
    );
    assert!(envoy.workers_that_served() > 1);
}

#[test]
fn pushed_lower_cuts_none_and_the_drained_backend_stays_under_it() {
    let stack = Stack::start(&["/k:service_ms=1500"]);
    let envoy = stack.envoy(&config(Some(6), true, json!({})));
    wait_sync_state(&envoy, "connected", Duration::from_secs(10));
    let addr = envoy.listener_addr();
    let in_flight = std::thread::spawn(move || run_blocking(&Burst::new(addr, PATH, 6)));
    wait_until(Duration::from_secs(5), "6 in flight", || {
        (stack.backend.path_stats(PATH)["in_flight"] == 6).then_some(())
    });
    stack.push(PATH, 2);
    wait_capacity(&envoy, 2, Duration::from_secs(5));
    let outcomes = in_flight.join().unwrap();
    assert_eq!(statuses(&outcomes), [200; 6], "none cut");
    stack.backend.reset();
    let mut b = Burst::new(envoy.listener_addr(), PATH, 12);
    b.spacing = Duration::from_millis(1);
    let outcomes = run_blocking(&b);
    assert!(outcomes.iter().all(|o| o.status == 200));
    assert_eq!(max_in_flight(&stack.backend), 2);
}

#[test]
fn sync_killed_capacities_stay_restarted_new_values_flow() {
    let mut stack = Stack::start(&["/k:service_ms=30"]);
    let envoy = stack.envoy(&config(Some(8), true, json!({})));
    stack.push(PATH, 3);
    wait_capacity(&envoy, 3, Duration::from_secs(10));

    let sync_addr = stack.sync.addr().to_string();
    stack.sync.kill();
    let s = wait_sync_state(&envoy, "disconnected", Duration::from_secs(6));
    assert!(
        s["sync"]["disconnected_since_unix_ms"].as_u64().is_some(),
        "{s}"
    );
    assert_eq!(s["endpoints"][PATH]["capacity"], 3, "fail static");
    stack.backend.reset();
    let outcomes = burst(&envoy, 40);
    assert!(outcomes.iter().all(|o| o.status == 200));
    assert_eq!(max_in_flight(&stack.backend), 3, "still capped");

    // A value written while sync is down arrives once it is back.
    stack.push(PATH, 5);
    stack.sync = SyncService::start(&stack.redis.url(), &["--listen", &sync_addr]);
    wait_sync_state(&envoy, "connected", Duration::from_secs(10));
    wait_capacity(&envoy, 5, Duration::from_secs(5));
    stack.push(PATH, 4);
    wait_capacity(&envoy, 4, Duration::from_secs(2));
}

/// Measured before the capacity moved into the shared record: lowered 4 -> 2
/// through LDS, the backend stayed at 4 for as long as the old keep-alive
/// connections lived (the drain, 600 s by default).
#[test]
fn listener_update_lowering_a_capacity_holds_within_a_second_on_old_connections() {
    let backend = Backend::start(&["/k:service_ms=40"]);
    let mut proxy = FrontProxy::new(
        backend.port(),
        config(Some(4), false, json!({})).to_string(),
    );
    proxy.use_lds = true;
    let envoy = Envoy::start(&proxy, WORKERS);
    let clients = KeepAliveClients::start(envoy.listener_addr(), PATH, 8);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(max_in_flight(&backend), 4, "the old capacity holds first");

    proxy.plugin_config_json = config(Some(2), false, json!({})).to_string();
    envoy.update_lds(&proxy);
    std::thread::sleep(Duration::from_secs(1));
    backend.reset();
    std::thread::sleep(Duration::from_millis(1500));
    let seen = max_in_flight(&backend);
    let statuses = clients.stop();
    assert_eq!(seen, 2, "the old connections' VMs enforce the new capacity");
    let served: usize = statuses
        .iter()
        .map(|s| s.iter().filter(|&&x| x == 200).count())
        .sum();
    let reconnects: usize = statuses
        .iter()
        .map(|s| s.iter().filter(|&&x| x == 0).count())
        .sum();
    assert!(
        statuses.iter().flatten().all(|&s| s == 200 || s == 0),
        "{statuses:?}"
    );
    assert!(served > 50, "served {served}");
    assert!(
        reconnects <= 2,
        "the connections stayed on the old listener: {reconnects}"
    );
}

#[test]
fn failing_health_check_gives_fast_503s_and_answers_the_queue_then_recovers() {
    let backend = Backend::start(&["/k:service_ms=3000"]);
    let interval = 0.5;
    let health = json!({
        "health_endpoint": "/__backend/health",
        "health_check_interval": interval,
        "health": {"cluster": "backend", "unhealthy_threshold": 1, "healthy_threshold": 2, "timeout": 1},
    });
    let proxy = FrontProxy::new(backend.port(), config(Some(1), false, health).to_string());
    let envoy = Envoy::start(&proxy, WORKERS);
    wait_until(Duration::from_secs(5), "healthy", || {
        (stats(&envoy)["health"]["state"] == "healthy").then_some(())
    });
    let addr = envoy.listener_addr();
    let load = std::thread::spawn(move || {
        let mut b = Burst::new(addr, PATH, 10);
        b.spacing = Duration::from_millis(2);
        run_blocking(&b)
    });
    wait_until(Duration::from_secs(5), "9 queued", || {
        (stats(&envoy)["endpoints"][PATH]["queued"] == 9).then_some(())
    });
    let failed_at = Instant::now();
    backend.set_healthy(false);
    // The next check fails (within an interval): every queued request is
    // answered at once, within the interval plus a second.
    let limit = Duration::from_secs_f64(interval + 1.0);
    wait_until(limit, "the queue answered", || {
        (stats(&envoy)["endpoints"][PATH]["queued"] == 0).then_some(())
    });
    let answered_in = failed_at.elapsed();
    // (Timed with the load generator, which reads the response by its
    // length: the harness client waits for Envoy's delayed close.)
    let fresh = &burst(&envoy, 1)[0];
    assert_eq!(
        (fresh.status, fresh.reason.as_deref()),
        (503, Some("unhealthy")),
        "{fresh:?}"
    );
    assert!(fresh.latency_ms < 200.0, "at once: {fresh:?}");
    assert_eq!(stats(&envoy)["health"]["state"], "unhealthy");
    let outcomes = load.join().unwrap();
    assert_eq!(outcomes[0].status, 200, "the one in flight finishes");
    for o in &outcomes[1..] {
        assert_eq!(
            (o.status, o.reason.as_deref()),
            (503, Some("unhealthy")),
            "{o:?}"
        );
    }
    eprintln!("queue answered {answered_in:?} after the backend started failing");

    backend.set_healthy(true);
    wait_until(Duration::from_secs(5), "healthy again", || {
        (stats(&envoy)["health"]["state"] == "healthy").then_some(())
    });
    let res = envoy
        .request("GET", PATH)
        .header("x-service-ms", "1")
        .send()
        .unwrap();
    assert_eq!(res.status, 200);
}

#[test]
fn two_envoys_follow_every_change() {
    let stack = Stack::start(&["/k:service_ms=10"]);
    let a = stack.envoy(&config(Some(2), true, json!({})));
    let b = stack.envoy(&config(Some(2), true, json!({})));
    for capacity in [5, 3, 7] {
        stack.push(PATH, capacity);
        for envoy in [&a, &b] {
            wait_capacity(envoy, capacity, Duration::from_secs(3));
        }
    }
}

#[test]
fn listener_update_mid_stream_moves_leadership_with_no_gap_and_no_leak() {
    let stack = Stack::start(&["/k:service_ms=10"]);
    let mut proxy = stack.proxy(&config(Some(2), true, json!({})));
    proxy.use_lds = true;
    let envoy = Envoy::start(&proxy, WORKERS);
    stack.push(PATH, 3);
    wait_capacity(&envoy, 3, Duration::from_secs(10));
    let leader_before = stats(&envoy);

    // A new configuration (the old VMs drain for 600 s and keep ticking).
    proxy.plugin_config_json = config(Some(2), true, json!({"max_queue": 999})).to_string();
    envoy.update_lds(&proxy);
    // A change during the handover arrives (no gap)...
    stack.push(PATH, 6);
    let took = wait_capacity(&envoy, 6, Duration::from_secs(2));
    assert!(took < Duration::from_secs(1), "{took:?}");
    // ...a VM of the new configuration takes the lead...
    wait_until(Duration::from_secs(2), "a new leader", || {
        let s = stats(&envoy);
        (s["leader"] != leader_before["leader"] && s["sync"]["state"] == "connected").then_some(())
    });
    // ...and the next change arrives through it.
    stack.push(PATH, 4);
    let took = wait_capacity(&envoy, 4, Duration::from_secs(2));
    assert!(took < Duration::from_secs(1), "{took:?}");
    // One stream to sync, not one per VM and not the old one as well.
    let active = format!("cluster.{SYNC_CLUSTER}.upstream_rq_active");
    envoy.wait_stat(&active, Duration::from_secs(3), |n| n == 1);
}

/// The front proxy the harness renders with the sync cluster is one Envoy
/// accepts (HTTP/2 with keepalive, a cluster name other than `envoy`).
#[test]
fn rendered_front_proxy_with_the_sync_cluster_validates() {
    let mut proxy = FrontProxy::new(1, config(Some(2), true, json!({})).to_string());
    proxy.extra_clusters_yaml = sluice_harness::sync_cluster_yaml(2);
    let yaml = proxy.render();
    assert!(yaml.contains("connection_keepalive"));
    Envoy::validate_yaml(&yaml).unwrap();
}
