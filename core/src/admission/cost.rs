//! Cost per request: an endpoint may count its capacity in units (bytes of
//! body, tokens, whatever its `cost` says) instead of requests. `active`
//! and each instance's `active` then hold units, each waiter carries its
//! cost, and a request is admitted only when its units fit.
//!
//! Guarantees:
//! - The units in flight never exceed the capacity, except by the one
//!   request that costs more than the whole capacity and runs alone
//!   ([`OverCapacity::Alone`]): it is admitted only when nothing else holds
//!   units, and nothing else is admitted until it ends.
//! - No backfill: the waiter at the head of the serving order (priority,
//!   then fair-queueing tag, then arrival) is granted first; while its
//!   units do not fit, nobody behind it is granted, so a big request is
//!   never starved by a stream of small ones. A small request gets ahead
//!   of big ones only through its class (priority) or its tenant's turn
//!   (fair queueing charges a request `step × cost`, so a tenant sending
//!   big requests advances its flow's clock by their size).
//! - Without `cost` every request costs 1 unit: the record behaves exactly
//!   as it did counting requests.

use super::record::EndpointState;

/// What to do with a request costing more than the whole capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OverCapacity {
    /// It runs alone: admitted when nothing else holds units.
    #[default]
    Alone,
    /// It is refused at once (`too-costly`).
    Refuse,
}

/// The fair-queueing tag units charged for a request of `cost` units in a
/// flow of `step` units per request; bounded so that wrapping tag
/// comparisons stay meaningful (a span below 2^31).
pub fn charge(step: u32, cost: u32) -> u32 {
    const MOST: u32 = 1 << 24;
    step.saturating_mul(cost.max(1)).min(MOST)
}

/// Whether `cost` more units fit where `active` are in use under `limit`:
/// within the limit, or alone (nothing else in use). A limit of 0 (a share
/// of nothing) admits nothing.
pub fn fits(active: u32, cost: u32, limit: u32) -> bool {
    limit > 0 && (active == 0 || u64::from(active) + u64::from(cost) <= u64::from(limit))
}

impl EndpointState {
    /// The largest capacity one request can run under: the endpoint's, or
    /// with instances the largest of those still in the set; `None`: no
    /// limit.
    pub fn largest_capacity(&self) -> Option<u32> {
        if !self.picks_instances() {
            return self.capacity;
        }
        let mut largest = None;
        for i in self.instances.iter().filter(|i| !i.gone) {
            let c = i.own_capacity.or(self.capacity)?;
            largest = largest.max(Some(c));
        }
        largest
    }

    /// A request of `cost` units can never run within the capacity.
    pub fn too_costly(&self, cost: u32) -> bool {
        self.largest_capacity().is_some_and(|c| cost > c)
    }
}
