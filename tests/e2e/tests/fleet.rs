//! One capacity for a fleet of Envoys (`sync.shares`, issue 19): real
//! Redis, the real `sluice-sync`, three real Envoy processes at
//! `--concurrency 2` sharing one backend's capacity, and the backend's own
//! trace (`--trace`) as the judge of how many requests ran at once.
//!
//! - bursts through all three at once never run more than the capacity
//!   at the backend, and keep it busy;
//! - all the load on one Envoy: it gets >= 90 % of the capacity within a
//!   second;
//! - an Envoy killed (SIGKILL): its slots return to the others after the
//!   lease, not before, and nothing overshoots meanwhile;
//! - an idle Envoy stopped (SIGTERM): its slots return at once when its
//!   final report gets out, else after the lease;
//! - an Envoy joining mid-burst gets slots, with no overshoot;
//! - all the load moved from one Envoy to another: shares follow within a
//!   second;
//! - sync SIGKILLed and restarted, or Redis restarted, mid-burst: no
//!   overshoot, and the backend never idles for a lease.

use serde_json::{json, Value};
use sluice_harness::{
    bin_path, most_at_once, unique_scratch_path, wait_until, Backend, Envoy, FrontProxy, Redis,
    SyncService, TracedRequest, SYNC_CLUSTER,
};
use sluice_loadgen::{run_blocking, Burst, Outcome};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SERVICE: &str = "fleet";
const PATH: &str = "/k";
const CAPACITY: u32 = 10;
const SERVICE_MS: u64 = 50;
/// sync's `--share-lease`.
const LEASE: Duration = Duration::from_secs(1);

struct Fleet {
    // Dropped in this order: the Envoys (SIGKILL) first.
    envoys: Vec<Option<Envoy>>,
    backend: Backend,
    sync: SyncService,
    redis: Redis,
}

impl Fleet {
    fn start(n: usize) -> Fleet {
        let redis = Redis::start();
        push(&redis.url(), CAPACITY);
        let sync = start_sync(&redis.url(), "127.0.0.1:0");
        let backend = Backend::start_with_args(&[
            "--trace",
            "--route",
            &format!("{PATH}:capacity=1000,service_ms={SERVICE_MS}"),
        ]);
        let envoys = (0..n).map(|_| Some(start_envoy(&backend, &sync))).collect();
        let fleet = Fleet {
            envoys,
            backend,
            sync,
            redis,
        };
        for e in fleet.live() {
            wait_until(Duration::from_secs(10), "a grant on every Envoy", || {
                let s = stats(e.listener_addr());
                (s["endpoints"][PATH]["capacity"] == CAPACITY
                    && s["sync"]["shares"]["state"] == "granted")
                    .then_some(())
            });
        }
        // A newcomer gets slots only once the others gave theirs up: wait
        // for the even split to settle.
        wait_until(
            Duration::from_secs(10),
            "the whole capacity shared out",
            || {
                let total: u64 = fleet.live().map(|e| admits(e.listener_addr())).sum();
                (total == u64::from(CAPACITY)).then_some(())
            },
        );
        fleet
    }

    fn live(&self) -> impl Iterator<Item = &Envoy> {
        self.envoys.iter().flatten()
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.envoys[i].as_ref().expect("alive").listener_addr()
    }

    fn trace(&self) -> Vec<TracedRequest> {
        self.backend.trace(PATH)
    }
}

/// One Envoy of the fleet at `--concurrency 2`, sharing through `sync`.
fn start_envoy(backend: &Backend, sync: &SyncService) -> Envoy {
    let config = json!({
        "service": SERVICE,
        "queue_timeout": 30,
        "max_queue": 1000,
        "abandon_hold": 0,
        "sync": {"cluster": SYNC_CLUSTER, "heartbeat_timeout": 3, "shares": true},
        "endpoints": {PATH: {}},
    });
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    proxy.extra_clusters_yaml = sync.cluster_yaml();
    Envoy::start(&proxy, 2)
}

/// sluice-sync with the test's lease, listening on `listen`.
fn start_sync(redis_url: &str, listen: &str) -> SyncService {
    let lease = format!("{}ms", LEASE.as_millis());
    SyncService::start(redis_url, &["--share-lease", &lease, "--listen", listen])
}

