//! The admission operations against Envoy's CAS rules, and workers racing.

use super::record::{FLOW_LEN, HEADER_LEN, INSTANCE_LEN, WAITER_LEN};
use super::*;
use crate::shared_data::{MemSharedData, SharedData};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const K: &str = "sluice:test:/p";

// The operations without instances, at host time 0 (instance_tests.rs
// covers instances and time).
fn configure<S: SharedData>(s: &S, k: &str, c: Option<u32>) -> Result<Wakeups, AdmissionError> {
    super::configure(s, k, c, 0)
}
fn apply_sync<S: SharedData>(
    s: &S,
    k: &str,
    c: u32,
    v: u64,
) -> Result<Option<Wakeups>, AdmissionError> {
    super::apply_sync(s, k, c, v, 0)
}
fn set_unhealthy<S: SharedData>(s: &S, k: &str, u: bool) -> Result<Wakeups, AdmissionError> {
    super::set_unhealthy(s, k, u, 0)
}
fn acquire<S: SharedData>(
    s: &S,
    k: &str,
    max_queue: u32,
    w: WorkerId,
) -> Result<(Acquired, Wakeups), AdmissionError> {
    super::acquire(s, k, max_queue, w, None, 0)
}
fn release<S: SharedData>(s: &S, k: &str) -> Result<Wakeups, AdmissionError> {
    super::release(s, k, None, Outcome::Unknown, Ejection::default(), 0).map(|r| r.wakeups)
}
/// The granted tickets, and the refused ones.
struct Tickets {
    granted: Vec<u32>,
    refused: Vec<u32>,
}
fn claim<S: SharedData>(s: &S, k: &str, w: WorkerId) -> Result<Tickets, AdmissionError> {
    let c = super::claim(s, k, w, 0)?;
    assert!(c.granted.iter().all(|(_, on, _)| on.is_none()));
    Ok(Tickets {
        granted: c.granted.into_iter().map(|(t, _, _)| t).collect(),
        refused: c.refused,
    })
}

/// A store whose record of `K` is configured with `capacity`.
fn store_with(capacity: u32) -> MemSharedData {
    let store = MemSharedData::new();
    configure(&store, K, Some(capacity)).unwrap();
    store
}

fn queued_ticket(store: &MemSharedData, max_queue: u32, worker: WorkerId) -> u32 {
    match acquire(store, K, max_queue, worker).unwrap().0 {
        Acquired::Queued { ticket, .. } => ticket,
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
        instances_from_sync: true,
        turn: 1,
        virtual_time: u32::MAX - 5,
        flows: vec![0, 7, u32::MAX],
        share: Some(Share {
            slots: 3,
            fallback: 1,
        }),
        share_lease: ShareLease {
            until_ns: 5,
            fallback_until_ns: u64::MAX,
        },
        instances: vec![
            Instance::new("127.0.0.1:8001".parse().unwrap(), None),
            Instance {
                own_from_sync: true,
                active: 3,
                gone: true,
                strikes: 2,
                eject_until_ns: u64::MAX,
                picks_missed: 9,
                share: Some(Share {
                    slots: 0,
                    fallback: u32::MAX,
                }),
                ..Instance::new("[::1]:65535".parse().unwrap(), Some(8))
            },
        ],
        waiters: vec![
            Waiter {
                ticket: 1,
                worker: 3,
                granted: true,
                instance: Some(1),
                pinned: false,
                pushed_out: false,
                class: 2,
                priority: 7,
                flow: 3,
                tag: 123_456,
                cost: 25,
            },
            Waiter {
                ticket: 2,
                worker: 65535,
                granted: false,
                instance: Some(0),
                pinned: true,
                pushed_out: true,
                class: 0,
                priority: 255,
                flow: 0,
                tag: u32::MAX,
                cost: u32::MAX,
            },
        ],
    };
    let bytes = s.encode();
    assert_eq!(
        bytes.len(),
        HEADER_LEN + 2 * INSTANCE_LEN + 3 * FLOW_LEN + 2 * WAITER_LEN
    );
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
        Err(AdmissionError::Corrupt("truncated instance list"))
    );
    assert_eq!(
        EndpointState::decode(&bytes[..HEADER_LEN + 2 * INSTANCE_LEN + 3]),
        Err(AdmissionError::Corrupt("truncated flow list"))
    );
    assert_eq!(
        EndpointState::decode(&bytes[..HEADER_LEN + 2 * INSTANCE_LEN + 3 * FLOW_LEN + 3]),
        Err(AdmissionError::Corrupt("truncated waiter list"))
    );
    let mut other = bytes.clone();
    other[0] = 2;
    assert_eq!(
        EndpointState::decode(&other),
        Err(AdmissionError::Corrupt("unknown version")),
        "a version-2 record (older Sluice sharing the vm_id) is refused"
    );
}

