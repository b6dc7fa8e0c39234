//! The comment the prober writes after a `capacity:` line, and the Redis
//! record a capacity in the file stands for.

use crate::config_file::{EndpointSpec, MEASURED_MARK};
use sluice_core::capacity_record::{CapacityRecord, Source};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339(at: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(at))
}

/// The comment written on a measured `capacity:` line.
pub fn measured_note(p99_ms: f64, rps: f64, at: u64) -> String {
    format!(
        "{MEASURED_MARK} p99 {p99_ms:.1} ms at {rps:.0} req/s, {}",
        rfc3339(at)
    )
}

/// The comment on a capacity taken over from Redis.
pub fn from_redis_note(record: &CapacityRecord) -> String {
    format!(
        "{MEASURED_MARK} from Redis ({}), {}",
        record.source.as_str(),
        rfc3339(record.measured_at)
    )
}

/// Reads back what [`measured_note`] wrote: p99, rps, time.
pub fn parse_note(note: &str) -> (Option<f64>, Option<f64>, Option<u64>) {
    let rest = note.strip_prefix(MEASURED_MARK).unwrap_or(note);
    let words: Vec<&str> = rest.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.trim_end_matches(',').parse::<f64>().ok())
    };
    let when = words
        .last()
        .and_then(|w| humantime::parse_rfc3339(w).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    (after("p99"), after("at"), when)
}

/// The Redis record for a capacity found in the file.
pub fn record_from_file(spec: &EndpointSpec) -> Option<CapacityRecord> {
    let capacity = spec.capacity?;
    if spec.capacity_was_measured() {
        let (p99, rps, when) = parse_note(spec.capacity_note.as_deref().unwrap_or(""));
        Some(CapacityRecord {
            capacity,
            p99_ms: p99,
            rps,
            error_rate: None,
            measured_at: when.unwrap_or_else(now_unix),
            source: Source::Probe,
        })
    } else {
        Some(CapacityRecord {
            capacity,
            p99_ms: None,
            rps: None,
            error_rate: None,
            measured_at: now_unix(),
            source: Source::Manual,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_read_back() {
        let note = measured_note(21.34, 1790.4, 1_700_000_000);
        assert_eq!(
            note,
            "sluice-prober: p99 21.3 ms at 1790 req/s, 2023-11-14T22:13:20Z"
        );
        assert_eq!(
            parse_note(&note),
            (Some(21.3), Some(1790.0), Some(1_700_000_000))
        );
    }

    #[test]
    fn file_capacities_become_records() {
        let mut spec = EndpointSpec::new("/a");
        spec.capacity = Some(10);
        assert_eq!(record_from_file(&spec).unwrap().source, Source::Manual);
        spec.capacity_note = Some(measured_note(20.0, 100.0, 1_700_000_000));
        let r = record_from_file(&spec).unwrap();
        assert_eq!(r.source, Source::Probe);
        assert_eq!(r.p99_ms, Some(20.0));
        assert_eq!(r.measured_at, 1_700_000_000);
    }
}
