//! The backend served in-process on a free loopback port, driven over real
//! HTTP/1.1 connections.

use serde_json::Value;
use sluice_backend::{route::RouteSpec, Options, Server};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(routes: &[&str]) -> SocketAddr {
    start_with_workers(routes, None).await
}

async fn start_with_workers(routes: &[&str], workers: Option<usize>) -> SocketAddr {
    let opts = Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        routes: routes
            .iter()
            .map(|r| r.parse::<RouteSpec>().unwrap())
            .collect(),
        threads: 1,
        workers,
        trace: true,
        name: None,
    };
    let server = Server::bind(&opts).await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.serve());
    addr
}

/// One request on its own connection: (status, body).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: backend\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("content-length: 5\r\n\r\nhello");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

async fn stats(addr: SocketAddr) -> Value {
    let (status, body) = request(addr, "GET", "/__backend/stats", &[]).await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// Starts `n` requests to `path`, 20 ms apart so they arrive in `x-seq` order.
async fn burst(addr: SocketAddr, path: &'static str, n: usize) -> Vec<(u16, String, Duration)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for seq in 0..n {
        tasks.push(tokio::spawn(async move {
            let (status, body) = request(addr, "POST", path, &[("x-seq", &seq.to_string())]).await;
            (status, body, started.elapsed())
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

#[tokio::test]
async fn queue_mode_serves_capacity_at_a_time_in_arrival_order() {
    let addr = start(&["/predict:capacity=2,service_ms=200"]).await;
    let results = burst(addr, "/predict", 6).await;
    for (status, body, _) in &results {
        assert_eq!(*status, 200);
        assert_eq!(body, r#"{"path":"/predict","service_ms":200.0}"#);
    }
    // Two at a time, FIFO: the last pair cannot finish before three service times.
    assert!(
        results[5].2 >= Duration::from_millis(590),
        "{:?}",
        results[5].2
    );
    assert!(results[1].2 < results[5].2);
    let s = &stats(addr).await["paths"]["/predict"];
    assert_eq!(s["max_serving"], 2);
    assert_eq!(s["max_in_flight"], 6);
    assert_eq!(s["in_flight"], 0);
    assert_eq!(s["serving"], 0);
    assert_eq!(s["completed"], 6);
    assert_eq!(s["rejected"], 0);
    assert_eq!(
        s["arrivals"],
        serde_json::json!(["0", "1", "2", "3", "4", "5"])
    );
}

#[tokio::test]
async fn reject_mode_answers_503_beyond_capacity() {
    let addr = start(&["/predict:capacity=1,service_ms=300,overload=reject"]).await;
    let results = burst(addr, "/predict", 3).await;
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(statuses, [200, 503, 503]);
    assert_eq!(results[1].1, r#"{"error":"over capacity"}"#);
    assert!(
        results[1].2 < Duration::from_millis(200),
        "503 comes at once"
    );
    let s = &stats(addr).await["paths"]["/predict"];
    assert_eq!(s["completed"], 1);
    assert_eq!(s["rejected"], 2);
    assert_eq!(s["max_serving"], 1);
    assert_eq!(s["max_in_flight"], 2);
}

#[tokio::test]
async fn unrouted_paths_are_served_at_once_and_counted() {
    let addr = start(&["/predict:capacity=1,service_ms=1000"]).await;
    let started = Instant::now();
    let (status, body) = request(addr, "GET", "/other?x=1", &[("x-seq", "a")]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"path":"/other","service_ms":0.0}"#)
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    let paths = &stats(addr).await["paths"];
    assert_eq!(paths["/other"]["completed"], 1);
    assert_eq!(paths["/other"]["arrivals"], serde_json::json!(["a"]));
    assert_eq!(paths["/predict"]["completed"], 0);
    assert!(paths.get("/__backend/stats").is_none(), "{paths}");
}

#[tokio::test]
async fn query_string_is_ignored_and_header_overrides_service_time() {
    let addr = start(&["/predict:service_ms=5000"]).await;
    let started = Instant::now();
    let (status, body) = request(addr, "POST", "/predict?fast=1", &[("x-service-ms", "50")]).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"path":"/predict","service_ms":50.0}"#)
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    let (status, _) = request(addr, "POST", "/predict", &[("x-service-ms", "soon")]).await;
    assert_eq!(status, 400);
    assert_eq!(stats(addr).await["paths"]["/predict"]["completed"], 1);
}

#[tokio::test]
async fn reset_clears_counters_and_arrivals() {
    let addr = start(&["/predict:capacity=2"]).await;
    burst(addr, "/predict", 3).await;
    let (status, _) = request(addr, "POST", "/__backend/reset", &[]).await;
    assert_eq!(status, 200);
    let s = &stats(addr).await["paths"]["/predict"];
    assert_eq!(s["completed"], 0);
    assert_eq!(s["max_in_flight"], 0);
    assert_eq!(s["max_serving"], 0);
    assert_eq!(s["arrivals"], serde_json::json!([]));
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_place() {
    let addr = start(&["/predict:capacity=1,service_ms=60000"]).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /predict HTTP/1.1\r\nhost: b\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(stats(addr).await["paths"]["/predict"]["serving"], 1);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = stats(addr).await;
        if s["paths"]["/predict"]["in_flight"] == 0 && s["paths"]["/predict"]["serving"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still counted: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `on_disconnect=finish`: the work goes on, and is counted, after the client
/// leaves, as in a server that cannot notice (a thread pool).
#[tokio::test]
async fn finish_mode_keeps_working_after_the_client_leaves() {
    let addr = start(&["/predict:capacity=1,service_ms=400,on_disconnect=finish"]).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /predict HTTP/1.1\r\nhost: b\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = &stats(addr).await["paths"]["/predict"];
    assert_eq!(
        (s["in_flight"].as_u64(), s["serving"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = &stats(addr).await["paths"]["/predict"];
    assert_eq!(
        (s["in_flight"].as_u64(), s["completed"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );
}

/// Counted under the path the application routes on, like uvicorn.
#[tokio::test]
async fn encoded_and_dotted_spellings_count_as_one_path() {
    let addr = start(&["/predict"]).await;
    for path in ["/pre%64ict", "//predict", "/x/../predict"] {
        assert_eq!(request(addr, "GET", path, &[]).await.0, 200);
    }
    let s = stats(addr).await;
    assert_eq!(s["paths"]["/predict"]["completed"], 3, "{s}");
}

#[tokio::test]
async fn every_response_names_the_instance() {
    let opts = Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        routes: vec!["/p".parse().unwrap()],
        threads: 1,
        workers: None,
        trace: false,
        name: Some("backend-a".to_string()),
    };
    let server = Server::bind(&opts).await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.serve());
    for path in ["/p", "/unrouted", "/__backend/stats"] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(
            response.contains("\r\nx-backend-name: backend-a\r\n"),
            "{path}: {response}"
        );
    }
    // Without --name there is no such header.
    let addr = start(&["/p"]).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /p HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(!response.contains("x-backend-name"), "{response}");
}

#[test]
fn bad_route_spec_exits_non_zero_naming_the_bad_part() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-backend"))
        .args(["--route", "/ok", "--route", "/p:capacity=4,overload=drop"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/p:capacity=4,overload=drop")
            && stderr.contains("overload must be queue, reject or error200, got \"drop\""),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_sluice-backend"))
        .args(["--route", "/p", "--route", "/p:capacity=1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--route /p is given twice"), "{stderr}");
}

#[test]
fn binary_prints_its_port_when_ready() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-backend"))
        .args(["--route", "/p:capacity=1", "--threads", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let addr = line.trim_end().strip_prefix("listening on 127.0.0.1:");
    assert!(
        addr.is_some_and(|port| port.parse::<u16>().unwrap() > 0),
        "{line:?}"
    );
}

/// `clients` loops of: request, then `pause` before the next one.
async fn closed_loop(
    addr: SocketAddr,
    path: &'static str,
    clients: usize,
    rounds: usize,
    pause: Duration,
) {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let (status, _) = request(addr, "GET", path, &[]).await;
                assert_eq!(status, 200);
                tokio::time::sleep(pause).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn handover_gap_times_a_full_paths_empty_slot_until_the_next_arrival() {
    let addr = start(&["/p:capacity=2,service_ms=20", "/q:capacity=2,service_ms=20"]).await;
    // Two clients keep both slots of /p busy, each pausing 30 ms after its
    // answer: every slot freed at capacity stays empty about 30 ms.
    closed_loop(addr, "/p", 2, 6, Duration::from_millis(30)).await;
    // One client never fills /q: nothing there is a handover.
    closed_loop(addr, "/q", 1, 4, Duration::from_millis(30)).await;
    let paths = &stats(addr).await["paths"];
    let gap = &paths["/p"]["handover_gap"];
    let count = gap["count"].as_u64().unwrap();
    // 12 departures; the first pair may find the path not yet full, the
    // last two are still open.
    assert!((8..=10).contains(&count), "{gap}");
    assert_eq!(gap["open"], 2, "{gap}");
    let p50 = gap["p50_ms"].as_f64().unwrap();
    let max = gap["max_ms"].as_f64().unwrap();
    assert!((29.0..60.0).contains(&p50), "{gap}");
    assert!(
        max >= p50 && gap["p99_ms"].as_f64().unwrap() <= max,
        "{gap}"
    );
    assert_eq!(paths["/q"]["handover_gap"]["count"], 0, "{}", paths["/q"]);
    assert_eq!(
        paths["/p"]["over_capacity"]["episodes"], 0,
        "{}",
        paths["/p"]
    );

    // Latency runs from arrival to answer: the service time, no pause.
    let latency = &paths["/p"]["latency"];
    assert_eq!(latency["count"], 12);
    let p50 = latency["p50_ms"].as_f64().unwrap();
    assert!((19.9..35.0).contains(&p50), "{latency}");

    // Reset starts a new measurement: samples and open gaps are gone.
    request(addr, "POST", "/__backend/reset", &[]).await;
    let gap = &stats(addr).await["paths"]["/p"]["handover_gap"];
    assert_eq!(
        (gap["count"].as_u64(), gap["open"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn a_path_without_capacity_reports_no_handover_gap() {
    let addr = start(&["/p:service_ms=1"]).await;
    closed_loop(addr, "/p", 2, 2, Duration::ZERO).await;
    let s = &stats(addr).await["paths"]["/p"];
    assert!(s["handover_gap"].is_null(), "{s}");
    assert!(s["over_capacity"].is_null(), "{s}");
    assert_eq!(s["latency"]["count"], 4, "{s}");
}

#[tokio::test]
async fn a_worker_pool_makes_every_path_wait_behind_a_flood() {
    let addr = start_with_workers(&["/slow:service_ms=300", "/fast:service_ms=1"], Some(1)).await;
    let slow = tokio::spawn(async move { request(addr, "GET", "/slow", &[]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let (status, _) = request(addr, "GET", "/fast", &[]).await;
    assert_eq!(status, 200);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "/fast did not wait for the worker: {took:?}"
    );
    assert_eq!(slow.await.unwrap().0, 200);
    // Its wait counts in its latency, as the backend saw it.
    let fast = &stats(addr).await["paths"]["/fast"]["latency"];
    assert!(fast["p50_ms"].as_f64().unwrap() >= 200.0, "{fast}");
    // Stats and unrouted paths never wait for a worker.
    let slow = tokio::spawn(async move { request(addr, "GET", "/slow", &[]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    request(addr, "GET", "/elsewhere", &[]).await;
    stats(addr).await;
    assert!(started.elapsed() < Duration::from_millis(150));
    slow.await.unwrap();
}

#[tokio::test]
async fn trace_keeps_each_request_id_with_its_wall_clock_times() {
    let addr = start(&["/p:service_ms=30"]).await;
    let before_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    request(addr, "GET", "/p", &[("x-request-id", "abc")]).await;
    request(addr, "GET", "/p", &[]).await; // no id: not traced
    let (status, body) = request(addr, "GET", "/__backend/trace", &[]).await;
    assert_eq!(status, 200);
    let trace: Value = serde_json::from_str(&body).unwrap();
    let rows = trace["paths"]["/p"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{trace}");
    assert_eq!(rows[0][0], "abc");
    let (arrived, departed) = (rows[0][1].as_u64().unwrap(), rows[0][2].as_u64().unwrap());
    assert!(arrived >= before_us, "{trace}");
    assert!(departed - arrived >= 30_000, "{trace}");
    request(addr, "POST", "/__backend/reset", &[]).await;
    let (_, body) = request(addr, "GET", "/__backend/trace", &[]).await;
    assert_eq!(body, r#"{"paths":{"/p":[]}}"#);
}

/// The fourth field of a trace row is when the request took its slot: a
/// request that waited for one was served later than it arrived, and held
/// the slot from then to its departure.
#[tokio::test]
async fn trace_tells_when_each_request_took_its_slot() {
    let addr = start(&["/p:capacity=1,service_ms=40"]).await;
    let first =
        tokio::spawn(async move { request(addr, "GET", "/p", &[("x-request-id", "a")]).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    request(addr, "GET", "/p", &[("x-request-id", "b")]).await;
    first.await.unwrap();
    let (_, body) = request(addr, "GET", "/__backend/trace", &[]).await;
    let trace: Value = serde_json::from_str(&body).unwrap();
    let rows = trace["paths"]["/p"].as_array().unwrap();
    let row = |id: &str| {
        let r = rows.iter().find(|r| r[0] == id).unwrap();
        let at = |i: usize| r[i].as_u64().unwrap();
        (at(1), at(2), at(3))
    };
    let (a_arrived, a_departed, a_served) = row("a");
    let (b_arrived, b_departed, b_served) = row("b");
    assert!(
        a_served >= a_arrived && a_served - a_arrived < 5_000,
        "{trace}"
    );
    assert!(b_served >= a_departed, "b waited for a's slot: {trace}");
    assert!(b_served - b_arrived >= 20_000, "{trace}");
    assert!(b_departed - b_served >= 40_000, "{trace}");
}

/// `service_dist=exponential`: service times vary around the mean (that a
/// seed repeats them is checked on the draws, in service_time.rs).
#[tokio::test]
async fn exponential_service_times_vary() {
    let addr = start(&["/p:service_ms=5,service_dist=exponential,seed=3"]).await;
    let mut first = Vec::new();
    for _ in 0..40 {
        let started = Instant::now();
        request(addr, "GET", "/p", &[]).await;
        first.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (short, long) = (
        first.iter().filter(|&&m| m < 3.0).count(),
        first.iter().filter(|&&m| m > 8.0).count(),
    );
    // P(< 3 ms) = 1 - e^-0.6 = 0.45 and P(> 8 ms) = e^-1.6 = 0.2 of 40.
    assert!(short >= 5 && long >= 2, "{first:?}");
}
