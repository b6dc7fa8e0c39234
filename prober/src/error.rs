//! The prober's exit codes and the errors that carry one.

use crate::config_file::ConfigFileError;

/// Exit codes; the list in `cli::EXIT_CODES` and docs/prober.md match these.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const NO_PASSING_LEVEL: u8 = 4;
    pub const STORAGE: u8 = 5;
    /// Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
    pub const INTERRUPTED: u8 = 130;
}

/// Failures with their own exit code. Anything else exits with 1.
#[derive(Debug, thiserror::Error)]
pub enum ProberError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigFileError),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{0}")]
    Storage(String),
}

impl ProberError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ProberError::Usage(_) | ProberError::Config(_) => exit::USAGE,
            ProberError::Unreachable { .. } => exit::UNREACHABLE,
            ProberError::Storage(_) => exit::STORAGE,
        }
    }
}

/// The exit code for an error that ended the run.
pub fn exit_code_of(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| {
            if let Some(p) = c.downcast_ref::<ProberError>() {
                Some(p.exit_code())
            } else {
                c.downcast_ref::<ConfigFileError>().map(|_| exit::USAGE)
            }
        })
        .unwrap_or(exit::FAILURE)
}
