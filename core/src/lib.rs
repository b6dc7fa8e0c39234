//! Host-independent heart of Sluice.
//!
//! Nothing here depends on proxy-wasm: the filter wires Envoy's callbacks to
//! these pieces, and the tests run them natively (with threads) and on wasm.

pub mod admission;
pub mod capacity_record;
pub mod config;
pub mod json_keys;
pub mod redis_keys;
pub mod shared_data;
pub mod sync_api;
pub mod sync_config;
pub mod waiters;
