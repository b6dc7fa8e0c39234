//! The path a request is matched on: core's normalisation
//! ([`sluice_core::path`]), which configuration keys are checked against too.

pub use sluice_core::path::request_path;
