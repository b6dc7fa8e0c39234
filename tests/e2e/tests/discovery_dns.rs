//! DNS discovery: a real `dnsmasq` on a loopback port, the real
//! `sluice-sync` resolving through it (`--discover`, `--dns-server`), a
//! real `redis-server` holding per-instance capacities written by the
//! prober's own Redis code. The Watch stream must show the instances from
//! DNS, an added record within the interval + 1 s, a removed one gone, the
//! per-instance figures from Redis, and a dead DNS server keep the last set
//! (stale), never an empty one.

use sluice_core::capacity_record::{CapacityRecord, InstanceCapacities, Source};
use sluice_core::sync_api::{Snapshot, WatchRequest};
use sluice_harness::{free_port, http, wait_until, Dnsmasq, Redis, SyncService};
use sluice_prober::redis_records::RedisRecords;
use sluice_sync::api::capacity_sync_client::CapacitySyncClient;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::time::timeout;
use tonic::Streaming;

const SERVICE: &str = "fleet";
const NAME: &str = "backend.fleet.test";
const INTERVAL: Duration = Duration::from_millis(500);
const WAIT: Duration = Duration::from_secs(5);

fn put(redis: &Redis, capacity: u32, instances: &[(&str, u32)]) {
    let record = CapacityRecord {
        capacity,
        p99_ms: None,
        rps: None,
        error_rate: None,
        measured_at: 1_763_842_052,
        source: Source::Probe,
    };
    let instances: InstanceCapacities =
        instances.iter().map(|(a, c)| (a.to_string(), *c)).collect();
    RedisRecords::connect(&redis.url(), SERVICE)
        .expect("connect to Redis")
        .put_with_instances("/predict", &record, &instances)
        .expect("prober put");
}

fn addresses(s: &Snapshot) -> Vec<&str> {
    s.instances.iter().map(|i| i.address.as_str()).collect()
}

/// Each instance's `/predict` figure (0: none, the endpoint's applies).
fn figures(s: &Snapshot) -> Vec<(&str, u32)> {
    s.instances
        .iter()
        .map(|i| {
            let c = i
                .capacities
                .iter()
                .find(|c| c.path == "/predict")
                .map_or(0, |c| c.capacity);
            (i.address.as_str(), c)
        })
        .collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_streams_the_instances_dns_gives_with_their_capacities() {
    let redis = Redis::start();
    put(&redis, 4, &[("127.0.0.2:8080", 8)]);
    let mut dns = Dnsmasq::start(&[(NAME, "127.0.0.1"), (NAME, "127.0.0.2"), (NAME, "::1")]);
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (metrics_arg, dns_arg) = (metrics.to_string(), dns.addr().to_string());
    let discover = format!("{SERVICE}={NAME}:8080");
    let sync = SyncService::start(
        &redis.url(),
        &[
            "--discover",
            &discover,
            "--dns-server",
            &dns_arg,
            "--dns-interval",
            "500ms",
            "--metrics-addr",
            &metrics_arg,
        ],
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

    // The set DNS gives, sorted, each with its figure from Redis.
    let first = wait_for(&mut stream, WAIT, "holds the three instances", |s| {
        s.discovered && s.instances.len() == 3
    })
    .await;
    assert_eq!(
        figures(&first),
        [
            ("127.0.0.1:8080", 0),
            ("127.0.0.2:8080", 8),
            ("[::1]:8080", 0)
        ]
    );
    assert!(!first.stale);
    assert_eq!(first.endpoints[0].capacity, 4);
    assert_eq!(first.instances[1].capacities[0].source, "probe");

    // One more record: streamed within the interval (plus the lookup) + 1 s,
    // under a newer version.
    dns.set_records(&[
        (NAME, "127.0.0.1"),
        (NAME, "127.0.0.2"),
        (NAME, "127.0.0.3"),
        (NAME, "::1"),
    ]);
    let added_at = Instant::now();
    let grown = wait_for(
        &mut stream,
        INTERVAL + Duration::from_secs(1),
        "has 127.0.0.3",
        |s| addresses(s).contains(&"127.0.0.3:8080"),
    )
    .await;
    eprintln!("an added record streamed after {:?}", added_at.elapsed());
    assert!(
        grown.version > first.version,
        "{} then {}",
        first.version,
        grown.version
    );
    assert_eq!(
        addresses(&grown),
        [
            "127.0.0.1:8080",
            "127.0.0.2:8080",
            "127.0.0.3:8080",
            "[::1]:8080"
        ]
    );

    // One gone: it disappears, the others stay.
    dns.set_records(&[(NAME, "127.0.0.2"), (NAME, "127.0.0.3"), (NAME, "::1")]);
    let removed_at = Instant::now();
    let shrunk = wait_for(
        &mut stream,
        INTERVAL + Duration::from_secs(1),
        "lost 127.0.0.1",
        |s| !addresses(s).contains(&"127.0.0.1:8080"),
    )
    .await;
    eprintln!("a removed record streamed after {:?}", removed_at.elapsed());
    assert_eq!(
        addresses(&shrunk),
        ["127.0.0.2:8080", "127.0.0.3:8080", "[::1]:8080"]
    );
    assert!(shrunk.version > grown.version);

    // A new per-instance figure in Redis reaches the discovered instances.
    put(&redis, 4, &[("127.0.0.2:8080", 8), ("127.0.0.3:8080", 2)]);
    let measured = wait_for(&mut stream, WAIT, "has 127.0.0.3's figure", |s| {
        figures(s).contains(&("127.0.0.3:8080", 2))
    })
    .await;
    assert_eq!(
        figures(&measured),
        [
            ("127.0.0.2:8080", 8),
            ("127.0.0.3:8080", 2),
            ("[::1]:8080", 0)
        ]
    );
    let series = format!("sluice_sync_discovered_instances{{sluice_service=\"{SERVICE}\"}}");
    tokio::task::spawn_blocking(move || {
        wait_until(WAIT, "discovered_instances 3", || {
            (sample(metrics, &series) == Some(3.0)).then_some(())
        })
    })
    .await
    .unwrap();

    // DNS gone: the last set stays, said to be stale; never an empty set.
    dns.kill();
    let stale = wait_for(&mut stream, Duration::from_secs(8), "is stale", |s| s.stale).await;
    assert_eq!(figures(&stale), figures(&measured), "the last set is kept");
    let stale_series = format!("sluice_sync_discovery_stale{{sluice_service=\"{SERVICE}\"}}");
    assert_eq!(sample(metrics, &stale_series), Some(1.0));
    assert!(
        sync.log().contains("keeping the last instance set (stale)"),
        "{}",
        sync.log()
    );
    // Heartbeats keep saying so, and nothing empties the set meanwhile.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match timeout(Duration::from_secs(3), stream.message()).await {
            Ok(Ok(Some(s))) => {
                assert!(s.stale, "{s:?}");
                assert!(s.heartbeat || s.instances.len() == 3, "{s:?}");
            }
            other => panic!("the stream ended: {other:?}"),
        }
    }
}
