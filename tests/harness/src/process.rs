//! A child process the harness owns: killed by pid on drop, its log printed
//! to stderr when the test is failing, its scratch directory removed
//! otherwise.

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// Lines of each log printed when a test fails; the whole file stays on disk.
const LOG_TAIL_LINES: usize = 300;

/// A fresh directory under the system temp dir, unique per process and
/// call. Removed on drop unless the thread is panicking (kept for post-mortem).
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(name: &str) -> ScratchDir {
        ScratchDir::at(unique_scratch_path(name))
    }

    /// Takes ownership of `path` (created if missing).
    pub fn at(path: PathBuf) -> ScratchDir {
        remember_panics();
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        ScratchDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

thread_local! {
    /// The message of the panic this thread is unwinding from.
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Wraps the panic hook (once per test binary) so that the logs printed
/// while a failing test unwinds can end with its message again: a CI page
/// that shows the tail of the output then shows why the test failed, not
/// the middle of Envoy's log.
fn remember_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            previous(info);
        }));
    });
}

/// Envoy's start-up inventory (every extension, every header map): hundreds
/// of lines that say nothing about a failing test.
fn is_startup_noise(line: &str) -> bool {
    line.contains("[info][main] [source/server/server.cc") && line.contains("]   ")
}

/// A path for a scratch directory that nothing else uses (not created).
pub fn unique_scratch_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir()
        .join("sluice-harness")
        .join(format!("{name}-{}-{n}", std::process::id()))
}

pub(crate) struct Process {
    pub name: String,
    pub child: Child,
    /// Logs to print if the test fails, in this order.
    pub logs: Vec<PathBuf>,
    pub dir: ScratchDir,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every log file, whole, each under a header naming it.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        for path in &self.logs {
            let content = fs::read_to_string(path).unwrap_or_default();
            if self.logs.len() > 1 {
                text.push_str(&format!("--- {} ---\n", path.display()));
            }
            text.push_str(&content);
        }
        text
    }

    fn dump_logs(&self) {
        eprintln!(
            "===== {} (pid {}) logs; kept in {} =====",
            self.name,
            self.pid(),
            self.dir.path().display()
        );
        for path in &self.logs {
            let content = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = content.lines().filter(|l| !is_startup_noise(l)).collect();
            let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!(
                "--- {} (last {} lines) ---",
                path.display(),
                lines.len() - skip
            );
            for line in &lines[skip..] {
                eprintln!("{line}");
            }
        }
        eprintln!("===== end of {} logs =====", self.name);
        PANIC.with(|p| {
            if let Some(message) = p.borrow().as_deref() {
                eprintln!("===== the test failed: {message} =====");
            }
        });
    }
}

impl Process {
    /// SIGTERM, then up to `grace` for the process to exit: Envoy flushes
    /// its buffered log file on the way out, SIGKILL would lose the tail.
    /// `None` if it still runs.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.exited().is_none() {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet,
            // so the pid cannot have been reused.
            unsafe {
                libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
            }
        }
        self.wait_exit(grace)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.terminate(Duration::from_secs(3));
            self.dump_logs();
        }
        // Child::kill signals this pid only; an exited child is not an error.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
