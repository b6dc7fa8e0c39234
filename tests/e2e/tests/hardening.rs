//! Ways clients could push the backend past its capacity, each against a
//! backend that records how many requests it really worked on at once.
//! Every assertion that matters is made from the backend's side.

use serde_json::{json, Value};
use sluice_harness::{http, Backend, Envoy, FrontProxy};
use sluice_loadgen::{run_blocking, summarize, Burst, Outcome};
use std::time::{Duration, Instant};

fn start(backend: &Backend, config: &Value, concurrency: u32) -> Envoy {
    let proxy = FrontProxy::new(backend.port(), config.to_string());
    Envoy::start(&proxy, concurrency)
}

/// The filter's own numbers for one endpoint.
fn filter_endpoint(envoy: &Envoy, path: &str) -> Value {
    let res = envoy
        .request("GET", "/balancer/stats")
        .send()
        .expect("stats request");
    assert_eq!(res.status, 200, "{}", res.text());
    res.json()["endpoints"][path].clone()
}

/// Polls until the filter holds nothing for `path`: no slot, no waiter.
fn wait_filter_idle(envoy: &Envoy, path: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ep = filter_endpoint(envoy, path);
        if ep["active_requests"] == 0 && ep["queued"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never came back to zero: {ep}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until the backend works on nothing for `path` (work abandoned by
/// its clients included).
fn wait_backend_idle(backend: &Backend, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend.path_stats(path)["in_flight"] != 0 {
        assert!(Instant::now() < deadline, "the backend never went idle");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the bursts side by side, each on its own thread.
fn run_together(bursts: Vec<Burst>) -> Vec<Outcome> {
    let running: Vec<_> = bursts
        .into_iter()
        .map(|b| std::thread::spawn(move || run_blocking(&b)))
        .collect();
    running
        .into_iter()
        .flat_map(|t| t.join().expect("burst thread"))
        .collect()
}

/// Clients that give up on requests the backend is already computing (the
/// backend cannot notice, like uvicorn running a `def` endpoint): the filter
/// keeps each abandoned slot until the backend has most likely finished, so
/// the backend never works on more than `capacity` at once.
#[test]
fn abandoned_requests_keep_their_slot_until_the_backend_is_done() {
    let backend = Backend::start(&["/predict:service_ms=300,on_disconnect=finish"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/predict": {"capacity": 3, "queue_timeout": 30, "abandon_hold": 2},
    }});
    let envoy = start(&backend, &config, 2);
    // Clients that wait, and clients that give up after various times, all
    // at once: some give up while queued, most while in flight.
    let aborts = [None, Some(80), Some(170), Some(260), Some(350), Some(520)];
    let bursts = aborts
        .iter()
        .enumerate()
        .map(|(i, abort_ms)| {
            let mut b = Burst::new(envoy.listener_addr(), "/predict", 10);
            b.spacing = Duration::from_millis(37 + 11 * i as u64);
            b.abort_after = abort_ms.map(Duration::from_millis);
            b.first_seq = 100 * i;
            b
        })
        .collect();
    let outcomes = run_together(bursts);
    let s = summarize(&outcomes);
    assert!(s.aborted >= 20, "too few clients gave up to test: {s:?}");
    assert_eq!(s.ok + s.aborted, 60, "{s:?}");
    wait_backend_idle(&backend, "/predict");
    let seen = backend.path_stats("/predict");
    assert_eq!(
        seen["max_in_flight"], 3,
        "the backend worked on more (or fewer) than capacity at once: {seen}"
    );
    // Every held slot comes back, once.
    wait_filter_idle(&envoy, "/predict", Duration::from_secs(10));
    backend.reset();
    let again = run_blocking(&Burst::new(envoy.listener_addr(), "/predict", 6));
    assert!(again.iter().all(|o| o.status == 200), "{again:?}");
    assert_eq!(backend.path_stats("/predict")["max_in_flight"], 3);
    wait_filter_idle(&envoy, "/predict", Duration::from_secs(5));
}

/// Envoy's own route timeout abandons the request too: it answers 504 while
/// the backend keeps computing. The slot stays held until the backend is
/// most likely done.
#[test]
fn route_timeout_keeps_the_slot_until_the_backend_is_done() {
    let backend = Backend::start(&["/predict:service_ms=1600,on_disconnect=finish"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/predict": {"capacity": 1, "queue_timeout": 30, "abandon_hold": 3},
    }});
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    proxy.route_timeout_secs = 1;
    let envoy = Envoy::start(&proxy, 1);
    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 3);
    burst.spacing = Duration::from_millis(5);
    let outcomes = run_blocking(&burst);
    assert!(
        outcomes.iter().all(|o| o.status == 504),
        "expected Envoy's upstream timeouts: {outcomes:?}"
    );
    wait_backend_idle(&backend, "/predict");
    let seen = backend.path_stats("/predict");
    assert_eq!(seen["max_in_flight"], 1, "{seen}");
    wait_filter_idle(&envoy, "/predict", Duration::from_secs(10));
}

/// Spellings of `/predict` (and of the non-ASCII `/prédict`, which clients
/// send percent-encoded) that the application routes to that endpoint count
/// against its capacity. The filter normalises on its own: Envoy's
/// `normalize_path` leaves escaped UTF-8 alone.
#[test]
fn encoded_and_dotted_paths_count_against_the_endpoint() {
    let backend = Backend::start(&["/predict:service_ms=300", "/prédict:service_ms=300"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/predict": {"capacity": 1, "queue_timeout": 30},
        "/prédict": {"capacity": 1, "queue_timeout": 30},
    }});
    let envoy = start(&backend, &config, 2);
    let spellings = [
        ("/predict", "/predict"),
        ("/pre%64ict", "/predict"),
        ("/%70redict", "/predict"),
        ("//predict", "/predict"),
        ("/./predict", "/predict"),
        ("/x/../predict", "/predict"),
        ("/pr%C3%A9dict", "/prédict"),
        ("/pr%c3%a9dict", "/prédict"),
        ("/pr%C3%A9di%63t", "/prédict"),
        ("/x/../pr%C3%A9dict", "/prédict"),
    ];
    let bursts = spellings
        .iter()
        .map(|(path, _)| Burst::new(envoy.listener_addr(), path, 2))
        .collect();
    let outcomes = run_together(bursts);
    assert!(
        outcomes.iter().all(|o| o.status == 200),
        "{:?}",
        summarize(&outcomes)
    );
    for endpoint in ["/predict", "/prédict"] {
        let seen = backend.path_stats(endpoint);
        let sent = 2 * spellings.iter().filter(|(_, e)| *e == endpoint).count();
        assert_eq!(seen["completed"], sent, "{endpoint}: {seen}");
        assert_eq!(
            seen["max_in_flight"], 1,
            "a spelling of {endpoint} went around its capacity: {seen}"
        );
        wait_filter_idle(&envoy, endpoint, Duration::from_secs(5));
    }
}

/// A prefix endpoint limits its own segment only: `/embed` and `/embed/x`,
/// not `/embedding`.
#[test]
fn prefix_matches_whole_path_segments() {
    let backend = Backend::start(&["/embed/a:service_ms=300", "/embedding:service_ms=300"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/embed": {"capacity": 1, "match": "prefix"},
    }});
    let envoy = start(&backend, &config, 1);
    let outcomes = run_together(vec![
        Burst::new(envoy.listener_addr(), "/embed/a", 2),
        Burst::new(envoy.listener_addr(), "/embedding", 3),
    ]);
    assert!(outcomes.iter().all(|o| o.status == 200));
    assert_eq!(backend.path_stats("/embed/a")["max_in_flight"], 1);
    assert_eq!(
        backend.path_stats("/embedding")["max_in_flight"],
        3,
        "/embedding was limited by the /embed prefix"
    );
}