/// `sluice-prober push --force`: the capacity in Redis, as an operator sets it.
fn push(redis_url: &str, capacity: u32) {
    let dir = unique_scratch_path("push");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sluice.yaml");
    std::fs::write(
        &file,
        format!("service: {SERVICE}\nendpoints:\n  {PATH}:\n    capacity: {capacity}\n"),
    )
    .unwrap();
    let out = Command::new(bin_path("sluice-prober"))
        .args(["push", "--force", "--config", file.to_str().unwrap()])
        .args(["--redis", redis_url])
        .output()
        .expect("run sluice-prober");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The filter's stats, read up to their content-length.
fn stats(addr: SocketAddr) -> Value {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    sluice_harness::http::keep_alive_get(&mut conn, "/balancer/stats").json()
}

/// What the Envoy at `addr` may admit on `/k` now (its share, under its
/// lease).
fn admits(addr: SocketAddr) -> u64 {
    stats(addr)["endpoints"][PATH]["share"]["admits"]
        .as_u64()
        .unwrap_or(0)
}

fn burst(addr: SocketAddr, n: usize, spacing: Duration) -> Vec<Outcome> {
    let mut b = Burst::new(addr, PATH, n);
    b.spacing = spacing;
    b.timeout = Duration::from_secs(60);
    run_blocking(&b)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Busy slot-time over the capacity's slot-time between the first
/// arrival and the last departure.
fn utilisation(trace: &[TracedRequest]) -> f64 {
    let first = trace.iter().map(|r| r.arrived_us).min().unwrap();
    let last = trace.iter().map(|r| r.departed_us).max().unwrap();
    let busy: u64 = trace.iter().map(|r| r.departed_us - r.arrived_us).sum();
    busy as f64 / (f64::from(CAPACITY) * (last - first) as f64)
}

/// The mean number of requests inside the backend in each `bucket` from
/// the first arrival: where slots sat idle.
fn timeline(trace: &[TracedRequest], bucket: Duration) -> Vec<f64> {
    let first = trace.iter().map(|r| r.arrived_us).min().unwrap();
    let last = trace.iter().map(|r| r.departed_us).max().unwrap();
    let b = bucket.as_micros() as u64;
    let n = (last - first).div_ceil(b) as usize;
    let mut busy = vec![0u64; n];
    for r in trace {
        let (a, d) = (r.arrived_us - first, r.departed_us - first);
        for (i, slot) in busy.iter_mut().enumerate() {
            let (lo, hi) = (i as u64 * b, (i as u64 + 1) * b);
            *slot += d.min(hi).saturating_sub(a.max(lo));
        }
    }
    busy.into_iter().map(|t| t as f64 / b as f64).collect()
}

/// The first moment (µs) at or after `from_us` at which `at_least`
/// requests were inside the backend at once.
fn first_reaching(trace: &[TracedRequest], at_least: usize, from_us: u64) -> Option<u64> {
    let mut events: Vec<(u64, i8)> = trace
        .iter()
        .flat_map(|r| [(r.arrived_us, 1), (r.departed_us, -1)])
        .collect();
    events.sort_unstable();
    let mut inside = 0i64;
    for (t, step) in events {
        inside += i64::from(step);
        if t >= from_us && inside >= at_least as i64 {
            return Some(t);
        }
    }
    None
}

#[test]
fn bursts_through_every_envoy_at_once_never_run_more_than_the_capacity() {
    let fleet = Fleet::start(3);
    fleet.backend.reset();
    let per_envoy = 80;
    let outcomes: Vec<Vec<Outcome>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let addr = fleet.addr(i);
                s.spawn(move || burst(addr, per_envoy, Duration::from_millis(2)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, o) in outcomes.iter().enumerate() {
        let bad: Vec<_> = o.iter().filter(|o| o.status != 200).collect();
        assert!(bad.is_empty(), "envoy {i}: {bad:?}");
    }
    let trace = fleet.trace();
    assert_eq!(trace.len(), 3 * per_envoy);
    let most = most_at_once(&trace);
    let used = utilisation(&trace);
    let shape: Vec<String> = timeline(&trace, Duration::from_millis(100))
        .iter()
        .map(|b| format!("{b:.1}"))
        .collect();
    eprintln!(
        "fleet burst: most at once {most} of {CAPACITY}, utilisation {used:.3}; in flight per 100 ms: {}",
        shape.join(" ")
    );
    assert!(most <= CAPACITY as usize, "the backend saw {most} at once");
    // 0.950-0.971 in seven runs here with prompt reports and the levelled
    // split (0.85-0.90 on the 200 ms interval alone); what is left is the
    // ramp of the first 100 ms and the last wave's drain. Asserted with
    // room for a busier machine: two of the seven were at 0.950.
    assert!(used >= 0.93, "utilisation {used:.3}");
}

#[test]
fn all_the_load_on_one_envoy_gets_90_percent_of_the_capacity_within_a_second() {
    let fleet = Fleet::start(3);
    fleet.backend.reset();
    let start_us = now_us();
    let outcomes = burst(fleet.addr(0), 200, Duration::from_millis(1));
    assert!(outcomes.iter().all(|o| o.status == 200));
    let trace = fleet.trace();
    let most = most_at_once(&trace);
    let want = (CAPACITY as usize * 9).div_ceil(10);
    let reached = first_reaching(&trace, want, start_us).expect("reached 90 %");
    let after_ms = (reached - start_us) as f64 / 1000.0;
    eprintln!(
        "one Envoy: {want} of {CAPACITY} in flight at the backend {after_ms:.0} ms after the load began; most at once {most}"
    );
    assert!(most <= CAPACITY as usize, "the backend saw {most} at once");
    assert!(after_ms <= 1000.0, "took {after_ms:.0} ms");
}

#[test]
fn a_killed_envoys_slots_return_after_the_lease_not_before() {
    let mut fleet = Fleet::start(3);
    fleet.backend.reset();
    // Load on Envoys 0 and 2 (1 idles): the capacity splits between them.
    let (a, c) = (fleet.addr(0), fleet.addr(2));
    let load = |addr| std::thread::spawn(move || burst(addr, 400, Duration::from_millis(4)));
    let on_a = load(a);
    let on_c = load(c);
    wait_until(
        Duration::from_secs(5),
        "both loaded Envoys hold a share",
        || (admits(a) >= 3 && admits(c) >= 3).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(500));
    let c_share = admits(c);
    let a_before = admits(a);
    // SIGKILL (the harness kills by pid on drop): no final report.
    let killed = Instant::now();
    let killed_us = now_us();
    fleet.envoys[2] = None;
    // Not before the lease: A holds at most what C did not.
    let mut first_above = None;
    while killed.elapsed() < LEASE + Duration::from_secs(2) {
        let now = admits(a);
        if now > u64::from(CAPACITY) - c_share && first_above.is_none() {
            first_above = Some(killed.elapsed());
        }
        if now >= u64::from(CAPACITY) * 9 / 10 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = first_above.expect("C's slots came back to A");
    eprintln!(
        "killed C (share {c_share}, A held {a_before}): A got more than {} after {} ms (lease {} ms)",
        u64::from(CAPACITY) - c_share,
        took.as_millis(),
        LEASE.as_millis()
    );
    // Sync counts from the receipt of C's last report (up to one report
    // interval, 200 ms, before the kill).
    assert!(
        took >= LEASE - Duration::from_millis(250),
        "C's slots were given away {} ms after the kill, before its lease could end",
        took.as_millis()
    );
    assert!(took <= LEASE + Duration::from_millis(1500), "{took:?}");
    let _ = on_a.join().unwrap();
    let _ = on_c.join();
    let trace = fleet.trace();
    let most = most_at_once(&trace);
    // What C had at the backend when it died still ran (a SIGKILLed
    // Envoy's upstream connections close, but the backend finishes what
    // it started): counted by the trace too.
    let after_kill: Vec<_> = trace
        .iter()
        .filter(|r| r.departed_us >= killed_us)
        .cloned()
        .collect();
    eprintln!(
        "most at once {most} of {CAPACITY} ({} requests after the kill)",
        after_kill.len()
    );
    assert!(most <= CAPACITY as usize, "the backend saw {most} at once");
}

#[test]
fn an_envoy_stopped_with_sigterm_gives_its_slots_back_without_overshoot() {
    let mut fleet = Fleet::start(3);
    let a = fleet.addr(0);
    // Nobody has demand: the capacity is split evenly, C holds part.
    let c_share = admits(fleet.addr(2));
    assert!(c_share > 0);
    let pid = fleet.envoys[2].as_ref().unwrap().pid();
    // SAFETY: kill(2) on the pid of a child the harness has not reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    let exit = fleet.envoys[2]
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(5));
    let stopped = Instant::now();
    let on_a = std::thread::spawn(move || burst(a, 300, Duration::from_millis(4)));
    let took = wait_until(Duration::from_secs(3), "A has the whole capacity", || {
        (admits(a) >= u64::from(CAPACITY)).then(|| stopped.elapsed())
    });
    eprintln!(
        "SIGTERM to idle C (share {c_share}, exit {exit:?}): A admits {CAPACITY} {} ms after C exited (lease {} ms)",
        took.as_millis(),
        LEASE.as_millis()
    );
    fleet.envoys[2] = None;
    let _ = on_a.join().unwrap();
    assert!(most_at_once(&fleet.trace()) <= CAPACITY as usize);
    // With the final report through, C's share is free at once (about
    // 200 ms here: A's next report and grant); when Envoy's shutdown
    // resets the stream before the report is out (seen in about half the
    // runs), sync counts C's share until its last report + the lease, as
    // for a SIGKILL. Either way within the lease and a report or two.
    assert!(took <= LEASE + Duration::from_millis(600), "{took:?}");
}

/// Bursts of `per_envoy` through every live Envoy at once, `during` run
/// meanwhile (with the moment the bursts began); every request must be
/// answered 200.
fn bursts_with(fleet: &mut Fleet, per_envoy: usize, during: impl FnOnce(&mut Fleet, Instant)) {
    let addrs: Vec<SocketAddr> = fleet.live().map(|e| e.listener_addr()).collect();
    let began = Instant::now();
    let handles: Vec<_> = addrs
        .into_iter()
        .map(|addr| std::thread::spawn(move || burst(addr, per_envoy, Duration::from_millis(4))))
        .collect();
    during(fleet, began);
    for (i, h) in handles.into_iter().enumerate() {
        let outcomes = h.join().unwrap();
        let bad: Vec<_> = outcomes.iter().filter(|o| o.status != 200).collect();
        assert!(bad.is_empty(), "envoy {i}: {bad:?}");
    }
}

/// The longest time between the first arrival and the last departure
/// during which the backend ran nothing.
fn longest_idle(trace: &[TracedRequest]) -> Duration {
    let mut events: Vec<(u64, i8)> = trace
        .iter()
        .flat_map(|r| [(r.arrived_us, 1), (r.departed_us, -1)])
        .collect();
    events.sort_unstable();
    let (mut inside, mut idle_since, mut longest) = (0i64, None, 0u64);
    for (t, step) in events {
        inside += i64::from(step);
        match (inside, idle_since) {
            (0, None) => idle_since = Some(t),
            (n, Some(since)) if n > 0 => {
                longest = longest.max(t - since);
                idle_since = None;
            }
            _ => {}
        }
    }
    Duration::from_micros(longest)
}

#[test]
fn load_moved_from_one_envoy_to_another_is_followed_within_a_second() {
    let fleet = Fleet::start(3);
    fleet.backend.reset();
    // All the load on A until it is served, then all of it on B.
    let a = burst(fleet.addr(0), 100, Duration::from_millis(1));
    assert!(a.iter().all(|o| o.status == 200));
    let moved_us = now_us();
    let b = burst(fleet.addr(1), 200, Duration::from_millis(1));
    assert!(b.iter().all(|o| o.status == 200));
    let trace = fleet.trace();
    let most = most_at_once(&trace);
    let want = (CAPACITY as usize * 9).div_ceil(10);
    let reached = first_reaching(&trace, want, moved_us).expect("B reached 90 %");
    let after_ms = (reached - moved_us) as f64 / 1000.0;
    eprintln!(
        "load moved from A to B: {want} of {CAPACITY} in flight through B {after_ms:.0} ms after its load began; most at once {most}"
    );
    assert!(most <= CAPACITY as usize, "the backend saw {most} at once");
    assert!(after_ms <= 1000.0, "took {after_ms:.0} ms");
}

#[test]
fn sync_killed_and_restarted_mid_burst_neither_overshoots_nor_stalls_past_the_lease() {
    let mut fleet = Fleet::start(3);
    fleet.backend.reset();
    let listen = fleet.sync.addr().to_string();
    bursts_with(&mut fleet, 150, |fleet, began| {
        std::thread::sleep(Duration::from_millis(300).saturating_sub(began.elapsed()));
        // SAFETY: kill(2) on the pid of a child the harness has not reaped.
        unsafe {
            libc::kill(fleet.sync.pid() as libc::pid_t, libc::SIGKILL);
        }
        fleet.sync = start_sync(&fleet.redis.url(), &listen);
        eprintln!(
            "sync restarted {} ms into the bursts",
            began.elapsed().as_millis()
        );
    });
    let trace = fleet.trace();
    assert_eq!(trace.len(), 3 * 150);
    let most = most_at_once(&trace);
    let idle = longest_idle(&trace);
    let used = utilisation(&trace);
    eprintln!(
        "sync SIGKILLed and restarted mid-burst: most at once {most} of {CAPACITY}, longest with nothing running {} ms, utilisation {used:.3}",
        idle.as_millis()
    );
    assert!(most <= CAPACITY as usize, "the backend saw {most} at once");
    assert!(idle < LEASE, "the backend idled {} ms", idle.as_millis());
}

#[test]
fn redis_restarted_mid_burst_neither_overshoots_nor_stalls_past_the_lease() {
    let mut fleet = Fleet::start(3);
    fleet.backend.reset();
    bursts_with(&mut fleet, 150, |fleet, began| {
        std::thread::sleep(Duration::from_millis(300).saturating_sub(began.elapsed()));
        // A new, empty Redis on the same port; the capacity pushed again,
        // as the prober does on its next round.
        fleet.redis.restart();
        push(&fleet.redis.url(), CAPACITY);
        eprintln!(
            "redis restarted {} ms into the bursts",
            began.elapsed().as_millis()
        );
    });
    let trace = fleet.trace();
    assert_eq!(trace.len(), 3 * 150);
    let most = most_at_once(&trace);
    let idle = longest_idle(&trace);
    let used = utilisation(&trace);
    eprintln!(
        "redis restarted mid-burst: most at once {most} of {CAPACITY}, longest with nothing running {} ms, utilisation {used:.3}",
        idle.as_millis()
    );
    assert!(most <= CAPACITY as usize, "the backend saw {most} at once");
    assert!(idle < LEASE, "the backend idled {} ms", idle.as_millis());
}

#[test]
fn an_envoy_joining_mid_burst_gets_slots_without_overshoot() {
    let mut fleet = Fleet::start(2);
    fleet.backend.reset();
    let mut joined_at = None;
    let mut on_c = None;
    bursts_with(&mut fleet, 150, |fleet, began| {
        std::thread::sleep(Duration::from_millis(300).saturating_sub(began.elapsed()));
        let c = start_envoy(&fleet.backend, &fleet.sync);
        let addr = c.listener_addr();
        fleet.envoys.push(Some(c));
        joined_at = Some(now_us());
        on_c = Some(std::thread::spawn(move || {
            burst(addr, 100, Duration::from_millis(4))
        }));
    });
    let c = on_c.unwrap().join().unwrap();
    assert!(c.iter().all(|o| o.status == 200), "{c:?}");
    let joined_us = joined_at.unwrap();
    // C's first answer, from the start of its load (its own clock): what
    // it waited for a first slot while A and B had queues.
    let first_answer_ms = c
        .iter()
        .map(|o| o.sent_at_ms + o.latency_ms)
        .fold(f64::INFINITY, f64::min);
    let trace = fleet.trace();
    assert_eq!(trace.len(), 2 * 150 + 100);
    let most = most_at_once(&trace);
    let used = utilisation(&trace);
    eprintln!(
        "an Envoy joined mid-burst: most at once {most} of {CAPACITY}, its first answer {first_answer_ms:.0} ms after its load began, utilisation {used:.3} (joined {} ms after the first arrival)",
        (joined_us - trace.iter().map(|r| r.arrived_us).min().unwrap()) / 1000
    );
    assert!(most <= CAPACITY as usize, "the backend saw {most} at once");
    assert!(
        first_answer_ms <= LEASE.as_millis() as f64,
        "C waited {first_answer_ms:.0} ms for a first slot"
    );
}
