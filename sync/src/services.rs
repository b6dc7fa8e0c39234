//! The services being watched. For each: its current view, in a tokio
//! `watch` channel that every stream of that service listens to. The Redis
//! side publishes views; the gRPC side subscribes to them.
//!
//! A service is held while a `Watch` stream or a `Fetch` call uses it (a
//! [`Watching`]), and forgotten once nobody has used it for the idle grace
//! period ([`Services::forget_idle`]), so names that nobody watches cost
//! nothing: no memory, no subscription, no reads. Their number is bounded.

use crate::metrics::Metrics;
use crate::snapshots::{DiscoveredSet, ServiceView};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

pub struct Services {
    entries: Mutex<HashMap<String, Entry>>,
    /// Names the Redis side should (re)read now: new services, and services
    /// a watcher holds a newer version of than we sent.
    to_read: mpsc::UnboundedSender<String>,
    redis_up: watch::Sender<bool>,
    max_services: usize,
    metrics: Arc<Metrics>,
    /// The instance sets DNS discovery resolved, by service. Kept whether
    /// or not anyone watches the service, so a first watcher gets the set.
    discovered: Mutex<HashMap<String, DiscoveredSet>>,
}

struct Entry {
    shared: Arc<WatchedService>,
    /// Streams and calls holding it now.
    users: usize,
    /// When `users` last fell to 0 (or when it was created).
    idle_since: Instant,
}

pub struct WatchedService {
    /// `None` until the service was read once.
    view: watch::Sender<Option<ServiceView>>,
    /// When the update message behind the current view was heard.
    heard_at: Mutex<Option<Instant>>,
}

/// Every service slot is held by a stream or a call (`--max-services`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "sluice-sync already serves {limit} services, each watched now (--max-services {limit}): \
     refusing a new one; close unused watchers or raise --max-services"
)]
pub struct TooManyServices {
    pub limit: usize,
}

/// One user of a service (a `Watch` stream, a `Fetch` call). The service
/// stays remembered while any is alive; dropping the last starts its idle
/// grace period. Not `Clone`: each is released exactly once.
pub struct Watching {
    services: Arc<Services>,
    name: String,
    entry: Arc<WatchedService>,
}

impl Services {
    /// The registry, and the receiving end of its read requests for the
    /// Redis side. At most `max_services` are held at once.
    pub fn new(max_services: usize) -> (Arc<Services>, mpsc::UnboundedReceiver<String>) {
        let (to_read, requests) = mpsc::unbounded_channel();
        let services = Services {
            entries: Mutex::new(HashMap::new()),
            to_read,
            redis_up: watch::channel(false).0,
            max_services: max_services.max(1),
            metrics: Arc::new(Metrics::new()),
            discovered: Mutex::new(HashMap::new()),
        };
        (Arc::new(services), requests)
    }

    /// Holds `service`, creating (and asking to read) it on first use.
    /// `held` is the version the caller holds (0: none): if it is above what
    /// we sent, Redis is read again (another replica may have sent a newer
    /// version). It is never written anywhere nor shown to anyone else.
    ///
    /// At the limit, a new name takes the place of the service that has been
    /// idle longest; if every one is in use, it is refused.
    pub fn watch(self: &Arc<Self>, service: &str, held: u64) -> Result<Watching, TooManyServices> {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("services lock");
        let read_now = match entries.get_mut(service) {
            Some(entry) => {
                entry.users += 1;
                held > entry.shared.view.borrow().as_ref().map_or(0, |v| v.version)
            }
            None => {
                if entries.len() >= self.max_services {
                    let idlest = entries
                        .iter()
                        .filter(|(_, e)| e.users == 0)
                        .min_by_key(|(_, e)| e.idle_since)
                        .map(|(name, _)| name.clone());
                    match idlest {
                        Some(name) => {
                            self.metrics.forget(&name);
                            entries.remove(&name)
                        }
                        None => {
                            return Err(TooManyServices {
                                limit: self.max_services,
                            })
                        }
                    };
                }
                let entry = Entry {
                    shared: Arc::new(WatchedService {
                        view: watch::channel(None).0,
                        heard_at: Mutex::new(None),
                    }),
                    users: 1,
                    idle_since: now,
                };
                entries.insert(service.to_string(), entry);
                true
            }
        };
        let shared = entries[service].shared.clone();
        drop(entries);
        if read_now {
            // Fails only when the Redis side has stopped (shutting down).
            let _ = self.to_read.send(service.to_string());
        }
        Ok(Watching {
            services: self.clone(),
            name: service.to_string(),
            entry: shared,
        })
    }

    fn release(&self, service: &str, shared: &Arc<WatchedService>) {
        let mut entries = self.entries.lock().expect("services lock");
        if let Some(entry) = entries.get_mut(service) {
            // An entry with users is never removed, so this is ours.
            if Arc::ptr_eq(&entry.shared, shared) {
                entry.users = entry.users.saturating_sub(1);
                if entry.users == 0 {
                    entry.idle_since = Instant::now();
                }
            }
        }
    }