/// The stats path wins over a catch-all prefix endpoint, and only GET/HEAD
/// are answered by the filter: other methods reach the backend (HEAD is
/// covered by the filter's native tests).
#[test]
fn stats_path_wins_and_answers_only_get_and_head() {
    let backend = Backend::start(&["/balancer/stats"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/": {"capacity": 1, "match": "prefix"},
    }});
    let envoy = start(&backend, &config, 1);
    let stats = envoy.request("GET", "/balancer/stats").send().unwrap();
    assert_eq!(stats.header("x-sluice-reason"), Some("stats"));
    assert!(
        stats.json()["endpoints"]["/"].is_object(),
        "{}",
        stats.text()
    );
    let post = http::post(envoy.listener_addr(), "/balancer/stats", "{}").unwrap();
    assert_eq!(post.header("x-sluice-reason"), None, "{}", post.text());
    assert_eq!(backend.path_stats("/balancer/stats")["completed"], 1);
}

/// The worker index of each root context, from the filter's debug lines.
fn worker_indices(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.split("is woken through sluice:wake:").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Listener updates start new VMs (root contexts); once the old ones have
/// drained, their worker indices are reused instead of growing for ever
/// (before: 4 more per update, the main thread's and the canary's included).
#[test]
fn listener_updates_reuse_worker_indices() {
    let backend = Backend::start(&["/predict"]);
    let config = |timeout: u32| {
        json!({"service": "e2e", "endpoints": {
            "/predict": {"capacity": 2, "queue_timeout": timeout},
        }})
    };
    let mut proxy = FrontProxy::new(backend.port(), config(30).to_string());
    proxy.use_lds = true;
    let mut opts = proxy.envoy_options(2);
    opts.component_log_level = Some("wasm:debug".to_string());
    // Old listeners drain in a second, then their VMs' on_done runs.
    opts.extra_args = vec!["--drain-time-s".into(), "1".into()];
    let envoy = Envoy::start_with(opts);
    let updates = 8;
    for i in 0..updates {
        proxy.plugin_config_json = config(31 + i).to_string();
        envoy.update_lds(&proxy);
        // Watched requests make the new workers take their indices.
        for _ in 0..4 {
            let res = envoy.request("GET", "/predict").send().unwrap();
            assert_eq!(res.status, 200);
        }
        std::thread::sleep(Duration::from_millis(2500));
    }
    let indices = worker_indices(&envoy.log());
    assert!(
        indices.len() >= updates as usize,
        "each update's workers take indices: {indices:?}"
    );
    let highest = indices.iter().max().copied().unwrap_or(0);
    assert!(
        highest < 8,
        "indices keep growing across {updates} updates: {indices:?}"
    );
}

/// What docs/filter.md says of `stream_idle_timeout`: firing on a queued
/// request, it answers Envoy's own 504 `stream timeout` (text, no
/// `x-sluice-reason`) before the filter's queue timeout, and the request
/// leaves the queue holding nothing.
#[test]
fn stream_idle_timeout_cuts_a_queued_request_with_envoys_own_504() {
    let backend = Backend::start(&["/predict:service_ms=2500"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/predict": {"capacity": 1, "queue_timeout": 10},
    }});
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    proxy.stream_idle_timeout_secs = 1;
    let envoy = Envoy::start(&proxy, 1);
    let mut burst = Burst::new(envoy.listener_addr(), "/predict", 2);
    burst.spacing = Duration::from_millis(20);
    let outcomes = run_blocking(&burst);
    let queued = &outcomes[1];
    assert_eq!(queued.status, 504, "{queued:?}");
    assert_eq!(queued.reason, None, "not the filter's reply: {queued:?}");
    assert_eq!(queued.body, "stream timeout", "{queued:?}");
    assert!(queued.latency_ms < 2000.0, "{queued:?}");
    assert_eq!(backend.arrivals("/predict").len(), 1);
}

