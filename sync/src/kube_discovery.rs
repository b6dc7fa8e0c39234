//! Kubernetes discovery: sync watches the EndpointSlices of a Service
//! (`kubernetes.io/service-name=NAME` in its namespace) and streams the
//! addresses of its ready endpoints, with the chosen port, as the service's
//! instance set (`Snapshot.instances`, `discovered: true`), like DNS
//! discovery ([`crate::discovery`]) but pushed by the API server as pods
//! come, become ready, terminate and go.
//!
//! The loop is a list then a watch from the list's `resourceVersion`,
//! re-watching from the last version seen (events and bookmarks) when a
//! watch ends, and re-listing when the server says that version is gone
//! (410 Gone). It is written here rather than taken from kube-runtime so
//! that "stale" means exactly "no watch is up": a set is served as current
//! from the moment a list or watch is answered, and stale from the moment
//! one fails until one is answered again.
//!
//! A list or watch that fails keeps the last set, marked stale (retried
//! with backoff, 0.5 s doubling to 30 s). An answered list or watch whose
//! slices hold no ready endpoint is the truth: the Service scaled to zero,
//! or every pod unready; the set is empty, not stale, and requests wait for
//! an instance. docs/sync.md, "Discovery: Kubernetes".

use crate::services::{stopping, Services};
use crate::snapshots::DiscoveredSet;
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use sluice_core::config::instances::{KubernetesService, ServicePort};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// What this module asks of the API server, on `discovery.k8s.io`
/// `endpointslices` in the Service's namespace: the RBAC in
/// `deploy/kubernetes-discovery/rbac.yaml` grants exactly these
/// (tests/e2e/tests/deploy_manifests.rs), and the fake API server of
/// tests/e2e/tests/discovery_k8s.rs sees no other request.
pub const API_VERBS: [&str; 2] = ["list", "watch"];
pub const API_GROUP: &str = "discovery.k8s.io";
pub const API_RESOURCE: &str = "endpointslices";

/// The label every EndpointSlice of a Service carries, with its name.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Seconds the server holds one watch open before ending it (it is then
/// re-opened from the last version): below the client's read timeout, as
/// kube-runtime's watcher does.
const WATCH_TIMEOUT_SECS: u32 = 290;
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A watch that ended sooner than this waits this long before the next.
const MIN_WATCH: Duration = Duration::from_millis(200);

/// A Service to watch for a sluice service: `--discover-k8s
/// [SERVICE=]NAMESPACE/NAME:PORT`, or `instances.kubernetes` of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeTarget {
    /// The sluice service (`service:` of sluice.yaml) the set is for.
    pub service: String,
    pub source: KubernetesService,
}

impl fmt::Display for KubeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.source.fmt(f)
    }
}

impl KubeTarget {
    /// `NAMESPACE/NAME:PORT` for `service`. `what` names the flag in errors.
    pub fn parse(text: &str, service: &str, what: &str) -> Result<KubeTarget, String> {
        let shape =
            || format!("{what}: must be NAMESPACE/NAME:PORT, e.g. shop/backend:http, got {text:?}");
        let (namespace, rest) = text.split_once('/').ok_or_else(shape)?;
        let (name, port) = rest.rsplit_once(':').ok_or_else(shape)?;
        use sluice_core::config::instances::{kubernetes_name, service_port};
        kubernetes_name(namespace).map_err(|e| format!("{what}: namespace {e}"))?;
        kubernetes_name(name).map_err(|e| format!("{what}: Service name {e}"))?;
        let port = service_port(port).map_err(|e| format!("{what}: {e}"))?;
        Ok(KubeTarget {
            service: service.to_string(),
            source: KubernetesService {
                namespace: namespace.to_string(),
                service: name.to_string(),
                port,
            },
        })
    }

    /// The label selector of the Service's EndpointSlices.
    pub fn selector(&self) -> String {
        format!("{SERVICE_NAME_LABEL}={}", self.source.service)
    }
}

/// The instance set of a Service's slices, and what was left out of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// `ip:port` / `[ipv6]:port`, sorted, each once.
    pub addresses: Vec<String>,
    /// Endpoints left out: not ready, or terminating (even if still serving).
    pub not_ready: usize,
    /// Slices that list no such port (by name, or by number), by name.
    pub without_port: Vec<String>,
}

