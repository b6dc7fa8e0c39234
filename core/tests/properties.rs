//! Properties over generated inputs (proptest): the parsers and codecs
//! that read what someone else wrote (a user's configuration, a shared-data
//! record another worker or plugin left, a Redis hash) never panic, and
//! what Sluice writes reads back as itself. A panic in the filter aborts
//! Envoy's VM, so "never panics" is the property that matters most.
//!
//! Case counts are modest so the file runs in seconds; raise them with
//! `PROPTEST_CASES=10000 cargo test -p sluice-core --test properties`.
#![cfg(not(target_arch = "wasm32"))]

use proptest::prelude::*;
use serde_json::{Map, Value};
use sluice_core::admission::{CapacitySource, EndpointState, Instance, Waiter};
use sluice_core::capacity_record::{CapacityRecord, Source};
use sluice_core::config::{Config, ConfigError, MAX_QUEUE_LIMIT};
use sluice_core::redis_keys::fields;
use std::collections::HashMap;
use std::net::SocketAddr;

/// 256 cases per property unless `PROPTEST_CASES` says otherwise.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Any JSON number, including ones at the edges of what the parser checks.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // NaN and the infinities become null, as serde_json does.
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            0.0,
            -0.0,
            1e-300,
            0.5,
            1.0,
            86_400.0,
            86_400.000_001,
            4_294_967_295.0,
            4_294_967_296.0,
            f64::MAX,
        ])
        .prop_map(Value::from),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        ".{0,12}".prop_map(Value::String),
    ]
}

/// Arbitrary JSON trees, a few levels deep.
fn json_tree() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((".{0,8}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A value for a configuration key: usually plausible, sometimes anything.
fn config_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => leaf(),
        1 => prop::sample::select(vec!["exact", "prefix", "GET", "post", ""])
            .prop_map(Value::from),
        1 => prop::collection::vec(
            prop_oneof![
                prop::sample::select(vec!["GET", "post", "P-UT", ""]).prop_map(Value::from),
                leaf(),
            ],
            0..4,
        )
        .prop_map(Value::Array),
        1 => json_tree(),
    ]
}

fn object_with_keys(keys: &'static [&'static str]) -> impl Strategy<Value = Map<String, Value>> {
    let key = prop_oneof![
        4 => prop::sample::select(keys).prop_map(str::to_string),
        1 => ".{0,8}",
    ];
    prop::collection::vec((key, config_value()), 0..6).prop_map(|kv| kv.into_iter().collect())
}

const TOP_KEYS: &[&str] = &["service", "queue_timeout", "max_queue", "storage", "ui"];
const ENDPOINT_KEYS: &[&str] = &[
    "match",
    "methods",
    "capacity",
    "queue_timeout",
    "max_queue",
    "method",
    "body",
];

/// Documents shaped like a `sluice.yaml`, so that generated inputs reach
/// the per-endpoint checks and not only the first type check.
fn config_document() -> impl Strategy<Value = Value> {
    let path = prop_oneof![
        3 => "/[a-z/.?]{0,10}",
        1 => ".{0,10}",
    ];
    let endpoint = prop_oneof![
        4 => object_with_keys(ENDPOINT_KEYS).prop_map(Value::Object),
        1 => leaf(),
    ];
    let endpoints = prop_oneof![
        6 => prop::collection::vec((path, endpoint), 0..4)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        1 => json_tree(),
    ];
    (object_with_keys(TOP_KEYS), prop::option::of(endpoints)).prop_map(|(mut top, endpoints)| {
        if let Some(e) = endpoints {
            top.insert("endpoints".into(), e);
        }
        Value::Object(top)
    })
}

