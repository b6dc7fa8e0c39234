//! Which endpoint a request belongs to, decided on its normalised path
//! ([`crate::path`]) and without allocation for ordinary paths.

use sluice_core::admission::Class;
use sluice_core::admission::Ejection;
use sluice_core::config::{Classes, Config, Cost, MatchKind, Sticky, Tenants};
use sluice_core::shared_keys;
use sluice_core::EndpointId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// How requests are steered to the instance picked for them (`instances`).
pub struct Steering {
    /// The request header Envoy's `override_host` policy reads.
    pub header: String,
    pub ejection: Ejection,
    pub sticky: Option<Sticky>,
}

/// A watched endpoint, ready for the request path.
pub struct Route {
    pub path: String,
    /// Its record's shared-data key.
    pub key: String,
    /// The capacity this configuration gives it. The one in force is in the
    /// shared record (sync or a newer configuration may have changed it).
    pub configured: Option<u32>,
    pub max_queue: u32,
    pub queue_timeout: Duration,
    /// Longest hold of an abandoned request's slot (see `abandon.rs`).
    pub abandon_hold: Duration,
    /// Longest time from admission to the end of the body (zero: none).
    pub max_upload_time: Duration,
    /// HTTP status of its `queue-full` refusals (503 or 429).
    pub queue_full_status: u16,
    /// Whether an upgrade (websocket) holds a slot for its whole life.
    pub count_upgrades: bool,
    /// `max_queued_bytes` and the key of its shared counter.
    pub queued_bytes: Option<(u64, String)>,
    /// The static instances (`instances.hosts`) with this endpoint's own
    /// capacity of each; empty without them (or with `dns`).
    pub hosts: Vec<(SocketAddr, Option<u32>)>,
    /// `instance_capacity`: also applied to instances sync discovers.
    pub instance_capacity: Vec<(SocketAddr, u32)>,
    /// The class of its requests that name none (`class`).
    pub class: Option<u8>,
    /// Its capacity counts units of cost (`cost`).
    pub cost: Option<Cost>,
    methods: Vec<String>,
}

pub struct Routes {
    pub service: String,
    /// The configuration's `metrics`: define them in Envoy's stats.
    pub metrics: bool,
    pub endpoints: Vec<Route>,
    /// With `instances`: every endpoint picks its instance.
    pub steering: Option<Steering>,
    /// Request classes (`classes`); `None`: one class.
    pub classes: Option<Classes>,
    /// `deadline_header`: a request's own deadline, ms from its arrival.
    pub deadline_header: Option<String>,
    /// Fair shares between tenants (`tenants`).
    pub tenants: Option<Tenants>,
    /// `refuse_unreachable_deadlines`.
    pub refuse_unreachable: bool,
    /// `sync.shares`: a share's lease ends at a time, so every admission
    /// and release reads the clock.
    pub shares: bool,
    exact: HashMap<String, usize>,
    /// Longest prefix first.
    prefixes: Vec<usize>,
}

impl Routes {
    /// Admissions and releases need the host's time: instances (ejection
    /// back-offs) or shares (leases). Without either, no hostcall.
    pub fn needs_clock(&self) -> bool {
        self.steering.is_some() || self.shares
    }

    /// The instances' ejection back-offs (the defaults without `instances`,
    /// for a record an older configuration gave instances).
    pub fn ejection(&self) -> Ejection {
        self.steering
            .as_ref()
            .map_or_else(Ejection::default, |s| s.ejection)
    }

