use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // clap exits with 2 on bad usage, and so do bad settings.
    let opts = sluice_sync::cli::Opts::parse();
    match sluice_sync::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-sync: error: {e:#}");
            ExitCode::from(sluice_sync::exit_code_of(&e))
        }
    }
}
