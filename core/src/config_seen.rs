//! Marks of what this process has already seen, so that something happens
//! once per process rather than once per VM: Envoy configures every VM (each
//! worker, the main thread, a canary), so at `--concurrency 4` a warning
//! would be logged six times, and again with every VM of a listener update.

use crate::cas::{self, fnv1a, u64_at};
use crate::shared_data::{SharedData, StoreError};
use crate::shared_keys;

/// Whether this VM is the first to see `configuration` (since another one
/// was seen), and so should log its warnings.
pub fn first_to_see<S: SharedData>(store: &S, configuration: &str) -> bool {
    first_at(store, shared_keys::CONFIG_LOGGED, configuration)
}

/// Whether this VM is the first to see `what` at `key` (and since `what`
/// last changed). Fails open: if shared data cannot say, yes.
pub fn first_at<S: SharedData>(store: &S, key: &str, what: &str) -> bool {
    let hash = fnv1a(what.as_bytes()).to_le_bytes();
    cas::update(store, key, |value| {
        let first = value != Some(&hash[..]);
        Ok::<_, StoreError>((first, first.then(|| hash.to_vec())))
    })
    .unwrap_or(true)
}

/// When the configuration `text` of `service` first appeared in this
/// process: the same text seen again (every VM of one configuration) keeps
/// the first time, a different one starts a new generation (the lease
/// prefers it). `now_ns` if shared data cannot say.
pub fn config_since<S: SharedData>(store: &S, service: &str, text: &str, now_ns: u64) -> u64 {
    let hash = fnv1a(text.as_bytes()).to_le_bytes();
    cas::update(store, &shared_keys::config_since(service), |value| {
        if let Some(v) = value.filter(|v| v.len() == 16 && v[..8] == hash) {
            return Ok::<_, StoreError>((u64_at(v, 8).unwrap_or(now_ns), None));
        }
        let mut new = hash.to_vec();
        new.extend_from_slice(&now_ns.to_le_bytes());
        Ok((now_ns, Some(new)))
    })
    .unwrap_or(now_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_data::MemSharedData;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn once_per_configuration() {
        let store = MemSharedData::new();
        assert!(first_to_see(&store, "{\"a\":1}"));
        assert!(!first_to_see(&store, "{\"a\":1}"));
        assert!(first_to_see(&store, "{\"a\":2}"));
        assert!(!first_to_see(&store, "{\"a\":2}"));
        // Back to the first: a new configuration again, logged again.
        assert!(first_to_see(&store, "{\"a\":1}"));
    }

    #[test]
    fn a_configuration_keeps_the_time_it_first_appeared() {
        let store = MemSharedData::new();
        assert_eq!(config_since(&store, "s", "a", 10), 10);
        assert_eq!(config_since(&store, "s", "a", 20), 10);
        assert_eq!(config_since(&store, "s", "b", 30), 30);
        assert_eq!(config_since(&store, "other", "a", 40), 40);
    }

    /// Every VM of one configuration configures at once: one logs.
    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn racing_vms_log_once() {
        use std::sync::Arc;
        let store = Arc::new(MemSharedData::new());
        let firsts: usize = (0..6)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || first_to_see(&*store, "cfg"))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| usize::from(t.join().unwrap()))
            .sum();
        assert_eq!(firsts, 1);
    }
}
