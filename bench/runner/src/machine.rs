//! Where the figures come from: date, CPU, tool versions, and the tools
//! the benchmarks need.

use anyhow::bail;
use std::process::{Command, Stdio};

pub fn require(tool: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        bail!("{tool} is not installed: run `make deps-bench`");
    }
    Ok(())
}

/// One line above a table: when, on what, with which Envoy and HAProxy.
pub fn header(command: &str) -> String {
    format!(
        "`{command}`, {}: {}, {} cores, Linux {}; Envoy {}, HAProxy {}",
        utc_now(),
        cpu_model(),
        cores(),
        kernel(),
        envoy_version(),
        haproxy_version(),
    )
}

fn envoy_version() -> String {
    output_of("envoy", &["--version"])
        .and_then(|text| {
            // "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
            let after = text.split("version: ").nth(1)?.to_string();
            after.split('/').nth(1).map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

fn haproxy_version() -> String {
    // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
    output_of("haproxy", &["-v"])
        .and_then(|text| text.split_whitespace().nth(2).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The date the figures were taken, so a pasted table says when.
fn utc_now() -> String {
    output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// The machine the figures come from ("model name" in /proc/cpuinfo).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}
