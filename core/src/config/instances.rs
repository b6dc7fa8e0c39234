//! `instances`: the instances (`host:port`) of the service behind a front
//! proxy, which the filter picks from so that each is held to its own
//! capacity (see `docs/config.md#instances`). Absent: one Envoy counts for
//! everything behind it (a sidecar), as without instances.

use super::check::{self, unknown_keys, ConfigError, ConfigWarning, SecondsRange};
use super::document::{Document, Section};
use super::shown;
use crate::admission::MAX_INSTANCES;
#[cfg(feature = "schema")]
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::net::SocketAddr;
use std::time::Duration;

/// The header the filter sets to the picked instance, which Envoy's
/// `override_host` load balancer reads.
pub const DEFAULT_INSTANCE_HEADER: &str = "x-sluice-host";
pub const DEFAULT_DNS_INTERVAL_SECS: f64 = 5.0;
pub const DEFAULT_EJECT_TIME_SECS: f64 = 1.0;
pub const DEFAULT_MAX_EJECT_TIME_SECS: f64 = 30.0;

const DNS_INTERVAL: SecondsRange = SecondsRange {
    min: 0.1,
    min_exclusive: false,
    max: 3600.0,
    wording: "from 0.1 to 3600",
};
const EJECT_TIME: SecondsRange = SecondsRange {
    min: 0.001,
    min_exclusive: false,
    max: 3600.0,
    wording: "from 0.001 to 3600",
};

/// `instances` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(rename = "Instances", deny_unknown_fields)
)]
#[serde(default)]
pub struct InstancesDoc {
    /// The instances, as `IP:port` (`[IPv6]:port`), exactly as Envoy's
    /// cluster lists them. Or `dns`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "Vec<String>", length(min = 1, max = 256))
    )]
    pub hosts: Option<Value>,
    /// `name:port` that sluice-sync resolves (A and AAAA) and streams to
    /// the filters; for a Kubernetes headless Service or compose's service
    /// name. Or `hosts`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = "^[A-Za-z0-9.-]+:[0-9]+$"))
    )]
    pub dns: Option<Value>,
    /// A Kubernetes Service whose EndpointSlices sluice-sync watches
    /// (ready endpoints only) and streams to the filters. Or `hosts`, or `dns`.
    #[cfg_attr(feature = "schema", schemars(with = "KubernetesDoc"))]
    pub kubernetes: Option<Value>,
    /// Seconds between sync's resolutions of `dns`.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0.1, max = 3600), extend("default" = 5)))]
    pub dns_interval: Option<Value>,
    /// The header the filter sets to the picked `IP:port`; the cluster's
    /// `override_host` policy must read the same one.
    #[cfg_attr(feature = "schema", schemars(with = "String", regex(pattern = "^[a-z0-9-]+$"), extend("default" = "x-sluice-host")))]
    pub header: Option<Value>,
    /// Seconds an instance that refused or reset a connection is not picked
    /// after its first failure in a row; doubled with each further one.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0.001, max = 3600), extend("default" = 1)))]
    pub eject_time: Option<Value>,
    /// The longest such back-off, seconds.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0.001, max = 3600), extend("default" = 30)))]
    pub max_eject_time: Option<Value>,
    /// Sessions stick to one instance (and wait for a slot there): by the
    /// hash of this header's value, or of this cookie's.
    pub sticky: Option<Section<StickyDoc>>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// `instances.sticky`: one of the two.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Sticky", deny_unknown_fields))]
#[serde(default)]
pub struct StickyDoc {
    /// A request header carrying the session key.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = "^[A-Za-z0-9-]+$"))
    )]
    pub header: Option<Value>,
    /// A cookie carrying the session key.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = "^[!#-'*+.0-9A-Z^-z|~-]+$"))
    )]
    pub cookie: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

