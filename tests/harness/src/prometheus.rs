//! A throwaway Prometheus (Debian's `prometheus` package) per test, scraping
//! the targets the test names, and its HTTP query API.

use crate::process::{Process, ScratchDir};
use serde_json::Value;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One scrape target: what Prometheus Operator would give it as target
/// labels goes in `labels` (e.g. `namespace`, `pod`, `service`, `endpoint`).
#[derive(Debug, Clone)]
pub struct ScrapeTarget {
    pub job: String,
    pub addr: SocketAddr,
    pub metrics_path: String,
    pub labels: Vec<(String, String)>,
}

pub struct Prometheus {
    port: u16,
    process: Process,
}

impl Prometheus {
    /// `prometheus` on a free loopback port, scraping `targets` every
    /// second (as `honor_labels: false`, Prometheus Operator's default),
    /// with `rule_files` (copied into its directory) evaluated every second.
    /// Ready once `/-/ready` answers 200.
    pub fn start(targets: &[ScrapeTarget], rule_files: &[&str]) -> Prometheus {
        let dir = ScratchDir::new("prometheus");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n",
        );
        if !rule_files.is_empty() {
            config.push_str("rule_files:\n");
            for (i, text) in rule_files.iter().enumerate() {
                let name = format!("rules-{i}.yaml");
                fs::write(dir.path().join(&name), text).expect("writing a rule file");
                config.push_str(&format!("- {name}\n"));
            }
        }
        config.push_str("scrape_configs:\n");
        for t in targets {
            let labels: Vec<String> = t
                .labels
                .iter()
                .map(|(k, v)| format!("{k}: {}", Value::from(v.as_str())))
                .collect();
            config.push_str(&format!(
                "- job_name: {}\n  honor_labels: false\n  metrics_path: {}\n  static_configs:\n  - targets: [\"{}\"]\n    labels: {{{}}}\n",
                Value::from(t.job.as_str()),
                Value::from(t.metrics_path.as_str()),
                t.addr,
                labels.join(", ")
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        fs::write(&config_path, &config).expect("writing prometheus.yml");
        let port = crate::free_port();
        let log_path = dir.path().join("prometheus.log");
        let log = File::create(&log_path).expect("prometheus log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("prometheus log file"))
            .stderr(log)
            .spawn()
            .expect("cannot run prometheus (apt-get install prometheus)");
        let mut prometheus = Prometheus {
            port,
            process: Process {
                name: "prometheus".to_string(),
                child,
                logs: vec![log_path],
                dir,
            },
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = prometheus.process.exited() {
                panic!(
                    "prometheus exited ({status}); its config:\n{config}\nits log:\n{}",
                    prometheus.process.log_text()
                );
            }
            if matches!(crate::http::get(prometheus.addr(), "/-/ready"), Ok(r) if r.status == 200) {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in {READY_TIMEOUT:?}; its log:\n{}",
                prometheus.process.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// An instant query: the `data` of the answer (`resultType`, `result`),
    /// or Prometheus' error text (e.g. a parse error naming the position).
    pub fn query(&self, expr: &str) -> Result<Value, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let response = crate::http::get(self.addr(), &path).map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_slice(&response.body)
            .map_err(|e| format!("{e}: {}", response.text()))?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!(
                "{}: {}",
                body["errorType"].as_str().unwrap_or("error"),
                body["error"].as_str().unwrap_or_default()
            ))
        }
    }

    /// The value of a query whose answer is one sample (a scalar, or a
    /// vector of one element); `None` if the vector is empty.
    pub fn query_value(&self, expr: &str) -> Result<Option<f64>, String> {
        let data = self.query(expr)?;
        let value = match data["resultType"].as_str() {
            Some("scalar") => &data["result"][1],
            Some("vector") => match data["result"].as_array().map(Vec::as_slice) {
                Some([]) => return Ok(None),
                Some([one]) => &one["value"][1],
                _ => return Err(format!("more than one sample: {data}")),
            },
            _ => return Err(format!("not a scalar or vector: {data}")),
        };
        value
            .as_str()
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| format!("no number in {data}"))
    }

    /// The rules Prometheus loaded, with their health and last error.
    pub fn rules(&self) -> Value {
        let response = crate::http::get(self.addr(), "/api/v1/rules").expect("GET /api/v1/rules");
        serde_json::from_slice(&response.body).expect("rules JSON")
    }
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
