//! What the sync service holds for each service: the capacities it last read
//! from Redis, in the shape it streams them. Pure: built from what Redis
//! returned, so the rules (versions, bad records, unknown services, stale)
//! are tested without Redis.

use sluice_core::capacity_record::{instance_capacities_from_hash, CapacityRecord};
use sluice_core::redis_keys::capacity_key;
use sluice_core::sync_api::{EndpointCapacity, Instance, Snapshot};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

/// One read of a service from Redis, all in one `MULTI`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisRead {
    /// `sluice:{SERVICE}:version`, 0 when the key does not exist.
    pub version: u64,
    /// Each member of the endpoints set with its record (`HGETALL`; empty
    /// when the hash is missing).
    pub records: Vec<(String, HashMap<String, String>)>,
}

/// The instance set sync resolved for a service (DNS), as it is streamed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveredSet {
    /// `ip:port` / `[ipv6]:port`, sorted, never empty.
    pub addresses: Vec<String>,
    /// The last lookup failed: this is the set of the last one that worked.
    pub stale: bool,
}

/// A service's state as it is streamed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceView {
    pub version: u64,
    /// Sorted by path.
    pub endpoints: Vec<EndpointCapacity>,
    /// Sorted by address: the discovered set, or (not discovered) every
    /// instance that has a per-instance capacity in Redis.
    pub instances: Vec<Instance>,
    /// `instances` is the set sync discovered (DNS).
    pub discovered: bool,
    /// Redis is unreachable: this is the last state read.
    pub stale: bool,
    /// The last DNS lookup failed: `instances` is the last set resolved.
    pub discovery_stale: bool,
}

impl ServiceView {
    pub fn snapshot(&self, service: &str, sent_at_unix_ms: i64) -> Snapshot {
        Snapshot {
            service: service.to_string(),
            version: self.version,
            endpoints: self.endpoints.clone(),
            heartbeat: false,
            stale: self.stale || self.discovery_stale,
            sent_at_unix_ms,
            instances: self.instances.clone(),
            discovered: self.discovered,
            assignment: Vec::new(),
        }
    }
}

/// "Nothing changed, the stream is alive". `view` is `None` while the
/// service has never been read (Redis unreachable since the start).
pub fn heartbeat(
    service: &str,
    view: Option<&ServiceView>,
    redis_up: bool,
    sent_at_unix_ms: i64,
) -> Snapshot {
    Snapshot {
        service: service.to_string(),
        version: view.map_or(0, |v| v.version),
        endpoints: Vec::new(),
        heartbeat: true,
        stale: view.map_or(!redis_up, |v| v.stale || v.discovery_stale),
        sent_at_unix_ms,
        ..Default::default()
    }
}

/// A record left out of the snapshot, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRecord {
    pub key: String,
    pub problem: String,
}

/// The endpoints of a read, sorted by path. A record that does not decode is
/// left out (the others still count); a member whose hash is gone (being
/// deleted) is left out silently.
pub fn endpoints_from(
    service: &str,
    records: &[(String, HashMap<String, String>)],
) -> (Vec<EndpointCapacity>, Vec<SkippedRecord>) {
    let mut endpoints = Vec::with_capacity(records.len());
    let mut skipped = Vec::new();
    for (path, hash) in records {
        match CapacityRecord::from_hash(hash) {
            Ok(Some(record)) => endpoints.push(EndpointCapacity {
                path: path.clone(),
                capacity: record.capacity,
                source: record.source.as_str().to_string(),
                measured_at: record.measured_at,
            }),
            Ok(None) => {}
            Err(e) => skipped.push(SkippedRecord {
                key: capacity_key(service, path),
                problem: e.to_string(),
            }),
        }
    }
    endpoints.sort_by(|a, b| a.path.cmp(&b.path));
    (endpoints, skipped)
}

/// How an address reads in a snapshot: as Rust (and Envoy's
/// `upstream.address`) print a socket address, so `[0:0::1]:80` written by
/// hand matches `[::1]:80` resolved; anything else as it is.
pub fn canonical_address(address: &str) -> String {
    match address.parse::<SocketAddr>() {
        Ok(a) => a.to_string(),
        Err(_) => address.to_string(),
    }
}

