//! The messages of the sync service's gRPC API (`sluice.sync.v1`, spelled
//! for people in `sync/proto/sluice/sync/v1/sync.proto` and `docs/sync.md`).
//!
//! Written by hand with prost's derive, not generated: the filter decodes
//! them inside Envoy (wasm32-wasip1, no protoc, no build script) and the sync
//! service encodes the very same structs. A test in `sync/` checks them
//! against the `.proto` field by field.

/// The gRPC service, as `open_grpc_stream(.., service_name, method, ..)`
/// wants it.
pub const SERVICE_NAME: &str = "sluice.sync.v1.CapacitySync";
/// Server stream of [`Snapshot`]s: the first is the whole current state, then
/// one per change, and a heartbeat when nothing changed for a while.
pub const WATCH_METHOD: &str = "Watch";
/// Unary: the current [`Snapshot`] once.
pub const FETCH_METHOD: &str = "Fetch";
/// Bidirectional: [`ShareReport`]s in, [`ShareGrant`]s out.
pub const SHARE_METHOD: &str = "Share";

/// What [`EndpointCapacity::source`] holds: measured by sluice-prober.
pub const SOURCE_PROBE: &str = "probe";
/// What [`EndpointCapacity::source`] holds: set by hand in `sluice.yaml`.
pub const SOURCE_MANUAL: &str = "manual";

/// Opens a stream of one service's capacities.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WatchRequest {
    /// `service:` of `sluice.yaml`.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Who is asking (e.g. the Envoy node id), for the sync service's log.
    #[prost(string, tag = "2")]
    pub node: String,
    /// The newest version the caller holds (0: none). The sync service keeps
    /// its versions above it, even after Redis lost its counter.
    #[prost(uint64, tag = "3")]
    pub last_version: u64,
}

/// Asks once for one service's capacities.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct FetchRequest {
    #[prost(string, tag = "1")]
    pub service: String,
}

/// The whole state of one service, never a delta.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Snapshot {
    #[prost(string, tag = "1")]
    pub service: String,
    /// Grows with every write to Redis (the `sluice:{SERVICE}:version`
    /// counter). Apply a snapshot whose version is equal to or newer than the
    /// one held; ignore an older one. Equal versions can differ in content
    /// (records edited by hand), so an equal one is applied too.
    #[prost(uint64, tag = "2")]
    pub version: u64,
    /// Sorted by path. Empty in a heartbeat.
    #[prost(message, repeated, tag = "3")]
    pub endpoints: Vec<EndpointCapacity>,
    /// Nothing changed, the stream is alive: `endpoints` is empty and
    /// `version` is the current one. Not a state to apply.
    #[prost(bool, tag = "4")]
    pub heartbeat: bool,
    /// The sync service cannot reach Redis and serves the last state it read.
    #[prost(bool, tag = "5")]
    pub stale: bool,
    /// When the sync service sent it, Unix time in milliseconds.
    #[prost(int64, tag = "6")]
    pub sent_at_unix_ms: i64,
    /// The service's instances, sorted by address, each with its
    /// per-instance capacities. Empty in a heartbeat.
    #[prost(message, repeated, tag = "7")]
    pub instances: Vec<Instance>,
    /// The sync service discovered the instance set (DNS): the filter
    /// replaces its static set with [`Snapshot::instances`]. False: the
    /// filter keeps the set it has from `sluice.yaml` and only takes the
    /// per-instance capacities.
    #[prost(bool, tag = "8")]
    pub discovered: bool,
    /// `Fetch` only (empty in `Watch`): every pool sync shares among the
    /// service's Envoys, and each one's part.
    #[prost(message, repeated, tag = "9")]
    pub assignment: Vec<PoolAssignment>,
}

/// One instance of the service and its own capacities.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Instance {
    /// `ip:port` or `[ipv6]:port`, as Envoy's `upstream.address` prints it.
    #[prost(string, tag = "1")]
    pub address: String,
    /// Per-instance figures from Redis, sorted by path; an endpoint missing
    /// here (or an empty list) takes the endpoint's capacity.
    #[prost(message, repeated, tag = "2")]
    pub capacities: Vec<EndpointCapacity>,
}

