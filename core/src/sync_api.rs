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
    }
}
