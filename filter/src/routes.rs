//! Which endpoint a request belongs to, decided without allocation beyond
//! the header the host hands us.

use sluice_core::config::{Config, MatchKind};
use std::collections::HashMap;
use std::time::Duration;

/// A watched endpoint, ready for the request path.
pub struct Route {
    pub path: String,
    /// Its shared-data key: `sluice:<service>:ep:<path>`.
    pub key: String,
    /// The capacity this configuration gives it. The one in force is in the
    /// shared record (sync or a newer configuration may have changed it).
    pub configured: Option<u32>,
    pub max_queue: u32,
    pub queue_timeout: Duration,
    methods: Vec<String>,
}

pub struct Routes {
    pub service: String,
    pub endpoints: Vec<Route>,
    exact: HashMap<String, usize>,
    /// Longest prefix first.
    prefixes: Vec<usize>,
}

impl Routes {
    pub fn new(config: &Config) -> Routes {
        let mut endpoints = Vec::new();
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        // Endpoints with no capacity yet are routed too: they pass through,
        // counted, until sync gives them one.
        for e in config.endpoints.iter() {
            let i = endpoints.len();
            endpoints.push(Route {
                path: e.path.clone(),
                key: format!("sluice:{}:ep:{}", config.service, e.path),
                configured: e.capacity,
                max_queue: e.max_queue,
                queue_timeout: e.queue_timeout,
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
            endpoints,
            exact,
            prefixes,
        }
    }

    /// The endpoint of a request: exact match first, then the longest prefix.
    /// The query string is ignored. `method` is asked for only when the
    /// endpoint filters on it.
    pub fn find(&self, raw_path: &str, method: impl FnOnce() -> Option<String>) -> Option<usize> {
        let path = raw_path.split(['?', '#']).next().unwrap_or(raw_path);
        let i = self.exact.get(path).copied().or_else(|| {
            self.prefixes
                .iter()
                .copied()
                .find(|&i| path.starts_with(self.endpoints[i].path.as_str()))
        })?;
        let methods = &self.endpoints[i].methods;
        if methods.is_empty() {
            return Some(i);
        }
        let m = method()?;
        methods
            .iter()
            .any(|x| x.eq_ignore_ascii_case(&m))
            .then_some(i)
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
        let path_of = |p: &str| r.find(p, || None).map(|i| r.endpoints[i].path.as_str());
        assert_eq!(path_of("/v1/embed/special?x=1"), Some("/v1/embed/special"));
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
        assert_eq!(r.find("/predict?a=b#c", || None), Some(0));
        assert_eq!(r.find("/predict/x", || None), None);
        assert_eq!(r.find("/predictx", || None), None);
    }

    #[test]
    fn method_filter_is_asked_only_when_needed() {
        let r = routes(json!({"endpoints": {
            "/p": {"capacity": 1, "methods": ["POST"]},
            "/any": {"capacity": 1},
        }}));
        assert_eq!(r.find("/p", || Some("post".into())), Some(0));
        assert_eq!(r.find("/p", || Some("GET".into())), None);
        assert_eq!(r.find("/any", || panic!("method not needed")), Some(1));
    }
}