// For the schema only: `kubernetes_service` reads the key.
/// `instances.kubernetes`: the Service whose EndpointSlices sync watches.
#[cfg(feature = "schema")]
#[derive(JsonSchema)]
#[schemars(rename = "KubernetesService", deny_unknown_fields)]
#[allow(dead_code)]
struct KubernetesDoc {
    /// The Service's namespace.
    #[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    namespace: String,
    /// The Service's name (its EndpointSlices carry the label
    /// `kubernetes.io/service-name` with it).
    #[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    service: String,
    /// The port the instances are reached on: a number (an EndpointSlice
    /// port, the pods' port, not the Service's) or the port's name.
    port: PortDoc,
}

/// A port: its number, or its name.
#[cfg(feature = "schema")]
#[derive(JsonSchema)]
#[schemars(rename = "KubernetesPort", untagged)]
#[allow(dead_code)]
enum PortDoc {
    Number(#[schemars(range(min = 1, max = 65535))] u16),
    Name(#[schemars(regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 15))] String),
}

/// A port of an EndpointSlice, by number or by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServicePort {
    Number(u16),
    Name(String),
}

impl std::fmt::Display for ServicePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServicePort::Number(n) => write!(f, "{n}"),
            ServicePort::Name(name) => f.write_str(name),
        }
    }
}

/// A Kubernetes Service: `instances.kubernetes`, or sync's `--discover-k8s`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KubernetesService {
    pub namespace: String,
    pub service: String,
    pub port: ServicePort,
}

impl std::fmt::Display for KubernetesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.service, self.port)
    }
}

/// A namespace or Service name: a DNS-1123 label (lower-case letters,
/// digits and `-`, at most 63, starting and ending with a letter or digit).
pub fn kubernetes_name(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be a Kubernetes name (lower-case letters, digits and -, at most 63), got {text:?}"
        ))
    }
}

/// A port: a number 1..65535, or a port name as Kubernetes allows it (an
/// IANA service name: lower-case letters, digits and -, at most 15, with a
/// letter).
pub fn service_port(text: &str) -> Result<ServicePort, String> {
    if let Ok(n) = text.parse::<u32>() {
        return match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(ServicePort::Number(p)),
            _ => Err(format!(
                "port must be 1..65535 or a port name, got {text:?}"
            )),
        };
    }
    let bytes = text.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 15
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && !text.contains("--");
    if ok {
        Ok(ServicePort::Name(text.to_string()))
    } else {
        Err(format!(
            "port must be 1..65535 or a port name (lower-case letters, digits and -, at most 15), got {text:?}"
        ))
    }
}

/// `instances.kubernetes` (`key` names it in errors), checked.
pub fn kubernetes_service(v: &Value, key: &str) -> Result<KubernetesService, ConfigError> {
    let Some(map) = v.as_object() else {
        return Err(ConfigError::new(
            key,
            format!(
                "must be {{namespace: NS, service: NAME, port: PORT}}, got {}",
                shown(v)
            ),
        ));
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !["namespace", "service", "port"].contains(&k.as_str()))
    {
        return Err(ConfigError::new(
            format!("{key}.{unknown}"),
            "is not a key of it (namespace, service, port)",
        ));
    }
    let name = |field: &str| -> Result<String, ConfigError> {
        let k = format!("{key}.{field}");
        let text =
            check::text(map.get(field), &k)?.ok_or_else(|| ConfigError::new(&k, "is required"))?;
        kubernetes_name(&text).map_err(|why| ConfigError::new(&k, why))?;
        Ok(text)
    };
    let namespace = name("namespace")?;
    let service = name("service")?;
    let port_key = format!("{key}.port");
    let port = match map.get("port") {
        None | Some(Value::Null) => return Err(ConfigError::new(&port_key, "is required")),
        Some(Value::String(s)) => service_port(s),
        Some(Value::Number(n)) => service_port(&n.to_string()),
        Some(other) => Err(format!(
            "must be a port number or name, got {}",
            shown(other)
        )),
    }
    .map_err(|why| ConfigError::new(&port_key, why))?;
    Ok(KubernetesService {
        namespace,
        service,
        port,
    })
}

/// What sticks a session to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// This request header's value (lower case name).
    Header(String),
    /// This cookie's value.
    Cookie(String),
}

