//! A capacity for every planned endpoint, from the file, from Redis or by
//! measuring, and what the run then owes the file and Redis.

use super::measure::{measure, Measured};
use super::plan::{edit_for, Planned};
use crate::cli::ProbeArgs;
use crate::config_edit::Edit;
use crate::error::{exit, ProberError};
use crate::load::{self, RequestSpec, Target};
use crate::note::{from_redis_note, record_from_file};
use crate::progress::Progress;
use crate::redis_records::RedisRecords;
use crate::report::{self, EndpointReport, Outcome, RedisOutcome};
use crate::settings::Settings;
use sluice_core::capacity_record::{CapacityRecord, InstanceCapacities};

/// What the run found, endpoint by endpoint, and what it owes the file and
/// Redis.
pub(super) struct Findings {
    /// One per planned endpoint, in order.
    pub(super) reports: Vec<EndpointReport>,
    /// Capacities to write into the file.
    pub(super) edits: Vec<Edit>,
    /// Records to push, with the index of their endpoint in `reports` and
    /// the per-instance capacities that go in the same record.
    pub(super) to_push: Vec<(usize, CapacityRecord, InstanceCapacities)>,
    pub(super) problems: Vec<String>,
    pub(super) exit_code: u8,
    pub(super) interrupted: bool,
}

impl Findings {
    /// After Ctrl-C or SIGTERM: nothing is written or pushed unless the
    /// finished endpoints are asked for.
    pub(super) fn settle_interrupt(&mut self, write_partial: bool, planned: usize) {
        let finished = self
            .reports
            .iter()
            .filter(|r| r.outcome != Outcome::NotProbed)
            .count();
        let what = if write_partial {
            "writing those (--write-partial)"
        } else {
            self.edits.clear();
            self.to_push.clear();
            "nothing written (--write-partial writes them)"
        };
        self.problems.push(format!(
            "interrupted: {finished} of {planned} endpoints finished; {what}"
        ));
        self.exit_code = exit::INTERRUPTED;
    }

    /// Records a failure's exit code, unless an earlier failure set one.
    pub(super) fn fail(&mut self, code: u8) {
        if self.exit_code == exit::OK {
            self.exit_code = code;
        }
    }

    /// Says, for endpoints nothing will be pushed for, why not.
    pub(super) fn mark_redis(&mut self, redis_configured: bool, dry_run: bool) {
        for r in self.reports.iter_mut() {
            r.redis = match (redis_configured, dry_run) {
                (false, _) => RedisOutcome::Off,
                (true, true) => RedisOutcome::Skipped,
                _ => r.redis,
            };
        }
    }

    /// Pushes every record; stops at the first failure, which is a problem
    /// of the run.
    pub(super) fn push_all(&mut self, store: &mut RedisRecords, config_written: bool) {
        let failed = self.to_push.iter().find_map(|(idx, record, instances)| {
            let rep = &mut self.reports[*idx];
            match push_one(store, rep, record, instances) {
                Ok(outcome) => {
                    rep.redis = outcome;
                    None
                }
                Err(e) => {
                    rep.redis = RedisOutcome::Failed;
                    Some(e)
                }
            }
        });
        if let Some(e) = failed {
            let written = if config_written {
                "the capacities are in the file: "
            } else {
                ""
            };
            self.problems.push(format!(
                "{e}; {written}run `sluice-prober push --config FILE` to push them later"
            ));
            self.fail(exit::STORAGE);
        }
    }
}

/// Pushes one record. A capacity kept from the file is not pushed over one
/// that Redis already holds.
fn push_one(
    store: &mut RedisRecords,
    rep: &EndpointReport,
    record: &CapacityRecord,
    instances: &InstanceCapacities,
) -> Result<RedisOutcome, ProberError> {
    if rep.outcome == Outcome::KeptFile && store.get(&rep.path)?.is_some() {
        return Ok(RedisOutcome::Exists);
    }
    store.put_with_instances(&rep.path, record, instances)?;
    Ok(RedisOutcome::Pushed)
}

