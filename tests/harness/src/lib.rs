//! Test harness: runs the real Envoy, Redis and Sluice binaries on free
//! loopback ports, for the end-to-end tests, the demo and the benchmarks.
//!
//! Every process is started, polled for readiness with a bounded retry, and
//! killed by pid when its handle drops. When a test fails (the thread is
//! panicking), each handle prints its process's log to stderr on drop and
//! keeps its scratch directory. The API is blocking; tests need no runtime.
//!
//! ```no_run
//! use sluice_harness::{Backend, Envoy, FrontProxy};
//! let backend = Backend::start(&["/predict:capacity=4,service_ms=50"]);
//! let proxy = FrontProxy::new(backend.port(), r#"{"service":"demo","endpoints":{"/predict":{"capacity":2}}}"#);
//! let envoy = Envoy::start(&proxy, 2);
//! let body = envoy.get("/predict").unwrap();
//! ```

mod backend;
mod dnsmasq;
mod envoy;
mod front_proxy;
pub mod http;
mod keep_alive;
mod process;
mod prometheus;
mod recipe;
mod redis;
mod redis_variants;
mod sync_cluster;
mod sync_service;

pub use backend::{most_at_once, Backend, TracedRequest};
pub use dnsmasq::Dnsmasq;
pub use envoy::{Envoy, EnvoyOptions, EnvoyStartError, PRECISE_TIMER_ENV};
pub use front_proxy::{FrontProxy, FRONT_LISTENER_NAME, OVERRIDE_HOST_YAML, STATS_TAGS_YAML};
pub use keep_alive::KeepAliveClients;
pub use process::{unique_scratch_path, ScratchDir};
pub use prometheus::{Prometheus, ScrapeTarget};
pub use recipe::{with_built_wasm, Recipe, RECIPE_ADMIN_PORT, RECIPE_LISTENER_PORT};
pub use redis::{Redis, RespValue};
pub use redis_variants::{RedisCluster, TlsFiles, TlsRedis};
pub use sync_cluster::{sync_cluster_yaml, SYNC_CLUSTER};
pub use sync_service::SyncService;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The Cargo workspace root (the repository).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/harness/ sits two levels below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace
/// root if relative) or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// A release binary of the workspace, e.g. `bin_path("sluice-backend")`.
pub fn bin_path(name: &str) -> PathBuf {
    let path = target_dir().join("release").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `make build` first",
        path.display()
    );
    path
}

/// A program from the repo's Python environment (`target/py`, or
/// `$SLUICE_VENV`), where `scripts/deps.sh` installs Envoy and the schema
/// packages; the bare name (found on `PATH`) if it is not there.
pub fn venv_program(name: &str) -> PathBuf {
    let venv = match std::env::var_os("SLUICE_VENV") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target").join("py"),
    };
    let path = venv.join("bin").join(name);
    if path.is_file() {
        path
    } else {
        PathBuf::from(name)
    }
}

/// The Sluice filter built for Envoy.
pub fn wasm_path() -> PathBuf {
    built_wasm("sluice_filter.wasm")
}

/// The do-nothing filter the benchmarks compare Sluice against.
pub fn empty_wasm_path() -> PathBuf {
    built_wasm("sluice_empty_filter.wasm")
}

fn built_wasm(file: &str) -> PathBuf {
    let path = target_dir()
        .join("wasm32-wasip1")
        .join("release")
        .join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `make wasm` first",
        path.display()
    );
    path
}

/// The files under `dir` whose extension is one of `exts`, in a stable
/// order, leaving out `node_modules` and `target` folders.
pub fn files_under(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            if !path.ends_with("node_modules") && !path.ends_with("target") {
                found.extend(files_under(&path, exts));
            }
        } else if path
            .extension()
            .is_some_and(|ext| exts.iter().any(|e| ext == *e))
        {
            found.push(path);
        }
    }
    found
}

/// A loopback port that was free a moment ago. Another process can take it
/// before ours binds it; with the kernel's ephemeral port rotation that is
/// rare enough for tests.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `timeout` saying what it was waiting for.
pub fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}
