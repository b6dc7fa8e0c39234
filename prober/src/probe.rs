//! `sluice-prober probe`: find each endpoint's capacity, write it into the
//! config file, push it to Redis.
//!
//! Order of work, so a failure costs as little as possible:
//! 1. check everything that needs no load (file, flags, URL, Redis): a
//!    mistake here stops the run before anything is measured;
//! 2. measure every endpoint that needs it;
//! 3. write the file once (atomic replace) with every capacity found;
//! 4. push to Redis. A push that fails leaves the file written; re-running
//!    `sluice-prober push` (or the same probe, which now finds the
//!    capacities in the file) pushes them without measuring again.

use crate::cli::ProbeArgs;
use crate::config_edit::{self, Edit};
use crate::config_file::{self, ConfigFile, EndpointSpec, MEASURED_MARK};
use crate::load::{self, LevelStats, LevelTiming, RequestSpec, Target};
use crate::progress::Progress;
use crate::redis_records::RedisRecords;
use crate::report::{
    self, EndpointReport, KneeReport, LevelReport, Outcome, ProbeReport, RedisOutcome, RunReport,
    ThresholdsReport, TimingReport,
};
use crate::scaling::{self, Point};
use crate::search::{self, Abort, LevelRunner, Stage};
use crate::settings::{self, Settings};
use crate::{exit, target, ProberError};
use anyhow::Context;
use serde_json::{Map, Value};
use sluice_core::capacity_record::{CapacityRecord, Source};
use sluice_core::redis_keys::{check_service_name, Storage};
use std::io::Write as _;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// One endpoint to look at, and whether the file already holds it.
struct Planned {
    spec: EndpointSpec,
    in_file: bool,
}

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

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The comment written on a measured `capacity:` line.
pub fn measured_note(p99_ms: f64, rps: f64, at: u64) -> String {
    let when = humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(at));
    format!("{MEASURED_MARK} p99 {p99_ms:.1} ms at {rps:.0} req/s, {when}")
}

/// Reads back what [`measured_note`] wrote: p99, rps, time.
pub fn parse_note(note: &str) -> (Option<f64>, Option<f64>, Option<u64>) {
    let rest = note.strip_prefix(MEASURED_MARK).unwrap_or(note);
    let words: Vec<&str> = rest.split_whitespace().collect();
    let after = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.trim_end_matches(',').parse::<f64>().ok())
    };
    let when = words
        .last()
        .and_then(|w| humantime::parse_rfc3339(w).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    (after("p99"), after("at"), when)
}

/// The Redis record for a capacity found in the file.
pub fn record_from_file(spec: &EndpointSpec) -> Option<CapacityRecord> {
    let capacity = spec.capacity?;
    if spec.capacity_was_measured() {
        let (p99, rps, when) = parse_note(spec.capacity_note.as_deref().unwrap_or(""));
        Some(CapacityRecord {
            capacity,
            p99_ms: p99,
            rps,
            error_rate: None,
            measured_at: when.unwrap_or_else(now_unix),
            source: Source::Probe,
        })
    } else {
        Some(CapacityRecord {
            capacity,
            p99_ms: None,
            rps: None,
            error_rate: None,
            measured_at: now_unix(),
            source: Source::Manual,
        })
    }
}

fn plan(args: &ProbeArgs, file: Option<&ConfigFile>) -> Result<Vec<Planned>, ProberError> {
    let flags_given = args.request.method.is_some()
        || !args.request.headers.is_empty()
        || args.request.body.is_some();
    if args.endpoints.is_empty() {
        let Some(file) = file else {
            return Err(ProberError::Usage(
                "nothing to probe: pass --config FILE or --endpoint PATH".into(),
            ));
        };
        if flags_given {
            return Err(ProberError::Usage(
                "--method, --header and --body describe endpoints given with --endpoint".into(),
            ));
        }
        if file.endpoints.is_empty() {
            return Err(ProberError::Usage(format!(
                "{}: no endpoints to probe (add them under `endpoints:` or pass --endpoint)",
                file.path.display()
            )));
        }
        return Ok(file
            .endpoints
            .iter()
            .map(|e| Planned {
                spec: e.clone(),
                in_file: true,
            })
            .collect());
    }
    let mut out: Vec<Planned> = Vec::new();
    for path in &args.endpoints {
        target::check_path(path)?;
        if out.iter().any(|p| &p.spec.path == path) {
            continue;
        }
        match file.and_then(|f| f.endpoint(path)) {
            Some(spec) => {
                if flags_given {
                    return Err(ProberError::Usage(format!(
                        "endpoint {path} is already in {}: change its method, headers and body there, \
                         not with --method/--header/--body",
                        file.map(|f| f.path.display().to_string()).unwrap_or_default()
                    )));
                }
                out.push(Planned {
                    spec: spec.clone(),
                    in_file: true,
                });
            }
            None => out.push(Planned {
                spec: target::spec_from_flags(
                    path,
                    args.request.method.as_deref(),
                    &args.request.headers,
                    args.request.body.as_deref(),
                )?,
                in_file: false,
            }),
        }
    }
    Ok(out)
}

