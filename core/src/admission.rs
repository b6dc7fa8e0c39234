//! Per-endpoint admission across every worker of one Envoy process.
//!
//! Each endpoint has one shared-data record (its *key*) holding the number of
//! slots in use, the FIFO of waiting requests of all workers, and the
//! capacity in force. Every operation is one read-modify-CAS-write of that
//! record, so the record is the single source of truth: capacity holds
//! exactly whatever the number of workers, and a capacity change (from sync,
//! or from a new Envoy configuration) reaches every worker, old VMs still
//! draining included, with the read the request path does anyway.
//!
//! A freed slot is *handed over*: `release` does not lower `active` while
//! someone waits; it marks the oldest waiter `granted` (the slot stays
//! counted) and names that waiter's worker to be woken. The woken worker
//! `claim`s its granted tickets and resumes those requests. New arrivals can
//! never overtake a waiter, because a slot is only free when nobody waits.
//! A paused request can only be resumed by its own worker (Envoy), which is
//! why waiters carry their worker index.
//!
//! Record layout (little endian), version 2:
//!
//! | bytes | field | |
//! |---|---|---|
//! | 1 | `version` | 2 |
//! | 4 | `active` | slots in use, granted-but-unclaimed included |
//! | 4 | `next_ticket` | |
//! | 4 | `capacity` | in force; 0: none, requests pass (counted, never queued) |
//! | 4 | `configured` | the capacity of the last configuration seen; 0: none |
//! | 8 | `sync_version` | version of the snapshot that last set it; 0: never |
//! | 1 | `flags` | bit 0: capacity came from sync; bit 1: backend unhealthy |
//!
//! then one 8-byte waiter each: `ticket:u32, worker:u16, flags:u16`.

use crate::cas::{self, u16_at, u32_at, u64_at, MAX_CAS_ATTEMPTS};
use crate::shared_data::{SharedData, StoreError};

const VERSION: u8 = 2;
const HEADER_LEN: usize = 26;
const WAITER_LEN: usize = 8;
const FLAG_GRANTED: u16 = 1;
const FLAG_FROM_SYNC: u8 = 1;
const FLAG_UNHEALTHY: u8 = 2;

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
        match e {
            StoreError::Contention => AdmissionError::Contention,
            e => AdmissionError::Store(e),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub ticket: u32,
    pub worker: WorkerId,
    /// A slot has been handed to this waiter; its worker has not claimed it yet.
    pub granted: bool,
}

/// Who set the capacity in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CapacitySource {
    /// The plugin configuration (or none yet).
    #[default]
    Config,
    /// A snapshot of the sync service.
    Sync,
}

impl CapacitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            CapacitySource::Config => "config",
            CapacitySource::Sync => "sync",
        }
    }
}

/// The decoded shared record of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointState {
    /// Slots in use, including those granted to waiters not yet claimed.
    pub active: u32,
    pub next_ticket: u32,
    /// The capacity in force; `None`: requests pass through (counted).
    pub capacity: Option<u32>,
    /// The capacity of the last configuration applied, to tell an operator's
    /// change from the same configuration seen again by another VM.
    pub configured: Option<u32>,
    pub source: CapacitySource,
    /// Version of the sync snapshot that last set `capacity` (0: never).
    pub sync_version: u64,
    /// The backend failed its health checks: new and queued requests get 503.
    pub unhealthy: bool,
    /// In arrival order.
    pub waiters: Vec<Waiter>,
}

fn nonzero(n: u32) -> Option<u32> {
    (n != 0).then_some(n)
}

