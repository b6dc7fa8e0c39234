//! The hand-written messages (`sluice_core::sync_api`) and the generated
//! service agree with `proto/sluice/sync/v1/sync.proto`: the .proto is
//! parsed (protox, pure Rust), a fully populated Rust message is decoded by
//! the .proto's descriptor and every field must come out under its .proto
//! name, with its .proto type, and nothing unknown; then back again.

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value};
use sluice_core::sync_api::{
    EndpointCapacity, FetchRequest, Instance, PoolAssignment, PoolDemand, PoolShare, ShareGrant,
    ShareReport, Snapshot, StreamRef, WatchRequest, WatcherShare, FETCH_METHOD, SERVICE_NAME,
    SHARE_METHOD, WATCH_METHOD,
};
use sluice_sync::api::capacity_sync_server::CapacitySyncServer;
use sluice_sync::grpc::CapacitySyncService;
use std::fmt::Debug;

fn pool() -> DescriptorPool {
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let files = protox::compile(["sluice/sync/v1/sync.proto"], [include])
        .unwrap_or_else(|e| panic!("sync.proto does not compile: {e}"));
    DescriptorPool::from_file_descriptor_set(files).expect("descriptor pool")
}

fn message(pool: &DescriptorPool, name: &str) -> MessageDescriptor {
    pool.get_message_by_name(&format!("sluice.sync.v1.{name}"))
        .unwrap_or_else(|| panic!("sync.proto has no message {name}"))
}

/// `rust` must have every field set to a non-default value; `fields` is what
/// the .proto's view of it must hold, by .proto name.
fn agrees<M: Message + Default + PartialEq + Debug>(
    desc: MessageDescriptor,
    rust: &M,
    fields: &[(&str, Value)],
) {
    let dynamic = DynamicMessage::decode(desc.clone(), rust.encode_to_vec().as_slice())
        .unwrap_or_else(|e| panic!("{}: {e}", desc.name()));
    let unknown: Vec<_> = dynamic.unknown_fields().map(|f| f.number()).collect();
    assert!(
        unknown.is_empty(),
        "{}: Rust fields {unknown:?} are not in the .proto",
        desc.name()
    );
    let mut proto_fields: Vec<String> = desc.fields().map(|f| f.name().to_string()).collect();
    let mut expected: Vec<String> = fields.iter().map(|(n, _)| n.to_string()).collect();
    proto_fields.sort();
    expected.sort();
    assert_eq!(
        proto_fields,
        expected,
        "{}: the .proto's fields",
        desc.name()
    );
    for (name, want) in fields {
        assert!(
            dynamic.has_field_by_name(name),
            "{}.{name}: the .proto field is not in the Rust struct (or not under that number)",
            desc.name()
        );
        assert_eq!(
            dynamic.get_field_by_name(name).unwrap().as_ref(),
            want,
            "{}.{name}: value (and so type) as the .proto reads it",
            desc.name()
        );
    }
    let back = M::decode(dynamic.encode_to_vec().as_slice()).unwrap();
    assert_eq!(&back, rust, "{}: .proto bytes decode in Rust", desc.name());
}

/// The .proto's view of a message with these fields set.
fn dynamic(desc: MessageDescriptor, fields: &[(&str, Value)]) -> DynamicMessage {
    let mut message = DynamicMessage::new(desc);
    for (name, value) in fields {
        message.set_field_by_name(name, value.clone());
    }
    message
}

