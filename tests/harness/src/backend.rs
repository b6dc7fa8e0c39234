//! The `sluice-backend` binary as a test fixture.

use crate::http;
use crate::process::{Process, ScratchDir};
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const READY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Backend {
    addr: SocketAddr,
    process: Process,
}

impl Backend {
    /// Runs `sluice-backend --route R` for each route (see its `--help`) on
    /// a free port.
    pub fn start(routes: &[&str]) -> Backend {
        let mut args = Vec::new();
        for route in routes {
            args.extend(["--route", route]);
        }
        Backend::start_with_args(&args)
    }

    /// Runs `sluice-backend` with these arguments (`--listen` defaults to a
    /// free loopback port), e.g. `["--threads", "2", "--route", "/p"]`.
    pub fn start_with_args(args: &[&str]) -> Backend {
        let dir = ScratchDir::new("backend");
        let log_path = dir.path().join("backend.log");
        let log = File::create(&log_path).expect("backend log file");
        let mut child = Command::new(crate::bin_path("sluice-backend"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone().expect("backend log file"))
            .spawn()
            .expect("cannot run sluice-backend");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut process = Process {
            name: "sluice-backend".to_string(),
            child,
            logs: vec![log_path],
            dir,
        };

        // The first line says where it listens; anything after goes to the
        // log, and the pipe keeps being drained so the backend never blocks.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = log;
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = writeln!(log, "{first}");
                let _ = tx.send(first);
            }
            for line in lines.map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
            }
        });
        let first_line = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let status = process.wait_exit(Duration::from_millis(200));
                panic!(
                    "sluice-backend {args:?} did not report its port (exit: {status:?}); its log:\n{}",
                    process.log_text()
                );
            }
        };
        let addr = first_line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("unexpected first line from sluice-backend: {first_line:?}"));
        Backend { addr, process }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `GET /__backend/stats`: `{"paths": {"/p": {"in_flight", "max_in_flight",
    /// "serving", "max_serving", "completed", "rejected", "arrivals",
    /// "handover_gap", "latency"}}}`.
    pub fn stats(&self) -> Value {
        let response = http::get(self.addr, "/__backend/stats").expect("backend stats request");
        assert_eq!(response.status, 200, "backend stats: {}", response.text());
        response.json()
    }

    /// The stats of one path (`Null` if the backend has not seen it).
    pub fn path_stats(&self, path: &str) -> Value {
        self.stats()["paths"][path].clone()
    }

    /// The `x-seq` headers that reached `path`, in arrival order.
    pub fn arrivals(&self, path: &str) -> Vec<String> {
        self.path_stats(path)["arrivals"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `POST /__backend/reset`: zeroes maxima, counts and arrivals.
    pub fn reset(&self) {
        let response =
            http::post(self.addr, "/__backend/reset", "").expect("backend reset request");
        assert_eq!(response.status, 200, "backend reset: {}", response.text());
    }

    /// Makes `GET /__backend/health` answer 503 (`false`) or 200 (`true`).
    pub fn set_healthy(&self, healthy: bool) {
        let path = if healthy {
            "/__backend/health/ok"
        } else {
            "/__backend/health/fail"
        };
        let response = http::post(self.addr, path, "").expect("backend health request");
        assert_eq!(response.status, 200, "backend health: {}", response.text());
    }

    /// The backend's log (its stderr and any stdout after the first line).
    pub fn log(&self) -> String {
        self.process.log_text()
    }
}