/// Sends one raw HTTP/1.1 request on its own connection and returns the
/// head of the response (status line and headers, lower-cased), read up to
/// its blank line: not to the connection's close, which Envoy delays by a
/// second after a local reply.
fn raw_head(addr: std::net::SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to Envoy");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(request.as_bytes()).expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// The status code of a response head (0 if none came).
fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// A header's value in a response head.
fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, v)| v.trim())
}

/// `count_upgrades: false` lets websockets through without a slot, but only
/// a GET is upgraded: a POST carrying `Upgrade: websocket` is served by the
/// backend as a plain request, and counts like one (before: 4 at once at
/// the backend for capacity 1).
#[test]
fn only_a_get_upgrade_skips_the_slot() {
    let backend = Backend::start(&["/predict:service_ms=300"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/predict": {"capacity": 1, "queue_timeout": 30, "count_upgrades": false},
    }});
    let mut proxy = FrontProxy::new(backend.port(), config.to_string());
    proxy.websocket = true;
    let envoy = Envoy::start(&proxy, 2);
    let addr = envoy.listener_addr();
    // No body: Envoy holds the body of an upgrade request until the
    // upstream switches protocols, which this backend never does.
    let request = format!(
        "POST /predict HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\n\
         upgrade: websocket\r\ncontent-length: 0\r\n\r\n"
    );
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let request = request.clone();
            std::thread::spawn(move || status_of(&raw_head(addr, &request)))
        })
        .collect();
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(statuses, vec![200; 4], "{}", envoy.log());
    let seen = backend.path_stats("/predict");
    assert_eq!(seen["completed"], 4, "{seen}");
    assert_eq!(
        seen["max_in_flight"], 1,
        "a POST asking for an upgrade went around the capacity: {seen}"
    );
    wait_filter_idle(&envoy, "/predict", Duration::from_secs(5));
}

