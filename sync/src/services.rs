//! The services being watched. For each: its current view, in a tokio
//! `watch` channel that every stream of that service listens to, and the
//! newest version a watcher said it holds. The Redis side publishes views;
//! the gRPC side subscribes to them. A service stays watched once named.

use crate::snapshots::ServiceView;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

pub struct Services {
    entries: Mutex<HashMap<String, Arc<WatchedService>>>,
    /// Names the Redis side should (re)read now: new services, and services
    /// a watcher holds a newer version of than we sent.
    to_read: mpsc::UnboundedSender<String>,
    redis_up: watch::Sender<bool>,
}

pub struct WatchedService {
    /// `None` until the service was read once.
    view: watch::Sender<Option<ServiceView>>,
    /// The newest `last_version` any watcher sent.
    held: AtomicU64,
}

impl Services {
    /// The registry, and the receiving end of its read requests for the
    /// Redis side.
    pub fn new() -> (Arc<Services>, mpsc::UnboundedReceiver<String>) {
        let (to_read, requests) = mpsc::unbounded_channel();
        let services = Services {
            entries: Mutex::new(HashMap::new()),
            to_read,
            redis_up: watch::channel(false).0,
        };
        (Arc::new(services), requests)
    }

    /// The entry of `service`, created (and asked to be read) on first use.
    /// `held` is the version the caller holds (0: none).
    pub fn watch(&self, service: &str, held: u64) -> Arc<WatchedService> {
        let mut entries = self.entries.lock().expect("services lock");
        let (entry, read_now) = match entries.get(service) {
            Some(entry) => {
                let newer_than_sent = held > entry.view.borrow().as_ref().map_or(0, |v| v.version);
                entry.held.fetch_max(held, Ordering::Relaxed);
                (entry.clone(), newer_than_sent)
            }
            None => {
                let entry = Arc::new(WatchedService {
                    view: watch::channel(None).0,
                    held: AtomicU64::new(held),
                });
                entries.insert(service.to_string(), entry.clone());
                (entry, true)
            }
        };
        if read_now {
            // Fails only when the Redis side has stopped (shutting down).
            let _ = self.to_read.send(service.to_string());
        }
        entry
    }

    pub fn get(&self, service: &str) -> Option<Arc<WatchedService>> {
        self.entries
            .lock()
            .expect("services lock")
            .get(service)
            .cloned()
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .entries
            .lock()
            .expect("services lock")
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    pub fn redis_up(&self) -> bool {
        *self.redis_up.borrow()
    }

    /// Returns whether this is a change.
    pub fn set_redis_up(&self, up: bool) -> bool {
        self.redis_up.send_replace(up) != up
    }

    /// Follows Redis reachability (for the health service).
    pub fn subscribe_redis_up(&self) -> watch::Receiver<bool> {
        self.redis_up.subscribe()
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is not Send: drop it here, not in a select.
    let _ = shutdown.wait_for(|s| *s).await;
}

impl WatchedService {
    pub fn subscribe(&self) -> watch::Receiver<Option<ServiceView>> {
        self.view.subscribe()
    }

    pub fn current(&self) -> Option<ServiceView> {
        self.view.borrow().clone()
    }

    pub fn publish(&self, view: ServiceView) {
        self.view.send_replace(Some(view));
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(version: u64) -> ServiceView {
        ServiceView {
            version,
            endpoints: Vec::new(),
            stale: false,
        }
    }

    #[test]
    fn a_new_service_is_read_once_and_stays() {
        let (services, mut requests) = Services::new();
        let entry = services.watch("demo", 0);
        assert_eq!(requests.try_recv().unwrap(), "demo");
        services.watch("demo", 0);
        assert!(requests.try_recv().is_err(), "known: no second read");
        assert!(entry.current().is_none());
        entry.publish(view(3));
        assert_eq!(services.get("demo").unwrap().current(), Some(view(3)));
        assert_eq!(services.names(), ["demo"]);
    }

    #[test]
    fn a_watcher_ahead_of_us_asks_for_a_read() {
        let (services, mut requests) = Services::new();
        services.watch("demo", 0).publish(view(3));
        requests.try_recv().unwrap();
        services.watch("demo", 3);
        assert!(requests.try_recv().is_err(), "holds what we sent");
        let entry = services.watch("demo", 8);
        assert_eq!(requests.try_recv().unwrap(), "demo");
        assert_eq!(entry.held(), 8);
        services.watch("demo", 5);
        assert_eq!(entry.held(), 8, "the newest held version stays");
    }

    #[test]
    fn redis_up_reports_changes() {
        let (services, _requests) = Services::new();
        assert!(!services.redis_up());
        assert!(services.set_redis_up(true));
        assert!(!services.set_redis_up(true));
        assert!(services.set_redis_up(false));
    }
}
