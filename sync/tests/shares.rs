//! The Share RPC end to end: sluice-sync in-process (`serve`, the same code
//! the binary runs) on a real `redis-server`, and three tonic clients
//! acting as Envoys. Each applies its grants and leases as the filter must
//! (docs/sync.md, "Shares among Envoy replicas"), reports what it enforces
//! and its demand every 200 ms and at once when its demand changes, and
//! after every grant any of them receives, what they may all admit (each
//! one's latest grant, under its own lease) must fit every pool.

use sluice_core::sync_api::{FetchRequest, PoolDemand, ShareGrant, ShareReport, StreamRef};
use sluice_harness::{free_port, http, Redis};
use sluice_sync::api::capacity_sync_client::CapacitySyncClient;
use sluice_sync::cli::{Opts, Settings};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use clap::Parser;

const SERVICE: &str = "shared";
const PATH: &str = "/p";
const CAPACITY: u32 = 12;
/// The filter side's statically configured instances (not discovered):
/// sync learns them from the reports and gives each the endpoint's capacity.
const INSTANCES: [&str; 2] = ["10.0.0.1:80", "10.0.0.2:80"];
const REPORT_INTERVAL: Duration = Duration::from_millis(200);

type Pool = (String, String);

fn pools() -> Vec<Pool> {
    INSTANCES
        .iter()
        .map(|a| (PATH.to_string(), a.to_string()))
        .collect()
}

/// Writes the endpoint's capacity as the prober does (record, endpoint set,
/// version, update message).
fn put_capacity(redis: &Redis, capacity: u32) {
    let key = format!("sluice:{{{SERVICE}}}:capacity:{PATH}");
    let capacity = capacity.to_string();
    redis.command(&[
        "HSET",
        &key,
        "capacity",
        &capacity,
        "source",
        "manual",
        "measured_at",
        "1763842052",
    ]);
    redis.command(&["SADD", &format!("sluice:{{{SERVICE}}}:endpoints"), PATH]);
    redis.command(&["INCR", &format!("sluice:{{{SERVICE}}}:version")]);
    redis.command(&["PUBLISH", &format!("sluice:{{{SERVICE}}}:updates"), "{}"]);
}

struct Sync {
    addr: SocketAddr,
    /// `--metrics-addr` (the in-process one; the binary's tests do not scrape).
    metrics: SocketAddr,
    /// About when it started: its allocator's restart grace runs from here.
    started: Instant,
}

async fn start_sync(redis: &Redis, lease: &str, fallback_for: &str) -> Sync {
    start_sync_with(redis, lease, fallback_for, &[]).await
}