/// A backend streaming tokens (an LLM) goes on generating after its client
/// leaves, and its headers say nothing about its work being done: a slot
/// whose client left during the response is held like any abandoned one,
/// until the backend's expected end (before: released at once, and the
/// backend ran up to 10 generations at once for capacity 2).
#[test]
fn streamed_responses_keep_their_slot_when_the_client_leaves() {
    let backend = Backend::start(&["/generate:service_ms=1000,tokens=10,on_disconnect=finish"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/generate": {"capacity": 2, "queue_timeout": 30, "abandon_hold": 3},
    }});
    let envoy = start(&backend, &config, 2);
    // Two whole generations: the filter learns how long one takes.
    let whole = run_blocking(&Burst::new(envoy.listener_addr(), "/generate", 2));
    assert!(whole.iter().all(|o| o.status == 200), "{whole:?}");
    assert_eq!(whole[0].body.lines().count(), 10, "{whole:?}");
    // Clients that read two or three tokens and leave, one every 100 ms.
    let mut leaving = Burst::new(envoy.listener_addr(), "/generate", 12);
    leaving.spacing = Duration::from_millis(100);
    leaving.abort_after = Some(Duration::from_millis(250));
    let outcomes = run_blocking(&leaving);
    assert!(outcomes.iter().all(|o| o.aborted), "{outcomes:?}");
    wait_backend_idle(&backend, "/generate");
    let seen = backend.path_stats("/generate");
    assert!(
        seen["completed"].as_u64() >= Some(4),
        "the abandoned generations went on: {seen}"
    );
    assert_eq!(
        seen["max_in_flight"], 2,
        "the backend generated more (or fewer) than capacity at once: {seen}"
    );
    wait_filter_idle(&envoy, "/generate", Duration::from_secs(5));
}

/// 90 % of requests take 50 ms, every tenth 3 s, and clients give up after
/// 200 ms: the abandoned requests are exactly the slow ones, which never
/// complete and so never reach the estimate. A request abandoned after every
/// recent duration is held to `abandon_hold` (before: released at once, 13–14
/// at the backend for capacity 3).
#[test]
fn slow_requests_abandoned_among_fast_ones_keep_their_slot() {
    let backend =
        Backend::start(&["/predict:service_ms=50,slow_every=10,slow_ms=3000,on_disconnect=finish"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/predict": {"capacity": 3, "queue_timeout": 30, "abandon_hold": 4},
    }});
    let envoy = start(&backend, &config, 2);
    // A few fast requests first, so that both workers have an estimate.
    let mut warm = Burst::new(envoy.listener_addr(), "/predict", 6);
    warm.spacing = Duration::from_millis(60);
    assert!(run_blocking(&warm).iter().all(|o| o.status == 200));
    let bursts = (0..3)
        .map(|i| {
            let mut b = Burst::new(envoy.listener_addr(), "/predict", 20);
            b.spacing = Duration::from_millis(40 + 7 * i as u64);
            b.abort_after = Some(Duration::from_millis(200));
            b.first_seq = 100 * i;
            b
        })
        .collect();
    let outcomes = run_together(bursts);
    let s = summarize(&outcomes);
    assert!(s.aborted >= 3, "no slow request was given up on: {s:?}");
    wait_backend_idle(&backend, "/predict");
    let seen = backend.path_stats("/predict");
    assert!(seen["completed"].as_u64() >= Some(15), "{seen}");
    assert!(
        seen["max_in_flight"].as_u64().unwrap_or(u64::MAX) <= 3,
        "the backend worked on more than capacity at once: {seen}"
    );
    wait_filter_idle(&envoy, "/predict", Duration::from_secs(8));
}