/// What an accepted configuration promises the filter.
fn assert_valid(c: &Config) {
    assert!(!c.service.is_empty());
    for e in &c.endpoints {
        assert!(e.path.starts_with('/') && !e.path.contains('?'), "{e:?}");
        assert!(e.capacity.is_none_or(|n| n >= 1), "{e:?}");
        assert!(e.queue_timeout.as_secs_f64() <= 86_400.0, "{e:?}");
        assert!(e.max_queue <= MAX_QUEUE_LIMIT, "{e:?}");
        assert!(
            e.methods
                .iter()
                .all(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase())),
            "{e:?}"
        );
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_from_any_json_tree_never_panics(v in json_tree()) {
        if let Ok(c) = Config::from_json(&v) {
            assert_valid(&c);
        }
    }

    #[test]
    fn config_shaped_documents_are_parsed_or_refused_naming_a_key(v in config_document()) {
        match Config::from_json(&v) {
            Ok(c) => assert_valid(&c),
            Err(e) => prop_assert!(!e.key().is_empty() && !e.problem().is_empty(), "{e:?}"),
        }
        // The text form goes through the same checks. (Not to the bit: serde_json
        // reads some floats back one ulp off, which error texts would show.)
        let outcome = |r: Result<Config, ConfigError>| r.map(|c| c.endpoints.len()).map_err(|e| e.key().to_string());
        prop_assert_eq!(
            outcome(Config::from_json_str(&v.to_string())),
            outcome(Config::from_json(&v))
        );
    }

    #[test]
    fn config_from_any_string_never_panics(text in ".{0,64}") {
        let _ = Config::from_json_str(&text);
    }

    #[test]
    fn config_from_cut_short_json_never_panics(
        v in config_document(),
        cut in any::<prop::sample::Index>(),
    ) {
        let text = v.to_string();
        let mut at = cut.index(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let _ = Config::from_json_str(&text[..at]);
    }
}

/// A waiter of a record with `instances` instances (its index is in range).
fn waiter(instances: usize) -> impl Strategy<Value = Waiter> {
    let instance = if instances == 0 {
        Just(None).boxed()
    } else {
        prop::option::of(0..instances as u16).boxed()
    };
    (
        any::<u32>(),
        any::<u16>(),
        any::<bool>(),
        instance,
        any::<bool>(),
        any::<(bool, u8, u8, u8, u32, u32)>(),
    )
        .prop_map(
            |(
                ticket,
                worker,
                granted,
                instance,
                pinned,
                (pushed_out, class, priority, flow, tag, cost),
            )| Waiter {
                ticket,
                worker,
                granted,
                instance,
                pinned,
                pushed_out,
                class,
                priority,
                flow,
                tag,
                cost,
            },
        )
}

fn instance() -> impl Strategy<Value = Instance> {
    let address = prop_oneof![
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        any::<([u16; 8], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
    ];
    (
        address,
        prop::option::of(1..=u32::MAX),
        any::<(bool, u32, bool, u8, u64, u32)>(),
    )
        .prop_map(
            |(
                address,
                own,
                (own_from_sync, active, gone, strikes, eject_until_ns, picks_missed),
            )| {
                Instance {
                    own_from_sync,
                    active,
                    gone,
                    strikes,
                    eject_until_ns,
                    picks_missed,
                    ..Instance::new(address, own)
                }
            },
        )
}

/// Instances, and waiters that refer to them.
fn instances_and_waiters() -> impl Strategy<Value = (Vec<Instance>, Vec<Waiter>, u16, bool)> {
    prop::collection::vec(instance(), 0..5).prop_flat_map(|instances| {
        let n = instances.len();
        (
            Just(instances),
            prop::collection::vec(waiter(n), 0..40),
            any::<u16>(),
            any::<bool>(),
        )
    })
}

/// Fair queueing's clock and the flows' finish tags.
fn flows() -> impl Strategy<Value = (u32, Vec<u32>)> {
    (any::<u32>(), prop::collection::vec(any::<u32>(), 0..8))
}

fn endpoint_state() -> impl Strategy<Value = EndpointState> {
    (
        any::<u32>(),
        any::<u32>(),
        // 0 is how the record spells "none", so a capacity is never Some(0).
        prop::option::of(1..=u32::MAX),
        prop::option::of(1..=u32::MAX),
        any::<bool>(),
        any::<u64>(),
        any::<bool>(),
        (instances_and_waiters(), flows()),
    )
        .prop_map(
            |(
                active,
                next_ticket,
                capacity,
                configured,
                from_sync,
                sync_version,
                unhealthy,
                ((instances, waiters, turn, instances_from_sync), (virtual_time, flows)),
            )| {
                EndpointState {
                    active,
                    next_ticket,
                    capacity,
                    configured,
                    source: if from_sync {
                        CapacitySource::Sync
                    } else {
                        CapacitySource::Config
                    },
                    sync_version,
                    unhealthy,
                    instances_from_sync,
                    turn,
                    virtual_time,
                    flows,
                    instances,
                    waiters,
                    share: (sync_version % 3 == 0).then_some(sluice_core::admission::Share {
                        slots: next_ticket,
                        fallback: active,
                    }),
                    share_lease: sluice_core::admission::ShareLease {
                        until_ns: sync_version,
                        fallback_until_ns: sync_version.rotate_left(7),
                    },
                }
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn endpoint_state_decodes_to_what_was_encoded(s in endpoint_state()) {
        prop_assert_eq!(EndpointState::decode(&s.encode()), Ok(s));
    }

    #[test]
    fn endpoint_state_decode_of_any_bytes_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        // And what it accepts is stable: encoded again, it reads the same.
        if let Ok(s) = EndpointState::decode(&bytes) {
            prop_assert_eq!(EndpointState::decode(&s.encode()), Ok(s));
        }
    }

    #[test]
    fn endpoint_state_decode_of_damaged_records_never_panics(
        s in endpoint_state(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = s.encode();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let _ = EndpointState::decode(&bytes);
    }
}

const RECORD_FIELDS: &[&str] = &[
    fields::CAPACITY,
    fields::P99_MS,
    fields::RPS,
    fields::ERROR_RATE,
    fields::MEASURED_AT,
    fields::SOURCE,
];

/// A field value: numbers of every shape, the two sources, or anything.
fn record_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        prop::sample::select(vec![
            "probe",
            "manual",
            "",
            " 4 ",
            "0",
            "-1",
            "4294967296",
            "NaN",
            "inf",
            "1e3",
        ])
        .prop_map(str::to_string),
        ".{0,10}",
    ]
}

fn record_hash() -> impl Strategy<Value = HashMap<String, String>> {
    let field = prop_oneof![
        4 => prop::sample::select(RECORD_FIELDS).prop_map(str::to_string),
        1 => ".{0,8}",
    ];
    prop::collection::hash_map(field, record_value(), 0..8)
}

/// Records as the prober writes them: figures at the precision
/// `to_fields` keeps (3, 1 and 6 decimals), so the round trip is exact.
fn capacity_record() -> impl Strategy<Value = CapacityRecord> {
    (
        1..=u32::MAX,
        prop::option::of((0u64..10_000_000_000).prop_map(|n| n as f64 / 1e3)),
        prop::option::of((0u64..10_000_000_000).prop_map(|n| n as f64 / 1e1)),
        prop::option::of((0u64..=1_000_000).prop_map(|n| n as f64 / 1e6)),
        any::<u64>(),
        prop_oneof![Just(Source::Probe), Just(Source::Manual)],
    )
        .prop_map(
            |(capacity, p99_ms, rps, error_rate, measured_at, source)| CapacityRecord {
                capacity,
                p99_ms,
                rps,
                error_rate,
                measured_at,
                source,
            },
        )
}

fn as_hash(r: &CapacityRecord) -> HashMap<String, String> {
    r.to_fields()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn capacity_record_from_any_hash_never_panics(h in record_hash()) {
        match CapacityRecord::from_hash(&h) {
            Ok(Some(r)) => prop_assert!(r.capacity >= 1),
            Ok(None) => prop_assert!(h.is_empty()),
            Err(e) => prop_assert!(RECORD_FIELDS.contains(&e.field), "{e}"),
        }
    }

    #[test]
    fn capacity_record_reads_back_what_it_wrote(r in capacity_record()) {
        prop_assert_eq!(CapacityRecord::from_hash(&as_hash(&r)), Ok(Some(r)));
    }

    #[test]
    fn capacity_record_round_trip_settles_after_one_write(
        r in capacity_record(),
        p99 in prop::option::of(0.0..1e9f64),
        rps in prop::option::of(0.0..1e9f64),
    ) {
        // Any finite figure: the first write rounds it, later ones keep it.
        let r = CapacityRecord { p99_ms: p99, rps, ..r };
        let once = CapacityRecord::from_hash(&as_hash(&r)).unwrap().unwrap();
        let twice = CapacityRecord::from_hash(&as_hash(&once)).unwrap().unwrap();
        prop_assert_eq!(once, twice);
    }
}

/// One step of traffic on an endpoint with cost: a request of `cost` units
/// from tenant `flow` arrives, or the `n`th request holding units ends.
#[derive(Debug, Clone)]
enum Step {
    Arrive { cost: u32, flow: u8 },
    End(usize),
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            3 => (1u32..=40, 0u8..3).prop_map(|(cost, flow)| Step::Arrive { cost, flow }),
            2 => any::<usize>().prop_map(Step::End),
        ],
        1..80,
    )
}

