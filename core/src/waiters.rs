//! One worker's own paused requests, with their deadlines.
//!
//! The shared record says *which ticket* may go; only the worker that paused a
//! request can resume it (Envoy), so each worker keeps its waiters here to map
//! a ticket back to its HTTP context and to time it out.

use crate::admission::{self, AdmissionError, Wakeups, WorkerId};
use crate::holding::{Slot, Ticket};
use crate::shared_data::SharedData;
use crate::EndpointId;

/// A request this worker paused: the owner of its ticket.
#[derive(Debug, PartialEq, Eq)]
pub struct LocalWaiter<T> {
    pub context_id: u32,
    pub ticket: Ticket,
    /// Host time (ns) at which it gets its 504.
    pub deadline_ns: u64,
    /// Whatever the host glue needs to finish the request.
    pub handle: T,
}

impl<T> LocalWaiter<T> {
    /// Its ticket, and what is left to answer or resume the request by.
    pub fn split(self) -> (Ticket, Left<T>) {
        let left = Left {
            context_id: self.context_id,
            endpoint: self.ticket.endpoint(),
            deadline_ns: self.deadline_ns,
            handle: self.handle,
        };
        (self.ticket, left)
    }
}

/// A paused request out of the queue, its ticket gone: to be resumed (with
/// the slot it now holds) or answered.
#[derive(Debug, PartialEq, Eq)]
pub struct Left<T> {
    pub context_id: u32,
    pub endpoint: EndpointId,
    pub deadline_ns: u64,
    pub handle: T,
}

/// What a [`LocalWaiters::claim`] took out of the queue.
#[derive(Debug)]
pub struct Claim<T> {
    /// Resume these with their slots.
    pub granted: Vec<(Slot, Left<T>)>,
    /// Answer these 503: the backend is unhealthy. They hold nothing.
    pub refused: Vec<Left<T>>,
    /// Answer these queue-full: a request of a higher class took their
    /// place. They hold nothing.
    pub pushed_out: Vec<Left<T>>,
    /// Slots granted to tickets no waiter here holds (cannot happen while
    /// a leaving request withdraws first): release them.
    pub orphans: Vec<Slot>,
    pub wakeups: Wakeups,
}

#[derive(Debug)]
pub struct LocalWaiters<T> {
    // Few entries per worker and mostly removed from the front: a Vec is
    // simpler and faster than anything indexed.
    waiters: Vec<LocalWaiter<T>>,
}

impl<T> Default for LocalWaiters<T> {
    fn default() -> Self {
        LocalWaiters {
            waiters: Vec::new(),
        }
    }
}

