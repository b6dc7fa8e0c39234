//! `max_queued_bytes`: a queued request's body waits in Envoy's buffers, so
//! a queue of large uploads costs memory that `max_queue` alone does not
//! bound. Each endpoint with the setting has one shared counter of the
//! bytes its queued requests announced in `content-length`, across all
//! workers (a key per endpoint, created before traffic like its record).

use sluice_core::shared_data::{SharedData, StoreError};

/// The counter's key for the endpoint whose record is `record_key`.
pub fn key(record_key: &str) -> String {
    format!("{record_key}:queued-bytes")
}

/// Creates the counter at zero if it does not exist; never resets it.
pub fn ensure<S: SharedData>(store: &S, key: &str) -> Result<(), StoreError> {
    match store.get(key)? {
        Some(_) => Ok(()),
        None => store.set(key, &0u64.to_le_bytes(), 0),
    }
}

fn read<S: SharedData>(store: &S, key: &str) -> Result<(u64, u32), StoreError> {
    let (value, cas) = store.get(key)?.unwrap_or_default();
    let n = match value[..] {
        [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
        _ => 0,
    };
    Ok((n, cas))
}

/// Adds `n` bytes unless the total would pass `cap`; whether it did.
pub fn try_add<S: SharedData>(store: &S, key: &str, n: u64, cap: u64) -> Result<bool, StoreError> {
    loop {
        let (total, cas) = read(store, key)?;
        let Some(new) = total.checked_add(n).filter(|&t| t <= cap) else {
            return Ok(false);
        };
        match store.set(key, &new.to_le_bytes(), cas) {
            Ok(()) => return Ok(true),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Takes `n` bytes back off the counter (a queued request left the queue).
pub fn sub<S: SharedData>(store: &S, key: &str, n: u64) -> Result<(), StoreError> {
    loop {
        let (total, cas) = read(store, key)?;
        match store.set(key, &total.saturating_sub(n).to_le_bytes(), cas) {
            Ok(()) => return Ok(()),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads the counter (the stats).
pub fn total<S: SharedData>(store: &S, key: &str) -> u64 {
    read(store, key).map_or(0, |(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::shared_data::MemSharedData;

    #[test]
    fn adds_up_to_the_cap_and_back() {
        let store = MemSharedData::new();
        let k = key("sluice:t:ep:/p");
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
}
