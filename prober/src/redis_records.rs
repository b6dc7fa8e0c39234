//! The prober's connection to Redis: reads and writes capacity records
//! (layout: docs/redis-keys.md; names: `sluice_core::redis_keys`; codec:
//! `sluice_core::capacity_record`).

use crate::error::ProberError;
use sluice_core::capacity_record::CapacityRecord;
use sluice_core::redis_keys::{capacity_key, endpoints_key, updates_channel, version_key};
use std::collections::HashMap;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisRecords {
    conn: redis::Connection,
    service: String,
    /// The URL with any password hidden, for messages.
    shown_url: String,
}

pub use sluice_core::redact::redact_url as redact;

impl RedisRecords {
    pub fn connect(url: &str, service: &str) -> Result<RedisRecords, ProberError> {
        let shown_url = redact(url);
        let fail = |e: redis::RedisError| {
            ProberError::Storage(format!("cannot connect to Redis at {shown_url}: {e}"))
        };
        // A URL that does not parse is a usage mistake, not an unreachable Redis.
        let client = redis::Client::open(url).map_err(|e| {
            ProberError::Usage(format!(
                "Redis URL {shown_url}: not a valid redis:// URL: {e}"
            ))
        })?;
        let mut conn = client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(fail)?;
        conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
        conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map_err(fail)?;
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
        let hash: HashMap<String, String> =
            redis::cmd("HGETALL")
                .arg(&key)
                .query(&mut self.conn)
                .map_err(|e| self.failed(&format!("HGETALL {key}"), e))?;
        CapacityRecord::from_hash(&hash)
            .map_err(|e| ProberError::Storage(format!("Redis at {}: {key}: {e}", self.shown_url)))
    }

    /// Replaces the record of `path`, adds it to the endpoint set, moves the
    /// service's version and announces it, all in one transaction.
    pub fn put(&mut self, path: &str, record: &CapacityRecord) -> Result<(), ProberError> {
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
        pipe.query::<()>(&mut self.conn)
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
