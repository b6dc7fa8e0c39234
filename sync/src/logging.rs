//! Logs to stderr with `tracing`: the level from `SLUICE_LOG` (or
//! `RUST_LOG`), JSON lines with `SLUICE_LOG_FORMAT=json`.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoggingError {
    #[error("{var}={value:?}: {problem}")]
    Bad {
        var: &'static str,
        value: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter and format the environment asks for (a pure function of the
/// variables' values).
pub fn log_settings(
    sluice_log: Option<&str>,
    rust_log: Option<&str>,
    format: Option<&str>,
) -> Result<(EnvFilter, LogFormat), LoggingError> {
    let (var, directives) = match (sluice_log, rust_log) {
        (Some(v), _) if !v.is_empty() => ("SLUICE_LOG", v),
        (_, Some(v)) if !v.is_empty() => ("RUST_LOG", v),
        _ => ("SLUICE_LOG", "info"),
    };
    let filter = EnvFilter::builder()
        .parse(directives)
        .map_err(|e| LoggingError::Bad {
            var,
            value: directives.to_string(),
            problem: format!("not a log filter (e.g. info, sluice_sync=debug): {e}"),
        })?;
    let format = match format {
        None | Some("") | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(LoggingError::Bad {
                var: "SLUICE_LOG_FORMAT",
                value: other.to_string(),
                problem: "must be json or text".into(),
            })
        }
    };
    Ok((filter, format))
}

/// Installs the global subscriber from the environment.
pub fn init() -> Result<(), LoggingError> {
    let var = |name| std::env::var(name).ok();
    let (filter, format) = log_settings(
        var("SLUICE_LOG").as_deref(),
        var("RUST_LOG").as_deref(),
        var("SLUICE_LOG_FORMAT").as_deref(),
    )?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person: not in files, pipes or log collectors.
        .with_ansi(std::io::stderr().is_terminal());
    // try_init: a second call (tests running in-process) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_and_format_from_the_environment() {
        let (filter, format) = log_settings(None, None, None).unwrap();
        assert_eq!(filter.to_string(), "info");
        assert_eq!(format, LogFormat::Text);
        let (filter, _) = log_settings(Some("debug"), Some("warn"), None).unwrap();
        assert_eq!(filter.to_string(), "debug", "SLUICE_LOG wins");
        let (filter, format) = log_settings(None, Some("warn"), Some("json")).unwrap();
        assert_eq!(
            (filter.to_string(), format),
            ("warn".into(), LogFormat::Json)
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let error = log_settings(None, None, Some("yaml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "SLUICE_LOG_FORMAT=\"yaml\": must be json or text"
        );
        let error = log_settings(Some("sluice_sync=loud"), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("SLUICE_LOG=\"sluice_sync=loud\": not a log filter"),
            "{error}"
        );
    }
}
