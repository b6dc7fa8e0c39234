//! The handover gap: how long a slot of a saturated path stays empty between
//! one request leaving it and the next one entering, seen from the backend.
//!
//! A proxy that queues in front of a backend of capacity `C` should refill a
//! freed slot at once while requests wait. Whatever it spends in between
//! (releasing, waking, resuming, connecting, writing) is time the backend
//! sits idle with work waiting: this is where a queue costs throughput.
//!
//! Definition, per path with a capacity `C`, counting the requests *inside*
//! (arrived at the backend, not yet answered or abandoned):
//!
//! - a **departure** that leaves fewer than `C` inside *opens a gap* if the
//!   path was full before it, or if gaps are already open. So gaps open only
//!   in a saturation episode, which starts when the path is full, and
//!   `open gaps == C - inside` holds throughout it; a path that never fills
//!   (the load is below capacity) records nothing;
//! - an **arrival** *closes the oldest open gap*: its length, arrival time
//!   minus departure time, is one sample. Oldest first because a queue
//!   hands the first freed slot to the first waiter;
//! - gaps still open when someone reads the figures are not samples: at the
//!   end of a run nobody is left to fill them.
//!
//! Times are nanoseconds on one clock chosen by the caller, so the same
//! bookkeeping runs on the backend's clock and, in the benchmark, on
//! timestamps from Envoy's access log. A departure can carry a tag (say, a
//! request id) that the arrival closing its gap gets back, to tell which
//! request handed its slot to which.

use hdrhistogram::Histogram;
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct HandoverGaps<T = ()> {
    capacity: u64,
    inside: u64,
    /// Departure times (and tags) of the slots waiting to be refilled,
    /// oldest first.
    open: VecDeque<(u64, T)>,
    /// Closed gaps, nanoseconds.
    gaps: Histogram<u64>,
    /// Since when more than `capacity` are inside, if they are.
    over_since: Option<u64>,
    over: OverCapacity,
}

/// Spells with more than `capacity` requests inside: a proxy that lets one
/// too many through, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OverCapacity {
    pub episodes: u64,
    pub longest_ns: u64,
    pub total_ns: u64,
}

