//! Worker indices. Envoy gives a VM no worker id, and a shared queue
//! notifies only the last VM that registered its name, so every root context
//! takes an index of its own (its wake-up queue is `sluice:wake:<index>`).
//! Indices are `u16` (they sit in every waiter of a record) and each
//! listener update starts new VMs, so the indices of VMs that are gone are
//! reused: `on_done` puts a VM's index on a free list, and a new VM takes
//! from that list before the counter. A wake-up still on its way to the
//! old VM reaches the new one, which only costs it a claim with nothing to
//! claim.

use sluice_core::admission::WorkerId;
use sluice_core::shared_data::{SharedData, StoreError};

/// Counter of indices handed out so far.
const COUNTER_KEY: &str = "sluice:workers";
/// Indices of VMs that are gone, `u16` little endian each.
const FREE_KEY: &str = "sluice:workers:free";

/// Creates the counter (at 0) and the free list (empty) if they do not
/// exist. A write to a missing key ignores CAS, so two workers taking their
/// first index at once could both get 0: `on_configure` creates the keys on
/// the main thread, before any worker VM exists.
pub fn ensure<S: SharedData>(store: &S) -> Result<(), String> {
    for (key, empty) in [(COUNTER_KEY, &0u32.to_le_bytes()[..]), (FREE_KEY, &[][..])] {
        if store.get(key).map_err(|e| e.to_string())?.is_none() {
            store.set(key, empty, 0).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// An index for a new VM: a freed one if any, else the next never used.
pub fn allocate<S: SharedData>(store: &S) -> Result<WorkerId, String> {
    if let Some(id) = pop_free(store).map_err(|e| e.to_string())? {
        return Ok(id);
    }
    loop {
        let (value, cas) = store
            .get(COUNTER_KEY)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        let next = match value[..] {
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            // Not created (only in tests that skip `ensure`).
            _ => 0,
        };
        let id = WorkerId::try_from(next)
            .map_err(|_| "more than 65536 plugin VMs alive at once".to_string())?;
        match store.set(COUNTER_KEY, &(next + 1).to_le_bytes(), cas) {
            Ok(()) => return Ok(id),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn pop_free<S: SharedData>(store: &S) -> Result<Option<WorkerId>, StoreError> {
    loop {
        let Some((mut value, cas)) = store.get(FREE_KEY)? else {
            return Ok(None);
        };
        if value.len() < 2 {
            return Ok(None);
        }
        let tail = value.split_off(value.len() - 2);
        let id = WorkerId::from_le_bytes([tail[0], tail[1]]);
        match store.set(FREE_KEY, &value, cas) {
            Ok(()) => return Ok(Some(id)),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The VM holding `id` is gone: its index may be reused.
pub fn free<S: SharedData>(store: &S, id: WorkerId) -> Result<(), StoreError> {
    loop {
        let (mut value, cas) = store.get(FREE_KEY)?.unwrap_or_default();
        value.extend_from_slice(&id.to_le_bytes());
        match store.set(FREE_KEY, &value, cas) {
            Ok(()) => return Ok(()),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::shared_data::MemSharedData;

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
}
