//! Instances behind one Envoy (1.40, `--concurrency 4`): the filter picks
//! the instance for every request, Envoy's `override_host` policy sends it
//! there, and each instance is held to its own capacity. Every figure that
//! matters comes from the backends' own traces (what each really ran at
//! once, on its clock), not from the client.

use serde_json::{json, Value};
use sluice_harness::{most_at_once, wait_until, Backend, Envoy, FrontProxy, TracedRequest};
use sluice_loadgen::{run_blocking, summarize, Burst};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const PATH: &str = "/predict";

/// One instance: exponential service times around `service_ms`, traced, and
/// no limit of its own, so only the proxy holds it.
fn instance(seed: u32, service_ms: u32) -> Backend {
    Backend::start_with_args(&[
        "--threads",
        "2",
        "--trace",
        "--route",
        &format!(
            "{PATH}:capacity=1000,service_ms={service_ms},service_dist=exponential,seed={seed}"
        ),
    ])
}

fn config(hosts: &[SocketAddr], capacities: &[u32], instances_extra: Value) -> Value {
    let mut instances = json!({"hosts": hosts.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "eject_time": 0.5, "max_eject_time": 1});
    for (k, v) in instances_extra.as_object().into_iter().flatten() {
        instances[k] = v.clone();
    }
    let per_instance: serde_json::Map<String, Value> = hosts
        .iter()
        .zip(capacities)
        .map(|(a, c)| (a.to_string(), json!(c)))
        .collect();
    json!({
        "service": "fleet",
        "abandon_hold": 0,
        "instances": instances,
        "endpoints": {PATH: {
            "capacity": capacities[0],
            "instance_capacity": per_instance,
            "queue_timeout": 20,
            "max_queue": 1000,
        }},
    })
}

fn start(backends: &[&Backend], cluster: &[SocketAddr], config: &Value) -> Envoy {
    let mut proxy = FrontProxy::new(backends[0].port(), config.to_string());
    proxy.instances = cluster.to_vec();
    Envoy::start(&proxy, 4)
}

fn sluice_stats(envoy: &Envoy) -> Value {
    let res = envoy
        .request("GET", "/balancer/stats")
        .send()
        .expect("stats");
    assert_eq!(res.status, 200);
    res.json()["endpoints"][PATH].clone()
}

fn instance_stats(envoy: &Envoy, address: SocketAddr) -> Value {
    sluice_stats(envoy)["instances"]
        .as_array()
        .expect("instances in the stats")
        .iter()
        .find(|i| i["address"] == address.to_string())
        .cloned()
        .unwrap_or(Value::Null)
}

fn drains_to_zero(envoy: &Envoy) {
    wait_until(Duration::from_secs(10), "the books back to zero", || {
        let s = sluice_stats(envoy);
        (s["active_requests"] == 0
            && s["queued"] == 0
            && s["instances"]
                .as_array()
                .is_some_and(|a| a.iter().all(|i| i["in_flight"] == 0)))
        .then_some(())
    });
}

/// Busy slot time over `slots` × the time the backlog lasted (from the
/// first arrival to the arrival of the last request to get a slot): while
/// requests wait, every slot should be running one.
fn utilisation(traces: &[Vec<TracedRequest>], slots: u32) -> f64 {
    let all: Vec<&TracedRequest> = traces.iter().flatten().collect();
    let start = all.iter().map(|r| r.arrived_us).min().unwrap();
    let end = all.iter().map(|r| r.arrived_us).max().unwrap();
    let busy: u64 = all
        .iter()
        .map(|r| {
            r.departed_us
                .min(end)
                .saturating_sub(r.arrived_us.max(start))
        })
        .sum();
    busy as f64 / (f64::from(slots) * (end - start) as f64)
}

/// A burst of `n` at once through Envoy; every one must be served.
fn burst(envoy: &Envoy, n: usize) {
    let outcomes = run_blocking(&Burst::new(envoy.listener_addr(), PATH, n));
    let s = summarize(&outcomes);
    assert_eq!(s.ok, n, "{s:?}");
}

