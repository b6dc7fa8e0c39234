//! sluice-sync's own metrics (`--metrics-addr`) and gRPC reflection, against
//! the real binary, a real `redis-server` and a real watcher; written to
//! through the prober's Redis code, scraped over HTTP as Prometheus would.

use sluice_core::capacity_record::{CapacityRecord, Source};
use sluice_core::sync_api::{Snapshot, WatchRequest};
use sluice_harness::{free_port, http, wait_until, Redis, SyncService};
use sluice_prober::redis_records::RedisRecords;
use sluice_sync::api::capacity_sync_client::CapacitySyncClient;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::timeout;
use tonic::Streaming;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const WAIT: Duration = Duration::from_secs(5);

fn put(redis: &Redis, service: &str, path: &str, capacity: u32) {
    let record = CapacityRecord {
        capacity,
        p99_ms: Some(10.0),
        rps: Some(100.0),
        error_rate: Some(0.0),
        measured_at: 1_763_842_052,
        source: Source::Probe,
    };
    RedisRecords::connect(&redis.url(), service)
        .expect("connect to Redis")
        .put(path, &record)
        .expect("prober put");
}

fn scrape(addr: SocketAddr) -> String {
    let response = http::get(addr, "/metrics").expect("scrape /metrics");
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(
        response
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        response.headers
    );
    response.text()
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits (blocking, off the runtime's threads) until `series` reads `want`.
async fn wait_for(addr: SocketAddr, series: &'static str, want: f64) -> String {
    tokio::task::spawn_blocking(move || {
        wait_until(WAIT, series, || {
            let text = scrape(addr);
            (sample(&text, series) == Some(want)).then_some(text)
        })
    })
    .await
    .unwrap()
}

async fn next_state(stream: &mut Streaming<Snapshot>) -> Snapshot {
    loop {
        match timeout(WAIT, stream.message()).await {
            Ok(Ok(Some(s))) if !s.heartbeat => return s,
            Ok(Ok(Some(_))) => continue,
            other => panic!("no snapshot: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_watchers_snapshots_and_redis() {
    let mut redis = Redis::start();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let metrics_arg = metrics.to_string();
    let sync = SyncService::start(
        &redis.url(),
        &[
            "--metrics-addr",
            &metrics_arg,
            "--heartbeat-interval",
            "200ms",
            "--forget-after",
            "300ms",
        ],
    );
    let text = wait_for(metrics, "sluice_sync_redis_up", 1.0).await;
    assert_eq!(sample(&text, "sluice_sync_services"), Some(0.0), "{text}");
    let has = |text: &str, line: &str| {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    };
    has(&text, "# TYPE sluice_sync_write_to_send_seconds histogram");
    has(&text, "# TYPE sluice_sync_redis_up gauge");

    let mut stream = CapacitySyncClient::connect(sync.url())
        .await
        .unwrap()
        .watch(WatchRequest {
            service: "metered".into(),
            node: "e2e".into(),
            last_version: 0,
        })
        .await
        .expect("Watch")
        .into_inner();
    let first = next_state(&mut stream).await;
    assert_eq!(first.version, 0);
    wait_for(
        metrics,
        "sluice_sync_watchers{sluice_service=\"metered\"}",
        1.0,
    )
    .await;

    // A write: the snapshot it causes is counted, and timed from the write.
    put(&redis, "metered", "/predict", 7);
    let snapshot = next_state(&mut stream).await;
    assert_eq!(snapshot.version, 1);
    assert_eq!(snapshot.endpoints[0].capacity, 7);
    let text = wait_for(
        metrics,
        "sluice_sync_snapshots_sent_total{sluice_service=\"metered\",kind=\"state\"}",
        2.0,
    )
    .await;
    assert_eq!(
        sample(&text, "sluice_sync_write_to_send_seconds_count"),
        Some(1.0),
        "{text}"
    );
    let seconds = sample(&text, "sluice_sync_write_to_send_seconds_sum").unwrap();
    assert!(
        seconds > 0.0 && seconds < 1.0,
        "{seconds} s from write to send\n{text}"
    );
    assert_eq!(sample(&text, "sluice_sync_services"), Some(1.0), "{text}");
    has(&text, "# TYPE sluice_sync_watchers gauge");
    has(&text, "# TYPE sluice_sync_snapshots_sent counter");
    // Heartbeats are counted apart.
    wait_until(WAIT, "a heartbeat counted", || {
        let text = scrape(metrics);
        sample(
            &text,
            "sluice_sync_snapshots_sent_total{sluice_service=\"metered\",kind=\"heartbeat\"}",
        )
        .filter(|n| *n >= 1.0)
    });

    // Redis gone: the gauge says so (the watcher gets stale snapshots).
    redis.kill();
    wait_for(metrics, "sluice_sync_redis_up", 0.0).await;

    // The watcher leaves; after the grace the service's series go.
    drop(stream);
    wait_for(
        metrics,
        "sluice_sync_watchers{sluice_service=\"metered\"}",
        0.0,
    )
    .await;
    let text = tokio::task::spawn_blocking(move || {
        wait_until(WAIT, "the forgotten service's series to go", || {
            let text = scrape(metrics);
            (!text.contains("metered")).then_some(text)
        })
    })
    .await
    .unwrap();
    assert_eq!(sample(&text, "sluice_sync_services"), Some(0.0), "{text}");

    // Anything but GET /metrics is refused plainly.
    let other = http::get(metrics, "/").unwrap();
    assert_eq!(other.status, 404);
    drop(sync);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_the_services() {
    let redis = Redis::start();
    let sync = SyncService::start(&redis.url(), &[]);
    let channel = tonic::transport::Channel::from_shared(sync.url())
        .unwrap()
        .connect()
        .await
        .expect("connect to sluice-sync");
    let mut client = ServerReflectionClient::new(channel);
    let ask = |message: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = tokio_stream::iter([
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "sluice.sync.v1.CapacitySync".into(),
        )),
    ]);
    let mut responses = timeout(WAIT, client.server_reflection_info(requests))
        .await
        .expect("reflection answers")
        .expect("reflection call")
        .into_inner();

    let listed = match timeout(WAIT, responses.message()).await {
        Ok(Ok(Some(r))) => r.message_response,
        other => panic!("no list: {other:?}"),
    };
    let Some(MessageResponse::ListServicesResponse(list)) = listed else {
        panic!("not a list: {listed:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "sluice.sync.v1.CapacitySync"
        ]
    );

    let file = match timeout(WAIT, responses.message()).await {
        Ok(Ok(Some(r))) => r.message_response,
        other => panic!("no file: {other:?}"),
    };
    let Some(MessageResponse::FileDescriptorResponse(files)) = file else {
        panic!("not a file descriptor: {file:?}");
    };
    let descriptor = <prost_types::FileDescriptorProto as prost::Message>::decode(
        files.file_descriptor_proto[0].as_slice(),
    )
    .unwrap();
    assert_eq!(descriptor.name(), "sluice/sync/v1/sync.proto");
    let service = &descriptor.service[0];
    assert_eq!(service.name(), "CapacitySync");
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, ["Watch", "Fetch", "Share"]);
}
