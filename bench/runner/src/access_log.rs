//! Envoy's access log as a clock: when each stream started, how long it
//! took, and when its request went upstream and its response came back,
//! to the microsecond.

use sluice_backend::handover::{GapSummary, HandoverGaps};
use sluice_harness::FrontProxy;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One line per stream. `%START_TIME%` is the wall clock; the durations are
/// offsets from the first downstream byte on Envoy's monotonic clock.
pub const FORMAT: &str = "%START_TIME(%s.%6f)% %RESPONSE_CODE% %DURATION% \
%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)% %COMMON_DURATION(DS_RX_BEG:US_TX_BEG:us)% \
%COMMON_DURATION(DS_RX_BEG:US_RX_END:us)% %RESP(X-SLUICE-REASON)% %REQ(:PATH)%\n";

/// Gives `proxy` an access log in [`FORMAT`] in its work directory, which
/// goes away with its Envoy: read the log before dropping it.
pub fn enable(proxy: &mut FrontProxy) -> PathBuf {
    let path = proxy.work_dir.join("access.log");
    proxy.access_log = Some((path.clone(), FORMAT.to_string()));
    path
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Unix time of the first downstream byte, microseconds.
    pub start_us: u64,
    /// 0 when no response was sent (client gone).
    pub status: u16,
    pub duration_ms: u64,
    /// To the last byte sent downstream.
    pub total_us: Option<u64>,
    /// To the first byte sent upstream: after admission and any queueing.
    pub upstream_sent_us: Option<u64>,
    /// To the last byte of the upstream response: when Sluice releases.
    pub upstream_done_us: Option<u64>,
    /// `x-sluice-reason` of the response.
    pub reason: Option<String>,
    /// With its query string.
    pub path: String,
}

impl Entry {
    /// Total time in milliseconds, to the microsecond when Envoy has it.
    pub fn total_ms(&self) -> f64 {
        self.total_us
            .map_or(self.duration_ms as f64, |us| us as f64 / 1000.0)
    }
}

pub fn parse_line(line: &str) -> Option<Entry> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [start, status, duration, total, sent, done, reason, path] = f[..] else {
        return None;
    };
    let (secs, micros) = start.split_once('.')?;
    let opt = |v: &str| (v != "-").then(|| v.parse::<u64>().ok()).flatten();
    Some(Entry {
        start_us: secs.parse::<u64>().ok()? * 1_000_000 + micros.parse::<u64>().ok()?,
        status: status.parse().ok()?,
        duration_ms: duration.parse().ok()?,
        total_us: opt(total),
        upstream_sent_us: opt(sent),
        upstream_done_us: opt(done),
        reason: (reason != "-").then(|| reason.to_string()),
        path: path.to_string(),
    })
}

/// Every entry, once Envoy has flushed them: the file must stop growing
/// for a flush interval or two (the harness flushes every 100 ms).
pub fn read_settled(path: &Path) -> Vec<Entry> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = None;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if last.as_ref() == Some(&text) || Instant::now() > deadline {
            return text.lines().filter_map(parse_line).collect();
        }
        last = Some(text);
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The handover gap on Envoy's clock: the same bookkeeping as the backend
/// (see `sluice_backend::handover`), with a request *inside* from its first
/// byte sent upstream to the last byte of its response received. So a gap
/// runs from Envoy having a response in hand (Sluice releases there) to
/// Envoy writing the next request upstream: release, grant, wake-up, claim,
/// resume, and the router's connection pick, without the loopback hops and
/// the backend's own parsing that the backend's figure also holds.
pub fn upstream_gaps<'a>(entries: impl Iterator<Item = &'a Entry>, capacity: u64) -> GapSummary {
    // (time in ns, 0 = departure, 1 = arrival): at the same microsecond a
    // departure comes first, so an immediate refill is a gap of 0.
    let mut events: Vec<(u64, u8)> = Vec::new();
    for e in entries {
        if let (Some(sent), Some(done)) = (e.upstream_sent_us, e.upstream_done_us) {
            events.push(((e.start_us + sent) * 1000, 1));
            events.push(((e.start_us + done) * 1000, 0));
        }
    }
    events.sort_unstable();
    let mut gaps = HandoverGaps::new(capacity);
    for (at, kind) in events {
        if kind == 1 {
            gaps.arrive(at);
        } else {
            gaps.depart(at);
        }
    }
    gaps.summary()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_envoy_writes() {
        let e = parse_line("1795445062.693381 504 0 273 - - queue-timeout /slow?m\n").unwrap();
        assert_eq!(e.start_us, 1_795_445_062_693_381);
        assert_eq!((e.status, e.duration_ms), (504, 0));
        assert_eq!(e.total_us, Some(273));
        assert_eq!((e.upstream_sent_us, e.upstream_done_us), (None, None));
        assert_eq!(e.reason.as_deref(), Some("queue-timeout"));
        assert_eq!(e.path, "/slow?m");
        assert!((e.total_ms() - 0.273).abs() < 1e-9);

        let e = parse_line("1795445062.797147 200 4 4024 574 3976 - /work").unwrap();
        assert_eq!(
            (e.upstream_sent_us, e.upstream_done_us),
            (Some(574), Some(3976))
        );
        assert_eq!(e.reason, None);
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn gaps_run_from_a_response_in_to_the_next_request_out() {
        let entry = |start_us, sent, done| Entry {
            start_us,
            status: 200,
            duration_ms: 0,
            total_us: None,
            upstream_sent_us: Some(sent),
            upstream_done_us: Some(done),
            reason: None,
            path: "/work".into(),
        };
        // Capacity 1: the second request goes upstream 300 µs after the
        // first one's response came in.
        let entries = [
            entry(1_000_000, 10, 20_010),
            entry(1_000_500, 19_810, 40_000),
        ];
        let g = upstream_gaps(entries.iter(), 1);
        assert_eq!(g.count, 1);
        assert!((g.p50_ms - 0.3).abs() < 0.001, "{g:?}");
    }
}
