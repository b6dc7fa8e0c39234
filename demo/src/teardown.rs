//! Who ends the demo's processes on SIGINT or SIGTERM.
//!
//! A Ctrl-C on the terminal reaches every process of the group, but a
//! SIGTERM sent to the demo alone (a supervisor, `kill PID`) would end it
//! without running the harness's `Drop`s and leave Envoy, Redis and the rest
//! running. So the demo catches both signals. While it watches, the main
//! loop sees the signal within a burst and drops the processes itself.
//! Before that, the scripted part is busy in calls that do not look at
//! signals, so a watcher thread kills every process registered so far by pid
//! and exits with 128 + the signal, as a shell reports it.

use std::sync::atomic::{AtomicI32, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::Duration;

/// The signal received, 0 before any.
static SIGNAL: AtomicI32 = AtomicI32::new(0);

struct Registry {
    pids: Vec<u32>,
    /// The main thread has taken over: it drops the processes itself.
    main_ends_them: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    pids: Vec::new(),
    main_ends_them: false,
});

/// Catches SIGINT and SIGTERM from now on. Children get the default
/// handlers back when they exec, so they still die of them.
pub fn catch_signals() {
    extern "C" fn on_signal(sig: libc::c_int) {
        // Only async-signal-safe work here: an atomic.
        SIGNAL.store(sig, SeqCst);
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(|| loop {
        let sig = SIGNAL.load(SeqCst);
        if sig != 0 {
            kill_unless_main_ends_them(sig);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// A process to kill if a signal arrives before [`main_ends_them`].
pub fn register(pid: u32) {
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pids
        .push(pid);
}

/// After the main thread has reaped `pid`: its number may be reused.
pub fn unregister(pid: u32) {
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pids
        .retain(|&p| p != pid);
}

/// From here the main thread drops the processes (on a signal, or at the
/// end): the watcher must not kill pids it may already have reaped.
pub fn main_ends_them() {
    let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    registry.main_ends_them = true;
    registry.pids.clear();
}

/// Whether SIGINT or SIGTERM has arrived.
pub fn stop_requested() -> bool {
    SIGNAL.load(SeqCst) != 0
}

/// Sleeps up to `total`, less if a signal arrives.
pub fn sleep_unless_stopped(total: Duration) {
    let step = Duration::from_millis(50);
    let mut slept = Duration::ZERO;
    while slept < total && !stop_requested() {
        std::thread::sleep(step);
        slept += step;
    }
}

fn kill_unless_main_ends_them(sig: i32) {
    // Held until exit, so the main thread cannot start dropping meanwhile.
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    if registry.main_ends_them {
        return;
    }
    eprintln!(
        "\nsluice-demo: stopped by signal {sig}; killing the {} processes it started \
         (their logs stay in {})",
        registry.pids.len(),
        std::env::temp_dir().join("sluice-harness").display()
    );
    for &pid in &registry.pids {
        // SAFETY: kill(2) on our children. The main thread reaps one only
        // just before `unregister`, in the `Drop`s after `main_ends_them`,
        // or when it exited by itself while starting (the demo then
        // panics): only in those moments could its pid have been reused.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    for &pid in &registry.pids {
        // Reaped here, so none is left behind even as a zombie; ECHILD if
        // the main thread got there first.
        // SAFETY: waitpid(2) with a null status pointer.
        unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
    }
    std::process::exit(128 + sig);
}
