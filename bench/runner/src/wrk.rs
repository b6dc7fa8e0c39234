//! wrk as the closed-loop load of the throughput measurements.

use anyhow::{bail, Context};
use std::process::Command;

/// Runs wrk (one thread: the machine's cores are shared with the proxy and
/// the backend) and returns requests per second; any non-2xx answer fails.
pub fn wrk(port: u16, path: &str, connections: u32, seconds: u32) -> anyhow::Result<f64> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        // Queued requests wait longer than wrk's default 2 s at times.
        .args(["--timeout", "30s"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk saw errors ({}): {text}", line.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))
}
