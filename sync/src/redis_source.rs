//! The Redis side: one task that subscribes to every watched service's
//! updates channel and re-reads a service on each message, when a watcher
//! first names it, and every `resync_interval` (the backstop for a lost
//! message). When Redis goes away it marks every view stale, keeps serving
//! them, and reconnects with backoff. It forgets (and unsubscribes from) the
//! services nobody watched for the idle grace period. It only reads Redis,
//! except to raise a version counter below one it read itself (Redis lost
//! its data). Key layout: docs/redis-keys.md.

use crate::redis_conn::{Conn, RedisClients};
use crate::services::{stopping, Services};
use crate::snapshots::{DiscoveredSet, Outcome, RedisRead, ServiceState};
use futures_util::{FutureExt, StreamExt};
use redis::aio::PubSubSink;
use redis::{RedisError, Value};
use sluice_core::redis_keys::{capacity_key, endpoints_key, updates_channel, version_key};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, timeout, MissedTickBehavior};
use tracing::{debug, info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Also what a hung Redis costs before its views are marked stale (on the
/// next read).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Reads of one service whose endpoint set changed under them before we
/// take the last one (the write's own message triggers another read).
const READ_ATTEMPTS: usize = 4;
/// Raises of a version counter that keeps falling behind before we wait for
/// the next read.
const RAISE_ATTEMPTS: usize = 3;

pub struct RedisSource {
    clients: RedisClients,
    /// Sessions started, to rotate the subscription over the nodes given.
    sessions: usize,
    /// The URL without any password, for logs.
    shown_url: String,
    services: Arc<Services>,
    requests: mpsc::UnboundedReceiver<String>,
    resync_interval: Duration,
    forget_after: Duration,
    states: HashMap<String, ServiceState>,
}

/// Why a session with Redis ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Redis(#[from] RedisError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the subscription connection closed")]
    SubscriptionClosed,
}

/// Why one service could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("{key} is not an integer: {value:?}")]
    BadVersion { key: String, value: String },
}

