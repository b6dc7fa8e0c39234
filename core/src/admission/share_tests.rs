//! Shares (`sync.shares`): what this Envoy admits on a pool several Envoys
//! share, under the grant's lease, its fallback, then nothing.

use super::*;
use crate::shared_data::MemSharedData;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const K: &str = "sluice:test:/p";
const MS: u64 = 1_000_000;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn lease(until_ms: u64, fallback_until_ms: u64) -> ShareLease {
    ShareLease {
        until_ns: until_ms * MS,
        fallback_until_ns: fallback_until_ms * MS,
    }
}

fn shares(slots: u32, fallback: u32, lease: ShareLease) -> EndpointShares {
    EndpointShares {
        endpoint: Share { slots, fallback },
        instances: Vec::new(),
        lease,
    }
}

fn admitted(store: &MemSharedData, now: u64) -> bool {
    match acquire(store, K, 100, 0, None, now).unwrap().0 {
        Acquired::Admitted(_) => true,
        Acquired::Queued { .. } => false,
        other => panic!("unexpected {other:?}"),
    }
}

fn store_with(capacity: u32) -> MemSharedData {
    let store = MemSharedData::new();
    configure(&store, K, Some(capacity), 0).unwrap();
    store
}

#[test]
fn a_share_round_trips_and_a_share_of_0_admits_nothing() {
    let store = store_with(10);
    set_shares(&store, K, Some(&shares(0, 0, lease(1000, 1000))), 0).unwrap();
    let s = snapshot(&store, K).unwrap();
    assert_eq!(s.share, Some(Share::default()));
    assert_eq!(EndpointState::decode(&s.encode()).unwrap(), s);
    assert!(!admitted(&store, 0), "share 0: queued, not 'no limit'");
}

#[test]
fn the_share_holds_during_the_lease_then_the_fallback_then_nothing() {
    let store = store_with(10);
    set_shares(&store, K, Some(&shares(3, 1, lease(100, 200))), 0).unwrap();
    let s = snapshot(&store, K).unwrap();
    assert_eq!(s.limit(0), 3);
    assert_eq!(s.limit(99 * MS), 3);
    assert_eq!(s.limit(100 * MS), 1, "fallback after the lease");
    assert_eq!(s.limit(200 * MS), 0, "nothing after the fallback");
    for _ in 0..3 {
        assert!(admitted(&store, 10 * MS));
    }
    assert!(!admitted(&store, 10 * MS), "the share, not the capacity");
}

#[test]
fn a_share_never_goes_above_the_capacity() {
    let store = store_with(2);
    set_shares(&store, K, Some(&shares(5, 5, lease(100, 100))), 0).unwrap();
    assert_eq!(snapshot(&store, K).unwrap().limit(0), 2);
}

#[test]
fn a_lowered_share_cuts_nothing_and_a_raised_one_admits_waiters() {
    let store = store_with(10);
    set_shares(&store, K, Some(&shares(2, 0, lease(1000, 1000))), 0).unwrap();
    assert!(admitted(&store, 0));
    assert!(admitted(&store, 0));
    set_shares(&store, K, Some(&shares(1, 0, lease(1000, 1000))), 0).unwrap();
    assert_eq!(snapshot(&store, K).unwrap().active, 2, "nothing cut");
    assert!(!admitted(&store, 0));
    // One ends: still at the lowered share (1 in flight), the waiter waits.
    release(&store, K, None, Outcome::Served, Ejection::default(), 0).unwrap();
    assert_eq!(snapshot(&store, K).unwrap().queued(), 1);
    let wake = set_shares(&store, K, Some(&shares(3, 0, lease(1000, 1000))), 0).unwrap();
    assert_eq!(wake.workers(), &[0], "a raise wakes the waiter's worker");
    assert_eq!(snapshot(&store, K).unwrap().queued(), 0);
}

#[test]
fn ending_sharing_gives_the_capacity_back_whole() {
    let store = store_with(4);
    set_shares(&store, K, Some(&shares(0, 0, lease(1000, 1000))), 0).unwrap();
    assert!(!admitted(&store, 0));
    let wake = set_shares(&store, K, None, 0).unwrap();
    assert_eq!(wake.workers(), &[0]);
    let s = snapshot(&store, K).unwrap();
    assert_eq!((s.share, s.limit(0)), (None, 4));
}

#[test]
fn instances_take_their_own_shares_and_a_newcomer_starts_at_0() {
    let store = store_with(4);
    set_instances(
        &store,
        K,
        &[(addr(8001), None), (addr(8002), None)],
        InstanceSource::Config,
        0,
    )
    .unwrap();
    let grant = EndpointShares {
        endpoint: Share::default(),
        instances: vec![(
            addr(8002),
            Share {
                slots: 2,
                fallback: 1,
            },
        )],
        lease: lease(1000, 1000),
    };
    set_shares(&store, K, Some(&grant), 0).unwrap();
    let s = snapshot(&store, K).unwrap();
    assert_eq!(EndpointState::decode(&s.encode()).unwrap(), s);
    assert_eq!(
        s.instances[0].share,
        Some(Share::default()),
        "not listed: 0"
    );
    for _ in 0..2 {
        match acquire(&store, K, 100, 0, None, 0).unwrap().0 {
            Acquired::Admitted(on) => assert_eq!(on, Some(addr(8002))),
            other => panic!("{other:?}"),
        }
    }
    assert!(!admitted(&store, 0));
    assert_eq!(snapshot(&store, K).unwrap().total_capacity(0), Some(2));
    set_instances(
        &store,
        K,
        &[(addr(8001), None), (addr(8002), None), (addr(8003), None)],
        InstanceSource::Sync,
        0,
    )
    .unwrap();
    let s = snapshot(&store, K).unwrap();
    assert_eq!(s.instances[2].share, Some(Share::default()));
    assert_eq!(s.queued(), 1, "the newcomer admits nothing before a grant");
}

#[test]
fn without_shares_nothing_changes() {
    let store = store_with(2);
    let s = snapshot(&store, K).unwrap();
    assert_eq!((s.share, s.limit(u64::MAX)), (None, 2));
}
