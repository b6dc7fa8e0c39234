//! Command line and environment, and the settings they resolve to.

use crate::auth::{Token, TokenError};
use crate::discovery::{DiscoverySettings, DnsTarget};
use crate::kube_discovery::KubeTarget;
use clap::Parser;
use serde_json::Value;
use sluice_core::redis_keys::Storage;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "sluice-sync",
    version,
    about = "Streams the capacities in Redis to every Envoy's Sluice filter (gRPC sluice.sync.v1.CapacitySync)",
    after_help = "Logs go to stderr: level from SLUICE_LOG or RUST_LOG (e.g. info, sluice_sync=debug), \
                  JSON lines with SLUICE_LOG_FORMAT=json. Once listening, the first line on stdout is \
                  `listening on ADDR`. See docs/sync.md."
)]
pub struct Opts {
    /// Address to serve gRPC on (port 0: any free port)
    #[arg(
        long,
        env = "SLUICE_SYNC_LISTEN",
        default_value = "127.0.0.1:50051",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given)
    #[arg(long, env = "SLUICE_SYNC_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    // The env value stays out of --help: the URL can hold a password.
    /// Redis to read capacities from (wins over --config)
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis: Option<String>,

    /// CA certificate (PEM) that signed a rediss:// Redis's certificate
    /// [default: the system's trusted roots]
    #[arg(long, env = "SLUICE_REDIS_CA", value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,

    /// Client certificate (PEM) for a Redis that asks for one (with --redis-key)
    #[arg(
        long,
        env = "SLUICE_REDIS_CERT",
        value_name = "FILE",
        requires = "redis_key"
    )]
    pub redis_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM)
    #[arg(
        long,
        env = "SLUICE_REDIS_KEY",
        value_name = "FILE",
        requires = "redis_cert"
    )]
    pub redis_key: Option<PathBuf>,

    /// Redis is a Redis Cluster (implied when --redis lists several nodes,
    /// comma-separated)
    #[arg(long, env = "SLUICE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Take Redis from `storage:` of this sluice.yaml
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Full re-read of every watched service, the backstop for a lost
    /// update message
    #[arg(long, env = "SLUICE_SYNC_RESYNC_INTERVAL", default_value = "5s", value_parser = interval, value_name = "DURATION")]
    pub resync_interval: Duration,

    /// A heartbeat goes to a watcher when nothing else was sent for this long
    #[arg(long, env = "SLUICE_SYNC_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = interval, value_name = "DURATION")]
    pub heartbeat_interval: Duration,

    /// Forget a service (its snapshot, subscription and reads) once nobody
    /// has watched it for this long
    #[arg(long, env = "SLUICE_SYNC_FORGET_AFTER", default_value = "30s", value_parser = interval, value_name = "DURATION")]
    pub forget_after: Duration,

    /// Services held at once; a watcher of one more, while each is watched,
    /// gets RESOURCE_EXHAUSTED
    #[arg(long, env = "SLUICE_SYNC_MAX_SERVICES", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub max_services: u32,

    /// Require `authorization: Bearer <token>` on CapacitySync calls, the
    /// token read from this file (or SLUICE_SYNC_TOKEN holds it)
    #[arg(long, env = "SLUICE_SYNC_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Discover the instances of a service by DNS: resolve NAME (A and
    /// AAAA) every --dns-interval and stream the addresses, with PORT, as
    /// the service's instance set. SERVICE defaults to `service:` of
    /// --config, else "default". Repeatable; adds to `instances.dns` of
    /// --config
    #[arg(
        long = "discover",
        env = "SLUICE_SYNC_DISCOVER",
        value_delimiter = ',',
        value_name = "[SERVICE=]NAME:PORT"
    )]
    pub discover: Vec<String>,

    /// Discover the instances of a service from Kubernetes: watch the
    /// EndpointSlices of the Service NAME in NAMESPACE and stream its ready
    /// endpoints (not terminating ones) at PORT, a port name or a number the
    /// slices list (the pods' port), as the service's instance set.
    /// Credentials: KUBECONFIG (or ~/.kube/config) if there is one, else the
    /// pod's service account, which needs list and watch on
    /// endpointslices (deploy/kubernetes-discovery). SERVICE defaults as for
    /// --discover. Repeatable; adds to `instances.kubernetes` of --config;
    /// one source per service, DNS or this
    #[arg(
        long = "discover-k8s",
        env = "SLUICE_SYNC_DISCOVER_K8S",
        value_delimiter = ',',
        value_name = "[SERVICE=]NAMESPACE/NAME:PORT"
    )]
    pub discover_k8s: Vec<String>,

    /// The DNS server to ask, e.g. 127.0.0.1:5353 [default: the system's
    /// resolvers, /etc/resolv.conf and /etc/hosts]
    #[arg(long, env = "SLUICE_SYNC_DNS_SERVER", value_name = "IP:PORT")]
    pub dns_server: Option<SocketAddr>,

    /// Time between DNS lookups [default: `instances.dns_interval` of
    /// --config, else 5s]
    #[arg(long, env = "SLUICE_SYNC_DNS_INTERVAL", value_parser = interval, value_name = "DURATION")]
    pub dns_interval: Option<Duration>,

    /// Shares among Envoy replicas: how long a grant stays valid after the
    /// report it answers was sent
    #[arg(long, env = "SLUICE_SYNC_SHARE_LEASE", default_value = "2s", value_parser = interval, value_name = "DURATION")]
    pub share_lease: Duration,

    /// Shares: how long an Envoy whose lease ran out keeps min(share,
    /// capacity / watchers); 0 is exact mode (nothing once the lease ran out)
    #[arg(long, env = "SLUICE_SYNC_SHARE_FALLBACK_FOR", default_value = "0s", value_parser = duration_or_zero, value_name = "DURATION")]
    pub share_fallback_for: Duration,

    /// Shares: the least share of every Envoy in every pool, while the
    /// capacity allows it (0: an idle Envoy's first request waits for a
    /// report round trip)
    #[arg(
        long,
        env = "SLUICE_SYNC_SHARE_MIN",
        default_value_t = 0,
        value_name = "N"
    )]
    pub share_min: u32,

    /// Several sync replicas for the same Envoys: HOST:PORT at which the
    /// other replicas reach this one's gRPC (in Kubernetes, the pod's IP
    /// and --listen's port). One replica per service allocates its shares
    /// (a lease in Redis); the others forward its Share streams there.
    /// Leave it out with one replica
    #[arg(long, env = "SLUICE_SYNC_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// With --advertise: the allocator's lease in Redis; a replica that
    /// cannot renew it stops allocating before it runs out, and another
    /// takes over once it has
    #[arg(long, env = "SLUICE_SYNC_ALLOCATOR_LEASE", default_value = "5s", value_parser = interval, value_name = "DURATION")]
    pub allocator_lease: Duration,

    /// The token itself, from the environment only (a flag would show in
    /// `ps`).
    #[arg(skip = std::env::var("SLUICE_SYNC_TOKEN").ok())]
    pub token_env: Option<String>,
}

