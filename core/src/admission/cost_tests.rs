//! Cost per request: units fit the capacity, no backfill past the head, a
//! request bigger than the capacity runs alone or is refused, releases give
//! the units back, fair queueing charges by cost, and instances and shares
//! count units.

use super::*;
use crate::shared_data::MemSharedData;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const K: &str = "sluice:test:/p";

fn store_with(capacity: u32) -> MemSharedData {
    let store = MemSharedData::new();
    configure(&store, K, Some(capacity), 0).unwrap();
    store
}

fn costing(cost: u32) -> Class {
    Class {
        cost,
        ..Class::DEFAULT
    }
}

/// A tenant's request of `cost` units (flows of weight 1).
fn of_tenant(flow: u8, cost: u32) -> Class {
    Class {
        flow,
        step: tag_step(1),
        ..costing(cost)
    }
}

fn arrive(store: &MemSharedData, class: Class) -> Acquired {
    acquire_as(store, K, 1000, 0, None, class, 0).unwrap().0
}

fn admitted(store: &MemSharedData, class: Class) -> Option<SocketAddr> {
    match arrive(store, class) {
        Acquired::Admitted(on) => on,
        other => panic!("expected admitted, got {other:?}"),
    }
}

fn queued(store: &MemSharedData, class: Class) -> u32 {
    match arrive(store, class) {
        Acquired::Queued { ticket, .. } => ticket,
        other => panic!("expected queued, got {other:?}"),
    }
}

fn done(store: &MemSharedData, units: u32) -> Released {
    release_units(
        store,
        K,
        None,
        units,
        Outcome::Served,
        Ejection::default(),
        0,
    )
    .unwrap()
}

/// The tickets granted (and their units) that worker 0 claims now.
fn granted(store: &MemSharedData) -> Vec<(u32, u32)> {
    claim(store, K, 0, 0)
        .unwrap()
        .granted
        .into_iter()
        .map(|(t, _, units)| (t, units))
        .collect()
}

fn active(store: &MemSharedData) -> u32 {
    snapshot(store, K).unwrap().active
}

#[test]
fn units_in_flight_never_exceed_the_capacity() {
    let store = store_with(50);
    admitted(&store, costing(25));
    admitted(&store, costing(24));
    assert_eq!(active(&store), 49);
    // 49 + 2 > 50: it waits, though a slot-counting record would admit it.
    let t = queued(&store, costing(2));
    // One that would fit waits behind it.
    let u = queued(&store, costing(1));
    done(&store, 24);
    assert_eq!(granted(&store), vec![(t, 2), (u, 1)]);
    assert_eq!(active(&store), 28);
}

#[test]
fn no_backfill_past_the_head_a_big_waiter_is_not_starved() {
    let store = store_with(50);
    admitted(&store, costing(25));
    admitted(&store, costing(20));
    let big = queued(&store, costing(30));
    // 45 + 1 fits, but the 30 waits ahead of it: the small one queues.
    let small = queued(&store, costing(1));
    done(&store, 20);
    // 25 + 30 > 50: still nobody.
    assert!(granted(&store).is_empty());
    done(&store, 25);
    // The big one first, then the small one behind it fits too.
    assert_eq!(granted(&store), vec![(big, 30), (small, 1)]);
    assert_eq!(active(&store), 31);
}

#[test]
fn a_request_costing_more_than_the_capacity_runs_alone() {
    let store = store_with(10);
    admitted(&store, costing(1));
    let big = queued(&store, costing(25));
    let after = queued(&store, costing(1));
    done(&store, 1);
    // Alone: it holds its 25 units, nothing else gets in beside it.
    assert_eq!(granted(&store), vec![(big, 25)]);
    assert_eq!(active(&store), 25);
    assert!(matches!(
        arrive(&store, costing(1)),
        Acquired::Queued { .. }
    ));
    done(&store, 25);
    let next = granted(&store);
    assert_eq!(next[0], (after, 1));
    // An idle endpoint admits it at once.
    let idle = store_with(10);
    admitted(&idle, costing(25));
    assert_eq!(active(&idle), 25);
}

