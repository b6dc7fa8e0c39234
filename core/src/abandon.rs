//! Abandoned requests: a client that gives up on a request the backend is
//! already computing (it disconnects, or Envoy's own timeout answers for the
//! backend) does not stop the backend, which Envoy cannot wait for: it
//! resets the upstream stream and moves on. Freeing the slot at once would
//! let the next request in while the backend still works on the abandoned
//! one. So the slot is *held* until the backend has most likely finished:
//! for the endpoint's recent upstream duration minus the time the request
//! already spent, never longer than the endpoint's `abandon_hold`.
//!
//! Each worker measures its own requests. A worker with no measurement yet
//! (a VM started by a configuration update) uses the estimate the others
//! publish in shared data (one key per endpoint, written only when a
//! worker's estimate changes).

use crate::cas::as_u64;
use crate::holding::Slot;
use crate::shared_data::{SharedData, StoreError};
use std::time::Duration;

/// Publishes `ns` as the endpoint's estimate at `key`
/// ([`crate::shared_keys::upstream_estimate`]). Last writer wins, so no CAS:
/// any worker's recent maximum will do for a worker that has none.
pub fn publish<S: SharedData>(store: &S, key: &str, ns: u64) -> Result<(), StoreError> {
    store.set(key, &ns.to_le_bytes(), 0)
}

/// The estimate another worker published, if any.
pub fn published<S: SharedData>(store: &S, key: &str) -> Option<u64> {
    as_u64(&store.get(key).ok()??.0).filter(|&ns| ns > 0)
}

/// Completed upstream durations kept per endpoint and worker.
const SAMPLES: usize = 16;
/// Once it has [`SAMPLES`], a worker times one admitted request in this
/// many: two clock reads fewer for the others (see [`RecentDurations::time_next`]).
const TIME_ONE_IN: u32 = 8;

/// The most recent upstream durations (admission to response end) of one
/// endpoint on this worker. The estimate is their maximum: holding a little
/// too long costs a little throughput, releasing too early over-admits.
#[derive(Debug, Clone, Default)]
pub struct RecentDurations {
    samples_ns: [u64; SAMPLES],
    len: usize,
    next: usize,
    /// The estimate last published to the other workers.
    published_ns: u64,
    /// Admitted requests since the last one timed.
    untimed: u32,
}

impl RecentDurations {
    /// Whether to time the request being admitted now: each one until the
    /// window is full, then one in [`TIME_ONE_IN`], so that the window
    /// still covers the endpoint's last hundred or so requests. An untimed
    /// request that is abandoned is timed from its arrival instead.
    pub fn time_next(&mut self) -> bool {
        if self.len < SAMPLES || self.untimed + 1 >= TIME_ONE_IN {
            self.untimed = 0;
            return true;
        }
        self.untimed += 1;
        false
    }

    /// Records a duration.
    pub fn record(&mut self, ns: u64) {
        self.samples_ns[self.next] = ns;
        self.next = (self.next + 1) % SAMPLES;
        self.len = (self.len + 1).min(SAMPLES);
    }

    /// The estimate, if it changed since it was last taken here to be
    /// published (on the worker's tick, off the request path).
    pub fn take_unpublished(&mut self) -> Option<u64> {
        let estimate = self.estimate_ns().unwrap_or(0);
        (estimate != self.published_ns).then(|| {
            self.published_ns = estimate;
            estimate
        })
    }

    /// The shortest of the recent durations, `None` before any finished.
    pub fn min_ns(&self) -> Option<u64> {
        self.samples_ns[..self.len].iter().copied().min()
    }

    /// The mean of the recent durations, `None` before any finished: what
    /// a slot takes to turn over, for `Retry-After`.
    pub fn mean_ns(&self) -> Option<u64> {
        (self.len > 0).then(|| self.samples_ns[..self.len].iter().sum::<u64>() / self.len as u64)
    }

    /// How long a request of this endpoint lasts, `None` before any finished.
    pub fn estimate_ns(&self) -> Option<u64> {
        self.samples_ns[..self.len].iter().copied().max()
    }
}