/// The port of `slice` that `port` names: by name, or a number the slice
/// lists (the pods' port, as an EndpointSlice gives it, not the Service's).
fn slice_port(slice: &EndpointSlice, port: &ServicePort) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let found = ports.iter().find(|p| match port {
        ServicePort::Name(name) => p.name.as_deref().unwrap_or("") == name,
        ServicePort::Number(n) => p.port == Some(i32::from(*n)),
    })?;
    u16::try_from(found.port?).ok().filter(|p| *p != 0)
}

/// Every slice of the Service merged into one set: the endpoints whose
/// `conditions.ready` is true (absent counts as true, as the API says) and
/// that are not `terminating` (a terminating endpoint that is still
/// `serving` is not picked: it is on its way out), at their first address,
/// with the slice's port that `port` names. IPv4 and IPv6 slices alike
/// (FQDN slices hold no address to send to); an address in two slices
/// (while the controller moves endpoints between them) counts once.
pub fn merge<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port: &ServicePort,
) -> Merged {
    let mut merged = Merged::default();
    let mut set: BTreeSet<SocketAddr> = BTreeSet::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(number) = slice_port(slice, port) else {
            if !slice.endpoints.is_empty() {
                merged
                    .without_port
                    .push(slice.metadata.name.clone().unwrap_or_default());
            }
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            let ready = conditions.ready.unwrap_or(true);
            let terminating = conditions.terminating.unwrap_or(false);
            if !ready || terminating {
                merged.not_ready += 1;
                continue;
            }
            // The addresses of one endpoint are fungible: the API lets
            // consumers take the first.
            let Some(ip) = endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<IpAddr>().ok())
            else {
                continue;
            };
            set.insert(SocketAddr::new(ip, number));
        }
    }
    merged.addresses = set.into_iter().map(|a| a.to_string()).collect();
    merged.addresses.sort();
    merged.without_port.sort();
    merged
}

/// The client every target uses: `KUBECONFIG` (or `~/.kube/config`) when
/// there is one, else the pod's service account (kube's `Config::infer`).
pub async fn client() -> Result<Client, String> {
    let mut config = kube::Config::infer().await.map_err(|e| {
        format!(
            "--discover-k8s/instances.kubernetes: no Kubernetes credentials: {e} (in a pod, \
             the service account's; elsewhere, KUBECONFIG)"
        )
    })?;
    // kube's own retries of 429/503/504 (up to 15, backing off to 1000 s)
    // would hide a failing API server behind one call for minutes: the loop
    // here retries with its own backoff, and the set is stale meanwhile.
    config.default_retry = false;
    Client::try_from(config).map_err(|e| {
        format!("--discover-k8s/instances.kubernetes: cannot build a Kubernetes client: {e}")
    })
}

