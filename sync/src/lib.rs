//! sluice-sync: streams the capacities in Redis to every Envoy's Sluice
//! filter over gRPC (`sluice.sync.v1.CapacitySync`, docs/sync.md).
//!
//! `main.rs` only parses arguments and calls [`run`]. The parts:
//! [`redis_source`] reads Redis into per-service views held by
//! [`services`]; [`grpc`] streams them; [`snapshots`] holds the rules
//! (versions, bad records, staleness) as pure code; [`auth`] checks the
//! optional token; [`discovery`] (DNS) and [`kube_discovery`] (Kubernetes
//! EndpointSlices) find instance sets; [`metrics`] serves Prometheus
//! metrics; [`shares`] is the allocator of shares among Envoy replicas,
//! [`share_stream`] its RPC.

pub mod allocator;
pub mod api;
pub mod auth;
pub mod cli;
pub mod discovery;
pub mod grpc;
pub mod kube_discovery;
pub mod logging;
pub mod metrics;
pub mod redis_conn;
pub mod redis_source;
pub mod services;
pub mod share_stream;
pub mod shares;
pub mod snapshots;

use anyhow::Context;
use api::capacity_sync_server::CapacitySyncServer;
use auth::TokenCheck;
use cli::{Opts, Settings};
use grpc::CapacitySyncService;
use redis_source::RedisSource;
use services::{stopping, Services};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, warn};

/// How long open connections get to close after the streams were ended on
/// shutdown (a health `Watch` never ends by itself).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// HTTP/2 pings, so a vanished Envoy's stream is noticed and dropped.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit status for bad settings, like clap's usage errors.
pub const EXIT_USAGE: u8 = 2;

/// The exit status for an error that ended [`run`].
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    let usage = e
        .chain()
        .any(|cause| cause.is::<cli::SettingsError>() || cause.is::<logging::LoggingError>());
    if usage {
        EXIT_USAGE
    } else {
        1
    }
}

pub fn run(opts: Opts) -> anyhow::Result<()> {
    logging::init()?;
    let settings = Settings::from_opts(&opts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(serve(settings))
}

/// Serves until SIGTERM or Ctrl-C.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    // No Kubernetes credentials is a setting to fix, said before anything
    // starts (exit 2).
    let kube = if settings.kubernetes.is_empty() {
        None
    } else {
        let client = kube_discovery::client()
            .await
            .map_err(cli::SettingsError::Discovery)?;
        Some(client)
    };
    let incoming = TcpIncoming::bind(settings.listen)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("--listen {}: cannot listen", settings.listen))?
        // Snapshots are small and must leave at once.
        .with_nodelay(Some(true));
    let addr = incoming.local_addr().context("listening address")?;
    let clients = settings
        .redis
        .clients()
        .with_context(|| "--redis: cannot use these Redis settings".to_string())?;
    let shown_url = sluice_core::redact::redact_urls(&settings.redis_url);

    let (services, requests) = Services::new(settings.max_services);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    tokio::spawn(follow_redis_in_health(
        services.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let source = RedisSource::new(
        clients,
        shown_url.clone(),
        services.clone(),
        requests,
        settings.resync_interval,
        settings.forget_after,
    );
    let source = tokio::spawn(source.run(shutdown.clone()));
    if let Some(discovery) = settings.discovery.clone() {
        tokio::spawn(discovery::run(
            discovery,
            services.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(client) = kube {
        tokio::spawn(kube_discovery::run(
            settings.kubernetes.clone(),
            client,
            services.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(metrics_addr) = settings.metrics_addr {
        let listener = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("--metrics-addr {metrics_addr}: cannot listen"))?;
        let bound = listener.local_addr().context("metrics address")?;
        info!(metrics = %bound, "serving Prometheus metrics at /metrics");
        tokio::spawn(metrics::serve(listener, services.clone(), shutdown.clone()));
    }
    let mut election_task = None;
    let shares = match &settings.advertise {
        Some(me) => {
            let clients = settings.redis.clients().context("Redis")?;
            let election = allocator::Election::new(clients, me.clone(), settings.allocator_lease);
            election_task = Some(tokio::spawn(election.clone().run(shutdown.clone())));
            info!(advertise = %me, lease = ?settings.allocator_lease,
                  "several replicas: one allocates each service's shares, the others forward to it");
            share_stream::ShareHub::with_election(
                services.clone(),
                settings.shares,
                election,
                settings.token.clone(),
            )
        }
        None => share_stream::ShareHub::new(services.clone(), settings.shares),
    };
    tokio::spawn(shares.clone().run(shutdown.clone()));
    let sync_service = CapacitySyncService::new(
        services,
        shares,
        settings.heartbeat_interval,
        shutdown.clone(),
    );
    // grpcurl and friends list and call the services without the .proto.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection")?;

    // The harness (and people) learn a `--listen ...:0` port from this line.
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    info!(
        listen = %addr, redis = %shown_url, redis_cluster = settings.redis.cluster,
        redis_tls = settings.redis.urls[0].starts_with("rediss://"), token_required = settings.token.is_some(),
        max_services = settings.max_services, forget_after = ?settings.forget_after,
        share_lease_ms = settings.shares.lease_ms, share_fallback_for_ms = settings.shares.fallback_for_ms,
        share_min = settings.shares.min_share,
        "sluice-sync serving"
    );

    tokio::spawn(async move {
        let signal = shutdown_signal().await;
        info!(signal, "shutting down: ending every stream");
        let _ = shutdown_tx.send(true);
    });
    let mut stop = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        // Reflection stays open too: it describes the API, it serves no data.
        .add_service(reflection)
        // Health stays open: probes carry no token.
        .add_service(CapacitySyncServer::with_interceptor(
            sync_service,
            TokenCheck::new(settings.token.clone()),
        ))
        .serve_with_incoming_shutdown(incoming, async move { stopping(&mut stop).await });
    let mut grace = shutdown.clone();
    tokio::select! {
        result = server => result.context("gRPC server failed")?,
        _ = async {
            stopping(&mut grace).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period: closing them"),
    }
    let _ = source.await;
    // Its leases deleted, so another replica allocates at once (bounded:
    // a dead Redis must not hold the exit).
    if let Some(task) = election_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    info!("stopped");
    Ok(())
}

/// The health of `sluice.sync.v1.CapacitySync` and of the server as a whole
/// (`""`) is Redis's: SERVING while it answers, NOT_SERVING while it does
/// not and once shutting down.
async fn follow_redis_in_health(
    services: Arc<Services>,
    health: HealthReporter,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut redis_up = services.subscribe_redis_up();
    loop {
        let up = *redis_up.borrow_and_update();
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&health, status).await;
        tokio::select! {
            changed = redis_up.changed() => if changed.is_err() { break },
            _ = stopping(&mut shutdown) => break,
        }
    }
    set_health(&health, ServingStatus::NotServing).await;
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(sluice_core::sync_api::SERVICE_NAME, status)
        .await;
}

/// Waits for SIGTERM or Ctrl-C (SIGINT) and names it.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