impl<T> LocalWaiters<T> {
    pub fn push(&mut self, w: LocalWaiter<T>) {
        self.waiters.push(w);
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Removes and returns the waiter of `context_id` (its client went away).
    pub fn remove_context(&mut self, context_id: u32) -> Option<LocalWaiter<T>> {
        let i = self
            .waiters
            .iter()
            .position(|w| w.context_id == context_id)?;
        Some(self.waiters.remove(i))
    }

    /// Removes and returns the waiter holding ticket `number` of `endpoint`.
    pub fn take_ticket(&mut self, endpoint: EndpointId, number: u32) -> Option<LocalWaiter<T>> {
        let i = self
            .waiters
            .iter()
            .position(|w| w.ticket.endpoint() == endpoint && w.ticket.number() == number)?;
        Some(self.waiters.remove(i))
    }

    /// Removes and returns every waiter whose deadline has passed, oldest first.
    pub fn take_expired(&mut self, now_ns: u64) -> Vec<LocalWaiter<T>> {
        let mut expired = Vec::new();
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].deadline_ns <= now_ns {
                expired.push(self.waiters.remove(i));
            } else {
                i += 1;
            }
        }
        expired
    }

    /// Claims this worker's granted tickets of `endpoint` in the record at
    /// `key` ([`admission::claim`]) and takes their waiters out.
    pub fn claim<S: SharedData>(
        &mut self,
        store: &S,
        key: &str,
        endpoint: EndpointId,
        worker: WorkerId,
        now_ns: u64,
    ) -> Result<Claim<T>, AdmissionError> {
        let claimed = admission::claim(store, key, worker, now_ns)?;
        let mut out = Claim {
            granted: Vec::with_capacity(claimed.granted.len()),
            refused: Vec::with_capacity(claimed.refused.len()),
            pushed_out: Vec::with_capacity(claimed.pushed_out.len()),
            orphans: Vec::new(),
            wakeups: claimed.wakeups,
        };
        for number in claimed.refused {
            // Refused: out of the record's queue, holding nothing.
            if let Some(w) = self.take_ticket(endpoint, number) {
                out.refused.push(w.split().1);
            }
        }
        for number in claimed.pushed_out {
            if let Some(w) = self.take_ticket(endpoint, number) {
                out.pushed_out.push(w.split().1);
            }
        }
        for (number, on, units) in claimed.granted {
            match self.take_ticket(endpoint, number) {
                Some(w) => {
                    let (ticket, left) = w.split();
                    out.granted
                        .push((Slot::new(ticket.endpoint(), None, on, units), left));
                }
                None => out.orphans.push(Slot::new(endpoint, None, on, units)),
            }
        }
        Ok(out)
    }

    /// The earliest deadline, if anyone waits.
    pub fn next_deadline(&self) -> Option<u64> {
        self.waiters.iter().map(|w| w.deadline_ns).min()
    }

    /// Endpoints this worker has waiters on (each once, ascending).
    pub fn endpoints(&self) -> Vec<EndpointId> {
        let mut eps: Vec<EndpointId> = self.waiters.iter().map(|w| w.ticket.endpoint()).collect();
        eps.sort_unstable();
        eps.dedup();
        eps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn w(context_id: u32, endpoint: usize, ticket: u32, deadline_ns: u64) -> LocalWaiter<()> {
        LocalWaiter {
            context_id,
            ticket: Ticket::new(EndpointId(endpoint), ticket),
            deadline_ns,
            handle: (),
        }
    }

    #[test]
    fn lookups_remove_exactly_one() {
        let mut q = LocalWaiters::default();
        q.push(w(10, 0, 1, 100));
        q.push(w(11, 1, 1, 100));
        q.push(w(12, 0, 2, 100));
        assert_eq!(q.endpoints(), vec![EndpointId(0), EndpointId(1)]);
        assert_eq!(
            q.take_ticket(EndpointId(0), 2).map(|w| w.context_id),
            Some(12)
        );
        assert_eq!(q.take_ticket(EndpointId(0), 2), None);
        assert_eq!(q.remove_context(11).map(|w| w.ticket.number()), Some(1));
        assert_eq!(q.remove_context(11), None);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_claim_matches_its_tickets_to_waiters() {
        use crate::shared_data::MemSharedData;
        const K: &str = "k";
        let store = MemSharedData::new();
        admission::configure(&store, K, Some(1), 0).unwrap();
        admission::acquire(&store, K, 10, 0, None, 0).unwrap();
        let mut q = LocalWaiters::default();
        for (context_id, worker) in [(1, 5), (2, 5), (3, 6)] {
            let ticket = match admission::acquire(&store, K, 10, worker, None, 0)
                .unwrap()
                .0
            {
                admission::Acquired::Queued { ticket, .. } => ticket,
                other => panic!("{other:?}"),
            };
            if worker == 5 {
                q.push(w(context_id, 0, ticket, 100));
            }
        }
        admission::release(
            &store,
            K,
            None,
            admission::Outcome::Unknown,
            Default::default(),
            0,
        )
        .unwrap();
        let c = q.claim(&store, K, EndpointId(0), 5, 0).unwrap();
        let got: Vec<_> = c.granted.iter().map(|(_, l)| l.context_id).collect();
        assert_eq!((got, c.refused.len(), c.orphans.len()), (vec![1], 0, 0));
        assert_eq!(q.len(), 1);
        admission::set_unhealthy(&store, K, true, 0).unwrap();
        let c = q.claim(&store, K, EndpointId(0), 5, 0).unwrap();
        assert_eq!(
            c.refused.iter().map(|l| l.context_id).collect::<Vec<_>>(),
            [2]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn expiry_is_at_the_deadline_not_before() {
        let mut q = LocalWaiters::default();
        q.push(w(1, 0, 1, 300));
        q.push(w(2, 0, 2, 100));
        q.push(w(3, 0, 3, 200));
        assert_eq!(q.next_deadline(), Some(100));
        assert!(q.take_expired(99).is_empty());
        let got: Vec<u32> = q
            .take_expired(200)
            .into_iter()
            .map(|w| w.context_id)
            .collect();
        assert_eq!(got, vec![2, 3]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.next_deadline(), Some(300));
    }
}
