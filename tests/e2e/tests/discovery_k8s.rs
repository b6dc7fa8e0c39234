//! Kubernetes discovery: the real `sluice-sync` (`--discover-k8s`) against a
//! fake API server on a loopback port, which answers the EndpointSlice LIST
//! and WATCH requests with recorded responses (`tests/e2e/fixtures/kubernetes`:
//! a list, then watch events as JSON lines in a chunked body, exactly as an
//! API server sends them), with credentials from a `KUBECONFIG` the test
//! writes, and a real `redis-server`. The Watch stream a filter sees must
//! follow the events: ready endpoints only, a terminating one dropped
//! within a second, a re-watch from the bookmark's version when a watch
//! ends, a re-list on 410 Gone, the last set kept (stale) while the API
//! server fails, and an empty set (scaled to zero) served as the truth. The
//! requests sync made are exactly what `deploy/kubernetes-discovery`'s Role
//! grants.

use sluice_core::sync_api::{Snapshot, WatchRequest};
use sluice_harness::{http, wait_until, workspace_root, Redis, ScratchDir, SyncService};
use sluice_sync::api::capacity_sync_client::CapacitySyncClient;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tonic::Streaming;

const SERVICE: &str = "fleet";
const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices";
const SELECTOR: &str = "kubernetes.io/service-name=backend";
const TOKEN: &str = "fake-service-account-token";
const WAIT: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        workspace_root()
            .join("tests/e2e/fixtures/kubernetes")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn lines(name: &str) -> Vec<String> {
    fixture(name).lines().map(str::to_string).collect()
}

/// One request the fake API server answered.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    query: BTreeMap<String, String>,
    authorization: Option<String>,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query
            .get("watch")
            .is_some_and(|w| w == "true" || w == "1")
    }
}

enum Push {
    /// One watch event (a JSON line) to the open watch.
    Line(String),
    /// Ends the open watch, as the server does at its timeout.
    End,
}

struct FakeApi {
    addr: SocketAddr,
    /// The body of every LIST from now on.
    list: Arc<Mutex<String>>,
    /// Every request is answered 503 (a Status) while set.
    failing: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    push: mpsc::UnboundedSender<Push>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeApi {
    async fn start(list: String) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (push, events) = mpsc::unbounded_channel();
        let list = Arc::new(Mutex::new(list));
        let failing = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(tokio::sync::Mutex::new(events));
        let (l, f, s) = (list.clone(), failing.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(answer(
                    conn,
                    l.clone(),
                    f.clone(),
                    s.clone(),
                    events.clone(),
                ));
            }
        });
        FakeApi {
            addr,
            list,
            failing,
            seen,
            push,
            task,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn lists(&self) -> usize {
        self.seen().iter().filter(|s| !s.is_watch()).count()
    }

    fn send(&self, line: &str) {
        self.push.send(Push::Line(line.to_string())).unwrap();
    }

    /// Waits for a watch request from `version`.
    async fn watched_from(&self, version: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.seen().iter().any(|s| {
                s.is_watch() && s.query.get("resourceVersion").map(String::as_str) == Some(version)
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no watch from {version}: {:#?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

/// One HTTP/1.1 request on `conn`, answered, then the connection closed.
async fn answer(
    mut conn: TcpStream,
    list: Arc<Mutex<String>>,
    failing: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    events: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Push>>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        assert!(head.len() < 64 * 1024, "a request head over 64 KiB");
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut head_lines = head.lines();
    let request_line = head_lines.next().unwrap_or_default();
    let target = request_line.split(' ').nth(1).unwrap_or_default();
    assert!(request_line.starts_with("GET "), "{request_line}");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query: BTreeMap<String, String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decoded(k), percent_decoded(v))
        })
        .collect();
    let authorization = head_lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_string())
    });
    let request = Seen {
        path: path.to_string(),
        query,
        authorization,
    };
    seen.lock().unwrap().push(request.clone());
    let reply = |code: u16, text: &str, body: &str| {
        format!(
            "HTTP/1.1 {code} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    if failing.load(Ordering::SeqCst) {
        let body = status(503, "ServiceUnavailable", "the fake API server is down");
        let _ = conn
            .write_all(reply(503, "Service Unavailable", &body).as_bytes())
            .await;
        return;
    }
    if request.path != PATH {
        let body = status(404, "NotFound", "no such path in the fake API server");
        let _ = conn
            .write_all(reply(404, "Not Found", &body).as_bytes())
            .await;
        return;
    }
    if !request.is_watch() {
        let body = list.lock().unwrap().clone();
        let _ = conn.write_all(reply(200, "OK", &body).as_bytes()).await;
        return;
    }
    // A watch: one JSON line per chunk, as the API server streams them.
    let mut events = events.lock().await;
    if conn
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await
        .is_err()
    {
        return;
    }
    loop {
        // A client that went away (sync ended this watch itself, after an
        // ERROR event) gives the events up to its next watch.
        let push = tokio::select! {
            push = events.recv() => push,
            _ = conn.read(&mut buf) => return,
        };
        let Some(push) = push else { break };
        match push {
            Push::Line(line) => {
                let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
                if conn.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
            }
            Push::End => break,
        }
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let _ = conn.shutdown().await;
}

fn addresses(s: &Snapshot) -> Vec<&str> {
    s.instances.iter().map(|i| i.address.as_str()).collect()
}

/// Skips messages until a state (not a heartbeat) satisfies `want`.
async fn wait_for(
    stream: &mut Streaming<Snapshot>,
    within: Duration,
    what: &str,
    mut want: impl FnMut(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.message()).await {
            Ok(Ok(Some(s))) if !s.heartbeat => {
                if want(&s) {
                    return s;
                }
                last = Some(s);
            }
            Ok(Ok(Some(_))) => {}
            Ok(other) => panic!("the stream ended: {other:?}"),
            Err(_) => panic!("no snapshot that {what} within {within:?}; the last: {last:?}"),
        }
    }
}

