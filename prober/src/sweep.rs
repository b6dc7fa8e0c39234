//! `sluice-prober sweep`: one endpoint at a list of concurrency levels, each
//! judged against the first (the baseline), then the saturation point and a
//! recommended autoscaling threshold.
//!
//! - status per level: `saturated` when p95 is over twice the baseline, the
//!   error rate is over the threshold, or throughput grew by less than 10% of
//!   what the extra concurrency would give if it scaled linearly;
//!   `degrading` when p95 is over 1.5× the baseline or throughput grew by
//!   less than half of linear; `ok` otherwise.
//! - saturation point: the lower of where p95 first passes twice its baseline
//!   and where throughput stops growing (the knee, see `scaling::knee`).
//! - recommended autoscaling threshold: 75% of the saturation point, in
//!   requests in flight per instance; Little's law (in flight = throughput ×
//!   latency) turns it into instances for a target rate.

use crate::cli::SweepArgs;
use crate::config_file::{self, ConfigFile, EndpointSpec};
use crate::error::{exit, ProberError};
use crate::load::{self, LevelStats, RequestSpec, Target};
use crate::progress::Progress;
use crate::report::{self, round, LevelReport, TimingReport};
use crate::scaling::{self, Point, UslFit};
use crate::settings::{self, Settings};
use crate::target;
use anyhow::Context;
use serde::Serialize;
use std::fmt::Write as _;

pub const DEFAULT_LEVELS: &[usize] = &[1, 2, 4, 8, 16, 32, 64];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Degrading,
    Saturated,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SweepLevel {
    #[serde(flatten)]
    pub level: LevelReport,
    /// Throughput gained over the previous level, as a fraction of what
    /// linear scaling would have gained (1 = linear; absent for the first).
    pub throughput_gain: Option<f64>,
    pub status: Status,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Saturation {
    /// The saturation point: the lower of the two below.
    pub concurrency: Option<usize>,
    /// First level whose p95 is over twice the baseline.
    pub latency_at: Option<usize>,
    /// Where throughput stops growing.
    pub throughput_at: Option<usize>,
}

/// Little's law at the saturation point: in flight = throughput × latency.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct LittlesLaw {
    pub concurrency: usize,
    pub rps: f64,
    pub p95_ms: f64,
    /// rps × p95: how many requests that rate and latency keep in flight.
    pub in_flight: f64,
}

/// Instances needed for a target rate at a target p95.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct Sizing {
    pub target_rps: f64,
    pub target_p95_ms: f64,
    pub in_flight_needed: f64,
    pub instances: u64,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct SweepReport {
    #[schemars(extend("const" = "sweep"))]
    pub command: &'static str,
    pub version: &'static str,
    pub target: String,
    pub endpoint: String,
    pub method: String,
    pub error_threshold: f64,
    pub timing: TimingReport,
    pub levels: Vec<SweepLevel>,
    pub baseline_p95_ms: Option<f64>,
    pub saturation: Saturation,
    pub recommended_threshold: Option<usize>,
    pub littles_law: Option<LittlesLaw>,
    pub sizing: Option<Sizing>,
    pub usl: Option<UslFit>,
    pub client_bound_levels: Vec<usize>,
    /// Levels whose successful responses differ in size or content type
    /// from the first level's.
    pub response_changes: Vec<String>,
    pub problems: Vec<String>,
    pub exit_code: u8,
}

/// Judges each level against the baseline.
pub fn statuses(levels: &[LevelStats], error_threshold: f64) -> Vec<SweepLevel> {
    let baseline = levels.first().map(|l| l.quantile_ms(0.95));
    let mut out: Vec<SweepLevel> = Vec::new();
    for (i, l) in levels.iter().enumerate() {
        let p95 = l.quantile_ms(0.95);
        let gain = (i > 0).then(|| {
            let prev = &levels[i - 1];
            let linear = l.concurrency as f64 / prev.concurrency as f64 - 1.0;
            if prev.rps() > 0.0 && linear > 0.0 {
                (l.rps() / prev.rps() - 1.0) / linear
            } else {
                0.0
            }
        });
        let ratio = baseline
            .filter(|b| *b > 0.0)
            .map(|b| p95 / b)
            .unwrap_or(1.0);
        let status =
            if l.error_rate() > error_threshold || ratio > 2.0 || gain.is_some_and(|g| g < 0.1) {
                Status::Saturated
            } else if ratio > 1.5 || gain.is_some_and(|g| g < 0.5) {
                Status::Degrading
            } else {
                Status::Ok
            };
        out.push(SweepLevel {
            level: LevelReport::from(l),
            throughput_gain: gain.map(|g| round(g, 3)),
            status,
        });
    }
    out
}

