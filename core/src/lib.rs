//! Host-independent heart of Sluice.
//!
//! Every state machine of the filter that does not need Envoy lives here,
//! over the [`shared_data::SharedData`] trait: the filter only wires Envoy's
//! callbacks to these pieces, and the tests run them natively (with threads
//! and Envoy's CAS rules, [`shared_data::MemSharedData`]) and on wasm.

pub mod abandon;
pub mod admission;
pub mod capacity_record;
pub mod cas;
pub mod config;
pub mod config_seen;
pub mod deadline;
pub mod holding;
pub mod lease;
pub mod path;
pub mod queued_bytes;
pub mod redact;
pub mod redis_keys;
pub mod services;
pub mod shared_data;
pub mod shared_keys;
pub mod sync_api;
pub mod waiters;
pub mod worker_ids;

/// The callouts' keys moved into [`config`]; the old path still resolves.
pub use config::callouts as sync_config;

/// An endpoint's index in its configuration's list (and in every per-endpoint
/// table built from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId(pub usize);