/// The instances of a read, sorted by address, each with its per-instance
/// capacities sorted by path (a figure takes its record's source and
/// time). With a discovered set, exactly its addresses; without, every
/// address that has a figure. Fields that are not positive integers are
/// returned as skipped; a record that does not decode gives no figures.
pub fn instances_from(
    service: &str,
    records: &[(String, HashMap<String, String>)],
    discovered: Option<&DiscoveredSet>,
) -> (Vec<Instance>, Vec<SkippedRecord>) {
    let mut by_address: BTreeMap<String, Vec<EndpointCapacity>> = BTreeMap::new();
    let mut skipped = Vec::new();
    for (path, hash) in records {
        let Ok(Some(record)) = CapacityRecord::from_hash(hash) else {
            continue; // endpoints_from reports it
        };
        let (capacities, bad) = instance_capacities_from_hash(hash);
        for field in bad {
            skipped.push(SkippedRecord {
                key: format!("{} {}", capacity_key(service, path), field.field),
                problem: format!("must be a positive integer, got {:?}", field.value),
            });
        }
        for (address, capacity) in capacities {
            by_address
                .entry(canonical_address(&address))
                .or_default()
                .push(EndpointCapacity {
                    path: path.clone(),
                    capacity,
                    source: record.source.as_str().to_string(),
                    measured_at: record.measured_at,
                });
        }
    }
    for capacities in by_address.values_mut() {
        capacities.sort_by(|a, b| a.path.cmp(&b.path));
    }
    let instances = match discovered {
        Some(set) => {
            let mut addresses = set.addresses.clone();
            addresses.sort();
            addresses.dedup();
            addresses
                .into_iter()
                .map(|address| Instance {
                    capacities: by_address.get(&address).cloned().unwrap_or_default(),
                    address,
                })
                .collect()
        }
        None => by_address
            .into_iter()
            .map(|(address, capacities)| Instance {
                address,
                capacities,
            })
            .collect(),
    };
    (instances, skipped)
}

/// What became of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The view changed (content, version or staleness): send it.
    Changed(ServiceView),
    /// Same as before: send nothing.
    Unchanged,
    /// Redis's counter is below a version this service already sent (Redis
    /// lost it): raise it to `raise_to` and read again. Nothing was applied.
    /// Only versions read from Redis count: what a watcher says it holds
    /// never raises anything (anyone can say anything).
    Behind { raise_to: u64 },
}

/// One service's state across reads.
#[derive(Debug, Default)]
pub struct ServiceState {
    view: Option<ServiceView>,
    /// The last read applied, to rebuild the view when the discovered set
    /// changes while Redis is away.
    last_read: Option<RedisRead>,
    /// The set sync discovered for this service (DNS), if it discovers one.
    discovered: Option<DiscoveredSet>,
    /// Keys of the records skipped in the last read, with the problem, so
    /// each is warned about once, not on every read.
    skipped: BTreeMap<String, String>,
}

impl ServiceState {
    /// `None` until the service was read once.
    pub fn view(&self) -> Option<&ServiceView> {
        self.view.as_ref()
    }

    /// Applies a read. Returns the outcome and the records skipped now that
    /// were not (with the same problem) in the read before.
    pub fn apply(&mut self, service: &str, read: &RedisRead) -> (Outcome, Vec<SkippedRecord>) {
        let sent = self.view.as_ref().map_or(0, |v| v.version);
        if read.version < sent {
            // Strictly above: the content under the lost versions may differ.
            return (Outcome::Behind { raise_to: sent + 1 }, Vec::new());
        }
        let (endpoints, mut skipped) = endpoints_from(service, &read.records);
        let (instances, bad_fields) =
            instances_from(service, &read.records, self.discovered.as_ref());
        skipped.extend(bad_fields);
        let newly_skipped = skipped
            .iter()
            .filter(|s| self.skipped.get(&s.key) != Some(&s.problem))
            .cloned()
            .collect();
        self.skipped = skipped.into_iter().map(|s| (s.key, s.problem)).collect();
        let view = ServiceView {
            version: read.version,
            endpoints,
            instances,
            discovered: self.discovered.is_some(),
            stale: false,
            discovery_stale: self.discovered.as_ref().is_some_and(|d| d.stale),
        };
        self.last_read = Some(read.clone());
        let outcome = if self.view.as_ref() == Some(&view) {
            Outcome::Unchanged
        } else {
            self.view = Some(view.clone());
            Outcome::Changed(view)
        };
        (outcome, newly_skipped)
    }

