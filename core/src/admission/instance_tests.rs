//! Admission with instances: each held to its own capacity, a freed slot
//! going to the oldest waiter on that instance, sticky pins, passive
//! ejection, the set changing under traffic, and missed picks.

use super::*;
use crate::shared_data::MemSharedData;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const K: &str = "sluice:test:/p";
const S: u64 = 1_000_000_000;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Instances on ports 8001.. with these own capacities, the endpoint's
/// capacity `capacity`.
fn store_with(capacity: u32, own: &[Option<u32>]) -> MemSharedData {
    let store = MemSharedData::new();
    configure(&store, K, Some(capacity), 0).unwrap();
    let hosts: Vec<_> = own
        .iter()
        .enumerate()
        .map(|(i, &c)| (addr(8001 + i as u16), c))
        .collect();
    set_instances(&store, K, &hosts, InstanceSource::Config, 0).unwrap();
    store
}

fn admit(store: &MemSharedData, now: u64) -> Option<SocketAddr> {
    match acquire(store, K, 100, 0, None, now).unwrap().0 {
        Acquired::Admitted(on) => Some(on.expect("an instance is picked")),
        Acquired::Queued { .. } => None,
        other => panic!("unexpected {other:?}"),
    }
}

fn in_flight(store: &MemSharedData) -> Vec<u32> {
    snapshot(store, K)
        .unwrap()
        .instances
        .iter()
        .map(|i| i.active)
        .collect()
}

/// The record's entry of the instance at `on`.
fn inst(store: &MemSharedData, on: SocketAddr) -> Instance {
    let s = snapshot(store, K).unwrap();
    s.instances[s.instance_index(&on).expect("in the set")].clone()
}

fn done(store: &MemSharedData, on: SocketAddr, outcome: Outcome, now: u64) -> Released {
    release(store, K, Some(on), outcome, Ejection::default(), now).unwrap()
}

#[test]
fn each_instance_is_held_to_its_own_capacity_and_load_spreads() {
    let store = store_with(4, &[None, None, None]);
    let picks: Vec<_> = (0..12).map(|_| admit(&store, 0).unwrap()).collect();
    // Least loaded first, ties in turn: round robin while all are equal.
    assert_eq!(&picks[..3], &[addr(8002), addr(8003), addr(8001)]);
    assert_eq!(in_flight(&store), vec![4, 4, 4]);
    assert_eq!(admit(&store, 0), None, "all full: the 13th queues");
    assert_eq!(snapshot(&store, K).unwrap().total_capacity(0), Some(12));
}

#[test]
fn unequal_instances_fill_by_ratio() {
    let store = store_with(4, &[Some(2), None, Some(8)]);
    for _ in 0..14 {
        admit(&store, 0).unwrap();
    }
    assert_eq!(in_flight(&store), vec![2, 4, 8]);
    assert_eq!(admit(&store, 0), None);
    // Half-way, the load is proportional: 1, 2, 4 after 7.
    let store = store_with(4, &[Some(2), None, Some(8)]);
    for _ in 0..7 {
        admit(&store, 0).unwrap();
    }
    assert_eq!(in_flight(&store), vec![1, 2, 4]);
}

#[test]
fn a_freed_slot_goes_to_the_oldest_waiter_on_that_instance() {
    let store = store_with(1, &[None, None]);
    let a = admit(&store, 0).unwrap();
    let _b = admit(&store, 0).unwrap();
    let t1 = match acquire(&store, K, 10, 1, None, 0).unwrap().0 {
        Acquired::Queued { ticket, .. } => ticket,
        other => panic!("{other:?}"),
    };
    let _t2 = acquire(&store, K, 10, 2, None, 0).unwrap();
    let r = done(&store, a, Outcome::Served, 0);
    assert_eq!(r.wakeups.workers(), &[1], "the oldest waiter's worker");
    assert_eq!(claim(&store, K, 2, 0).unwrap().granted, vec![]);
    assert_eq!(
        claim(&store, K, 1, 0).unwrap().granted,
        vec![(t1, Some(a), 1)]
    );
    assert_eq!(in_flight(&store), vec![1, 1]);
}

