use clap::Parser;

fn main() -> anyhow::Result<()> {
    sluice_bench::run(&sluice_bench::Cli::parse())
}