    /// The set sync discovered for this service, as last taken.
    pub fn discovered(&self) -> Option<&DiscoveredSet> {
        self.discovered.as_ref()
    }

    /// Takes the set sync discovered for this service (`None`: it discovers
    /// none) for the next read, which builds the view with it.
    pub fn use_discovered(&mut self, discovered: Option<DiscoveredSet>) {
        self.discovered = discovered;
    }

    /// Takes the set sync discovered for this service (`None`: it discovers
    /// none), for this read and the next. Returns the view rebuilt from the
    /// last read, when there is one and it changed: what to send while Redis
    /// is away (the version stays; its staleness too).
    pub fn set_discovered(
        &mut self,
        service: &str,
        discovered: Option<DiscoveredSet>,
    ) -> Option<ServiceView> {
        if self.discovered == discovered {
            return None;
        }
        self.discovered = discovered;
        let (read, old) = (self.last_read.as_ref()?, self.view.as_ref()?);
        let (instances, _) = instances_from(service, &read.records, self.discovered.as_ref());
        let view = ServiceView {
            instances,
            discovered: self.discovered.is_some(),
            discovery_stale: self.discovered.as_ref().is_some_and(|d| d.stale),
            ..old.clone()
        };
        if &view == old {
            return None;
        }
        self.view = Some(view.clone());
        Some(view)
    }

