//! `sluice.yaml` as serde types: every key of every part, read once.
//!
//! Values are kept as written (`Value`) and checked when each part converts
//! the document into its runtime form (`TryFrom<&Document>`), so the error
//! names the dotted key and shows the value exactly as every part always has.
//! The types also describe the file: `cargo run -p sluice-core --features
//! schema --bin sluice-schema` prints its JSON Schema (docs/sluice.schema.json)
//! from the doc comments and `schemars` attributes below.

use super::check::ConfigError;
use indexmap::IndexMap;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

#[cfg(feature = "schema")]
use schemars::JsonSchema;

/// A section that should be a map: `Bad` keeps any other value for the
/// error, which each part words itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Section<T> {
    Map(T),
    Bad(Value),
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Section<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        if v.is_object() {
            if let Ok(t) = T::deserialize(&v) {
                return Ok(Section::Map(t));
            }
        }
        Ok(Section::Bad(v))
    }
}

#[cfg(feature = "schema")]
impl<T: JsonSchema> JsonSchema for Section<T> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> std::borrow::Cow<'static, str> {
        T::schema_id()
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}

/// The endpoints in file order, each `None` when given no settings.
pub type Endpoints = IndexMap<String, Option<Section<EndpointDoc>>>;

/// One service's `sluice.yaml` (fastapi-balancer's `balancer.yml` keys).
/// The filter reads it as JSON from its plugin `configuration`; the prober
/// and sync read it as YAML. Unknown keys are warnings, not errors.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(title = "sluice.yaml", deny_unknown_fields)
)]
#[serde(default)]
pub struct Document {
    /// Namespace of this service's capacities (in Redis and the sync stream).
    #[cfg_attr(feature = "schema", schemars(with = "String", length(min = 1), extend("default" = "default")))]
    pub service: Option<Value>,
    /// Seconds a request may wait for a slot before its 504 (each endpoint
    /// may override it).
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0.001, max = 86400), extend("default" = 30)))]
    pub queue_timeout: Option<Value>,
    /// Waiting requests per endpoint before `503 queue-full` (each endpoint
    /// may override it).
    #[cfg_attr(feature = "schema", schemars(with = "u32", range(min = 0, max = 10000), extend("default" = 1000)))]
    pub max_queue: Option<Value>,
    /// Longest seconds the slot of an abandoned in-flight request stays held
    /// (the backend may still be computing it); 0 releases it at once.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0, max = 86400), extend("default" = 30)))]
    pub abandon_hold: Option<Value>,
    /// Longest seconds from a request's admission to the end of its body;
    /// past it the filter answers 408 and frees the slot (0: no limit).
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0, max = 86400), extend("default" = 60)))]
    pub max_upload_time: Option<Value>,
    /// HTTP status of a `queue-full` refusal, 503 (fastapi-balancer's) or
    /// 429 (each endpoint may override it). gRPC requests get
    /// `RESOURCE_EXHAUSTED` either way.
    #[cfg_attr(feature = "schema", schemars(with = "u16", extend("enum" = [503, 429], "default" = 503)))]
    pub queue_full_status: Option<Value>,
    /// Whether the filter defines its metrics in Envoy's stats.
    #[cfg_attr(feature = "schema", schemars(with = "bool", extend("default" = true)))]
    pub metrics: Option<Value>,
    /// The watched endpoints, by request path (query string ignored).
    #[cfg_attr(feature = "schema", schemars(with = "IndexMap<String, Option<EndpointDoc>>", extend("propertyNames" = {"pattern": "^/[^?#\\s]*$"})))]
    pub endpoints: Option<Section<Endpoints>>,
    /// Prober: the highest error rate (a fraction) a passing level may have.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0, max = 1), extend("default" = 0.05)))]
    pub error_threshold: Option<Value>,
    /// Prober: the highest p99 latency (milliseconds) a passing level may have.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(max = 3600000), extend("exclusiveMinimum" = 0, "default" = 2000)))]
    pub latency_threshold_ms: Option<Value>,
    /// Where capacities are shared: the prober writes there, sync reads there.
    pub storage: Option<Section<StorageDoc>>,
    /// The dashboard and who may see it and the stats.
    pub ui: Option<Section<UiDoc>>,
    /// The stats JSON: where it is served, or not at all.
    pub stats: Option<Section<super::ui::StatsDoc>>,
    /// The filter watches the sync service for its capacities.
    pub sync: Option<Section<SyncDoc>>,
    /// Prober: how long each concurrency level runs.
    pub probe: Option<Section<ProbeDoc>>,
    /// Path the filter's health check `GET`s, e.g. `/health`.
    #[cfg_attr(feature = "schema", schemars(with = "String", regex(pattern = "^/")))]
    pub health_endpoint: Option<Value>,
    /// Seconds between health checks.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(max = 86400), extend("exclusiveMinimum" = 0)))]
    pub health_check_interval: Option<Value>,
    /// What Envoy needs to reach the backend's `health_endpoint`.
    pub health: Option<Section<HealthDoc>>,
    /// The service's instances, each held to its own capacity: the filter
    /// picks the instance for every request (front proxies; absent for a
    /// sidecar).
    pub instances: Option<Section<super::instances::InstancesDoc>>,
    /// Request classes by name, each with a priority: a full endpoint's
    /// queue serves the highest priority first, FIFO within one.
    #[cfg_attr(feature = "schema", schemars(with = "IndexMap<String, Option<super::classes::ClassDoc>>", extend("propertyNames" = {"pattern": "^[A-Za-z0-9_-]+$"}, "minProperties" = 1, "maxProperties" = 16)))]
    pub classes: Option<Section<super::classes::ClassesDoc>>,
    /// The request header naming a request's class (with `classes`). An
    /// edge Envoy must remove it from untrusted clients' requests.
    #[cfg_attr(feature = "schema", schemars(with = "String", regex(pattern = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"), extend("default" = "x-sluice-class")))]
    pub class_header: Option<Value>,
    /// The class of a request that names none, or one not configured.
    #[cfg_attr(feature = "schema", schemars(with = "String", length(min = 1), extend("default" = "default")))]
    pub default_class: Option<Value>,
    /// Fair shares between the tenants of each endpoint: a header names a
    /// request's tenant; within a class, tenants take the slots in turn.
    pub tenants: Option<Section<super::tenants::TenantsDoc>>,
    /// A request whose own deadline comes before the soonest it could get a
    /// slot (its queue ahead at the shortest recent durations) is answered
    /// `deadline` at once instead of at its deadline.
    #[cfg_attr(feature = "schema", schemars(with = "bool", extend("default" = true)))]
    pub refuse_unreachable_deadlines: Option<Value>,
    /// A request header holding the request's own deadline, milliseconds
    /// from its arrival: it never waits longer (besides `grpc-timeout` and
    /// `x-envoy-expected-rq-timeout-ms`, always read).
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))
    )]
    pub deadline_header: Option<Value>,
    /// Every endpoint counts its capacity in units of cost instead of
    /// requests (each endpoint may replace it, or turn it off with `false`).
    #[cfg_attr(feature = "schema", schemars(with = "super::cost::CostDoc"))]
    pub cost: Option<Value>,
    /// Keys no part reads.
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// One endpoint's settings; the service-wide ones are its defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Endpoint", deny_unknown_fields))]
#[serde(default)]
pub struct EndpointDoc {
    /// How the request path matches the endpoint's path.
    #[serde(rename = "match")]
    #[cfg_attr(feature = "schema", schemars(with = "MatchDoc", extend("default" = "exact")))]
    pub match_kind: Option<Value>,
    /// HTTP methods this endpoint applies to; absent means all.
    #[cfg_attr(feature = "schema", schemars(with = "Vec<String>", length(min = 1), extend("items" = {"type": "string", "pattern": "^[A-Za-z]+$"})))]
    pub methods: Option<Value>,
    /// Concurrent requests the endpoint can take (with `instances`: each
    /// instance); absent: watched, not limited, until measured (the prober
    /// writes it).
    #[cfg_attr(feature = "schema", schemars(with = "u32", range(min = 1)))]
    pub capacity: Option<Value>,
    /// With `instances`: the capacities of instances that differ from
    /// `capacity`, by `IP:port` (the prober's `--each-instance` writes it).
    #[cfg_attr(feature = "schema", schemars(with = "IndexMap<String, u32>", extend("additionalProperties" = {"type": "integer", "minimum": 1, "maximum": 4294967295_u64})))]
    pub instance_capacity: Option<Value>,
    /// Overrides the service's `queue_timeout`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "f64", range(min = 0.001, max = 86400))
    )]
    pub queue_timeout: Option<Value>,
    /// Overrides the service's `max_queue`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "u32", range(min = 0, max = 10000))
    )]
    pub max_queue: Option<Value>,
    /// Overrides the service's `abandon_hold`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "f64", range(min = 0, max = 86400))
    )]
    pub abandon_hold: Option<Value>,
    /// Overrides the service's `max_upload_time`.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "f64", range(min = 0, max = 86400))
    )]
    pub max_upload_time: Option<Value>,
    /// Overrides the service's `queue_full_status` (503 or 429).
    #[cfg_attr(feature = "schema", schemars(with = "u16", extend("enum" = [503, 429])))]
    pub queue_full_status: Option<Value>,
    /// Whether upgraded requests (websockets) hold a slot for their life.
    #[cfg_attr(feature = "schema", schemars(with = "bool", extend("default" = true)))]
    pub count_upgrades: Option<Value>,
    /// Cap on the `content-length` bytes of all queued requests together.
    #[cfg_attr(feature = "schema", schemars(with = "u64", range(min = 1)))]
    pub max_queued_bytes: Option<Value>,
    /// With `classes`: the class of this endpoint's requests that name none
    /// in the class header (instead of `default_class`).
    #[cfg_attr(feature = "schema", schemars(with = "String", length(min = 1)))]
    pub class: Option<Value>,
    /// The endpoint counts its capacity (and each instance's) in units of
    /// cost instead of requests; replaces the service-wide `cost` whole,
    /// `false` turns it off here.
    #[cfg_attr(feature = "schema", schemars(with = "super::cost::CostSetting"))]
    pub cost: Option<Value>,
    /// Prober: the method it calls the endpoint with.
    #[cfg_attr(feature = "schema", schemars(with = "String", regex(pattern = "^[A-Za-z]{1,20}$"), extend("default" = "GET")))]
    pub method: Option<Value>,
    /// Prober: headers it sends (numbers and booleans are sent as text).
    #[cfg_attr(
        feature = "schema",
        schemars(with = "IndexMap<String, HeaderValueDoc>")
    )]
    pub headers: Option<Value>,
    /// Prober: the body it sends; a string as it is, anything else as JSON.
    #[cfg_attr(feature = "schema", schemars(with = "Value"))]
    pub body: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// The dashboard (`ui`). Unlike elsewhere, an unknown key here is an error:
/// a misspelt `password` would leave the stats open.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Ui", deny_unknown_fields))]
#[serde(default)]
pub struct UiDoc {
    /// Serve the dashboard page.
    #[cfg_attr(feature = "schema", schemars(with = "bool", extend("default" = false)))]
    pub enable: Option<Value>,
    /// Where the page is served.
    #[cfg_attr(feature = "schema", schemars(with = "String", regex(pattern = "^/[^?#]*$"), extend("default" = "/balancer/ui")))]
    pub path: Option<Value>,
    /// With `password`: the page and the stats JSON ask for them (HTTP Basic).
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", regex(pattern = "^[^:]+$"))
    )]
    pub username: Option<Value>,
    #[cfg_attr(feature = "schema", schemars(with = "String", length(min = 1)))]
    pub password: Option<Value>,
    /// Seconds between the page's polls of the stats.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0.1, max = 60), extend("default" = 2)))]
    pub refresh: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// `sync`: where the sync service is, as an Envoy cluster.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Sync", deny_unknown_fields))]
#[serde(default)]
pub struct SyncDoc {
    /// The Envoy cluster (HTTP/2) of the sync service.
    #[cfg_attr(feature = "schema", schemars(with = "String", length(min = 1)))]
    pub cluster: Option<Value>,
    /// Whose capacities to watch; the document's `service` by default.
    #[cfg_attr(feature = "schema", schemars(with = "String", length(min = 1)))]
    pub service: Option<Value>,
    /// Seconds without any message before the filter reopens the stream.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(max = 86400), extend("exclusiveMinimum" = 0, "default" = 3)))]
    pub heartbeat_timeout: Option<Value>,
    /// Shared token sent as `authorization: Bearer <token>` on the Watch
    /// stream, for a sync service started with `--token-file` (printable
    /// ASCII, at most 100 bytes). Never shown in stats, logs or the dashboard.
    #[cfg_attr(
        feature = "schema",
        schemars(with = "String", length(min = 1, max = 100))
    )]
    pub token: Option<Value>,
    /// Share each capacity with the other Envoys of the service instead of
    /// each enforcing it whole: sync gives this Envoy a share of every
    /// pool through its `Share` stream (docs/sync.md, "Shares among Envoy
    /// replicas"). Off by default.
    #[cfg_attr(feature = "schema", schemars(with = "bool", extend("default" = false)))]
    pub shares: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// `health`: on when `health_endpoint` and `health_check_interval` are set too.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Health", deny_unknown_fields))]
