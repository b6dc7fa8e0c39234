//! Command-line options.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  unexpected failure (e.g. the config file could not be written)
  2  bad usage or bad config file (nothing was measured; the file is unchanged)
  3  target unreachable (the file keeps what it had, plus any capacity measured
     before the target went away)
  4  no concurrency level met the thresholds for at least one endpoint (the
     other endpoints' capacities are written)
  5  Redis unreachable or the push failed (checked before measuring: nothing is
     measured; failing after measuring: the file is written, Redis is not)
130  interrupted (Ctrl-C, SIGTERM): what was measured is printed; nothing is
     written unless --write-partial";

/// A count given on the command line: a negative one is refused by name
/// rather than as an unexpected argument.
fn count<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    if s.trim_start().starts_with('-') {
        return Err("must be ≥ 0".into());
    }
    s.parse::<T>()
        .map_err(|e| format!("{e}: expected a whole number ≥ 0"))
}

#[derive(Debug, Parser)]
#[command(
    name = "sluice-prober",
    version,
    about = "Measures how many concurrent requests each endpoint of a service can take",
    long_about = "Measures how many concurrent requests each endpoint of a service can take \
(its capacity), writes it into sluice.yaml and pushes it to Redis for the Sluice filter to enforce.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Find each endpoint's capacity: the highest concurrency within the
    /// error and p99 thresholds. Writes it into the config and Redis.
    #[command(after_help = EXIT_CODES)]
    Probe(ProbeArgs),
    /// Measure one endpoint at a list of concurrency levels and show where it
    /// saturates, with a recommended autoscaling threshold.
    #[command(after_help = EXIT_CODES)]
    Sweep(SweepArgs),
    /// Push the capacities in the config file to Redis without measuring.
    #[command(after_help = EXIT_CODES)]
    Push(PushArgs),
}

/// How to call an endpoint given on the command line.
#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// HTTP method for endpoints given with --endpoint [default: GET]
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,
    /// Request header "Name: value" (repeatable)
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    pub headers: Vec<String>,
    /// Request body; JSON text is sent as application/json unless a
    /// Content-Type header says otherwise
    #[arg(long, value_name = "BODY")]
    pub body: Option<String>,
}

/// How each concurrency level is run. Each overrides the file's `probe:` key
/// of the same name.
#[derive(Debug, Clone, Args)]
pub struct LevelArgs {
    /// Seconds of load before measuring each level [default: 1]
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub warmup: Option<f64>,
    /// Seconds each level is measured for, at least [default: 5]
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub duration: Option<f64>,
    /// Keep measuring past --duration until this many requests were measured
    /// (so the p99 rests on enough samples) [default: 300]
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count::<u64>)]
    pub min_samples: Option<u64>,
    /// ...but never longer than this many seconds [default: 30]
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub max_duration: Option<f64>,
    /// Seconds before a request without a full response counts as an error
    /// [default: 30]
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub request_timeout: Option<f64>,
    /// Threads generating load [default: 2, or 1 on a one-core machine]
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count::<usize>)]
    pub threads: Option<usize>,
}

/// What a successful response is. Without these, any 2xx.
#[derive(Debug, Clone, Default, Args)]
pub struct CheckArgs {
    /// Statuses that count as success, comma-separated, e.g. 200,201
    /// [default: any 2xx]
    #[arg(long, value_delimiter = ',', value_name = "CODE,CODE,...", value_parser = count::<u16>)]
    pub expect_status: Vec<u16>,
    /// A response succeeds only if its body contains this text
    #[arg(long, value_name = "TEXT")]
    pub expect_body_contains: Option<String>,
    /// A response succeeds only if its body is JSON with FIELD equal to
    /// VALUE: FIELD a name (`status`, `result.ok`) or a JSON pointer
    /// (`/result/ok`), VALUE JSON (`true`, `3`, `"ok"`) or else a string
    #[arg(long, value_name = "FIELD=VALUE")]
    pub expect_json: Option<String>,
}

impl CheckArgs {
    pub fn to_check(&self) -> Result<crate::success::SuccessCheck, crate::ProberError> {
        crate::success::SuccessCheck::from_flags(
            &self.expect_status,
            self.expect_body_contains.as_deref(),
            self.expect_json.as_deref(),
        )
    }
}