/// Where the instance set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceSet {
    /// `hosts`: fixed by the configuration.
    Static(Vec<SocketAddr>),
    /// `dns`: `name:port`, resolved by sync every `interval`.
    Dns {
        name: String,
        port: u16,
        interval: Duration,
    },
    /// `kubernetes`: the ready endpoints of a Service, watched by sync.
    Kubernetes(KubernetesService),
}

/// `instances`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instances {
    pub set: InstanceSet,
    pub header: String,
    pub eject_time: Duration,
    pub max_eject_time: Duration,
    pub sticky: Option<Sticky>,
}

impl Instances {
    /// The static hosts (none with `dns` or `kubernetes`, until sync
    /// discovers them).
    pub fn hosts(&self) -> &[SocketAddr] {
        match &self.set {
            InstanceSet::Static(hosts) => hosts,
            InstanceSet::Dns { .. } | InstanceSet::Kubernetes(_) => &[],
        }
    }

    /// Reads `instances` of the document; `None` when absent.
    pub fn from_document(
        doc: &Document,
        warnings: &mut Vec<ConfigWarning>,
    ) -> Result<Option<Instances>, ConfigError> {
        let fields = match &doc.instances {
            None | Some(Section::Bad(Value::Null)) => return Ok(None),
            Some(Section::Map(m)) => m,
            Some(Section::Bad(v)) => {
                return Err(ConfigError::new(
                    "instances",
                    format!(
                        "must be a map with `hosts`, `dns` or `kubernetes`, got {}",
                        shown(v)
                    ),
                ))
            }
        };
        warnings.extend(unknown_keys(&fields.unknown, "instances."));
        let kubernetes = match &fields.kubernetes {
            None | Some(Value::Null) => None,
            Some(v) => Some(kubernetes_service(v, "instances.kubernetes")?),
        };
        let given = [
            fields.hosts.is_some(),
            fields.dns.is_some(),
            kubernetes.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(ConfigError::new(
                "instances",
                "has more than one of `hosts`, `dns` and `kubernetes`; give one: a fixed \
                 list, a name to resolve or a Service to watch",
            ));
        }
        let set = match (&fields.hosts, &fields.dns) {
            _ if kubernetes.is_some() => {
                InstanceSet::Kubernetes(kubernetes.expect("checked just above"))
            }
            (Some(_), Some(_)) => unreachable!("refused above"),
            (None, None) => {
                return Err(ConfigError::new(
                    "instances",
                    "needs `hosts` (a list of IP:port), `dns` (a name:port sync resolves) or \
                     `kubernetes` (a Service whose EndpointSlices sync watches)",
                ))
            }
            (Some(v), None) => InstanceSet::Static(hosts(v)?),
            (None, Some(v)) => {
                let (name, port) = dns(v)?;
                let interval = check::seconds_or(
                    fields.dns_interval.as_ref(),
                    "instances.dns_interval",
                    DNS_INTERVAL,
                    Duration::from_secs_f64(DEFAULT_DNS_INTERVAL_SECS),
                )?;
                InstanceSet::Dns {
                    name,
                    port,
                    interval,
                }
            }
        };
        let header = match check::text(fields.header.as_ref(), "instances.header")? {
            None => DEFAULT_INSTANCE_HEADER.to_string(),
            Some(h) => header_name(&h, "instances.header")?,
        };
        let eject_time = check::seconds_or(
            fields.eject_time.as_ref(),
            "instances.eject_time",
            EJECT_TIME,
            Duration::from_secs_f64(DEFAULT_EJECT_TIME_SECS),
        )?;
        let max_eject_time = check::seconds_or(
            fields.max_eject_time.as_ref(),
            "instances.max_eject_time",
            EJECT_TIME,
            Duration::from_secs_f64(DEFAULT_MAX_EJECT_TIME_SECS).max(eject_time),
        )?;
        if max_eject_time < eject_time {
            return Err(ConfigError::new(
                "instances.max_eject_time",
                format!(
                    "must be at least eject_time ({} s), got {} s",
                    eject_time.as_secs_f64(),
                    max_eject_time.as_secs_f64()
                ),
            ));
        }
        let sticky = match &fields.sticky {
            None | Some(Section::Bad(Value::Null)) => None,
            Some(Section::Map(s)) => Some(sticky(s, warnings)?),
            Some(Section::Bad(v)) => {
                return Err(ConfigError::new(
                    "instances.sticky",
                    format!(
                        "must be {{header: NAME}} or {{cookie: NAME}}, got {}",
                        shown(v)
                    ),
                ))
            }
        };
        Ok(Some(Instances {
            set,
            header,
            eject_time,
            max_eject_time,
            sticky,
        }))
    }
}