#[test]
fn messages_match_the_proto() {
    let pool = pool();
    agrees(
        message(&pool, "WatchRequest"),
        &WatchRequest {
            service: "demo".into(),
            node: "envoy-1".into(),
            last_version: 1 << 40,
        },
        &[
            ("service", Value::String("demo".into())),
            ("node", Value::String("envoy-1".into())),
            ("last_version", Value::U64(1 << 40)),
        ],
    );
    agrees(
        message(&pool, "FetchRequest"),
        &FetchRequest {
            service: "demo".into(),
        },
        &[("service", Value::String("demo".into()))],
    );
    let endpoint = EndpointCapacity {
        path: "/predict".into(),
        capacity: 8,
        source: "probe".into(),
        measured_at: 1_763_842_052,
    };
    let endpoint_fields = [
        ("path", Value::String("/predict".into())),
        ("capacity", Value::U32(8)),
        ("source", Value::String("probe".into())),
        ("measured_at", Value::U64(1_763_842_052)),
    ];
    let endpoint_desc = message(&pool, "EndpointCapacity");
    agrees(endpoint_desc.clone(), &endpoint, &endpoint_fields);

    let mut endpoint_dynamic = DynamicMessage::new(endpoint_desc.clone());
    for (name, value) in endpoint_fields.clone() {
        endpoint_dynamic.set_field_by_name(name, value);
    }

    let instance_capacity = EndpointCapacity {
        path: "/embed".into(),
        capacity: 3,
        source: "manual".into(),
        measured_at: 1_763_842_053,
    };
    let mut instance_capacity_dynamic = DynamicMessage::new(endpoint_desc);
    for (name, value) in [
        ("path", Value::String("/embed".into())),
        ("capacity", Value::U32(3)),
        ("source", Value::String("manual".into())),
        ("measured_at", Value::U64(1_763_842_053)),
    ] {
        instance_capacity_dynamic.set_field_by_name(name, value);
    }
    let instance = Instance {
        address: "[::1]:8003".into(),
        capacities: vec![instance_capacity],
    };
    let instance_fields = [
        ("address", Value::String("[::1]:8003".into())),
        (
            "capacities",
            Value::List(vec![Value::Message(instance_capacity_dynamic)]),
        ),
    ];
    let instance_desc = message(&pool, "Instance");
    agrees(instance_desc.clone(), &instance, &instance_fields);
    let mut instance_dynamic = DynamicMessage::new(instance_desc);
    for (name, value) in instance_fields {
        instance_dynamic.set_field_by_name(name, value);
    }
    let stream = StreamRef {
        epoch: 1 << 62,
        watcher: 5,
    };
    let stream_fields = [("epoch", Value::U64(1 << 62)), ("watcher", Value::U64(5))];
    agrees(message(&pool, "StreamRef"), &stream, &stream_fields);
    let stream_dynamic = || Value::Message(dynamic(message(&pool, "StreamRef"), &stream_fields));
    let watcher = WatcherShare {
        stream: Some(stream),
        node: "envoy-2".into(),
        share: 3,
        held: 4,
        in_flight: 2,
        queued: 6,
        connected: true,
    };
    let watcher_fields = [
        ("stream", stream_dynamic()),
        ("node", Value::String("envoy-2".into())),
        ("share", Value::U32(3)),
        ("held", Value::U32(4)),
        ("in_flight", Value::U32(2)),
        ("queued", Value::U32(6)),
        ("connected", Value::Bool(true)),
    ];
    agrees(message(&pool, "WatcherShare"), &watcher, &watcher_fields);
    let assignment = PoolAssignment {
        path: "/predict".into(),
        address: "10.0.0.1:80".into(),
        capacity: 12,
        granted: 3,
        unaccounted: 9,
        watchers: vec![watcher],
    };
    let assignment_fields = [
        ("path", Value::String("/predict".into())),
        ("address", Value::String("10.0.0.1:80".into())),
        ("capacity", Value::U32(12)),
        ("granted", Value::U32(3)),
        ("unaccounted", Value::U32(9)),
        (
            "watchers",
            Value::List(vec![Value::Message(dynamic(
                message(&pool, "WatcherShare"),
                &watcher_fields,
            ))]),
        ),
    ];
    agrees(
        message(&pool, "PoolAssignment"),
        &assignment,
        &assignment_fields,
    );
    agrees(
        message(&pool, "Snapshot"),
        &Snapshot {
            service: "demo".into(),
            version: 42,
            endpoints: vec![endpoint],
            heartbeat: true,
            stale: true,
            sent_at_unix_ms: -5,
            instances: vec![instance],
            discovered: true,
            assignment: vec![assignment],
        },
        &[
            ("service", Value::String("demo".into())),
            ("version", Value::U64(42)),
            (
                "endpoints",
                Value::List(vec![Value::Message(endpoint_dynamic)]),
            ),
            ("heartbeat", Value::Bool(true)),
            ("stale", Value::Bool(true)),
            ("sent_at_unix_ms", Value::I64(-5)),
            (
                "instances",
                Value::List(vec![Value::Message(instance_dynamic)]),
            ),
            ("discovered", Value::Bool(true)),
            (
                "assignment",
                Value::List(vec![Value::Message(dynamic(
                    message(&pool, "PoolAssignment"),
                    &assignment_fields,
                ))]),
            ),
        ],
    );
}