async fn start_sync_with(redis: &Redis, lease: &str, fallback_for: &str, more: &[&str]) -> Sync {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (addr_text, metrics_text, url) = (addr.to_string(), metrics.to_string(), redis.url());
    let mut args = vec![
        "sluice-sync",
        "--listen",
        &addr_text,
        "--metrics-addr",
        &metrics_text,
        "--redis",
        &url,
        "--share-lease",
        lease,
        "--share-fallback-for",
        fallback_for,
    ];
    args.extend(more);
    let opts = Opts::try_parse_from(args).expect("flags");
    let settings = Settings::from_opts(&opts).expect("settings");
    let started = Instant::now();
    tokio::spawn(async move {
        if let Err(e) = sluice_sync::serve(settings).await {
            panic!("sluice-sync failed: {e:#}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while CapacitySyncClient::connect(format!("http://{addr}"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "sluice-sync did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Sync {
        addr,
        metrics,
        started,
    }
}

async fn client(sync: &Sync) -> CapacitySyncClient<Channel> {
    CapacitySyncClient::connect(format!("http://{}", sync.addr))
        .await
        .expect("connect to sluice-sync")
}

/// One Envoy as the filter must behave.
#[derive(Default)]
struct EnvoyState {
    seq: u64,
    applied: u64,
    shares: BTreeMap<Pool, u32>,
    lease_end: Option<Instant>,
    fallback_for: Duration,
    watchers: u32,
    /// When each recent report was sent: a lease runs from there.
    sent_at: BTreeMap<u64, Instant>,
    /// Requests that want a slot of each pool.
    demand: u32,
    /// Limits set to 0 before the final report.
    leaving: bool,
    stream: Option<StreamRef>,
    /// After a reconnect, until the new stream's first grant.
    replaces: Option<StreamRef>,
    grants: u64,
}

impl EnvoyState {
    /// What it may admit in `pool` at `now`: `Grant::limit` of shares.rs.
    fn limit(&self, pool: &Pool, now: Instant) -> u32 {
        let share = self.shares.get(pool).copied().unwrap_or(0);
        match self.lease_end {
            _ if self.leaving => 0,
            Some(end) if now < end => share,
            Some(end) if now < end + self.fallback_for => {
                share.min(CAPACITY / self.watchers.max(1))
            }
            _ => 0,
        }
    }

    fn report(&mut self, now: Instant) -> ShareReport {
        self.seq += 1;
        self.sent_at.insert(self.seq, now);
        while self.sent_at.len() > 64 {
            self.sent_at.pop_first();
        }
        let pools = pools()
            .into_iter()
            .map(|pool| {
                let holding = self.limit(&pool, now);
                let in_flight = self.demand.min(holding);
                PoolDemand {
                    path: pool.0,
                    address: pool.1,
                    holding,
                    in_flight,
                    queued: self.demand - in_flight,
                }
            })
            .collect();
        ShareReport {
            service: SERVICE.into(),
            node: "test-envoy".into(),
            seq: self.seq,
            applied_version: self.applied,
            sent_at_unix_ms: 0,
            replaces: self.replaces,
            r#final: self.leaving,
            pools,
        }
    }

    fn take(&mut self, grant: &ShareGrant) {
        self.grants += 1;
        if grant.share_version < self.applied {
            return;
        }
        if let Some(&sent) = self.sent_at.get(&grant.lease_for_seq) {
            self.lease_end = Some(sent + Duration::from_millis(grant.lease_ms));
        }
        self.replaces = None;
        self.fallback_for = Duration::from_millis(grant.fallback_for_ms);
        self.watchers = grant.watchers;
        self.stream = grant.stream;
        if grant.share_version > self.applied {
            self.applied = grant.share_version;
            self.shares = grant
                .shares
                .iter()
                .map(|s| ((s.path.clone(), s.address.clone()), s.share))
                .collect();
        }
    }
}

#[derive(Default)]
struct World {
    envoys: Vec<EnvoyState>,
    checks: u64,
    most: BTreeMap<Pool, u32>,
    violations: Vec<String>,
}

impl World {
    /// What every Envoy may admit, under each one's latest grant and lease.
    fn check(&mut self, now: Instant) {
        self.checks += 1;
        for pool in pools() {
            let limits: Vec<u32> = self.envoys.iter().map(|e| e.limit(&pool, now)).collect();
            let sum: u32 = limits.iter().sum();
            let most = self.most.entry(pool.clone()).or_default();
            *most = (*most).max(sum);
            if sum > CAPACITY {
                self.violations.push(format!(
                    "{pool:?}: the Envoys may admit {limits:?}, above {CAPACITY}"
                ));
            }
        }
    }

    fn share(&self, envoy: usize, pool: &Pool) -> u32 {
        self.envoys[envoy].shares.get(pool).copied().unwrap_or(0)
    }
}

type Shared = Arc<Mutex<World>>;

struct Envoy {
    index: usize,
    reports: mpsc::Sender<ShareReport>,
    report_now: Arc<Notify>,
    reporter: JoinHandle<()>,
    receiver: JoinHandle<()>,
}

impl Envoy {
    async fn connect(sync: &Sync, world: &Shared) -> Envoy {
        let index = {
            let mut w = world.lock().unwrap();
            w.envoys.push(EnvoyState::default());
            w.envoys.len() - 1
        };
        Envoy::open(sync, world, index).await
    }

    /// Its stream reset, it opens a new one, keeping its grant and lease
    /// until the new stream's first grant and naming the old stream until
    /// then (versions start again per stream).
    async fn reconnect(self, sync: &Sync, world: &Shared) -> Envoy {
        self.reporter.abort();
        self.receiver.abort();
        let _ = (self.reporter.await, self.receiver.await);
        {
            let mut w = world.lock().unwrap();
            let e = &mut w.envoys[self.index];
            e.replaces = e.stream;
            e.applied = 0;
        }
        Envoy::open(sync, world, self.index).await
    }

    async fn open(sync: &Sync, world: &Shared, index: usize) -> Envoy {
        let (reports, rx) = mpsc::channel(16);
        let first = world.lock().unwrap().envoys[index].report(Instant::now());
        reports.send(first).await.unwrap();
        let mut grants = client(sync)
            .await
            .share(ReceiverStream::new(rx))
            .await
            .expect("Share stream")
            .into_inner();
        let w = world.clone();
        let receiver = tokio::spawn(async move {
            while let Ok(Some(grant)) = grants.message().await {
                let now = Instant::now();
                let mut w = w.lock().unwrap();
                w.envoys[index].take(&grant);
                w.check(now);
            }
        });
        let report_now = Arc::new(Notify::new());
        let (w, tx, notify) = (world.clone(), reports.clone(), report_now.clone());
        let reporter = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(REPORT_INTERVAL) => {}
                    _ = notify.notified() => {}
                }
                let report = w.lock().unwrap().envoys[index].report(Instant::now());
                if tx.send(report).await.is_err() {
                    return;
                }
            }
        });
        Envoy {
            index,
            reports,
            report_now,
            reporter,
            receiver,
        }
    }

    /// Demand changed: the filter reports at once.
    fn demand(&self, world: &Shared, demand: u32) {
        world.lock().unwrap().envoys[self.index].demand = demand;
        self.report_now.notify_one();
    }

    /// Gone without a word (a cut-off or killed Envoy): the stream is reset,
    /// no final report. Returns when it sent its last report.
    fn drop_stream(self, world: &Shared) -> Instant {
        self.reporter.abort();
        self.receiver.abort();
        let w = world.lock().unwrap();
        *w.envoys[self.index].sent_at.values().last().unwrap()
    }

    /// Leaves: limits to 0, a final report, then the end of the stream.
    async fn leave(self, world: &Shared) {
        self.reporter.abort();
        let _ = self.reporter.await;
        let report = {
            let mut w = world.lock().unwrap();
            let e = &mut w.envoys[self.index];
            e.leaving = true;
            e.demand = 0;
            e.report(Instant::now())
        };
        self.reports.send(report).await.unwrap();
        drop(self.reports);
        let _ = self.receiver.await;
    }
}