/// One endpoint's capacity.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct EndpointCapacity {
    /// The endpoint's key in `endpoints:` of `sluice.yaml`, e.g. `/predict`.
    #[prost(string, tag = "1")]
    pub path: String,
    /// Concurrent requests the endpoint takes (positive).
    #[prost(uint32, tag = "2")]
    pub capacity: u32,
    /// [`SOURCE_PROBE`] or [`SOURCE_MANUAL`].
    #[prost(string, tag = "3")]
    pub source: String,
    /// When it was measured or set: Unix time, whole seconds.
    #[prost(uint64, tag = "4")]
    pub measured_at: u64,
}

/// One report of an Envoy on its `Share` stream (docs/sync.md, "Shares
/// among Envoy replicas").
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ShareReport {
    /// `service:` of `sluice.yaml`; the same in every report of a stream.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Who is reporting (e.g. the Envoy node id), for logs and `Fetch`.
    #[prost(string, tag = "2")]
    pub node: String,
    /// Grows by at least one per report on a stream.
    #[prost(uint64, tag = "3")]
    pub seq: u64,
    /// The newest `share_version` of this stream the Envoy applied (0: none).
    #[prost(uint64, tag = "4")]
    pub applied_version: u64,
    /// When the Envoy sent it, Unix milliseconds on its own clock: its lease
    /// runs from here.
    #[prost(int64, tag = "5")]
    pub sent_at_unix_ms: i64,
    /// Until this stream's first grant: the stream of the grant the Envoy
    /// still holds (a reconnect, a new leader VM).
    #[prost(message, optional, tag = "6")]
    pub replaces: Option<StreamRef>,
    /// The Envoy leaves: it set every limit to 0 before sending this, and
    /// ends the stream after it.
    #[prost(bool, tag = "7")]
    pub r#final: bool,
    /// Every pool it holds a share of or has demand for; a pool not listed
    /// is all zeros.
    #[prost(message, repeated, tag = "8")]
    pub pools: Vec<PoolDemand>,
}

/// One pool in a report: one instance's capacity for one endpoint, or, with
/// `address` empty, an endpoint's capacity (an endpoint without instances).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PoolDemand {
    #[prost(string, tag = "1")]
    pub path: String,
    /// `ip:port` of the instance; empty for an endpoint without instances.
    #[prost(string, tag = "2")]
    pub address: String,
    /// The share the Envoy enforces now (its fallback once its lease ran
    /// out).
    #[prost(uint32, tag = "3")]
    pub holding: u32,
    #[prost(uint32, tag = "4")]
    pub in_flight: u32,
    #[prost(uint32, tag = "5")]
    pub queued: u32,
}

/// A `Share` stream as sync names it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct StreamRef {
    /// Unique to the allocator (the sync process) that made the grant.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    #[prost(uint64, tag = "2")]
    pub watcher: u64,
}

/// What an Envoy may admit: always the answer to one of its reports.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ShareGrant {
    /// Grows per stream. Apply a newer one; the same version only renews the
    /// lease; ignore an older one.
    #[prost(uint64, tag = "1")]
    pub share_version: u64,
    /// Every pool sync shares, sorted by path then address; a pool not
    /// listed is 0.
    #[prost(message, repeated, tag = "2")]
    pub shares: Vec<PoolShare>,
    /// The lease runs from when the Envoy sent report `lease_for_seq`.
    #[prost(uint64, tag = "3")]
    pub lease_ms: u64,
    #[prost(uint64, tag = "4")]
    pub lease_for_seq: u64,
    /// After the lease: `min(share, capacity / watchers)` for this long,
    /// then 0.
    #[prost(uint64, tag = "5")]
    pub fallback_for_ms: u64,
    /// The watchers sharing the pools when the grant was made.
    #[prost(uint32, tag = "6")]
    pub watchers: u32,
    /// This stream, for [`ShareReport::replaces`] after a reconnect.
    #[prost(message, optional, tag = "7")]
    pub stream: Option<StreamRef>,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PoolShare {
    #[prost(string, tag = "1")]
    pub path: String,
    /// Empty for an endpoint without instances.
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(uint32, tag = "3")]
    pub share: u32,
}

/// One pool in [`Snapshot::assignment`].
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PoolAssignment {
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(uint32, tag = "3")]
    pub capacity: u32,
    /// The sum of the watchers' current shares.
    #[prost(uint32, tag = "4")]
    pub granted: u32,
    /// After a sync restart, what Envoys that have not reported yet may
    /// hold: granted to nobody until the grace ends.
    #[prost(uint32, tag = "5")]
    pub unaccounted: u32,
    /// Sorted by stream.
    #[prost(message, repeated, tag = "6")]
    pub watchers: Vec<WatcherShare>,
}