    /// Forgets every service nobody has used for `grace` (as of `now`);
    /// returns how many.
    pub fn forget_idle(&self, grace: Duration, now: Instant) -> usize {
        let mut entries = self.entries.lock().expect("services lock");
        let before = entries.len();
        entries.retain(|name, e| {
            let keep = e.users > 0 || now.saturating_duration_since(e.idle_since) < grace;
            if !keep {
                self.metrics.forget(name);
            }
            keep
        });
        before - entries.len()
    }

    pub fn get(&self, service: &str) -> Option<Arc<WatchedService>> {
        self.entries
            .lock()
            .expect("services lock")
            .get(service)
            .map(|e| e.shared.clone())
    }

    pub fn contains(&self, service: &str) -> bool {
        self.entries
            .lock()
            .expect("services lock")
            .contains_key(service)
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("services lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The set discovery resolved for `service`, if it discovers one.
    pub fn discovered(&self, service: &str) -> Option<DiscoveredSet> {
        self.discovered
            .lock()
            .expect("discovered lock")
            .get(service)
            .cloned()
    }

    /// Takes a newly resolved set; a watched service is read again, so its
    /// watchers get the new set (under a new version) at once.
    pub fn set_discovered(&self, service: &str, set: DiscoveredSet) {
        let changed = self
            .discovered
            .lock()
            .expect("discovered lock")
            .insert(service.to_string(), set.clone())
            != Some(set);
        if changed && self.contains(service) {
            let _ = self.to_read.send(service.to_string());
        }
    }
}

impl Watching {
    pub fn entry(&self) -> &Arc<WatchedService> {
        &self.entry
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.services.release(&self.name, &self.entry);
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
        self.publish_heard(view, None);
    }

    /// Publishes a view read because of an update message heard at
    /// `heard_at` (for the write-to-send histogram).
    pub fn publish_heard(&self, view: ServiceView, heard_at: Option<Instant>) {
        *self.heard_at.lock().expect("heard_at lock") = heard_at;
        self.view.send_replace(Some(view));
    }

    /// When the update message behind the current view was heard, if one was.
    pub fn heard_at(&self) -> Option<Instant> {
        *self.heard_at.lock().expect("heard_at lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(version: u64) -> ServiceView {
        ServiceView {
            version,
            ..Default::default()
        }
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn a_new_service_is_read_once_and_stays_while_watched() {
        let (services, mut requests) = Services::new(10);
        let first = services.watch("demo", 0).unwrap();
        assert_eq!(requests.try_recv().unwrap(), "demo");
        let second = services.watch("demo", 0).unwrap();
        assert!(requests.try_recv().is_err(), "known: no second read");
        assert!(first.entry().current().is_none());
        first.entry().publish(view(3));
        assert_eq!(services.get("demo").unwrap().current(), Some(view(3)));
        assert_eq!(services.names(), ["demo"]);
        let later = Instant::now() + GRACE * 2;
        drop(first);
        assert_eq!(services.forget_idle(GRACE, later), 0, "still watched");
        drop(second);
        assert_eq!(services.forget_idle(GRACE, Instant::now()), 0, "in grace");
        assert_eq!(services.forget_idle(GRACE, later), 1);
        assert!(services.is_empty());
        // Named again: a new entry, read again.
        let again = services.watch("demo", 0).unwrap();
        assert_eq!(requests.try_recv().unwrap(), "demo");
        assert!(again.entry().current().is_none());
    }

    #[test]
    fn a_watcher_ahead_of_us_asks_for_a_read_and_raises_nothing() {
        let (services, mut requests) = Services::new(10);
        let w = services.watch("demo", 0).unwrap();
        w.entry().publish(view(3));
        requests.try_recv().unwrap();
        let _same = services.watch("demo", 3).unwrap();
        assert!(requests.try_recv().is_err(), "holds what we sent");
        let ahead = services.watch("demo", u64::MAX).unwrap();
        assert_eq!(requests.try_recv().unwrap(), "demo", "a read, nothing else");
        assert_eq!(ahead.entry().current(), Some(view(3)));
    }

    #[test]
    fn the_number_of_services_is_bounded_idle_ones_make_room() {
        let (services, _requests) = Services::new(2);
        let a = services.watch("a", 0).unwrap();
        let b = services.watch("b", 0).unwrap();
        assert_eq!(
            services.watch("c", 0).err(),
            Some(TooManyServices { limit: 2 })
        );
        let _a_again = services.watch("a", 0).expect("a known one is fine");
        drop(b);
        let _c = services
            .watch("c", 0)
            .expect("b is idle: c takes its place");
        assert_eq!(services.names(), ["a", "c"]);
        drop(a);
        assert_eq!(
            services.watch("d", 0).err(),
            Some(TooManyServices { limit: 2 }),
            "a is still held by its second user"
        );
    }

    #[test]
    fn redis_up_reports_changes() {
        let (services, _requests) = Services::new(1);
        assert!(!services.redis_up());
        assert!(services.set_redis_up(true));
        assert!(!services.set_redis_up(true));
        assert!(services.set_redis_up(false));
    }
}
