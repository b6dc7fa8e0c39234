//! The shared store the admission core runs on, and an in-process copy of
//! Envoy's for tests.
//!
//! Envoy's proxy-wasm shared data is one process-wide map guarded by a mutex;
//! every value carries a CAS number. The rules, copied by [`MemSharedData`]:
//! - `set` with `cas == 0` is unconditional;
//! - `set` on an existing key with `cas != 0` fails with a mismatch unless
//!   `cas` equals the stored one;
//! - `set` on a *missing* key ignores `cas` altogether, so two writers that
//!   both saw the key missing both "create" it (the second one wins);
//! - every successful `set` gives the value a new CAS number, never 0.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Someone else wrote the key since we read it: read again and retry.
    CasMismatch,
    /// Conflicts on every attempt of a bounded CAS loop (`cas::update`).
    Contention,
    /// The host refused the operation for another reason.
    Host(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::CasMismatch => f.write_str("CAS mismatch"),
            StoreError::Contention => write!(
                f,
                "gave up after {} CAS conflicts",
                crate::cas::MAX_CAS_ATTEMPTS
            ),
            StoreError::Host(s) => write!(f, "shared data: {s}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// A key-value store with compare-and-swap, shaped like Envoy's shared data.
pub trait SharedData {
    /// The value and its CAS number, or `None` if the key does not exist.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes `value` if `cas` still matches (see the module docs for the rules).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

impl<S: SharedData + ?Sized> SharedData for &S {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}

/// In-process store with Envoy's CAS rules, safe to share between threads.
#[derive(Debug)]
pub struct MemSharedData {
    inner: Mutex<MemInner>,
}

#[derive(Debug)]
struct MemInner {
    map: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

impl Default for MemSharedData {
    fn default() -> Self {
        MemSharedData {
            inner: Mutex::new(MemInner {
                map: HashMap::new(),
                next_cas: 1,
            }),
        }
    }
}

impl MemSharedData {
    pub fn new() -> Self {
        Self::default()
    }
}

impl SharedData for MemSharedData {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.map.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().unwrap();
        let new_cas = inner.next_cas;
        inner.next_cas = inner.next_cas.wrapping_add(1).max(1);
        match inner.map.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    return Err(StoreError::CasMismatch);
                }
                *entry = (value.to_vec(), new_cas);
            }
            // Envoy ignores `cas` when the key is missing.
            None => {
                inner.map.insert(key.to_string(), (value.to_vec(), new_cas));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn cas_rules_match_envoy() {
        let s = MemSharedData::new();
        assert_eq!(s.get("k").unwrap(), None);
        // A write to a missing key ignores CAS: a stale or made-up CAS "creates" it.
        s.set("k", b"a", 12345).unwrap();
        let (v, cas) = s.get("k").unwrap().unwrap();
        assert_eq!(v, b"a");
        assert_ne!(cas, 0);
        // Existing key: wrong CAS fails, right CAS succeeds and changes the CAS.
        assert_eq!(
            s.set("k", b"b", cas.wrapping_add(7)),
            Err(StoreError::CasMismatch)
        );
        s.set("k", b"b", cas).unwrap();
        let (v, cas2) = s.get("k").unwrap().unwrap();
        assert_eq!(v, b"b");
        assert_ne!(cas2, cas);
        // The old CAS is now stale.
        assert_eq!(s.set("k", b"c", cas), Err(StoreError::CasMismatch));
        // CAS 0 is unconditional.
        s.set("k", b"d", 0).unwrap();
        assert_eq!(s.get("k").unwrap().unwrap().0, b"d");
    }

    #[test]
    fn two_creators_of_a_missing_key_both_succeed() {
        // Why keys must be created before traffic: both writers "win".
        let s = MemSharedData::new();
        assert!(s.get("k").unwrap().is_none());
        assert!(s.get("k").unwrap().is_none());
        s.set("k", b"first", 0).unwrap();
        s.set("k", b"second", 0).unwrap();
        assert_eq!(s.get("k").unwrap().unwrap().0, b"second");
    }
}
