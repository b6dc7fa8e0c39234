//! Which endpoint a request belongs to, decided without allocation beyond
//! the header the host hands us.

use sluice_core::config::{Config, MatchKind};
use std::collections::HashMap;
use std::time::Duration;

/// A watched endpoint with a capacity, ready for the request path.
pub struct Route {
    pub path: String,
    /// Its shared-data key: `sluice:<service>:ep:<path>`.
    pub key: String,
    pub capacity: u32,
    pub max_queue: u32,
    pub queue_timeout: Duration,
    methods: Vec<String>,
}

pub struct Routes {
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
        // Endpoints with no capacity yet are not limited: leaving them out
        // keeps their requests off shared data entirely.
        for e in config.endpoints.iter() {
            let Some(capacity) = e.capacity else { continue };
            let i = endpoints.len();
            endpoints.push(Route {
                path: e.path.clone(),
                key: format!("sluice:{}:ep:{}", config.service, e.path),
                capacity,
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
            endpoints,
            exact,
            prefixes,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(|r| r.key.as_str())
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
