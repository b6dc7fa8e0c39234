//! sluice-prober: measures how many concurrent requests each endpoint of a
//! service can take, writes that capacity into `sluice.yaml` and pushes it to
//! Redis, where the Sluice filter picks it up.
//!
//! `main.rs` only parses arguments and calls [`run`]; everything here can be
//! driven in-process by tests.

pub mod cli;
pub mod config_edit;
pub mod config_file;
pub mod config_write;
pub mod error;
pub mod load;
pub mod note;
pub mod probe;
pub mod progress;
pub mod push;
pub mod redis_records;
pub mod redis_target;
pub mod report;
pub mod scaling;
pub mod schema;
pub mod search;
pub mod settings;
pub mod success;
pub mod sweep;
pub mod target;
pub mod yaml_lines;

use cli::{Cli, Command};

// Re-exported so `crate::ProberError` and `crate::exit` keep working.
pub use error::{exit, exit_code_of, ProberError};

/// Runs one command; returns the exit code of a run that got as far as
/// reporting (which may still be non-zero, e.g. no level met the thresholds).
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Probe(args) => probe::run(&args),
        Command::Sweep(args) => sweep::run(&args),
        Command::Push(args) => push::run(&args),
    }
}