proptest! {
    #![proptest_config(config())]

    /// Whatever arrives and ends, in whatever order: the record's units are
    /// exactly those of the requests holding them, never more than the
    /// capacity unless one request costing more runs alone, and once
    /// everything ends every waiter has been served (nobody starves).
    #[test]
    fn units_held_match_the_requests_and_never_exceed_the_capacity(
        capacity in 10u32..=60,
        steps in steps(),
    ) {
        use sluice_core::admission::{self as a, Acquired, Class, Ejection, Outcome};
        use sluice_core::shared_data::MemSharedData;
        const K: &str = "sluice:p:ep:/p";
        let store = MemSharedData::new();
        a::configure(&store, K, Some(capacity), 0).unwrap();
        // Held units, by ticket (admitted at once: no ticket, u32::MAX).
        let mut held: Vec<u32> = Vec::new();
        let mut waiting: Vec<(u32, u32)> = Vec::new();
        let claim = |held: &mut Vec<u32>, waiting: &mut Vec<(u32, u32)>| {
            for (ticket, _, units) in a::claim(&store, K, 0, 0).unwrap().granted {
                let i = waiting.iter().position(|&(t, _)| t == ticket).expect("a waiter of ours");
                prop_assert_eq!(waiting.remove(i).1, units);
                held.push(units);
            }
            Ok(())
        };
        let check = |held: &[u32]| {
            let s = a::snapshot(&store, K).unwrap();
            prop_assert_eq!(s.active, held.iter().sum::<u32>());
            prop_assert!(
                s.active <= capacity || (held.len() == 1 && held[0] > capacity),
                "{} units held by {:?}", s.active, held
            );
            Ok(())
        };
        for step in steps {
            match step {
                Step::Arrive { cost, flow } => {
                    let class = Class { cost, flow, step: a::tag_step(1), ..Class::DEFAULT };
                    match a::acquire_as(&store, K, 1000, 0, None, class, 0).unwrap().0 {
                        Acquired::Admitted(_) => held.push(cost),
                        Acquired::Queued { ticket, .. } => waiting.push((ticket, cost)),
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
                Step::End(n) if !held.is_empty() => {
                    let units = held.remove(n % held.len());
                    a::release_units(&store, K, None, units, Outcome::Served, Ejection::default(), 0)
                        .unwrap();
                }
                Step::End(_) => {}
            }
            claim(&mut held, &mut waiting)?;
            check(&held)?;
        }
        while let Some(units) = held.pop() {
            a::release_units(&store, K, None, units, Outcome::Served, Ejection::default(), 0)
                .unwrap();
            claim(&mut held, &mut waiting)?;
            check(&held)?;
        }
        prop_assert!(waiting.is_empty(), "never served: {:?}", waiting);
        prop_assert_eq!(a::snapshot(&store, K).unwrap().active, 0);
    }
}