/// Watches every target until shutdown.
pub async fn run(
    targets: Vec<KubeTarget>,
    client: Client,
    services: Arc<Services>,
    shutdown: watch::Receiver<bool>,
) {
    let mut tasks = Vec::new();
    for target in targets {
        info!(
            service = %target.service, kubernetes = %target, selector = %target.selector(),
            "Kubernetes discovery: watching EndpointSlices"
        );
        let follower = Follower {
            api: Api::namespaced(client.clone(), &target.source.namespace),
            target,
            services: services.clone(),
            slices: BTreeMap::new(),
            last: None,
            without_port: Vec::new(),
        };
        tasks.push(tokio::spawn(follower.run(shutdown.clone())));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Why the watch loop starts over.
enum Restart {
    /// Re-list (410 Gone, or an error the version may not survive).
    List,
    /// Watch again from the last version (a watch that ended or broke).
    Watch,
}

struct Follower {
    target: KubeTarget,
    api: Api<EndpointSlice>,
    services: Arc<Services>,
    /// The Service's slices, by name, as last listed and watched.
    slices: BTreeMap<String, EndpointSlice>,
    /// The set last published.
    last: Option<DiscoveredSet>,
    /// Slices without the port, as last logged.
    without_port: Vec<String>,
}

impl Follower {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_FIRST;
        let mut version: Option<String> = None;
        loop {
            let Some(from) = version.clone() else {
                let params = ListParams::default().labels(&self.target.selector());
                let listed = tokio::select! {
                    listed = self.api.list(&params) => listed,
                    _ = stopping(&mut shutdown) => return,
                };
                match listed {
                    Ok(list) => {
                        backoff = BACKOFF_FIRST;
                        self.slices = list
                            .items
                            .into_iter()
                            .map(|s| (s.metadata.name.clone().unwrap_or_default(), s))
                            .collect();
                        version = Some(list.metadata.resource_version.unwrap_or_default());
                        self.publish(false);
                    }
                    Err(error) => {
                        self.failed("list", &error);
                        if !pause(&mut backoff, &mut shutdown).await {
                            return;
                        }
                    }
                }
                continue;
            };
            let params = WatchParams::default()
                .labels(&self.target.selector())
                .timeout(WATCH_TIMEOUT_SECS);
            let started = tokio::select! {
                started = self.api.watch(&params, &from) => started,
                _ = stopping(&mut shutdown) => return,
            };
            let stream = match started {
                Ok(stream) => stream,
                Err(kube::Error::Api(status)) if status.code == 410 => {
                    self.gone(&status.message);
                    version = None;
                    continue;
                }
                Err(error) => {
                    self.failed("watch", &error);
                    if !pause(&mut backoff, &mut shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            backoff = BACKOFF_FIRST;
            // Answered: what the watch replays from `from` brings the set up
            // to date, so it is current again.
            if self.last.as_ref().is_some_and(|l| l.stale) {
                self.publish(false);
            }
            let opened = tokio::time::Instant::now();
            let mut stream = std::pin::pin!(stream);
            let restart = loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    _ = stopping(&mut shutdown) => return,
                };
                match event {
                    // The server ended the watch (its timeout): re-open it.
                    None => break Restart::Watch,
                    Some(Ok(WatchEvent::Added(slice) | WatchEvent::Modified(slice))) => {
                        version = slice.metadata.resource_version.clone().or(version);
                        let name = slice.metadata.name.clone().unwrap_or_default();
                        self.slices.insert(name, slice);
                        self.publish(false);
                    }
                    Some(Ok(WatchEvent::Deleted(slice))) => {
                        version = slice.metadata.resource_version.clone().or(version);
                        self.slices
                            .remove(slice.metadata.name.as_deref().unwrap_or_default());
                        self.publish(false);
                    }
                    Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                        version = Some(bookmark.metadata.resource_version);
                    }
                    Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                        self.gone(&status.message);
                        break Restart::List;
                    }
                    Some(Ok(WatchEvent::Error(status))) => {
                        self.failed("watch", &kube::Error::Api(status));
                        break Restart::List;
                    }
                    Some(Err(error)) => {
                        self.failed("watch", &error);
                        break Restart::Watch;
                    }
                }
            };
            if let Restart::List = restart {
                version = None;
            }
            let stale = self.last.as_ref().is_some_and(|l| l.stale);
            // A watch the server ends at once, again and again, is not
            // re-opened in a tight loop.
            let hasty = opened.elapsed() < MIN_WATCH;
            if stale && !pause(&mut backoff, &mut shutdown).await {
                return;
            }
            if !stale && hasty {
                tokio::select! {
                    _ = tokio::time::sleep(MIN_WATCH) => {}
                    _ = stopping(&mut shutdown) => return,
                }
            }
        }
    }

    /// The version the watch started from is gone (compacted): re-list. Not
    /// a failure: the set stays current until the list says otherwise.
    fn gone(&self, message: &str) {
        self.services
            .metrics()
            .kubernetes_relisted(&self.target.service);
        info!(
            service = %self.target.service, kubernetes = %self.target, message,
            "Kubernetes discovery: watch version gone (410); listing again"
        );
    }

    /// A list or watch failed: the last set, if any, is kept and marked stale.
    fn failed(&mut self, what: &str, error: &kube::Error) {
        self.services
            .metrics()
            .kubernetes_watch_failed(&self.target.service);
        match &self.last {
            Some(set) if !set.stale => {
                warn!(
                    service = %self.target.service, kubernetes = %self.target, %error,
                    kept = set.addresses.len(),
                    "Kubernetes discovery: {what} failed; keeping the last instance set (stale)"
                );
                self.publish(true);
            }
            Some(_) => {}
            None => warn!(
                service = %self.target.service, kubernetes = %self.target, %error,
                "Kubernetes discovery: {what} failed and no set was ever listed; retrying"
            ),
        }
    }

    /// Publishes the set of the slices held (`stale`: kept through a failure).
    fn publish(&mut self, stale: bool) {
        let merged = merge(self.slices.values(), &self.target.source.port);
        if merged.without_port != self.without_port {
            if !merged.without_port.is_empty() {
                warn!(
                    service = %self.target.service, kubernetes = %self.target,
                    slices = ?merged.without_port,
                    "Kubernetes discovery: these EndpointSlices list no port {}; their endpoints are left out",
                    self.target.source.port
                );
            }
            self.without_port = merged.without_port.clone();
        }
        let before = self
            .last
            .as_ref()
            .map(|l| l.addresses.clone())
            .unwrap_or_default();
        if !stale
            && (self.last.is_none()
                || before != merged.addresses
                || self.last.as_ref().is_some_and(|l| l.stale))
        {
            let added: Vec<&String> = merged
                .addresses
                .iter()
                .filter(|a| !before.contains(a))
                .collect();
            let removed: Vec<&String> = before
                .iter()
                .filter(|a| !merged.addresses.contains(a))
                .collect();
            info!(
                service = %self.target.service, kubernetes = %self.target,
                instances = merged.addresses.len(), not_ready = merged.not_ready,
                slices = self.slices.len(), ?added, ?removed,
                "Kubernetes discovery: instance set"
            );
        }
        let next = DiscoveredSet {
            addresses: if stale { before } else { merged.addresses },
            stale,
        };
        self.services
            .metrics()
            .discovered(&self.target.service, next.addresses.len(), next.stale);
        if self.last.as_ref() != Some(&next) {
            self.services
                .set_discovered(&self.target.service, next.clone());
            self.last = Some(next);
        }
    }
}

