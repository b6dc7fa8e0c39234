//! Per-endpoint admission across every worker of one Envoy process.
//!
//! Each endpoint has one shared-data record (its *key*) holding the number of
//! slots in use and the FIFO of waiting requests of all workers. Every
//! operation is one read-modify-CAS-write of that record, so the record is
//! the single source of truth and capacity holds exactly whatever the number
//! of workers.
//!
//! A freed slot is *handed over*: `release` does not lower `active` while
//! someone waits; it marks the oldest waiter `granted` (the slot stays
//! counted) and names that waiter's worker to be woken. The woken worker
//! `claim`s its granted tickets and resumes those requests. New arrivals can
//! never overtake a waiter, because a slot is only free when nobody waits.
//! A paused request can only be resumed by its own worker (Envoy), which is
//! why waiters carry their worker index.
//!
//! Record layout (little endian): `version:u8, active:u32, next_ticket:u32`,
//! then one 8-byte waiter each: `ticket:u32, worker:u16, flags:u16`.

use crate::shared_data::{SharedData, StoreError};

const VERSION: u8 = 1;
const HEADER_LEN: usize = 9;
const WAITER_LEN: usize = 8;
const FLAG_GRANTED: u16 = 1;
/// Bound on CAS retries of one operation. Each retry means another worker
/// completed an operation in between, so this is only reached if something
/// writes the key in a tight loop forever.
const MAX_CAS_ATTEMPTS: u32 = 10_000;

/// Identifies one VM (root context) of the plugin; see the filter for how it
/// is allocated.
pub type WorkerId = u16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionError {
    Store(StoreError),
    /// The record could not be decoded (another plugin wrote our key, or a
    /// different Sluice version shares the vm_id).
    Corrupt(&'static str),
    /// More than [`MAX_CAS_ATTEMPTS`] conflicts in a row.
    Contention,
    /// A release with no slot in use: a bug, reported rather than hidden.
    ReleaseWithoutSlot,
}

impl std::fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdmissionError::Store(e) => write!(f, "{e}"),
            AdmissionError::Corrupt(why) => write!(f, "endpoint record is corrupt: {why}"),
            AdmissionError::Contention => {
                write!(f, "gave up after {MAX_CAS_ATTEMPTS} CAS conflicts")
            }
            AdmissionError::ReleaseWithoutSlot => f.write_str("release with no slot in use"),
        }
    }
}

// `Store` is transparent: its Display is the store error's own, so it names
// no `source()` (a report would print the same text twice).
impl std::error::Error for AdmissionError {}

impl From<StoreError> for AdmissionError {
    fn from(e: StoreError) -> Self {
        AdmissionError::Store(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub ticket: u32,
    pub worker: WorkerId,
    /// A slot has been handed to this waiter; its worker has not claimed it yet.
    pub granted: bool,
}

/// The decoded shared record of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointState {
    /// Slots in use, including those granted to waiters not yet claimed.
    pub active: u32,
    pub next_ticket: u32,
    /// In arrival order.
    pub waiters: Vec<Waiter>,
}

impl EndpointState {
    pub fn decode(bytes: &[u8]) -> Result<Self, AdmissionError> {
        if bytes.len() < HEADER_LEN {
            return Err(AdmissionError::Corrupt("shorter than its header"));
        }
        if bytes[0] != VERSION {
            return Err(AdmissionError::Corrupt("unknown version"));
        }
        if !(bytes.len() - HEADER_LEN).is_multiple_of(WAITER_LEN) {
            return Err(AdmissionError::Corrupt("truncated waiter list"));
        }
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let waiters = bytes[HEADER_LEN..]
            .chunks_exact(WAITER_LEN)
            .map(|w| Waiter {
                ticket: u32_at(w, 0),
                worker: u16_at(w, 4),
                granted: u16_at(w, 6) & FLAG_GRANTED != 0,
            })
            .collect();
        Ok(EndpointState {
            active: u32_at(bytes, 1),
            next_ticket: u32_at(bytes, 5),
            waiters,
        })
    }