/// Settings of a new endpoint as they go into the file.
fn new_endpoint_settings(spec: &EndpointSpec, capacity: u32) -> Map<String, Value> {
    let mut m = Map::new();
    if spec.method != "GET" {
        m.insert("method".into(), Value::String(spec.method.clone()));
    }
    if !spec.headers.is_empty() {
        let h: Map<String, Value> = spec
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        m.insert("headers".into(), Value::Object(h));
    }
    if let Some(b) = &spec.body {
        m.insert("body".into(), b.clone());
    }
    m.insert("capacity".into(), Value::from(capacity));
    m
}

pub fn run(args: &ProbeArgs) -> anyhow::Result<u8> {
    // 1. Everything that needs no load.
    let file = load_config(args)?;
    let planned = plan(args, file.as_ref())?;
    let settings = settings::resolve(
        &args.level,
        args.error_threshold,
        args.latency_threshold_ms,
        args.max_concurrency,
        file.as_ref().map(|f| &f.settings),
    )?;
    let service = service_name(args, file.as_ref())?;
    let redis_url = redis_url(args, file.as_ref());
    let mut redis = match (&redis_url, args.dry_run) {
        (Some(url), false) => Some(connect_redis(url, &service)?),
        _ => None,
    };
    if let (Some(path), false) = (&args.config, args.dry_run) {
        check_writable(path)?;
    }
    let target = target::connect_target(&args.url)?;
    let requests: Vec<RequestSpec> = planned
        .iter()
        .map(|p| target::request_spec(&p.spec))
        .collect::<Result<_, _>>()?;

    // 2. Measure. From here on a signal stops the load and reports.
    load::stop_on_signals();
    let mut found = probe_all(
        args,
        &settings,
        &target,
        &planned,
        &requests,
        redis.as_mut(),
    )?;

    if found.interrupted {
        found.settle_interrupt(args.write_partial, planned.len());
    }

    // 3. Write the file. A failure here must not cost the measurements: they
    // are reported below, with what to set by hand.
    let config_written = !args.dry_run && write_file(args, &settings, &service, &mut found);

    // 4. Push.
    found.mark_redis(redis_url.is_some(), args.dry_run);
    if let Some(store) = redis.as_mut() {
        found.push_all(store, config_written);
    }

    warn_if_client_bound(&found.reports, args.output.quiet);
    let report = ProbeReport {
        command: "probe",
        version: env!("CARGO_PKG_VERSION"),
        target: crate::redis_records::redact(&args.url),
        config: args.config.as_ref().map(|p| p.display().to_string()),
        service,
        thresholds: ThresholdsReport {
            error_rate: settings.thresholds.error_rate,
            p99_ms: settings.thresholds.p99_ms,
        },
        timing: TimingReport::from(&settings),
        max_concurrency: settings.max_concurrency,
        endpoints: found.reports,
        config_written,
        redis_url: redis.as_ref().map(|r| r.url().to_string()),
        problems: found.problems.clone(),
        exit_code: found.exit_code,
    };
    report::emit(&report, || report.to_text(), &args.output, &found.problems)?;
    Ok(found.exit_code)
}

