//! The standard Sluice front proxy as an Envoy bootstrap: one listener, the
//! wasm filter, the router, and one backend cluster.

use crate::envoy::EnvoyOptions;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The listener's name (and its stats prefix).
pub const FRONT_LISTENER_NAME: &str = "sluice_front";

/// Turns the service, the endpoint and the outcome in the filter's metric
/// names (`sluice.<service>.<path>.<metric>`,
/// `sluice.<service>.<path>.<outcome>.outcomes_total`) into tags, so
/// `/stats/prometheus` shows
/// `sluice_in_flight{sluice_service="demo",sluice_endpoint="/predict"}`. Of
/// each regex, the first group is cut from the name and the inner one is the
/// tag's value; a path runs from the first `/` to the dot before the metric,
/// an instance's gauges carry `@<IP:port>` before theirs, and with classes
/// a class's metrics `#<class>` (no configured path holds a `#`).
/// The same block is in every Envoy configuration of the repo
/// (docs/metrics.md).
pub const STATS_TAGS_YAML: &str = r#"stats_config:
  stats_tags:
  - tag_name: sluice_service
    regex: '^wasmcustom\.sluice\.(([^/]*)\.)/'
  - tag_name: sluice_endpoint
    regex: '^wasmcustom\.sluice\.[^/]*\.((/[^#]*?)\.)(?:#[A-Za-z0-9_-]+\.)?(?:[a-z_]+\.outcomes_total|@[^@/]*\.instance_[a-z_]+|[a-z_]+)$'
  - tag_name: sluice_instance
    regex: '^wasmcustom\.sluice\.[^/]*\./.*\.(@([^@/]*)\.)instance_[a-z_]+$'
  - tag_name: outcome
    regex: '^wasmcustom\.sluice\.[^/]*\./.*\.(([a-z_]+)\.)outcomes_total$'
  - tag_name: sluice_class
    regex: '^wasmcustom\.sluice\.[^/]*\./[^#]*\.(#([A-Za-z0-9_-]+)\.)[a-z_.]+$'
"#;

#[derive(Debug, Clone)]
pub struct FrontProxy {
    pub listener_port: u16,
    pub admin_port: u16,
    pub backend_port: u16,
    /// The wasm module to load, e.g. [`crate::wasm_path`] or
    /// [`crate::empty_wasm_path`]; `None` renders plain Envoy, no wasm filter.
    pub wasm_path: Option<PathBuf>,
    /// The plugin `configuration`, passed to the filter as is.
    pub plugin_config_json: String,
    pub vm_id: String,
    /// Serve the listener from file-based LDS (`<work_dir>/lds.yaml`), so
    /// [`crate::Envoy::update_lds`] can change it while Envoy runs.
    pub use_lds: bool,
    /// Where Envoy's files go: bootstrap, `lds.yaml`, logs. Unique per
    /// `new`; a clone shares it (and the ports), so start one Envoy per
    /// FrontProxy at a time.
    pub work_dir: PathBuf,
    /// Must stay above the longest queue timeout (see [`FrontProxy::render`]).
    pub stream_idle_timeout_secs: u64,
    /// 0: no route timeout.
    pub route_timeout_secs: u64,
    /// More clusters (e.g. the sync service), YAML list items written at
    /// column 0; they are indented into `static_resources.clusters`.
    pub extra_clusters_yaml: String,
    /// More top-level bootstrap keys, appended as is (not `stats_config`:
    /// the bootstrap has one, see [`STATS_TAGS_YAML`]).
    pub extra_bootstrap_yaml: String,
    /// Envoy's file access log: one line per stream, in this text format
    /// (command operators such as `%RESPONSE_CODE% %DURATION%\n`), written
    /// to this file. `None`: no access log.
    pub access_log: Option<(PathBuf, String)>,
    /// See [`crate::EnvoyOptions::precise_timers`].
    pub precise_timers: bool,
    /// Let websockets through (`upgrade_configs: [websocket]` on the HTTP
    /// connection manager); without it Envoy answers an upgrade with 403.
    pub websocket: bool,
    /// The backend cluster's hosts when not only `backend_port`: several
    /// instances behind Envoy's `override_host` policy, steered by the
    /// filter's `x-sluice-host` (round robin without it), as
    /// `envoy/instances/envoy.yaml` has them.
    pub instances: Vec<SocketAddr>,
    /// Resolve the backend cluster's one host, `(name, port)`, with this DNS
    /// server (a STRICT_DNS cluster re-resolving every half second, c-ares
    /// pointed at it), behind the `override_host` policy: instances that
    /// come and go through DNS, as a headless Service gives them.
    pub dns_instances: Option<(String, u16, SocketAddr)>,
    /// At most this many connections to the backend, the rest of the
    /// requests waiting in Envoy's own connection pool (its pending queue);
    /// `None`: no limit that matters (a million). The benchmarks' baseline
    /// for a deep queue without Sluice.
    pub upstream_max_connections: Option<u32>,
}