fn hosts(v: &Value) -> Result<Vec<SocketAddr>, ConfigError> {
    let key = "instances.hosts";
    let Some(items) = v.as_array() else {
        return Err(ConfigError::new(
            key,
            format!("must be a list of IP:port, got {}", shown(v)),
        ));
    };
    if items.is_empty() || items.len() > MAX_INSTANCES {
        return Err(ConfigError::new(
            key,
            format!(
                "must list 1 to {MAX_INSTANCES} instances, got {}",
                items.len()
            ),
        ));
    }
    let mut out: Vec<SocketAddr> = Vec::with_capacity(items.len());
    for item in items {
        let address = address(item).map_err(|why| ConfigError::new(key, why))?;
        if out.contains(&address) {
            return Err(ConfigError::new(key, format!("lists {address} twice")));
        }
        out.push(address);
    }
    Ok(out)
}

/// An instance address: an IP literal and a port, as Envoy's
/// `upstream.address` prints it (`10.0.0.7:8000`, `[fd00::7]:8000`).
pub fn address(v: &Value) -> Result<SocketAddr, String> {
    let parsed = v.as_str().and_then(|s| s.parse::<SocketAddr>().ok());
    match parsed {
        Some(a) if a.port() != 0 => Ok(a),
        _ => Err(format!(
            "must be IP:port (an IP address, not a name: give a name as `dns`), got {}",
            shown(v)
        )),
    }
}

fn dns(v: &Value) -> Result<(String, u16), ConfigError> {
    let key = "instances.dns";
    let bad = || {
        ConfigError::new(
            key,
            format!(
                "must be name:port (e.g. backend.default.svc:8000), got {}",
                shown(v)
            ),
        )
    };
    let s = v.as_str().ok_or_else(bad)?;
    let (name, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !name_ok {
        return Err(bad());
    }
    Ok((name.to_ascii_lowercase(), port))
}

/// A header name Sluice may set or read: a token, lower-cased; not a
/// pseudo-header.
fn header_name(h: &str, key: &str) -> Result<String, ConfigError> {
    if h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(ConfigError::new(
            key,
            format!("must be a header name (letters, digits, `-`), got {h:?}"),
        ))
    }
}

fn sticky(s: &StickyDoc, warnings: &mut Vec<ConfigWarning>) -> Result<Sticky, ConfigError> {
    warnings.extend(unknown_keys(&s.unknown, "instances.sticky."));
    let header = check::text(s.header.as_ref(), "instances.sticky.header")?;
    let cookie = check::text(s.cookie.as_ref(), "instances.sticky.cookie")?;
    match (header, cookie) {
        (Some(h), None) => Ok(Sticky::Header(header_name(&h, "instances.sticky.header")?)),
        (None, Some(c)) => {
            let token = c
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
            if !token {
                return Err(ConfigError::new(
                    "instances.sticky.cookie",
                    format!("must be a cookie name, got {c:?}"),
                ));
            }
            Ok(Sticky::Cookie(c))
        }
        _ => Err(ConfigError::new(
            "instances.sticky",
            "needs exactly one of `header` and `cookie`",
        )),
    }
}