fn sample(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = http::get(addr, "/metrics").ok()?.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn metric_is(addr: SocketAddr, series: String, want: f64) {
    tokio::task::spawn_blocking(move || {
        wait_until(WAIT, &format!("{series} {want}"), || {
            (sample(addr, &series) == Some(want)).then_some(())
        })
    })
    .await
    .unwrap();
}

fn series(name: &str) -> String {
    format!("sluice_sync_{name}{{sluice_service=\"{SERVICE}\"}}")
}

/// The verbs the Role in deploy/kubernetes-discovery grants on
/// discovery.k8s.io endpointslices, and that it grants nothing else.
fn role_verbs() -> Vec<String> {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/kubernetes-discovery/rbac.yaml"))
            .unwrap();
    let role: serde_json::Value = text
        .split("\n---\n")
        .map(|d| yaml_serde::from_str::<serde_json::Value>(d).unwrap())
        .find(|d| d["kind"] == "Role")
        .expect("a Role in rbac.yaml");
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        rules[0]["apiGroups"],
        serde_json::json!(["discovery.k8s.io"])
    );
    assert_eq!(rules[0]["resources"], serde_json::json!(["endpointslices"]));
    let mut verbs: Vec<String> = rules[0]["verbs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    verbs.sort();
    verbs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_follows_the_ready_endpoints_of_a_services_endpointslices() {
    let redis = Redis::start();
    let api = FakeApi::start(fixture("list.json")).await;
    let scratch = ScratchDir::new("kubeconfig");
    let kubeconfig = scratch.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: sync\n  user: {{token: {TOKEN}}}\ncontexts:\n- name: fake\n  \
             context: {{cluster: fake, user: sync, namespace: default}}\ncurrent-context: fake\n",
            api.addr
        ),
    )
    .unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], sluice_harness::free_port()));
    let metrics_arg = metrics.to_string();
    let redis_url = redis.url();
    let discover = format!("{SERVICE}=shop/backend:http");
    let sync = SyncService::start_with(
        &[
            "--redis",
            &redis_url,
            "--discover-k8s",
            &discover,
            "--metrics-addr",
            &metrics_arg,
        ],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let mut stream = CapacitySyncClient::connect(sync.url())
        .await
        .expect("connect to sluice-sync")
        .watch(WatchRequest {
            service: SERVICE.into(),
            node: "e2e".into(),
            last_version: 0,
        })
        .await
        .expect("Watch")
        .into_inner();

    // The list: the ready endpoints of both slices (IPv4 and IPv6), at the
    // port named http; 127.0.0.3 is not ready yet.
    let first = wait_for(&mut stream, WAIT, "holds the listed set", |s| {
        s.discovered && !s.instances.is_empty()
    })
    .await;
    assert_eq!(
        addresses(&first),
        ["127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080"]
    );
    assert!(!first.stale);
    api.watched_from("1000").await;

    let watch = lines("watch-1.jsonl");
    // 127.0.0.3 becomes ready.
    api.send(&watch[0]);
    let grown = wait_for(&mut stream, WAIT, "has 127.0.0.3", |s| {
        addresses(s).contains(&"127.0.0.3:8080")
    })
    .await;
    assert_eq!(
        addresses(&grown),
        [
            "127.0.0.1:8080",
            "127.0.0.2:8080",
            "127.0.0.3:8080",
            "[::1]:8080"
        ]
    );
    assert!(grown.version > first.version);
    // 127.0.0.1's pod is deleted: terminating, still serving: dropped,
    // within a second.
    let sent = Instant::now();
    api.send(&watch[1]);
    let dropped = wait_for(&mut stream, WAIT, "lost 127.0.0.1", |s| {
        !addresses(s).contains(&"127.0.0.1:8080")
    })
    .await;
    let took = sent.elapsed();
    eprintln!("a terminating endpoint left the streamed set after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(
        addresses(&dropped),
        ["127.0.0.2:8080", "127.0.0.3:8080", "[::1]:8080"]
    );
    // A new slice (a scale-up); 127.0.0.2, in both slices, counts once.
    api.send(&watch[2]);
    let added = wait_for(&mut stream, WAIT, "has 127.0.0.4", |s| {
        addresses(s).contains(&"127.0.0.4:8080")
    })
    .await;
    assert_eq!(
        addresses(&added),
        [
            "127.0.0.2:8080",
            "127.0.0.3:8080",
            "127.0.0.4:8080",
            "[::1]:8080"
        ]
    );
    // A bookmark, then the server ends the watch: sync watches again from
    // the bookmark's version, without listing again.
    api.send(&watch[3]);
    api.push.send(Push::End).unwrap();
    api.watched_from("1010").await;
    assert_eq!(api.lists(), 1, "{:#?}", api.seen());

    // The IPv6 slice is deleted; then the watch's version is gone (410):
    // sync lists again and takes the list's set as the whole truth.
    let watch = lines("watch-2.jsonl");
    api.send(&watch[0]);
    let v4_only = wait_for(&mut stream, WAIT, "lost [::1]", |s| {
        !addresses(s).contains(&"[::1]:8080")
    })
    .await;
    assert_eq!(
        addresses(&v4_only),
        ["127.0.0.2:8080", "127.0.0.3:8080", "127.0.0.4:8080"]
    );
    *api.list.lock().unwrap() = fixture("list-after-gone.json");
    api.send(&watch[1]);
    let relisted = wait_for(&mut stream, WAIT, "has the new list's set", |s| {
        addresses(s).contains(&"127.0.0.5:8080")
    })
    .await;
    assert_eq!(
        addresses(&relisted),
        [
            "127.0.0.2:8080",
            "127.0.0.3:8080",
            "127.0.0.4:8080",
            "127.0.0.5:8080"
        ]
    );
    assert!(!relisted.stale);
    assert_eq!(api.lists(), 2);
    api.watched_from("1200").await;
    metric_is(metrics, series("kubernetes_relists_total"), 1.0).await;

    // The API server fails: the last set stays, said to be stale, until a
    // watch is answered again.
    api.failing.store(true, Ordering::SeqCst);
    api.push.send(Push::End).unwrap();
    let stale = wait_for(&mut stream, WAIT, "is stale", |s| s.stale).await;
    assert_eq!(
        addresses(&stale),
        addresses(&relisted),
        "the last set is kept"
    );
    assert!(stale.discovered);
    metric_is(metrics, series("discovery_stale"), 1.0).await;
    assert!(sample(metrics, &series("kubernetes_watch_failures_total")).unwrap_or(0.0) >= 1.0);
    assert!(
        sync.log().contains("keeping the last instance set (stale)"),
        "{}",
        sync.log()
    );
    api.failing.store(false, Ordering::SeqCst);
    let current = wait_for(&mut stream, WAIT, "is current again", |s| !s.stale).await;
    assert_eq!(addresses(&current), addresses(&relisted));
    // It watched again from the version it had, without a list.
    assert_eq!(api.lists(), 2, "{:#?}", api.seen());

    // Scaled to zero: every endpoint terminating, then a slice with none.
    // An answered watch with no ready endpoint is the truth: an empty set,
    // not stale (requests wait for an instance).
    let watch = lines("watch-3.jsonl");
    api.send(&watch[0]);
    api.send(&watch[1]);
    let empty = wait_for(&mut stream, WAIT, "is empty", |s| s.instances.is_empty()).await;
    assert!(empty.discovered && !empty.stale, "{empty:?}");
    metric_is(metrics, series("discovered_instances"), 0.0).await;
    assert_eq!(sample(metrics, &series("discovery_stale")), Some(0.0));
    assert!(sync.log().contains("Kubernetes discovery: instance set"));

    // Every request: the Service's slices in its namespace, by label, with
    // the kubeconfig's credentials, and only the verbs the Role grants.
    let seen = api.seen();
    let mut verbs: Vec<String> = Vec::new();
    for request in &seen {
        assert_eq!(request.path, PATH, "{request:?}");
        assert_eq!(
            request.query.get("labelSelector").map(String::as_str),
            Some(SELECTOR),
            "{request:?}"
        );
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str()),
            "{request:?}"
        );
        let verb = if request.is_watch() { "watch" } else { "list" };
        if !verbs.iter().any(|v| v == verb) {
            verbs.push(verb.to_string());
        }
    }
    verbs.sort();
    assert_eq!(verbs, role_verbs(), "{seen:#?}");
    assert_eq!(
        sluice_sync::kube_discovery::API_VERBS
            .map(String::from)
            .to_vec(),
        verbs
    );
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The recorded list, made to hold `ready` (all ready) at `port`, in one
/// IPv4 slice: the shape of `list.json`, the addresses of this test.
fn list_of(ready: &[&str], port: u16) -> String {
    let mut list: serde_json::Value = serde_json::from_str(&fixture("list.json")).unwrap();
    let items = list["items"].as_array_mut().unwrap();
    items.truncate(1);
    let template = items[0]["endpoints"][0].clone();
    items[0]["ports"][0]["port"] = port.into();
    items[0]["endpoints"] = ready
        .iter()
        .map(|ip| {
            let mut e = template.clone();
            e["addresses"] = serde_json::json!([ip]);
            e
        })
        .collect();
    list.to_string()
}

