//! The settings of a run: command-line flags over the file's keys over
//! defaults suited to a real service.

use crate::cli::LevelArgs;
use crate::config_file::{self, FileSettings};
use crate::load::LevelTiming;
use crate::search::Thresholds;
use crate::ProberError;
use serde_json::Value;
use sluice_core::config::check::{PROBE, PROBE_WARMUP};
use std::time::Duration;

pub const DEFAULT_ERROR_THRESHOLD: f64 = 0.05;
pub const DEFAULT_LATENCY_THRESHOLD_MS: f64 = 2000.0;
pub const DEFAULT_WARMUP: Duration = Duration::from_secs(1);
pub const DEFAULT_DURATION: Duration = Duration::from_secs(5);
/// Enough for ~3 samples above the p99 even at the lowest levels.
pub const DEFAULT_MIN_SAMPLES: u64 = 300;
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(30);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONCURRENCY: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub thresholds: Thresholds,
    pub timing: LevelTiming,
    pub max_concurrency: usize,
    pub threads: usize,
}

fn flag_seconds(
    v: Option<f64>,
    flag: &str,
    allow_zero: bool,
) -> Result<Option<Duration>, ProberError> {
    match v {
        None => Ok(None),
        // The file's range for the same key (`probe.*`).
        Some(s) if s.is_finite() && if allow_zero { PROBE_WARMUP } else { PROBE }.contains(s) => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        Some(s) => Err(ProberError::Usage(format!(
            "{flag} {s}: must be a number of seconds {} 0 and at most 3600",
            if allow_zero { "≥" } else { ">" }
        ))),
    }
}

/// Resolves every setting; `error_threshold` and friends are the flags,
/// `file` the settings of the config file if there is one.
pub fn resolve(
    level: &LevelArgs,
    error_threshold: Option<f64>,
    latency_threshold_ms: Option<f64>,
    max_concurrency: Option<usize>,
    file: Option<&FileSettings>,
) -> Result<Settings, ProberError> {
    let no_file = FileSettings::default();
    let file = file.unwrap_or(&no_file);
    let usage = |e: sluice_core::config::ConfigError| ProberError::Usage(e.to_string());
    // serde_json turns NaN into null, which would read "got null".
    for (flag, v) in [
        ("--error-threshold", error_threshold),
        ("--latency-threshold-ms", latency_threshold_ms),
    ] {
        if v.is_some_and(f64::is_nan) {
            return Err(ProberError::Usage(format!(
                "{flag}: must be a number, got NaN"
            )));
        }
    }
    let error_rate = match error_threshold {
        Some(f) => {
            config_file::error_threshold(&Value::from(f), "--error-threshold").map_err(usage)?
        }
        None => file.error_threshold.unwrap_or(DEFAULT_ERROR_THRESHOLD),
    };
    let p99_ms = match latency_threshold_ms {
        Some(f) => config_file::latency_threshold_ms(&Value::from(f), "--latency-threshold-ms")
            .map_err(usage)?,
        None => file
            .latency_threshold_ms
            .unwrap_or(DEFAULT_LATENCY_THRESHOLD_MS),
    };
    let warmup = flag_seconds(level.warmup, "--warmup", true)?
        .or(file.warmup)
        .unwrap_or(DEFAULT_WARMUP);
    let duration = flag_seconds(level.duration, "--duration", false)?
        .or(file.duration)
        .unwrap_or(DEFAULT_DURATION);
    let max_duration =
        match flag_seconds(level.max_duration, "--max-duration", false)?.or(file.max_duration) {
            Some(m) if m < duration => {
                return Err(ProberError::Usage(format!(
                    "max_duration ({} s) must be ≥ duration ({} s): it is how long a level may \
                 run past duration to reach min_samples",
                    m.as_secs_f64(),
                    duration.as_secs_f64()
                )))
            }
            Some(m) => m,
            None => DEFAULT_MAX_DURATION.max(duration),
        };
    let request_timeout = flag_seconds(level.request_timeout, "--request-timeout", false)?
        .or(file.request_timeout)
        .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    let min_samples = level
        .min_samples
        .or(file.min_samples)
        .unwrap_or(DEFAULT_MIN_SAMPLES);
    let max_concurrency = max_concurrency
        .or(file.max_concurrency)
        .unwrap_or(DEFAULT_MAX_CONCURRENCY);
    if !(1..=10_000).contains(&max_concurrency) {
        return Err(ProberError::Usage(format!(
            "--max-concurrency {max_concurrency}: must be from 1 to 10000"
        )));
    }
    let threads = level
        .threads
        .or(file.threads)
        .unwrap_or_else(default_threads);
    if !(1..=64).contains(&threads) {
        return Err(ProberError::Usage(format!(
            "--threads {threads}: must be from 1 to 64"
        )));
    }
    Ok(Settings {
        thresholds: Thresholds { error_rate, p99_ms },
        timing: LevelTiming {
            warmup,
            duration,
            min_samples,
            max_duration,
            request_timeout,
            stop_at_error_rate: stop_at_error_rate(error_rate),
        },
        max_concurrency,
        threads,
    })
}

/// Where a level stops early on errors: well past the threshold, so the
/// verdict cannot be close.
pub fn stop_at_error_rate(threshold: f64) -> Option<f64> {
    let at = (threshold * 2.0).max(0.5);
    (at < 1.0).then_some(at)
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().min(2))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_flags() -> LevelArgs {
        LevelArgs {
            warmup: None,
            duration: None,
            min_samples: None,
            max_duration: None,
            request_timeout: None,
            threads: None,
        }
    }

    #[test]
    fn flags_over_file_over_defaults() {
        let file = FileSettings {
            error_threshold: Some(0.01),
            latency_threshold_ms: Some(100.0),
            duration: Some(Duration::from_secs(2)),
            min_samples: Some(50),
            ..FileSettings::default()
        };
        let mut flags = no_flags();
        flags.duration = Some(0.5);
        let s = resolve(&flags, None, Some(30.0), None, Some(&file)).unwrap();
        assert_eq!(s.thresholds.error_rate, 0.01);
        assert_eq!(s.thresholds.p99_ms, 30.0);
        assert_eq!(s.timing.duration, Duration::from_millis(500));
        assert_eq!(s.timing.min_samples, 50);
        assert_eq!(s.timing.warmup, DEFAULT_WARMUP);
        assert_eq!(s.max_concurrency, DEFAULT_MAX_CONCURRENCY);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let e = resolve(&no_flags(), Some(1.5), None, None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--error-threshold: must be a fraction from 0 to 1 (0.05 is 5%), got 1.5"
        );
        let mut flags = no_flags();
        flags.duration = Some(0.0);
        let e = resolve(&flags, None, None, None, None).unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::USAGE);
    }

    #[test]
    fn bad_values_are_named() {
        let e = resolve(&no_flags(), Some(f64::NAN), None, None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--error-threshold: must be a number, got NaN"
        );
        let mut flags = no_flags();
        flags.warmup = Some(-1.0);
        let e = resolve(&flags, None, None, None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--warmup -1: must be a number of seconds ≥ 0 and at most 3600"
        );
        let mut flags = no_flags();
        flags.max_duration = Some(1.0);
        flags.duration = Some(5.0);
        let e = resolve(&flags, None, None, None, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("max_duration (1 s) must be ≥ duration (5 s)"),
            "{e}"
        );
        // Without max_duration, a long duration raises the default.
        let mut flags = no_flags();
        flags.duration = Some(40.0);
        let s = resolve(&flags, None, None, None, None).unwrap();
        assert_eq!(s.timing.max_duration, Duration::from_secs(40));
    }
}