impl RedisSource {
    pub fn new(
        clients: RedisClients,
        shown_url: String,
        services: Arc<Services>,
        requests: mpsc::UnboundedReceiver<String>,
        resync_interval: Duration,
        forget_after: Duration,
    ) -> RedisSource {
        RedisSource {
            shown_url,
            clients,
            sessions: 0,
            services,
            requests,
            resync_interval,
            forget_after,
            states: HashMap::new(),
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_FIRST;
        // One warning per outage, not one per reconnect attempt.
        let mut warned = false;
        loop {
            let result = self.session(&mut shutdown, &mut backoff).await;
            if *shutdown.borrow() {
                return;
            }
            let Err(error) = result else { return };
            let was_up = self.services.set_redis_up(false);
            self.mark_all_stale();
            if was_up || !warned {
                warn!(
                    redis = %self.shown_url, %error,
                    "Redis unreachable: serving the last snapshots as stale; reconnecting"
                );
                warned = true;
            } else {
                debug!(redis = %self.shown_url, %error, retry_in = ?backoff, "still no Redis");
            }
            let retry = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(retry) => break,
                    _ = sleep(self.sweep_interval()) => self.forget_idle(),
                    // A discovered set changed: its watchers get it now,
                    // over the last records read (stale).
                    Some(service) = self.requests.recv() => self.rediscover(&service),
                    _ = stopping(&mut shutdown) => return,
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Connects, subscribes, reads everything, then follows changes until
    /// the connection fails (`Err`) or shutdown (`Ok`).
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Duration,
    ) -> Result<(), SessionError> {
        let mut conn = within(
            CONNECT_TIMEOUT * 2,
            self.clients.connect(CONNECT_TIMEOUT, RESPONSE_TIMEOUT),
        )
        .await?;
        self.sessions += 1;
        let pubsub = within(CONNECT_TIMEOUT, self.clients.pubsub(self.sessions - 1)).await?;
        let (mut sink, mut messages) = pubsub.split();

        // Subscribe before the first full read, so no change falls between.
        let mut channels: HashMap<String, String> = HashMap::new();
        while self.requests.try_recv().is_ok() {} // all of them are read below
        for service in self.services.names() {
            subscribe(&mut sink, &mut channels, &service).await?;
        }
        for service in self.services.names() {
            self.refresh(&mut conn, &service).await?;
        }
        self.services.set_redis_up(true);
        *backoff = BACKOFF_FIRST;
        info!(redis = %self.shown_url, services = channels.len(), "Redis reachable: serving fresh snapshots");

        let mut resync = tokio::time::interval_at(
            tokio::time::Instant::now() + self.resync_interval,
            self.resync_interval,
        );
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(self.sweep_interval());
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopping(shutdown) => return Ok(()),
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err(SessionError::SubscriptionClosed);
                    };
                    // One read per service for a burst of messages.
                    let heard_at = std::time::Instant::now();
                    let mut due = BTreeSet::new();
                    due.extend(channels.get(message.get_channel_name()).cloned());
                    while let Some(Some(message)) = messages.next().now_or_never() {
                        due.extend(channels.get(message.get_channel_name()).cloned());
                    }
                    for service in due {
                        self.refresh_heard(&mut conn, &service, Some(heard_at)).await?;
                    }
                }
                Some(service) = self.requests.recv() => {
                    if !self.services.contains(&service) {
                        continue; // forgotten before we got to it
                    }
                    if !channels.values().any(|s| *s == service) {
                        subscribe(&mut sink, &mut channels, &service).await?;
                    }
                    self.refresh(&mut conn, &service).await?;
                }
                _ = resync.tick() => {
                    for service in self.services.names() {
                        self.refresh(&mut conn, &service).await?;
                    }
                }
                _ = sweep.tick() => {
                    self.forget_idle();
                    let gone: Vec<String> = channels
                        .iter()
                        .filter(|(_, service)| !self.services.contains(service))
                        .map(|(channel, _)| channel.clone())
                        .collect();
                    for channel in gone {
                        within(RESPONSE_TIMEOUT, sink.unsubscribe(&channel)).await?;
                        channels.remove(&channel);
                    }
                }
            }
        }
    }

    /// Often enough that a service is forgotten soon after its grace ends.
    fn sweep_interval(&self) -> Duration {
        (self.forget_after / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Forgets the services nobody watched for the grace period, and what
    /// this side held for them (and for those evicted to make room).
    fn forget_idle(&mut self) {
        let forgotten = self
            .services
            .forget_idle(self.forget_after, std::time::Instant::now());
        let before = self.states.len();
        self.states
            .retain(|service, _| self.services.contains(service));
        if forgotten > 0 || self.states.len() < before {
            info!(
                forgotten = forgotten.max(before - self.states.len()),
                services = self.services.len(),
                idle_for = ?self.forget_after,
                "forgot services nobody watches"
            );
        }
    }

    /// Reads one service and publishes its view if it changed. A failed
    /// connection ends the session; anything else wrong with this service's
    /// keys is logged and its last view kept.
    async fn refresh(&mut self, conn: &mut Conn, service: &str) -> Result<(), SessionError> {
        self.refresh_heard(conn, service, None).await
    }

    /// [`Self::refresh`] for an update message heard at `heard_at`.
    async fn refresh_heard(
        &mut self,
        conn: &mut Conn,
        service: &str,
        heard_at: Option<std::time::Instant>,
    ) -> Result<(), SessionError> {
        let Some(entry) = self.services.get(service) else {
            return Ok(());
        };
        let discovered = self.services.discovered(service);
        let state = self.states.entry(service.to_string()).or_default();
        let addresses = |d: Option<&DiscoveredSet>| d.map(|d| d.addresses.clone());
        if state.view().is_some() && addresses(state.discovered()) != addresses(discovered.as_ref())
        {
            // A new instance set is a new state: a new version, as a write
            // would give it (INCR: never lowers it, whoever else writes).
            match redis::cmd("INCR")
                .arg(version_key(service))
                .query_async::<i64>(conn)
                .await
            {
                Ok(_) => {}
                Err(e) if is_connection_failure(&e) => return Err(e.into()),
                Err(error) => {
                    warn!(service = %service, %error, "cannot raise the version for the new instance set; sending it under the current one");
                }
            }
        }
        state.use_discovered(discovered);
        for _ in 0..RAISE_ATTEMPTS {
            let read = match read_service(conn, service).await {
                Ok(read) => read,
                Err(ReadError::Redis(e)) if is_connection_failure(&e) => return Err(e.into()),
                Err(error) => {
                    warn!(service = %service, %error, "cannot read this service's records; keeping its last snapshot");
                    return Ok(());
                }
            };
            let state = self.states.entry(service.to_string()).or_default();
            let (outcome, skipped) = state.apply(service, &read);
            for record in skipped {
                warn!(service = %service, key = %record.key, problem = %record.problem, "skipping a malformed capacity record");
            }
            match outcome {
                Outcome::Changed(view) => {
                    debug!(
                        service = %service,
                        version = view.version,
                        endpoints = view.endpoints.len(),
                        "new snapshot"
                    );
                    entry.publish_heard(view, heard_at);
                    return Ok(());
                }
                Outcome::Unchanged => return Ok(()),
                Outcome::Behind { raise_to } => {
                    warn!(
                        service = %service,
                        redis_version = read.version,
                        raise_to,
                        "Redis's version counter is below a version already sent \
                         (Redis lost its data?): raising it so Envoys take the new state"
                    );
                    // INCRBY, not SET: never lowers it, whoever else writes.
                    let raised = redis::cmd("INCRBY")
                        .arg(version_key(service))
                        .arg(raise_to - read.version)
                        .query_async::<i64>(conn)
                        .await;
                    match raised {
                        Ok(_) => {}
                        Err(e) if is_connection_failure(&e) => return Err(e.into()),
                        // E.g. an overflow: this service's problem, not an
                        // outage of Redis.
                        Err(error) => {
                            warn!(service = %service, %error, "cannot raise the version counter; keeping the last snapshot");
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Redis is away: takes the discovered set of `service` over its last
    /// read, and sends the view if that changed it.
    fn rediscover(&mut self, service: &str) {
        let discovered = self.services.discovered(service);
        let (Some(state), Some(entry)) = (self.states.get_mut(service), self.services.get(service))
        else {
            return;
        };
        if let Some(view) = state.set_discovered(service, discovered) {
            entry.publish(view);
        }
    }

    fn mark_all_stale(&mut self) {
        for (service, state) in &mut self.states {
            if let (Some(view), Some(entry)) = (state.mark_stale(), self.services.get(service)) {
                entry.publish(view);
            }
        }
    }
}

async fn within<T>(
    limit: Duration,
    future: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, SessionError> {
    match timeout(limit, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SessionError::Timeout(limit)),
    }
}

async fn subscribe(
    sink: &mut PubSubSink,
    channels: &mut HashMap<String, String>,
    service: &str,
) -> Result<(), SessionError> {
    let channel = updates_channel(service);
    within(RESPONSE_TIMEOUT, sink.subscribe(&channel)).await?;
    channels.insert(channel, service.to_string());
    Ok(())
}

/// The version and every record of a service, consistent with each other:
/// they come from one `MULTI`. The endpoint set is read first to know which
/// hashes to ask for, and again inside the `MULTI`; if it changed in
/// between, the read is repeated.
async fn read_service(conn: &mut Conn, service: &str) -> Result<RedisRead, ReadError> {
    let version_key = version_key(service);
    let endpoints_key = endpoints_key(service);
    let mut members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&endpoints_key)
        .query_async(conn)
        .await?;
    members.sort();
    for attempt in 1..=READ_ATTEMPTS {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("GET").arg(&version_key);
        pipe.cmd("SMEMBERS").arg(&endpoints_key);
        for path in &members {
            pipe.cmd("HGETALL").arg(capacity_key(service, path));
        }
        let mut values: std::vec::IntoIter<Value> =
            pipe.query_async::<Vec<Value>>(conn).await?.into_iter();
        let version: Option<String> = parse(values.next())?;
        let mut listed: Vec<String> = parse(values.next())?;
        listed.sort();
        if listed == members || attempt == READ_ATTEMPTS {
            let version = match version {
                None => 0,
                Some(v) => v.trim().parse().map_err(|_| ReadError::BadVersion {
                    key: version_key.clone(),
                    value: v,
                })?,
            };
            let mut records = Vec::with_capacity(members.len());
            for path in members {
                records.push((path, parse(values.next())?));
            }
            return Ok(RedisRead { version, records });
        }
        members = listed;
    }
    unreachable!("the last attempt returns")
}

fn parse<T: redis::FromRedisValue>(value: Option<Value>) -> Result<T, RedisError> {
    Ok(redis::from_redis_value(value.unwrap_or(Value::Nil))?)
}

/// The connection is gone or unusable (as opposed to a bad reply about one
/// key, such as `WRONGTYPE`).
fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}