/// What the service runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub redis_url: String,
    /// Cluster mode and TLS files, beside the URL(s) in `redis_url`.
    pub redis: crate::redis_conn::RedisConn,
    pub resync_interval: Duration,
    pub heartbeat_interval: Duration,
    pub forget_after: Duration,
    pub max_services: usize,
    /// `None`: anyone may call CapacitySync.
    pub token: Option<Token>,
    /// `None`: no service's instances are discovered by DNS.
    pub discovery: Option<DiscoverySettings>,
    /// The services whose instances are Kubernetes EndpointSlices.
    pub kubernetes: Vec<KubeTarget>,
    /// The Share RPC's allocators.
    pub shares: crate::shares::Settings,
    /// `--advertise`: several replicas, one allocator per service.
    pub advertise: Option<String>,
    pub allocator_lease: Duration,
}

/// `instances.dns_interval` when neither it nor --dns-interval is given.
pub const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(5);

/// A setting that cannot be used. Each message names the flag or key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error(
        "no Redis to read: pass --redis URL (or SLUICE_REDIS_URL), or --config sluice.yaml \
         with storage: {{type: redis, url: ...}}"
    )]
    NoRedis,
    #[error("--config {path}: {problem}")]
    ConfigFile { path: String, problem: String },
    #[error("{flag}: {problem}")]
    BadRedisUrl { flag: &'static str, problem: String },
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("{0}")]
    TlsFiles(String),
    #[error("--token-file and SLUICE_SYNC_TOKEN are both set: use one")]
    TwoTokens,
    #[error("{0}")]
    Discovery(String),
    #[error("{0}")]
    Advertise(String),
}