/// How long an abandoned request is held before any request of its
/// endpoint has completed (and it had run less than this): long enough for
/// the backend to finish what a client gave up on at once, short enough not
/// to close a cold endpoint for `abandon_hold` because its first clients
/// were impatient.
pub const COLD_HOLD: Duration = Duration::from_secs(1);

/// How long after a request outlived the estimate (was abandoned after
/// every recent duration) every abandoned request of the endpoint is held
/// to the cap: the completions no longer bound what it runs.
pub const UNCOVERED_FOR: Duration = Duration::from_secs(60);

/// What is known of an endpoint's durations when one of its requests is
/// abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durations {
    /// No request has completed yet (a cold endpoint).
    Unknown,
    /// The longest recent duration, ns.
    Estimate(u64),
    /// A request was abandoned after every recent duration less than
    /// [`UNCOVERED_FOR`] ago: some requests run longer than any completed
    /// one (the abandoned ones are the slow ones, never measured), and any
    /// abandoned request may be one of them.
    Uncovered,
}

/// How much longer to hold the slot of a request abandoned `elapsed_ns`
/// after admission, never longer than `cap` (`abandon_hold`):
///
/// - within the estimate (the longest recent duration): the rest of it;
/// - past it, the request is slower than every request measured, and the
///   abandoned ones are exactly the slow ones (their durations are never
///   measured): nothing bounds it but the cap, counted from admission. The
///   same while the endpoint is [`Durations::Uncovered`], since a slow
///   request can be abandoned early in its run too;
/// - with no estimate yet (a cold endpoint): as long again as it has run,
///   at least [`COLD_HOLD`].
pub fn hold_ns(durations: Durations, elapsed_ns: u64, cap: Duration) -> u64 {
    let cap_ns = cap.as_nanos() as u64;
    let hold = match durations {
        Durations::Estimate(estimate) if elapsed_ns < estimate => estimate - elapsed_ns,
        Durations::Estimate(_) | Durations::Uncovered => cap_ns.saturating_sub(elapsed_ns),
        Durations::Unknown => elapsed_ns.max(COLD_HOLD.as_nanos() as u64),
    };
    hold.min(cap_ns)
}

/// Whether a request abandoned `elapsed_ns` after admission outlived
/// `estimate_ns`.
pub fn outlived(estimate_ns: Option<u64>, elapsed_ns: u64) -> bool {
    estimate_ns.is_some_and(|e| elapsed_ns >= e)
}

/// Marks the endpoint uncovered at host time `now_ns` (key
/// [`crate::shared_keys::outlived`]; last writer wins).
pub fn mark_outlived<S: SharedData>(store: &S, key: &str, now_ns: u64) -> Result<(), StoreError> {
    store.set(key, &now_ns.to_le_bytes(), 0)
}

/// Whether the endpoint is uncovered at `now_ns` (see [`Durations::Uncovered`]).
pub fn uncovered<S: SharedData>(store: &S, key: &str, now_ns: u64) -> bool {
    as_u64(
        &store
            .get(key)
            .ok()
            .flatten()
            .map(|(v, _)| v)
            .unwrap_or_default(),
    )
    .is_some_and(|at| at > 0 && now_ns.saturating_sub(at) < UNCOVERED_FOR.as_nanos() as u64)
}

/// Slots of abandoned requests this worker still holds, each with the host
/// time (ns) at which to release it. The list owns them: each comes out once.
#[derive(Debug, Default)]
pub struct HeldSlots {
    held: Vec<(Slot, u64)>,
}

impl HeldSlots {
    pub fn hold(&mut self, slot: Slot, until_ns: u64) {
        self.held.push((slot, until_ns));
    }

    /// When the next held slot is due, if any is held.
    pub fn next_due(&self) -> Option<u64> {
        self.held.iter().map(|&(_, until)| until).min()
    }