/// The config file, if `--config` names one that exists; its warnings go to
/// stderr. A missing file is fine when `--endpoint` says what to create.
fn load_config(args: &ProbeArgs) -> anyhow::Result<Option<ConfigFile>> {
    let file = match &args.config {
        Some(p) if p.exists() => config_file::load(p)?,
        Some(p) if args.endpoints.is_empty() => {
            return Err(ProberError::Usage(format!(
                "{} does not exist; pass --endpoint PATH (with --method, --header, --body) to create it",
                p.display()
            ))
            .into())
        }
        _ => return Ok(None),
    };
    if !args.output.quiet {
        for w in file.warnings() {
            eprintln!("{w}");
        }
    }
    Ok(Some(file))
}

/// The namespace of the capacities: the file's `service`, which `--service`
/// may repeat but not contradict.
fn service_name(args: &ProbeArgs, file: Option<&ConfigFile>) -> Result<String, ProberError> {
    let service = match (&args.service, file) {
        (Some(s), Some(f)) if f.doc.get("service").is_some() && *s != f.config.service => {
            return Err(ProberError::Usage(format!(
                "--service {s} differs from {}'s service {:?}; the file's name is the namespace",
                f.path.display(),
                f.config.service
            )))
        }
        (Some(s), _) => s.clone(),
        (None, Some(f)) => f.config.service.clone(),
        (None, None) => sluice_core::config::DEFAULT_SERVICE.to_string(),
    };
    if service.is_empty() {
        return Err(ProberError::Usage("--service must not be empty".into()));
    }
    Ok(service)
}

/// `--redis`, else the file's `storage:` when it is Redis.
fn redis_url(args: &ProbeArgs, file: Option<&ConfigFile>) -> Option<String> {
    match (&args.redis, file.and_then(|f| f.storage.as_ref())) {
        (Some(u), _) => Some(u.clone()),
        (None, Some(Storage::Redis { url })) => Some(url.clone()),
        _ => None,
    }
}

fn connect_redis(url: &str, service: &str) -> Result<RedisRecords, ProberError> {
    check_service_name(service).map_err(|e| ProberError::Usage(e.to_string()))?;
    RedisRecords::connect(url, service)
}

/// Writes the capacities found into `--config`, if there is one and there
/// is something to write; says whether it did. A failure becomes a problem
/// of the run that lists the capacities to set by hand.
fn write_file(args: &ProbeArgs, settings: &Settings, service: &str, found: &mut Findings) -> bool {
    let Some(path) = &args.config else {
        return false;
    };
    if found.edits.is_empty() {
        return false;
    }
    if let Err(e) = write_capacities(path, &found.edits, &new_file_top(args, settings, service)) {
        found.problems.push(format!(
            "{e:#}. {} is unchanged; set by hand: {}",
            path.display(),
            by_hand(&found.edits)
        ));
        found.fail(crate::exit_code_of(&e));
        return false;
    }
    for r in found.reports.iter_mut() {
        if found.edits.iter().any(|e| e.path() == r.path) {
            r.written = true;
        }
    }
    true
}

