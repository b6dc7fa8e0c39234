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

    /// What `GET /__backend/trace` holds for `path`: every request served
    /// since the last reset, in order of departure. Empty unless the backend
    /// was started with `--trace`.
    pub fn trace(&self, path: &str) -> Vec<TracedRequest> {
        let response = http::get(self.addr, "/__backend/trace").expect("backend trace request");
        assert_eq!(response.status, 200, "backend trace: {}", response.text());
        let rows = response.json()["paths"][path]
            .as_array()
            .cloned()
            .unwrap_or_default();
        rows.iter()
            .map(|row| TracedRequest {
                id: row[0].as_str().unwrap_or_default().to_string(),
                arrived_us: row[1].as_u64().expect("arrival in the backend's trace"),
                departed_us: row[2].as_u64().expect("departure in the backend's trace"),
            })
            .collect()
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

/// One request a backend started with `--trace` served: Envoy's
/// `x-request-id`, and when it came and went on the wall clock
/// (microseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedRequest {
    pub id: String,
    pub arrived_us: u64,
    pub departed_us: u64,
}

/// The most requests that were inside at the same moment, over the traces
/// of one or several backends (one machine, one wall clock): what the
/// instances together really had in flight, which the sum of each one's
/// `max_in_flight` only bounds from above. A departure and an arrival in
/// the same microsecond count as one after the other: a proxy admits the
/// next request only after the previous one left.
pub fn most_at_once<'a>(requests: impl IntoIterator<Item = &'a TracedRequest>) -> usize {
    // (time, +1 arrival / -1 departure); at equal times -1 sorts first.
    let mut events: Vec<(u64, i8)> = requests
        .into_iter()
        .flat_map(|r| [(r.arrived_us, 1), (r.departed_us, -1)])
        .collect();
    events.sort_unstable();
    let (mut inside, mut most) = (0i64, 0i64);
    for (_, step) in events {
        inside += i64::from(step);
        most = most.max(inside);
    }
    most as usize
}

#[cfg(test)]
mod tests {
    use super::{most_at_once, TracedRequest};

    fn request(arrived_us: u64, departed_us: u64) -> TracedRequest {
        TracedRequest {
            id: String::new(),
            arrived_us,
            departed_us,
        }
    }

    #[test]
    fn counts_overlaps_across_backends_and_handovers_as_sequential() {
        assert_eq!(most_at_once(&[]), 0);
        let one = [request(0, 10), request(5, 20)];
        let other = [request(8, 9), request(20, 30), request(10, 25)];
        // At 8: [0,10), [5,20), [8,9). At 20 the first of `one` hands over
        // to the second of `other`: never more than three.
        assert_eq!(most_at_once(one.iter().chain(&other)), 3);
        assert_eq!(most_at_once(&[request(0, 5), request(5, 9)]), 1);
    }
}
