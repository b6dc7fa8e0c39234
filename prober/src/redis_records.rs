//! The prober's connection to Redis: reads and writes capacity records
//! (layout: docs/redis-keys.md; names: `sluice_core::redis_keys`; codec:
//! `sluice_core::capacity_record`).

use crate::error::ProberError;
use crate::redis_target::RedisTarget;
use sluice_core::capacity_record::{instance_capacity_fields, CapacityRecord, InstanceCapacities};
use sluice_core::redis_keys::{capacity_key, endpoints_key, updates_channel, version_key};
use std::collections::HashMap;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisRecords {
    conn: Conn,
    service: String,
    /// The URL with any password hidden, for messages.
    shown_url: String,
}

pub use sluice_core::redact::redact_url as redact;

/// One node (blocking), or a cluster. The cluster side is redis-rs's async
/// client on a small runtime: its blocking client cannot send a MULTI
/// pipeline, the async one routes it to the node of its keys' slot.
enum Conn {
    Single(redis::Connection),
    Cluster {
        runtime: tokio::runtime::Runtime,
        conn: redis::cluster_async::ClusterConnection,
    },
}

impl Conn {
    fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query(c),
            Conn::Cluster { runtime, conn } => runtime.block_on(cmd.query_async(conn)),
        }
    }

    fn query_pipe<T: redis::FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => pipe.query(c),
            Conn::Cluster { runtime, conn } => runtime.block_on(pipe.query_async(conn)),
        }
    }
}

impl RedisRecords {
    /// One plain `redis://` or `rediss://` URL.
    pub fn connect(url: &str, service: &str) -> Result<RedisRecords, ProberError> {
        RedisRecords::connect_to(&RedisTarget::plain(url), service)
    }

    /// One node or a cluster, plain or TLS.
    pub fn connect_to(target: &RedisTarget, service: &str) -> Result<RedisRecords, ProberError> {
        let shown_url = target.shown();
        let fail = |e: redis::RedisError| {
            ProberError::Storage(format!("cannot connect to Redis at {shown_url}: {e}"))
        };
        // A URL that does not parse is a usage mistake, not an unreachable Redis.
        let bad_url = |e: redis::RedisError| {
            ProberError::Usage(format!(
                "Redis URL {shown_url}: not a valid redis:// URL: {e}"
            ))
        };
        let mut conn = if target.cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(target.urls.clone())
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(IO_TIMEOUT);
            if let Some(certs) = &target.tls {
                builder = builder.certs(certs.clone());
            }
            let client = builder.build().map_err(bad_url)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ProberError::Storage(format!("cannot start a runtime: {e}")))?;
            let conn = runtime
                .block_on(client.get_async_connection())
                .map_err(fail)?;
            Conn::Cluster { runtime, conn }
        } else {
            let url = target.urls[0].as_str();
            let client = match &target.tls {
                Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
                None => redis::Client::open(url),
            }
            .map_err(bad_url)?;
            let conn = client
                .get_connection_with_timeout(CONNECT_TIMEOUT)
                .map_err(fail)?;
            conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
            conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
            Conn::Single(conn)
        };
        conn.query::<String>(&redis::cmd("PING")).map_err(fail)?;
        Ok(RedisRecords {
            conn,
            service: service.to_string(),
            shown_url,
        })
    }

    pub fn url(&self) -> &str {
        &self.shown_url
    }

    fn failed(&self, what: &str, e: redis::RedisError) -> ProberError {
        ProberError::Storage(format!("Redis at {}: {what}: {e}", self.shown_url))
    }

    /// The record of `path`, if there is one.
    pub fn get(&mut self, path: &str) -> Result<Option<CapacityRecord>, ProberError> {
        let key = capacity_key(&self.service, path);
        let hash: HashMap<String, String> = self
            .conn
            .query(redis::cmd("HGETALL").arg(&key))
            .map_err(|e| self.failed(&format!("HGETALL {key}"), e))?;
        CapacityRecord::from_hash(&hash)
            .map_err(|e| ProberError::Storage(format!("Redis at {}: {key}: {e}", self.shown_url)))
    }

    /// Replaces the record of `path`, adds it to the endpoint set, moves the
    /// service's version and announces it, all in one transaction.
    pub fn put(&mut self, path: &str, record: &CapacityRecord) -> Result<(), ProberError> {
        self.put_with_instances(path, record, &InstanceCapacities::new())
    }

    /// [`Self::put`], with each instance's own capacity in the same hash
    /// (`instance_capacity:ADDR` fields, docs/redis-keys.md).
    pub fn put_with_instances(
        &mut self,
        path: &str,
        record: &CapacityRecord,
        instances: &InstanceCapacities,
    ) -> Result<(), ProberError> {
        let key = capacity_key(&self.service, path);
        let message = record.update_message(path);
        let mut pipe = redis::pipe();
        pipe.atomic();
        // DEL first, so a manual record does not keep an old probe's p99.
        pipe.cmd("DEL").arg(&key).ignore();
        let hset = pipe.cmd("HSET").arg(&key);
        for (f, v) in record.to_fields() {
            hset.arg(f).arg(v);
        }
        for (f, v) in instance_capacity_fields(instances) {
            hset.arg(f).arg(v);
        }
        hset.ignore();
        pipe.cmd("SADD")
            .arg(endpoints_key(&self.service))
            .arg(path)
            .ignore();
        // The sync service streams this as the snapshot's version: in the
        // same MULTI, so a reader never sees the record without it.
        pipe.cmd("INCR").arg(version_key(&self.service)).ignore();
        pipe.cmd("PUBLISH")
            .arg(updates_channel(&self.service))
            .arg(message)
            .ignore();
        self.conn
            .query_pipe::<()>(&pipe)
            .map_err(|e| self.failed(&format!("writing {key}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_url_is_bad_usage() {
        let e = RedisRecords::connect("redis://:pw@h:notaport", "s")
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), crate::exit::USAGE, "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
    }
}
