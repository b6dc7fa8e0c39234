//! The recipes users most often get wrong, run as shipped: the folder's
//! `envoy/<name>/envoy.yaml` with only its ports and the wasm path changed
//! (`sluice_harness::Recipe`), the real filter, and two `sluice-backend`
//! instances on free loopback ports that name themselves in `x-backend-name`
//! (three for the instances recipe, each recording what it ran).
//! Needs `make wasm` and `cargo build --release -p sluice-backend`.

use sluice_harness::http::HttpResponse;
use sluice_harness::{wait_until, Backend, Envoy, Recipe};
use sluice_loadgen::{run_blocking, summarize, Burst};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const PREDICT: &str = "/predict:capacity=4,service_ms=20";

fn backend(name: &str, extra: &[&str]) -> Backend {
    let mut args = vec!["--name", name, "--route", PREDICT];
    args.extend_from_slice(extra);
    Backend::start_with_args(&args)
}

/// The recipe with its backends 8081 and 8082 pointed at `first`/`second`.
fn start(recipe: &str, first: &Backend, second: &Backend) -> Envoy {
    let recipe = Recipe::load(recipe)
        .upstream(8081, first.port())
        .upstream(8082, second.port());
    Envoy::start_with(recipe.envoy_options(2))
}

fn post(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut request = envoy.request("POST", path).timeout(Duration::from_secs(10));
    for (name, value) in headers {
        request = request.header(name, value);
    }
    request
        .send()
        .unwrap_or_else(|e| panic!("POST {path} {headers:?}: {e}"))
}

/// The instance that answered; panics unless it is a 200 from a backend.
fn instance(response: &HttpResponse) -> String {
    assert_eq!(response.status, 200, "{response:?}");
    response
        .header("x-backend-name")
        .unwrap_or_else(|| panic!("no x-backend-name: {response:?}"))
        .to_string()
}

