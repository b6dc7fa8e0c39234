//! wrk as the closed-loop load of the throughput measurements.

use anyhow::{bail, Context};
use std::process::Command;

/// Runs wrk (one thread: the machine's cores are shared with the proxy and
/// the backend) and returns requests per second; any non-2xx answer fails.
pub fn wrk(port: u16, path: &str, connections: u32, seconds: u32) -> anyhow::Result<f64> {
    Ok(wrk_run(port, path, connections, seconds)?.rps)
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct WrkRun {
    pub rps: f64,
    /// Requests completed in the run.
    pub requests: u64,
}

/// [`wrk`], with the number of requests completed as well.
pub fn wrk_run(port: u16, path: &str, connections: u32, seconds: u32) -> anyhow::Result<WrkRun> {
    wrk_run_script(port, path, connections, seconds, None)
}

/// [`wrk_run`], each request made by a Lua script (wrk's `-s`) if given.
pub fn wrk_run_script(
    port: u16,
    path: &str,
    connections: u32,
    seconds: u32,
    script: Option<&std::path::Path>,
) -> anyhow::Result<WrkRun> {
    let mut cmd = Command::new("wrk");
    if let Some(script) = script {
        cmd.arg("-s").arg(script);
    }
    let out = cmd
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
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {text}"))?;
    // "  123456 requests in 8.00s, 9.87MB read"
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output: {text}"))?;
    Ok(WrkRun { rps, requests })
}

/// CPU time (user + system, all threads) the process `pid` has used so
/// far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> anyhow::Result<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no command name in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {i} of /proc/{pid}/stat"))
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(std::time::Duration::from_secs_f64(
        total as f64 / clock_ticks()? as f64,
    ))
}

/// The kernel's clock ticks per second, the unit of `/proc/PID/stat`.
fn clock_ticks() -> anyhow::Result<u64> {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf CLK_TCK")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|&hz: &u64| hz > 0)
        .context("getconf CLK_TCK printed no tick rate")
}