fn held_to(backends: &[&Backend], capacities: &[u32]) -> Vec<Vec<TracedRequest>> {
    let traces: Vec<_> = backends.iter().map(|b| b.trace(PATH)).collect();
    for ((t, b), &cap) in traces.iter().zip(backends).zip(capacities) {
        let most = most_at_once(t);
        assert_eq!(
            most,
            cap as usize,
            "instance {} (capacity {cap}) ran {most} at once (its own trace)",
            b.addr()
        );
    }
    traces
}

#[test]
fn three_instances_of_four_each_held_to_four_and_kept_busy() {
    let backends: Vec<Backend> = (1..=3).map(|i| instance(i, 60)).collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let hosts: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    let envoy = start(&refs, &hosts, &config(&hosts, &[4, 4, 4], json!({})));
    burst(&envoy, 60);
    let traces = held_to(&refs, &[4, 4, 4]);
    let u = utilisation(&traces, 12);
    println!("utilisation while requests waited: {u:.3}");
    assert!(
        u >= 0.95,
        "12 slots busy {u:.3} of the time while requests waited"
    );
    assert_eq!(sluice_stats(&envoy)["total_capacity"], 12);
    drains_to_zero(&envoy);
    // Per instance in Prometheus: the sluice_instance label.
    let prom = envoy.admin_get("/stats/prometheus").unwrap().text();
    for a in &hosts {
        let want = format!("sluice_instance=\"{a}\"");
        assert!(
            prom.lines()
                .any(|l| l.starts_with("sluice_instance_capacity{")
                    && l.contains(&want)
                    && l.contains("sluice_endpoint=\"/predict\"")
                    && l.ends_with(" 4")),
            "no sluice_instance_capacity for {a}:\n{}",
            prom.lines()
                .filter(|l| l.contains("instance"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn unequal_instances_each_held_to_their_own() {
    let caps = [2, 4, 8];
    let backends: Vec<Backend> = (1..=3).map(|i| instance(i, 60)).collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let hosts: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    let envoy = start(&refs, &hosts, &config(&hosts, &caps, json!({})));
    burst(&envoy, 84);
    let traces = held_to(&refs, &caps);
    // Work follows capacity: the 8 ran more than the 2.
    assert!(traces[2].len() > traces[0].len());
    drains_to_zero(&envoy);
}

#[test]
fn a_killed_instance_is_ejected_and_picked_again_once_back() {
    let backends: Vec<Backend> = (1..=3).map(|i| instance(i, 50)).collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let hosts: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    let envoy = start(&refs, &hosts, &config(&hosts, &[2, 2, 2], json!({})));
    let dead = hosts[2];
    let addr = envoy.listener_addr();
    let load = std::thread::spawn(move || {
        let mut b = Burst::new(addr, PATH, 150);
        b.spacing = Duration::from_millis(10);
        run_blocking(&b)
    });
    std::thread::sleep(Duration::from_millis(400));
    let pid = backends[2].pid();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    assert!(killed.unwrap().success());
    let started = Instant::now();
    let outcomes = load.join().unwrap();
    let s = summarize(&outcomes);
    // Only the requests the dead instance was running (and any picked for it
    // before its first failure) fail; none waits out its queue timeout.
    assert_eq!(s.queue_timeout, 0, "{s:?}");
    assert!(s.ok >= 140, "{s:?}");
    let failed = outcomes.iter().filter(|o| o.status == 503).count();
    assert!(failed <= 6, "{failed} failed: {s:?}");
    let st = instance_stats(&envoy, dead);
    assert!(st["failures"].as_u64().unwrap() >= 1, "{st}");
    drains_to_zero(&envoy);
    // The live two were held to theirs all along.
    held_to(&refs[..2], &[2, 2]);
    assert!(started.elapsed() < Duration::from_secs(20));
    // Back on the same port: after its back-off, a trial, then picked again.
    let revived = Backend::start_with_args(&[
        "--listen",
        &dead.to_string(),
        "--trace",
        "--route",
        &format!("{PATH}:capacity=1000,service_ms=20"),
    ]);
    wait_until(
        Duration::from_secs(10),
        "the revived instance picked again",
        || {
            burst(&envoy, 12);
            (!revived.trace(PATH).is_empty()).then_some(())
        },
    );
    burst(&envoy, 30);
    assert!(most_at_once(&revived.trace(PATH)) <= 2);
    assert_eq!(
        instance_stats(&envoy, dead)["failures"],
        0,
        "served: healthy again"
    );
    drains_to_zero(&envoy);
}

#[test]
fn a_pick_envoy_cannot_honour_is_counted_and_the_books_stay_right() {
    let backends: Vec<Backend> = (1..=2).map(|i| instance(i, 30)).collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let mut hosts: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    let cluster = hosts.clone();
    // The filter knows a third instance that Envoy's cluster does not.
    let missing: SocketAddr = ([127, 0, 0, 1], sluice_harness::free_port()).into();
    hosts.push(missing);
    let envoy = start(&refs, &cluster, &config(&hosts, &[3, 3, 3], json!({})));
    burst(&envoy, 40);
    let st = instance_stats(&envoy, missing);
    let missed = st["picks_missed"].as_u64().unwrap();
    assert!(missed >= 1, "{st}");
    assert_eq!(st["in_flight"], 0);
    drains_to_zero(&envoy);
    let served: usize = refs.iter().map(|b| b.trace(PATH).len()).sum();
    assert_eq!(served, 40, "every request ran somewhere");
    wait_until(
        Duration::from_secs(3),
        "picks_missed_total to reach the stats' count",
        || {
            envoy
                .stat("wasmcustom.sluice.fleet./predict.picks_missed_total")
                .filter(|&n| n as u64 == missed)
        },
    );
}

#[test]
fn sticky_requests_wait_for_their_instance() {
    let backends: Vec<Backend> = (1..=3).map(|i| instance(i, 40)).collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    let hosts: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    let envoy = start(
        &refs,
        &hosts,
        &config(
            &hosts,
            &[1, 1, 1],
            json!({"sticky": {"header": "x-session"}}),
        ),
    );
    let addr = envoy.listener_addr();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                sluice_harness::http::Request::new("POST", addr, PATH)
                    .header("x-session", "user-42")
                    .send()
                    .unwrap()
                    .status
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 200);
    }
    let counts: Vec<usize> = refs.iter().map(|b| b.trace(PATH).len()).collect();
    let home = counts
        .iter()
        .position(|&n| n == 6)
        .unwrap_or_else(|| panic!("{counts:?}"));
    assert_eq!(
        counts.iter().sum::<usize>(),
        6,
        "all on one instance: {counts:?}"
    );
    assert_eq!(
        most_at_once(&refs[home].trace(PATH)),
        1,
        "one at a time there"
    );
    drains_to_zero(&envoy);
}

/// Instances through DNS: a real dnsmasq on a loopback port, Envoy's
/// STRICT_DNS cluster and sluice-sync both resolving through it. One added
/// is picked within a second and the set serves more; one removed stops
/// being picked. No restart.
#[test]
fn instances_from_dns_join_and_leave_without_a_restart() {
    use sluice_harness::{sync_cluster_yaml, Dnsmasq, Redis, SyncService, SYNC_CLUSTER};
    const NAME: &str = "backend.fleet.test";
    let port = sluice_harness::free_port();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let backends: Vec<Backend> = ips
        .iter()
        .map(|ip| {
            Backend::start_with_args(&[
                "--listen",
                &format!("{ip}:{port}"),
                "--trace",
                "--route",
                &format!("{PATH}:capacity=1000,service_ms=50"),
            ])
        })
        .collect();
    let dns = Dnsmasq::start(&[(NAME, ips[0]), (NAME, ips[1])]);
    let redis = Redis::start();
    let dns_arg = dns.addr().to_string();
    let discover = format!("fleet={NAME}:{port}");
    let sync = SyncService::start(
        &redis.url(),
        &[
            "--discover",
            &discover,
            "--dns-server",
            &dns_arg,
            "--dns-interval",
            "500ms",
        ],
    );
    let config = json!({
        "service": "fleet",
        "abandon_hold": 0,
        "sync": {"cluster": SYNC_CLUSTER},
        "instances": {"dns": format!("{NAME}:{port}")},
        "endpoints": {PATH: {"capacity": 2, "queue_timeout": 20, "max_queue": 1000}},
    });
    let mut proxy = FrontProxy::new(port, config.to_string());
    proxy.dns_instances = Some((NAME.to_string(), port, dns.addr()));
    proxy.extra_clusters_yaml = sync_cluster_yaml(sync.addr().port());
    let envoy = Envoy::start(&proxy, 4);
    // The stats on one kept connection: a fresh one per poll waits out
    // Envoy's 1 s delayed close of each local reply, and the times below
    // would measure that, not the pick-up.
    let stats_conn = std::cell::RefCell::new(
        std::net::TcpStream::connect(envoy.listener_addr()).expect("a stats connection"),
    );
    let set = |n: usize| {
        let s =
            sluice_harness::http::keep_alive_get(&mut stats_conn.borrow_mut(), "/balancer/stats")
                .json()["endpoints"][PATH]
                .clone();
        (s["instances_source"] == "sync"
            && s["instances"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|i| i["gone"] == false).count() == n))
        .then_some(())
    };
    wait_until(
        Duration::from_secs(10),
        "the two instances from DNS",
        || set(2),
    );
    // Envoy's cluster resolves on its own schedule: wait for its two hosts.
    wait_until(
        Duration::from_secs(10),
        "Envoy's cluster to hold both",
        || {
            let clusters = envoy.admin_get("/clusters").ok()?.text();
            ips[..2]
                .iter()
                .all(|ip| clusters.contains(&format!("backend::{ip}:{port}::")))
                .then_some(())
        },
    );
    let served = |b: &Backend| b.trace(PATH).len();
    let busy_ms = |bs: &[&Backend], before: &[usize]| {
        let new: Vec<TracedRequest> = bs
            .iter()
            .zip(before)
            .flat_map(|(b, &n)| b.trace(PATH).into_iter().skip(n))
            .collect();
        let start = new.iter().map(|r| r.arrived_us).min().unwrap();
        let end = new.iter().map(|r| r.departed_us).max().unwrap();
        (end - start) as f64 / 1000.0
    };
    let all: Vec<&Backend> = backends.iter().collect();
    burst(&envoy, 48);
    let two_ms = busy_ms(&all, &[0, 0, 0]);
    assert_eq!(served(&backends[2]), 0, "not in DNS yet");

    // Added: picked within a second of the record.
    let added = Instant::now();
    dns.set_records(&[(NAME, ips[0]), (NAME, ips[1]), (NAME, ips[2])]);
    wait_until(
        Duration::from_secs(5),
        "the third instance in the filter",
        || set(3),
    );
    let in_filter = added.elapsed();
    wait_until(
        Duration::from_secs(5),
        "Envoy's cluster to hold the third",
        || {
            let clusters = envoy.admin_get("/clusters").ok()?.text();
            clusters
                .contains(&format!("backend::{}:{port}::", ips[2]))
                .then_some(())
        },
    );
    let took = added.elapsed();
    println!(
        "added instance known to the filter after {in_filter:?}, to Envoy's cluster after {took:?}"
    );
    // Within a second of the record: sync resolves every 500 ms here, and
    // Envoy's cluster refreshes as often.
    assert!(in_filter < Duration::from_secs(1), "{in_filter:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let before: Vec<usize> = all.iter().map(|b| served(b)).collect();
    burst(&envoy, 48);
    let three_ms = busy_ms(&all, &before);
    println!("48 requests: {two_ms:.0} ms on two instances, {three_ms:.0} ms on three");
    assert!(served(&backends[2]) >= 10, "the new one takes its share");
    assert!(
        two_ms / three_ms > 1.25,
        "{two_ms:.0} ms vs {three_ms:.0} ms"
    );
    for b in &backends {
        assert!(
            most_at_once(&b.trace(PATH)) <= 2,
            "{} ran more than 2",
            b.addr()
        );
    }

    // Removed: not picked again.
    dns.set_records(&[(NAME, ips[1]), (NAME, ips[2])]);
    wait_until(
        Duration::from_secs(5),
        "the first instance out of the filter's set",
        || set(2),
    );
    let first_before = served(&backends[0]);
    burst(&envoy, 24);
    assert_eq!(
        served(&backends[0]),
        first_before,
        "a removed instance is never picked"
    );
    drains_to_zero(&envoy);
}