#[test]
fn share_messages_match_the_proto() {
    let pool = pool();
    let stream_fields = [("epoch", Value::U64(9)), ("watcher", Value::U64(2))];
    let stream = || Value::Message(dynamic(message(&pool, "StreamRef"), &stream_fields));
    let demand = PoolDemand {
        path: "/predict".into(),
        address: "10.0.0.1:80".into(),
        holding: 4,
        in_flight: 3,
        queued: 7,
    };
    let demand_fields = [
        ("path", Value::String("/predict".into())),
        ("address", Value::String("10.0.0.1:80".into())),
        ("holding", Value::U32(4)),
        ("in_flight", Value::U32(3)),
        ("queued", Value::U32(7)),
    ];
    agrees(message(&pool, "PoolDemand"), &demand, &demand_fields);
    agrees(
        message(&pool, "ShareReport"),
        &ShareReport {
            service: "demo".into(),
            node: "envoy-1".into(),
            seq: 1 << 33,
            applied_version: 6,
            sent_at_unix_ms: -7,
            replaces: Some(StreamRef {
                epoch: 9,
                watcher: 2,
            }),
            r#final: true,
            pools: vec![demand],
        },
        &[
            ("service", Value::String("demo".into())),
            ("node", Value::String("envoy-1".into())),
            ("seq", Value::U64(1 << 33)),
            ("applied_version", Value::U64(6)),
            ("sent_at_unix_ms", Value::I64(-7)),
            ("replaces", stream()),
            ("final", Value::Bool(true)),
            (
                "pools",
                Value::List(vec![Value::Message(dynamic(
                    message(&pool, "PoolDemand"),
                    &demand_fields,
                ))]),
            ),
        ],
    );
    let share = PoolShare {
        path: "/embed".into(),
        address: "[::1]:8003".into(),
        share: 5,
    };
    let share_fields = [
        ("path", Value::String("/embed".into())),
        ("address", Value::String("[::1]:8003".into())),
        ("share", Value::U32(5)),
    ];
    agrees(message(&pool, "PoolShare"), &share, &share_fields);
    agrees(
        message(&pool, "ShareGrant"),
        &ShareGrant {
            share_version: 3,
            shares: vec![share],
            lease_ms: 2000,
            lease_for_seq: 1 << 34,
            fallback_for_ms: 500,
            watchers: 3,
            stream: Some(StreamRef {
                epoch: 9,
                watcher: 2,
            }),
        },
        &[
            ("share_version", Value::U64(3)),
            (
                "shares",
                Value::List(vec![Value::Message(dynamic(
                    message(&pool, "PoolShare"),
                    &share_fields,
                ))]),
            ),
            ("lease_ms", Value::U64(2000)),
            ("lease_for_seq", Value::U64(1 << 34)),
            ("fallback_for_ms", Value::U64(500)),
            ("watchers", Value::U32(3)),
            ("stream", stream()),
        ],
    );
}

#[test]
fn service_matches_the_proto() {
    let pool = pool();
    let service = pool
        .get_service_by_name(SERVICE_NAME)
        .unwrap_or_else(|| panic!("sync.proto has no service {SERVICE_NAME}"));
    let methods: Vec<_> = service
        .methods()
        .map(|m| {
            (
                m.name().to_string(),
                m.input().name().to_string(),
                m.output().name().to_string(),
                m.is_client_streaming(),
                m.is_server_streaming(),
            )
        })
        .collect();
    let row = |name: &str, input: &str, output: &str, client_streaming, server_streaming| {
        (
            name.to_string(),
            input.to_string(),
            output.to_string(),
            client_streaming,
            server_streaming,
        )
    };
    assert_eq!(
        methods,
        [
            row(WATCH_METHOD, "WatchRequest", "Snapshot", false, true),
            row(FETCH_METHOD, "FetchRequest", "Snapshot", false, false),
            row(SHARE_METHOD, "ShareReport", "ShareGrant", true, true),
        ]
    );
    // The generated server (build.rs) answers under the same name.
    assert_eq!(
        <CapacitySyncServer<CapacitySyncService> as tonic::server::NamedService>::NAME,
        SERVICE_NAME
    );
}