/// Each host's health flags, for failure messages.
fn health_flags(envoy: &Envoy) -> String {
    let clusters = envoy.admin_get("/clusters").map(|r| r.text());
    clusters
        .unwrap_or_else(|e| e.to_string())
        .lines()
        .filter(|line| line.contains("::health_flags::"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `GET /balancer/stats` on a keep-alive connection, read up to its
/// content-length. (The harness's client sends `connection: close`, and
/// Envoy holds a local reply's connection open for its delayed-close
/// timeout, 1 s, before closing: too slow to watch a queue.)
fn sluice_stats(envoy: &Envoy) -> serde_json::Value {
    let mut stream = std::net::TcpStream::connect(envoy.listener_addr()).unwrap();
    sluice_harness::http::keep_alive_get(&mut stream, "/balancer/stats").json()
}

fn completed(backend: &Backend) -> u64 {
    backend.path_stats("/predict")["completed"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn sticky_sessions_keep_a_cookie_on_one_instance_and_spread_different_ones() {
    let a = backend("a", &[]);
    let b = backend("b", &[]);
    let envoy = start("sticky-sessions", &a, &b);
    let mut sent = 0;

    // The same cookie always reaches the same instance.
    let mut cookies_on: BTreeMap<String, usize> = BTreeMap::new();
    for client in 0..16 {
        let cookie = format!("sluice-session=client-{client}");
        let first = instance(&post(&envoy, "/predict", &[("cookie", &cookie)]));
        for _ in 0..4 {
            let again = instance(&post(&envoy, "/predict", &[("cookie", &cookie)]));
            assert_eq!(again, first, "{cookie} moved from {first} to {again}");
        }
        sent += 5;
        *cookies_on.entry(first).or_default() += 1;
    }
    // Different cookies spread: all 16 on one instance has odds 2^-15.
    assert_eq!(
        cookies_on.keys().collect::<Vec<_>>(),
        ["a", "b"],
        "cookies per instance: {cookies_on:?}"
    );

    // The header wins over the cookie and is just as sticky.
    for session in ["alice", "bob", "carol", "dave"] {
        let first = instance(&post(&envoy, "/predict", &[("x-session-id", session)]));
        for client in 0..3 {
            let cookie = format!("sluice-session=other-{client}");
            let headers = [("x-session-id", session), ("cookie", cookie.as_str())];
            let again = instance(&post(&envoy, "/predict", &headers));
            assert_eq!(again, first, "session {session} moved with {cookie}");
        }
        sent += 4;
    }

    // A client with neither gets a cookie from Envoy (the policy's `ttl`),
    // and sending it back keeps it where its first request went.
    let response = post(&envoy, "/predict", &[]);
    let first = instance(&response);
    let set_cookie = response
        .header("set-cookie")
        .unwrap_or_else(|| panic!("Envoy set no cookie: {response:?}"));
    let cookie = set_cookie.split(';').next().unwrap().trim().to_string();
    assert!(cookie.starts_with("sluice-session="), "{set_cookie}");
    for _ in 0..4 {
        let again = post(&envoy, "/predict", &[("cookie", &cookie)]);
        assert_eq!(instance(&again), first, "generated {cookie} moved");
        assert!(
            again.header("set-cookie").is_none(),
            "a client that has the cookie gets no new one: {again:?}"
        );
    }
    sent += 5;

    // What the instances saw: every request once, none lost or doubled.
    assert_eq!(completed(&a) + completed(&b), sent);
}

#[test]
fn killing_the_primary_moves_traffic_to_the_backup_and_back() {
    let primary = backend("primary", &[]);
    let primary_port = primary.port();
    let backup = backend("backup", &[]);
    let envoy = start("failover", &primary, &backup);
    let healthy = "cluster.backend.membership_healthy";
    // Envoy's first health checks can time out while it compiles the wasm
    // for each worker; the backup then serves until the primary passes one
    // and every worker has heard of it.
    envoy.wait_stat(healthy, Duration::from_secs(30), |n| n == 2);
    settle_on(&envoy, "primary");

    let (primary_before, backup_before) = (completed(&primary), completed(&backup));
    for i in 0..10 {
        let answered = instance(&post(&envoy, "/predict", &[]));
        assert_eq!(answered, "primary", "request {i}; {}", health_flags(&envoy));
    }
    assert_eq!(completed(&primary), primary_before + 10);
    assert_eq!(completed(&backup), backup_before);

    // SIGKILL, as a crashed instance would go.
    drop(primary);
    let killed = Instant::now();

    // Before any health check has noticed, a request that cannot connect is
    // retried on the backup (retry_on: connect-failure, next priority).
    // Without that retry the first two would fail (until outlier detection
    // ejects the primary); a connection the kill reset while Envoy reused
    // it can still cost one.
    let first: Vec<(u16, Option<String>, String)> = (0..5)
        .map(|_| {
            let r = post(&envoy, "/predict", &[]);
            let name = r.header("x-backend-name").map(str::to_string);
            (r.status, name, r.text())
        })
        .collect();
    let failed = first.iter().filter(|(status, ..)| *status != 200).count();
    assert!(
        failed <= 1,
        "right after the kill: {first:?}; {}",
        health_flags(&envoy)
    );
    assert!(
        first
            .iter()
            .all(|(status, name, _)| *status != 200 || name.as_deref() == Some("backup")),
        "{first:?}"
    );

    // Then the health checks (or outlier detection) take the primary out.
    envoy.wait_stat(healthy, Duration::from_secs(15), |n| n == 1);
    eprintln!(
        "primary out of the cluster {:?} after the kill",
        killed.elapsed()
    );
    for _ in 0..20 {
        assert_eq!(instance(&post(&envoy, "/predict", &[])), "backup");
    }
    let served_by_backup = backup_before + (5 - failed) as u64 + 20;
    assert_eq!(completed(&backup), served_by_backup);

    // The primary comes back on its port: traffic returns to it once it
    // passes a health check (and its outlier ejection, if any, has ended).
    let listen = format!("127.0.0.1:{primary_port}");
    let primary = backend("primary", &["--listen", &listen]);
    envoy.wait_stat(healthy, Duration::from_secs(40), |n| n == 2);
    settle_on(&envoy, "primary");
    let backup_before = completed(&backup);
    for i in 0..10 {
        let answered = instance(&post(&envoy, "/predict", &[]));
        assert_eq!(answered, "primary", "request {i}; {}", health_flags(&envoy));
    }
    assert!(completed(&primary) >= 10);
    assert_eq!(completed(&backup), backup_before);
}

/// Waits until 5 requests in a row are answered by `name`: each worker
/// applies a health change a moment after the main thread counts it, and a
/// test request lands on either worker.
fn settle_on(envoy: &Envoy, name: &str) {
    let mut in_a_row = 0;
    wait_until(
        Duration::from_secs(15),
        &format!("5 answers in a row from {name}"),
        || {
            let response = post(envoy, "/predict", &[]);
            let answered = response.header("x-backend-name").unwrap_or_default();
            in_a_row = if answered == name { in_a_row + 1 } else { 0 };
            (in_a_row == 5).then_some(())
        },
    );
}

#[test]
fn no_spelling_of_a_path_escapes_its_capacity() {
    let a = backend("a", &[]);
    let b = backend("b", &[]);
    // Round robin, /predict limited to 8 for the whole service.
    let envoy = start("round-robin", &a, &b);

    // Eight slow requests, each spelling /predict differently, take all 8
    // slots: Envoy normalizes the path before Sluice and the router see it.
    let spellings = [
        "/predict",
        "//predict",
        "/./predict",
        "/x/../predict",
        "/%70redict",
        "/pre%64ict",
        "///predict?q=1",
        "/predict?x=%2F",
    ];
    let addr = envoy.listener_addr();
    let slow: Vec<_> = spellings
        .iter()
        .map(|path| {
            let request = sluice_harness::http::Request::new("POST", addr, path)
                .header("x-service-ms", "1500")
                .timeout(Duration::from_secs(10));
            std::thread::spawn(move || request.send())
        })
        .collect();
    let stats = |field: &str| sluice_stats(&envoy)["endpoints"]["/predict"][field].as_u64();
    wait_until(Duration::from_secs(5), "8 requests in flight", || {
        (stats("active_requests") == Some(8)).then_some(())
    });
    // The ninth, in yet another spelling, waits for a slot.
    let queued = sluice_harness::http::Request::new("POST", addr, "/./%70redict")
        .timeout(Duration::from_secs(10));
    let queued = std::thread::spawn(move || queued.send());
    wait_until(Duration::from_secs(5), "the ninth queued", || {
        (stats("queued") == Some(1)).then_some(())
    });

    // Encoded slashes are refused before Sluice or a backend see them.
    for path in ["/predict%2F", "/%2Fpredict", "/predict%5Cx"] {
        let response = envoy.request("POST", path).send().unwrap();
        assert_eq!(response.status, 400, "{path}: {response:?}");
    }

    for (path, handle) in spellings.iter().zip(slow) {
        let response = handle.join().unwrap().unwrap();
        assert_eq!(response.status, 200, "{path}: {response:?}");
    }
    let response = queued.join().unwrap().unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response.header("x-sluice-wait-ms").is_some(),
        "the ninth waited: {response:?}"
    );
    // The instances saw one path only, 9 requests, never more than 8 at once.
    for backend in [&a, &b] {
        let paths = backend.stats()["paths"].clone();
        let names: Vec<&String> = paths.as_object().unwrap().keys().collect();
        assert_eq!(names, ["/predict"], "{paths}");
    }
    assert_eq!(completed(&a) + completed(&b), 9);
}

/// The instances recipe with its three instances at `backends`: their
/// ports both in the cluster and in the filter's `instances.hosts` and
/// `instance_capacity` (`127.0.0.1:8081` ... in the plugin's JSON).
fn start_instances(backends: &[Backend; 3]) -> Envoy {
    let mut recipe = Recipe::load("instances");
    for (shipped, backend) in [8081, 8082, 8083].into_iter().zip(backends) {
        recipe = recipe.upstream(shipped, backend.port());
    }
    let mut opts = recipe.envoy_options(4);
    for (shipped, backend) in [8081, 8082, 8083].into_iter().zip(backends) {
        let from = format!("\"127.0.0.1:{shipped}\"");
        assert!(opts.bootstrap_yaml.contains(&from), "{from} in the recipe");
        opts.bootstrap_yaml = opts
            .bootstrap_yaml
            .replace(&from, &format!("\"127.0.0.1:{}\"", backend.port()));
    }
    Envoy::start_with(opts)
}

#[test]
fn instances_hold_each_instance_to_its_own_capacity() {
    // No capacity of their own: what they had in flight is what Envoy
    // sent. Service times vary (exponential around 60 ms), which is when a
    // balancer would overload one instance while another idles.
    let backends = ["a", "b", "c"].map(|name| {
        let seed = format!(
            "/predict:service_ms=60,service_dist=exponential,seed={}",
            name.as_bytes()[0]
        );
        Backend::start_with_args(&["--name", name, "--trace", "--route", &seed])
    });
    let capacities = [4, 4, 8];
    let envoy = start_instances(&backends);
    let hosts: Vec<String> = backends
        .iter()
        .map(|b| format!("127.0.0.1:{}", b.port()))
        .collect();

    // Each instance in the stats with its own capacity, nothing in flight.
    let instances = |stats: &serde_json::Value| -> Vec<(String, u64, u64)> {
        let list = stats["endpoints"]["/predict"]["instances"]
            .as_array()
            .unwrap_or_else(|| panic!("no instances in the stats: {stats}"));
        let mut rows: Vec<(String, u64, u64)> = list
            .iter()
            .map(|i| {
                let n = |k: &str| i[k].as_u64().unwrap_or_else(|| panic!("{k}: {i}"));
                (
                    i["address"].as_str().unwrap().to_string(),
                    n("capacity"),
                    n("in_flight"),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let mut expected: Vec<(String, u64, u64)> = hosts
        .iter()
        .zip(capacities)
        .map(|(h, k)| (h.clone(), k, 0))
        .collect();
    expected.sort();
    assert_eq!(instances(&sluice_stats(&envoy)), expected);
    for b in &backends {
        b.reset();
    }

    // A burst of 60, more than the 16 slots: every instance fills to its
    // own capacity and no further, by its own record.
    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 60);
    burst.method = "POST".into();
    burst.spacing = Duration::from_micros(200);
    let summary = summarize(&run_blocking(&burst));
    assert_eq!(summary.ok, 60, "{summary:?}");
    assert!(summary.queued_then_admitted > 0, "it queued: {summary:?}");
    let most: Vec<u64> = backends
        .iter()
        .map(|b| b.path_stats("/predict")["max_in_flight"].as_u64().unwrap())
        .collect();
    assert_eq!(most, capacities, "each instance's max in flight");
    let served: Vec<usize> = backends.iter().map(|b| b.trace("/predict").len()).collect();
    assert_eq!(served.iter().sum::<usize>(), 60, "{served:?}");
    assert!(
        envoy.workers_that_served() > 1,
        "the instances' slots hold across workers"
    );

    // Every slot released, on the instance that held it; no pick missed.
    let stats = sluice_stats(&envoy);
    assert_eq!(instances(&stats), expected, "{stats}");
    for i in stats["endpoints"]["/predict"]["instances"]
        .as_array()
        .unwrap()
    {
        assert_eq!(i["picks_missed"], 0, "{i}");
        assert_eq!(i["ejected"], false, "{i}");
    }
    eprintln!("burst of 60: {served:?} per instance, at most {most:?} at once");
}

/// The classes recipe: Envoy, not the client, decides a request's class.
/// A client's own `x-sluice-class` is removed; the virtual host of
/// `batch.local` makes a request batch (it waits behind interactive ones),
/// and that of `background.local` makes it sheddable.
#[test]
fn classes_come_from_envoy_and_the_client_header_is_removed() {
    let backend = Backend::start_with_args(&["--trace", "--route", "/predict:service_ms=1500"]);
    let recipe = Recipe::load("classes").upstream(8080, backend.port());
    let envoy = Envoy::start_with(recipe.envoy_options(2));
    let addr = envoy.listener_addr();
    let send = |id: &'static str, host: &'static str, class: Option<&'static str>| {
        std::thread::spawn(move || {
            let mut r = sluice_harness::http::Request::new("POST", addr, "/predict")
                .header("x-request-id", id)
                .timeout(Duration::from_secs(10));
            r = r.header("host", host);
            // The two holders end a second apart, so that one slot frees
            // at a time and the order of arrival at the backend is the
            // order the slots were handed out in.
            match id {
                "hold-1" => r = r.header("x-service-ms", "1000"),
                "hold-2" => r = r.header("x-service-ms", "2500"),
                _ => {}
            }
            if let Some(c) = class {
                r = r.header("x-sluice-class", c);
            }
            r.send().unwrap()
        })
    };
    let classes = || sluice_stats(&envoy)["endpoints"]["/predict"]["classes"].clone();
    let mut handles: Vec<_> = ["hold-1", "hold-2"]
        .into_iter()
        .map(|id| send(id, "localhost", None))
        .collect();
    wait_until(Duration::from_secs(5), "both slots taken", || {
        (sluice_stats(&envoy)["endpoints"]["/predict"]["active_requests"] == 2).then_some(())
    });
    // Batch by virtual host, even when claiming to be interactive.
    for id in ["batch-1", "batch-2"] {
        handles.push(send(id, "batch.local", Some("interactive")));
    }
    wait_until(Duration::from_secs(5), "two batch requests queued", || {
        (classes()["batch"]["queued"] == 2).then_some(())
    });
    // A client calling itself background on the default host is not shed:
    // its header was removed, so it is interactive and waits, first in line.
    handles.push(send("claims-background", "localhost", Some("background")));
    wait_until(Duration::from_secs(5), "the interactive one queued", || {
        (classes()["interactive"]["queued"] == 1).then_some(())
    });
    // Background by virtual host: shed at once.
    let shed = send("shed", "background.local", None).join().unwrap();
    assert_eq!(shed.status, 503, "{shed:?}");
    assert_eq!(shed.header("x-sluice-reason"), Some("shed"));
    for h in handles {
        assert_eq!(h.join().unwrap().status, 200);
    }
    let mut trace = backend.trace("/predict");
    trace.sort_by_key(|r| r.arrived_us);
    let order: Vec<&str> = trace.iter().map(|r| r.id.as_str()).collect();
    // After the two that held the slots: the interactive one, then the
    // batch ones (in whichever order they queued).
    assert_eq!(order.len(), 5, "{order:?}");
    assert_eq!(order[2], "claims-background", "{order:?}");
    let mut batch = order[3..].to_vec();
    batch.sort_unstable();
    assert_eq!(batch, ["batch-1", "batch-2"], "{order:?}");
}
