//! The `sluice-sync` binary as a test fixture, and the Envoy cluster the
//! filter reaches it through.

use crate::process::{Process, ScratchDir};
use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The Envoy cluster name the rendered configs give the sync service. Never
/// `envoy`: see ENVOY-WASM-NOTES.md, "Callouts".
pub const SYNC_CLUSTER: &str = "sluice_sync";

pub struct SyncService {
    port: u16,
    redis_url: String,
    process: Option<Process>,
}

impl SyncService {
    /// `sluice-sync --listen 127.0.0.1:PORT --redis URL` on a free port,
    /// ready once the port accepts connections.
    pub fn start(redis_url: &str) -> SyncService {
        let mut sync = SyncService {
            port: crate::free_port(),
            redis_url: redis_url.to_string(),
            process: None,
        };
        sync.restart();
        sync
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Kills it (SIGKILL, by pid): no goodbye on its streams.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Starts it again on the same port (after [`SyncService::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let dir = ScratchDir::new("sync");
        let log_path = dir.path().join("sync.log");
        let log = File::create(&log_path).expect("sync log file");
        let child = Command::new(crate::bin_path("sluice-sync"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--redis", &self.redis_url])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("sync log file"))
            .stderr(log)
            .spawn()
            .expect("cannot run sluice-sync");
        let mut process = Process {
            name: "sluice-sync".to_string(),
            child,
            logs: vec![log_path],
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !crate::port_accepts(self.port) {
            if let Some(status) = process.exited() {
                panic!("sluice-sync exited with {status}:\n{}", process.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "sluice-sync not listening after {READY_TIMEOUT:?}:\n{}",
                process.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.process = Some(process);
    }

    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .map(Process::log_text)
            .unwrap_or_default()
    }

    /// The Envoy cluster for it, for [`crate::FrontProxy::extra_clusters_yaml`].
    pub fn cluster_yaml(&self) -> String {
        sync_cluster_yaml(self.port)
    }
}

/// An HTTP/2 (gRPC) cluster named [`SYNC_CLUSTER`] to 127.0.0.1:`port`,
/// with HTTP/2 keepalive: a hung server or connection fires nothing in
/// Envoy, the PINGs notice it.
pub fn sync_cluster_yaml(port: u16) -> String {
    format!(
        r#"- name: {SYNC_CLUSTER}
  type: STATIC
  connect_timeout: 1s
  typed_extension_protocol_options:
    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
      "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
      explicit_http_config:
        http2_protocol_options:
          connection_keepalive:
            interval: 5s
            timeout: 2s
  load_assignment:
    cluster_name: {SYNC_CLUSTER}
    endpoints:
    - lb_endpoints:
      - endpoint:
          address:
            socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"#
    )
}