/// The scale-up of `watch-1.jsonl` (an ADDED slice), holding `ready` at `port`.
fn added_slice(ready: &[&str], port: u16) -> String {
    let mut event: serde_json::Value = serde_json::from_str(&lines("watch-1.jsonl")[2]).unwrap();
    assert_eq!(event["type"], "ADDED");
    let template = event["object"]["endpoints"][0].clone();
    event["object"]["ports"][0]["port"] = port.into();
    event["object"]["endpoints"] = ready
        .iter()
        .map(|ip| {
            let mut e = template.clone();
            e["addresses"] = serde_json::json!([ip]);
            e
        })
        .collect();
    event.to_string()
}

/// Autoscaling through discovery, through a real Envoy (`--concurrency 2`):
/// requests wait on one instance of capacity 1; two more become ready in
/// the API server (an ADDED EndpointSlice); the waiting requests reach
/// them, each instance still held to 1 at a time (the backends' traces).
#[test]
fn instances_added_in_kubernetes_take_the_requests_that_wait() {
    use sluice_harness::{
        most_at_once, sync_cluster_yaml, Backend, Envoy, FrontProxy, SYNC_CLUSTER,
    };
    use sluice_loadgen::{run_blocking, summarize, Burst};
    const PREDICT: &str = "/predict";
    let runtime = tokio::runtime::Runtime::new().unwrap();
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
                &format!("{PREDICT}:capacity=1000,service_ms=100"),
            ])
        })
        .collect();
    let api = runtime.block_on(FakeApi::start(list_of(&ips[..1], port)));
    let scratch = ScratchDir::new("kubeconfig");
    let kubeconfig = scratch.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: sync\n  user: {{token: {TOKEN}}}\ncontexts:\n- name: fake\n  \
             context: {{cluster: fake, user: sync}}\ncurrent-context: fake\n",
            api.addr
        ),
    )
    .unwrap();
    let redis = Redis::start();
    let redis_url = redis.url();
    let discover = format!("{SERVICE}=shop/backend:{port}");
    let sync = SyncService::start_with(
        &["--redis", &redis_url, "--discover-k8s", &discover],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let config = serde_json::json!({
        "service": SERVICE,
        "abandon_hold": 0,
        "sync": {"cluster": SYNC_CLUSTER},
        "instances": {"kubernetes": {"namespace": "shop", "service": "backend", "port": port}},
        "endpoints": {PREDICT: {"capacity": 1, "queue_timeout": 30, "max_queue": 1000}},
    });
    let mut proxy = FrontProxy::new(port, config.to_string());
    // Envoy's cluster holds every pod (as EDS would); the filter picks
    // among those sync says are ready.
    proxy.instances = backends.iter().map(Backend::addr).collect();
    proxy.extra_clusters_yaml = sync_cluster_yaml(sync.addr().port());
    let envoy = Envoy::start(&proxy, 2);
    let stats = || {
        envoy
            .request("GET", "/balancer/stats")
            .send()
            .expect("stats")
            .json()["endpoints"][PREDICT]
            .clone()
    };
    let ready_in_filter = |n: usize| {
        let s = stats();
        (s["instances_source"] == "sync"
            && s["instances"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|i| i["gone"] == false).count() == n))
        .then_some(())
    };
    wait_until(WAIT, "the one ready instance in the filter", || {
        ready_in_filter(1)
    });

    // 30 requests of 100 ms on one slot: they wait.
    let addr = envoy.listener_addr();
    let load = std::thread::spawn(move || summarize(&run_blocking(&Burst::new(addr, PREDICT, 30))));
    wait_until(WAIT, "requests waiting", || {
        (stats()["queued"].as_u64().unwrap_or(0) >= 10).then_some(())
    });
    let added_us = unix_us();
    api.send(&added_slice(&ips[1..], port));
    let summary = load.join().unwrap();
    assert_eq!(summary.ok, 30, "{summary:?}");
    let traces: Vec<_> = backends.iter().map(|b| b.trace(PREDICT)).collect();
    let first_new = traces[1..]
        .iter()
        .flatten()
        .map(|r| r.arrived_us)
        .min()
        .expect("a request at an added instance");
    let pickup_ms = first_new.saturating_sub(added_us) as f64 / 1000.0;
    let counts: Vec<usize> = traces.iter().map(Vec::len).collect();
    println!("instances added in the API server took their first waiting request after {pickup_ms:.0} ms; served {counts:?}");
    assert!(pickup_ms < 1000.0, "{pickup_ms} ms");
    // The added two took a real part of the backlog, each one at a time.
    assert!(counts[1] >= 5 && counts[2] >= 5, "{counts:?}");
    for (t, b) in traces.iter().zip(&backends) {
        assert_eq!(
            most_at_once(t),
            1,
            "{} ran more than its capacity",
            b.addr()
        );
    }
    drop(sync);
}

/// No Kubernetes credentials at all (no KUBECONFIG file, no
/// ~/.kube/config, not in a pod): a setting to fix, said at start with
/// exit status 2, before anything listens.
#[test]
fn no_kubernetes_credentials_stop_sync_at_start() {
    let scratch = ScratchDir::new("no-kube");
    let out = std::process::Command::new(sluice_harness::bin_path("sluice-sync"))
        .args([
            "--redis",
            "redis://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--discover-k8s",
            "shop/backend:http",
        ])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("HOME", scratch.path())
        .env("KUBECONFIG", scratch.path().join("missing"))
        .output()
        .expect("run sluice-sync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--discover-k8s/instances.kubernetes: no Kubernetes credentials"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
}