/// Polls `check` every 10 ms until it holds; how long it took.
async fn within(
    timeout: Duration,
    what: &str,
    world: &Shared,
    check: impl Fn(&World) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if check(&world.lock().unwrap()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "not within {timeout:?}: {what}; shares {:?}",
            shares(world)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn shares(world: &Shared) -> Vec<Vec<u32>> {
    let w = world.lock().unwrap();
    (0..w.envoys.len())
        .map(|i| pools().iter().map(|p| w.share(i, p)).collect())
        .collect()
}

fn assert_never_above_capacity(world: &Shared) {
    let w = world.lock().unwrap();
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
    assert!(w.checks > 20, "only {} grants checked", w.checks);
    eprintln!(
        "checked after {} grants: the most the Envoys could admit at once per pool {:?} (capacity {CAPACITY})",
        w.checks, w.most
    );
}

/// Three Envoys, connected once sync served its restart grace, each
/// holding a third of every pool.
async fn three_even(sync: &Sync, world: &Shared, lease_and_fallback: Duration) -> Vec<Envoy> {
    let mut envoys = Vec::new();
    for _ in 0..3 {
        envoys.push(Envoy::connect(sync, world).await);
    }
    let grace_left = (sync.started + lease_and_fallback).saturating_duration_since(Instant::now());
    within(
        grace_left + Duration::from_secs(3),
        "an even split",
        world,
        |w| (0..3).all(|i| pools().iter().all(|p| w.share(i, p) == CAPACITY / 3)),
    )
    .await;
    envoys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_the_demand_on_one_of_three_gets_nine_tenths_within_a_second() {
    let redis = Redis::start();
    put_capacity(&redis, CAPACITY);
    let sync = start_sync(&redis, "1s", "0s").await;
    let world = Shared::default();
    let envoys = three_even(&sync, &world, Duration::from_secs(1)).await;

    envoys[0].demand(&world, 30);
    let took = within(
        Duration::from_secs(1),
        "the busy one at ≥ 90 %",
        &world,
        |w| pools().iter().all(|p| w.share(0, p) * 10 >= CAPACITY * 9),
    )
    .await;
    eprintln!("all the demand on one: ≥ 90 % of every pool after {took:?}");
    // And it keeps it while the others stay idle.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(shares(&world)[0], vec![CAPACITY; 2]);

    // The demand moves to another: the shares follow.
    envoys[0].demand(&world, 0);
    envoys[2].demand(&world, 30);
    let took = within(
        Duration::from_secs(1),
        "the new busy one at ≥ 90 %",
        &world,
        |w| pools().iter().all(|p| w.share(2, p) * 10 >= CAPACITY * 9),
    )
    .await;
    eprintln!("demand moved: ≥ 90 % after {took:?}");

    // Fetch shows the whole assignment, the metrics the sums.
    let snapshot = client(&sync)
        .await
        .fetch(FetchRequest {
            service: SERVICE.into(),
        })
        .await
        .expect("Fetch")
        .into_inner();
    assert_eq!(snapshot.assignment.len(), 2, "{:?}", snapshot.assignment);
    for (pool, address) in snapshot.assignment.iter().zip(INSTANCES) {
        assert_eq!((pool.path.as_str(), pool.address.as_str()), (PATH, address));
        assert_eq!(pool.capacity, CAPACITY);
        assert_eq!(pool.unaccounted, 0);
        assert_eq!(pool.watchers.len(), 3);
        assert!(pool
            .watchers
            .iter()
            .all(|w| w.connected && w.node == "test-envoy"));
        assert!(pool.granted <= CAPACITY);
        assert_eq!(
            pool.granted,
            pool.watchers.iter().map(|w| w.share).sum::<u32>()
        );
        assert!(
            pool.watchers.iter().any(|w| w.queued > 0 && w.share >= 11),
            "{pool:?}"
        );
    }
    let metrics = sync.metrics;
    let text = tokio::task::spawn_blocking(move || http::get(metrics, "/metrics").unwrap().text())
        .await
        .unwrap();
    for line in [
        "sluice_sync_share_watchers{sluice_service=\"shared\"} 3".to_string(),
        format!(
            "sluice_sync_share_capacity{{sluice_service=\"shared\",path=\"/p\",address=\"{}\"}} 12",
            INSTANCES[0]
        ),
        format!(
            "sluice_sync_share_pool_watchers{{sluice_service=\"shared\",path=\"/p\",address=\"{}\"}}",
            INSTANCES[1]
        ),
        format!(
            "sluice_sync_share_granted{{sluice_service=\"shared\",path=\"/p\",address=\"{}\"}}",
            INSTANCES[1]
        ),
        format!(
            "sluice_sync_share_unaccounted{{sluice_service=\"shared\",path=\"/p\",address=\"{}\"}} 0",
            INSTANCES[1]
        ),
    ] {
        assert!(text.lines().any(|l| l.starts_with(&line)), "no {line:?} in:\n{text}");
    }
    assert_never_above_capacity(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_envoy_keeps_its_slots_until_lease_and_fallback_then_the_others_get_them() {
    let redis = Redis::start();
    put_capacity(&redis, CAPACITY);
    let (lease, fallback_for) = (Duration::from_millis(1000), Duration::from_millis(500));
    let sync = start_sync(&redis, "1s", "500ms").await;
    let world = Shared::default();
    let mut envoys = three_even(&sync, &world, lease + fallback_for).await;
    for e in &envoys {
        e.demand(&world, 20);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(shares(&world), vec![vec![4, 4], vec![4, 4], vec![4, 4]]);

    let last_report = envoys.pop().unwrap().drop_stream(&world);
    // Sync counts it until its last report's receipt + lease + fallback,
    // which is no earlier than this.
    let counted_until = last_report + lease + fallback_for;
    while Instant::now() + Duration::from_millis(50) < counted_until {
        let s = shares(&world);
        for pool in 0..2 {
            assert!(
                s[0][pool] + s[1][pool] <= CAPACITY - 4,
                "the dropped one's slots were handed out before its lease and fallback ran out: {s:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = within(
        Duration::from_secs(2),
        "the two left share the whole capacity",
        &world,
        |w| {
            pools()
                .iter()
                .all(|p| w.share(0, p) + w.share(1, p) == CAPACITY)
        },
    )
    .await;
    eprintln!(
        "dropped: its slots went to the others {:?} after its last report (lease + fallback {:?}; waited {took:?} past it)",
        last_report.elapsed(),
        lease + fallback_for
    );
    assert_never_above_capacity(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_report_frees_the_slots_at_once() {
    let redis = Redis::start();
    put_capacity(&redis, CAPACITY);
    // A long lease: freeing within it can only be the final report.
    let lease = Duration::from_secs(3);
    let sync = start_sync(&redis, "3s", "0s").await;
    let world = Shared::default();
    let mut envoys = three_even(&sync, &world, lease).await;
    for e in &envoys {
        e.demand(&world, 20);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leaving = envoys.pop().unwrap();
    let left = Instant::now();
    leaving.leave(&world).await;
    let took = within(
        Duration::from_secs(1),
        "the two left share the whole capacity",
        &world,
        |w| {
            pools()
                .iter()
                .all(|p| w.share(0, p) + w.share(1, p) == CAPACITY)
        },
    )
    .await;
    eprintln!(
        "left gracefully: its slots went to the others {took:?} after it left (lease {lease:?})"
    );
    assert!(left.elapsed() < lease);
    assert_never_above_capacity(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_needs_the_token_as_watch_does() {
    let redis = Redis::start();
    put_capacity(&redis, CAPACITY);
    let dir = sluice_harness::ScratchDir::new("share-token");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-share-token\n").unwrap();
    let token_path = token_file.display().to_string();
    let sync = start_sync_with(&redis, "1s", "0s", &["--token-file", &token_path]).await;
    let report = EnvoyState::default().report(Instant::now());
    let refused = client(&sync)
        .await
        .share(tokio_stream::iter([report.clone()]))
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    let mut request =
        tonic::Request::new(tokio_stream::iter([report]).chain(tokio_stream::pending()));
    request.metadata_mut().insert(
        "authorization",
        "Bearer s3cret-share-token".parse().unwrap(),
    );
    let mut grants = client(&sync)
        .await
        .share(request)
        .await
        .expect("the right token")
        .into_inner();
    // Within the restart grace: the first report is answered, with nothing.
    let grant = tokio::time::timeout(Duration::from_secs(3), grants.message())
        .await
        .expect("a grant within 3 s")
        .expect("no error")
        .expect("a grant");
    assert_eq!(grant.lease_for_seq, 1);
    assert_eq!(grant.lease_ms, 1000);
    assert!(grant.stream.is_some_and(|s| s.epoch > 0 && s.watcher > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_envoy_keeps_its_share_and_is_not_counted_twice() {
    let redis = Redis::start();
    put_capacity(&redis, CAPACITY);
    let sync = start_sync(&redis, "1s", "0s").await;
    let world = Shared::default();
    let mut envoys = three_even(&sync, &world, Duration::from_secs(1)).await;
    for e in &envoys {
        e.demand(&world, 20);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old_stream = world.lock().unwrap().envoys[2].stream.unwrap();
    let again = envoys.pop().unwrap().reconnect(&sync, &world).await;
    envoys.push(again);
    // The new stream's first grant gives it back what it holds; then the
    // old stream is forgotten, not counted beside it for a lease.
    within(
        Duration::from_secs(1),
        "a grant on the new stream",
        &world,
        |w| w.envoys[2].replaces.is_none() && w.envoys[2].stream != Some(old_stream),
    )
    .await;
    for _ in 0..50 {
        assert_eq!(
            shares(&world),
            vec![vec![4, 4], vec![4, 4], vec![4, 4]],
            "nobody lost a share to the reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot = client(&sync)
        .await
        .fetch(FetchRequest {
            service: SERVICE.into(),
        })
        .await
        .expect("Fetch")
        .into_inner();
    for pool in &snapshot.assignment {
        let streams: Vec<_> = pool.watchers.iter().map(|w| w.stream.unwrap()).collect();
        assert_eq!(streams.len(), 3, "{pool:?}");
        assert!(!streams.contains(&old_stream), "{pool:?}");
    }
    // Everyone keeps reporting: the shares stay even, nothing is stuck.
    envoys[1].demand(&world, 0);
    within(
        Duration::from_secs(1),
        "the idle one's share split among the busy two",
        &world,
        |w| {
            pools()
                .iter()
                .all(|p| w.share(0, p) == 6 && w.share(2, p) == 6)
        },
    )
    .await;
    assert_never_above_capacity(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_lowered_in_redis_lowers_the_shares() {
    let redis = Redis::start();
    put_capacity(&redis, CAPACITY);
    let sync = start_sync(&redis, "1s", "0s").await;
    let world = Shared::default();
    let envoys = three_even(&sync, &world, Duration::from_secs(1)).await;
    for e in &envoys {
        e.demand(&world, 20);
    }
    put_capacity(&redis, 6);
    within(Duration::from_secs(1), "shares of 2 each", &world, |w| {
        (0..3).all(|i| pools().iter().all(|p| w.share(i, p) == 2))
    })
    .await;
    put_capacity(&redis, CAPACITY);
    within(
        Duration::from_secs(1),
        "shares of 4 each again",
        &world,
        |w| (0..3).all(|i| pools().iter().all(|p| w.share(i, p) == 4)),
    )
    .await;
    // Checked against the higher capacity: never above it.
    assert_never_above_capacity(&world);
}

/// The real binary, so it can be killed (SIGKILL) and started again on the
/// same port.
struct SyncProcess {
    child: std::process::Child,
}

impl SyncProcess {
    fn start(redis: &Redis, addr: SocketAddr, lease: &str) -> SyncProcess {
        SyncProcess::start_with(redis, addr, lease, &[])
    }

    fn start_with(redis: &Redis, addr: SocketAddr, lease: &str, more: &[&str]) -> SyncProcess {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-sync"))
            .args(["--listen", &addr.to_string(), "--redis", &redis.url()])
            .args(["--share-lease", lease])
            .args(more)
            .env("SLUICE_LOG", "warn")
            .env_remove("SLUICE_REDIS_URL")
            .env_remove("SLUICE_CONFIG")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run sluice-sync");
        SyncProcess { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SyncProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while CapacitySyncClient::connect(format!("http://{addr}"))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "sluice-sync did not listen on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_killed_and_restarted_envoys_keep_their_shares_without_overshoot() {
    let redis = Redis::start();
    put_capacity(&redis, CAPACITY);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let lease = Duration::from_secs(2);
    let started = Instant::now();
    let mut process = SyncProcess::start(&redis, addr, "2s");
    listening(addr).await;
    let sync = Sync {
        addr,
        metrics: addr,
        started,
    };
    let world = Shared::default();
    let mut envoys = three_even(&sync, &world, lease).await;
    for e in &envoys {
        e.demand(&world, 20);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(shares(&world), vec![vec![4, 4], vec![4, 4], vec![4, 4]]);
    let old_epoch = world.lock().unwrap().envoys[0].stream.unwrap().epoch;

    process.kill();
    let restarted = Instant::now();
    let _process = SyncProcess::start(&redis, addr, "2s");
    listening(addr).await;
    let sync = Sync {
        addr,
        metrics: addr,
        started: restarted,
    };
    let mut again = Vec::new();
    for e in envoys.drain(..) {
        again.push(e.reconnect(&sync, &world).await);
    }
    // Each keeps its share through the restart: the new sync grants back
    // what they report holding, and nothing else during its grace.
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        assert_eq!(
            shares(&world),
            vec![vec![4, 4], vec![4, 4], vec![4, 4]],
            "a share changed across the restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let w = world.lock().unwrap();
        assert!(
            w.envoys
                .iter()
                .all(|e| e.stream.is_some_and(|s| s.epoch != old_epoch)),
            "every Envoy holds a grant of the new sync"
        );
    }
    // After its grace, the shares follow the demand again.
    again[1].demand(&world, 0);
    within(
        lease + Duration::from_secs(2),
        "the idle one's share split among the busy two",
        &world,
        |w| {
            pools()
                .iter()
                .all(|p| w.share(0, p) == 6 && w.share(2, p) == 6)
        },
    )
    .await;
    eprintln!(
        "restarted: shares kept; the first move {:?} after the restart (grace = lease {lease:?})",
        restarted.elapsed()
    );
    assert_never_above_capacity(&world);
}

/// The service's allocator as Redis has it: the replica's address.
fn allocator(redis: &Redis) -> Option<String> {
    redis
        .command(&["GET", &format!("sluice:{{{SERVICE}}}:allocator")])
        .as_str()
}

/// Two replicas with --advertise: the first to see a Share stream of the
/// service allocates it, the other forwards its streams there, so the
/// Envoys of both share one allocator. The allocator SIGKILLed: its lease
/// runs out, the survivor takes it with a restart's grace, and at no moment
/// could the Envoys admit more than the capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_allocator_and_a_killed_one_hands_over_without_overshoot() {
    let redis = Redis::start();
    put_capacity(&redis, CAPACITY);
    let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (a_addr, b_addr) = (addr(), addr());
    let (a_text, b_text) = (a_addr.to_string(), b_addr.to_string());
    let lease = Duration::from_secs(2);
    let mut a = SyncProcess::start_with(
        &redis,
        a_addr,
        "2s",
        &["--advertise", &a_text, "--allocator-lease", "2s"],
    );
    let mut b_process = SyncProcess::start_with(
        &redis,
        b_addr,
        "2s",
        &["--advertise", &b_text, "--allocator-lease", "2s"],
    );
    listening(a_addr).await;
    listening(b_addr).await;
    let world = Shared::default();
    let at = |addr, started| Sync {
        addr,
        metrics: addr,
        started,
    };
    let first = Envoy::connect(&at(a_addr, Instant::now()), &world).await;
    let took = Instant::now();
    let waited = within(Duration::from_secs(3), "a grant from A", &world, |w| {
        w.envoys[0].grants > 0
    })
    .await;
    assert_eq!(allocator(&redis).as_deref(), Some(a_text.as_str()));
    eprintln!("A allocates after {waited:?}");
    let mut envoys = vec![first];
    for _ in 0..2 {
        envoys.push(Envoy::connect(&at(b_addr, Instant::now()), &world).await);
    }
    // A's allocator started when it took the lease: after its grace, an
    // even split of every pool among the three, two of them through B.
    let grace_left = (took + lease).saturating_duration_since(Instant::now());
    within(
        grace_left + Duration::from_secs(3),
        "an even split",
        &world,
        |w| (0..3).all(|i| pools().iter().all(|p| w.share(i, p) == CAPACITY / 3)),
    )
    .await;
    let epochs: Vec<u64> = {
        let w = world.lock().unwrap();
        w.envoys.iter().map(|e| e.stream.unwrap().epoch).collect()
    };
    assert!(
        epochs.iter().all(|e| *e == epochs[0]),
        "one allocator for all three: {epochs:?}"
    );
    assert_eq!(
        allocator(&redis).as_deref(),
        Some(a_text.as_str()),
        "B forwards"
    );
    for e in &envoys {
        e.demand(&world, 20);
    }

    a.kill();
    let killed = Instant::now();
    // A's lease runs out in Redis within its 2 s; meanwhile the Envoys keep
    // what A granted, under their own leases.
    let expired = loop {
        if allocator(&redis).is_none() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(4),
            "A's lease never ran out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let b = at(b_addr, Instant::now());
    let mut again = Vec::new();
    for e in envoys.drain(..) {
        again.push(e.reconnect(&b, &world).await);
    }
    within(
        lease + Duration::from_secs(3),
        "B allocates an even split",
        &world,
        |w| {
            w.envoys
                .iter()
                .all(|e| e.stream.is_some_and(|s| s.epoch != epochs[0]))
                && (0..3).all(|i| pools().iter().all(|p| w.share(i, p) == CAPACITY / 3))
        },
    )
    .await;
    assert_eq!(allocator(&redis).as_deref(), Some(b_text.as_str()));
    eprintln!(
        "A killed: its lease gone after {expired:?}, B allocating an even split {:?} after the kill",
        killed.elapsed()
    );
    assert_never_above_capacity(&world);
    // Stopped (SIGTERM), a replica deletes its lease: the next one need
    // not wait for it to run out.
    let stopped = Instant::now();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &b_process.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    while allocator(&redis).is_some() {
        assert!(
            stopped.elapsed() < Duration::from_millis(1500),
            "B's lease outlived its SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("B stopped: its lease deleted after {:?}", stopped.elapsed());
    let _ = b_process.child.wait();
}
