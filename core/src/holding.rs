//! What one request holds, as a value: a [`Slot`] while it holds one of its
//! endpoint's slots, a [`Ticket`] while it waits for one. Neither is `Clone`
//! nor `Copy`, and each is given back by moving it into exactly one of the
//! operations that end it (release, withdraw, grant, refuse), so releasing
//! twice does not compile (tower's `OwnedSemaphorePermit`, without the drop:
//! a release is a shared-data write that can fail, and the filter decides
//! when it happens, e.g. later for an abandoned request).

use crate::admission::{
    self, Acquired, AdmissionError, Backlog, Class, Ejection, Outcome, Pin, Released, Wakeups,
    Withdrawn, WorkerId,
};
use crate::shared_data::SharedData;
use crate::EndpointId;
use std::net::SocketAddr;

/// One slot of an endpoint, counted in its record until released.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a slot stays counted until it is released"]
pub struct Slot {
    endpoint: EndpointId,
    /// Host time at which it was admitted, if it was timed.
    admitted_ns: Option<u64>,
    /// The instance it is counted on, if the endpoint picks instances.
    instance: Option<SocketAddr>,
    /// The units it holds (1 without `cost`).
    units: u32,
}

impl Slot {
    pub(crate) fn new(
        endpoint: EndpointId,
        admitted_ns: Option<u64>,
        instance: Option<SocketAddr>,
        units: u32,
    ) -> Slot {
        Slot {
            endpoint,
            admitted_ns,
            instance,
            units,
        }
    }

    /// The units it holds in its endpoint's record.
    pub fn units(&self) -> u32 {
        self.units
    }

    /// The instance the request must go to (and is counted on).
    pub fn instance(&self) -> Option<SocketAddr> {
        self.instance
    }

    pub fn endpoint(&self) -> EndpointId {
        self.endpoint
    }

    pub fn admitted_ns(&self) -> Option<u64> {
        self.admitted_ns
    }

    /// The same slot, timed from `admitted_ns` (`None`: untimed).
    pub fn timed(self, admitted_ns: Option<u64>) -> Slot {
        Slot {
            admitted_ns,
            ..self
        }
    }

    /// Gives the slot back to the record at `key` (its endpoint's): it goes
    /// to the oldest waiter, whose worker is among the wake-ups. How the
    /// request fared upstream feeds its instance's passive ejection.
    pub fn release<S: SharedData>(
        self,
        store: &S,
        key: &str,
        outcome: Outcome,
        ejection: Ejection,
        now_ns: u64,
    ) -> Result<Released, AdmissionError> {
        admission::release_units(
            store,
            key,
            self.instance,
            self.units,
            outcome,
            ejection,
            now_ns,
        )
    }

    /// Envoy sent the request to `served`, not to the instance it was
    /// picked for: the slot moves to what really runs it
    /// ([`admission::missed`]).
    pub fn missed<S: SharedData>(
        &mut self,
        store: &S,
        key: &str,
        served: Option<SocketAddr>,
        ejection: Ejection,
        now_ns: u64,
    ) -> Result<Wakeups, AdmissionError> {
        let Some(picked) = self.instance else {
            return Ok(Wakeups::default());
        };
        let (now_on, wakeups) =
            admission::missed(store, key, picked, served, self.units, ejection, now_ns)?;
        self.instance = now_on;
        Ok(wakeups)
    }
}

/// A place in an endpoint's queue.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a ticket stays in the queue until it is withdrawn, granted or refused"]
pub struct Ticket {
    endpoint: EndpointId,
    number: u32,
}

impl Ticket {
    pub(crate) fn new(endpoint: EndpointId, number: u32) -> Ticket {
        Ticket { endpoint, number }
    }

    pub fn endpoint(&self) -> EndpointId {
        self.endpoint
    }

    /// Its number in the record's queue.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Leaves the queue of the record at `key` (timed out, client gone, no
    /// room for its body). A slot granted to it in the meantime is the
    /// caller's now (untimed).
    pub fn withdraw<S: SharedData>(
        self,
        store: &S,
        key: &str,
    ) -> Result<Option<Slot>, AdmissionError> {
        Ok(match admission::withdraw(store, key, self.number)? {
            Withdrawn::Granted(on, units) => Some(Slot::new(self.endpoint, None, on, units)),
            // NotFound: the record was reset under us; it holds nothing either way.
            Withdrawn::Removed | Withdrawn::NotFound => None,
        })
    }
}

