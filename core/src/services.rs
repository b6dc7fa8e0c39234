//! The services configured in one `vm_id` (shared data is per `vm_id`), so
//! that a listener update that renames `service` is noticed: the new
//! configuration's records start empty while the old VMs, still serving
//! their streams until the drain ends, admit into the old ones, and the
//! backend may see both capacities at once. The filter warns (it cannot
//! refuse: two listeners may rightly share a `vm_id` with different
//! services, and a configuration refused at an update is a listener that
//! never updates).

use crate::admission;
use crate::cas;
use crate::shared_data::{SharedData, StoreError};
use crate::shared_keys;

/// At most this many names are remembered (oldest forgotten first): one
/// bounded key, never one per configuration.
pub const MAX_REMEMBERED: usize = 16;

/// A service that had requests in flight on a path the new configuration
/// also watches under another service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    pub old_service: String,
    pub path: String,
    pub in_flight: u32,
}

/// Notes `service` among this `vm_id`'s services and returns, for each other
/// service remembered there, the first of `paths` that still has requests
/// in flight in that service's record: what a rename under load leaves
/// behind. Fails open (nothing found) on shared-data trouble.
pub fn note<S: SharedData>(store: &S, service: &str, paths: &[&str]) -> Vec<Renamed> {
    let others = match remember(store, service) {
        Ok(others) => others,
        Err(_) => return Vec::new(),
    };
    others
        .iter()
        .filter_map(|old| {
            paths.iter().find_map(|path| {
                let state = admission::snapshot(store, &shared_keys::endpoint(old, path)).ok()?;
                (state.active > 0).then(|| Renamed {
                    old_service: old.clone(),
                    path: path.to_string(),
                    in_flight: state.active,
                })
            })
        })
        .collect()
}

/// Adds `service` to the remembered list (last), returning the others.
fn remember<S: SharedData>(store: &S, service: &str) -> Result<Vec<String>, StoreError> {
    cas::update(store, shared_keys::SERVICES, |value| {
        let text = value.map(String::from_utf8_lossy).unwrap_or_default();
        let mut names: Vec<String> = text
            .split('\n')
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
        let others: Vec<String> = names.iter().filter(|n| *n != service).cloned().collect();
        if names.last().map(String::as_str) == Some(service) {
            return Ok((others, None));
        }
        names.retain(|n| n != service);
        names.push(service.to_string());
        let skip = names.len().saturating_sub(MAX_REMEMBERED);
        Ok((others, Some(names[skip..].join("\n").into_bytes())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_data::MemSharedData;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn a_rename_with_requests_in_flight_is_found() {
        let store = MemSharedData::new();
        assert_eq!(note(&store, "a", &["/p"]), vec![]);
        let key = shared_keys::endpoint("a", "/p");
        admission::configure(&store, &key, Some(3), 0).unwrap();
        let _ = admission::acquire(&store, &key, 10, 0, None, 0).unwrap();
        // The same service again: nothing to say.
        assert_eq!(note(&store, "a", &["/p"]), vec![]);
        assert_eq!(
            note(&store, "b", &["/q", "/p"]),
            vec![Renamed {
                old_service: "a".into(),
                path: "/p".into(),
                in_flight: 1
            }]
        );
        // Other paths, or an idle old service: nothing.
        assert_eq!(note(&store, "c", &["/q"]), vec![]);
    }

    #[test]
    fn the_list_stays_bounded() {
        let store = MemSharedData::new();
        for i in 0..100 {
            note(&store, &format!("s{i}"), &[]);
        }
        let (v, _) = store.get(shared_keys::SERVICES).unwrap().unwrap();
        let names = String::from_utf8(v).unwrap();
        assert_eq!(names.lines().count(), MAX_REMEMBERED);
        assert!(names.ends_with("s99"));
    }
}
