//! `max_queued_bytes`: a queued request's body waits in Envoy's buffers, so
//! a queue of large uploads costs memory that `max_queue` alone does not
//! bound. Each endpoint with the setting has one shared counter of the
//! bytes its queued requests announced in `content-length`, across all
//! workers ([`crate::shared_keys::queued_bytes`], created before traffic
//! like its record).

use crate::cas::{self, as_u64};
use crate::shared_data::{SharedData, StoreError};

/// Creates the counter at zero if it does not exist; never resets it.
pub fn ensure<S: SharedData>(store: &S, key: &str) -> Result<(), StoreError> {
    cas::ensure(store, key, &0u64.to_le_bytes())
}

fn value(v: Option<&[u8]>) -> u64 {
    v.and_then(as_u64).unwrap_or(0)
}

/// Adds `n` bytes unless the total would pass `cap`; whether it did.
pub fn try_add<S: SharedData>(store: &S, key: &str, n: u64, cap: u64) -> Result<bool, StoreError> {
    cas::update(store, key, |v| {
        Ok(match value(v).checked_add(n).filter(|&t| t <= cap) {
            Some(new) => (true, Some(new.to_le_bytes().to_vec())),
            None => (false, None),
        })
    })
}

/// Takes `n` bytes back off the counter (a queued request left the queue).
pub fn sub<S: SharedData>(store: &S, key: &str, n: u64) -> Result<(), StoreError> {
    cas::update(store, key, |v| {
        Ok(((), Some(value(v).saturating_sub(n).to_le_bytes().to_vec())))
    })
}

/// Reads the counter (the stats).
pub fn total<S: SharedData>(store: &S, key: &str) -> u64 {
    store
        .get(key)
        .ok()
        .flatten()
        .map_or(0, |(v, _)| value(Some(&v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_data::MemSharedData;
    use crate::shared_keys;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn adds_up_to_the_cap_and_back() {
        let store = MemSharedData::new();
        let k = shared_keys::queued_bytes("sluice:t:ep:/p");
        ensure(&store, &k).unwrap();
        assert!(try_add(&store, &k, 600, 1000).unwrap());
        assert!(!try_add(&store, &k, 401, 1000).unwrap());
        assert!(try_add(&store, &k, 400, 1000).unwrap());
        assert_eq!(total(&store, &k), 1000);
        sub(&store, &k, 600).unwrap();
        assert_eq!(total(&store, &k), 400);
        // Created once: a second ensure does not reset a live counter.
        ensure(&store, &k).unwrap();
        assert_eq!(total(&store, &k), 400);
    }

    /// Workers on threads add and take back bytes at once: the cap holds at
    /// every instant and the counter ends where it began.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn racing_workers_keep_the_cap_and_lose_nothing() {
        use std::sync::Arc;
        let store = Arc::new(MemSharedData::new());
        ensure(&*store, "q").unwrap();
        let threads: Vec<_> = (1..=6u64)
            .map(|n| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..300 {
                        if try_add(&*store, "q", n * 100, 1000).unwrap() {
                            assert!(total(&*store, "q") <= 1000);
                            sub(&*store, "q", n * 100).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(total(&*store, "q"), 0);
    }
}