/// One watcher's part of a pool.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct WatcherShare {
    #[prost(message, optional, tag = "1")]
    pub stream: Option<StreamRef>,
    #[prost(string, tag = "2")]
    pub node: String,
    /// The share last sent.
    #[prost(uint32, tag = "3")]
    pub share: u32,
    /// What sync counts it as holding: shares not yet acknowledged as
    /// replaced, or in flight, until its lease and fallback ran out.
    #[prost(uint32, tag = "4")]
    pub held: u32,
    /// From its last report.
    #[prost(uint32, tag = "5")]
    pub in_flight: u32,
    #[prost(uint32, tag = "6")]
    pub queued: u32,
    /// False once its stream ended without a final report.
    #[prost(bool, tag = "7")]
    pub connected: bool,
}

/// `/sluice.sync.v1.CapacitySync/Watch`: the HTTP/2 path of a method.
pub fn method_path(method: &str) -> String {
    format!("/{SERVICE_NAME}/{method}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn snapshot_round_trips() {
        let snapshot = Snapshot {
            service: "demo".into(),
            version: 42,
            endpoints: vec![EndpointCapacity {
                path: "/predict".into(),
                capacity: 8,
                source: SOURCE_PROBE.into(),
                measured_at: 1_763_842_052,
            }],
            heartbeat: false,
            stale: true,
            sent_at_unix_ms: 1_763_842_052_123,
            instances: vec![Instance {
                address: "[::1]:8003".into(),
                capacities: vec![EndpointCapacity {
                    path: "/predict".into(),
                    capacity: 2,
                    source: SOURCE_PROBE.into(),
                    measured_at: 1_763_842_053,
                }],
            }],
            discovered: true,
            assignment: Vec::new(),
        };
        let bytes = snapshot.encode_to_vec();
        assert_eq!(Snapshot::decode(bytes.as_slice()).unwrap(), snapshot);
    }

    #[test]
    fn wire_bytes_carry_the_proto_field_numbers() {
        // Field 1 (string) "d", field 2 (varint) 3, field 3 (message) with
        // its own field 2 (varint) 8, field 4 (bool) true: the tags are
        // (number << 3) | wire type, as the .proto numbers them.
        let snapshot = Snapshot {
            service: "d".into(),
            version: 3,
            endpoints: vec![EndpointCapacity {
                capacity: 8,
                ..Default::default()
            }],
            heartbeat: true,
            ..Default::default()
        };
        assert_eq!(
            snapshot.encode_to_vec(),
            [0x0a, 1, b'd', 0x10, 3, 0x1a, 2, 0x10, 8, 0x20, 1]
        );
    }

    #[test]
    fn method_paths() {
        assert_eq!(
            method_path(WATCH_METHOD),
            "/sluice.sync.v1.CapacitySync/Watch"
        );
        assert_eq!(
            method_path(FETCH_METHOD),
            "/sluice.sync.v1.CapacitySync/Fetch"
        );
        assert_eq!(
            method_path(SHARE_METHOD),
            "/sluice.sync.v1.CapacitySync/Share"
        );
    }

    #[test]
    fn share_messages_round_trip() {
        let report = ShareReport {
            service: "demo".into(),
            node: "envoy-1".into(),
            seq: 7,
            applied_version: 3,
            sent_at_unix_ms: 1_763_842_052_123,
            replaces: Some(StreamRef {
                epoch: 1 << 60,
                watcher: 4,
            }),
            r#final: true,
            pools: vec![PoolDemand {
                path: "/predict".into(),
                address: "10.0.0.1:80".into(),
                holding: 2,
                in_flight: 1,
                queued: 5,
            }],
        };
        let bytes = report.encode_to_vec();
        assert_eq!(ShareReport::decode(bytes.as_slice()).unwrap(), report);
        let grant = ShareGrant {
            share_version: 2,
            shares: vec![PoolShare {
                path: "/predict".into(),
                address: String::new(),
                share: 4,
            }],
            lease_ms: 2000,
            lease_for_seq: 7,
            fallback_for_ms: 500,
            watchers: 3,
            stream: Some(StreamRef {
                epoch: 9,
                watcher: 1,
            }),
        };
        let bytes = grant.encode_to_vec();
        assert_eq!(ShareGrant::decode(bytes.as_slice()).unwrap(), grant);
    }
}