    /// Removes and returns the slots due at `now_ns`.
    pub fn take_due(&mut self, now_ns: u64) -> Vec<Slot> {
        let (due, kept) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|&(_, until)| until <= now_ns);
        self.held = kept;
        due.into_iter().map(|(slot, _)| slot).collect()
    }

    /// Removes and returns every held slot (the VM is going away).
    pub fn take_all(&mut self) -> Vec<Slot> {
        self.held.drain(..).map(|(slot, _)| slot).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EndpointId;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const MS: u64 = 1_000_000;

    #[test]
    fn estimate_is_the_recent_maximum() {
        let mut d = RecentDurations::default();
        assert_eq!(d.estimate_ns(), None);
        d.record(300 * MS);
        assert_eq!(d.take_unpublished(), Some(300 * MS), "published");
        d.record(200 * MS);
        assert_eq!(d.take_unpublished(), None, "unchanged: not published again");
        assert_eq!(d.estimate_ns(), Some(300 * MS));
        // The 300 ms sample ages out after SAMPLES newer ones; a tick in
        // between publishes what changed, once.
        let published: Vec<_> = (0..SAMPLES)
            .filter_map(|_| {
                d.record(100 * MS);
                d.take_unpublished()
            })
            .collect();
        assert_eq!(published, vec![200 * MS, 100 * MS]);
        assert_eq!(d.estimate_ns(), Some(100 * MS));
    }

    #[test]
    fn hold_is_the_rest_of_the_estimate_within_the_cap() {
        let cap = Duration::from_secs(2);
        let e = Durations::Estimate;
        assert_eq!(hold_ns(e(300 * MS), 100 * MS, cap), 200 * MS);
        assert_eq!(hold_ns(e(9_000 * MS), 100 * MS, cap), 2_000 * MS);
        assert_eq!(hold_ns(e(300 * MS), 0, Duration::ZERO), 0);
        assert_eq!(hold_ns(Durations::Unknown, 0, Duration::ZERO), 0);
    }

    #[test]
    fn a_request_that_outlived_the_estimate_is_held_to_the_cap() {
        let cap = Duration::from_secs(4);
        let e = Durations::Estimate;
        assert_eq!(hold_ns(e(50 * MS), 200 * MS, cap), 3_800 * MS);
        assert_eq!(hold_ns(e(300 * MS), 300 * MS, cap), 3_700 * MS);
        assert_eq!(hold_ns(e(300 * MS), 5_000 * MS, cap), 0);
        assert!(outlived(Some(50 * MS), 200 * MS));
        assert!(!outlived(Some(50 * MS), 20 * MS));
        assert!(!outlived(None, 20 * MS));
        // Uncovered: even a request abandoned early is held to the cap.
        assert_eq!(hold_ns(Durations::Uncovered, 20 * MS, cap), 3_980 * MS);
    }

    #[test]
    fn uncovered_for_a_while_after_a_request_outlived_the_estimate() {
        let store = crate::shared_data::MemSharedData::default();
        let key = "sluice:t:ep:/p:outlived-ns";
        assert!(!uncovered(&store, key, 5 * MS));
        mark_outlived(&store, key, 10 * MS).unwrap();
        assert!(uncovered(&store, key, 10 * MS));
        let window = UNCOVERED_FOR.as_nanos() as u64;
        assert!(uncovered(&store, key, 10 * MS + window - 1));
        assert!(!uncovered(&store, key, 10 * MS + window));
    }

    #[test]
    fn a_cold_endpoint_holds_as_long_again_at_least_the_cold_hold() {
        let cap = Duration::from_secs(30);
        let u = Durations::Unknown;
        assert_eq!(hold_ns(u, 100 * MS, cap), 1_000 * MS);
        assert_eq!(hold_ns(u, 2_500 * MS, cap), 2_500 * MS);
        assert_eq!(hold_ns(u, 100 * MS, Duration::from_millis(500)), 500 * MS);
    }

    #[test]
    fn held_slots_come_out_once_when_due() {
        let slot = |ep| Slot::new(EndpointId(ep), None, None, 1);
        let eps = |slots: Vec<Slot>| slots.iter().map(|s| s.endpoint().0).collect::<Vec<_>>();
        let mut h = HeldSlots::default();
        h.hold(slot(0), 100);
        h.hold(slot(1), 300);
        h.hold(slot(0), 200);
        assert!(h.take_due(99).is_empty());
        assert_eq!(eps(h.take_due(200)), vec![0, 0]);
        assert!(h.take_due(200).is_empty());
        assert_eq!(eps(h.take_all()), vec![1]);
        assert_eq!(h.next_due(), None);
    }
}
