//! The leader lease: one root context per Envoy process holds the sync
//! stream and runs the health checks (N+1 root contexts at
//! `--concurrency N`). One key per service ([`shared_keys::leader`]):
//! the holder and an expiry, written by CAS so two takers cannot both win.
//! The holder renews it on its base tick; anyone takes it once it expired
//! or was released; a VM of a newer configuration takes it at once, so a
//! listener update moves leadership in one tick while the old VMs drain.

use crate::admission::WorkerId;
use crate::cas::{self, u16_at, u64_at};
use crate::shared_data::SharedData;
use crate::shared_keys;
use std::time::Duration;

/// How long a lease lasts without renewal: ten base ticks, so a busy
/// worker's late tick does not lose it, and a vanished leader is replaced
/// within a second.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// Who holds (or wants) the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub worker: WorkerId,
    /// Host time at which this VM was configured (tells a reused index apart).
    pub started_ns: u64,
    /// When this VM's configuration first appeared in the process.
    pub config_since_ns: u64,
}

/// `worker:u16, started_ns:u64, config_since_ns:u64, expiry_ns:u64`.
const LEASE_LEN: usize = 2 + 8 + 8 + 8;

fn encode(h: &Holder, expiry_ns: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEASE_LEN);
    out.extend_from_slice(&h.worker.to_le_bytes());
    out.extend_from_slice(&h.started_ns.to_le_bytes());
    out.extend_from_slice(&h.config_since_ns.to_le_bytes());
    out.extend_from_slice(&expiry_ns.to_le_bytes());
    out
}

/// The holder and expiry; `None` for a free lease (empty after a release).
fn decode(b: &[u8]) -> Option<(Holder, u64)> {
    if b.len() != LEASE_LEN {
        return None;
    }
    Some((
        Holder {
            worker: u16_at(b, 0)?,
            started_ns: u64_at(b, 2)?,
            config_since_ns: u64_at(b, 10)?,
        },
        u64_at(b, 18)?,
    ))
}

/// The lease's holder and expiry, `None` when free or unreadable.
pub fn read<S: SharedData>(store: &S, service: &str) -> Option<(Holder, u64)> {
    match store.get(&shared_keys::leader(service)) {
        Ok(Some((bytes, _))) => decode(&bytes),
        _ => None,
    }
}

/// Takes or renews the lease for `me`; whether `me` holds it now. Shared
/// data trouble reads as "not held".
pub fn renew<S: SharedData>(store: &S, service: &str, me: &Holder, now_ns: u64) -> bool {
    let expiry = now_ns.saturating_add(LEASE_TTL.as_nanos() as u64);
    cas::update(store, &shared_keys::leader(service), |value| {
        let may = match value.and_then(decode) {
            None => true,
            Some((h, _)) if h == *me => true,
            Some((_, until)) if until <= now_ns => true,
            // A newer configuration's VM takes over from a draining one.
            Some((h, _)) => h.config_since_ns < me.config_since_ns,
        };
        Ok::<_, crate::shared_data::StoreError>((may, may.then(|| encode(me, expiry))))
    })
    .unwrap_or(false)
}

/// Gives the lease up if `me` holds it, so another takes over at its next
/// tick instead of waiting for the expiry.
pub fn release<S: SharedData>(store: &S, service: &str, me: &Holder) {
    let key = shared_keys::leader(service);
    if let Ok(Some((value, cas))) = store.get(&key) {
        if decode(&value).is_some_and(|(h, _)| h == *me) {
            // A conflict means it changed hands already.
            let _ = store.set(&key, b"", cas);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_data::MemSharedData;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const TTL: u64 = LEASE_TTL.as_nanos() as u64;

    fn holder(worker: WorkerId, config_since_ns: u64) -> Holder {
        Holder {
            worker,
            started_ns: 1,
            config_since_ns,
        }
    }

    #[test]
    fn one_holder_until_it_expires_or_releases() {
        let store = MemSharedData::new();
        let (a, b) = (holder(0, 10), holder(1, 10));
        assert!(renew(&store, "s", &a, 100));
        assert!(!renew(&store, "s", &b, 100));
        assert!(renew(&store, "s", &a, 100 + TTL - 1), "the holder renews");
        assert_eq!(read(&store, "s"), Some((a, 100 + 2 * TTL - 1)));
        assert!(!renew(&store, "s", &b, 100 + 2 * TTL - 2));
        assert!(renew(&store, "s", &b, 100 + 2 * TTL - 1), "expired");
        release(&store, "s", &a);
        assert_eq!(read(&store, "s").map(|(h, _)| h), Some(b), "not a's");
        release(&store, "s", &b);
        assert_eq!(read(&store, "s"), None);
        assert!(renew(&store, "s", &a, 0), "released: anyone takes it");
    }

    #[test]
    fn a_newer_configuration_takes_over_at_once() {
        let store = MemSharedData::new();
        assert!(renew(&store, "s", &holder(0, 10), 100));
        assert!(renew(&store, "s", &holder(3, 20), 101));
        assert!(!renew(&store, "s", &holder(0, 10), 102), "no way back");
    }

    /// Threads race for the lease at the same instant: exactly one wins.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn racing_candidates_elect_one() {
        use std::sync::Arc;
        for round in 0..50u64 {
            let store = Arc::new(MemSharedData::new());
            let winners: usize = (0..6u16)
                .map(|w| {
                    let store = store.clone();
                    std::thread::spawn(move || renew(&*store, "s", &holder(w, 1), round))
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| usize::from(t.join().unwrap()))
                .sum();
            assert_eq!(winners, 1, "round {round}");
        }
    }
}
