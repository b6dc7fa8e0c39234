//! `--each-instance`: every instance of the set measured one by one, at
//! `http://ADDR/PATH`, so instances on unequal hardware each get their own
//! figure (`endpoints.PATH.instance_capacity`, and `instance_capacity:ADDR`
//! fields in Redis). A URL behind a load balancer would measure the set.

use super::findings::Findings;
use super::measure::{measure, Measured};
use super::plan::{edit_for, Planned};
use crate::cli::ProbeArgs;
use crate::config_edit::Edit;
use crate::config_file::ConfigFile;
use crate::error::{exit, ProberError};
use crate::load::{self, RequestSpec};
use crate::note::{measured_note, now_unix, record_from_file};
use crate::progress::Progress;
use crate::report::{EndpointReport, InstanceReport, Outcome};
use crate::settings::Settings;
use crate::target;
use sluice_core::capacity_record::{CapacityRecord, Source};
use sluice_core::config::instances::InstanceSet;
use std::net::SocketAddr;

/// The instances to measure: `--instances`, else `instances.hosts` of the
/// file. The file must have `instances:`, and with static hosts each one
/// measured must be among them: else the figures written would make the
/// file invalid.
pub(super) fn instance_list(
    args: &ProbeArgs,
    file: Option<&ConfigFile>,
) -> Result<Vec<String>, ProberError> {
    let usage = |m: String| ProberError::Usage(m);
    let Some(file) = file else {
        return Err(usage(
            "--each-instance needs an existing --config FILE with instances: (hosts or dns)".into(),
        ));
    };
    let Some(instances) = &file.config.instances else {
        return Err(usage(format!(
            "--each-instance: {} has no instances:; add instances: {{hosts: [ip:port, ...]}} \
             (the figures are per instance of that set)",
            file.path.display()
        )));
    };
    let mut list: Vec<SocketAddr> = Vec::new();
    if args.instances.is_empty() {
        match &instances.set {
            InstanceSet::Static(hosts) => list.extend(hosts),
            InstanceSet::Dns { .. } => {
                return Err(usage(
                    "--each-instance: the file's instances come from DNS; name the ones to \
                     measure with --instances ip:port,ip:port"
                        .into(),
                ))
            }
            InstanceSet::Kubernetes(service) => {
                return Err(usage(format!(
                    "--each-instance: the file's instances come from the Kubernetes Service \
                     {service}; name the ones to measure with --instances ip:port,ip:port"
                )))
            }
        }
    }
    for text in &args.instances {
        let a: SocketAddr = text.trim().parse().map_err(|_| {
            usage(format!(
                "--instances: {text:?} is not ip:port or [ipv6]:port"
            ))
        })?;
        if let InstanceSet::Static(hosts) = &instances.set {
            if !hosts.contains(&a) {
                return Err(usage(format!(
                    "--instances: {a} is not one of instances.hosts of {}",
                    file.path.display()
                )));
            }
        }
        if !list.contains(&a) {
            list.push(a);
        }
    }
    if list.is_empty() {
        return Err(usage("--each-instance: no instance to measure".into()));
    }
    Ok(list.iter().map(|a| a.to_string()).collect())
}

/// Measures every planned endpoint on every instance, in turn.
pub(super) fn probe_each_instance(
    args: &ProbeArgs,
    settings: &Settings,
    list: &[String],
    planned: &[Planned],
    requests: &[RequestSpec],
) -> Findings {
    let progress = Progress::new(args.output.quiet);
    let mut found = Findings {
        reports: Vec::new(),
        edits: Vec::new(),
        to_push: Vec::new(),
        problems: Vec::new(),
        exit_code: exit::OK,
        interrupted: false,
    };
    for (p, request) in planned.iter().zip(requests) {
        let idx = found.reports.len();
        let path = &p.spec.path;
        let mut rep = EndpointReport::new(path, &p.spec.method, Outcome::NotProbed);
        let mut figures = p.spec.instance_capacity.clone();
        let mut lowest: Option<CapacityRecord> = None;
        for address in list {
            if load::interrupted() {
                found.interrupted = true;
                break;
            }
            let mut one = EndpointReport::new(path, &p.spec.method, Outcome::NotProbed);
            let url = format!("http://{address}");
            match target::connect_target(&url) {
                Err(e) => {
                    found.problems.push(format!("{path} on {address}: {e}"));
                    found.fail(exit::UNREACHABLE);
                    one.note = Some(e.to_string());
                }
                Ok(t) => match measure(p, request, &t, settings, &progress, &mut one) {
                    Measured::Capacity { record, .. } => {
                        figures.insert(address.clone(), record.capacity);
                        if lowest.as_ref().is_none_or(|l| record.capacity < l.capacity) {
                            lowest = Some(record);
                        }
                    }
                    Measured::NoPassingLevel => {
                        found.problems.push(format!(
                            "{path} on {address}: no concurrency level met the thresholds"
                        ));
                        found.fail(exit::NO_PASSING_LEVEL);
                    }
                    Measured::Interrupted => found.interrupted = true,
                    Measured::Unreachable(reason) => {
                        found.problems.push(format!("{address}: {reason}"));
                        found.fail(exit::UNREACHABLE);
                    }
                },
            }
            rep.instances.push(InstanceReport {
                address: address.clone(),
                outcome: one.outcome,
                capacity: one.capacity,
                at_capacity: one.at_capacity,
                note: one.note,
            });
            if found.interrupted {
                break;
            }
        }
        if let Some(lowest) = lowest {
            rep.outcome = Outcome::Measured;
            rep.source = Some(Source::Probe);
            // The endpoint's own capacity: the file's unless --force, else
            // the lowest instance's (what an instance without a figure takes).
            let record = match (args.force, p.spec.capacity, record_from_file(&p.spec)) {
                (false, Some(_), Some(kept)) => kept,
                _ => {
                    let note = measured_note(
                        lowest.p99_ms.unwrap_or(0.0),
                        lowest.rps.unwrap_or(0.0),
                        lowest.measured_at,
                    );
                    found.edits.push(edit_for(p, lowest.capacity, note));
                    CapacityRecord {
                        measured_at: now_unix(),
                        ..lowest
                    }
                }
            };
            rep.capacity = Some(record.capacity);
            rep.note = Some(format!(
                "instances: {}",
                figures
                    .iter()
                    .map(|(a, c)| format!("{a} {c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            found.edits.push(Edit::SetInstanceCapacity {
                path: path.clone(),
                capacities: figures.clone(),
            });
            found.to_push.push((idx, record, figures));
        }
        found.reports.push(rep);
        if found.interrupted {
            break;
        }
    }
    progress.finish();
    found
}