impl EndpointState {
    pub fn decode(bytes: &[u8]) -> Result<Self, AdmissionError> {
        if bytes.is_empty() {
            return Err(AdmissionError::Corrupt("shorter than its header"));
        }
        if bytes[0] != VERSION {
            return Err(AdmissionError::Corrupt("unknown version"));
        }
        if bytes.len() < HEADER_LEN {
            return Err(AdmissionError::Corrupt("shorter than its header"));
        }
        if !(bytes.len() - HEADER_LEN).is_multiple_of(WAITER_LEN) {
            return Err(AdmissionError::Corrupt("truncated waiter list"));
        }
        // In bounds: the lengths are checked above.
        let (u16_at, u32_at) = (
            |b, i| u16_at(b, i).unwrap_or(0),
            |b, i| u32_at(b, i).unwrap_or(0),
        );
        let waiters = bytes[HEADER_LEN..]
            .chunks_exact(WAITER_LEN)
            .map(|w| Waiter {
                ticket: u32_at(w, 0),
                worker: u16_at(w, 4),
                granted: u16_at(w, 6) & FLAG_GRANTED != 0,
            })
            .collect();
        let flags = bytes[25];
        Ok(EndpointState {
            active: u32_at(bytes, 1),
            next_ticket: u32_at(bytes, 5),
            capacity: nonzero(u32_at(bytes, 9)),
            configured: nonzero(u32_at(bytes, 13)),
            sync_version: u64_at(bytes, 17).unwrap_or(0),
            source: if flags & FLAG_FROM_SYNC != 0 {
                CapacitySource::Sync
            } else {
                CapacitySource::Config
            },
            unhealthy: flags & FLAG_UNHEALTHY != 0,
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
        out.extend_from_slice(&self.capacity.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.configured.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.sync_version.to_le_bytes());
        let mut flags = 0;
        if self.source == CapacitySource::Sync {
            flags |= FLAG_FROM_SYNC;
        }
        if self.unhealthy {
            flags |= FLAG_UNHEALTHY;
        }
        out.push(flags);
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

    /// Slots admissions may use: without a capacity, no limit.
    fn limit(&self) -> u32 {
        self.capacity.unwrap_or(u32::MAX)
    }

    /// Hands free slots to the oldest waiters; returns whether anything
    /// changed. Nothing is handed out while the backend is unhealthy: those
    /// waiters are being answered 503.
    fn pump(&mut self, wake: &mut Wakeups) -> bool {
        if self.unhealthy {
            return false;
        }
        let limit = self.limit();
        let mut changed = false;
        for w in self.waiters.iter_mut() {
            if self.active >= limit {
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
pub enum Acquired {
    /// A slot is held: forward the request, `release` at its end.
    Admitted,
    /// Pause the request; its worker will be woken when `ticket` is granted.
    Queued { ticket: u32 },
    /// `max_queue` requests already wait: answer 503.
    QueueFull,
    /// The backend is marked unhealthy: answer 503 at once. Holds nothing.
    Unhealthy,
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

/// What a worker's `claim` found for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// Tickets that now hold a slot: resume those requests (or release).
    pub granted: Vec<u32>,
    /// Tickets taken out of the queue because the backend is unhealthy:
    /// answer those requests 503. They hold nothing.
    pub refused: Vec<u32>,
    pub wakeups: Wakeups,
}

/// One read-modify-CAS-write of the record at `key` ([`cas::update`]).
/// `op` returns its result and whether it changed the state (no write if not).
fn update<S: SharedData, R>(
    store: &S,
    key: &str,
    mut op: impl FnMut(&mut EndpointState) -> Result<(R, bool), AdmissionError>,
) -> Result<R, AdmissionError> {
    cas::update(store, key, |value| {
        // A missing key reads as the neutral state; `configure` creates keys
        // before traffic because a write to a missing key ignores CAS.
        let mut state = match value {
            Some(bytes) => EndpointState::from_stored(bytes)?,
            None => EndpointState::default(),
        };
        let (result, changed) = op(&mut state)?;
        Ok((result, changed.then(|| state.encode())))
    })
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

/// A configuration that gives the endpoint `configured` as its capacity is
/// being applied (by each of Envoy's N+2 `on_configure`s of it).
///
/// The most recent change wins: the configured value replaces the capacity
/// in force only when it differs from the last configured one (an operator
/// changed it); the same configuration seen again by another VM leaves a
/// capacity that sync set since alone. An endpoint configured without a
/// capacity keeps a capacity sync gave it. Creates the record if needed.
pub fn configure<S: SharedData>(
    store: &S,
    key: &str,
    configured: Option<u32>,
) -> Result<Wakeups, AdmissionError> {
    ensure(store, key)?;
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        if s.configured == configured {
            return Ok((wake, false));
        }
        s.configured = configured;
        match configured {
            Some(c) => {
                s.capacity = Some(c);
                s.source = CapacitySource::Config;
            }
            None if s.source == CapacitySource::Config => s.capacity = None,
            None => {}
        }
        // A raise (or a capacity removed) admits waiters at once.
        s.pump(&mut wake);
        Ok((wake, true))
    })
}

/// A sync snapshot of `version` says the endpoint takes `capacity`. `None`
/// when the record already holds a newer version (the snapshot is ignored);
/// otherwise the workers whose waiters a raise admitted.
pub fn apply_sync<S: SharedData>(
    store: &S,
    key: &str,
    capacity: u32,
    version: u64,
) -> Result<Option<Wakeups>, AdmissionError> {
    update(store, key, |s| {
        if version < s.sync_version {
            return Ok((None, false));
        }
        let mut wake = Wakeups::default();
        if capacity == 0
            || (s.capacity == Some(capacity)
                && s.source == CapacitySource::Sync
                && s.sync_version == version)
        {
            return Ok((Some(wake), false));
        }
        s.capacity = Some(capacity);
        s.source = CapacitySource::Sync;
        s.sync_version = version;
        // Raised: the oldest waiters get the new slots now. Lowered: nothing
        // is cut; releases grant nothing until fewer than `capacity` are in
        // flight.
        s.pump(&mut wake);
        Ok((Some(wake), true))
    })
}

/// Marks the endpoint's backend unhealthy or healthy again. Returns the
/// workers to wake: every worker with waiters when it turns unhealthy (they
/// answer them 503), the granted ones when it recovers.
pub fn set_unhealthy<S: SharedData>(
    store: &S,
    key: &str,
    unhealthy: bool,
) -> Result<Wakeups, AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        if s.unhealthy == unhealthy {
            return Ok((wake, false));
        }
        s.unhealthy = unhealthy;
        if unhealthy {
            for w in &s.waiters {
                wake.add(w.worker);
            }
        } else {
            s.pump(&mut wake);
        }
        Ok((wake, true))
    })
}

/// Reads the record without changing it.
pub fn snapshot<S: SharedData>(store: &S, key: &str) -> Result<EndpointState, AdmissionError> {
    match store.get(key)? {
        Some((bytes, _)) => EndpointState::from_stored(&bytes),
        None => Ok(EndpointState::default()),
    }
}

/// A request arrives at `worker`; at most `max_queue` may wait.
pub fn acquire<S: SharedData>(
    store: &S,
    key: &str,
    max_queue: u32,
    worker: WorkerId,
) -> Result<(Acquired, Wakeups), AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        if s.unhealthy {
            return Ok(((Acquired::Unhealthy, wake), false));
        }
        let pumped = s.pump(&mut wake);
        // After pumping, a free slot means nobody is waiting for it.
        if s.active < s.limit() {
            s.active += 1;
            Ok(((Acquired::Admitted, wake), true))
        } else if s.queued() >= max_queue {
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
pub fn release<S: SharedData>(store: &S, key: &str) -> Result<Wakeups, AdmissionError> {
    update(store, key, |s| {
        if s.active == 0 {
            return Err(AdmissionError::ReleaseWithoutSlot);
        }
        s.active -= 1;
        let mut wake = Wakeups::default();
        s.pump(&mut wake);
        Ok((wake, true))
    })
}

/// Takes the tickets granted to `worker` out of the queue; each now holds a
/// slot and its request must be resumed (or released). Also hands out any
/// slots that are free (a backstop for lost wake-ups and capacity raises).
/// While the backend is unhealthy, takes all of `worker`'s tickets out
/// instead, giving back the slots of granted ones: every one is refused.
pub fn claim<S: SharedData>(
    store: &S,
    key: &str,
    worker: WorkerId,
) -> Result<Claimed, AdmissionError> {
    update(store, key, |s| {
        let mut claimed = Claimed::default();
        if s.unhealthy {
            let mut freed = 0;
            s.waiters.retain(|w| {
                if w.worker != worker {
                    return true;
                }
                if w.granted {
                    freed += 1;
                }
                claimed.refused.push(w.ticket);
                false
            });
            s.active = s.active.saturating_sub(freed);
            let changed = !claimed.refused.is_empty();
            return Ok((claimed, changed));
        }
        let pumped = s.pump(&mut claimed.wakeups);
        s.waiters.retain(|w| {
            if w.granted && w.worker == worker {
                claimed.granted.push(w.ticket);
                false
            } else {
                true
            }
        });
        let changed = pumped || !claimed.granted.is_empty();
        Ok((claimed, changed))
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

    /// A store whose record of `K` is configured with `capacity`.
    fn store_with(capacity: u32) -> MemSharedData {
        let store = MemSharedData::new();
        configure(&store, K, Some(capacity)).unwrap();
        store
    }

    fn queued_ticket(store: &MemSharedData, max_queue: u32, worker: WorkerId) -> u32 {
        match acquire(store, K, max_queue, worker).unwrap().0 {
            Acquired::Queued { ticket } => ticket,
            other => panic!("expected queued, got {other:?}"),
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let s = EndpointState {
            active: 7,
            next_ticket: u32::MAX,
            capacity: Some(12),
            configured: Some(4),
            source: CapacitySource::Sync,
            sync_version: u64::MAX - 1,
            unhealthy: true,
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
        let neutral = EndpointState::default();
        assert_eq!(
            EndpointState::decode(&neutral.encode()).unwrap(),
            neutral,
            "no capacity and no configured capacity read back as None"
        );
        assert_eq!(
            EndpointState::decode(&bytes[..5]),
            Err(AdmissionError::Corrupt("shorter than its header"))
        );
        assert_eq!(
            EndpointState::decode(&bytes[..HEADER_LEN + 3]),
            Err(AdmissionError::Corrupt("truncated waiter list"))
        );
        let mut other = bytes.clone();
        other[0] = 1;
        assert_eq!(
            EndpointState::decode(&other),
            Err(AdmissionError::Corrupt("unknown version")),
            "a version-1 record (older Sluice sharing the vm_id) is refused"
        );
    }

    #[test]
    fn an_empty_value_reads_as_the_neutral_record() {
        // What Envoy's shared-data remove leaves behind.
        let store = MemSharedData::new();
        store.set(K, b"", 0).unwrap();
        configure(&store, K, Some(1)).unwrap();
        let (acquired, _) = acquire(&store, K, 10, 0).unwrap();
        assert_eq!(acquired, Acquired::Admitted);
        assert_eq!(snapshot(&store, K).unwrap().active, 1);
    }

    #[test]
    fn configure_creates_once_and_never_resets_a_live_record() {
        let store = store_with(2);
        acquire(&store, K, 10, 0).unwrap();
        configure(&store, K, Some(2)).unwrap();
        configure(&store, K, Some(3)).unwrap();
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.capacity), (1, Some(3)));
        store.set("sluice:other", b"junk", 0).unwrap();
        assert_eq!(
            configure(&store, "sluice:other", Some(1)),
            Err(AdmissionError::Corrupt("unknown version"))
        );
        // Without a capacity the record exists too.
        configure(&store, "sluice:none", None).unwrap();
        assert!(store.get("sluice:none").unwrap().is_some());
    }

    #[test]
    fn admits_up_to_capacity_then_queues_then_rejects() {
        let store = store_with(2);
        assert_eq!(acquire(&store, K, 2, 0).unwrap().0, Acquired::Admitted);
        assert_eq!(acquire(&store, K, 2, 1).unwrap().0, Acquired::Admitted);
        assert_eq!(queued_ticket(&store, 2, 0), 0);
        assert_eq!(queued_ticket(&store, 2, 1), 1);
        assert_eq!(acquire(&store, K, 2, 2).unwrap().0, Acquired::QueueFull);
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.queued()), (2, 2));
    }

    #[test]
    fn max_queue_zero_never_queues() {
        let store = store_with(1);
        assert_eq!(acquire(&store, K, 0, 0).unwrap().0, Acquired::Admitted);
        assert_eq!(acquire(&store, K, 0, 0).unwrap().0, Acquired::QueueFull);
    }

    #[test]
    fn without_a_capacity_requests_pass_counted_and_never_queue() {
        let store = MemSharedData::new();
        configure(&store, K, None).unwrap();
        for _ in 0..50 {
            assert_eq!(acquire(&store, K, 0, 0).unwrap().0, Acquired::Admitted);
        }
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.capacity), (50, None));
        // Sync gives it a capacity: nothing in flight is cut, newcomers wait.
        apply_sync(&store, K, 10, 1).unwrap().unwrap();
        assert_eq!(queued_ticket(&store, 10, 0), 0);
        for _ in 0..40 {
            assert!(release(&store, K).unwrap().is_empty());
        }
        // 10 in flight: the next release hands the slot to the waiter.
        assert_eq!(release(&store, K).unwrap().workers(), &[0]);
    }

    #[test]
    fn release_hands_the_slot_to_the_oldest_waiter_across_workers() {
        let store = store_with(1);
        assert_eq!(acquire(&store, K, 10, 0).unwrap().0, Acquired::Admitted);
        // Waiters arrive on workers 2, 1, 2, 0 in that order.
        let tickets: Vec<_> = [2, 1, 2, 0]
            .into_iter()
            .map(|w| (queued_ticket(&store, 10, w), w))
            .collect();
        let mut order = Vec::new();
        for _ in 0..4 {
            let wake = release(&store, K).unwrap();
            assert_eq!(
                wake.workers().len(),
                1,
                "exactly one slot freed, one worker woken"
            );
            let w = wake.workers()[0];
            // A worker that is not woken has nothing to claim.
            for other in [0, 1, 2].into_iter().filter(|o| *o != w) {
                assert!(claim(&store, K, other).unwrap().granted.is_empty());
            }
            let mine = claim(&store, K, w).unwrap().granted;
            assert_eq!(mine.len(), 1);
            order.push((mine[0], w));
            // The slot stayed counted throughout the hand-over.
            assert_eq!(snapshot(&store, K).unwrap().active, 1);
        }
        assert_eq!(order, tickets, "admitted in arrival order");
        release(&store, K).unwrap();
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.next_ticket, s.waiters.len()), (0, 4, 0));
    }