/// The saturation point of measured levels.
pub fn saturation(levels: &[LevelStats]) -> Saturation {
    let baseline = levels.first().map(|l| l.quantile_ms(0.95)).unwrap_or(0.0);
    let latency_at = levels
        .iter()
        .find(|l| baseline > 0.0 && l.quantile_ms(0.95) > 2.0 * baseline)
        .map(|l| l.concurrency);
    let points: Vec<Point> = levels.iter().map(LevelStats::point).collect();
    let highest = levels.iter().map(|l| l.concurrency).max().unwrap_or(0);
    // A knee at the highest level only says throughput was still growing.
    let throughput_at = scaling::knee(&points)
        .map(|p| p.concurrency as usize)
        .filter(|&c| c < highest);
    let concurrency = match (latency_at, throughput_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Saturation {
        concurrency,
        latency_at,
        throughput_at,
    }
}

pub fn recommended_threshold(saturation: usize) -> usize {
    ((saturation as f64 * 0.75).floor() as usize).max(1)
}

pub fn run(args: &SweepArgs) -> anyhow::Result<u8> {
    let file = args.config.as_deref().map(config_file::load).transpose()?;
    let spec = endpoint_spec(args, file.as_ref())?;
    let settings = settings::resolve(
        &args.level,
        args.error_threshold,
        None,
        None,
        file.as_ref().map(|f| &f.settings),
    )?;
    let levels = levels(args)?;
    check_sizing_targets(args)?;
    let check = std::sync::Arc::new(args.check.to_check()?);
    let target = target::connect_target(&args.url)?;
    let mut request = target::request_spec(&spec)?;
    request.check = check;

    let sweep = measure_levels(args, &spec.path, &levels, &target, &request, &settings)?;
    let report = SweepReport::new(args, &spec, &settings, sweep, &request.check);
    if !report.client_bound_levels.is_empty() && !args.output.quiet {
        eprintln!(
            "warning: the prober's own CPU was the limit at concurrency {:?}; \
             figures there understate the target",
            report.client_bound_levels
        );
    }
    report::emit(&report, || report.to_text(), &args.output, &report.problems)?;
    Ok(report.exit_code)
}

/// The endpoint to sweep: from the file if it is there, else from the flags
/// (which must not contradict the file).
fn endpoint_spec(args: &SweepArgs, file: Option<&ConfigFile>) -> Result<EndpointSpec, ProberError> {
    let flags_given = args.request.method.is_some()
        || !args.request.headers.is_empty()
        || args.request.body.is_some();
    match file.and_then(|f| f.endpoint(&args.endpoint)) {
        Some(_) if flags_given => Err(ProberError::Usage(format!(
            "endpoint {} is in the config: change its method, headers and body there",
            args.endpoint
        ))),
        Some(s) => Ok(s.clone()),
        None => target::spec_from_flags(
            &args.endpoint,
            args.request.method.as_deref(),
            &args.request.headers,
            args.request.body.as_deref(),
        ),
    }
}

/// `--levels` (or the default list), sorted, each once.
fn levels(args: &SweepArgs) -> Result<Vec<usize>, ProberError> {
    let mut levels: Vec<usize> = if args.levels.is_empty() {
        DEFAULT_LEVELS.to_vec()
    } else {
        args.levels.clone()
    };
    levels.sort_unstable();
    levels.dedup();
    if levels.first() == Some(&0) || levels.last().is_some_and(|&n| n > 10_000) {
        return Err(ProberError::Usage(
            "--levels: each level must be from 1 to 10000".into(),
        ));
    }
    Ok(levels)
}

fn check_sizing_targets(args: &SweepArgs) -> Result<(), ProberError> {
    for (v, flag) in [
        (args.target_rps, "--target-rps"),
        (args.target_p95_ms, "--target-p95-ms"),
    ] {
        if v.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
            return Err(ProberError::Usage(format!(
                "{flag}: must be a number greater than 0"
            )));
        }
    }
    Ok(())
}

/// The levels measured, and how the sweep ended.
struct Sweep {
    measured: Vec<LevelStats>,
    problems: Vec<String>,
    exit_code: u8,
}