/// Before any request of an endpoint has completed, clients that give up
/// hold their slots for a short cold hold (1 s, or as long again as they
/// ran), not for `abandon_hold` (default 30 s): before, 3 impatient clients
/// closed a cold endpoint for 30 s and the honest ones after them got 504.
#[test]
fn a_cold_endpoints_abandons_hold_it_briefly() {
    let backend = Backend::start(&["/predict:service_ms=300,on_disconnect=finish"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/predict": {"capacity": 3, "queue_timeout": 3},
    }});
    let envoy = start(&backend, &config, 2);
    let mut impatient = Burst::new(envoy.listener_addr(), "/predict", 3);
    impatient.abort_after = Some(Duration::from_millis(100));
    let gave_up = run_blocking(&impatient);
    assert!(gave_up.iter().all(|o| o.aborted), "{gave_up:?}");
    let mut honest = Burst::new(envoy.listener_addr(), "/predict", 5);
    honest.first_seq = 100;
    let outcomes = run_blocking(&honest);
    assert!(
        outcomes.iter().all(|o| o.status == 200),
        "honest requests after a cold endpoint's abandons: {outcomes:?}"
    );
    let waited = outcomes.iter().filter_map(|o| o.wait_ms).max().unwrap_or(0);
    assert!(
        (500..2500).contains(&waited),
        "the abandoned slots were held {waited} ms, not about 1 s: {outcomes:?}"
    );
    wait_backend_idle(&backend, "/predict");
    let seen = backend.path_stats("/predict");
    assert_eq!(seen["max_in_flight"], 3, "{seen}");
    wait_filter_idle(&envoy, "/predict", Duration::from_secs(5));
}

/// A gRPC call whose client does not cancel at its deadline (here HTTP/1.1
/// with `grpc-timeout: 300m`, as a raw client or a proxy in front may):
/// past its deadline it is answered by the filter and never sent upstream,
/// even when a slot frees for it (before: it waited 1 s for the slot and
/// was then run by the backend for nobody).
#[test]
fn an_expired_grpc_request_is_never_sent_upstream() {
    let backend = Backend::start(&["/svc.Model/Predict:service_ms=1000"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/svc.Model/Predict": {"capacity": 1, "queue_timeout": 30},
    }});
    let envoy = start(&backend, &config, 2);
    let addr = envoy.listener_addr();
    let call = move |seq: &str, timeout: &str| {
        let request = format!(
            "POST /svc.Model/Predict HTTP/1.1\r\nhost: {addr}\r\n\
             content-type: application/grpc\r\nte: trailers\r\nx-seq: {seq}\r\n\
             {timeout}content-length: 5\r\n\r\n\0\0\0\0\0"
        );
        raw_head(addr, &request)
    };
    let holder = std::thread::spawn(move || call("first", ""));
    std::thread::sleep(Duration::from_millis(150));
    let started = Instant::now();
    let late = call("late", "grpc-timeout: 300m\r\n");
    let took = started.elapsed();
    let first = holder.join().unwrap();
    assert_eq!(status_of(&first), 200, "{first}");
    // Envoy turns the filter's 504 into a gRPC status for a gRPC request.
    let failed = match header_of(&late, "grpc-status") {
        Some(status) => status != "0",
        None => status_of(&late) == 504,
    };
    assert!(failed, "expected an error for the expired call: {late}");
    assert!(
        took < Duration::from_millis(800),
        "answered {took:?} after it was sent, not at its 300 ms deadline"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        backend.arrivals("/svc.Model/Predict"),
        vec!["first".to_string()],
        "the expired call reached the backend"
    );
    wait_filter_idle(&envoy, "/svc.Model/Predict", Duration::from_secs(5));
}

