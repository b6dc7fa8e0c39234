use clap::Parser;
use sluice_loadgen::{run_blocking, summarize, table, Burst};
use std::net::SocketAddr;
use std::time::Duration;

/// Fire a burst of concurrent requests (one connection each) and report what
/// became of each: admitted, queued then admitted, timed out in the queue,
/// rejected as queue-full.
#[derive(Parser)]
#[command(name = "sluice-loadgen")]
struct Opts {
    /// Where to send, e.g. 127.0.0.1:10000
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, short = 'n', default_value_t = 10)]
    requests: usize,
    /// Milliseconds between request starts.
    #[arg(long, default_value_t = 0.0)]
    spacing_ms: f64,
    /// Seconds to wait for any one response.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Print every outcome and the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    anyhow::ensure!(o.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(
        o.spacing_ms >= 0.0 && o.timeout > 0.0,
        "--spacing-ms and --timeout must be positive"
    );
    let mut b = Burst::new(o.addr, &o.path, o.requests);
    b.method = o.method;
    b.spacing = Duration::from_secs_f64(o.spacing_ms / 1e3);
    b.timeout = Duration::from_secs_f64(o.timeout);
    let outcomes = run_blocking(&b);
    let summary = summarize(&outcomes);
    if o.json {
        println!(
            "{}",
            serde_json::json!({"summary": summary, "outcomes": outcomes})
        );
        return Ok(());
    }
    print!("{}", table(&outcomes));
    println!(
        "\n{} requests: {} ok ({} of them queued first, longest wait {} ms), {} queue timeouts (504), {} queue full (503), {} other, {} errors",
        summary.requests,
        summary.ok,
        summary.queued_then_admitted,
        summary.max_wait_ms,
        summary.queue_timeout,
        summary.queue_full,
        summary.other_status,
        summary.errors
    );
    Ok(())
}
