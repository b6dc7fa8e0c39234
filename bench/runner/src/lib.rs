//! Sluice's benchmarks. Every figure is measured side by side with its
//! reference in one run on this machine and printed as a markdown table,
//! under a line that says when and on what.
//!
//! - `filter` (`make bench`): hot-path cost, the handover gap and
//!   throughput at saturation against HAProxy, queue-timeout lateness;
//! - `isolation` (`make bench-isolation`): small requests beside a flooded
//!   large endpoint, straight, through plain Envoy, HAProxy and Sluice.

pub mod access_log;
mod figures;
pub mod filter;
pub mod haproxy;
pub mod isolation;
pub mod machine;
mod wrk;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "sluice-bench")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Bench,
}

#[derive(Subcommand, Debug)]
pub enum Bench {
    /// Hot-path cost, handover gap and throughput against HAProxy, 504
    /// lateness (make bench).
    Filter(filter::Opts),
    /// Small requests' latency while a large endpoint is flooded (make
    /// bench-isolation).
    Isolation(isolation::Opts),
}

pub fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Bench::Filter(o) => filter::run(o),
        Bench::Isolation(o) => isolation::run(o),
    }
}