#[test]
fn an_empty_value_reads_as_the_neutral_record() {
    // What Envoy's shared-data remove leaves behind.
    let store = MemSharedData::new();
    store.set(K, b"", 0).unwrap();
    configure(&store, K, Some(1)).unwrap();
    let (acquired, _) = acquire(&store, K, 10, 0).unwrap();
    assert_eq!(acquired, Acquired::Admitted(None));
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
    assert_eq!(
        acquire(&store, K, 2, 0).unwrap().0,
        Acquired::Admitted(None)
    );
    assert_eq!(
        acquire(&store, K, 2, 1).unwrap().0,
        Acquired::Admitted(None)
    );
    assert_eq!(queued_ticket(&store, 2, 0), 0);
    assert_eq!(queued_ticket(&store, 2, 1), 1);
    assert_eq!(
        acquire(&store, K, 2, 2).unwrap().0,
        Acquired::QueueFull(Backlog { ahead: 2, slots: 2 })
    );
    let s = snapshot(&store, K).unwrap();
    assert_eq!((s.active, s.queued()), (2, 2));
}

#[test]
fn max_queue_zero_never_queues() {
    let store = store_with(1);
    assert_eq!(
        acquire(&store, K, 0, 0).unwrap().0,
        Acquired::Admitted(None)
    );
    assert!(matches!(
        acquire(&store, K, 0, 0).unwrap().0,
        Acquired::QueueFull(_)
    ));
}