#[test]
fn sticky_requests_wait_for_their_instance() {
    let store = store_with(1, &[None, None, None]);
    let pin = Pin::of(b"session-42");
    let on = match acquire(&store, K, 10, 0, Some(pin), 0).unwrap().0 {
        Acquired::Admitted(Some(on)) => on,
        other => panic!("{other:?}"),
    };
    // The same session again: its instance is full, so it waits, though
    // the other two are free.
    let ticket = match acquire(&store, K, 10, 0, Some(pin), 0).unwrap().0 {
        Acquired::Queued { ticket, .. } => ticket,
        other => panic!("{other:?}"),
    };
    // An unpinned request goes by it to a free instance.
    let other = admit(&store, 0).unwrap();
    assert_ne!(other, on);
    done(&store, other, Outcome::Served, 0);
    assert_eq!(claim(&store, K, 0, 0).unwrap().granted, vec![]);
    done(&store, on, Outcome::Served, 0);
    assert_eq!(
        claim(&store, K, 0, 0).unwrap().granted,
        vec![(ticket, Some(on), 1)]
    );
    // Rendezvous: the pin does not depend on the order of the set.
    let reordered = MemSharedData::new();
    configure(&reordered, K, Some(1), 0).unwrap();
    let hosts = [(addr(8003), None), (addr(8001), None), (addr(8002), None)];
    set_instances(&reordered, K, &hosts, InstanceSource::Config, 0).unwrap();
    assert_eq!(
        acquire(&reordered, K, 10, 0, Some(pin), 0).unwrap().0,
        Acquired::Admitted(Some(on))
    );
}

#[test]
fn a_failing_instance_is_ejected_with_back_off_then_tried_once() {
    let store = store_with(2, &[None, None]);
    let a = admit(&store, 0).unwrap();
    let b = admit(&store, 0).unwrap();
    assert!(done(&store, a, Outcome::Failed, 0).ejected);
    // Out of picking for a second: everything goes to b.
    for _ in 0..1 {
        assert_eq!(admit(&store, S / 2), Some(b));
    }
    assert_eq!(admit(&store, S / 2), None, "b is full, a ejected: queue");
    assert_eq!(snapshot(&store, K).unwrap().total_capacity(S / 2), Some(2));
    // After the back-off, the waiter gets the trial slot on a, then a takes
    // one request at a time until one is served.
    let c = claim(&store, K, 0, S).unwrap();
    assert_eq!(c.granted.len(), 1);
    assert_eq!(c.granted[0].1, Some(a));
    assert_eq!(admit(&store, S), None, "a is on trial: one at a time");
    // The trial fails again: two seconds now.
    done(&store, a, Outcome::Failed, S);
    assert!(inst(&store, a).ejected(S + S + S / 2));
    assert!(!inst(&store, a).ejected(3 * S));
    // At 3 s the back-off is over: the request queued at 1 s gets the
    // trial; served, a is back to its whole capacity.
    let c = claim(&store, K, 0, 3 * S).unwrap();
    assert_eq!(
        c.granted.iter().map(|g| g.1).collect::<Vec<_>>(),
        vec![Some(a)]
    );
    done(&store, a, Outcome::Served, 3 * S);
    assert_eq!(admit(&store, 3 * S), Some(a));
    assert_eq!(admit(&store, 3 * S), Some(a));
    assert_eq!((inst(&store, a).active, inst(&store, a).strikes), (2, 0));
}

#[test]
fn the_set_changes_under_traffic_and_nothing_leaks() {
    let store = store_with(1, &[None, None]);
    let a = admit(&store, 0).unwrap();
    let b = admit(&store, 0).unwrap();
    // b leaves while busy; c joins and is picked at once.
    let hosts = [(a, None), (addr(8009), None)];
    set_instances(&store, K, &hosts, InstanceSource::Config, 0).unwrap();
    assert_eq!(admit(&store, 0), Some(addr(8009)));
    assert_eq!(admit(&store, 0), None, "b is gone, never picked");
    let s = snapshot(&store, K).unwrap();
    assert_eq!(s.instances.len(), 3, "b stays until its request ends");
    assert!(inst(&store, b).gone);
    // b's request ends: b is dropped; its slot was b's, so the waiter
    // waits on (a and c are full).
    let r = done(&store, b, Outcome::Served, 0);
    assert!(r.wakeups.is_empty());
    let s = snapshot(&store, K).unwrap();
    let mut left: Vec<_> = s.instances.iter().map(|i| i.address).collect();
    left.sort();
    assert_eq!(left, vec![a, addr(8009)]);
    done(&store, a, Outcome::Served, 0);
    let granted = claim(&store, K, 0, 0).unwrap().granted;
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0].1, Some(a));
    assert_eq!(snapshot(&store, K).unwrap().active, 2, "a's waiter and c");
}

