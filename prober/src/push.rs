//! `sluice-prober push`: the file's capacities to Redis, without measuring.
//! For capacities set by hand, and for a probe whose push failed.

use crate::cli::PushArgs;
use crate::config_file;
use crate::error::{exit, ProberError};
use crate::note::record_from_file;
use crate::redis_records::RedisRecords;
use crate::report::{self, RedisOutcome};
use serde::Serialize;
use sluice_core::capacity_record::Source;
use sluice_core::redis_keys::{check_service_name, Storage};

#[derive(Debug, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PushedEndpoint {
    pub path: String,
    #[schemars(range(min = 1))]
    pub capacity: Option<u32>,
    #[schemars(with = "Option<crate::schema::SourceSchema>")]
    pub source: Option<Source>,
    /// Each instance's own capacity pushed with the record (address to N).
    pub instance_capacity: std::collections::BTreeMap<String, u32>,
    pub redis: RedisOutcome,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct PushReport {
    #[schemars(extend("const" = "push"))]
    pub command: &'static str,
    pub version: &'static str,
    pub config: String,
    pub service: String,
    pub redis_url: String,
    pub endpoints: Vec<PushedEndpoint>,
    /// The process exit code (docs/prober.md).
    #[schemars(range(max = 5))]
    pub exit_code: u8,
}

pub fn run(args: &PushArgs) -> anyhow::Result<u8> {
    let file = config_file::load(&args.config)?;
    let url = match (&args.redis, &file.storage) {
        (Some(u), _) => u.clone(),
        (None, Some(Storage::Redis { url })) => url.clone(),
        _ => {
            return Err(ProberError::Usage(format!(
            "no Redis to push to: pass --redis URL (or SLUICE_REDIS_URL), or set storage: {{type: redis, url: ...}} in {}",
            args.config.display()
        ))
            .into())
        }
    };
    let service = file.config.service.clone();
    check_service_name(&service).map_err(|e| ProberError::Usage(e.to_string()))?;
    let target = crate::redis_target::RedisTarget::new(&url, &args.redis_conn)?;
    let mut store = RedisRecords::connect_to(&target, &service)?;
    let mut endpoints = Vec::new();
    for spec in &file.endpoints {
        let Some(record) = record_from_file(spec) else {
            endpoints.push(PushedEndpoint {
                path: spec.path.clone(),
                capacity: None,
                source: None,
                instance_capacity: Default::default(),
                redis: RedisOutcome::Skipped,
            });
            continue;
        };
        let outcome = if !args.force && store.get(&spec.path)?.is_some() {
            RedisOutcome::Exists
        } else {
            store.put_with_instances(&spec.path, &record, &spec.instance_capacity)?;
            RedisOutcome::Pushed
        };
        endpoints.push(PushedEndpoint {
            path: spec.path.clone(),
            capacity: Some(record.capacity),
            source: Some(record.source),
            instance_capacity: spec.instance_capacity.clone(),
            redis: outcome,
        });
    }
    let report = PushReport {
        command: "push",
        version: env!("CARGO_PKG_VERSION"),
        config: args.config.display().to_string(),
        service,
        redis_url: store.url().to_string(),
        endpoints,
        exit_code: exit::OK,
    };
    report::emit(&report, || report.to_text(), &args.output, &[])?;
    Ok(exit::OK)
}

impl PushReport {
    fn to_text(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .endpoints
            .iter()
            .map(|e| {
                vec![
                    e.path.clone(),
                    report::or_dash(e.capacity),
                    report::or_dash(e.source.map(|s| s.as_str())),
                    report::serde_plain(&e.redis),
                ]
            })
            .collect();
        format!(
            "sluice-prober push {} -> {} (service {})\n{}",
            self.config,
            self.redis_url,
            self.service,
            report::table(
                &["endpoint", "capacity", "source", "redis"],
                &rows,
                &[0, 2, 3]
            )
        )
    }
}
