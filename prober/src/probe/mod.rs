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
//!
//! `plan` decides what to look at, `findings` gathers a capacity per
//! endpoint (from the file, Redis or `measure`), this module runs the steps.

mod findings;
mod instances;
mod measure;
mod plan;

use crate::cli::ProbeArgs;
use crate::config_edit::Edit;
use crate::config_file::{self, ConfigFile};
use crate::config_write::{check_writable, write_capacities};
use crate::error::{exit_code_of, ProberError};
use crate::load::{self, RequestSpec};
use crate::redis_records::RedisRecords;
use crate::report::{self, ProbeReport, ThresholdsReport, TimingReport};
use crate::settings::{self, Settings};
use crate::target;
use findings::{probe_all, Findings};
use measure::warn_if_client_bound;
use plan::{new_file_top, plan};
use serde_json::Value;
use sluice_core::redis_keys::{check_service_name, Storage};

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
        (Some(url), false) => Some(connect_redis(url, &args.redis_conn, &service)?),
        _ => None,
    };
    if let (Some(path), false) = (&args.config, args.dry_run) {
        check_writable(path)?;
    }
    let check = std::sync::Arc::new(args.check.to_check()?);
    let instances = match args.each_instance {
        true => Some(instances::instance_list(args, file.as_ref())?),
        false => None,
    };
    let target = match (&instances, &args.url) {
        (None, Some(url)) => Some(target::connect_target(url)?),
        _ => None,
    };
    let requests: Vec<RequestSpec> = planned
        .iter()
        .map(|p| {
            target::request_spec(&p.spec).map(|mut r| {
                r.check = check.clone();
                r
            })
        })
        .collect::<Result<_, _>>()?;

    // 2. Measure. From here on a signal stops the load and reports.
    load::stop_on_signals();
    let mut found = match (&target, &instances) {
        (Some(target), _) => {
            probe_all(args, &settings, target, &planned, &requests, redis.as_mut())?
        }
        (None, Some(list)) => {
            instances::probe_each_instance(args, &settings, list, &planned, &requests)
        }
        (None, None) => unreachable!("a target or instances, checked above"),
    };

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
        target: match (&instances, &args.url) {
            (Some(list), _) => format!("each instance: {}", list.join(", ")),
            (None, url) => crate::redis_records::redact(url.as_deref().unwrap_or_default()),
        },
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

fn connect_redis(
    url: &str,
    conn: &crate::cli::RedisConnArgs,
    service: &str,
) -> Result<RedisRecords, ProberError> {
    check_service_name(service).map_err(|e| ProberError::Usage(e.to_string()))?;
    let target = crate::redis_target::RedisTarget::new(url, conn)?;
    RedisRecords::connect_to(&target, service)
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
        found.fail(exit_code_of(&e));
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
            Edit::SetInstanceCapacity { path, capacities } => {
                format!(
                    "endpoints.{path}.instance_capacity: {}",
                    serde_json::to_string(capacities).unwrap_or_default()
                )
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