    /// A stored value: an empty one (what Envoy's remove leaves behind)
    /// reads as the neutral state.
    fn from_stored(bytes: &[u8]) -> Result<Self, AdmissionError> {
        if bytes.is_empty() {
            Ok(EndpointState::default())
        } else {
            EndpointState::decode(bytes)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.waiters.len() * WAITER_LEN);
        out.push(VERSION);
        out.extend_from_slice(&self.active.to_le_bytes());
        out.extend_from_slice(&self.next_ticket.to_le_bytes());
        for w in &self.waiters {
            out.extend_from_slice(&w.ticket.to_le_bytes());
            out.extend_from_slice(&w.worker.to_le_bytes());
            let flags = if w.granted { FLAG_GRANTED } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
        }
        out
    }

    /// Requests waiting for a slot (granted ones already hold theirs).
    pub fn queued(&self) -> u32 {
        self.waiters.iter().filter(|w| !w.granted).count() as u32
    }

    /// Hands free slots to the oldest waiters; returns whether anything changed.
    fn pump(&mut self, capacity: u32, wake: &mut Wakeups) -> bool {
        let mut changed = false;
        for w in self.waiters.iter_mut() {
            if self.active >= capacity {
                break;
            }
            if !w.granted {
                w.granted = true;
                self.active += 1;
                wake.add(w.worker);
                changed = true;
            }
        }
        changed
    }
}

/// Workers that must be told they have granted tickets to claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wakeups(Vec<WorkerId>);

impl Wakeups {
    fn add(&mut self, w: WorkerId) {
        if !self.0.contains(&w) {
            self.0.push(w);
        }
    }
    pub fn workers(&self) -> &[WorkerId] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub capacity: u32,
    pub max_queue: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// A slot is held: forward the request, `release` at its end.
    Admitted,
    /// Pause the request; its worker will be woken when `ticket` is granted.
    Queued { ticket: u32 },
    /// `max_queue` requests already wait: answer 503.
    QueueFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    /// The waiter left the queue and holds nothing.
    Removed,
    /// The waiter had just been granted a slot: the caller holds it now and
    /// must either forward the request or `release`.
    Granted,
    /// No such ticket (already claimed).
    NotFound,
}

/// Runs one read-modify-write of `key` until its CAS write wins. `op`
/// returns its result and whether it changed the state (no write if not).
fn update<S: SharedData, R>(
    store: &S,
    key: &str,
    mut op: impl FnMut(&mut EndpointState) -> Result<(R, bool), AdmissionError>,
) -> Result<R, AdmissionError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        // A missing key reads as the neutral state; `ensure` creates keys
        // before traffic because a write to a missing key ignores CAS.
        let (mut state, cas) = match store.get(key)? {
            Some((bytes, cas)) => (EndpointState::from_stored(&bytes)?, cas),
            None => (EndpointState::default(), 0),
        };
        let (result, changed) = op(&mut state)?;
        if !changed {
            return Ok(result);
        }
        match store.set(key, &state.encode(), cas) {
            Ok(()) => return Ok(result),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AdmissionError::Contention)
}

/// Creates the endpoint's record with neutral values if it does not exist.
/// Never touches a live record. Call it before the endpoint sees traffic
/// (Envoy runs `on_configure` on the main thread before the workers' VMs).
pub fn ensure<S: SharedData>(store: &S, key: &str) -> Result<(), AdmissionError> {
    match store.get(key)? {
        Some((bytes, _)) => EndpointState::from_stored(&bytes).map(|_| ()),
        None => Ok(store.set(key, &EndpointState::default().encode(), 0)?),
    }
}

/// Reads the record without changing it.
pub fn snapshot<S: SharedData>(store: &S, key: &str) -> Result<EndpointState, AdmissionError> {
    match store.get(key)? {
        Some((bytes, _)) => EndpointState::from_stored(&bytes),
        None => Ok(EndpointState::default()),
    }
}

/// A request arrives at `worker`.
pub fn acquire<S: SharedData>(
    store: &S,
    key: &str,
    limits: Limits,
    worker: WorkerId,
) -> Result<(Acquired, Wakeups), AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        let pumped = s.pump(limits.capacity, &mut wake);
        // After pumping, a free slot means nobody is waiting for it.
        if s.active < limits.capacity {
            s.active += 1;
            Ok(((Acquired::Admitted, wake), true))
        } else if s.queued() >= limits.max_queue {
            Ok(((Acquired::QueueFull, wake), pumped))
        } else {
            let ticket = s.next_ticket;
            s.next_ticket = s.next_ticket.wrapping_add(1);
            s.waiters.push(Waiter {
                ticket,
                worker,
                granted: false,
            });
            Ok(((Acquired::Queued { ticket }, wake), true))
        }
    })
}