#[test]
fn without_a_capacity_requests_pass_counted_and_never_queue() {
    let store = MemSharedData::new();
    configure(&store, K, None).unwrap();
    for _ in 0..50 {
        assert_eq!(
            acquire(&store, K, 0, 0).unwrap().0,
            Acquired::Admitted(None)
        );
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
    assert_eq!(
        acquire(&store, K, 10, 0).unwrap().0,
        Acquired::Admitted(None)
    );
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
    assert_eq!(withdraw(&store, K, a).unwrap(), Withdrawn::Granted(None, 1));
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
    assert_eq!(
        acquire(&store, K, 10, 0).unwrap().0,
        Acquired::Admitted(None)
    );
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
                        Acquired::Admitted(_) => true,
                        Acquired::QueueFull(_)
                        | Acquired::Shed(_)
                        | Acquired::Unhealthy
                        | Acquired::TooCostly(_) => {
                            panic!("cannot happen here")
                        }
                        Acquired::Queued { ticket, .. } => {
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
                                    Withdrawn::Removed => timed_out.fetch_add(1, Ordering::SeqCst),
                                    Withdrawn::Granted(..) => {
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

// Classes: priority order, sheddable, per-class queue bounds, push-out.

fn class(index: u8, priority: u8) -> Class {
    Class {
        index,
        priority,
        ..Class::DEFAULT
    }
}

fn acquire_in<S: SharedData>(
    s: &S,
    max_queue: u32,
    w: WorkerId,
    c: Class,
) -> Result<(Acquired, Wakeups), AdmissionError> {
    super::acquire_as(s, K, max_queue, w, None, c, 0)
}

fn queued_in(store: &MemSharedData, max_queue: u32, w: WorkerId, c: Class) -> u32 {
    match acquire_in(store, max_queue, w, c).unwrap().0 {
        Acquired::Queued { ticket, .. } => ticket,
        other => panic!("expected to queue, got {other:?}"),
    }
}

/// Releases one slot at a time and returns the tickets in the order they
/// were granted.
fn grant_order(store: &MemSharedData, n: usize, worker: WorkerId) -> Vec<u32> {
    let mut order = Vec::new();
    for _ in 0..n {
        release(store, K).unwrap();
        order.extend(claim(store, K, worker).unwrap().granted);
    }
    order
}

#[test]
fn higher_priority_waiters_go_first_fifo_within_a_priority() {
    let store = store_with(1);
    assert!(matches!(
        acquire_in(&store, 100, 0, class(0, 0)).unwrap().0,
        Acquired::Admitted(None)
    ));
    let low1 = queued_in(&store, 100, 0, class(0, 0));
    let low2 = queued_in(&store, 100, 0, class(0, 0));
    let high1 = queued_in(&store, 100, 0, class(1, 9));
    let mid = queued_in(&store, 100, 0, class(2, 5));
    let high2 = queued_in(&store, 100, 0, class(1, 9));
    assert_eq!(
        grant_order(&store, 5, 0),
        vec![high1, high2, mid, low1, low2]
    );
}

#[test]
fn sheddable_is_admitted_when_free_and_refused_at_once_when_not() {
    let store = store_with(1);
    let shed = Class {
        sheddable: true,
        ..class(1, 0)
    };
    assert!(matches!(
        acquire_in(&store, 100, 0, shed).unwrap().0,
        Acquired::Admitted(None)
    ));
    assert_eq!(
        acquire_in(&store, 100, 0, shed).unwrap().0,
        Acquired::Shed(Backlog { ahead: 0, slots: 1 })
    );
    assert_eq!(snapshot(&store, K).unwrap().queued(), 0);
}

#[test]
fn a_class_max_queue_bounds_its_own_waiters_only() {
    let store = store_with(1);
    let batch = Class {
        max_queue: Some(2),
        ..class(1, 0)
    };
    acquire_in(&store, 100, 0, class(0, 5)).unwrap();
    queued_in(&store, 100, 0, batch);
    queued_in(&store, 100, 0, batch);
    assert!(matches!(
        acquire_in(&store, 100, 0, batch).unwrap().0,
        Acquired::QueueFull(_)
    ));
    queued_in(&store, 100, 0, class(0, 5));
    let s = snapshot(&store, K).unwrap();
    assert_eq!((s.queued_of(1), s.queued_of(0), s.queued()), (2, 1, 3));
}

#[test]
fn a_full_queue_pushes_out_the_newest_of_the_lowest_class_below() {
    let store = store_with(1);
    acquire_in(&store, 3, 0, class(0, 0)).unwrap();
    let low_old = queued_in(&store, 3, 1, class(0, 0));
    let mid = queued_in(&store, 3, 2, class(1, 5));
    let low_new = queued_in(&store, 3, 3, class(0, 0));
    // Full: an equal or lower priority is refused, pushing nobody out.
    assert_eq!(
        acquire_in(&store, 3, 4, class(0, 0)).unwrap().0,
        Acquired::QueueFull(Backlog { ahead: 3, slots: 1 })
    );
    let (got, wake) = acquire_in(&store, 3, 4, class(2, 9)).unwrap();
    let high = match got {
        Acquired::Queued { ticket, .. } => ticket,
        other => panic!("{other:?}"),
    };
    assert_eq!(wake.workers(), &[3], "the pushed-out one's worker");
    let s = snapshot(&store, K).unwrap();
    assert_eq!(s.queued(), 3, "the pushed-out one no longer counts");
    // Its worker claims it as pushed out; it held nothing.
    let c = super::claim(&store, K, 3, 0).unwrap();
    assert_eq!((c.pushed_out, c.granted.len()), (vec![low_new], 0));
    assert_eq!(snapshot(&store, K).unwrap().active, 1);
    // The rest are served highest first.
    release(&store, K).unwrap();
    assert_eq!(claim(&store, K, 4).unwrap().granted, vec![high]);
    release(&store, K).unwrap();
    assert_eq!(claim(&store, K, 2).unwrap().granted, vec![mid]);
    release(&store, K).unwrap();
    assert_eq!(claim(&store, K, 1).unwrap().granted, vec![low_old]);
    // A pushed-out ticket is never granted, and withdrawing one is a no-op
    // removal, not a slot.
    let s = snapshot(&store, K).unwrap();
    assert!(s.waiters.is_empty(), "{s:?}");
}

#[test]
fn a_pushed_out_waiter_that_times_out_first_withdraws_holding_nothing() {
    let store = store_with(1);
    acquire_in(&store, 1, 0, class(0, 0)).unwrap();
    let low = queued_in(&store, 1, 1, class(0, 0));
    queued_in(&store, 1, 2, class(1, 9));
    assert_eq!(withdraw(&store, K, low).unwrap(), Withdrawn::Removed);
    release(&store, K).unwrap();
    assert_eq!(claim(&store, K, 2).unwrap().granted.len(), 1);
    assert_eq!(snapshot(&store, K).unwrap().active, 1);
}

// Tenants: start-time fair queueing over flows within one priority.

fn tenant(flow: u8, weight: u32) -> Class {
    Class {
        flow,
        step: tag_step(weight),
        ..Class::DEFAULT
    }
}

#[test]
fn a_tenant_arriving_behind_a_flood_is_served_within_a_couple_of_slots() {
    let store = store_with(1);
    acquire_in(&store, 1000, 0, tenant(0, 1)).unwrap();
    let a: Vec<u32> = (0..200)
        .map(|_| queued_in(&store, 1000, 0, tenant(0, 1)))
        .collect();
    let b: Vec<u32> = (0..5)
        .map(|_| queued_in(&store, 1000, 0, tenant(1, 1)))
        .collect();
    let order = grant_order(&store, 12, 0);
    // In turn from the next slot on: A's oldest and B's, alternating.
    let place = |t: u32| order.iter().position(|&x| x == t).unwrap();
    for (i, &t) in b.iter().enumerate() {
        assert!(
            place(t) <= 2 * i + 1,
            "B's #{i} served {}th: {order:?}",
            place(t)
        );
    }
    // A keeps its own order.
    let a_served: Vec<u32> = order.iter().copied().filter(|t| a.contains(t)).collect();
    assert_eq!(a_served, a[..a_served.len()].to_vec());
}

#[test]
fn weights_three_to_one_share_the_slots_three_to_one_under_sustained_load() {
    let store = store_with(1);
    acquire_in(&store, 1000, 0, tenant(0, 1)).unwrap();
    let heavy: Vec<u32> = (0..100)
        .map(|_| queued_in(&store, 1000, 0, tenant(0, 3)))
        .collect();
    let light: Vec<u32> = (0..100)
        .map(|_| queued_in(&store, 1000, 0, tenant(1, 1)))
        .collect();
    let order = grant_order(&store, 80, 0);
    let h = order.iter().filter(|t| heavy.contains(t)).count();
    let l = order.iter().filter(|t| light.contains(t)).count();
    // 3:1, give or take the first turn.
    assert!((59..=61).contains(&h) && h + l == 80, "{h}:{l} {order:?}");
}

#[test]
fn an_idle_tenant_gets_no_credit_for_idling() {
    let store = store_with(1);
    // B was served long ago; A floods; B comes back with 3: they do not
    // all jump ahead of A, they take turns with it.
    acquire_in(&store, 1000, 0, tenant(1, 1)).unwrap();
    release(&store, K).unwrap();
    acquire_in(&store, 1000, 0, tenant(0, 1)).unwrap();
    let a: Vec<u32> = (0..50)
        .map(|_| queued_in(&store, 1000, 0, tenant(0, 1)))
        .collect();
    grant_order(&store, 30, 0);
    let b: Vec<u32> = (0..3)
        .map(|_| queued_in(&store, 1000, 0, tenant(1, 1)))
        .collect();
    let order = grant_order(&store, 6, 0);
    let is_b: Vec<bool> = order.iter().map(|t| b.contains(t)).collect();
    assert_eq!(
        is_b,
        [true, false, true, false, true, false],
        "{order:?} (A's: {a:?})"
    );
}

#[test]
fn priority_still_comes_before_fairness() {
    let store = store_with(1);
    acquire_in(&store, 1000, 0, tenant(0, 1)).unwrap();
    let low: Vec<u32> = (0..3)
        .map(|_| queued_in(&store, 1000, 0, tenant(1, 1)))
        .collect();
    let high = queued_in(
        &store,
        1000,
        0,
        Class {
            priority: 9,
            index: 1,
            ..tenant(0, 1)
        },
    );
    assert_eq!(grant_order(&store, 1, 0), vec![high]);
    assert_eq!(grant_order(&store, 3, 0), low);
}
