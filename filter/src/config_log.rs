//! Configuration warnings once per configuration, not once per VM: Envoy
//! configures every VM (each worker, the main thread, a canary), so at
//! `--concurrency 4` each warning would be logged six times, and again with
//! every VM of a listener update. The first VM to see a configuration
//! records its hash in shared data; the others find it there and stay quiet.

use sluice_core::shared_data::{SharedData, StoreError};

/// Hash of the last configuration whose warnings were logged.
const LOGGED_KEY: &str = "sluice:config-logged";

/// Whether this VM is the first to see `configuration` (since another one
/// was seen), and so should log its warnings. Fails open: if shared data
/// cannot say, log.
pub fn first_to_see<S: SharedData>(store: &S, configuration: &str) -> bool {
    first_at(store, LOGGED_KEY, configuration)
}

/// Whether this VM is the first to see `what` at `key`: once per process
/// (and per change of `what`) rather than once per VM. Fails open.
pub fn first_at<S: SharedData>(store: &S, key: &str, what: &str) -> bool {
    let hash = fnv1a(what.as_bytes()).to_le_bytes();
    loop {
        let (value, cas) = match store.get(key) {
            Ok(found) => found.unwrap_or_default(),
            Err(_) => return true,
        };
        if value == hash {
            return false;
        }
        match store.set(key, &hash, cas) {
            Ok(()) => return true,
            // Another VM wrote first: look again.
            Err(StoreError::CasMismatch) => continue,
            Err(_) => return true,
        }
    }
}

/// FNV-1a, 64 bits: no dependency, and collisions only cost a missed log.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::shared_data::MemSharedData;

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
}