/// Waits out the backoff (doubled for next time); false on shutdown.
async fn pause(backoff: &mut Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = stopping(shutdown) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(value: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(value).unwrap()
    }

    fn endpoint(
        ip: &str,
        ready: Option<bool>,
        serving: bool,
        terminating: bool,
    ) -> serde_json::Value {
        let mut conditions = json!({"serving": serving, "terminating": terminating});
        if let Some(r) = ready {
            conditions["ready"] = json!(r);
        }
        json!({"addresses": [ip], "conditions": conditions})
    }

    #[test]
    fn ready_endpoints_of_every_slice_and_never_terminating_ones() {
        let a = slice(json!({
            "metadata": {"name": "backend-abc"},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
            "endpoints": [
                endpoint("10.0.0.1", Some(true), true, false),
                // Not ready yet (starting).
                endpoint("10.0.0.2", Some(false), false, false),
                // Terminating but still serving its requests: not picked.
                endpoint("10.0.0.3", Some(false), true, true),
                // ready absent: ready, as the API says.
                endpoint("10.0.0.4", None, true, false),
            ],
        }));
        let b = slice(json!({
            "metadata": {"name": "backend-def"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                endpoint("10.0.0.5", Some(true), true, false),
                // In two slices while the controller moves it: once.
                endpoint("10.0.0.1", Some(true), true, false),
                // Ready but terminating (a controller that says both): out.
                endpoint("10.0.0.6", Some(true), true, true),
            ],
        }));
        let merged = merge([&a, &b], &ServicePort::Name("http".into()));
        assert_eq!(
            merged,
            Merged {
                addresses: vec![
                    "10.0.0.1:8080".into(),
                    "10.0.0.4:8080".into(),
                    "10.0.0.5:8080".into()
                ],
                not_ready: 3,
                without_port: vec![],
            }
        );
        // By number: the slice's (pods') port.
        assert_eq!(
            merge([&a, &b], &ServicePort::Number(8080)).addresses,
            merged.addresses
        );
        // A port the slices do not list: nothing, and the slices are named.
        let none = merge([&a, &b], &ServicePort::Number(80));
        assert!(none.addresses.is_empty());
        assert_eq!(none.without_port, ["backend-abc", "backend-def"]);
        // The other named port of the first slice only.
        assert_eq!(
            merge([&a, &b], &ServicePort::Name("metrics".into())),
            Merged {
                addresses: vec!["10.0.0.1:9090".into(), "10.0.0.4:9090".into()],
                not_ready: 2,
                without_port: vec!["backend-def".into()],
            }
        );
    }

    #[test]
    fn ipv6_slices_unnamed_ports_fqdn_and_empty_slices() {
        let v6 = slice(json!({
            "metadata": {"name": "backend-v6"},
            "addressType": "IPv6",
            // A Service with one unnamed port: its name is "".
            "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": [
                endpoint("fd00::7", Some(true), true, false),
                endpoint("fd00::2", Some(true), true, false),
                // Several addresses: the first is the endpoint's.
                {"addresses": ["fd00::9", "fd00::10"], "conditions": {"ready": true}},
                // No conditions at all: ready.
                {"addresses": ["fd00::11"]},
            ],
        }));
        let v4 = slice(json!({
            "metadata": {"name": "backend-v4"},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [endpoint("10.1.0.1", Some(true), true, false)],
        }));
        let fqdn = slice(json!({
            "metadata": {"name": "backend-fqdn"},
            "addressType": "FQDN",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["backend.example"], "conditions": {"ready": true}}],
        }));
        // Scaled to zero: a slice with no endpoints (and, then, no ports).
        let empty = slice(json!({
            "metadata": {"name": "backend-empty"},
            "addressType": "IPv4",
            "ports": null,
            "endpoints": [],
        }));
        let merged = merge([&v6, &v4, &fqdn, &empty], &ServicePort::Number(8080));
        assert_eq!(
            merged.addresses,
            [
                "10.1.0.1:8080",
                "[fd00::11]:8080",
                "[fd00::2]:8080",
                "[fd00::7]:8080",
                "[fd00::9]:8080"
            ]
        );
        assert!(merged.without_port.is_empty(), "{merged:?}");
        assert_eq!(
            merge([&v6], &ServicePort::Name(String::new()))
                .addresses
                .len(),
            4
        );
        assert_eq!(
            merge([&empty], &ServicePort::Number(8080)),
            Merged::default()
        );
    }

    #[test]
    fn targets_parse_and_bad_ones_name_the_flag() {
        let t = KubeTarget::parse("shop/backend:http", "demo", "--discover-k8s").unwrap();
        assert_eq!(t.service, "demo");
        assert_eq!(t.to_string(), "shop/backend:http");
        assert_eq!(t.selector(), "kubernetes.io/service-name=backend");
        assert_eq!(
            KubeTarget::parse("shop/backend:8080", "demo", "x")
                .unwrap()
                .source
                .port,
            ServicePort::Number(8080)
        );
        let cases = [
            ("backend:80", "--discover-k8s: must be NAMESPACE/NAME:PORT, e.g. shop/backend:http, got \"backend:80\""),
            ("shop/backend", "--discover-k8s: must be NAMESPACE/NAME:PORT, e.g. shop/backend:http, got \"shop/backend\""),
            ("Shop/backend:80", "--discover-k8s: namespace must be a Kubernetes name (lower-case letters, digits and -, at most 63), got \"Shop\""),
            ("shop/back.end:80", "--discover-k8s: Service name must be a Kubernetes name (lower-case letters, digits and -, at most 63), got \"back.end\""),
            ("shop/backend:0", "--discover-k8s: port must be 1..65535 or a port name, got \"0\""),
            ("shop/backend:HTTP", "--discover-k8s: port must be 1..65535 or a port name (lower-case letters, digits and -, at most 15), got \"HTTP\""),
        ];
        for (text, want) in cases {
            assert_eq!(
                KubeTarget::parse(text, "demo", "--discover-k8s").unwrap_err(),
                want
            );
        }
    }
}