impl Settings {
    pub fn from_opts(opts: &Opts) -> Result<Settings, SettingsError> {
        let config_text = match &opts.config {
            Some(path) => Some((
                path,
                std::fs::read_to_string(path).map_err(|e| SettingsError::ConfigFile {
                    path: path.display().to_string(),
                    problem: format!("cannot read it: {e}"),
                })?,
            )),
            None => None,
        };
        let (redis_url, flag) = match (&opts.redis, &config_text) {
            (Some(url), _) => (url.clone(), "--redis"),
            (None, Some((path, text))) => (redis_url_from_config(path, text)?, "storage.url"),
            (None, None) => return Err(SettingsError::NoRedis),
        };
        let (discovery, kubernetes) = discovery_settings(
            opts,
            config_text.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        )?;
        let redis = redis_conn(opts, &redis_url, flag)?;
        let token = match (&opts.token_file, &opts.token_env) {
            (Some(_), Some(_)) => return Err(SettingsError::TwoTokens),
            (Some(path), None) => Some(Token::from_file(path)?),
            (None, Some(text)) => Some(Token::parse(text, "SLUICE_SYNC_TOKEN")?),
            (None, None) => None,
        };
        let advertise = opts.advertise.as_deref().map(check_advertise).transpose()?;
        if opts.allocator_lease < Duration::from_secs(1) {
            return Err(SettingsError::Advertise(format!(
                "--allocator-lease: at least 1s (it is renewed every third of it), got {:?}",
                opts.allocator_lease
            )));
        }
        Ok(Settings {
            advertise,
            allocator_lease: opts.allocator_lease,
            listen: opts.listen,
            metrics_addr: opts.metrics_addr,
            redis_url,
            redis,
            resync_interval: opts.resync_interval,
            heartbeat_interval: opts.heartbeat_interval,
            forget_after: opts.forget_after,
            max_services: opts.max_services as usize,
            token,
            discovery,
            kubernetes,
            shares: crate::shares::Settings {
                lease_ms: opts.share_lease.as_millis() as u64,
                fallback_for_ms: opts.share_fallback_for.as_millis() as u64,
                min_share: opts.share_min,
                ..crate::shares::Settings::default()
            },
        })
    }
}

/// `--advertise HOST:PORT`: an address another replica can dial.
fn check_advertise(text: &str) -> Result<String, SettingsError> {
    let bad = |why: &str| {
        SettingsError::Advertise(format!(
            "--advertise: {why}, e.g. 10.0.0.7:50051 or sync-0.sync:50051, got {text:?}"
        ))
    };
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| bad("must be HOST:PORT"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port must be 1..65535")),
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return Err(bad("must be HOST:PORT"));
    }
    if host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(bad("the other replicas cannot dial an unspecified address"));
    }
    Ok(text.to_string())
}

