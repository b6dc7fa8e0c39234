//! One allocating replica per service when several sluice-sync replicas
//! serve the same Envoys (`--advertise`): the shares of a service's pools
//! are exact only if one allocator sees every Envoy's demand. Whichever
//! replica first takes a service's lease in Redis (`SET NX PX` on
//! `sluice:{SERVICE}:allocator`, its advertised address as the value)
//! allocates; every other replica forwards the Share streams it receives
//! for that service to it, so an Envoy may connect to any replica.
//!
//! The holder renews the lease every third of it. It stops allocating (its
//! streams end, their Envoys reconnect and land on the new holder) when a
//! renewal finds another holder, or once it has gone a lease minus a
//! margin without a renewal that Redis confirmed (Redis unreachable): by
//! then another replica may hold it, and two allocators must never grant
//! at once. The new allocator starts as a restarted one does (docs/sync.md,
//! "Shares among Envoy replicas"): it grants back what each Envoy reports
//! holding and nothing else during its grace, so a handover never
//! overshoots. docs/sync.md, "Several sync replicas".

use crate::redis_conn::{Conn, RedisClients};
use sluice_core::redis_keys::allocator_key;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Renews the lease only if this replica still holds it.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";

/// Who allocates a service's shares, as this replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This replica: serve the stream here. `taken`: it has just taken the
    /// lease, so its allocator for the service starts afresh (with a
    /// restart's grace: another replica's grants may still run).
    Allocator { taken: bool },
    /// Another replica, at this address: forward the stream to it.
    Forward(String),
}

/// A lease this replica holds.
struct Held {
    /// When the last renewal Redis confirmed was sent.
    renewed: Instant,
    /// Flips to true when the lease is lost: its streams end.
    lost: watch::Sender<bool>,
}

pub struct Election {
    clients: RedisClients,
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// This replica's address, as the other replicas reach its gRPC.
    me: String,
    lease: Duration,
    held: Mutex<HashMap<String, Held>>,
}

impl Election {
    pub fn new(clients: RedisClients, me: String, lease: Duration) -> Arc<Election> {
        Arc::new(Election {
            clients,
            conn: tokio::sync::Mutex::new(None),
            me,
            lease,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The address other replicas forward to.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// How long a held lease may go unconfirmed before this replica stops
    /// allocating: a lease less the time a renewal may take to land.
    fn trusted_for(&self) -> Duration {
        self.lease
            .saturating_sub(RESPONSE_TIMEOUT.min(self.lease / 3))
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = self.conn.lock().await;
        if conn.is_none() {
            *conn = Some(
                self.clients
                    .connect(CONNECT_TIMEOUT, RESPONSE_TIMEOUT)
                    .await?,
            );
        }
        let result = cmd.query_async(conn.as_mut().expect("connected")).await;
        if result.is_err() {
            // Reconnect next time.
            *conn = None;
        }
        result
    }

    /// Who allocates `service`: this replica (taking the lease when nobody
    /// holds it), or another. `Err`: Redis cannot say, and this replica
    /// does not hold the lease.
    pub async fn role(&self, service: &str) -> Result<Role, String> {
        if self.holds(service) {
            return Ok(Role::Allocator { taken: false });
        }
        let key = allocator_key(service);
        let sent = Instant::now();
        let taken: Option<String> = self
            .query(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&self.me)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.lease.as_millis() as u64),
            )
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        if taken.is_some() {
            return Ok(Role::Allocator {
                taken: self.took(service, sent),
            });
        }
        let holder: Option<String> = self
            .query(redis::cmd("GET").arg(&key))
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        match holder {
            // Ours from before a restart of this process on the same address.
            Some(h) if h == self.me => Ok(Role::Allocator {
                taken: self.took(service, sent),
            }),
            Some(h) => Ok(Role::Forward(h)),
            // Expired between the two calls: try again next stream.
            None => Err("the allocator's lease just expired".to_string()),
        }
    }

    /// Holds the lease from `at`; true if it did not before.
    fn took(&self, service: &str, at: Instant) -> bool {
        let mut held = self.held.lock().expect("election lock");
        if let Some(h) = held.get_mut(service) {
            h.renewed = at;
            return false;
        }
        info!(service, me = %self.me, "allocating this service's shares");
        held.insert(
            service.to_string(),
            Held {
                renewed: at,
                lost: watch::channel(false).0,
            },
        );
        true
    }

    /// This replica holds `service`'s lease and may allocate.
    pub fn holds(&self, service: &str) -> bool {
        let held = self.held.lock().expect("election lock");
        held.get(service)
            .is_some_and(|h| h.renewed.elapsed() < self.trusted_for() && !*h.lost.borrow())
    }

    /// Flips to true when this replica stops allocating `service`; `None`:
    /// it does not hold the lease.
    pub fn lost(&self, service: &str) -> Option<watch::Receiver<bool>> {
        let held = self.held.lock().expect("election lock");
        held.get(service).map(|h| h.lost.subscribe())
    }

    /// Renews every held lease every third of a lease, dropping those lost.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut every = tokio::time::interval(self.lease / 3);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = crate::services::stopping(&mut shutdown) => break,
            }
            let services: Vec<String> = self
                .held
                .lock()
                .expect("election lock")
                .keys()
                .cloned()
                .collect();
            for service in services {
                self.renew(&service).await;
            }
        }
        // Leaving: let another replica take over at once.
        let services: Vec<String> = self
            .held
            .lock()
            .expect("election lock")
            .drain()
            .map(|(s, _)| s)
            .collect();
        for service in services {
            let _ = self
                .query::<i64>(
                    redis::cmd("EVAL")
                        .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
                        .arg(1)
                        .arg(allocator_key(&service))
                        .arg(&self.me),
                )
                .await;
        }
    }

    async fn renew(&self, service: &str) {
        let sent = Instant::now();
        let renewed: Result<i64, _> = self
            .query(
                redis::cmd("EVAL")
                    .arg(RENEW)
                    .arg(1)
                    .arg(allocator_key(service))
                    .arg(&self.me)
                    .arg(self.lease.as_millis() as u64),
            )
            .await;
        let mut held = self.held.lock().expect("election lock");
        let Some(h) = held.get_mut(service) else {
            return;
        };
        match renewed {
            Ok(1) => h.renewed = sent,
            Ok(_) => {
                warn!(
                    service,
                    "another replica allocates this service's shares now: handing over"
                );
                let _ = h.lost.send(true);
                held.remove(service);
            }
            // Give up before the next try would come too late: by then the
            // lease may have run out in Redis and another replica hold it.
            Err(e) if h.renewed.elapsed() + self.lease / 3 >= self.trusted_for() => {
                warn!(service, error = %e, "cannot renew the allocator's lease: no longer allocating");
                let _ = h.lost.send(true);
                held.remove(service);
            }
            Err(e) => warn!(service, error = %e, "cannot renew the allocator's lease; retrying"),
        }
    }
}
