//! Sluice's benchmarks. Every figure is measured side by side with its
//! reference in one run on this machine and printed as a markdown table,
//! under a line that says when and on what.
//!
//! - `filter` (`make bench`): hot-path cost, the handover gap and
//!   throughput at saturation against HAProxy, queue-timeout lateness;
//! - `isolation` (`make bench-isolation`): small requests beside a flooded
//!   large endpoint, straight, through plain Envoy, HAProxy and Sluice; and
//!   seed 004's case, small and 25 MB bodies on one endpoint, plain FIFO
//!   against cost by size;
//! - `instances` (`make bench-instances`): several instances of their own
//!   capacities behind one Envoy, Sluice picking the instance against
//!   HAProxy's per-server `maxconn` and against the old way;
//! - `section`: puts the output of a benchmark run by another program
//!   (`make bench-prober`, `make soak`) into bench/README.md.
//!
//! Each run also rewrites its own section of bench/README.md.

pub mod access_log;
mod figures;
pub mod filter;
pub mod haproxy;
pub mod instances;
pub mod isolation;
mod isolation_cost;
pub mod machine;
pub mod readme;
mod wrk;
pub use wrk::cpu_time;

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
    /// Several instances, each held to its own capacity: Sluice against
    /// HAProxy's per-server maxconn (make bench-instances).
    Instances(instances::Opts),
    /// Reads a benchmark's output on stdin and writes it into its section
    /// of bench/README.md, under a line saying when and on what.
    Section(readme::SectionOpts),
}

pub fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Bench::Filter(o) => filter::run(o),
        Bench::Isolation(o) => isolation::run(o),
        Bench::Instances(o) => instances::run(o),
        Bench::Section(o) => readme::section_from_stdin(o),
    }
}