/// What to discover: `--discover` targets, and `instances.dns` of the config
/// (for its `service:`), at `--dns-interval` else `instances.dns_interval`;
/// `--discover-k8s` and `instances.kubernetes`. One source per service.
fn discovery_settings(
    opts: &Opts,
    config: Option<(&Path, &str)>,
) -> Result<(Option<DiscoverySettings>, Vec<KubeTarget>), SettingsError> {
    let mut targets = Vec::new();
    let mut kubernetes: Vec<KubeTarget> = Vec::new();
    let mut interval = None;
    let mut service = "default".to_string();
    if let Some((path, text)) = config {
        let fail = |problem: String| SettingsError::ConfigFile {
            path: path.display().to_string(),
            problem,
        };
        let doc = sluice_core::config::yaml::parse(text)
            .map_err(|e| fail(format!("not valid YAML: {e}")))?;
        if let Some(Value::String(s)) = doc.get("service") {
            service = s.clone();
        }
        let (target, every) = dns_from_config(&doc, &service).map_err(fail)?;
        targets.extend(target);
        interval = every;
        kubernetes.extend(kubernetes_from_config(&doc, &service).map_err(fail)?);
    }
    for text in &opts.discover {
        let (for_service, name) = match text.split_once('=') {
            Some((s, name)) => (s.trim(), name.trim()),
            None => (service.as_str(), text.trim()),
        };
        sluice_core::redis_keys::check_service_name(for_service)
            .map_err(|e| SettingsError::Discovery(format!("--discover {text}: {e}")))?;
        let target =
            DnsTarget::parse(name, for_service, "--discover").map_err(SettingsError::Discovery)?;
        if targets
            .iter()
            .any(|t: &DnsTarget| t.service == target.service)
        {
            return Err(SettingsError::Discovery(format!(
                "--discover {text}: service {:?} already has a name to discover: one per service",
                target.service
            )));
        }
        targets.push(target);
    }
    for text in &opts.discover_k8s {
        let (for_service, source) = match text.split_once('=') {
            Some((s, source)) => (s.trim(), source.trim()),
            None => (service.as_str(), text.trim()),
        };
        sluice_core::redis_keys::check_service_name(for_service)
            .map_err(|e| SettingsError::Discovery(format!("--discover-k8s {text}: {e}")))?;
        let target = KubeTarget::parse(source, for_service, "--discover-k8s")
            .map_err(SettingsError::Discovery)?;
        if kubernetes.iter().any(|t| t.service == target.service) {
            return Err(SettingsError::Discovery(format!(
                "--discover-k8s {text}: service {:?} already has a Kubernetes Service to watch: one per service",
                target.service
            )));
        }
        kubernetes.push(target);
    }
    if let Some(both) = kubernetes
        .iter()
        .find(|k| targets.iter().any(|t: &DnsTarget| t.service == k.service))
    {
        return Err(SettingsError::Discovery(format!(
            "service {:?} is discovered both by DNS (--discover/instances.dns) and from Kubernetes \
             (--discover-k8s/instances.kubernetes, {both}): one source per service",
            both.service
        )));
    }
    if targets.is_empty() {
        if opts.dns_server.is_some() || opts.dns_interval.is_some() {
            return Err(SettingsError::Discovery(
                "--dns-server/--dns-interval without anything to discover: add --discover NAME:PORT \
                 or instances.dns to --config"
                    .into(),
            ));
        }
        return Ok((None, kubernetes));
    }
    let dns = DiscoverySettings {
        targets,
        interval: opts
            .dns_interval
            .or(interval)
            .unwrap_or(DEFAULT_DNS_INTERVAL),
        server: opts.dns_server,
    };
    Ok((Some(dns), kubernetes))
}

/// `instances.kubernetes` of a config document, read as the filter reads it
/// (`sluice_core::config::instances::kubernetes_service`).
pub fn kubernetes_from_config(doc: &Value, service: &str) -> Result<Option<KubeTarget>, String> {
    let Some(Value::Object(instances)) = doc.get("instances") else {
        return Ok(None);
    };
    match instances.get("kubernetes") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            if instances.contains_key("dns") {
                return Err(
                    "instances: has both `dns` and `kubernetes`; give one: a name to resolve or a \
                     Service to watch"
                        .into(),
                );
            }
            let source =
                sluice_core::config::instances::kubernetes_service(v, "instances.kubernetes")
                    .map_err(|e| e.to_string())?;
            Ok(Some(KubeTarget {
                service: service.to_string(),
                source,
            }))
        }
    }
}

/// `instances.dns` and `instances.dns_interval` of a config document.
/// (The filter and core validate the rest of `instances:`; sync needs only
/// these two.)
pub fn dns_from_config(
    doc: &Value,
    service: &str,
) -> Result<(Option<DnsTarget>, Option<Duration>), String> {
    let Some(instances) = doc.get("instances") else {
        return Ok((None, None));
    };
    let Value::Object(instances) = instances else {
        return Ok((None, None)); // not ours to report: the filter's parse names it
    };
    let target = match instances.get("dns") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(DnsTarget::parse(text, service, "instances.dns")?),
        Some(v) => return Err(format!("instances.dns: must be \"NAME:PORT\", got {v}")),
    };
    let interval = match instances.get("dns_interval") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(secs) if (0.1..=3600.0).contains(&secs) => Some(Duration::from_secs_f64(secs)),
            _ => {
                return Err(format!(
                    "instances.dns_interval: must be seconds between 0.1 and 3600, got {v}"
                ))
            }
        },
    };
    Ok((target, interval))
}