/// Runs the levels in order, printing each as it is judged. Stops when the
/// target stops answering, or after two saturated levels in a row unless
/// `--all-levels`.
fn measure_levels(
    args: &SweepArgs,
    path: &str,
    levels: &[usize],
    target: &Target,
    request: &RequestSpec,
    settings: &Settings,
) -> anyhow::Result<Sweep> {
    let progress = Progress::new(args.output.quiet);
    let mut sweep = Sweep {
        measured: Vec::new(),
        problems: Vec::new(),
        exit_code: exit::OK,
    };
    let mut saturated_in_a_row = 0;
    for &n in levels {
        progress.status(format!("{path}  concurrency {n}"));
        let stats = load::run_level(target, request, n, &settings.timing, settings.threads)
            .context("starting the load threads")?;
        if stats.unreachable() {
            sweep.problems.push(format!(
                "the target stopped answering at concurrency {n}: {}",
                stats.first_error.clone().unwrap_or_default()
            ));
            sweep.exit_code = exit::UNREACHABLE;
            break;
        }
        sweep.measured.push(stats);
        let judged = statuses(&sweep.measured, settings.thresholds.error_rate);
        let last = judged.last().expect("just pushed");
        progress.line(level_line(path, last));
        saturated_in_a_row = if last.status == Status::Saturated {
            saturated_in_a_row + 1
        } else {
            0
        };
        if saturated_in_a_row >= 2 && !args.all_levels {
            break;
        }
    }
    progress.finish();
    Ok(sweep)
}

/// One level as the progress output shows it.
fn level_line(path: &str, l: &SweepLevel) -> String {
    format!(
        "{path}  c={:<4} p50 {:>7} p95 {:>7} p99 {:>7} ms  {:>7} req/s  err {:>6}  {}",
        l.level.concurrency,
        report::ms(l.level.p50_ms),
        report::ms(l.level.p95_ms),
        report::ms(l.level.p99_ms),
        report::rps(l.level.rps),
        report::pct(l.level.error_rate),
        report::serde_plain(&l.status)
    )
}

/// Little's law at the saturation point `c`, if it was measured.
fn littles_law(measured: &[LevelStats], c: usize) -> Option<LittlesLaw> {
    let l = measured.iter().find(|l| l.concurrency == c)?;
    Some(LittlesLaw {
        concurrency: c,
        rps: round(l.rps(), 1),
        p95_ms: round(l.quantile_ms(0.95), 3),
        in_flight: round(l.rps() * l.quantile_ms(0.95) / 1000.0, 2),
    })
}

/// Instances for `target_rps` at `threshold` in flight each. Without
/// `target_p95_ms`, the latency is that of the level nearest below the
/// threshold, else the baseline's.
fn sizing(
    target_rps: f64,
    target_p95_ms: Option<f64>,
    threshold: usize,
    measured: &[LevelStats],
) -> Sizing {
    let p95 = target_p95_ms.unwrap_or_else(|| {
        measured
            .iter()
            .rev()
            .find(|l| l.concurrency <= threshold)
            .or(measured.first())
            .map(|l| l.quantile_ms(0.95))
            .unwrap_or(0.0)
    });
    let needed = target_rps * p95 / 1000.0;
    Sizing {
        target_rps,
        target_p95_ms: round(p95, 3),
        in_flight_needed: round(needed, 2),
        instances: (needed / threshold as f64).ceil().max(1.0) as u64,
    }
}