    pub fn new(config: &Config) -> Routes {
        let mut endpoints = Vec::new();
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        // Endpoints with no capacity yet are routed too: they pass through,
        // counted, until sync gives them one.
        for e in config.endpoints.iter() {
            let i = endpoints.len();
            let key = shared_keys::endpoint(&config.service, &e.path);
            endpoints.push(Route {
                path: e.path.clone(),
                queued_bytes: e
                    .max_queued_bytes
                    .map(|cap| (cap, shared_keys::queued_bytes(&key))),
                key,
                configured: e.capacity,
                max_queue: e.max_queue,
                queue_timeout: e.queue_timeout,
                abandon_hold: e.abandon_hold,
                max_upload_time: e.max_upload_time,
                queue_full_status: e.queue_full_status,
                count_upgrades: e.count_upgrades,
                hosts: config
                    .instances
                    .as_ref()
                    .map(|i| e.instance_hosts(i))
                    .unwrap_or_default(),
                instance_capacity: e.instance_capacity.clone(),
                class: e.class,
                cost: e.cost.clone(),
                methods: e.methods.clone(),
            });
            match e.match_kind {
                MatchKind::Exact => {
                    exact.insert(e.path.clone(), i);
                }
                MatchKind::Prefix => prefixes.push(i),
            }
        }
        prefixes.sort_by_key(|&i| std::cmp::Reverse(endpoints[i].path.len()));
        Routes {
            service: config.service.clone(),
            metrics: config.metrics,
            endpoints,
            steering: config.instances.as_ref().map(|i| Steering {
                header: i.header.clone(),
                ejection: Ejection {
                    base_ns: i.eject_time.as_nanos() as u64,
                    max_ns: i.max_eject_time.as_nanos() as u64,
                },
                sticky: i.sticky.clone(),
            }),
            classes: config.classes.clone(),
            deadline_header: config.deadline_header.clone(),
            shares: false,
            tenants: config.tenants.clone(),
            refuse_unreachable: config.refuse_unreachable_deadlines,
            exact,
            prefixes,
        }
    }

    /// The endpoint of a request by its raw `:path`; see [`Routes::find_path`].
    #[cfg(test)]
    pub fn find(
        &self,
        raw_path: &str,
        method: impl FnOnce() -> Option<String>,
    ) -> Option<EndpointId> {
        self.find_path(&crate::path::request_path(raw_path), method)
    }

    /// The endpoint of a normalised path ([`crate::path::request_path`]): exact match
    /// first, then the longest prefix that ends at a segment boundary
    /// (`/embed` matches `/embed` and `/embed/x`, not `/embedding`, like
    /// Envoy's `path_separated_prefix`). `method` is asked for only when the
    /// endpoint filters on it.
    pub fn find_path(
        &self,
        path: &str,
        method: impl FnOnce() -> Option<String>,
    ) -> Option<EndpointId> {
        let i = self.exact.get(path).copied().or_else(|| {
            self.prefixes
                .iter()
                .copied()
                .find(|&i| is_segment_prefix(&self.endpoints[i].path, path))
        })?;
        let methods = &self.endpoints[i].methods;
        if methods.is_empty() {
            return Some(EndpointId(i));
        }
        let m = method()?;
        methods
            .iter()
            .any(|x| x.eq_ignore_ascii_case(&m))
            .then_some(EndpointId(i))
    }

    /// The endpoint `ep` of this configuration.
    pub fn route(&self, ep: EndpointId) -> &Route {
        &self.endpoints[ep.0]
    }

    /// The class of a request to `route`, reading its headers with
    /// `header` only where configured: the class its class header names if
    /// that is one, else the route's, else the default; and, with
    /// `tenants`, the flow of its tenant (no header: the empty key's).
    pub fn class_of(&self, route: &Route, header: impl Fn(&str) -> Option<String>) -> Class {
        let mut class = match &self.classes {
            None => Class::DEFAULT,
            Some(classes) => {
                let index = header(&classes.header)
                    .and_then(|n| classes.index(n.trim()))
                    .or(route.class)
                    .unwrap_or(classes.default);
                classes.admission(index)
            }
        };
        if let Some(t) = &self.tenants {
            let tenant = header(&t.header);
            let (flow, weight) = t.flow_of(tenant.as_deref().unwrap_or("").trim());
            class.flow = flow;
            class.step = sluice_core::admission::tag_step(weight);
        }
        class
    }

    /// How long a request of class `index` may wait on `route`: the lesser
    /// of the endpoint's and the class's `queue_timeout`.
    pub fn queue_timeout(&self, route: &Route, index: u8) -> Duration {
        self.classes
            .as_ref()
            .and_then(|c| c.list.get(usize::from(index)))
            .and_then(|c| c.queue_timeout)
            .map_or(route.queue_timeout, |t| t.min(route.queue_timeout))
    }
}