/// The URL list (one, or a cluster's nodes) and the TLS files, checked.
fn redis_conn(
    opts: &Opts,
    redis_url: &str,
    flag: &'static str,
) -> Result<crate::redis_conn::RedisConn, SettingsError> {
    let bad = |problem: String| SettingsError::BadRedisUrl { flag, problem };
    let urls: Vec<String> = redis_url
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(bad("no URL given".into()));
    }
    for url in &urls {
        redis::Client::open(url.as_str()).map_err(|e| {
            bad(format!(
                "not a Redis URL (redis://[user:pass@]host:port[/db], rediss:// for TLS): {e}"
            ))
        })?;
    }
    let secure = urls.iter().filter(|u| u.starts_with("rediss://")).count();
    if secure != 0 && secure != urls.len() {
        return Err(bad(
            "mix of rediss:// and redis:// nodes: use one scheme".into()
        ));
    }
    if (opts.redis_ca.is_some() || opts.redis_cert.is_some()) && secure == 0 {
        return Err(SettingsError::TlsFiles(
            "--redis-ca/--redis-cert need a rediss:// URL".into(),
        ));
    }
    let read = |path: &PathBuf, flag: &str| {
        std::fs::read(path).map_err(|e| {
            SettingsError::TlsFiles(format!("{flag} {}: cannot read it: {e}", path.display()))
        })
    };
    let ca = match &opts.redis_ca {
        Some(path) => Some(read(path, "--redis-ca")?),
        None => None,
    };
    let client_cert = match (&opts.redis_cert, &opts.redis_key) {
        (Some(cert), Some(key)) => Some((read(cert, "--redis-cert")?, read(key, "--redis-key")?)),
        _ => None,
    };
    Ok(crate::redis_conn::RedisConn {
        cluster: opts.redis_cluster || urls.len() > 1,
        urls,
        ca,
        client_cert,
    })
}

/// The Redis URL from `storage:` of a sluice.yaml (YAML, so JSON too).
pub fn redis_url_from_config(path: &Path, text: &str) -> Result<String, SettingsError> {
    let fail = |problem: String| SettingsError::ConfigFile {
        path: path.display().to_string(),
        problem,
    };
    let doc =
        sluice_core::config::yaml::parse(text).map_err(|e| fail(format!("not valid YAML: {e}")))?;
    match Storage::from_json(&doc).map_err(|e| fail(e.to_string()))? {
        Some(Storage::Redis { url }) => Ok(url),
        Some(Storage::Memory) => Err(fail(
            "storage.type is memory: the sync service needs storage: {type: redis, url: ...}"
                .into(),
        )),
        None => Err(fail(
            "has no storage: add storage: {type: redis, url: ...}, or pass --redis URL".into(),
        )),
    }
}

fn duration_or_zero(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 0s, 500ms, 5s)"))
}

