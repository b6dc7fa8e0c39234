//! Measuring one endpoint: real load, driven by the capacity search.

use super::plan::{edit_for, Planned};
use crate::config_edit::Edit;
use crate::load::{self, LevelStats, LevelTiming, RequestSpec, Target};
use crate::note::{measured_note, now_unix};
use crate::progress::Progress;
use crate::report::{self, EndpointReport, KneeReport, LevelReport, Outcome, RunReport};
use crate::scaling::{self, Point};
use crate::search::{self, Abort, LevelRunner, Stage};
use crate::settings::Settings;
use crate::success::SuccessCheck;
use sluice_core::capacity_record::{CapacityRecord, Source};
use std::time::Instant;

/// Generates real load for the search, reporting progress as it goes.
struct LoadRunner<'a> {
    target: &'a Target,
    request: &'a RequestSpec,
    timing: LevelTiming,
    threads: usize,
    progress: &'a Progress,
    path: &'a str,
    /// Every run judged so far, kept for the report of an interrupted search.
    runs: Vec<RunReport>,
}

impl LevelRunner for LoadRunner<'_> {
    fn run(&mut self, n: usize, stage: Stage, attempt: usize) -> Result<LevelStats, Abort> {
        self.progress.status(format!(
            "{}  concurrency {n}  ({}, run {attempt})",
            self.path,
            report::serde_plain(&stage)
        ));
        let stats = load::run_level(self.target, self.request, n, &self.timing, self.threads)
            .map_err(|e| Abort(format!("cannot start the load threads: {e}")))?;
        if load::interrupted() {
            return Err(Abort("interrupted".into()));
        }
        if stats.unreachable() {
            return Err(Abort(
                stats
                    .first_error
                    .clone()
                    .unwrap_or_else(|| "every connection attempt failed".into()),
            ));
        }
        Ok(stats)
    }

    fn judged(&mut self, run: &search::Run) {
        self.runs.push(RunReport::from(run));
        self.progress.line(report::run_line(self.path, run));
    }
}

/// What measuring one endpoint gave.
pub(super) enum Measured {
    Capacity {
        edit: Edit,
        record: CapacityRecord,
    },
    /// Not even one request at a time met the thresholds.
    NoPassingLevel,
    /// The target stopped answering; the reason names the endpoint.
    Unreachable(String),
    /// Ctrl-C or SIGTERM while measuring; the runs so far are in the report.
    Interrupted,
}

/// Searches for the endpoint's capacity under real load; fills `rep` with
/// what the search saw.
pub(super) fn measure(
    p: &Planned,
    request: &RequestSpec,
    target: &Target,
    settings: &Settings,
    progress: &Progress,
    rep: &mut EndpointReport,
) -> Measured {
    let path = &p.spec.path;
    let started = Instant::now();
    let mut runner = LoadRunner {
        target,
        request,
        timing: settings.timing,
        threads: settings.threads,
        progress,
        path,
        runs: Vec::new(),
    };
    let result = search::find_capacity(&mut runner, settings.thresholds, settings.max_concurrency);
    rep.elapsed_s = report::round(started.elapsed().as_secs_f64(), 2);
    let result = match result {
        Ok(r) => r,
        Err(Abort(_)) if load::interrupted() => {
            rep.note = Some(format!(
                "interrupted after {} runs; not written",
                runner.runs.len()
            ));
            rep.runs = std::mem::take(&mut runner.runs);
            return Measured::Interrupted;
        }
        Err(Abort(reason)) => {
            let reason = format!("the target stopped answering while probing {path}: {reason}");
            rep.note = Some(reason.clone());
            return Measured::Unreachable(reason);
        }
    };
    fill_search(rep, &result, &request.check);
    let (Some(c), Some(at)) = (result.capacity, result.at_capacity()) else {
        rep.outcome = Outcome::NoPassingLevel;
        if let Some(first) = result.runs.first() {
            rep.note = Some(first.failures.join("; "));
        }
        return Measured::NoPassingLevel;
    };
    let c = c as u32;
    rep.outcome = Outcome::Measured;
    rep.capacity = Some(c);
    rep.source = Some(Source::Probe);
    let at_unix = now_unix();
    let record = CapacityRecord {
        capacity: c,
        p99_ms: Some(report::round(at.quantile_ms(0.99), 3)),
        rps: Some(report::round(at.rps(), 1)),
        error_rate: Some(at.error_rate()),
        measured_at: at_unix,
        source: Source::Probe,
    };
    let note = measured_note(at.quantile_ms(0.99), at.rps(), at_unix);
    Measured::Capacity {
        edit: edit_for(p, c, note),
        record,
    }
}

pub(super) fn warn_if_client_bound(reports: &[EndpointReport], quiet: bool) {
    let client_bound: Vec<String> = reports
        .iter()
        .filter(|r| !r.client_bound_levels.is_empty())
        .map(|r| format!("{} at {:?}", r.path, r.client_bound_levels))
        .collect();
    if !client_bound.is_empty() && !quiet {
        eprintln!(
            "warning: the prober's own CPU was the limit for {}; figures there understate the target",
            client_bound.join(", ")
        );
    }
}

fn fill_search(rep: &mut EndpointReport, result: &search::SearchResult, check: &SuccessCheck) {
    rep.response_changes = report::response_changes(result.levels.values(), check);
    rep.capped = result.capped;
    rep.unstable = result.unstable;
    rep.runs = result.runs.iter().map(RunReport::from).collect();
    rep.at_capacity = result.at_capacity().map(LevelReport::from);
    let mut bound: Vec<usize> = result
        .runs
        .iter()
        .filter(|r| r.stats.client_bound())
        .map(|r| r.stats.concurrency)
        .collect();
    bound.sort_unstable();
    bound.dedup();
    rep.client_bound_levels = bound;
    let points: Vec<Point> = result
        .levels
        .values()
        .filter(|s| s.requests > 0)
        .map(LevelStats::point)
        .collect();
    rep.knee = scaling::knee(&points).map(|p| KneeReport {
        concurrency: p.concurrency as usize,
        rps: report::round(p.rps, 1),
    });
    rep.usl = scaling::fit_usl(&points).map(|mut u| {
        u.lambda = report::round(u.lambda, 3);
        u.sigma = report::round(u.sigma, 6);
        u.kappa = report::round(u.kappa, 8);
        u.n_star = u.n_star.map(|n| report::round(n, 2));
        u.peak_rps = u.peak_rps.map(|n| report::round(n, 1));
        u.r_squared = report::round(u.r_squared, 4);
        u
    });
}
