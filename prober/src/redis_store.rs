//! Capacity records in Redis (layout: docs/redis-keys.md, names:
//! `sluice_core::storage`).

use crate::ProberError;
use serde::Serialize;
use sluice_core::storage::{capacity_key, endpoints_key, fields, updates_channel};
use std::collections::HashMap;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Measured by sluice-prober.
    Probe,
    /// Set by hand in the config file.
    Manual,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Probe => "probe",
            Source::Manual => "manual",
        }
    }
}

/// One endpoint's capacity record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub capacity: u32,
    pub p99_ms: Option<f64>,
    pub rps: Option<f64>,
    pub error_rate: Option<f64>,
    /// Unix time, seconds.
    pub measured_at: u64,
    pub source: Source,
}

impl Record {
    fn from_hash(h: &HashMap<String, String>) -> Option<Record> {
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<f64>().ok());
        Some(Record {
            capacity: h.get(fields::CAPACITY)?.parse().ok()?,
            p99_ms: num(fields::P99_MS),
            rps: num(fields::RPS),
            error_rate: num(fields::ERROR_RATE),
            measured_at: h
                .get(fields::MEASURED_AT)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            source: match h.get(fields::SOURCE).map(String::as_str) {
                Some("manual") => Source::Manual,
                _ => Source::Probe,
            },
        })
    }

    fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            (fields::CAPACITY, self.capacity.to_string()),
            (fields::MEASURED_AT, self.measured_at.to_string()),
            (fields::SOURCE, self.source.as_str().to_string()),
        ];
        if let Some(v) = self.p99_ms {
            f.push((fields::P99_MS, format!("{v:.3}")));
        }
        if let Some(v) = self.rps {
            f.push((fields::RPS, format!("{v:.1}")));
        }
        if let Some(v) = self.error_rate {
            f.push((fields::ERROR_RATE, format!("{v:.6}")));
        }
        f
    }
}

/// The message published on the updates channel after each write.
#[derive(Serialize)]
struct Update<'a> {
    endpoint: &'a str,
    capacity: u32,
    source: Source,
    measured_at: u64,
}

pub struct RedisStore {
    conn: redis::Connection,
    service: String,
    /// The URL with any password hidden, for messages.
    shown_url: String,
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

impl RedisStore {
    pub fn connect(url: &str, service: &str) -> Result<RedisStore, ProberError> {
        let shown_url = redact(url);
        let fail = |e: redis::RedisError| {
            ProberError::Storage(format!("cannot connect to Redis at {shown_url}: {e}"))
        };
        let client = redis::Client::open(url).map_err(fail)?;
        let mut conn = client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(fail)?;
        conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
        conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(fail)?;
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map_err(fail)?;
        Ok(RedisStore {
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
    pub fn get(&mut self, path: &str) -> Result<Option<Record>, ProberError> {
        let key = capacity_key(&self.service, path);
        let hash: HashMap<String, String> =
            redis::cmd("HGETALL")
                .arg(&key)
                .query(&mut self.conn)
                .map_err(|e| self.failed(&format!("HGETALL {key}"), e))?;
        Ok(Record::from_hash(&hash))
    }

    /// Replaces the record of `path`, adds it to the endpoint set and
    /// announces it, all in one transaction.
    pub fn put(&mut self, path: &str, record: &Record) -> Result<(), ProberError> {
        let key = capacity_key(&self.service, path);
        let update = Update {
            endpoint: path,
            capacity: record.capacity,
            source: record.source,
            measured_at: record.measured_at,
        };
        let message = serde_json::to_string(&update).expect("plain struct serialises");
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
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://u:pw@h"), "redis://u:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }

    #[test]
    fn record_fields_round_trip() {
        let r = Record {
            capacity: 37,
            p99_ms: Some(21.5),
            rps: Some(1790.0),
            error_rate: Some(0.0),
            measured_at: 1_700_000_000,
            source: Source::Probe,
        };
        let h: HashMap<String, String> = r
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(Record::from_hash(&h), Some(r));
        assert_eq!(Record::from_hash(&HashMap::new()), None);
    }
}