/// Finds a capacity for every planned endpoint: from the file, from Redis,
/// or by measuring. Once the target stops answering, the rest are skipped.
pub(super) fn probe_all(
    args: &ProbeArgs,
    settings: &Settings,
    target: &Target,
    planned: &[Planned],
    requests: &[RequestSpec],
    mut redis: Option<&mut RedisRecords>,
) -> anyhow::Result<Findings> {
    let progress = Progress::new(args.output.quiet);
    let mut found = Findings {
        reports: Vec::new(),
        edits: Vec::new(),
        to_push: Vec::new(),
        problems: Vec::new(),
        exit_code: exit::OK,
        interrupted: false,
    };
    let mut aborted: Option<String> = None;
    for (p, request) in planned.iter().zip(requests) {
        let idx = found.reports.len();
        let mut rep = EndpointReport::new(&p.spec.path, &p.spec.method, Outcome::NotProbed);
        if load::interrupted() && aborted.is_none() {
            aborted = Some("interrupted".into());
            found.interrupted = true;
        }
        if let Some(reason) = &aborted {
            rep.note = Some(format!("not probed: {reason}"));
        } else if let Some(record) = kept_from_file(args, p, &mut rep) {
            found
                .to_push
                .push((idx, record, p.spec.instance_capacity.clone()));
        } else if let Some(edit) = reused_from_redis(args, p, redis.as_deref_mut(), &mut rep)? {
            found.edits.push(edit);
        } else {
            match measure(p, request, target, settings, &progress, &mut rep) {
                Measured::Capacity { edit, record } => {
                    found.edits.push(edit);
                    // The file's per-instance figures stay in the record.
                    found
                        .to_push
                        .push((idx, record, p.spec.instance_capacity.clone()));
                }
                Measured::NoPassingLevel => {
                    found.problems.push(format!(
                        "{}: no concurrency level met the thresholds (errors <= {}, p99 <= {} ms)",
                        p.spec.path,
                        report::pct(settings.thresholds.error_rate),
                        settings.thresholds.p99_ms
                    ));
                    found.fail(exit::NO_PASSING_LEVEL);
                }
                Measured::Interrupted => {
                    aborted = Some("interrupted".into());
                    found.interrupted = true;
                }
                Measured::Unreachable(reason) => {
                    found.problems.push(reason.clone());
                    aborted = Some(reason);
                    found.exit_code = exit::UNREACHABLE;
                }
            }
        }
        found.reports.push(rep);
    }
    progress.finish();
    Ok(found)
}

/// The file's capacity, kept unless `--force`: the record to push.
fn kept_from_file(
    args: &ProbeArgs,
    p: &Planned,
    rep: &mut EndpointReport,
) -> Option<CapacityRecord> {
    if args.force {
        return None;
    }
    let c = p.spec.capacity?;
    let record = record_from_file(&p.spec)?;
    rep.outcome = Outcome::KeptFile;
    rep.capacity = Some(c);
    rep.source = Some(record.source);
    rep.note = Some(format!(
        "capacity {c} kept from the file ({}); --force probes it again",
        record.source.as_str()
    ));
    Some(record)
}

/// A capacity Redis already holds, reused unless `--force`: the edit that
/// writes it into the file.
fn reused_from_redis(
    args: &ProbeArgs,
    p: &Planned,
    redis: Option<&mut RedisRecords>,
    rep: &mut EndpointReport,
) -> Result<Option<Edit>, ProberError> {
    let Some(store) = redis.filter(|_| !args.force) else {
        return Ok(None);
    };
    let Some(record) = store.get(&p.spec.path)? else {
        return Ok(None);
    };
    rep.outcome = Outcome::ReusedRedis;
    rep.capacity = Some(record.capacity);
    rep.source = Some(record.source);
    rep.redis = RedisOutcome::Exists;
    rep.note = Some(format!(
        "capacity {} reused from Redis ({}); --force probes it again",
        record.capacity,
        record.source.as_str()
    ));
    Ok(Some(edit_for(p, record.capacity, from_redis_note(&record))))
}