/// What `GET /__backend/stats` reports, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GapSummary {
    pub count: u64,
    /// Gaps open right now (not counted in the figures).
    pub open: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl<T> HandoverGaps<T> {
    pub fn new(capacity: u64) -> HandoverGaps<T> {
        HandoverGaps {
            capacity,
            inside: 0,
            open: VecDeque::new(),
            gaps: Histogram::new(3).expect("3 significant digits is a valid histogram"),
            over_since: None,
            over: OverCapacity::default(),
        }
    }

    /// A request entered at `at_ns`; returns the gap it closed, if any,
    /// with the tag of the departure that opened it.
    pub fn arrive(&mut self, at_ns: u64) -> Option<(u64, T)> {
        self.inside += 1;
        if self.inside > self.capacity && self.over_since.is_none() {
            self.over_since = Some(at_ns);
            self.over.episodes += 1;
        }
        let (freed_at, tag) = self.open.pop_front()?;
        let gap = at_ns.saturating_sub(freed_at);
        // An auto-resizing histogram only fails on a value it cannot grow to.
        let _ = self.gaps.record(gap);
        Some((gap, tag))
    }

    /// A request left at `at_ns` (answered, or its client went away).
    pub fn depart(&mut self, at_ns: u64, tag: T) {
        let was_full = self.inside >= self.capacity;
        self.inside = self.inside.saturating_sub(1);
        if self.inside <= self.capacity {
            if let Some(since) = self.over_since.take() {
                let spell = at_ns.saturating_sub(since);
                self.over.longest_ns = self.over.longest_ns.max(spell);
                self.over.total_ns += spell;
            }
        }
        if self.inside < self.capacity && (was_full || !self.open.is_empty()) {
            self.open.push_back((at_ns, tag));
        }
    }

    /// Forgets the samples and the open gaps (a new measurement starts);
    /// the requests inside are still counted.
    pub fn reset(&mut self) {
        self.open.clear();
        self.gaps.reset();
        // A spell under way counts as one, from its real start.
        self.over = OverCapacity {
            episodes: u64::from(self.over_since.is_some()),
            ..OverCapacity::default()
        };
    }

    /// Spells over capacity that have ended.
    pub fn over_capacity(&self) -> OverCapacity {
        self.over
    }

    pub fn summary(&self) -> GapSummary {
        let ms = |ns: u64| ns as f64 / 1e6;
        let h = &self.gaps;
        if h.is_empty() {
            return GapSummary {
                open: self.open.len() as u64,
                ..GapSummary::default()
            };
        }
        GapSummary {
            count: h.len(),
            open: self.open.len() as u64,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// The gap an arrival closed, without its (empty) tag.
    fn arrive(g: &mut HandoverGaps, at: u64) -> Option<u64> {
        g.arrive(at).map(|(gap, ())| gap)
    }

    fn summary_counts(g: &HandoverGaps) -> (u64, u64) {
        let s = g.summary();
        (s.count, s.open)
    }

    #[test]
    fn below_capacity_nothing_is_a_gap() {
        let mut g = HandoverGaps::new(3);
        for t in 0..10 {
            g.arrive(t * MS);
            g.arrive(t * MS);
            g.depart(t * MS + 1, ());
            g.depart(t * MS + 2, ());
        }
        assert_eq!(summary_counts(&g), (0, 0));
    }

    #[test]
    fn a_slot_freed_at_capacity_is_timed_until_the_next_arrival() {
        let mut g = HandoverGaps::new(2);
        g.arrive(0);
        g.arrive(0);
        g.depart(10 * MS, ()); // full -> 1 inside: gap opens
        assert_eq!(summary_counts(&g), (0, 1));
        assert_eq!(arrive(&mut g, 10 * MS + 300_000), Some(300_000));
        let s = g.summary();
        assert_eq!((s.count, s.open), (1, 0));
        assert!((s.p50_ms - 0.3).abs() < 0.001, "{s:?}");
    }

    #[test]
    fn slots_freed_together_are_refilled_oldest_first() {
        let mut g = HandoverGaps::new(2);
        g.arrive(0);
        g.arrive(0);
        g.depart(10 * MS, ()); // opens (was full)
        g.depart(11 * MS, ()); // opens (a gap is open: same episode)
        assert_eq!(summary_counts(&g), (0, 2));
        assert_eq!(arrive(&mut g, 12 * MS), Some(2 * MS));
        assert_eq!(arrive(&mut g, 12 * MS), Some(MS));
        assert_eq!(
            arrive(&mut g, 13 * MS),
            None,
            "over capacity closes nothing"
        );
        assert_eq!(summary_counts(&g), (2, 0));
    }

    #[test]
    fn leaving_an_overfull_path_opens_nothing() {
        let mut g = HandoverGaps::new(1);
        g.arrive(0);
        g.arrive(0);
        g.depart(MS, ()); // 2 -> 1: still full
        assert_eq!(summary_counts(&g), (0, 0));
        g.depart(2 * MS, ()); // 1 -> 0: a slot is free
        assert_eq!(summary_counts(&g), (0, 1));
    }

    #[test]
    fn reset_forgets_samples_and_open_gaps_but_not_who_is_inside() {
        let mut g = HandoverGaps::new(1);
        g.arrive(0);
        g.depart(MS, ());
        g.arrive(2 * MS);
        g.depart(3 * MS, ());
        assert_eq!(summary_counts(&g), (1, 1));
        g.arrive(4 * MS);
        g.reset();
        assert_eq!(summary_counts(&g), (0, 0));
        // Still one inside: its departure frees the full path.
        g.depart(5 * MS, ());
        assert_eq!(arrive(&mut g, 6 * MS), Some(MS));
    }

    #[test]
    fn an_arrival_gets_back_the_tag_of_the_departure_it_follows() {
        let mut g = HandoverGaps::new(1);
        g.arrive(0);
        g.depart(MS, "a");
        assert_eq!(g.arrive(3 * MS), Some((2 * MS, "a")));
    }

    #[test]
    fn spells_over_capacity_are_counted_and_timed() {
        let mut g = HandoverGaps::new(1);
        g.arrive(0);
        g.arrive(MS); // 2 inside: a spell starts
        g.arrive(2 * MS); // still the same spell
        g.depart(3 * MS, ());
        g.depart(5 * MS, ()); // back to 1: the spell lasted 4 ms
        g.arrive(6 * MS);
        g.depart(6 * MS + 500, ());
        let o = g.over_capacity();
        assert_eq!(
            (o.episodes, o.longest_ns, o.total_ns),
            (2, 4 * MS, 4 * MS + 500)
        );
    }
}
