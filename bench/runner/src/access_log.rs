//! Envoy's access log as a clock: when each stream started, how long it
//! took, and when its request went upstream and its response came back,
//! to the microsecond.

use crate::figures::Percentiles;
use sluice_backend::handover::{GapSummary, HandoverGaps};
use sluice_harness::FrontProxy;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One line per stream. `%START_TIME%` is the wall clock; the durations are
/// offsets from the first downstream byte on Envoy's monotonic clock.
pub const FORMAT: &str = "%START_TIME(%s.%6f)% %RESPONSE_CODE% %DURATION% \
%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)% %COMMON_DURATION(DS_RX_BEG:US_TX_BEG:us)% \
%COMMON_DURATION(DS_RX_BEG:US_RX_END:us)% %RESP(X-SLUICE-REASON)% %REQ(:PATH)% \
%REQ(X-REQUEST-ID)%\n";

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
    /// The id Envoy gave the request and sent upstream with it.
    pub request_id: Option<String>,
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
    let [start, status, duration, total, sent, done, reason, path, id] = f[..] else {
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
        request_id: (id != "-").then(|| id.to_string()),
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
            gaps.depart(at, ());
        }
    }
    gaps.summary()
}

/// Where a handover's time goes, per handover, in milliseconds: the
/// backend's trace says which request left a slot and which one took it
/// next (the backend's pairing, see `sluice_backend::handover`), and Envoy's
/// access log when each crossed Envoy. Both are on the wall clock.
#[derive(Debug, Clone, Default)]
pub struct HandoverParts {
    /// Backend done → Envoy has the whole response (the response's hop:
    /// the backend writing it, loopback, Envoy reading and parsing it).
    pub response_in: Percentiles,
    /// Envoy has the response → Envoy writes the next request upstream:
    /// Sluice's release, grant, wake-up, claim and resume, and the
    /// router's connection pick.
    pub in_envoy: Percentiles,
    /// Envoy writes the request → the backend counts it in (loopback, the
    /// backend reading and parsing it).
    pub request_out: Percentiles,
    /// Handovers whose two requests were both in the log.
    pub matched: usize,
    /// The backend's handovers.
    pub handovers: usize,
}

/// One row of the backend's trace: (x-request-id, arrived µs, departed µs).
pub type TraceRow = (String, u64, u64);

pub fn handover_parts(trace: &[TraceRow], entries: &[Entry], capacity: u64) -> HandoverParts {
    let by_id: HashMap<&str, &Entry> = entries
        .iter()
        .filter_map(|e| Some((e.request_id.as_deref()?, e)))
        .collect();
    // (time ns, 0 = departure / 1 = arrival, row): departures first on ties.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(trace.len() * 2);
    for (i, (_, arrived, departed)) in trace.iter().enumerate() {
        events.push((arrived * 1000, 1, i));
        events.push((departed * 1000, 0, i));
    }
    events.sort_unstable();
    let mut gaps: HandoverGaps<usize> = HandoverGaps::new(capacity);
    let (mut response_in, mut in_envoy, mut request_out) = (Vec::new(), Vec::new(), Vec::new());
    let mut handovers = 0;
    for (at, kind, row) in events {
        if kind == 0 {
            gaps.depart(at, row);
            continue;
        }
        let Some((_, left)) = gaps.arrive(at) else {
            continue;
        };
        handovers += 1;
        let (left_id, _, left_at) = &trace[left];
        let (took_id, took_at, _) = &trace[row];
        let (Some(l), Some(t)) = (by_id.get(left_id.as_str()), by_id.get(took_id.as_str())) else {
            continue;
        };
        let (Some(done), Some(sent)) = (l.upstream_done_us, t.upstream_sent_us) else {
            continue;
        };
        let (response_at, request_at) = (l.start_us + done, t.start_us + sent);
        let ms = |from: u64, to: u64| (to as f64 - from as f64) / 1000.0;
        response_in.push(ms(*left_at, response_at));
        in_envoy.push(ms(response_at, request_at));
        request_out.push(ms(request_at, *took_at));
    }
    HandoverParts {
        matched: in_envoy.len(),
        response_in: Percentiles::of(response_in),
        in_envoy: Percentiles::of(in_envoy),
        request_out: Percentiles::of(request_out),
        handovers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_envoy_writes() {
        let e = parse_line("1795445062.693381 504 0 273 - - queue-timeout /slow?m 7f3a\n").unwrap();
        assert_eq!(e.start_us, 1_795_445_062_693_381);
        assert_eq!((e.status, e.duration_ms), (504, 0));
        assert_eq!(e.total_us, Some(273));
        assert_eq!((e.upstream_sent_us, e.upstream_done_us), (None, None));
        assert_eq!(e.reason.as_deref(), Some("queue-timeout"));
        assert_eq!(e.path, "/slow?m");
        assert_eq!(e.request_id.as_deref(), Some("7f3a"));
        assert!((e.total_ms() - 0.273).abs() < 1e-9);

        let e = parse_line("1795445062.797147 200 4 4024 574 3976 - /work -").unwrap();
        assert_eq!(
            (e.upstream_sent_us, e.upstream_done_us),
            (Some(574), Some(3976))
        );
        assert_eq!((e.reason, e.request_id), (None, None));
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
            request_id: None,
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

    #[test]
    fn a_handover_splits_into_response_in_envoy_and_request() {
        let entry = |id: &str, start_us, sent, done| Entry {
            start_us,
            status: 200,
            duration_ms: 0,
            total_us: None,
            upstream_sent_us: Some(sent),
            upstream_done_us: Some(done),
            reason: None,
            path: "/work".into(),
            request_id: Some(id.into()),
        };
        // Capacity 1. "a" leaves the backend at 20_000 µs, Envoy has its
        // response at 20_100, sends "b" at 20_400, "b" arrives at 20_450.
        let entries = [entry("a", 0, 10, 20_100), entry("b", 5_000, 15_400, 40_000)];
        let trace = [
            ("a".to_string(), 50, 20_000),
            ("b".to_string(), 20_450, 39_900),
        ];
        let p = handover_parts(&trace, &entries, 1);
        assert_eq!((p.handovers, p.matched), (1, 1));
        assert!((p.response_in.p50 - 0.1).abs() < 1e-9, "{p:?}");
        assert!((p.in_envoy.p50 - 0.3).abs() < 1e-9, "{p:?}");
        assert!((p.request_out.p50 - 0.05).abs() < 1e-9, "{p:?}");
    }
}
