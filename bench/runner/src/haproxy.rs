//! HAProxy with `maxconn` on each server and a queue in front of them, as
//! its users run it: the reference Sluice is measured against.

use anyhow::{bail, Context};
use sluice_harness::{free_port, port_accepts, ScratchDir};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// One line per request on stdout: status, `Tw` (time queued), `Ta` (first
/// request byte to last response byte, the counterpart of Envoy's
/// `%DURATION%`), `Tt`, termination state (`sQ`: timed out in the queue),
/// URI. HAProxy's timers are whole milliseconds.
const LOG_FORMAT: &str = "%ST %Tw %Ta %Tt %tsc %HU";

pub struct Haproxy {
    child: Child,
    pub port: u16,
    log: PathBuf,
    dir: ScratchDir,
}

/// One `server` line of the backend: HAProxy sends it at most `maxconn`
/// requests at once and queues the rest (a freed slot goes to the oldest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    pub port: u16,
    pub maxconn: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub status: u16,
    /// -1 when the request never reached the queue.
    pub tw_ms: i64,
    pub ta_ms: i64,
    pub tt_ms: i64,
    pub termination: String,
    pub uri: String,
}

impl Haproxy {
    /// `threads` is HAProxy's `nbthread`: set it to Envoy's `--concurrency`
    /// for a like-for-like comparison.
    pub fn start(
        backend_port: u16,
        maxconn: u32,
        threads: u32,
        queue_timeout: Duration,
    ) -> anyhow::Result<Haproxy> {
        let server = Server {
            port: backend_port,
            maxconn,
        };
        Haproxy::render_and_start(&[server], threads, queue_timeout, "roundrobin", "")
    }

    /// One `server … maxconn K` line per instance, chosen by `balance`
    /// (`roundrobin`, `leastconn`). Each request carries an `x-request-id`
    /// (a UUID), as through Envoy, so a backend's `--trace` keeps it.
    pub fn start_servers(
        servers: &[Server],
        threads: u32,
        queue_timeout: Duration,
        balance: &str,
    ) -> anyhow::Result<Haproxy> {
        let request_id = "  http-request set-header x-request-id %[uuid()]\n";
        Haproxy::render_and_start(servers, threads, queue_timeout, balance, request_id)
    }

    fn render_and_start(
        servers: &[Server],
        threads: u32,
        queue_timeout: Duration,
        balance: &str,
        backend_extra: &str,
    ) -> anyhow::Result<Haproxy> {
        let port = free_port();
        let server_lines: String = servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    "  server s{} 127.0.0.1:{} maxconn {}\n",
                    i + 1,
                    s.port,
                    s.maxconn
                )
            })
            .collect();
        let dir = ScratchDir::new("haproxy");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4096\n  nbthread {threads}\n  log stdout format raw local0\n\
                 defaults\n  mode http\n  log global\n  log-format \"{LOG_FORMAT}\"\n  option http-keep-alive\n\
                 \x20 timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout queue {}ms\n\
                 frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
                 backend be\n  balance {balance}\n{backend_extra}{server_lines}",
                queue_timeout.as_millis()
            ),
        )?;
        let errors = dir.path().join("haproxy.err");
        let log = dir.path().join("haproxy.log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&errors)?)
            .spawn()
            .context("starting haproxy")?;
        let mut h = Haproxy {
            child,
            port,
            log,
            dir,
        };
        for _ in 0..200 {
            if port_accepts(port) {
                return Ok(h);
            }
            if h.child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "haproxy did not start: {}",
            std::fs::read_to_string(&errors).unwrap_or_default()
        )
    }

    /// Every request logged so far. HAProxy writes each line as the request
    /// ends, unbuffered.
    pub fn log_lines(&self) -> Vec<LogLine> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(parse_line)
            .collect()
    }

    pub fn work_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_line(line: &str) -> Option<LogLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [status, tw, ta, tt, termination, uri] = f[..] else {
        return None;
    };
    Some(LogLine {
        status: status.parse().ok()?,
        tw_ms: tw.parse().ok()?,
        ta_ms: ta.parse().ok()?,
        tt_ms: tt.parse().ok()?,
        termination: termination.to_string(),
        uri: uri.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_its_log_format() {
        let l = parse_line("503 200 201 221 sQ /slow").unwrap();
        assert_eq!((l.status, l.tw_ms, l.ta_ms, l.tt_ms), (503, 200, 201, 221));
        assert_eq!((l.termination.as_str(), l.uri.as_str()), ("sQ", "/slow"));
        assert_eq!(parse_line("[NOTICE] something else"), None);
    }
}
