//! HAProxy with `maxconn` on its one server and a queue in front of it, as
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
        let port = free_port();
        let dir = ScratchDir::new("haproxy");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 4096\n  nbthread {threads}\n  log stdout format raw local0\n\
                 defaults\n  mode http\n  log global\n  log-format \"{LOG_FORMAT}\"\n  option http-keep-alive\n\
                 \x20 timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout queue {}ms\n\
                 frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
                 backend be\n  server s1 127.0.0.1:{backend_port} maxconn {maxconn}\n",
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
