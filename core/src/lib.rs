//! Host-independent heart of Sluice.
//!
//! Nothing here depends on proxy-wasm: the filter wires Envoy's callbacks to
//! these pieces, and the tests run them natively (with threads) and on wasm.

pub mod admission;
pub mod capacity_record;
pub mod config;
pub mod redis_keys;
pub mod shared_data;
pub mod sync_api;
pub mod waiters;

/// The callouts' keys moved into [`config`]; the old path still resolves.
pub use config::callouts as sync_config;