#[test]
fn a_request_costing_more_than_the_capacity_is_refused_when_configured() {
    let store = store_with(10);
    let refuse = |cost| Class {
        over_capacity: OverCapacity::Refuse,
        ..costing(cost)
    };
    assert_eq!(arrive(&store, refuse(11)), Acquired::TooCostly(10));
    assert_eq!(active(&store), 0);
    admitted(&store, refuse(10));
    // The whole capacity is no reason to refuse, only to wait.
    assert!(matches!(
        arrive(&store, refuse(10)),
        Acquired::Queued { .. }
    ));
    // With instances, the largest capacity one request can run under.
    configure(&store, K, Some(4), 0).unwrap();
    let hosts = [(addr(8001), None), (addr(8002), Some(12))];
    set_instances(&store, K, &hosts, InstanceSource::Config, 0).unwrap();
    assert_eq!(arrive(&store, refuse(13)), Acquired::TooCostly(12));
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn a_release_gives_back_exactly_its_units() {
    let store = store_with(100);
    admitted(&store, costing(40));
    admitted(&store, costing(7));
    done(&store, 40);
    assert_eq!(active(&store), 7);
    assert_eq!(
        release_units(&store, K, None, 8, Outcome::Served, Ejection::default(), 0),
        Err(AdmissionError::ReleaseWithoutSlot),
        "more than is held"
    );
    done(&store, 7);
    assert_eq!(active(&store), 0);
}

#[test]
fn withdrawn_and_refused_grants_give_their_units_back() {
    let store = store_with(30);
    admitted(&store, costing(30));
    let a = queued(&store, costing(20));
    let b = queued(&store, costing(10));
    done(&store, 30);
    // Granted, then its client left: the withdrawer holds its 20 units.
    assert_eq!(
        withdraw(&store, K, a).unwrap(),
        Withdrawn::Granted(None, 20)
    );
    done(&store, 20);
    // Granted, then the backend turned unhealthy: its 10 units come back.
    set_unhealthy(&store, K, true, 0).unwrap();
    let c = claim(&store, K, 0, 0).unwrap();
    assert_eq!(c.refused, vec![b]);
    assert_eq!(active(&store), 0);
}

#[test]
fn fair_queueing_charges_by_cost_a_small_tenant_is_not_behind_a_big_flood() {
    let store = store_with(50);
    // Tenant 0 keeps the endpoint full of 25-unit requests, 20 more wait.
    admitted(&store, of_tenant(0, 25));
    admitted(&store, of_tenant(0, 25));
    let flood: Vec<u32> = (0..20).map(|_| queued(&store, of_tenant(0, 25))).collect();
    // Tenant 1 sends five 1-unit requests.
    let small: Vec<u32> = (0..5).map(|_| queued(&store, of_tenant(1, 1))).collect();
    // One big request ends: its 25 units take all five small ones (each
    // charged 1/25th of a big one), and nothing of the flood fits beside.
    done(&store, 25);
    let got: Vec<u32> = granted(&store).into_iter().map(|(t, _)| t).collect();
    assert_eq!(got, small);
    assert_eq!(active(&store), 30);
    done(&store, 25);
    done(&store, 5);
    let got: Vec<u32> = granted(&store).into_iter().map(|(t, _)| t).collect();
    assert_eq!(got, flood[..2].to_vec(), "then the flood, in its own order");
}

#[test]
fn instances_count_units_and_each_takes_what_fits_it() {
    let store = store_with(50);
    let hosts = [(addr(8001), None), (addr(8002), None)];
    set_instances(&store, K, &hosts, InstanceSource::Config, 0).unwrap();
    let a = admitted(&store, costing(30)).unwrap();
    let b = admitted(&store, costing(30)).unwrap();
    assert_ne!(a, b, "the one with most room");
    // 20 free on each: a 25 fits neither.
    let t = queued(&store, costing(25));
    // A 20 would fit, but waits behind it (no backfill).
    let small = queued(&store, costing(20));
    release_units(
        &store,
        K,
        Some(a),
        30,
        Outcome::Served,
        Ejection::default(),
        0,
    )
    .unwrap();
    let c = claim(&store, K, 0, 0).unwrap();
    assert_eq!(c.granted[0], (t, Some(a), 25));
    // The 20 then fits on b (30 + 20) or on a (25 + 20 < 50).
    assert_eq!(c.granted[1].0, small);
    let s = snapshot(&store, K).unwrap();
    let units: u32 = s.instances.iter().map(|i| i.active).sum();
    assert_eq!((units, s.active), (75, 75));
    assert!(s.instances.iter().all(|i| i.active <= 50));
}

#[test]
fn a_share_counts_units_too() {
    let store = store_with(100);
    let shares = EndpointShares {
        endpoint: Share {
            slots: 40,
            fallback: 40,
        },
        instances: Vec::new(),
        lease: ShareLease {
            until_ns: u64::MAX,
            fallback_until_ns: u64::MAX,
        },
    };
    set_shares(&store, K, Some(&shares), 0).unwrap();
    admitted(&store, costing(25));
    let t = queued(&store, costing(25));
    done(&store, 25);
    assert_eq!(granted(&store), vec![(t, 25)]);
}

#[test]
fn without_cost_every_request_is_one_unit() {
    let store = store_with(2);
    assert_eq!(Class::DEFAULT.cost, 1);
    admitted(&store, Class::DEFAULT);
    admitted(&store, Class::DEFAULT);
    assert_eq!(active(&store), 2);
    let t = queued(&store, Class::DEFAULT);
    release(&store, K, None, Outcome::Served, Ejection::default(), 0).unwrap();
    assert_eq!(granted(&store), vec![(t, 1)]);
}

#[test]
fn the_backlog_of_a_refusal_counts_units() {
    let store = store_with(50);
    admitted(&store, costing(50));
    queued(&store, costing(25));
    match arrive(&store, costing(10)) {
        Acquired::Queued { backlog, .. } => {
            assert_eq!(
                backlog,
                Backlog {
                    ahead: 25,
                    slots: 50
                }
            )
        }
        other => panic!("expected queued, got {other:?}"),
    }
    let full = acquire_as(&store, K, 2, 0, None, costing(1), 0).unwrap().0;
    assert_eq!(
        full,
        Acquired::QueueFull(Backlog {
            ahead: 35,
            slots: 50
        })
    );
}
