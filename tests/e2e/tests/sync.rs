//! The sync service: the real `sluice-sync` binary against a real
//! `redis-server`, watched through its gRPC API, written to through the
//! prober's own Redis code (`RedisRecords::put`: HSET + INCR + PUBLISH in
//! one MULTI). Everything on loopback, every wait bounded.

use sluice_core::capacity_record::{CapacityRecord, Source};
use sluice_core::sync_api::{FetchRequest, Snapshot, WatchRequest, SERVICE_NAME};
use sluice_harness::{Redis, RespValue, SyncService};
use sluice_prober::redis_records::RedisRecords;
use sluice_sync::api::capacity_sync_client::CapacitySyncClient;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::time::timeout;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const WAIT: Duration = Duration::from_secs(5);

fn record(capacity: u32) -> CapacityRecord {
    CapacityRecord {
        capacity,
        p99_ms: Some(12.5),
        rps: Some(300.0),
        error_rate: Some(0.0),
        measured_at: 1_763_842_052,
        source: Source::Probe,
    }
}

/// Writes one record exactly as `sluice-prober` does.
fn put(redis: &Redis, service: &str, path: &str, capacity: u32) {
    let mut records = RedisRecords::connect(&redis.url(), service).expect("connect to Redis");
    records.put(path, &record(capacity)).expect("prober put");
}

async fn client(sync: &SyncService) -> CapacitySyncClient<Channel> {
    CapacitySyncClient::connect(sync.url())
        .await
        .expect("connect to sluice-sync")
}

async fn watch(sync: &SyncService, service: &str, last_version: u64) -> Streaming<Snapshot> {
    client(sync)
        .await
        .watch(WatchRequest {
            service: service.into(),
            node: "e2e".into(),
            last_version,
        })
        .await
        .expect("Watch")
        .into_inner()
}

/// The next message, heartbeat or not.
async fn next(stream: &mut Streaming<Snapshot>, within: Duration) -> Snapshot {
    match timeout(within, stream.message()).await {
        Ok(Ok(Some(snapshot))) => snapshot,
        Ok(Ok(None)) => panic!("the stream ended"),
        Ok(Err(status)) => panic!("the stream failed: {status}"),
        Err(_) => panic!("no message within {within:?}"),
    }
}

/// The next message that is not a heartbeat.
async fn next_state(stream: &mut Streaming<Snapshot>, within: Duration) -> Snapshot {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let snapshot = next(stream, left).await;
        if !snapshot.heartbeat {
            return snapshot;
        }
    }
}

/// Skips messages until one satisfies `want`.
async fn wait_for(
    stream: &mut Streaming<Snapshot>,
    within: Duration,
    what: &str,
    mut want: impl FnMut(&Snapshot) -> bool,
) -> Snapshot {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no snapshot that {what} within {within:?}");
        let snapshot = next(stream, left).await;
        if want(&snapshot) {
            return snapshot;
        }
    }
}

fn capacities(snapshot: &Snapshot) -> Vec<(String, u32)> {
    snapshot
        .endpoints
        .iter()
        .map(|e| (e.path.clone(), e.capacity))
        .collect()
}