/// The capacities of `edits` as a person would set them in the file.
fn by_hand(edits: &[Edit]) -> String {
    edits
        .iter()
        .map(|e| match e {
            Edit::SetCapacity { path, capacity, .. } => {
                format!("endpoints.{path}.capacity: {capacity}")
            }
            Edit::AddEndpoint { path, settings, .. } => {
                format!("endpoints.{path}: {}", Value::Object(settings.clone()))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks, before any load, that `path` can be replaced: it is not
/// read-only, and its directory takes the new file (the replace is a rename
/// from there). Root ignores permission bits, so the mode is checked too.
pub fn check_writable(path: &Path) -> Result<(), ProberError> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Ok(meta) = std::fs::metadata(&real) {
        if meta.mode() & 0o222 == 0 {
            return Err(ProberError::Usage(format!(
                "{shown} is read-only (mode {:o}): the prober would replace it; make it writable \
                 (chmod u+w) or pass --dry-run",
                meta.mode() & 0o7777
            )));
        }
        if !access_writable(&real) {
            return Err(ProberError::Usage(format!(
                "{shown}: permission denied (owned by uid {}); nothing was measured",
                meta.uid()
            )));
        }
        let euid = unsafe { libc::geteuid() };
        if euid != 0 && meta.uid() != euid {
            return Err(ProberError::Usage(format!(
                "{shown} is owned by uid {}: replacing it would make it yours (uid {euid}); \
                 run as its owner or as root",
                meta.uid()
            )));
        }
    }
    let dir = parent_dir(&real);
    if !dir.is_dir() {
        return Err(ProberError::Usage(format!(
            "{shown}: directory {} does not exist",
            dir.display()
        )));
    }
    if !access_writable(&dir) {
        return Err(ProberError::Usage(format!(
            "{shown}: cannot write in {} (permission denied), and the file is replaced by a new \
             one from there; nothing was measured",
            dir.display()
        )));
    }
    Ok(())
}

fn access_writable(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

fn parent_dir(p: &Path) -> std::path::PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

/// What the run found, endpoint by endpoint, and what it owes the file and
/// Redis.
struct Findings {
    /// One per planned endpoint, in order.
    reports: Vec<EndpointReport>,
    /// Capacities to write into the file.
    edits: Vec<Edit>,
    /// Records to push, with the index of their endpoint in `reports`.
    to_push: Vec<(usize, CapacityRecord)>,
    problems: Vec<String>,
    exit_code: u8,
    interrupted: bool,
}

impl Findings {
    /// After Ctrl-C or SIGTERM: nothing is written or pushed unless the
    /// finished endpoints are asked for.
    fn settle_interrupt(&mut self, write_partial: bool, planned: usize) {
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
    fn fail(&mut self, code: u8) {
        if self.exit_code == exit::OK {
            self.exit_code = code;
        }
    }

    /// Says, for endpoints nothing will be pushed for, why not.
    fn mark_redis(&mut self, redis_configured: bool, dry_run: bool) {
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
    fn push_all(&mut self, store: &mut RedisRecords, config_written: bool) {
        let failed = self.to_push.iter().find_map(|(idx, record)| {
            let rep = &mut self.reports[*idx];
            match push_one(store, rep, record) {
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
) -> Result<RedisOutcome, ProberError> {
    if rep.outcome == Outcome::KeptFile && store.get(&rep.path)?.is_some() {
        return Ok(RedisOutcome::Exists);
    }
    store.put(&rep.path, record)?;
    Ok(RedisOutcome::Pushed)
}

/// Finds a capacity for every planned endpoint: from the file, from Redis,
/// or by measuring. Once the target stops answering, the rest are skipped.
fn probe_all(
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
            found.to_push.push((idx, record));
        } else if let Some(edit) = reused_from_redis(args, p, redis.as_deref_mut(), &mut rep)? {
            found.edits.push(edit);
        } else {
            match measure(p, request, target, settings, &progress, &mut rep) {
                Measured::Capacity { edit, record } => {
                    found.edits.push(edit);
                    found.to_push.push((idx, record));
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
    let note = format!(
        "{MEASURED_MARK} from Redis ({}), {}",
        record.source.as_str(),
        humantime::format_rfc3339_seconds(
            UNIX_EPOCH + std::time::Duration::from_secs(record.measured_at)
        )
    );
    Ok(Some(edit_for(p, record.capacity, note)))
}

/// What measuring one endpoint gave.
enum Measured {
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
fn measure(
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
    fill_search(rep, &result);
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

fn warn_if_client_bound(reports: &[EndpointReport], quiet: bool) {
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

fn edit_for(p: &Planned, capacity: u32, note: String) -> Edit {
    if p.in_file {
        Edit::SetCapacity {
            path: p.spec.path.clone(),
            capacity,
            note,
        }
    } else {
        Edit::AddEndpoint {
            path: p.spec.path.clone(),
            settings: new_endpoint_settings(&p.spec, capacity),
            note,
        }
    }
}

/// Top-level keys of a config created from flags: what was given on the
/// command line and would be needed to repeat the probe.
fn new_file_top(args: &ProbeArgs, settings: &Settings, service: &str) -> Map<String, Value> {
    let mut top = Map::new();
    if args.service.is_some() {
        top.insert("service".into(), Value::from(service));
    }
    if args.error_threshold.is_some() {
        top.insert(
            "error_threshold".into(),
            Value::from(settings.thresholds.error_rate),
        );
    }
    if args.latency_threshold_ms.is_some() {
        top.insert(
            "latency_threshold_ms".into(),
            number(settings.thresholds.p99_ms),
        );
    }
    top
}

fn number(v: f64) -> Value {
    if v.fract() == 0.0 && (0.0..1e15).contains(&v) {
        Value::from(v as u64)
    } else {
        Value::from(v)
    }
}

fn fill_search(rep: &mut EndpointReport, result: &search::SearchResult) {
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

/// Applies the edits to the file as it is now (re-read, in case someone
/// edited it while we measured) and replaces it atomically; or creates it.
pub fn write_capacities(
    path: &Path,
    edits: &[Edit],
    top: &Map<String, Value>,
) -> anyhow::Result<()> {
    let shown = path.display();
    let text = if path.exists() {
        let current = std::fs::read_to_string(path).with_context(|| format!("reading {shown}"))?;
        // It must still be a valid config: never write over a file that broke meanwhile.
        config_file::parse_text(&shown.to_string(), &current)?;
        config_edit::apply(&current, edits).map_err(|e| {
            anyhow::anyhow!("could not write the capacities into {shown} safely: {e}")
        })?
    } else {
        config_edit::new_document(top, edits)
            .map_err(|e| anyhow::anyhow!("could not create {shown}: {e}"))?
    };
    // Checked again: it may have changed while we measured. Not a usage
    // error any more, since the load has run.
    check_writable(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    replace_file(path, &text).with_context(|| format!("writing {shown}"))
}

/// Writes `text` to `path` by renaming a temporary file from the same
/// directory over it, keeping the old file's permissions and owner: readers
/// see the old file or the new one, never half of one.
pub fn replace_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Through a symlink, replace the file it points to, not the link.
    let real = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) => path.to_path_buf(),
    };
    let dir = parent_dir(&real);
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sluice.yaml".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    let old = std::fs::metadata(&real).ok();
    if let Some(m) = &old {
        use std::os::unix::fs::MetadataExt;
        let new = tmp.as_file().metadata()?;
        if (new.uid(), new.gid()) != (m.uid(), m.gid()) {
            // Only root can give a file away; anyone else was stopped by
            // check_writable, so a failure here is a real one.
            std::os::unix::fs::fchown(tmp.as_file(), Some(m.uid()), Some(m.gid()))?;
        }
    }
    let perms = match &old {
        Some(m) => m.permissions(),
        None => std::fs::Permissions::from_mode(0o644),
    };
    std::fs::set_permissions(tmp.path(), perms)?;
    tmp.persist(&real).map_err(|e| e.error)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_read_back() {
        let note = measured_note(21.34, 1790.4, 1_700_000_000);
        assert_eq!(
            note,
            "sluice-prober: p99 21.3 ms at 1790 req/s, 2023-11-14T22:13:20Z"
        );
        assert_eq!(
            parse_note(&note),
            (Some(21.3), Some(1790.0), Some(1_700_000_000))
        );
    }

    #[test]
    fn file_capacities_become_records() {
        let mut spec = EndpointSpec::new("/a");
        spec.capacity = Some(10);
        assert_eq!(record_from_file(&spec).unwrap().source, Source::Manual);
        spec.capacity_note = Some(measured_note(20.0, 100.0, 1_700_000_000));
        let r = record_from_file(&spec).unwrap();
        assert_eq!(r.source, Source::Probe);
        assert_eq!(r.p99_ms, Some(20.0));
        assert_eq!(r.measured_at, 1_700_000_000);
    }

    #[test]
    fn replace_keeps_permissions_and_follows_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.yaml");
        std::fs::write(&real, "a: 1\n").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("sluice.yaml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        replace_file(&link, "a: 2\n").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "a: 2\n");
        let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn replace_keeps_the_owner() {
        use std::os::unix::fs::MetadataExt;
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can make a file someone else's
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sluice.yaml");
        std::fs::write(&p, "a: 1\n").unwrap();
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        replace_file(&p, "a: 2\n").unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a: 2\n");
    }

    #[test]
    fn read_only_files_and_missing_directories_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sluice.yaml");
        std::fs::write(&p, "a: 1\n").unwrap();
        assert!(check_writable(&p).is_ok());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = check_writable(&p).unwrap_err();
        assert!(e.to_string().contains("is read-only (mode 444)"), "{e}");
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        let e = check_writable(&dir.path().join("no/such.yaml")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
