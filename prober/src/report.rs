//! What the prober prints: tables for people, JSON for machines. The JSON
//! shapes are fixed by prober/schema/*.schema.json (checked by the tests).

use crate::load::LevelStats;
use crate::scaling::UslFit;
use crate::search::{Run, Stage};
use crate::settings::Settings;
use serde::Serialize;
use sluice_core::capacity_record::Source;
use std::fmt::Write as _;

/// Rounds to `digits` decimals so the JSON stays readable.
pub fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ThresholdsReport {
    pub error_rate: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct TimingReport {
    pub warmup_s: f64,
    pub duration_s: f64,
    pub max_duration_s: f64,
    pub min_samples: u64,
    pub request_timeout_s: f64,
    pub threads: usize,
}

impl TimingReport {
    pub fn from(s: &Settings) -> TimingReport {
        TimingReport {
            warmup_s: round(s.timing.warmup.as_secs_f64(), 3),
            duration_s: round(s.timing.duration.as_secs_f64(), 3),
            max_duration_s: round(s.timing.max_duration.as_secs_f64(), 3),
            min_samples: s.timing.min_samples,
            request_timeout_s: round(s.timing.request_timeout.as_secs_f64(), 3),
            threads: s.threads,
        }
    }
}

/// Figures of one level (one run, or pooled runs).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct LevelReport {
    pub concurrency: usize,
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub window_s: f64,
    /// All responses per second, errors included (`rps` counts 2xx only).
    pub total_rps: f64,
    /// Cores the prober kept busy while measuring.
    pub prober_cpu_cores: f64,
    /// Share of the time its load threads were running or queued for a CPU
    /// instead of waiting for responses (per thread, 0..1).
    pub prober_busy: f64,
    /// The prober's own CPU, not the target, was probably the limit.
    pub client_bound: bool,
    /// Responses with an expected status whose body failed the body check
    /// (counted in `errors`).
    pub check_failures: u64,
    /// Mean body size of the responses counted as successful, bytes.
    pub body_bytes_mean: Option<f64>,
}