    #[test]
    fn newcomers_do_not_overtake_a_granted_but_unclaimed_waiter() {
        let store = store_with(1);
        acquire(&store, K, 10, 0).unwrap();
        queued_ticket(&store, 10, 1);
        release(&store, K).unwrap();
        // Slot granted to worker 1's waiter; a newcomer on worker 0 must queue.
        queued_ticket(&store, 10, 0);
        assert_eq!(snapshot(&store, K).unwrap().active, 1);
    }

    #[test]
    fn withdraw_waiting_and_granted() {
        let store = store_with(1);
        acquire(&store, K, 10, 0).unwrap();
        let a = queued_ticket(&store, 10, 1);
        let b = queued_ticket(&store, 10, 1);
        // Timed-out waiter leaves and holds nothing.
        assert_eq!(withdraw(&store, K, b).unwrap(), Withdrawn::Removed);
        assert_eq!(withdraw(&store, K, b).unwrap(), Withdrawn::NotFound);
        // A grant that races a client abort: the withdrawer now holds the slot.
        release(&store, K).unwrap();
        assert_eq!(withdraw(&store, K, a).unwrap(), Withdrawn::Granted);
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.waiters.len()), (1, 0));
        release(&store, K).unwrap();
        assert_eq!(snapshot(&store, K).unwrap().active, 0);
        assert_eq!(release(&store, K), Err(AdmissionError::ReleaseWithoutSlot));
    }

    #[test]
    fn sync_raise_admits_waiters_at_once_in_fifo_order() {
        let store = store_with(1);
        acquire(&store, K, 100, 0).unwrap();
        let tickets: Vec<_> = (0..6).map(|i| queued_ticket(&store, 100, i % 3)).collect();
        let wake = apply_sync(&store, K, 4, 7).unwrap().unwrap();
        // Three new slots go to the three oldest waiters, on workers 0, 1, 2.
        assert_eq!(wake.workers(), &[0, 1, 2]);
        let s = snapshot(&store, K).unwrap();
        let granted: Vec<_> = s
            .waiters
            .iter()
            .filter(|w| w.granted)
            .map(|w| w.ticket)
            .collect();
        assert_eq!(granted, tickets[..3]);
        assert_eq!(
            (s.active, s.capacity, s.source),
            (4, Some(4), CapacitySource::Sync)
        );
    }

    #[test]
    fn sync_lower_cuts_nothing_and_drains_below_the_new_capacity() {
        let store = store_with(3);
        for _ in 0..3 {
            acquire(&store, K, 10, 0).unwrap();
        }
        assert!(apply_sync(&store, K, 1, 2).unwrap().unwrap().is_empty());
        assert_eq!(snapshot(&store, K).unwrap().active, 3, "nothing cut");
        queued_ticket(&store, 10, 5);
        assert!(release(&store, K).unwrap().is_empty());
        assert!(release(&store, K).unwrap().is_empty());
        assert_eq!(release(&store, K).unwrap().workers(), &[5]);
    }

    #[test]
    fn an_older_snapshot_is_ignored_an_equal_one_applied() {
        let store = store_with(2);
        apply_sync(&store, K, 5, 10).unwrap().unwrap();
        assert_eq!(apply_sync(&store, K, 9, 9).unwrap(), None);
        assert_eq!(snapshot(&store, K).unwrap().capacity, Some(5));
        apply_sync(&store, K, 6, 10).unwrap().unwrap();
        assert_eq!(snapshot(&store, K).unwrap().capacity, Some(6));
    }

    /// The most recent change wins: a configuration seen again (another VM,
    /// the same LDS resource) leaves sync's value; an operator's new value
    /// replaces it; sync's next snapshot wins again.
    #[test]
    fn config_and_sync_most_recent_change_wins() {
        let store = store_with(4);
        apply_sync(&store, K, 8, 1).unwrap().unwrap();
        configure(&store, K, Some(4)).unwrap();
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.capacity, s.source), (Some(8), CapacitySource::Sync));
        configure(&store, K, Some(2)).unwrap();
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.capacity, s.source), (Some(2), CapacitySource::Config));
        apply_sync(&store, K, 8, 2).unwrap().unwrap();
        assert_eq!(snapshot(&store, K).unwrap().capacity, Some(8));
        // Capacity removed from the configuration: sync's value stays.
        configure(&store, K, None).unwrap();
        assert_eq!(snapshot(&store, K).unwrap().capacity, Some(8));
        // A config-set capacity removed from the configuration is gone.
        let store = store_with(4);
        configure(&store, K, None).unwrap();
        assert_eq!(snapshot(&store, K).unwrap().capacity, None);
    }

    #[test]
    fn unhealthy_refuses_newcomers_and_every_waiter_then_recovers() {
        let store = store_with(1);
        acquire(&store, K, 10, 0).unwrap();
        let a = queued_ticket(&store, 10, 1);
        let b = queued_ticket(&store, 10, 2);
        let c = queued_ticket(&store, 10, 1);
        release(&store, K).unwrap(); // a is granted, not claimed yet
        let wake = set_unhealthy(&store, K, true).unwrap();
        assert_eq!(wake.workers(), &[1, 2], "every worker with waiters");
        assert_eq!(acquire(&store, K, 10, 0).unwrap().0, Acquired::Unhealthy);
        let w1 = claim(&store, K, 1).unwrap();
        assert_eq!((w1.granted, w1.refused), (vec![], vec![a, c]));
        assert_eq!(claim(&store, K, 2).unwrap().refused, vec![b]);
        let s = snapshot(&store, K).unwrap();
        assert_eq!((s.active, s.waiters.len()), (0, 0), "a's slot given back");
        assert!(set_unhealthy(&store, K, false).unwrap().is_empty());
        assert_eq!(acquire(&store, K, 10, 0).unwrap().0, Acquired::Admitted);
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
        let store = Arc::new(store_with(CAPACITY));
        let in_flight = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let timed_out = Arc::new(AtomicU32::new(0));

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
                        let mut holding = match acquire(&*store, K, 1000, worker).unwrap().0 {
                            Acquired::Admitted => true,
                            Acquired::QueueFull | Acquired::Unhealthy => {
                                panic!("cannot happen here")
                            }
                            Acquired::Queued { ticket } => {
                                // Poll like a tick; every 7th request gives up
                                // early like a client abort or a timeout.
                                let patience = if i % 7 == 0 { 3 } else { u32::MAX };
                                let mut got = false;
                                for _ in 0..patience {
                                    let mine = claim(&*store, K, worker).unwrap().granted;
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
                            release(&*store, K).unwrap();
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
