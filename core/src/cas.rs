//! The one read-modify-CAS loop every shared-data state machine runs on, and
//! the little-endian reads of their values.
//!
//! Each retry means another VM wrote the key in between, so the bound is
//! only reached if something writes it in a tight loop forever; then the
//! caller gets [`StoreError::Contention`] instead of a hung worker.

use crate::shared_data::{SharedData, StoreError};

/// Bound on the attempts of one [`update`].
pub const MAX_CAS_ATTEMPTS: u32 = 10_000;

/// Reads `key` (`None`: missing), lets `op` decide, and writes what it
/// returns with the CAS of that read, again from the read on a conflict.
/// `op` returns its result and the new value, or `None` to write nothing.
pub fn update<S, R, E>(
    store: &S,
    key: &str,
    mut op: impl FnMut(Option<&[u8]>) -> Result<(R, Option<Vec<u8>>), E>,
) -> Result<R, E>
where
    S: SharedData + ?Sized,
    E: From<StoreError>,
{
    for _ in 0..MAX_CAS_ATTEMPTS {
        // A missing key has CAS 0, and a write to it ignores CAS: keys are
        // created before traffic (see `shared_data`).
        let found = store.get(key)?;
        let (value, cas) = match &found {
            Some((bytes, cas)) => (Some(bytes.as_slice()), *cas),
            None => (None, 0),
        };
        let (result, write) = op(value)?;
        let Some(new) = write else {
            return Ok(result);
        };
        match store.set(key, &new, cas) {
            Ok(()) => return Ok(result),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Contention.into())
}

/// Creates `key` with `neutral` if it does not exist; never touches a live
/// value.
pub fn ensure<S: SharedData + ?Sized>(
    store: &S,
    key: &str,
    neutral: &[u8],
) -> Result<(), StoreError> {
    match store.get(key)? {
        Some(_) => Ok(()),
        None => store.set(key, neutral, 0),
    }
}

fn array<const N: usize>(b: &[u8], i: usize) -> Option<[u8; N]> {
    b.get(i..i.checked_add(N)?)?.try_into().ok()
}

/// Little-endian `u16` at byte `i`, `None` past the end.
pub fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    array(b, i).map(u16::from_le_bytes)
}

pub fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    array(b, i).map(u32::from_le_bytes)
}

pub fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    array(b, i).map(u64::from_le_bytes)
}

/// A value that is exactly one little-endian `u64` (a counter, a time).
pub fn as_u64(b: &[u8]) -> Option<u64> {
    (b.len() == 8).then(|| u64_at(b, 0)).flatten()
}

/// FNV-1a, 64 bits: no dependency, and its users only compare texts by it.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_data::MemSharedData;
    use std::cell::Cell;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// A store whose every write loses the race.
    struct AlwaysConflicts(Cell<u32>);

    impl SharedData for AlwaysConflicts {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(Some((vec![0], 1)))
        }
        fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
            self.0.set(self.0.get() + 1);
            Err(StoreError::CasMismatch)
        }
    }

    #[test]
    fn retries_are_bounded() {
        let store = AlwaysConflicts(Cell::new(0));
        let r: Result<(), StoreError> = update(&store, "k", |_| Ok(((), Some(vec![1]))));
        assert_eq!(r, Err(StoreError::Contention));
        assert_eq!(store.0.get(), MAX_CAS_ATTEMPTS);
    }

    #[test]
    fn writes_nothing_when_op_says_so_and_retries_on_conflict() {
        let store = MemSharedData::new();
        let r: Result<u8, StoreError> = update(&store, "k", |v| {
            assert!(v.is_none());
            Ok((7, None))
        });
        assert_eq!(r, Ok(7));
        assert!(store.get("k").unwrap().is_none());
        store.set("k", b"a", 0).unwrap();
        let mut first = true;
        let r: Result<(), StoreError> = update(&store, "k", |v| {
            if std::mem::take(&mut first) {
                // Another writer gets in between this read and its write.
                store.set("k", b"b", 0).unwrap();
            } else {
                assert_eq!(v, Some(&b"b"[..]));
            }
            Ok(((), Some(b"c".to_vec())))
        });
        assert_eq!(r, Ok(()));
        assert_eq!(store.get("k").unwrap().unwrap().0, b"c");
    }

    #[test]
    fn little_endian_reads_check_bounds() {
        let b = [1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(u16_at(&b, 0), Some(1));
        assert_eq!(u32_at(&b, 2), Some(2));
        assert_eq!(u64_at(&b, 6), Some(3));
        assert_eq!(u64_at(&b, 7), None);
        assert_eq!(u16_at(&b, usize::MAX), None);
        assert_eq!(as_u64(&b[6..]), Some(3));
        assert_eq!(as_u64(&b[5..]), None);
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