/// `endpoints.PATH.instance_capacity`: per-instance capacities of unequal
/// instances, `{IP:port: N}`. With static `hosts`, each must be one of them.
pub fn instance_capacity(
    v: &Value,
    key: &str,
    instances: Option<&Instances>,
) -> Result<Vec<(SocketAddr, u32)>, ConfigError> {
    let Some(map) = v.as_object() else {
        return Err(ConfigError::new(
            key,
            format!("must be a map from IP:port to a capacity, got {}", shown(v)),
        ));
    };
    let Some(instances) = instances else {
        return Err(ConfigError::new(
            key,
            "is set, but `instances` is not: there is no instance to hold to it",
        ));
    };
    let mut out = Vec::with_capacity(map.len());
    for (addr, n) in map {
        let entry = format!("{key}.{addr}");
        let a =
            address(&Value::String(addr.clone())).map_err(|why| ConfigError::new(&entry, why))?;
        if let InstanceSet::Static(hosts) = &instances.set {
            if !hosts.contains(&a) {
                return Err(ConfigError::new(&entry, "is not one of instances.hosts"));
            }
        }
        let c = super::capacity(n).ok_or_else(|| {
            ConfigError::new(
                &entry,
                format!("must be a positive integer, got {}", shown(n)),
            )
        })?;
        out.push((a, c));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::from_json_str(json)
    }

    #[test]
    fn static_hosts_with_defaults_and_per_instance_capacities() {
        let c = parse(
            r#"{"instances": {"hosts": ["127.0.0.1:8001", "[::1]:8002"]},
                "endpoints": {"/p": {"capacity": 4, "instance_capacity": {"[::1]:8002": 8}}}}"#,
        )
        .unwrap();
        let i = c.instances.as_ref().unwrap();
        assert_eq!(i.hosts().len(), 2);
        assert_eq!(i.header, "x-sluice-host");
        assert_eq!(
            (i.eject_time.as_secs(), i.max_eject_time.as_secs()),
            (1, 30)
        );
        assert_eq!(i.sticky, None);
        assert_eq!(
            c.endpoints[0].instance_capacity,
            vec![("[::1]:8002".parse().unwrap(), 8)]
        );
        assert_eq!(
            c.endpoints[0].instance_hosts(i),
            vec![
                ("127.0.0.1:8001".parse().unwrap(), None),
                ("[::1]:8002".parse().unwrap(), Some(8))
            ]
        );
    }

    #[test]
    fn dns_and_sticky() {
        let c = parse(
            r#"{"instances": {"dns": "Backend.default.svc:8000", "dns_interval": 0.5,
                "header": "X-Pick", "sticky": {"cookie": "session"}}}"#,
        )
        .unwrap();
        let i = c.instances.unwrap();
        assert_eq!(
            i.set,
            InstanceSet::Dns {
                name: "backend.default.svc".into(),
                port: 8000,
                interval: Duration::from_millis(500)
            }
        );
        assert_eq!(i.header, "x-pick");
        assert_eq!(i.sticky, Some(Sticky::Cookie("session".into())));
    }

    #[test]
    fn kubernetes_service_by_port_name_or_number() {
        let c = parse(
            r#"{"instances": {"kubernetes": {"namespace": "shop", "service": "backend", "port": "http"}}}"#,
        )
        .unwrap();
        let i = c.instances.unwrap();
        assert_eq!(
            i.set,
            InstanceSet::Kubernetes(KubernetesService {
                namespace: "shop".into(),
                service: "backend".into(),
                port: ServicePort::Name("http".into()),
            })
        );
        assert!(i.hosts().is_empty());
        assert_eq!(
            kubernetes_service(
                &serde_json::json!({"namespace": "a", "service": "b-2", "port": 8080}),
                "k"
            )
            .unwrap()
            .to_string(),
            "a/b-2:8080"
        );
        assert_eq!(service_port("8080"), Ok(ServicePort::Number(8080)),);
        for bad in [
            "0",
            "65536",
            "",
            "HTTP",
            "-http",
            "a--b",
            "sixteen-letters-",
            "123-",
        ] {
            assert!(service_port(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "Backend", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(kubernetes_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"{"instances": []}"#, "instances: must be a map"),
            (r#"{"instances": {}}"#, "instances: needs `hosts`"),
            (
                r#"{"instances": {"hosts": ["a:1"], "dns": "b:2"}}"#,
                "instances: has more than one of `hosts`, `dns` and `kubernetes`",
            ),
            (
                r#"{"instances": {"hosts": ["backend:80"]}}"#,
                "instances.hosts: must be IP:port",
            ),
            (
                r#"{"instances": {"hosts": ["127.0.0.1"]}}"#,
                "instances.hosts: must be IP:port",
            ),
            (
                r#"{"instances": {"hosts": []}}"#,
                "instances.hosts: must list 1 to 256",
            ),
            (
                r#"{"instances": {"hosts": ["127.0.0.1:1", "127.0.0.1:1"]}}"#,
                "instances.hosts: lists 127.0.0.1:1 twice",
            ),
            (
                r#"{"instances": {"dns": "backend"}}"#,
                "instances.dns: must be name:port",
            ),
            (
                r#"{"instances": {"dns": "b:2", "kubernetes": {"namespace": "a", "service": "b", "port": 1}}}"#,
                "instances: has more than one of `hosts`, `dns` and `kubernetes`",
            ),
            (
                r#"{"instances": {"kubernetes": "shop/backend:80"}}"#,
                "instances.kubernetes: must be {namespace: NS, service: NAME, port: PORT}",
            ),
            (
                r#"{"instances": {"kubernetes": {"service": "b", "port": 1}}}"#,
                "instances.kubernetes.namespace: is required",
            ),
            (
                r#"{"instances": {"kubernetes": {"namespace": "a", "service": "B", "port": 1}}}"#,
                "instances.kubernetes.service: must be a Kubernetes name",
            ),
            (
                r#"{"instances": {"kubernetes": {"namespace": "a", "service": "b", "port": 0}}}"#,
                "instances.kubernetes.port: port must be 1..65535 or a port name",
            ),
            (
                r#"{"instances": {"kubernetes": {"namespace": "a", "service": "b"}}}"#,
                "instances.kubernetes.port: is required",
            ),
            (
                r#"{"instances": {"kubernetes": {"namespace": "a", "service": "b", "port": 1, "ns": "x"}}}"#,
                "instances.kubernetes.ns: is not a key of it",
            ),
            (
                r#"{"instances": {"dns": "a_b:80"}}"#,
                "instances.dns: must be name:port",
            ),
            (
                r#"{"instances": {"dns": "b:80", "dns_interval": 0}}"#,
                "instances.dns_interval: must be a number of seconds from 0.1",
            ),
            (
                r#"{"instances": {"hosts": ["127.0.0.1:1"], "eject_time": 5, "max_eject_time": 2}}"#,
                "instances.max_eject_time: must be at least eject_time",
            ),
            (
                r#"{"instances": {"hosts": ["127.0.0.1:1"], "header": "x host"}}"#,
                "instances.header: must be a header name",
            ),
            (
                r#"{"instances": {"hosts": ["127.0.0.1:1"], "sticky": {}}}"#,
                "instances.sticky: needs exactly one",
            ),
            (
                r#"{"endpoints": {"/p": {"instance_capacity": {"127.0.0.1:1": 2}}}}"#,
                "endpoints./p.instance_capacity: is set, but `instances` is not",
            ),
            (
                r#"{"instances": {"hosts": ["127.0.0.1:1"]},
                    "endpoints": {"/p": {"instance_capacity": {"127.0.0.1:2": 2}}}}"#,
                "endpoints./p.instance_capacity.127.0.0.1:2: is not one of instances.hosts",
            ),
            (
                r#"{"instances": {"hosts": ["127.0.0.1:1"]},
                    "endpoints": {"/p": {"instance_capacity": {"127.0.0.1:1": 0}}}}"#,
                "endpoints./p.instance_capacity.127.0.0.1:1: must be a positive integer",
            ),
        ];
        for (json, want) in cases {
            let e = parse(json).unwrap_err().to_string();
            assert!(e.starts_with(want), "{json}: {e}");
        }
    }
}
