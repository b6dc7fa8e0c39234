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

    /// How long a request of this endpoint lasts, `None` before any finished.
    pub fn estimate_ns(&self) -> Option<u64> {
        self.samples_ns[..self.len].iter().copied().max()
    }
}

/// How much longer to hold the slot of a request abandoned `elapsed_ns`
/// after admission. With no estimate yet, the cap is the estimate: nothing
/// says the backend is done.
pub fn hold_ns(estimate_ns: Option<u64>, elapsed_ns: u64, cap: Duration) -> u64 {
    let cap_ns = cap.as_nanos() as u64;
    estimate_ns
        .unwrap_or(cap_ns)
        .saturating_sub(elapsed_ns)
        .min(cap_ns)
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
        assert_eq!(hold_ns(Some(300 * MS), 100 * MS, cap), 200 * MS);
        assert_eq!(hold_ns(Some(300 * MS), 400 * MS, cap), 0);
        assert_eq!(hold_ns(Some(9_000 * MS), 100 * MS, cap), 2_000 * MS);
        assert_eq!(hold_ns(None, 500 * MS, cap), 1_500 * MS);
        assert_eq!(hold_ns(Some(300 * MS), 0, Duration::ZERO), 0);
        assert_eq!(hold_ns(None, 0, Duration::ZERO), 0);
    }

    #[test]
    fn held_slots_come_out_once_when_due() {
        let slot = |ep| Slot::new(EndpointId(ep), None);
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