impl LevelReport {
    pub fn from(s: &LevelStats) -> LevelReport {
        LevelReport {
            concurrency: s.concurrency,
            requests: s.requests,
            errors: s.errors,
            error_rate: round(s.error_rate(), 6),
            rps: round(s.rps(), 1),
            p50_ms: round(s.quantile_ms(0.50), 3),
            p95_ms: round(s.quantile_ms(0.95), 3),
            p99_ms: round(s.quantile_ms(0.99), 3),
            max_ms: round(s.max_ms(), 3),
            window_s: round(s.window.as_secs_f64(), 3),
            total_rps: round(s.total_rps(), 1),
            prober_cpu_cores: round(s.cpu_cores(), 3),
            prober_busy: round(s.busy(), 3),
            client_bound: s.client_bound(),
            check_failures: s.check_failures,
            body_bytes_mean: s.shape.mean_bytes().map(|b| round(b, 1)),
        }
    }
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RunReport {
    pub stage: Stage,
    pub attempt: usize,
    #[serde(flatten)]
    pub level: LevelReport,
    pub passed: bool,
    /// `None` (JSON null) on a tie that the level's next run breaks.
    pub level_passed: Option<bool>,
    pub failures: Vec<String>,
}

impl RunReport {
    pub fn from(r: &Run) -> RunReport {
        RunReport {
            stage: r.stage,
            attempt: r.attempt,
            level: LevelReport::from(&r.stats),
            passed: r.passed(),
            level_passed: r.level_passed,
            failures: r.failures.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct KneeReport {
    pub concurrency: usize,
    pub rps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Probed; a capacity was found.
    Measured,
    /// Not probed: the file already has a capacity (use --force).
    KeptFile,
    /// Not probed: Redis already has a record, adopted into the file.
    ReusedRedis,
    /// Probed; not even one request at a time met the thresholds.
    NoPassingLevel,
    /// Not probed: the run stopped before reaching it.
    NotProbed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RedisOutcome {
    Pushed,
    /// A record was there already and was left alone (use --force).
    Exists,
    Failed,
    /// No Redis configured.
    Off,
    /// --dry-run, or nothing to push.
    Skipped,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct EndpointReport {
    pub path: String,
    pub method: String,
    pub outcome: Outcome,
    pub capacity: Option<u32>,
    #[schemars(with = "Option<crate::schema::SourceSchema>")]
    pub source: Option<Source>,
    pub capped: bool,
    pub unstable: bool,
    /// Pooled figures at the capacity.
    pub at_capacity: Option<LevelReport>,
    pub knee: Option<KneeReport>,
    pub usl: Option<UslFit>,
    /// Levels at which the prober's CPU was the limit.
    pub client_bound_levels: Vec<usize>,
    pub runs: Vec<RunReport>,
    pub written: bool,
    pub redis: RedisOutcome,
    pub note: Option<String>,
    /// Levels whose successful responses differ in size or content type
    /// from the first level's: errors answered with a success status, often.
    pub response_changes: Vec<String>,
    pub elapsed_s: f64,
    /// With --each-instance: each instance's own measurement, in the order
    /// measured (empty otherwise).
    pub instances: Vec<InstanceReport>,
}

/// One instance's measurement of an endpoint (`--each-instance`).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct InstanceReport {
    /// `ip:port`, measured at `http://ADDR/PATH`.
    pub address: String,
    pub outcome: Outcome,
    #[schemars(range(min = 1))]
    pub capacity: Option<u32>,
    pub at_capacity: Option<LevelReport>,
    pub note: Option<String>,
}

impl EndpointReport {
    pub fn new(path: &str, method: &str, outcome: Outcome) -> EndpointReport {
        EndpointReport {
            path: path.to_string(),
            method: method.to_string(),
            outcome,
            capacity: None,
            source: None,
            capped: false,
            unstable: false,
            at_capacity: None,
            knee: None,
            usl: None,
            client_bound_levels: Vec::new(),
            runs: Vec::new(),
            written: false,
            redis: RedisOutcome::Skipped,
            note: None,
            response_changes: Vec::new(),
            elapsed_s: 0.0,
            instances: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct ProbeReport {
    #[schemars(extend("const" = "probe"))]
    pub command: &'static str,
    pub version: &'static str,
    pub target: String,
    pub config: Option<String>,
    pub service: String,
    pub thresholds: ThresholdsReport,
    pub timing: TimingReport,
    pub max_concurrency: usize,
    pub endpoints: Vec<EndpointReport>,
    pub config_written: bool,
    pub redis_url: Option<String>,
    pub problems: Vec<String>,
    pub exit_code: u8,
}

/// Columns of text, right-aligned except those listed as left.
pub fn table(headers: &[&str], rows: &[Vec<String>], left: &[usize]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if left.contains(&i) {
                s.push_str(cell);
                if i + 1 < cells.len() {
                    s.push_str(&" ".repeat(pad));
                }
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

pub fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

pub fn ms(v: f64) -> String {
    format!("{v:.1}")
}

pub fn rps(v: f64) -> String {
    format!("{v:.0}")
}

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::StepUp => "step",
        Stage::Bisect => "bisect",
        Stage::Confirm => "confirm",
    }
}

/// "pass", or "fail: " and why.
fn verdict(failures: &[String]) -> String {
    if failures.is_empty() {
        "pass".to_string()
    } else {
        format!("fail: {}", failures.join("; "))
    }
}

/// One line per level for the progress display.
pub fn run_line(path: &str, r: &Run) -> String {
    let s = &r.stats;
    let verdict = verdict(&r.failures);
    format!(
        "{path}  c={:<4} {:<7} p99 {:>7} ms  err {:>6}  {:>7} req/s  {verdict}",
        s.concurrency,
        stage_name(r.stage),
        ms(s.quantile_ms(0.99)),
        pct(s.error_rate()),
        rps(s.rps()),
    )
}

impl ProbeReport {
    /// The report for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "sluice-prober probe {}  (errors <= {}, p99 <= {} ms; levels {}s + {}s warm-up)",
            self.target,
            pct(self.thresholds.error_rate),
            self.thresholds.p99_ms,
            self.timing.duration_s,
            self.timing.warmup_s
        );
        for e in &self.endpoints {
            out.push('\n');
            let _ = writeln!(out, "{} {}", e.method, e.path);
            if !e.runs.is_empty() {
                let rows: Vec<Vec<String>> = e
                    .runs
                    .iter()
                    .map(|r| {
                        vec![
                            r.level.concurrency.to_string(),
                            format!("{} {}", stage_name(r.stage), r.attempt),
                            r.level.requests.to_string(),
                            pct(r.level.error_rate),
                            ms(r.level.p50_ms),
                            ms(r.level.p95_ms),
                            ms(r.level.p99_ms),
                            rps(r.level.rps),
                            verdict(&r.failures),
                        ]
                    })
                    .collect();
                let t = table(
                    &[
                        "conc", "stage", "requests", "errors", "p50 ms", "p95 ms", "p99 ms",
                        "req/s", "verdict",
                    ],
                    &rows,
                    &[1, 8],
                );
                for l in t.lines() {
                    let _ = writeln!(out, "  {l}");
                }
            }
            let _ = writeln!(out, "  {}", endpoint_summary(e));
            if let Some(line) = advisory_line(e) {
                let _ = writeln!(out, "  {line}");
            }
            for change in &e.response_changes {
                let _ = writeln!(out, "  warning: {change}");
            }
            if !e.client_bound_levels.is_empty() {
                let _ = writeln!(
                    out,
                    "  warning: at concurrency {:?} the prober's own CPU was the limit ({} thread(s) busy); \
                     its figures there understate the target (try --threads)",
                    e.client_bound_levels, self.timing.threads
                );
            }
        }
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .endpoints
            .iter()
            .map(|e| {
                vec![
                    e.path.clone(),
                    or_dash(e.capacity),
                    or_dash(e.at_capacity.as_ref().map(|l| ms(l.p99_ms))),
                    or_dash(e.at_capacity.as_ref().map(|l| rps(l.rps))),
                    serde_plain(&e.outcome),
                    if e.written { "written" } else { "-" }.into(),
                    serde_plain(&e.redis),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "endpoint", "capacity", "p99 ms", "req/s", "outcome", "file", "redis",
            ],
            &rows,
            &[0, 4, 5, 6],
        ));
        match (&self.config, self.config_written) {
            (Some(c), true) => {
                let _ = writeln!(out, "capacities written to {c}");
            }
            (Some(c), false) => {
                let _ = writeln!(out, "{c} not changed");
            }
            _ => {}
        }
        for p in &self.problems {
            let _ = writeln!(out, "problem: {p}");
        }
        out
    }
}

/// An enum's JSON name (`kept_file`), for the tables.
pub fn serde_plain<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn endpoint_summary(e: &EndpointReport) -> String {
    match e.outcome {
        Outcome::Measured => {
            let mut s = format!("capacity {}", e.capacity.unwrap_or(0));
            if e.capped {
                s.push_str(" (the highest level tried; the real capacity may be higher: raise --max-concurrency)");
            }
            if let Some(l) = &e.at_capacity {
                let _ = write!(
                    s,
                    ": p99 {} ms, {} req/s, errors {} ({} requests)",
                    ms(l.p99_ms),
                    rps(l.rps),
                    pct(l.error_rate),
                    l.requests
                );
            }
            if e.unstable {
                s.push_str("; the boundary was unstable across re-runs");
            }
            s
        }
        Outcome::NoPassingLevel => format!(
            "no capacity: even 1 request at a time fails the thresholds{}",
            e.note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        ),
        _ => e.note.clone().unwrap_or_default(),
    }
}

fn advisory_line(e: &EndpointReport) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(k) = e.knee {
        parts.push(format!(
            "throughput knee {} ({} req/s)",
            k.concurrency,
            rps(k.rps)
        ));
    }
    if let Some(u) = &e.usl {
        let n_star = u
            .n_star
            .map(|n| format!("{n:.1}"))
            .unwrap_or_else(|| "none (no peak)".into());
        parts.push(format!(
            "USL sigma {:.4} kappa {:.6} N* {n_star} (r2 {:.3})",
            u.sigma, u.kappa, u.r_squared
        ));
    }
    (!parts.is_empty()).then(|| format!("advisory: {}", parts.join("; ")))
}

/// One line per level whose successful responses differ from those of the
/// lowest level that had any, in size or content type.
pub fn response_changes<'a>(
    levels: impl IntoIterator<Item = &'a LevelStats>,
    check: &crate::success::SuccessCheck,
) -> Vec<String> {
    let mut first: Option<&LevelStats> = None;
    let mut lines = Vec::new();
    for level in levels {
        let Some(reference) = first else {
            if level.shape.responses > 0 {
                first = Some(level);
            }
            continue;
        };
        if let Some(change) = level.shape.differs_from(&reference.shape) {
            lines.push(format!(
                "at concurrency {} the responses counted as successful ({}) differ from those at {}: {change}; \
                 if they are errors, say what success is with --expect-status, --expect-body-contains or --expect-json",
                level.concurrency,
                check.describe(),
                reference.concurrency
            ));
        }
    }
    lines
}

/// Prints a command's report: JSON for machines or the text for people on
/// stdout, then the problems met on stderr unless `--quiet`.
/// A table cell: the value, or "-" where there is none.
pub fn or_dash(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn emit(
    report: &impl Serialize,
    text: impl FnOnce() -> String,
    output: &crate::cli::OutputArgs,
    problems: &[String],
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if output.json {
        serde_json::to_writer_pretty(&mut out, report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", text())?;
    }
    if !output.quiet {
        for p in problems {
            eprintln!("sluice-prober: {p}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["name", "n"],
            &[
                vec!["a".into(), "10".into()],
                vec!["long".into(), "2".into()],
            ],
            &[0],
        );
        assert_eq!(t, "name   n\na     10\nlong   2\n");
    }
}