fn interval(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{e} (e.g. 500ms, 5s)"))?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Opts, clap::Error> {
        Opts::try_parse_from(std::iter::once("sluice-sync").chain(args.iter().copied()))
    }

    #[test]
    fn advertise_is_an_address_other_replicas_can_dial() {
        let settings = |extra: &[&str]| {
            let mut args = vec!["--redis", "redis://127.0.0.1:6379"];
            args.extend(extra);
            Settings::from_opts(&parse(&args).unwrap()).map_err(|e| e.to_string())
        };
        let ok = settings(&["--advertise", "10.0.0.7:50051"]).unwrap();
        assert_eq!(ok.advertise.as_deref(), Some("10.0.0.7:50051"));
        assert!(settings(&["--advertise", "sync-0.sync.ns:50051"]).is_ok());
        assert!(settings(&["--advertise", "[::1]:50051"]).is_ok());
        for (bad, why) in [
            ("10.0.0.7", "must be HOST:PORT"),
            ("10.0.0.7:0", "the port must be 1..65535"),
            ("0.0.0.0:50051", "cannot dial an unspecified address"),
            (":50051", "must be HOST:PORT"),
        ] {
            let e = settings(&["--advertise", bad]).unwrap_err();
            assert!(
                e.starts_with("--advertise: ") && e.contains(why),
                "{bad}: {e}"
            );
        }
        let e = settings(&["--advertise", "h:1", "--allocator-lease", "500ms"]).unwrap_err();
        assert!(e.starts_with("--allocator-lease: at least 1s"), "{e}");
    }

    #[test]
    fn defaults() {
        let opts = parse(&["--redis", "redis://127.0.0.1:6379"]).unwrap();
        let settings = Settings::from_opts(&opts).unwrap();
        assert_eq!(
            settings,
            Settings {
                advertise: None,
                allocator_lease: Duration::from_secs(5),
                listen: "127.0.0.1:50051".parse().unwrap(),
                metrics_addr: None,
                redis_url: "redis://127.0.0.1:6379".into(),
                redis: crate::redis_conn::RedisConn {
                    urls: vec!["redis://127.0.0.1:6379".into()],
                    ..Default::default()
                },
                resync_interval: Duration::from_secs(5),
                heartbeat_interval: Duration::from_secs(1),
                forget_after: Duration::from_secs(30),
                max_services: 1000,
                token: None,
                discovery: None,
                kubernetes: vec![],
                shares: crate::shares::Settings {
                    lease_ms: 2000,
                    fallback_for_ms: 0,
                    min_share: 0,
                    report_interval_ms: 200,
                },
            }
        );
        let opts = parse(&[
            "--redis",
            "redis://h:1/2",
            "--listen",
            "0.0.0.0:0",
            "--resync-interval",
            "250ms",
            "--heartbeat-interval",
            "2s",
        ])
        .unwrap();
        let settings = Settings::from_opts(&opts).unwrap();
        assert_eq!(settings.listen.port(), 0);
        assert_eq!(settings.resync_interval, Duration::from_millis(250));
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(2));
        let opts = parse(&[
            "--redis",
            "redis://h:1",
            "--share-lease",
            "1500ms",
            "--share-fallback-for",
            "1s",
            "--share-min",
            "2",
        ])
        .unwrap();
        let shares = Settings::from_opts(&opts).unwrap().shares;
        assert_eq!(
            (shares.lease_ms, shares.fallback_for_ms, shares.min_share),
            (1500, 1000, 2)
        );
    }

    #[test]
    fn bad_flags_name_the_problem() {
        let cases: [(&[&str], &str); 6] = [
            (
                &["--share-lease", "0s"],
                "invalid value '0s' for '--share-lease <DURATION>': must be more than 0",
            ),
            (&["--share-min", "-1"], "unexpected argument '-1'"),
            (
                &["--listen", "nowhere"],
                "invalid value 'nowhere' for '--listen <ADDR>'",
            ),
            (
                &["--resync-interval", "0s"],
                "invalid value '0s' for '--resync-interval <DURATION>': must be more than 0",
            ),
            (
                &["--heartbeat-interval", "soon"],
                "invalid value 'soon' for '--heartbeat-interval <DURATION>'",
            ),
            (&["--bogus"], "unexpected argument '--bogus'"),
        ];
        for (args, want) in cases {
            let error = parse(args).unwrap_err().to_string();
            assert!(error.contains(want), "{args:?}: {error}");
        }
    }

    #[test]
    fn redis_comes_from_the_flag_or_the_config() {
        let opts = parse(&[]).unwrap();
        assert_eq!(Settings::from_opts(&opts), Err(SettingsError::NoRedis));
        let opts = parse(&["--redis", "http://h"]).unwrap();
        let error = Settings::from_opts(&opts).unwrap_err().to_string();
        assert!(error.starts_with("--redis: not a Redis URL"), "{error}");

        let path = Path::new("sluice.yaml");
        let ok = "service: demo\nstorage: {type: redis, url: \"redis://r:6380/1\"}\n";
        assert_eq!(redis_url_from_config(path, ok).unwrap(), "redis://r:6380/1");
        let json = r#"{"storage": {"type": "redis"}}"#;
        assert_eq!(
            redis_url_from_config(path, json).unwrap(),
            "redis://127.0.0.1:6379"
        );
        let cases = [
            ("service: demo\n", "--config sluice.yaml: has no storage: add storage: {type: redis, url: ...}, or pass --redis URL"),
            ("storage: {type: memory}\n", "--config sluice.yaml: storage.type is memory: the sync service needs storage: {type: redis, url: ...}"),
            ("storage: {type: redis, url: \"http://x\"}\n", "--config sluice.yaml: storage.url: must be a redis:// URL, got \"http://x\""),
            ("storage: [\n", "--config sluice.yaml: not valid YAML: "),
        ];
        for (text, want) in cases {
            let error = redis_url_from_config(path, text).unwrap_err().to_string();
            assert!(error.starts_with(want), "{text:?}: {error}");
        }
    }

    #[test]
    fn help_never_shows_the_redis_url_from_the_environment() {
        use clap::CommandFactory;
        let mut command = Opts::command();
        let redis = command
            .get_arguments()
            .find(|a| a.get_id() == "redis")
            .unwrap();
        assert!(redis.is_hide_env_values_set());
        assert!(command
            .render_help()
            .to_string()
            .contains("SLUICE_REDIS_URL"));
    }

    #[test]
    fn limits_and_the_token() {
        let dir = std::env::temp_dir().join(format!("sluice-sync-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, "s3cret\n").unwrap();
        let mut opts = parse(&[
            "--redis",
            "redis://h",
            "--forget-after",
            "200ms",
            "--max-services",
            "7",
            "--token-file",
            token_file.to_str().unwrap(),
        ])
        .unwrap();
        opts.token_env = None; // whatever this test's environment holds
        let settings = Settings::from_opts(&opts).unwrap();
        assert_eq!(settings.forget_after, Duration::from_millis(200));
        assert_eq!(settings.max_services, 7);
        assert_eq!(settings.token, Some(Token::parse("s3cret", "x").unwrap()));
        opts.token_env = Some("other".into());
        assert_eq!(Settings::from_opts(&opts), Err(SettingsError::TwoTokens));
        opts.token_file = None;
        opts.token_env = Some("".into());
        assert_eq!(
            Settings::from_opts(&opts).unwrap_err().to_string(),
            "SLUICE_SYNC_TOKEN: is empty"
        );
        let error = parse(&["--max-services", "0"]).unwrap_err().to_string();
        assert!(
            error.contains("invalid value '0' for '--max-services <N>'"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_config_file_is_named() {
        let opts = parse(&["--config", "/nonexistent/sluice.yaml"]).unwrap();
        let error = Settings::from_opts(&opts).unwrap_err().to_string();
        assert!(
            error.starts_with("--config /nonexistent/sluice.yaml: cannot read it: "),
            "{error}"
        );
    }

    #[test]
    fn kubernetes_discovery_from_flags_and_the_config_one_source_per_service() {
        let opts = parse(&[
            "--redis",
            "redis://h",
            "--discover-k8s",
            "shop/backend:http,other=ml/model:8000",
            "--discover",
            "third=api.internal:9000",
        ])
        .unwrap();
        let settings = Settings::from_opts(&opts).unwrap();
        assert_eq!(
            settings.kubernetes,
            [
                KubeTarget::parse("shop/backend:http", "default", "x").unwrap(),
                KubeTarget::parse("ml/model:8000", "other", "x").unwrap(),
            ]
        );
        assert_eq!(settings.discovery.unwrap().targets.len(), 1);

        let doc = sluice_core::config::yaml::parse(
            "service: demo\ninstances: {kubernetes: {namespace: shop, service: backend, port: 8080}}\n",
        )
        .unwrap();
        assert_eq!(
            kubernetes_from_config(&doc, "demo").unwrap(),
            Some(KubeTarget::parse("shop/backend:8080", "demo", "x").unwrap())
        );
        let cases = [
            (
                "instances: {kubernetes: {namespace: shop, service: backend}}\n",
                "instances.kubernetes.port: is required",
            ),
            (
                "instances: {kubernetes: {namespace: shop, service: backend, port: 8080}, dns: b:1}\n",
                "instances: has both `dns` and `kubernetes`",
            ),
            (
                "instances: {kubernetes: shop/backend:8080}\n",
                "instances.kubernetes: must be {namespace: NS, service: NAME, port: PORT}",
            ),
        ];
        for (text, want) in cases {
            let doc = sluice_core::config::yaml::parse(text).unwrap();
            let error = kubernetes_from_config(&doc, "d").unwrap_err();
            assert!(error.starts_with(want), "{text}: {error}");
        }

        let dir = std::env::temp_dir().join(format!("sluice-sync-k8s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("sluice.yaml");
        std::fs::write(
            &config,
            "service: demo\nstorage: {type: redis}\ninstances: {kubernetes: {namespace: shop, service: backend, port: http}}\n",
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let from_file = Settings::from_opts(&parse(&["--config", config]).unwrap()).unwrap();
        assert_eq!(
            from_file.kubernetes,
            [KubeTarget::parse("shop/backend:http", "demo", "x").unwrap()]
        );
        let errors = [
            (
                vec!["--config", config, "--discover", "backend:80"],
                "service \"demo\" is discovered both by DNS (--discover/instances.dns) and from \
                 Kubernetes (--discover-k8s/instances.kubernetes, shop/backend:http): one source per service",
            ),
            (
                vec!["--config", config, "--discover-k8s", "shop/other:80"],
                "--discover-k8s shop/other:80: service \"demo\" already has a Kubernetes Service to watch: one per service",
            ),
            (
                vec!["--redis", "redis://h", "--discover-k8s", "shop/backend"],
                "--discover-k8s: must be NAMESPACE/NAME:PORT, e.g. shop/backend:http, got \"shop/backend\"",
            ),
        ];
        for (args, want) in errors {
            let error = Settings::from_opts(&parse(&args).unwrap()).unwrap_err();
            assert_eq!(error.to_string(), want, "{args:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn discovery_from_flags_and_the_config() {
        let opts = parse(&[
            "--redis",
            "redis://h",
            "--discover",
            "backend:8080",
            "--discover",
            "other=api.internal:9000",
            "--dns-server",
            "127.0.0.1:5353",
            "--dns-interval",
            "500ms",
        ])
        .unwrap();
        let discovery = Settings::from_opts(&opts).unwrap().discovery.unwrap();
        assert_eq!(
            discovery,
            DiscoverySettings {
                targets: vec![
                    DnsTarget::parse("backend:8080", "default", "x").unwrap(),
                    DnsTarget::parse("api.internal:9000", "other", "x").unwrap(),
                ],
                interval: Duration::from_millis(500),
                server: Some("127.0.0.1:5353".parse().unwrap()),
            }
        );

        let doc = sluice_core::config::yaml::parse(
            "service: demo\ninstances: {dns: backend:8080, dns_interval: 0.5}\n",
        )
        .unwrap();
        assert_eq!(
            dns_from_config(&doc, "demo").unwrap(),
            (
                Some(DnsTarget::parse("backend:8080", "demo", "x").unwrap()),
                Some(Duration::from_millis(500))
            )
        );
        let static_hosts =
            sluice_core::config::yaml::parse("instances: {hosts: [\"127.0.0.1:1\"]}\n").unwrap();
        assert_eq!(dns_from_config(&static_hosts, "d").unwrap(), (None, None));
        let cases = [
            (
                "instances: {dns: 8080}\n",
                "instances.dns: must be \"NAME:PORT\", got 8080",
            ),
            (
                "instances: {dns: backend}\n",
                "instances.dns: must be NAME:PORT, e.g. backend:8080, got \"backend\"",
            ),
            (
                "instances: {dns: \"b:80\", dns_interval: 0}\n",
                "instances.dns_interval: must be seconds between 0.1 and 3600, got 0",
            ),
        ];
        for (text, want) in cases {
            let doc = sluice_core::config::yaml::parse(text).unwrap();
            assert_eq!(dns_from_config(&doc, "d").unwrap_err(), want, "{text}");
        }

        let error = Settings::from_opts(
            &parse(&["--redis", "redis://h", "--dns-server", "127.0.0.1:53"]).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("--dns-server/--dns-interval without anything"),
            "{error}"
        );
        let twice = parse(&[
            "--redis",
            "redis://h",
            "--discover",
            "a:1",
            "--discover",
            "b:2",
        ])
        .unwrap();
        assert!(Settings::from_opts(&twice)
            .unwrap_err()
            .to_string()
            .contains("already has a name to discover"));
    }
}
