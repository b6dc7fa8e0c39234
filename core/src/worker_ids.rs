//! Worker indices. Envoy gives a VM no worker id, and a shared queue
//! notifies only the last VM that registered its name, so every root context
//! takes an index of its own (its wake-up queue is
//! [`shared_keys::wake_queue`]). Indices are `u16` (they sit in every waiter
//! of a record) and each listener update starts new VMs, so the indices of
//! VMs that are gone are reused: `on_done` puts a VM's index on a free list,
//! and a new VM takes from that list before the counter. A wake-up still on
//! its way to the old VM reaches the new one, which only costs it a claim
//! with nothing to claim.

use crate::admission::WorkerId;
use crate::cas::{self, u16_at, u32_at};
use crate::shared_data::{SharedData, StoreError};
use crate::shared_keys::{WORKERS, WORKERS_FREE};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexError {
    Store(StoreError),
    Exhausted,
}

impl std::fmt::Display for IndexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexError::Store(e) => write!(f, "{e}"),
            IndexError::Exhausted => f.write_str("more than 65536 plugin VMs alive at once"),
        }
    }
}

impl std::error::Error for IndexError {}

impl From<StoreError> for IndexError {
    fn from(e: StoreError) -> Self {
        IndexError::Store(e)
    }
}

/// Creates the counter (at 0) and the free list (empty) if they do not
/// exist. A write to a missing key ignores CAS, so two workers taking their
/// first index at once could both get 0: `on_configure` creates the keys on
/// the main thread, before any worker VM exists.
pub fn ensure<S: SharedData>(store: &S) -> Result<(), StoreError> {
    cas::ensure(store, WORKERS, &0u32.to_le_bytes())?;
    cas::ensure(store, WORKERS_FREE, &[])
}

/// An index for a new VM: a freed one if any, else the next never used.
pub fn allocate<S: SharedData>(store: &S) -> Result<WorkerId, IndexError> {
    if let Some(id) = pop_free(store)? {
        return Ok(id);
    }
    cas::update(store, WORKERS, |value| {
        // Not created: only in tests that skip `ensure`.
        let next = value.and_then(|v| u32_at(v, 0)).unwrap_or(0);
        let id = WorkerId::try_from(next).map_err(|_| IndexError::Exhausted)?;
        Ok((id, Some((next + 1).to_le_bytes().to_vec())))
    })
}

fn pop_free<S: SharedData>(store: &S) -> Result<Option<WorkerId>, StoreError> {
    cas::update(store, WORKERS_FREE, |value| {
        let value = value.unwrap_or_default();
        let Some(rest) = value.len().checked_sub(2) else {
            return Ok((None, None));
        };
        Ok((u16_at(value, rest), Some(value[..rest].to_vec())))
    })
}

/// The VM holding `id` is gone: its index may be reused.
pub fn free<S: SharedData>(store: &S, id: WorkerId) -> Result<(), StoreError> {
    cas::update(store, WORKERS_FREE, |value| {
        let mut new = value.unwrap_or_default().to_vec();
        new.extend_from_slice(&id.to_le_bytes());
        Ok(((), Some(new)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_data::MemSharedData;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn freed_indices_are_reused_before_new_ones() {
        let store = MemSharedData::new();
        ensure(&store).unwrap();
        let ids: Vec<_> = (0..3).map(|_| allocate(&store).unwrap()).collect();
        assert_eq!(ids, [0, 1, 2]);
        free(&store, 1).unwrap();
        free(&store, 0).unwrap();
        assert_eq!(allocate(&store).unwrap(), 0);
        assert_eq!(allocate(&store).unwrap(), 1);
        assert_eq!(allocate(&store).unwrap(), 3);
    }

    #[test]
    fn endless_listener_updates_stay_within_the_index_space() {
        let store = MemSharedData::new();
        ensure(&store).unwrap();
        // 100000 updates of 3 VMs each, the old ones gone after each.
        let mut live: Vec<WorkerId> = Vec::new();
        for _ in 0..100_000 {
            let new: Vec<_> = (0..3).map(|_| allocate(&store).unwrap()).collect();
            for id in live.drain(..) {
                free(&store, id).unwrap();
            }
            live = new;
        }
        assert!(live.iter().all(|&id| id < 6), "{live:?}");
    }

    #[test]
    fn the_index_space_ends_with_an_error() {
        let store = MemSharedData::new();
        store.set(WORKERS, &65_536u32.to_le_bytes(), 0).unwrap();
        assert_eq!(allocate(&store), Err(IndexError::Exhausted));
    }

    /// VMs of several threads start and end at once: no index is held twice.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn racing_vms_never_share_an_index() {
        use std::collections::HashSet;
        use std::sync::{Arc, Mutex};
        let store = Arc::new(MemSharedData::new());
        ensure(&*store).unwrap();
        let live = Arc::new(Mutex::new(HashSet::new()));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (store, live) = (store.clone(), live.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let id = allocate(&*store).unwrap();
                        assert!(live.lock().unwrap().insert(id), "{id} held twice");
                        std::thread::yield_now();
                        live.lock().unwrap().remove(&id);
                        free(&*store, id).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(allocate(&*store).unwrap() < 6);
    }
}