#[test]
fn sync_discovery_replaces_the_configured_set_for_good() {
    let store = store_with(2, &[None]);
    let hosts = [(addr(9001), Some(5)), (addr(9002), None)];
    set_instances(&store, K, &hosts, InstanceSource::Sync, 0).unwrap();
    // Another VM's on_configure with the static set changes nothing.
    set_instances(&store, K, &[(addr(8001), None)], InstanceSource::Config, 0).unwrap();
    let s = snapshot(&store, K).unwrap();
    assert!(s.instances_from_sync);
    assert_eq!(
        s.instances.iter().map(|i| i.address).collect::<Vec<_>>(),
        vec![addr(9001), addr(9002)]
    );
    assert_eq!(s.total_capacity(0), Some(7));
}

#[test]
fn per_instance_capacities_from_sync_survive_the_configuration() {
    let store = store_with(2, &[None, Some(3)]);
    set_instance_capacities(&store, K, &[(addr(8001), 6)], 0).unwrap();
    set_instances(
        &store,
        K,
        &[(addr(8001), None), (addr(8002), Some(3))],
        InstanceSource::Config,
        0,
    )
    .unwrap();
    let s = snapshot(&store, K).unwrap();
    assert_eq!(
        s.instances
            .iter()
            .map(|i| i.own_capacity)
            .collect::<Vec<_>>(),
        vec![Some(6), Some(3)]
    );
}

#[test]
fn a_missed_pick_moves_the_count_to_what_really_runs() {
    let store = store_with(1, &[None, None]);
    let a = admit(&store, 0).unwrap();
    let b = admit(&store, 0).unwrap();
    // Envoy sent a's request to b: b runs two, a none, and a is free again.
    let (now_on, _) = missed(&store, K, a, Some(b), 1, Ejection::default(), 0).unwrap();
    assert_eq!(now_on, Some(b));
    assert_eq!((inst(&store, a).active, inst(&store, b).active), (0, 2));
    assert_eq!(inst(&store, a).picks_missed, 1);
    // Not in Envoy's cluster, as far as anyone can tell: out of picking for
    // its back-off, then tried again.
    assert!(inst(&store, a).ejected(S / 2));
    assert_eq!(admit(&store, S), Some(a));
    // Sent to a host outside the set: counted on no instance, but still on
    // the endpoint until it ends.
    let (now_on, _) = missed(&store, K, a, Some(addr(7777)), 1, Ejection::default(), S).unwrap();
    assert_eq!(now_on, None);
    release(&store, K, None, Outcome::Served, Ejection::default(), 0).unwrap();
    done(&store, b, Outcome::Served, 0);
    done(&store, b, Outcome::Served, 0);
    let s = snapshot(&store, K).unwrap();
    assert_eq!((s.active, in_flight(&store)), (0, vec![0, 0]));
    assert_eq!(inst(&store, a).picks_missed, 2);
}

#[test]
fn too_many_instances_are_refused_whole() {
    let store = MemSharedData::new();
    let hosts: Vec<_> = (0..=MAX_INSTANCES as u16)
        .map(|p| (addr(p), None))
        .collect();
    assert_eq!(
        set_instances(&store, K, &hosts, InstanceSource::Config, 0),
        Err(AdmissionError::TooManyInstances(MAX_INSTANCES + 1))
    );
}

#[test]
#[cfg(not(target_arch = "wasm32"))]
fn racing_workers_hold_every_instance_to_its_own_capacity() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    const CAPS: [u32; 3] = [1, 2, 3];
    let store = Arc::new(store_with(9, &CAPS.map(Some)));
    let running: Arc<Vec<AtomicU32>> = Arc::new(CAPS.iter().map(|_| AtomicU32::new(0)).collect());
    let threads: Vec<_> = (0..4u16)
        .map(|worker| {
            let (store, running) = (store.clone(), running.clone());
            std::thread::spawn(move || {
                for _ in 0..300 {
                    let on = match acquire(&*store, K, 1000, worker, None, 0).unwrap().0 {
                        Acquired::Admitted(on) => on.unwrap(),
                        Acquired::Queued { .. } => loop {
                            let g = claim(&*store, K, worker, 0).unwrap().granted;
                            if let Some(&(_, on, _)) = g.first() {
                                break on.unwrap();
                            }
                            std::thread::yield_now();
                        },
                        other => panic!("{other:?}"),
                    };
                    let i = usize::from(on.port() - 8001);
                    let now = running[i].fetch_add(1, Ordering::SeqCst) + 1;
                    assert!(now <= CAPS[i], "{on} runs {now} > {}", CAPS[i]);
                    std::thread::yield_now();
                    running[i].fetch_sub(1, Ordering::SeqCst);
                    done(&store, on, Outcome::Served, 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = snapshot(&*store, K).unwrap();
    assert_eq!((s.active, s.waiters.len()), (0, 0));
    assert!(s.instances.iter().all(|i| i.active == 0));
}