/// `prefix` covers `path` up to a `/`: the whole path, or whole segments.
fn is_segment_prefix(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn routes(doc: serde_json::Value) -> Routes {
        Routes::new(&Config::from_json(&doc).unwrap())
    }

    #[test]
    fn exact_beats_prefix_and_longest_prefix_wins() {
        let r = routes(json!({"service": "s", "endpoints": {
            "/v1": {"match": "prefix", "capacity": 1},
            "/v1/embed": {"match": "prefix", "capacity": 2},
            "/v1/embed/special": {"capacity": 3},
            "/unmeasured": {},
        }}));
        let path_of = |p: &str| r.find(p, || None).map(|i| r.route(i).path.as_str());
        assert_eq!(path_of("/v1/embed/special?x=1"), Some("/v1/embed/special"));
        assert_eq!(path_of("/v1/embed/special/"), Some("/v1/embed"));
        assert_eq!(path_of("/v1/embed/special/more"), Some("/v1/embed"));
        assert_eq!(path_of("/v1/other"), Some("/v1"));
        assert_eq!(path_of("/v2"), None);
        // No capacity yet: routed, and passes until sync gives it one.
        assert_eq!(path_of("/unmeasured"), Some("/unmeasured"));
        assert_eq!(r.endpoints[0].key, "sluice:s:ep:/v1");
    }

    #[test]
    fn exact_match_ignores_query_but_not_trailing_segments() {
        let r = routes(json!({"endpoints": {"/predict": {"capacity": 1}}}));
        assert_eq!(r.find("/predict?a=b#c", || None), Some(EndpointId(0)));
        assert_eq!(r.find("/predict/x", || None), None);
        assert_eq!(r.find("/predictx", || None), None);
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let r = routes(json!({"endpoints": {
            "/embed": {"match": "prefix", "capacity": 1},
            "/files/": {"match": "prefix", "capacity": 1},
            "/": {"match": "prefix", "capacity": 1},
        }}));
        let path_of = |p: &str| r.find(p, || None).map(|i| r.route(i).path.as_str());
        let cases = [
            ("/embed", "/embed"),
            ("/embed/", "/embed"),
            ("/embed/x/y", "/embed"),
            ("/embed?x", "/embed"),
            ("/embedding", "/"),
            ("/embed.json", "/"),
            ("/files/a", "/files/"),
            ("/files/", "/files/"),
            ("/files", "/"),
            ("/", "/"),
            ("/anything", "/"),
        ];
        for (path, want) in cases {
            assert_eq!(path_of(path), Some(want), "{path}");
        }
    }

    #[test]
    fn encoded_and_dotted_spellings_match_their_endpoint() {
        let r = routes(json!({"endpoints": {
            "/predict": {"capacity": 1},
            "/embed": {"match": "prefix", "capacity": 1},
        }}));
        for p in [
            "/pre%64ict",
            "/%70redict",
            "//predict",
            "/./predict",
            "/x/../predict",
            "/predict/.",
        ] {
            let want = if p.ends_with('.') {
                None
            } else {
                Some(EndpointId(0))
            };
            assert_eq!(r.find(p, || None), want, "{p}");
        }
        assert_eq!(r.find("/%65mbed//x", || None), Some(EndpointId(1)));
        assert_eq!(r.find("/embed/../predict", || None), Some(EndpointId(0)));
    }

    #[test]
    fn method_filter_is_asked_only_when_needed() {
        let r = routes(json!({"endpoints": {
            "/p": {"capacity": 1, "methods": ["POST"]},
            "/any": {"capacity": 1},
        }}));
        assert_eq!(r.find("/p", || Some("post".into())), Some(EndpointId(0)));
        assert_eq!(r.find("/p", || Some("GET".into())), None);
        assert_eq!(
            r.find("/any", || panic!("method not needed")),
            Some(EndpointId(1))
        );
    }
}