async fn health(sync: &SyncService, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(sync.url())
        .unwrap()
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

async fn wait_health(sync: &SyncService, want: ServingStatus, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = health(sync, SERVICE_NAME).await;
        if now == Some(want) {
            assert_eq!(health(sync, "").await, Some(want), "overall health");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health is {now:?}, not {want:?}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn version_in_redis(redis: &Redis, service: &str) -> Option<String> {
    redis
        .command(&["GET", &format!("sluice:{{{service}}}:version")])
        .as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_reaches_a_watcher_within_milliseconds() {
    let redis = Redis::start();
    let sync = SyncService::start(&redis.url(), &[]);
    let mut stream = watch(&sync, "demo", 0).await;
    let first = next(&mut stream, WAIT).await;
    assert!(!first.heartbeat);
    assert_eq!(
        (first.service.as_str(), first.version, first.stale),
        ("demo", 0, false)
    );
    assert!(first.endpoints.is_empty(), "nothing written yet");

    let mut records = RedisRecords::connect(&redis.url(), "demo").expect("connect to Redis");
    let mut latencies = Vec::new();
    for n in 1..=20u32 {
        let sent = Instant::now();
        records.put("/predict", &record(n)).expect("prober put");
        let snapshot = next_state(&mut stream, WAIT).await;
        latencies.push(sent.elapsed());
        assert_eq!(snapshot.version, u64::from(n), "one INCR per write");
        assert_eq!(capacities(&snapshot), [("/predict".to_string(), n)]);
        let e = &snapshot.endpoints[0];
        assert_eq!((e.source.as_str(), e.measured_at), ("probe", 1_763_842_052));
    }
    assert_eq!(version_in_redis(&redis, "demo").as_deref(), Some("20"));
    latencies.sort();
    let (median, max) = (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    eprintln!("write -> watcher: median {median:?}, max {max:?} over 20 writes");
    assert!(median < Duration::from_millis(100), "median {median:?}");
    assert!(max < Duration::from_millis(500), "max {max:?}");

    // A second endpoint: the whole state again, sorted by path.
    put(&redis, "demo", "/embed", 3);
    let snapshot = next_state(&mut stream, WAIT).await;
    assert_eq!(
        capacities(&snapshot),
        [("/embed".to_string(), 3), ("/predict".to_string(), 20)]
    );
    let fetched = client(&sync)
        .await
        .fetch(FetchRequest {
            service: "demo".into(),
        })
        .await
        .expect("Fetch")
        .into_inner();
    assert_eq!(
        (fetched.version, fetched.endpoints),
        (snapshot.version, snapshot.endpoints)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_about_once_a_second() {
    let redis = Redis::start();
    put(&redis, "beat", "/p", 4);
    let sync = SyncService::start(&redis.url(), &[]);
    let mut stream = watch(&sync, "beat", 0).await;
    let first = next(&mut stream, WAIT).await;
    assert_eq!((first.heartbeat, first.version), (false, 1));
    let mut at = Instant::now();
    for _ in 0..3 {
        let beat = next(&mut stream, Duration::from_secs(3)).await;
        let gap = at.elapsed();
        at = Instant::now();
        assert!(beat.heartbeat, "nothing changed: {beat:?}");
        assert_eq!((beat.version, beat.stale), (1, false));
        assert!(beat.endpoints.is_empty());
        assert!(
            Duration::from_millis(700) < gap && gap < Duration::from_millis(1600),
            "a heartbeat after {gap:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_services_bad_records_and_hand_edits() {
    let redis = Redis::start();
    // Storage from a sluice.yaml this time.
    let dir = sluice_harness::ScratchDir::new("sync-config");
    let config = dir.path().join("sluice.yaml");
    std::fs::write(
        &config,
        format!(
            "service: other\nstorage: {{type: redis, url: \"{}\"}}\n",
            redis.url()
        ),
    )
    .unwrap();
    let sync = SyncService::start_with(&["--config", config.to_str().unwrap()], &[]);

    // Unknown: an empty snapshot at version 0, and it stays watched.
    let mut stream = watch(&sync, "nobody", 0).await;
    let first = next(&mut stream, WAIT).await;
    assert_eq!((first.version, first.heartbeat), (0, false));
    assert!(first.endpoints.is_empty());
    put(&redis, "nobody", "/p", 2);
    let snapshot = next_state(&mut stream, WAIT).await;
    assert_eq!(
        (snapshot.version, capacities(&snapshot)),
        (1, vec![("/p".to_string(), 2)])
    );

    // A malformed record next to a good one: skipped, with a warning
    // naming its key; the good one still counts.
    for args in [
        &["HSET", "sluice:{nobody}:capacity:/bad", "capacity", "ten"][..],
        &["SADD", "sluice:{nobody}:endpoints", "/bad"],
        &["INCR", "sluice:{nobody}:version"],
        &["PUBLISH", "sluice:{nobody}:updates", "{}"],
    ] {
        redis.command(args);
    }
    let snapshot = next_state(&mut stream, WAIT).await;
    assert_eq!(
        (snapshot.version, capacities(&snapshot)),
        (2, vec![("/p".to_string(), 2)])
    );
    let log = sync.log();
    assert!(
        log.contains("skipping a malformed capacity record")
            && log.contains("sluice:{nobody}:capacity:/bad"),
        "{log}"
    );

    // A hand edit without INCR: new content under the same version.
    redis.command(&["HSET", "sluice:{nobody}:capacity:/p", "capacity", "7"]);
    redis.command(&["PUBLISH", "sluice:{nobody}:updates", "{}"]);
    let snapshot = next_state(&mut stream, WAIT).await;
    assert_eq!(
        (snapshot.version, capacities(&snapshot)),
        (2, vec![("/p".to_string(), 7)])
    );

    // Without any message, the periodic full read finds a change too.
    redis.command(&["HSET", "sluice:{nobody}:capacity:/p", "capacity", "9"]);
    let snapshot = next_state(&mut stream, Duration::from_secs(8)).await;
    assert_eq!(capacities(&snapshot), [("/p".to_string(), 9)]);

    // A bad service name is refused with a reason.
    let status = client(&sync)
        .await
        .watch(WatchRequest {
            service: "a{b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("braces"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_serves_stale_then_recovers_by_itself() {
    let mut redis = Redis::start();
    put(&redis, "demo", "/predict", 8);
    let sync = SyncService::start(&redis.url(), &[]);
    let mut stream = watch(&sync, "demo", 0).await;
    let first = next(&mut stream, WAIT).await;
    assert_eq!((first.version, first.stale), (1, false));
    wait_health(&sync, ServingStatus::Serving, WAIT).await;

    redis.kill();
    let stale = next_state(&mut stream, WAIT).await;
    assert!(stale.stale, "{stale:?}");
    assert_eq!(
        (stale.version, capacities(&stale)),
        (1, vec![("/predict".to_string(), 8)]),
        "the last state, kept"
    );
    let beat = next(&mut stream, Duration::from_secs(3)).await;
    assert!(beat.heartbeat && beat.stale, "the stream stays: {beat:?}");
    wait_health(&sync, ServingStatus::NotServing, WAIT).await;
    let fetched = client(&sync)
        .await
        .fetch(FetchRequest {
            service: "demo".into(),
        })
        .await
        .expect("Fetch serves the last state")
        .into_inner();
    assert!(fetched.stale);
    assert_eq!(capacities(&fetched), [("/predict".to_string(), 8)]);

    // The same port, an empty Redis (no persistence): its version counter
    // starts again, yet what the watcher gets must never go back.
    std::thread::sleep(Duration::from_secs(1));
    redis.restart();
    wait_health(&sync, ServingStatus::Serving, Duration::from_secs(10)).await;
    put(&redis, "demo", "/predict", 5);
    let mut last_version = stale.version;
    let fresh = wait_for(
        &mut stream,
        Duration::from_secs(10),
        "holds the new capacity",
        |s| {
            if !s.heartbeat {
                assert!(s.version > last_version, "version went back: {s:?}");
                last_version = s.version;
            }
            capacities(s) == [("/predict".to_string(), 5)]
        },
    )
    .await;
    assert!(!fresh.stale);
    assert!(fresh.version > 1, "{fresh:?}");
    let log = sync.log();
    assert!(log.contains("Redis unreachable"), "{log}");
    assert!(log.contains("Redis reachable"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_cleanly() {
    let redis = Redis::start();
    let mut sync =
        SyncService::start_with(&["--redis", &redis.url()], &[("SLUICE_LOG_FORMAT", "json")]);
    let mut streams = Vec::new();
    for service in ["a", "b"] {
        let mut stream = watch(&sync, service, 0).await;
        next(&mut stream, WAIT).await;
        streams.push(stream);
    }
    let status = tokio::task::block_in_place(|| sync.terminate(Duration::from_secs(10)));
    for mut stream in streams {
        let end = timeout(WAIT, async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        })
        .await
        .expect("the stream ends");
        let status = end.expect("the stream ends with a status, not silently");
        assert_eq!(status.code(), Code::Unavailable, "{status}");
        assert!(status.message().contains("shutting down"), "{status}");
    }
    let status = status.expect("sluice-sync exits after SIGTERM");
    assert!(status.success(), "{status}");
    let log = sync.log();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not a JSON log line: {line}");
    }
    assert!(log.contains("shutting down"), "{log}");
    assert_eq!(redis.command(&["PING"]), RespValue::Simple("PONG".into()));
}

#[test]
fn bad_command_lines_fail_with_the_reason() {
    let dir = sluice_harness::ScratchDir::new("sync-cli");
    let memory = dir.path().join("memory.yaml");
    std::fs::write(&memory, "service: demo\nstorage: {type: memory}\n").unwrap();
    let memory = memory.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&[], "no Redis to read: pass --redis URL"),
        (&["--redis", "http://x"], "--redis: not a Redis URL"),
        (&["--config", memory], "storage.type is memory"),
        (
            &["--redis", "redis://127.0.0.1:1", "--listen", "nowhere"],
            "invalid value 'nowhere' for '--listen <ADDR>'",
        ),
        (
            &[
                "--redis",
                "redis://127.0.0.1:1",
                "--heartbeat-interval",
                "0ms",
            ],
            "must be more than 0",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(sluice_harness::bin_path("sluice-sync"))
            .args(args)
            .env_remove("SLUICE_REDIS_URL")
            .env_remove("SLUICE_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