#[serde(default)]
pub struct HealthDoc {
    /// The Envoy cluster of the backend.
    #[cfg_attr(feature = "schema", schemars(with = "String", length(min = 1)))]
    pub cluster: Option<Value>,
    /// Consecutive failures that make the backend unhealthy.
    #[cfg_attr(feature = "schema", schemars(with = "u32", range(min = 1, max = 1000), extend("default" = 3)))]
    pub unhealthy_threshold: Option<Value>,
    /// Consecutive successes that make it healthy again.
    #[cfg_attr(feature = "schema", schemars(with = "u32", range(min = 1, max = 1000), extend("default" = 2)))]
    pub healthy_threshold: Option<Value>,
    /// Seconds one check may take.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(max = 86400), extend("exclusiveMinimum" = 0, "default" = 1)))]
    pub timeout: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// `storage`: fastapi-balancer's keys.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Storage", deny_unknown_fields))]
#[serde(default)]
pub struct StorageDoc {
    /// `redis` (the default when `url` is set) or `memory` (nothing shared).
    #[serde(rename = "type")]
    #[cfg_attr(feature = "schema", schemars(with = "StorageKindDoc"))]
    pub kind: Option<Value>,
    /// The Redis to use.
    #[cfg_attr(feature = "schema", schemars(with = "String", regex(pattern = "^(redis|rediss|unix|redis\\+unix)://"), extend("default" = "redis://127.0.0.1:6379")))]
    pub url: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// `probe`: the prober's level timings (its flags win over them). An unknown
/// key here is an error.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(feature = "schema", derive(JsonSchema))]
#[cfg_attr(feature = "schema", schemars(rename = "Probe", deny_unknown_fields))]
#[serde(default)]
pub struct ProbeDoc {
    /// Seconds of load at each level before measuring.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(min = 0, max = 3600), extend("default" = 1)))]
    pub warmup: Option<Value>,
    /// Seconds each level is measured.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(max = 3600), extend("exclusiveMinimum" = 0, "default" = 5)))]
    pub duration: Option<Value>,
    /// Longest seconds a level may run to reach `min_samples`.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(max = 3600), extend("exclusiveMinimum" = 0, "default" = 30)))]
    pub max_duration: Option<Value>,
    /// Responses a level needs before its verdict.
    #[cfg_attr(feature = "schema", schemars(with = "u64", range(min = 0, max = 10000000), extend("default" = 300)))]
    pub min_samples: Option<Value>,
    /// Highest concurrency tried.
    #[cfg_attr(feature = "schema", schemars(with = "u32", range(min = 1, max = 10000), extend("default" = 256)))]
    pub max_concurrency: Option<Value>,
    /// Seconds one request may take before it counts as an error.
    #[cfg_attr(feature = "schema", schemars(with = "f64", range(max = 3600), extend("exclusiveMinimum" = 0, "default" = 30)))]
    pub request_timeout: Option<Value>,
    /// Threads generating load.
    #[cfg_attr(feature = "schema", schemars(with = "u32", range(min = 1, max = 64)))]
    pub threads: Option<Value>,
    #[serde(flatten)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unknown: Map<String, Value>,
}

/// Schema-only shapes of a few values.
#[cfg(feature = "schema")]
#[derive(JsonSchema)]
#[schemars(rename = "Match")]
#[allow(dead_code)]
enum MatchDoc {
    /// The path is the whole request path.
    #[serde(rename = "exact")]
    Exact,
    /// The request path starts with it.
    #[serde(rename = "prefix")]
    Prefix,
}

#[cfg(feature = "schema")]
#[derive(JsonSchema)]
#[schemars(rename = "StorageKind")]
#[allow(dead_code)]
enum StorageKindDoc {
    #[serde(rename = "redis")]
    Redis,
    #[serde(rename = "memory")]
    Memory,
}

#[cfg(feature = "schema")]
#[derive(JsonSchema)]
#[schemars(rename = "HeaderValue", untagged)]
#[allow(dead_code)]
enum HeaderValueDoc {
    Text(String),
    Number(f64),
    Flag(bool),
}

impl Document {
    /// Reads the whole document; only a root that is not a map fails here.
    pub fn from_value(value: &Value) -> Result<Document, ConfigError> {
        if !value.is_object() {
            return Err(ConfigError::new(
                "configuration",
                format!("must be an object, got {}", super::shown(value)),
            ));
        }
        // Every field takes any value, so this fails on nothing real.
        Document::deserialize(value).map_err(|e| ConfigError::new("configuration", e.to_string()))
    }

    /// The endpoints section as it should be, or the error naming it.
    pub fn endpoints(&self) -> Result<Option<&Endpoints>, &Value> {
        match &self.endpoints {
            None => Ok(None),
            Some(Section::Map(m)) => Ok(Some(m)),
            Some(Section::Bad(v)) => Err(v),
        }
    }
}

/// The schema of `sluice.yaml` as pretty JSON, as committed in
/// `docs/sluice.schema.json`.
#[cfg(feature = "schema")]
pub fn schema_json() -> String {
    let schema = schemars::schema_for!(Document);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    text.push('\n');
    text
}
