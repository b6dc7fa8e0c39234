//! Redis as managed offerings run it, end to end: the real `sluice-prober
//! push` and `sluice-sync` Watch through a `redis-server` that speaks only
//! TLS and requires client certificates (made by the test), and through a
//! real three-node Redis Cluster started by the test. Loopback only.

use serde_json::Value;
use sluice_core::redis_keys::{capacity_key, endpoints_key, updates_channel, version_key};
use sluice_core::sync_api::{Snapshot, WatchRequest};
use sluice_harness::{bin_path, RedisCluster, ScratchDir, SyncService, TlsRedis};
use sluice_sync::api::capacity_sync_client::CapacitySyncClient;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tokio::time::timeout;
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(10);

fn config(dir: &ScratchDir, service: &str, capacity: u32) -> String {
    let path = dir.path().join(format!("{service}-{capacity}.yaml"));
    std::fs::write(
        &path,
        format!("service: {service}\nendpoints:\n  /predict:\n    capacity: {capacity}\n"),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// `sluice-prober push --force --json --config FILE ARGS`, the Redis URL
/// from SLUICE_REDIS_URL.
fn push(file: &str, redis_url: &str, args: &[&str]) -> Output {
    Command::new(bin_path("sluice-prober"))
        .args(["push", "--force", "--json", "--config", file])
        .args(args)
        .env("SLUICE_REDIS_URL", redis_url)
        .stdin(Stdio::null())
        .output()
        .expect("run sluice-prober")
}

fn pushed(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["endpoints"][0]["redis"], "pushed", "{doc}");
    doc
}

async fn watch(sync: &SyncService, service: &str) -> Streaming<Snapshot> {
    CapacitySyncClient::connect(sync.url())
        .await
        .unwrap()
        .watch(WatchRequest {
            service: service.into(),
            node: "e2e".into(),
            last_version: 0,
        })
        .await
        .expect("Watch")
        .into_inner()
}

/// Waits for a non-heartbeat, non-stale snapshot with this capacity of /predict.
async fn capacity_arrives(stream: &mut Streaming<Snapshot>, capacity: u32, sync: &SyncService) {
    let found = timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(s)) if !s.heartbeat && !s.stale => {
                    if s.endpoints
                        .iter()
                        .any(|e| e.path == "/predict" && e.capacity == capacity)
                    {
                        return;
                    }
                }
                Ok(Some(_)) => {}
                other => panic!("stream ended: {other:?}"),
            }
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "capacity {capacity} never arrived; sync's log:\n{}",
        sync.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prober_and_sync_through_a_tls_redis_with_client_certificates() {
    let redis = TlsRedis::start();
    let scratch = ScratchDir::new("redis-tls-e2e");
    let f = redis.files().clone();
    let (ca, cert, key) = (
        f.ca.to_string_lossy().into_owned(),
        f.client_cert.to_string_lossy().into_owned(),
        f.client_key.to_string_lossy().into_owned(),
    );
    let tls = [
        "--redis-ca",
        &ca,
        "--redis-cert",
        &cert,
        "--redis-key",
        &key,
    ];

    // Without the CA, the server's certificate is not trusted: exit 5.
    let out = push(&config(&scratch, "tlsdemo", 3), &redis.url(), &[]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("cannot connect to Redis at rediss://127.0.0.1:"),
        "{said}"
    );
    // The CA alone: the server wants a client certificate.
    let out = push(
        &config(&scratch, "tlsdemo", 3),
        &redis.url(),
        &["--redis-ca", &ca],
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    // CA and client certificate: pushed, and really in Redis.
    pushed(&push(&config(&scratch, "tlsdemo", 3), &redis.url(), &tls));
    let key_name = capacity_key("tlsdemo", "/predict");
    assert_eq!(redis.cli(&["HGET", &key_name, "capacity"]).unwrap(), "3");

    let url = redis.url();
    let mut args = vec!["--redis", url.as_str()];
    args.extend_from_slice(&tls);
    args.extend_from_slice(&["--resync-interval", "30s"]);
    let sync = SyncService::start_with(&args, &[]);
    let mut stream = watch(&sync, "tlsdemo").await;
    capacity_arrives(&mut stream, 3, &sync).await;
    // A new push reaches the watcher through the TLS subscription (the
    // resync is 30 s away).
    pushed(&push(&config(&scratch, "tlsdemo", 5), &redis.url(), &tls));
    capacity_arrives(&mut stream, 5, &sync).await;
    assert!(!sync.log().contains("Redis unreachable"), "{}", sync.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prober_and_sync_through_a_three_node_redis_cluster() {
    let cluster = RedisCluster::start();
    let scratch = ScratchDir::new("redis-cluster-e2e");
    // Every key of a service is in one slot (the hash tag), so the
    // prober's MULTI and sync's reads stay on one node.
    let slot = cluster.slot(&capacity_key("clusterdemo", "/predict"));
    for key in [
        endpoints_key("clusterdemo"),
        version_key("clusterdemo"),
        updates_channel("clusterdemo"),
        capacity_key("clusterdemo", "/other/path"),
    ] {
        assert_eq!(cluster.slot(&key), slot, "{key}");
    }

    // The node list: a cluster.
    let nodes = cluster.urls();
    pushed(&push(&config(&scratch, "clusterdemo", 4), &nodes, &[]));
    let key_name = capacity_key("clusterdemo", "/predict");
    for &port in cluster.ports() {
        // Any node answers, following the redirection to the slot's owner.
        assert_eq!(
            cluster.cli(port, &["HGET", &key_name, "capacity"]).unwrap(),
            "4"
        );
    }
    // One node plus --redis-cluster: the same cluster.
    let first = nodes.split(',').next().unwrap().to_string();
    pushed(&push(
        &config(&scratch, "clusterdemo", 6),
        &first,
        &["--redis-cluster"],
    ));

    let sync = SyncService::start_with(&["--redis", &nodes, "--resync-interval", "30s"], &[]);
    let mut stream = watch(&sync, "clusterdemo").await;
    capacity_arrives(&mut stream, 6, &sync).await;
    // A push lands on the slot's node; its update message reaches sync's
    // subscription on another node through the cluster bus.
    pushed(&push(&config(&scratch, "clusterdemo", 2), &nodes, &[]));
    capacity_arrives(&mut stream, 2, &sync).await;

    let single = SyncService::start_with(
        &[
            "--redis",
            &first,
            "--redis-cluster",
            "--resync-interval",
            "30s",
        ],
        &[],
    );
    let mut stream = watch(&single, "clusterdemo").await;
    capacity_arrives(&mut stream, 2, &single).await;
    drop(cluster);
}
