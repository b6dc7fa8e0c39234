//! sluice-sync against careless and hostile callers (issue 22): the real
//! binary, a real redis-server, the real prober. Everything on loopback,
//! every wait bounded.

use sluice_core::sync_api::{Snapshot, WatchRequest, SERVICE_NAME};
use sluice_harness::{bin_path, Redis, RespValue, ScratchDir, SyncService};
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

async fn client(sync: &SyncService) -> CapacitySyncClient<Channel> {
    CapacitySyncClient::connect(sync.url())
        .await
        .expect("connect to sluice-sync")
}

fn request(service: &str, last_version: u64) -> WatchRequest {
    WatchRequest {
        service: service.into(),
        node: "abuse".into(),
        last_version,
    }
}

async fn next_state(stream: &mut Streaming<Snapshot>) -> Snapshot {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, stream.message()).await {
            Ok(Ok(Some(s))) if s.heartbeat => continue,
            Ok(Ok(Some(s))) => return s,
            other => panic!("no snapshot within {WAIT:?}: {other:?}"),
        }
    }
}

async fn health(sync: &SyncService) -> Option<ServingStatus> {
    let channel = Channel::from_shared(sync.url())
        .unwrap()
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

fn version_in_redis(redis: &Redis, service: &str) -> Option<String> {
    redis
        .command(&["GET", &format!("sluice:{{{service}}}:version")])
        .as_str()
}

/// `sluice-prober push --force` of one endpoint, as an operator would.
fn prober_push(redis: &Redis, service: &str, capacity: u32) -> std::process::Output {
    let dir = ScratchDir::new("abuse-push");
    let file = dir.path().join("sluice.yaml");
    std::fs::write(
        &file,
        format!("service: {service}\nendpoints:\n  /p:\n    capacity: {capacity}\n"),
    )
    .unwrap();
    Command::new(bin_path("sluice-prober"))
        .args(["push", "--force", "--config", file.to_str().unwrap()])
        .args(["--redis", &redis.url()])
        .output()
        .expect("run sluice-prober")
}

fn dbsize(redis: &Redis) -> i64 {
    match redis.command(&["DBSIZE"]) {
        RespValue::Integer(n) => n,
        other => panic!("DBSIZE: {other:?}"),
    }
}

/// Commands Redis has run so far, from `INFO commandstats` (ours included).
fn commands_run(redis: &Redis) -> u64 {
    let info = redis.command(&["INFO", "commandstats"]).as_str().unwrap();
    info.lines()
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_last_version_never_writes_to_redis_or_freezes_anyone() {
    let redis = Redis::start();
    let sync = SyncService::start(&redis.url(), &[]);
    let pushed = prober_push(&redis, "demo", 4);
    assert!(pushed.status.success(), "{pushed:?}");
    let mut honest = client(&sync)
        .await
        .watch(request("demo", 0))
        .await
        .expect("Watch")
        .into_inner();
    assert_eq!(next_state(&mut honest).await.version, 1);

    // Above any Redis counter: refused, nothing else happens.
    let status = client(&sync)
        .await
        .watch(request("demo", u64::MAX))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    // At and near the limit: answered with the current state, never stored.
    for last_version in [i64::MAX as u64, i64::MAX as u64 - 3] {
        let mut stream = client(&sync)
            .await
            .watch(request("demo", last_version))
            .await
            .expect("Watch")
            .into_inner();
        let snapshot = next_state(&mut stream).await;
        assert_eq!(snapshot.version, 1, "the current state, not the client's");
        drop(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(version_in_redis(&redis, "demo").as_deref(), Some("1"));
    assert_eq!(health(&sync).await, Some(ServingStatus::Serving));

    // The prober keeps working, and the honest watcher gets each push.
    for (n, capacity) in [(2, 5), (3, 6), (4, 7)] {
        let pushed = prober_push(&redis, "demo", capacity);
        assert!(pushed.status.success(), "push {n}: {pushed:?}");
        let snapshot = next_state(&mut honest).await;
        assert_eq!(snapshot.version, n);
        assert!(!snapshot.stale, "{snapshot:?}");
        assert_eq!(snapshot.endpoints[0].capacity, capacity);
    }
    let log = sync.log();
    assert!(!log.contains("Redis unreachable"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_nobody_watches_are_forgotten_and_bounded() {
    let redis = Redis::start();
    let sync = SyncService::start(
        &redis.url(),
        &[
            "--forget-after",
            "1s",
            "--resync-interval",
            "200ms",
            "--max-services",
            "600",
        ],
    );
    let channel = Channel::from_shared(sync.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut streams = Vec::new();
    for i in 0..500u64 {
        let mut c = CapacitySyncClient::new(channel.clone());
        let stream = c
            .watch(request(&format!("random-{i}-{}", i * 7919), i + 1))
            .await
            .expect("Watch")
            .into_inner();
        streams.push(stream);
    }
    for stream in &mut streams[..5] {
        next_state(stream).await;
    }
    // Bounded: 100 more slots, then every one is in use.
    let mut more = Vec::new();
    for i in 0..100 {
        let mut c = CapacitySyncClient::new(channel.clone());
        more.push(
            c.watch(request(&format!("more-{i}"), 0))
                .await
                .expect("Watch"),
        );
    }
    let status = client(&sync)
        .await
        .watch(request("one-too-many", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("--max-services"), "{status}");
    // Names: bounded length and charset.
    for bad in ["x".repeat(129), "caf\u{e9}".into(), "a\nb".into()] {
        let status = client(&sync)
            .await
            .watch(request(&bad, 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status}");
    }
    assert_eq!(dbsize(&redis), 0, "watchers create no Redis key");

    drop(streams);
    drop(more);
    drop(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sync.log().contains("forgot services nobody watches") {
        assert!(
            Instant::now() < deadline,
            "never forgotten:\n{}",
            sync.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = commands_run(&redis);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = commands_run(&redis);
    // Our own INFO calls only, give or take.
    assert!(
        after - before < 10,
        "{} Redis commands in 2 s for nobody",
        after - before
    );
    assert_eq!(dbsize(&redis), 0, "watchers create no Redis key");
    // A new service fits again.
    let mut stream = client(&sync)
        .await
        .watch(request("demo", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_state(&mut stream).await.version, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_only_its_holders_may_watch() {
    let redis = Redis::start();
    let dir = ScratchDir::new("abuse-token");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let sync = SyncService::start(
        &redis.url(),
        &["--token-file", token_file.to_str().unwrap()],
    );

    let status = client(&sync)
        .await
        .watch(request("demo", 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    for value in ["Bearer wrong", "s3cret-token", "Bearer s3cret-toke"] {
        let mut req = tonic::Request::new(request("demo", 0));
        req.metadata_mut()
            .insert("authorization", value.parse().unwrap());
        let status = client(&sync).await.watch(req).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{value}: {status}");
        assert!(!status.message().contains("s3cret"), "{status}");
    }
    let mut req = tonic::Request::new(request("demo", 0));
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret-token".parse().unwrap());
    let mut stream = client(&sync)
        .await
        .watch(req)
        .await
        .expect("Watch")
        .into_inner();
    assert_eq!(next_state(&mut stream).await.version, 0);
    // Health checks stay open.
    let deadline = Instant::now() + WAIT;
    while health(&sync).await != Some(ServingStatus::Serving) {
        assert!(
            Instant::now() < deadline,
            "health not SERVING without a token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!sync.log().contains("s3cret"), "the token is never logged");
}