/// The `override_host` load-balancing policy of a cluster whose instances
/// Sluice picks, at the indentation of a cluster's keys (4 spaces).
pub const OVERRIDE_HOST_YAML: &str = r#"    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.override_host
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
            override_host_sources: [{header: x-sluice-host}]
            fallback_policy:
              policies:
              - typed_extension_config:
                  name: envoy.load_balancing_policies.round_robin
                  typed_config: {"@type": type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin}
"#;

impl FrontProxy {
    /// The Sluice filter with this configuration in front of
    /// 127.0.0.1:`backend_port`, on free listener and admin ports.
    pub fn new(backend_port: u16, plugin_config_json: impl Into<String>) -> FrontProxy {
        FrontProxy::with_wasm(backend_port, Some(crate::wasm_path()), plugin_config_json)
    }

    /// Plain Envoy, no wasm filter: the benchmarks' baseline.
    pub fn without_wasm(backend_port: u16) -> FrontProxy {
        FrontProxy::with_wasm(backend_port, None, "")
    }

    /// Any wasm module (e.g. [`crate::empty_wasm_path`]), or none.
    pub fn with_wasm(
        backend_port: u16,
        wasm_path: Option<PathBuf>,
        plugin_config_json: impl Into<String>,
    ) -> FrontProxy {
        FrontProxy {
            listener_port: crate::free_port(),
            admin_port: crate::free_port(),
            backend_port,
            wasm_path,
            plugin_config_json: plugin_config_json.into(),
            vm_id: "sluice".to_string(),
            use_lds: false,
            work_dir: crate::unique_scratch_path("envoy"),
            stream_idle_timeout_secs: 600,
            route_timeout_secs: 0,
            extra_clusters_yaml: String::new(),
            extra_bootstrap_yaml: String::new(),
            access_log: None,
            precise_timers: true,
            websocket: false,
            instances: Vec::new(),
            dns_instances: None,
            upstream_max_connections: None,
        }
    }