impl SweepReport {
    /// Judges what `sweep` measured.
    fn new(
        args: &SweepArgs,
        spec: &EndpointSpec,
        settings: &Settings,
        sweep: Sweep,
        check: &crate::success::SuccessCheck,
    ) -> Self {
        let measured = &sweep.measured;
        let saturation = saturation(measured);
        let recommended = saturation.concurrency.map(recommended_threshold);
        let points: Vec<Point> = measured.iter().map(LevelStats::point).collect();
        SweepReport {
            command: "sweep",
            version: env!("CARGO_PKG_VERSION"),
            target: crate::redis_records::redact(&args.url),
            endpoint: spec.path.clone(),
            method: spec.method.clone(),
            error_threshold: settings.thresholds.error_rate,
            timing: TimingReport::from(settings),
            baseline_p95_ms: measured.first().map(|l| round(l.quantile_ms(0.95), 3)),
            levels: statuses(measured, settings.thresholds.error_rate),
            littles_law: saturation
                .concurrency
                .and_then(|c| littles_law(measured, c)),
            saturation,
            recommended_threshold: recommended,
            sizing: args
                .target_rps
                .zip(recommended)
                .map(|(rps, t)| sizing(rps, args.target_p95_ms, t, measured)),
            usl: scaling::fit_usl(&points),
            client_bound_levels: measured
                .iter()
                .filter(|l| l.client_bound())
                .map(|l| l.concurrency)
                .collect(),
            response_changes: report::response_changes(measured, check),
            problems: sweep.problems,
            exit_code: sweep.exit_code,
        }
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "sluice-prober sweep {} {} {}  (levels {}s + {}s warm-up)\n",
            self.target, self.method, self.endpoint, self.timing.duration_s, self.timing.warmup_s
        );
        let rows: Vec<Vec<String>> = self
            .levels
            .iter()
            .map(|l| {
                vec![
                    l.level.concurrency.to_string(),
                    report::ms(l.level.p50_ms),
                    report::ms(l.level.p95_ms),
                    report::ms(l.level.p99_ms),
                    report::rps(l.level.rps),
                    report::pct(l.level.error_rate),
                    report::serde_plain(&l.status),
                ]
            })
            .collect();
        out.push_str(&report::table(
            &[
                "conc", "p50 ms", "p95 ms", "p99 ms", "req/s", "errors", "status",
            ],
            &rows,
            &[6],
        ));
        out.push('\n');
        let at = |v: Option<usize>| {
            v.map(|c| c.to_string())
                .unwrap_or_else(|| "not reached".into())
        };
        match self.saturation.concurrency {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "saturation point: {c} in flight (p95 over 2x baseline {} ms: {}; throughput stops growing: {})",
                    report::ms(self.baseline_p95_ms.unwrap_or(0.0)),
                    at(self.saturation.latency_at),
                    at(self.saturation.throughput_at)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "saturation point: not reached up to {} in flight; try higher --levels",
                    self.levels.last().map(|l| l.level.concurrency).unwrap_or(0)
                );
            }
        }
        if let (Some(t), Some(l)) = (self.recommended_threshold, &self.littles_law) {
            let _ = writeln!(
                out,
                "recommended autoscaling threshold: {t} requests in flight per instance (75% of {})",
                l.concurrency
            );
            let _ = writeln!(
                out,
                "Little's law: in flight = throughput x latency; at saturation {:.1} = {} req/s x {} ms (p95)",
                l.in_flight,
                report::rps(l.rps),
                report::ms(l.p95_ms)
            );
            match &self.sizing {
                Some(s) => {
                    let _ = writeln!(
                        out,
                        "sizing: {} req/s x {} ms = {:.1} in flight -> {} instance(s) at {t} each",
                        report::rps(s.target_rps),
                        report::ms(s.target_p95_ms),
                        s.in_flight_needed,
                        s.instances
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "sizing: threshold = target RPS x target p95; instances = that / {t} (pass --target-rps)"
                    );
                }
            }
        }
        if let Some(u) = &self.usl {
            let _ = writeln!(
                out,
                "advisory: USL sigma {:.4} kappa {:.6} N* {} (r2 {:.3})",
                u.sigma,
                u.kappa,
                u.n_star
                    .map(|n| format!("{n:.1}"))
                    .unwrap_or_else(|| "none (no peak)".into()),
                u.r_squared
            );
        }
        for change in &self.response_changes {
            let _ = writeln!(out, "warning: {change}");
        }
        for p in &self.problems {
            let _ = writeln!(out, "problem: {p}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A level of `n` in flight with every request at `p95_ms`, at `rps`.
    fn level(n: usize, p95_ms: u64, rps: u64) -> LevelStats {
        let mut s = LevelStats::empty(n, 1);
        for _ in 0..100 {
            s.latency_us.record(p95_ms * 1000).unwrap();
        }
        s.requests = 100;
        s.completed_in_window = rps;
        s.ok_in_window = rps;
        s.window = Duration::from_secs(1);
        s
    }

    #[test]
    fn a_hard_capacity_of_16() {
        // 20 ms service, 16 slots, FIFO queue beyond.
        let levels: Vec<LevelStats> = [1usize, 2, 4, 8, 16, 32, 64]
            .iter()
            .map(|&n| {
                let rps = 50 * n.min(16) as u64;
                let p95 = if n <= 16 { 21 } else { 20 * n as u64 / 16 + 10 };
                level(n, p95, rps)
            })
            .collect();
        let st: Vec<Status> = statuses(&levels, 0.05).iter().map(|l| l.status).collect();
        use Status::*;
        assert_eq!(st, [Ok, Ok, Ok, Ok, Ok, Saturated, Saturated]);
        let sat = saturation(&levels);
        assert_eq!(sat.throughput_at, Some(16));
        assert_eq!(sat.latency_at, Some(32));
        assert_eq!(sat.concurrency, Some(16));
        assert_eq!(recommended_threshold(16), 12);
        assert_eq!(recommended_threshold(1), 1);
    }

    #[test]
    fn still_scaling_is_not_saturated() {
        let levels: Vec<LevelStats> = [1usize, 2, 4]
            .iter()
            .map(|&n| level(n, 20, 50 * n as u64))
            .collect();
        let sat = saturation(&levels);
        assert_eq!(sat.concurrency, None);
    }

    #[test]
    fn degrading_between() {
        let levels = vec![level(1, 20, 50), level(2, 32, 70)];
        assert_eq!(statuses(&levels, 0.05)[1].status, Status::Degrading);
    }
}