/// What became of a request on arrival.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Forward the request; the slot is untimed ([`Slot::timed`]).
    Admitted(Slot),
    /// Pause the request; its worker will be woken when the ticket is
    /// granted. With the requests waiting ahead of it, and the slots.
    Queued(Ticket, Backlog),
    /// `max_queue` requests already wait (or its class's): answer queue-full.
    QueueFull(Backlog),
    /// Its class is sheddable and no slot is free: answer queue-full.
    Shed(Backlog),
    /// The backend is marked unhealthy: answer 503.
    Unhealthy,
    /// It costs more than the largest capacity (given) and its endpoint
    /// refuses such requests: answer `too-costly`.
    TooCostly(u32),
}

/// A request to `endpoint` (record at `key`) arrives at `worker`; at most
/// `max_queue` may wait; a `pin` sticks it to one instance. See
/// [`admission::acquire`].
pub fn acquire<S: SharedData>(
    store: &S,
    key: &str,
    endpoint: EndpointId,
    max_queue: u32,
    worker: WorkerId,
    pin: Option<Pin>,
    now_ns: u64,
) -> Result<(Arrival, Wakeups), AdmissionError> {
    acquire_as(
        store,
        key,
        endpoint,
        max_queue,
        worker,
        pin,
        Class::DEFAULT,
        now_ns,
    )
}

/// [`acquire`] in a request class ([`admission::acquire_as`]).
#[allow(clippy::too_many_arguments)]
pub fn acquire_as<S: SharedData>(
    store: &S,
    key: &str,
    endpoint: EndpointId,
    max_queue: u32,
    worker: WorkerId,
    pin: Option<Pin>,
    class: Class,
    now_ns: u64,
) -> Result<(Arrival, Wakeups), AdmissionError> {
    let (acquired, wakeups) =
        admission::acquire_as(store, key, max_queue, worker, pin, class, now_ns)?;
    let arrival = match acquired {
        Acquired::Admitted(on) => {
            Arrival::Admitted(Slot::new(endpoint, None, on, class.cost.max(1)))
        }
        Acquired::Queued { ticket, backlog } => {
            Arrival::Queued(Ticket::new(endpoint, ticket), backlog)
        }
        Acquired::QueueFull(b) => Arrival::QueueFull(b),
        Acquired::Shed(b) => Arrival::Shed(b),
        Acquired::Unhealthy => Arrival::Unhealthy,
        Acquired::TooCostly(capacity) => Arrival::TooCostly(capacity),
    };
    Ok((arrival, wakeups))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_data::MemSharedData;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const K: &str = "sluice:t:ep:/p";

    fn release(slot: Slot, store: &MemSharedData) -> Result<Wakeups, AdmissionError> {
        slot.release(store, K, Outcome::Unknown, Ejection::default(), 0)
            .map(|r| r.wakeups)
    }
    const EP: EndpointId = EndpointId(3);

    #[test]
    fn a_slot_and_a_ticket_each_end_once() {
        let store = MemSharedData::new();
        admission::configure(&store, K, Some(1), 0).unwrap();
        let (Arrival::Admitted(slot), _) = acquire(&store, K, EP, 10, 0, None, 0).unwrap() else {
            panic!("admitted");
        };
        assert_eq!((slot.endpoint(), slot.admitted_ns()), (EP, None));
        let (Arrival::Queued(a, _), _) = acquire(&store, K, EP, 10, 1, None, 0).unwrap() else {
            panic!("queued");
        };
        let (Arrival::Queued(b, _), _) = acquire(&store, K, EP, 10, 1, None, 0).unwrap() else {
            panic!("queued");
        };
        assert_eq!(
            b.withdraw(&store, K).unwrap(),
            None,
            "left, holding nothing"
        );
        // The release hands the slot to `a`, which withdraws just after.
        assert_eq!(release(slot, &store).unwrap().workers(), &[1]);
        let slot = a.withdraw(&store, K).unwrap().expect("granted meanwhile");
        let slot = slot.timed(Some(7));
        assert_eq!((slot.endpoint(), slot.admitted_ns()), (EP, Some(7)));
        assert!(release(slot, &store).unwrap().is_empty());
        let s = admission::snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.waiters.len()), (0, 0));
    }

    #[test]
    fn refusals_and_full_queues_hold_nothing() {
        let store = MemSharedData::new();
        admission::configure(&store, K, Some(1), 0).unwrap();
        let (Arrival::Admitted(slot), _) = acquire(&store, K, EP, 0, 0, None, 0).unwrap() else {
            panic!("admitted");
        };
        assert_eq!(
            acquire(&store, K, EP, 0, 0, None, 0).unwrap().0,
            Arrival::QueueFull(Backlog { ahead: 0, slots: 1 })
        );
        admission::set_unhealthy(&store, K, true, 0).unwrap();
        assert_eq!(
            acquire(&store, K, EP, 0, 0, None, 0).unwrap().0,
            Arrival::Unhealthy
        );
        release(slot, &store).unwrap();
    }
}