    pub fn listener_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.listener_port).into()
    }

    pub fn lds_path(&self) -> PathBuf {
        self.work_dir.join("lds.yaml")
    }

    /// What [`crate::Envoy::start_with`] needs to run this proxy.
    pub fn envoy_options(&self, concurrency: u32) -> EnvoyOptions {
        let mut opts = EnvoyOptions::new(self.render(), self.admin_port);
        opts.listener_port = Some(self.listener_port);
        opts.lds_yaml = self.use_lds.then(|| self.render_lds());
        opts.work_dir = Some(self.work_dir.clone());
        opts.concurrency = concurrency;
        opts.precise_timers = self.precise_timers;
        opts
    }

    /// The bootstrap YAML.
    pub fn render(&self) -> String {
        let listeners = if self.use_lds {
            String::new()
        } else {
            format!("  listeners:\n{}", indent(&self.render_listener(false), 2))
        };
        let dynamic_resources = if self.use_lds {
            format!(
                "dynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    \
                 # Envoy reloads this file when a new one is renamed into place.\n    \
                 path_config_source:\n      path: {}\n",
                json_string(&self.lds_path().to_string_lossy())
            )
        } else {
            String::new()
        };
        let extra_clusters = indent(&self.extra_clusters_yaml, 2);
        let max_connections = self.upstream_max_connections.unwrap_or(1_000_000);
        let extra_bootstrap = &self.extra_bootstrap_yaml;
        let admin_port = self.admin_port;
        let hosts: Vec<SocketAddr> = if self.instances.is_empty() {
            vec![([127, 0, 0, 1], self.backend_port).into()]
        } else {
            self.instances.clone()
        };
        let lb_endpoints: String = hosts
            .iter()
            .map(|a| {
                format!(
                    "        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {} }}\n",
                    json_string(&a.ip().to_string()),
                    a.port()
                )
            })
            .collect();
        let mut lb_policy = if self.instances.is_empty() {
            String::new()
        } else {
            OVERRIDE_HOST_YAML.to_string()
        };
        let mut cluster_type = "STATIC".to_string();
        let mut lb_endpoints = lb_endpoints;
        if let Some((name, port, resolver)) = &self.dns_instances {
            cluster_type = format!(
                "STRICT_DNS\n    dns_refresh_rate: 0.5s\n    respect_dns_ttl: false\n    \
                 dns_lookup_family: V4_ONLY\n    typed_dns_resolver_config:\n      \
                 name: envoy.network.dns_resolver.cares\n      typed_config:\n        \
                 \"@type\": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig\n        \
                 resolvers: [{{socket_address: {{address: {}, port_value: {}}}}}]\n        \
                 dns_resolver_options: {{no_default_search_domain: true}}",
                resolver.ip(),
                resolver.port()
            );
            lb_policy = OVERRIDE_HOST_YAML.to_string();
            lb_endpoints = format!(
                "        - endpoint:\n            address:\n              socket_address: {{ address: {name}, port_value: {port} }}\n"
            );
        }
        format!(
            r#"# Sluice front proxy, rendered by sluice-harness's FrontProxy.
# File-based LDS refuses listeners unless the node has an id and a cluster.
node:
  id: sluice-front-proxy
  cluster: sluice
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
{listeners}  clusters:
  - name: backend
    type: {cluster_type}
    connect_timeout: 1s
    # Envoy's default thresholds (1024 connections, pending and active
    # requests) would queue or 503 before Sluice does.
    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_connections: {max_connections}
        max_pending_requests: 1000000
        max_requests: 1000000
        max_retries: 1000000
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        # HTTP/1.1 with keep-alive to the backend.
        common_http_protocol_options:
          idle_timeout: 3600s
        explicit_http_config:
          http_protocol_options: {{}}
{lb_policy}    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
{lb_endpoints}{extra_clusters}{dynamic_resources}{STATS_TAGS_YAML}{extra_bootstrap}"#
        )
    }

    /// The LDS file: the same listener as a `Listener` resource.
    pub fn render_lds(&self) -> String {
        format!(
            "# Sluice front proxy listener, rendered by sluice-harness's FrontProxy.\nresources:\n{}",
            self.render_listener(true)
        )
    }

    /// The listener as a YAML list item at column 0.
    fn render_listener(&self, as_resource: bool) -> String {
        let type_line = if as_resource {
            "  \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n"
        } else {
            ""
        };
        let wasm_filter = match &self.wasm_path {
            None => String::new(),
            Some(path) => format!(
                r#"        - name: envoy.filters.http.wasm
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
            config:
              name: sluice
              root_id: sluice
              vm_config:
                vm_id: {vm_id}
                runtime: envoy.wasm.runtime.v8
                code:
                  local:
                    filename: {filename}
              configuration:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: {configuration}
"#,
                vm_id = json_string(&self.vm_id),
                filename = json_string(&path.to_string_lossy()),
                configuration = json_string(&self.plugin_config_json),
            ),
        };
        let access_log = match &self.access_log {
            None => String::new(),
            Some((path, format)) => format!(
                r#"        access_log:
        - name: envoy.access_loggers.file
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
            path: {path}
            log_format:
              text_format_source:
                inline_string: {format}
"#,
                path = json_string(&path.to_string_lossy()),
                format = json_string(format),
            ),
        };
        let name = FRONT_LISTENER_NAME;
        let port = self.listener_port;
        let stream_idle_timeout = self.stream_idle_timeout_secs;
        let route_timeout = self.route_timeout_secs;
        let upgrades = if self.websocket {
            "        upgrade_configs:\n        - upgrade_type: websocket\n"
        } else {
            ""
        };
        format!(
            r#"- name: {name}
{type_line}  address:
    socket_address: {{ address: 127.0.0.1, port_value: {port} }}
  # Envoy's default accept backlog (128) overflows when a burst of clients
  # connects at once; the kernel then drops the handshake's last ACK and the
  # connection lands a second later, after a retransmit.
  tcp_backlog_size: 4096
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: {name}
        # Capacity is per path: no spelling of a path may escape it
        # (`//p`, `/./p`, `/%70` are normalized; `%2F` is refused with 400).
        normalize_path: true
        merge_slashes: true
        path_with_escaped_slashes_action: REJECT_REQUEST
        # The idle timer keeps running on a stream the filter has paused
        # (queued) and answers Envoy's own 504 "stream timeout" when it fires
        # (default 5 min): it must exceed the longest queue_timeout. See
        # docs/filter.md.
        stream_idle_timeout: {stream_idle_timeout}s
{upgrades}{access_log}        route_config:
          name: {name}
          virtual_hosts:
          - name: backend
            domains: ["*"]
            routes:
            - match: {{ prefix: "/" }}
              route:
                cluster: backend
                # 0s disables it; a queued request is not under it anyway.
                timeout: {route_timeout}s
        http_filters:
{wasm_filter}        - name: envoy.filters.http.router
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
        )
    }
}

/// A JSON string literal, which is also a valid YAML double-quoted scalar.
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn indent(text: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    text.lines()
        .map(|line| {
            if line.is_empty() {
                "\n".to_string()
            } else {
                format!("{pad}{line}\n")
            }
        })
        .collect()
}
