//! DNS discovery: sync resolves a service's name (A and AAAA) every
//! interval and streams the addresses as the service's instance set
//! (`Snapshot.instances`, `discovered: true`). What docker compose and a
//! Kubernetes headless Service give: one address per instance.
//!
//! A lookup that fails, or answers no address at all, keeps the last set
//! (marked stale): one bad answer never empties the set, which would leave
//! the filters nothing to send to. docs/sync.md, "Discovery".

use crate::services::{stopping, Services};
use crate::snapshots::DiscoveredSet;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;
use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

/// One lookup's bound, so a silent server is a failure well within the interval.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A name to resolve for a service: `--discover [SERVICE=]NAME:PORT`, or
/// `instances.dns` of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub service: String,
    pub name: String,
    pub port: u16,
}

impl fmt::Display for DnsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

impl DnsTarget {
    /// `NAME:PORT` for `service`. `what` names the flag or key in errors.
    pub fn parse(text: &str, service: &str, what: &str) -> Result<DnsTarget, String> {
        let (name, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{what}: must be NAME:PORT, e.g. backend:8080, got {text:?}"))?;
        let port: u16 = match port.parse() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{what}: port must be 1..65535, got {port:?}")),
        };
        let name = name.trim_end_matches('.');
        let good = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !good {
            return Err(format!(
                "{what}: {name:?} is not a DNS name (letters, digits, - and _, dot-separated)"
            ));
        }
        Ok(DnsTarget {
            service: service.to_string(),
            name: name.to_string(),
            port,
        })
    }
}

/// What discovery runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverySettings {
    pub targets: Vec<DnsTarget>,
    pub interval: Duration,
    /// `None`: the system's resolvers (`/etc/resolv.conf`, `/etc/hosts`).
    pub server: Option<SocketAddr>,
}

/// Why a lookup gave no set.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{0}")]
    Dns(#[from] NetError),
    #[error("answered no A or AAAA record")]
    NoAddresses,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

pub fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, NetError> {
    let mut builder = match server {
        Some(server) => {
            let mut ns = NameServerConfig::udp_and_tcp(server.ip());
            ns.connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                .into_iter()
                .map(|mut c| {
                    c.port = server.port();
                    c
                })
                .collect();
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            );
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        }
        None => TokioResolver::builder_tokio()?,
    };
    let options: &mut ResolverOpts = builder.options_mut();
    // Every interval asks the server again: a cached answer would hide a
    // change for its TTL.
    options.cache_size = 0;
    options.timeout = LOOKUP_TIMEOUT;
    options.attempts = 1;
    builder.build()
}

/// The addresses of `target`, A and AAAA, as `ip:port` / `[ipv6]:port`,
/// sorted. A family with no record is empty; any other failure of either
/// lookup is a failure of the whole (a set missing its IPv6 half because
/// that lookup timed out would drop instances that are there).
pub async fn lookup(
    resolver: &TokioResolver,
    target: &DnsTarget,
) -> Result<Vec<String>, LookupError> {
    let name = target.name.as_str();
    let (v4, v6) = tokio::time::timeout(LOOKUP_TIMEOUT, async {
        tokio::join!(resolver.ipv4_lookup(name), resolver.ipv6_lookup(name))
    })
    .await
    .map_err(|_| LookupError::Timeout(LOOKUP_TIMEOUT))?;
    let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
    for result in [v4, v6] {
        match result {
            Ok(found) => ips.extend(found.answers().iter().filter_map(|r| r.data.ip_addr())),
            Err(e) if e.is_no_records_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    if ips.is_empty() {
        return Err(LookupError::NoAddresses);
    }
    let mut addresses: Vec<String> = ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, target.port).to_string())
        .collect();
    addresses.sort();
    Ok(addresses)
}

/// Resolves every target every interval until shutdown.
pub async fn run(
    settings: DiscoverySettings,
    services: Arc<Services>,
    shutdown: watch::Receiver<bool>,
) {
    let resolver = match resolver(settings.server) {
        Ok(r) => Arc::new(r),
        Err(error) => {
            warn!(%error, "DNS discovery: cannot build a resolver (no /etc/resolv.conf?); discovering nothing");
            return;
        }
    };
    let mut tasks = Vec::new();
    for target in settings.targets {
        info!(
            service = %target.service, name = %target, interval = ?settings.interval,
            server = %settings.server.map_or("system".to_string(), |s| s.to_string()),
            "DNS discovery: resolving"
        );
        tasks.push(tokio::spawn(follow(
            target,
            settings.interval,
            resolver.clone(),
            services.clone(),
            shutdown.clone(),
        )));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn follow(
    target: DnsTarget,
    interval: Duration,
    resolver: Arc<TokioResolver>,
    services: Arc<Services>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last: Option<DiscoveredSet> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopping(&mut shutdown) => return,
        }
        let metrics = services.metrics();
        let next = match lookup(&resolver, &target).await {
            Ok(addresses) => {
                let before = last
                    .as_ref()
                    .map(|l| l.addresses.clone())
                    .unwrap_or_default();
                if before != addresses || last.as_ref().is_some_and(|l| l.stale) {
                    let added: Vec<&String> =
                        addresses.iter().filter(|a| !before.contains(a)).collect();
                    let removed: Vec<&String> =
                        before.iter().filter(|a| !addresses.contains(a)).collect();
                    info!(
                        service = %target.service, name = %target, instances = addresses.len(),
                        ?added, ?removed, "DNS discovery: instance set"
                    );
                }
                DiscoveredSet {
                    addresses,
                    stale: false,
                }
            }
            Err(error) => {
                metrics.dns_lookup_failed(&target.service);
                match &last {
                    Some(set) => {
                        if !set.stale {
                            warn!(
                                service = %target.service, name = %target, %error,
                                kept = set.addresses.len(),
                                "DNS discovery: lookup failed; keeping the last instance set (stale)"
                            );
                        }
                        DiscoveredSet {
                            addresses: set.addresses.clone(),
                            stale: true,
                        }
                    }
                    None => {
                        warn!(
                            service = %target.service, name = %target, %error,
                            "DNS discovery: lookup failed and no set was ever resolved; retrying"
                        );
                        continue;
                    }
                }
            }
        };
        metrics.discovered(&target.service, next.addresses.len(), next.stale);
        if last.as_ref() != Some(&next) {
            services.set_discovered(&target.service, next.clone());
            last = Some(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_name_the_flag() {
        assert_eq!(
            DnsTarget::parse("backend.svc.local.:8080", "demo", "--discover").unwrap(),
            DnsTarget {
                service: "demo".into(),
                name: "backend.svc.local".into(),
                port: 8080
            }
        );
        let cases = [
            (
                "backend",
                "--discover: must be NAME:PORT, e.g. backend:8080, got \"backend\"",
            ),
            ("backend:0", "--discover: port must be 1..65535, got \"0\""),
            (
                "backend:http",
                "--discover: port must be 1..65535, got \"http\"",
            ),
            (
                ":80",
                "--discover: \"\" is not a DNS name (letters, digits, - and _, dot-separated)",
            ),
            (
                "a..b:80",
                "--discover: \"a..b\" is not a DNS name (letters, digits, - and _, dot-separated)",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                DnsTarget::parse(text, "demo", "--discover").unwrap_err(),
                want
            );
        }
    }
}