/// A request that held a slot has ended; the slot goes to the oldest waiter.
pub fn release<S: SharedData>(
    store: &S,
    key: &str,
    capacity: u32,
) -> Result<Wakeups, AdmissionError> {
    update(store, key, |s| {
        if s.active == 0 {
            return Err(AdmissionError::ReleaseWithoutSlot);
        }
        s.active -= 1;
        let mut wake = Wakeups::default();
        s.pump(capacity, &mut wake);
        Ok((wake, true))
    })
}

/// Takes the tickets granted to `worker` out of the queue; each now holds a
/// slot and its request must be resumed (or released). Also hands out any
/// slots that are free (a backstop for lost wake-ups and capacity raises).
pub fn claim<S: SharedData>(
    store: &S,
    key: &str,
    worker: WorkerId,
    capacity: u32,
) -> Result<(Vec<u32>, Wakeups), AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        let pumped = s.pump(capacity, &mut wake);
        let mut mine = Vec::new();
        s.waiters.retain(|w| {
            if w.granted && w.worker == worker {
                mine.push(w.ticket);
                false
            } else {
                true
            }
        });
        let changed = pumped || !mine.is_empty();
        Ok(((mine, wake), changed))
    })
}

/// A waiter leaves the queue (timed out, or its client went away).
pub fn withdraw<S: SharedData>(
    store: &S,
    key: &str,
    ticket: u32,
) -> Result<Withdrawn, AdmissionError> {
    update(store, key, |s| {
        match s.waiters.iter().position(|w| w.ticket == ticket) {
            None => Ok((Withdrawn::NotFound, false)),
            Some(i) => {
                let granted = s.waiters.remove(i).granted;
                Ok((
                    if granted {
                        Withdrawn::Granted
                    } else {
                        Withdrawn::Removed
                    },
                    true,
                ))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_data::MemSharedData;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const K: &str = "sluice:test:/p";

    fn limits(capacity: u32, max_queue: u32) -> Limits {
        Limits {
            capacity,
            max_queue,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let s = EndpointState {
            active: 7,
            next_ticket: u32::MAX,
            waiters: vec![
                Waiter {
                    ticket: 1,
                    worker: 3,
                    granted: true,
                },
                Waiter {
                    ticket: 2,
                    worker: 65535,
                    granted: false,
                },
            ],
        };
        let bytes = s.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 2 * WAITER_LEN);
        assert_eq!(EndpointState::decode(&bytes).unwrap(), s);
        assert_eq!(
            EndpointState::decode(&bytes[..5]),
            Err(AdmissionError::Corrupt("shorter than its header"))
        );
        assert_eq!(
            EndpointState::decode(&bytes[..12]),
            Err(AdmissionError::Corrupt("truncated waiter list"))
        );
        let mut other = bytes.clone();
        other[0] = 9;
        assert_eq!(
            EndpointState::decode(&other),
            Err(AdmissionError::Corrupt("unknown version"))
        );
    }

    #[test]
    fn an_empty_value_reads_as_the_neutral_record() {
        // What Envoy's shared-data remove leaves behind.
        let store = MemSharedData::new();
        store.set(K, b"", 0).unwrap();
        ensure(&store, K).unwrap();
        assert_eq!(snapshot(&store, K).unwrap(), EndpointState::default());
        let (acquired, _) = acquire(&store, K, limits(1, 10), 0).unwrap();
        assert_eq!(acquired, Acquired::Admitted);
        assert_eq!(snapshot(&store, K).unwrap().active, 1);
    }

    #[test]
    fn ensure_creates_once_and_never_resets_a_live_record() {
        let store = MemSharedData::new();
        ensure(&store, K).unwrap();
        assert_eq!(snapshot(&store, K).unwrap(), EndpointState::default());
        acquire(&store, K, limits(2, 10), 0).unwrap();
        ensure(&store, K).unwrap();
        assert_eq!(snapshot(&store, K).unwrap().active, 1);
        store.set("sluice:other", b"junk", 0).unwrap();
        assert_eq!(
            ensure(&store, "sluice:other"),
            Err(AdmissionError::Corrupt("shorter than its header"))
        );
    }

    #[test]
    fn admits_up_to_capacity_then_queues_then_rejects() {
        let store = MemSharedData::new();
        ensure(&store, K).unwrap();
        let l = limits(2, 2);
        assert_eq!(acquire(&store, K, l, 0).unwrap().0, Acquired::Admitted);
        assert_eq!(acquire(&store, K, l, 1).unwrap().0, Acquired::Admitted);
        assert_eq!(
            acquire(&store, K, l, 0).unwrap().0,
            Acquired::Queued { ticket: 0 }
        );
        assert_eq!(
            acquire(&store, K, l, 1).unwrap().0,
            Acquired::Queued { ticket: 1 }
        );
        assert_eq!(acquire(&store, K, l, 2).unwrap().0, Acquired::QueueFull);
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.queued()), (2, 2));
    }

    #[test]
    fn max_queue_zero_never_queues() {
        let store = MemSharedData::new();
        let l = limits(1, 0);
        assert_eq!(acquire(&store, K, l, 0).unwrap().0, Acquired::Admitted);
        assert_eq!(acquire(&store, K, l, 0).unwrap().0, Acquired::QueueFull);
    }

    #[test]
    fn release_hands_the_slot_to_the_oldest_waiter_across_workers() {
        let store = MemSharedData::new();
        let l = limits(1, 10);
        assert_eq!(acquire(&store, K, l, 0).unwrap().0, Acquired::Admitted);
        // Waiters arrive on workers 2, 1, 2, 0 in that order.
        let mut tickets = Vec::new();
        for w in [2, 1, 2, 0] {
            match acquire(&store, K, l, w).unwrap().0 {
                Acquired::Queued { ticket } => tickets.push((ticket, w)),
                other => panic!("expected queued, got {other:?}"),
            }
        }
        let mut order = Vec::new();
        for _ in 0..4 {
            let wake = release(&store, K, 1).unwrap();
            assert_eq!(
                wake.workers().len(),
                1,
                "exactly one slot freed, one worker woken"
            );
            let w = wake.workers()[0];
            // A worker that is not woken has nothing to claim.
            for other in [0, 1, 2].into_iter().filter(|o| *o != w) {
                assert!(claim(&store, K, other, 1).unwrap().0.is_empty());
            }
            let (mine, _) = claim(&store, K, w, 1).unwrap();
            assert_eq!(mine.len(), 1);
            order.push((mine[0], w));
            // The slot stayed counted throughout the hand-over.
            assert_eq!(snapshot(&store, K).unwrap().active, 1);
        }
        assert_eq!(order, tickets, "admitted in arrival order");
        release(&store, K, 1).unwrap();
        assert_eq!(
            snapshot(&store, K).unwrap(),
            EndpointState {
                active: 0,
                next_ticket: 4,
                waiters: vec![]
            }
        );
    }

    #[test]
    fn newcomers_do_not_overtake_a_granted_but_unclaimed_waiter() {
        let store = MemSharedData::new();
        let l = limits(1, 10);
        acquire(&store, K, l, 0).unwrap();
        assert!(matches!(
            acquire(&store, K, l, 1).unwrap().0,
            Acquired::Queued { .. }
        ));
        release(&store, K, 1).unwrap();
        // Slot granted to worker 1's waiter; a newcomer on worker 0 must queue.
        assert!(matches!(
            acquire(&store, K, l, 0).unwrap().0,
            Acquired::Queued { .. }
        ));
        assert_eq!(snapshot(&store, K).unwrap().active, 1);
    }

    #[test]
    fn withdraw_waiting_and_granted() {
        let store = MemSharedData::new();
        let l = limits(1, 10);
        acquire(&store, K, l, 0).unwrap();
        let Acquired::Queued { ticket: a } = acquire(&store, K, l, 1).unwrap().0 else {
            panic!()
        };
        let Acquired::Queued { ticket: b } = acquire(&store, K, l, 1).unwrap().0 else {
            panic!()
        };
        // Timed-out waiter leaves and holds nothing.
        assert_eq!(withdraw(&store, K, b).unwrap(), Withdrawn::Removed);
        assert_eq!(withdraw(&store, K, b).unwrap(), Withdrawn::NotFound);
        // A grant that races a client abort: the withdrawer now holds the slot.
        release(&store, K, 1).unwrap();
        assert_eq!(withdraw(&store, K, a).unwrap(), Withdrawn::Granted);
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.waiters.len()), (1, 0));
        release(&store, K, 1).unwrap();
        assert_eq!(snapshot(&store, K).unwrap().active, 0);
        assert_eq!(
            release(&store, K, 1),
            Err(AdmissionError::ReleaseWithoutSlot)
        );
    }

    #[test]
    fn capacity_raise_is_handed_out_by_claim_and_lower_capacity_drains() {
        let store = MemSharedData::new();
        acquire(&store, K, limits(1, 10), 0).unwrap();
        acquire(&store, K, limits(1, 10), 3).unwrap();
        acquire(&store, K, limits(1, 10), 3).unwrap();
        // Capacity raised to 3 (a new config): the tick's claim hands out both.
        let (mine, wake) = claim(&store, K, 3, 3).unwrap();
        assert_eq!(mine, vec![0, 1]);
        assert_eq!(wake.workers(), &[3]);
        assert_eq!(snapshot(&store, K).unwrap().active, 3);
        // Capacity lowered to 1 while 3 are in flight: releases grant nothing
        // until in-flight falls below the new capacity.
        acquire(&store, K, limits(1, 10), 0).unwrap();
        assert!(release(&store, K, 1).unwrap().is_empty());
        assert!(release(&store, K, 1).unwrap().is_empty());
        assert_eq!(release(&store, K, 1).unwrap().workers(), &[0]);
    }

    /// Several threads act as Envoy workers, each with its own requests, all
    /// racing on one record. Capacity must hold at every instant and nothing
    /// may leak, whatever the interleaving.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn racing_workers_never_exceed_capacity_and_leak_nothing() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;

        const CAPACITY: u32 = 3;
        const WORKERS: u16 = 6;
        const REQUESTS: u32 = 400;
        let store = Arc::new(MemSharedData::new());
        ensure(&*store, K).unwrap();
        let in_flight = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let timed_out = Arc::new(AtomicU32::new(0));
        let l = limits(CAPACITY, 1000);

        let threads: Vec<_> = (0..WORKERS)
            .map(|worker| {
                let (store, in_flight, peak, timed_out) = (
                    store.clone(),
                    in_flight.clone(),
                    peak.clone(),
                    timed_out.clone(),
                );
                std::thread::spawn(move || {
                    for i in 0..REQUESTS {
                        let mut holding = match acquire(&*store, K, l, worker).unwrap().0 {
                            Acquired::Admitted => true,
                            Acquired::QueueFull => panic!("queue cannot fill here"),
                            Acquired::Queued { ticket } => {
                                // Poll like a tick; every 7th request gives up
                                // early like a client abort or a timeout.
                                let patience = if i % 7 == 0 { 3 } else { u32::MAX };
                                let mut got = false;
                                for _ in 0..patience {
                                    let (mine, _) = claim(&*store, K, worker, CAPACITY).unwrap();
                                    assert!(
                                        mine.iter().all(|t| *t == ticket),
                                        "one request per thread"
                                    );
                                    if !mine.is_empty() {
                                        got = true;
                                        break;
                                    }
                                    std::thread::yield_now();
                                }
                                if !got {
                                    match withdraw(&*store, K, ticket).unwrap() {
                                        Withdrawn::Removed => {
                                            timed_out.fetch_add(1, Ordering::SeqCst)
                                        }
                                        Withdrawn::Granted => {
                                            got = true;
                                            0
                                        }
                                        Withdrawn::NotFound => panic!("ticket vanished"),
                                    };
                                }
                                got
                            }
                        };
                        if holding {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            assert!(now <= CAPACITY, "{now} in flight with capacity {CAPACITY}");
                            std::thread::yield_now();
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            release(&*store, K, CAPACITY).unwrap();
                            holding = false;
                        }
                        assert!(!holding);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = snapshot(&*store, K).unwrap();
        assert_eq!(s.active, 0, "slots leaked: {s:?}");
        assert!(s.waiters.is_empty(), "waiters leaked: {s:?}");
        assert_eq!(
            peak.load(Ordering::SeqCst),
            CAPACITY,
            "the race should reach capacity"
        );
        assert!(s.next_ticket > 0, "the race should have queued requests");
    }
}