/// docs/filter.md, "Renaming `service` or changing `vm_id`": a listener
/// update that renames `service` while requests are in flight starts the new
/// VMs on empty records while the old ones drain, so the backend may see
/// both capacities at once for the drain; the filter says so in Envoy's log.
#[test]
fn renaming_the_service_under_load_is_warned_about() {
    let backend = Backend::start(&["/predict:service_ms=1500"]);
    let config = |service: &str| {
        json!({"service": service, "endpoints": {
            "/predict": {"capacity": 3, "queue_timeout": 30},
        }})
    };
    let mut proxy = FrontProxy::new(backend.port(), config("before").to_string());
    proxy.use_lds = true;
    let mut opts = proxy.envoy_options(2);
    opts.extra_args = vec!["--drain-time-s".into(), "2".into()];
    let envoy = Envoy::start_with(opts);
    let addr = envoy.listener_addr();
    let old = std::thread::spawn(move || run_blocking(&Burst::new(addr, "/predict", 3)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.path_stats("/predict")["in_flight"] != 3 {
        assert!(
            Instant::now() < deadline,
            "the first requests never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.plugin_config_json = config("after").to_string();
    envoy.update_lds(&proxy);
    let warned = "service \"before\" has 3 requests in flight on /predict in this vm_id, \
                  now configured as service \"after\"";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !envoy.log().contains(warned) {
        assert!(
            Instant::now() < deadline,
            "no warning about the rename: {}",
            envoy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(old.join().unwrap().iter().all(|o| o.status == 200));
    // The same configuration again says nothing more.
    assert_eq!(envoy.log().matches(warned).count(), 1, "{}", envoy.log());
}

/// A slowloris upload (a body sent a byte every 200 ms, each byte resetting
/// Envoy's idle timer) held the only slot for as long as it liked, and every
/// honest upload behind it got 504. With `max_upload_time` the filter
/// answers it 408 once its body is that late after admission, and the slot
/// goes on at once (the backend was only reading it).
#[test]
fn a_slowloris_upload_gets_408_and_frees_its_slot() {
    use std::io::Write;
    let backend = Backend::start(&["/upload:service_ms=100"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/upload": {"capacity": 1, "queue_timeout": 3, "max_upload_time": 1},
    }});
    let envoy = start(&backend, &config, 2);
    let addr = envoy.listener_addr();
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 40\r\n\r\n");
    slow.write_all(head.as_bytes()).unwrap();
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for _ in 0..40 {
            if writer.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::sleep(Duration::from_millis(150));
    let mut honest = Burst::new(addr, "/upload", 4);
    honest.method = "POST".into();
    honest.body = r#"{"input": "sample"}"#.into();
    let started = Instant::now();
    let outcomes = run_blocking(&honest);
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let answer = {
        use std::io::Read;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && slow.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    };
    drop(slow);
    trickle.join().unwrap();
    assert!(
        outcomes.iter().all(|o| o.status == 200),
        "honest uploads behind a slowloris: {outcomes:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{outcomes:?}"
    );
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert_eq!(
        header_of(&answer, "x-sluice-reason"),
        Some("upload-timeout"),
        "{answer}"
    );
    let seen = backend.path_stats("/upload");
    assert_eq!(seen["completed"], 4, "{seen}");
    assert_eq!(seen["max_serving"], 1, "{seen}");
    wait_filter_idle(&envoy, "/upload", Duration::from_secs(5));
}

/// `max_queued_bytes` counts a waiting body of unknown length (chunked, no
/// `content-length`) as the most Envoy buffers for it (1 MiB; Envoy tells
/// the filter nothing of a paused request's body while it arrives): before,
/// such bodies were not counted at all, and 150 queued 1 MiB chunked
/// uploads took Envoy from 99 to 259 MB.
#[test]
fn chunked_uploads_count_in_max_queued_bytes() {
    use std::io::{Read, Write};
    let backend = Backend::start(&["/upload:service_ms=1500"]);
    let config = json!({"service": "e2e", "endpoints": {
        "/upload": {"capacity": 1, "queue_timeout": 30, "max_queued_bytes": 2_500_000},
    }});
    let envoy = start(&backend, &config, 1);
    let addr = envoy.listener_addr();
    let holder = std::thread::spawn(move || {
        status_of(&raw_head(
            addr,
            &format!("POST /upload HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\n\r\n"),
        ))
    });
    std::thread::sleep(Duration::from_millis(200));
    let chunked =
        format!("POST /upload HTTP/1.1\r\nhost: {addr}\r\ntransfer-encoding: chunked\r\n\r\n");
    // Bodies still arriving while they wait: 1 MiB each.
    let open_upload = || {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(chunked.as_bytes()).unwrap();
        let chunk = vec![b'x'; 100_000];
        for _ in 0..3 {
            conn.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .unwrap();
            conn.write_all(&chunk).unwrap();
            conn.write_all(b"\r\n").unwrap();
        }
        conn
    };
    let head_of = |conn: &mut std::net::TcpStream, within: Duration| {
        conn.set_read_timeout(Some(within)).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).to_ascii_lowercase()
    };
    let mut first = open_upload();
    let mut second = open_upload();
    let waiting = Duration::from_millis(300);
    assert_eq!(
        head_of(&mut first, waiting),
        "",
        "a waiting upload was answered"
    );
    assert_eq!(
        head_of(&mut second, waiting),
        "",
        "a waiting upload was answered"
    );
    let mut third = open_upload();
    let head = head_of(&mut third, Duration::from_secs(5));
    assert_eq!(status_of(&head), 503, "{head}");
    assert_eq!(
        header_of(&head, "x-sluice-reason"),
        Some("queue-full"),
        "{head}"
    );
    drop((first, second, third));
    assert_eq!(holder.join().unwrap(), 200);
    wait_filter_idle(&envoy, "/upload", Duration::from_secs(5));
}