    /// Redis became unreachable: the view (if any) is now stale. Returns it
    /// when that is news.
    pub fn mark_stale(&mut self) -> Option<ServiceView> {
        let view = self.view.as_mut()?;
        if view.stale {
            return None;
        }
        view.stale = true;
        Some(view.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn record(capacity: &str, source: &str) -> HashMap<String, String> {
        hash(&[
            ("capacity", capacity),
            ("source", source),
            ("measured_at", "1763842052"),
        ])
    }

    fn read(version: u64, records: &[(&str, HashMap<String, String>)]) -> RedisRead {
        RedisRead {
            version,
            records: records
                .iter()
                .map(|(p, h)| (p.to_string(), h.clone()))
                .collect(),
        }
    }

    fn changed(outcome: Outcome) -> ServiceView {
        match outcome {
            Outcome::Changed(view) => view,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn snapshot_holds_every_record_sorted_by_path() {
        let mut state = ServiceState::default();
        let r = read(
            7,
            &[
                ("/predict", record("8", "probe")),
                ("/embed", record("3", "manual")),
            ],
        );
        let (outcome, skipped) = state.apply("demo", &r);
        assert!(skipped.is_empty());
        let snapshot = changed(outcome).snapshot("demo", 1234);
        assert_eq!(
            snapshot,
            Snapshot {
                service: "demo".into(),
                version: 7,
                endpoints: vec![
                    EndpointCapacity {
                        path: "/embed".into(),
                        capacity: 3,
                        source: "manual".into(),
                        measured_at: 1763842052,
                    },
                    EndpointCapacity {
                        path: "/predict".into(),
                        capacity: 8,
                        source: "probe".into(),
                        measured_at: 1763842052,
                    },
                ],
                heartbeat: false,
                stale: false,
                sent_at_unix_ms: 1234,
                ..Default::default()
            }
        );
    }

    #[test]
    fn unknown_service_is_an_empty_snapshot_at_version_0() {
        let mut state = ServiceState::default();
        let view = changed(state.apply("nobody", &RedisRead::default()).0);
        assert_eq!(view.version, 0);
        assert!(view.endpoints.is_empty());
        assert_eq!(
            state.apply("nobody", &RedisRead::default()).0,
            Outcome::Unchanged
        );
    }

    #[test]
    fn sends_only_when_content_or_version_changes() {
        let mut state = ServiceState::default();
        let r = read(1, &[("/p", record("8", "probe"))]);
        changed(state.apply("s", &r).0);
        assert_eq!(state.apply("s", &r).0, Outcome::Unchanged);
        // A new version with the same content is still news.
        let r2 = read(2, &[("/p", record("8", "probe"))]);
        assert_eq!(changed(state.apply("s", &r2).0).version, 2);
        // A hand edit without INCR: same version, new content.
        let r3 = read(2, &[("/p", record("9", "manual"))]);
        let view = changed(state.apply("s", &r3).0);
        assert_eq!((view.version, view.endpoints[0].capacity), (2, 9));
    }

    #[test]
    fn a_bad_record_is_skipped_and_reported_once() {
        let mut state = ServiceState::default();
        let r = read(
            3,
            &[
                ("/good", record("4", "probe")),
                ("/bad", hash(&[("capacity", "ten")])),
                ("/gone", HashMap::new()),
            ],
        );
        let (outcome, skipped) = state.apply("demo", &r);
        let view = changed(outcome);
        assert_eq!(view.endpoints.len(), 1);
        assert_eq!(view.endpoints[0].path, "/good");
        assert_eq!(
            skipped,
            [SkippedRecord {
                key: "sluice:{demo}:capacity:/bad".into(),
                problem: "field capacity: must be a positive integer, got \"ten\"".into(),
            }]
        );
        // The next read finds it still bad: no second warning.
        let (outcome, skipped) = state.apply("demo", &r);
        assert_eq!(outcome, Outcome::Unchanged);
        assert!(skipped.is_empty());
        // Fixed, then broken again: warned again.
        let fixed = read(4, &[("/bad", record("2", "manual"))]);
        assert!(state.apply("demo", &fixed).1.is_empty());
        let broken = read(5, &[("/bad", hash(&[("capacity", "0")]))]);
        assert_eq!(state.apply("demo", &broken).1.len(), 1);
    }

    #[test]
    fn a_counter_below_what_was_sent_is_raised_not_sent() {
        let mut state = ServiceState::default();
        changed(
            state
                .apply("s", &read(5, &[("/p", record("8", "probe"))]))
                .0,
        );
        // Redis restarted without persistence: the counter starts again.
        let after_restart = read(1, &[("/p", record("6", "probe"))]);
        assert_eq!(
            state.apply("s", &after_restart).0,
            Outcome::Behind { raise_to: 6 }
        );
        assert_eq!(state.view().unwrap().endpoints[0].capacity, 8, "kept");
        let raised = read(6, &[("/p", record("6", "probe"))]);
        assert_eq!(changed(state.apply("s", &raised).0).version, 6);
    }

    #[test]
    fn stale_is_news_once_and_a_fresh_read_clears_it() {
        let mut state = ServiceState::default();
        assert_eq!(state.mark_stale(), None, "nothing read yet");
        let r = read(1, &[("/p", record("8", "probe"))]);
        changed(state.apply("s", &r).0);
        let stale = state.mark_stale().expect("news");
        assert!(stale.stale);
        assert_eq!(stale.version, 1);
        assert_eq!(state.mark_stale(), None);
        // Redis is back with the same records: fresh again is news too.
        assert!(!changed(state.apply("s", &r).0).stale);
    }

    #[test]
    fn heartbeats_carry_the_version_and_staleness_but_no_endpoints() {
        let view = ServiceView {
            version: 4,
            endpoints: vec![EndpointCapacity::default()],
            instances: vec![Instance::default()],
            stale: true,
            ..Default::default()
        };
        let beat = heartbeat("s", Some(&view), true, 99);
        assert!(beat.heartbeat && beat.stale && beat.endpoints.is_empty());
        assert_eq!((beat.version, beat.sent_at_unix_ms), (4, 99));
        assert!(beat.instances.is_empty());
        let never_read = heartbeat("s", None, false, 99);
        assert_eq!((never_read.version, never_read.stale), (0, true));
    }

    fn with_instances(capacity: &str, instances: &[(&str, &str)]) -> HashMap<String, String> {
        let mut h = record(capacity, "probe");
        for (address, c) in instances {
            h.insert(format!("instance_capacity:{address}"), c.to_string());
        }
        h
    }

    fn addresses(view: &ServiceView) -> Vec<&str> {
        view.instances.iter().map(|i| i.address.as_str()).collect()
    }

    #[test]
    fn per_instance_capacities_come_from_the_records() {
        let mut state = ServiceState::default();
        let r = read(
            3,
            &[
                (
                    "/predict",
                    with_instances("4", &[("127.0.0.1:8002", "8"), ("[0::1]:8003", "2")]),
                ),
                ("/embed", with_instances("3", &[("127.0.0.1:8002", "1")])),
                ("/other", record("5", "manual")),
            ],
        );
        let view = changed(state.apply("demo", &r).0);
        assert!(!view.discovered);
        assert_eq!(addresses(&view), ["127.0.0.1:8002", "[::1]:8003"]);
        let paths: Vec<(&str, u32)> = view.instances[0]
            .capacities
            .iter()
            .map(|c| (c.path.as_str(), c.capacity))
            .collect();
        assert_eq!(paths, [("/embed", 1), ("/predict", 8)]);
        assert_eq!(view.instances[1].capacities[0].source, "probe");
        assert_eq!(view.instances[1].capacities[0].measured_at, 1763842052);
        let snapshot = view.snapshot("demo", 1);
        assert_eq!(snapshot.instances, view.instances);
        assert!(!snapshot.discovered);
    }

    #[test]
    fn a_bad_instance_field_is_skipped_alone() {
        let mut state = ServiceState::default();
        let r = read(
            1,
            &[(
                "/p",
                with_instances("4", &[("10.0.0.1:80", "0"), ("10.0.0.2:80", "3")]),
            )],
        );
        let (outcome, skipped) = state.apply("demo", &r);
        let view = changed(outcome);
        assert_eq!(view.endpoints[0].capacity, 4);
        assert_eq!(addresses(&view), ["10.0.0.2:80"]);
        assert_eq!(
            skipped,
            [SkippedRecord {
                key: "sluice:{demo}:capacity:/p instance_capacity:10.0.0.1:80".into(),
                problem: "must be a positive integer, got \"0\"".into(),
            }]
        );
    }

    #[test]
    fn a_discovered_set_is_the_instance_set() {
        let mut state = ServiceState::default();
        let set = |a: &[&str], stale| DiscoveredSet {
            addresses: a.iter().map(|s| s.to_string()).collect(),
            stale,
        };
        assert_eq!(
            state.set_discovered("s", Some(set(&["10.0.0.2:80", "10.0.0.1:80"], false))),
            None,
            "nothing read yet"
        );
        let r = read(
            2,
            &[(
                "/p",
                with_instances("4", &[("10.0.0.2:80", "8"), ("10.0.0.9:80", "1")]),
            )],
        );
        let view = changed(state.apply("s", &r).0);
        assert!(view.discovered);
        // Only the discovered ones, figures where Redis has them.
        assert_eq!(addresses(&view), ["10.0.0.1:80", "10.0.0.2:80"]);
        assert!(view.instances[0].capacities.is_empty());
        assert_eq!(view.instances[1].capacities[0].capacity, 8);
        // One more instance while Redis is away: rebuilt from the last read.
        state.mark_stale();
        let grown = state
            .set_discovered(
                "s",
                Some(set(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.9:80"], false)),
            )
            .expect("a change");
        assert_eq!(
            addresses(&grown),
            ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.9:80"]
        );
        assert_eq!(grown.instances[2].capacities[0].capacity, 1);
        assert!(grown.stale && grown.version == 2);
        // A failed lookup keeps the set and says so.
        let failed = state
            .set_discovered(
                "s",
                Some(set(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.9:80"], true)),
            )
            .expect("staleness is news");
        assert_eq!(failed.instances, grown.instances);
        assert!(failed.discovery_stale && failed.snapshot("s", 0).stale);
        assert!(heartbeat("s", Some(&failed), true, 0).stale);
    }
}