/// How to reach Redis beyond its URL: TLS files and cluster mode.
#[derive(Debug, Clone, Default, Args)]
pub struct RedisConnArgs {
    /// CA certificate (PEM) that signed a rediss:// Redis's certificate
    /// [default: the system's trusted roots]
    #[arg(long, env = "SLUICE_REDIS_CA", value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a Redis that asks for one (with
    /// --redis-key)
    #[arg(long, env = "SLUICE_REDIS_CERT", value_name = "FILE")]
    pub redis_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long, env = "SLUICE_REDIS_KEY", value_name = "FILE")]
    pub redis_key: Option<PathBuf>,
    /// Redis is a Redis Cluster (implied when --redis lists several nodes,
    /// comma-separated)
    #[arg(long, env = "SLUICE_REDIS_CLUSTER")]
    pub redis_cluster: bool,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Print a JSON document (see prober/schema/) instead of tables
    #[arg(long)]
    pub json: bool,
    /// No progress and no warnings on stderr
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// Base URL of the service, e.g. http://127.0.0.1:8000 (plain HTTP).
    /// Behind a load balancer this measures the whole set, not one instance:
    /// use --each-instance for per-instance capacities
    #[arg(long, required_unless_present = "each_instance")]
    pub url: Option<String>,
    /// Measure every instance one by one (at http://ADDR/PATH), write each
    /// figure as endpoints.PATH.instance_capacity (and capacity, the lowest,
    /// if it was not set) and push them to Redis. The instances: --instances,
    /// else instances.hosts of --config
    #[arg(long, requires = "config")]
    pub each_instance: bool,
    /// The instances --each-instance measures, comma-separated ip:port
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "ADDR,ADDR,...",
        requires = "each_instance"
    )]
    pub instances: Vec<String>,
    /// sluice.yaml (or balancer.yml) to read endpoints from and write
    /// capacities into; created if missing and --endpoint is given
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Probe this endpoint path (repeatable); without it, every endpoint in
    /// the config. One that is not in the config is added to it
    #[arg(long = "endpoint", short = 'e', value_name = "PATH")]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub request: RequestArgs,
    #[command(flatten)]
    pub check: CheckArgs,
    /// Service name, the Redis namespace (for a config created from flags,
    /// or without a config) [default: the file's `service`, else "default"]
    #[arg(long)]
    pub service: Option<String>,
    /// Highest passing error rate, 0..1 (non-2xx and transport errors)
    /// [default: the file's error_threshold, else 0.05]
    #[arg(long, value_name = "FRACTION", allow_negative_numbers = true)]
    pub error_threshold: Option<f64>,
    /// Highest passing p99 in milliseconds
    /// [default: the file's latency_threshold_ms, else 2000]
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub latency_threshold_ms: Option<f64>,
    /// Highest concurrency to try [default: 256]
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count::<usize>)]
    pub max_concurrency: Option<usize>,
    #[command(flatten)]
    pub level: LevelArgs,
    // The env value stays out of --help: the URL can hold a password.
    /// Push results to this Redis (overrides the file's storage); prefer
    /// SLUICE_REDIS_URL when the URL holds a password, which argv shows
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis: Option<String>,
    #[command(flatten)]
    pub redis_conn: RedisConnArgs,
    /// Probe endpoints that already have a capacity (in the file or in
    /// Redis) and overwrite it
    #[arg(long)]
    pub force: bool,
    /// Measure and report, but write neither the file nor Redis
    #[arg(long)]
    pub dry_run: bool,
    /// When interrupted (Ctrl-C, SIGTERM), still write and push the
    /// endpoints that finished; without it an interrupted run writes nothing
    #[arg(long)]
    pub write_partial: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Base URL of the service, e.g. http://127.0.0.1:8000 (plain HTTP)
    #[arg(long)]
    pub url: String,
    /// Endpoint path to sweep
    #[arg(long, short, value_name = "PATH")]
    pub endpoint: String,
    /// Take the endpoint's method, headers and body (and level settings)
    /// from this file; it is never written
    #[arg(long, short, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub request: RequestArgs,
    #[command(flatten)]
    pub check: CheckArgs,
    /// Concurrency levels, comma-separated [default: 1,2,4,8,16,32,64]
    #[arg(long, value_delimiter = ',', value_name = "N,N,...", allow_negative_numbers = true, value_parser = count::<usize>)]
    pub levels: Vec<usize>,
    /// Run every level even after two saturated ones in a row
    #[arg(long)]
    pub all_levels: bool,
    /// Error rate above which a level counts as saturated
    /// [default: the file's error_threshold, else 0.05]
    #[arg(long, value_name = "FRACTION", allow_negative_numbers = true)]
    pub error_threshold: Option<f64>,
    /// Requests per second the service must serve, for the sizing line
    #[arg(long, value_name = "RPS", allow_negative_numbers = true)]
    pub target_rps: Option<f64>,
    /// p95 in milliseconds the service must keep, for the sizing line
    /// [default: the p95 measured at the threshold]
    #[arg(long, value_name = "MS", allow_negative_numbers = true)]
    pub target_p95_ms: Option<f64>,
    #[command(flatten)]
    pub level: LevelArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// Config file whose capacities to push
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Redis to push to (overrides the file's storage); prefer
    /// SLUICE_REDIS_URL when the URL holds a password, which argv shows
    #[arg(
        long,
        env = "SLUICE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis: Option<String>,
    #[command(flatten)]
    pub redis_conn: RedisConnArgs,
    /// Overwrite records that already exist
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn options_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_lists_exit_codes() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(help.contains("4  no concurrency level met the thresholds"));
    }
}
