use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // clap exits with 2 on bad usage, like every other usage error here.
    let cli = sluice_prober::cli::Cli::parse();
    match sluice_prober::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("sluice-prober: error: {e:#}");
            ExitCode::from(sluice_prober::exit_code_of(&e))
        }
    }
}
