//! The `sluice-sync` binary as a test fixture.

use crate::process::{Process, ScratchDir};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Debug for the sync service itself: every snapshot it sends is in its log.
const DEFAULT_LOG: &str = "info,sluice_sync=debug";

pub struct SyncService {
    addr: SocketAddr,
    process: Process,
}

impl SyncService {
    /// `sluice-sync --redis URL` on a free loopback port, plus `args`
    /// (e.g. `["--resync-interval", "1s"]`).
    pub fn start(redis_url: &str, args: &[&str]) -> SyncService {
        let mut all = vec!["--redis", redis_url];
        all.extend(args);
        SyncService::start_with(&all, &[])
    }

    /// `sluice-sync` with exactly these arguments (plus `--listen
    /// 127.0.0.1:0` unless they name one) and environment variables.
    /// Waits until it listens; panics with its log if it does not.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> SyncService {
        let dir = ScratchDir::new("sync");
        let log_path = dir.path().join("sync.log");
        let log = File::create(&log_path).expect("sync log file");
        let mut command = Command::new(crate::bin_path("sluice-sync"));
        if !args.contains(&"--listen") {
            // Port 0: the service picks a free port and prints it, so no
            // other process can take it between our pick and its bind.
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command
            .args(args)
            .env_remove("SLUICE_REDIS_URL")
            .env_remove("SLUICE_SYNC_LISTEN")
            .env_remove("SLUICE_CONFIG")
            .env("SLUICE_LOG", DEFAULT_LOG)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.try_clone().expect("sync log file"));
        let mut child = command.spawn().expect("cannot run sluice-sync");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut process = Process {
            name: "sluice-sync".to_string(),
            child,
            logs: vec![log_path],
            dir,
        };

        // The first stdout line says where it listens; the pipe keeps being
        // drained into the log so the service never blocks on it.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = log;
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
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
                    "sluice-sync {args:?} did not report its port (exit: {status:?}); its log:\n{}",
                    process.log_text()
                );
            }
        };
        let addr = first_line
            .strip_prefix("listening on ")
            .and_then(|a| a.trim().parse::<SocketAddr>().ok())
            .unwrap_or_else(|| panic!("unexpected first line from sluice-sync: {first_line:?}"));
        let deadline = Instant::now() + READY_TIMEOUT;
        while !crate::port_accepts(addr.port()) {
            assert!(
                Instant::now() < deadline,
                "sluice-sync does not accept connections on {addr}; its log:\n{}",
                process.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        SyncService { addr, process }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for a gRPC client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM, then up to `grace` for it to exit; `None` if it still runs.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.process.terminate(grace)
    }

    /// Its log (stderr, and stdout after the first line).
    pub fn log(&self) -> String {
        self.process.log_text()
    }
}
