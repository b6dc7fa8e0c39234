//! The Envoy cluster through which the filter reaches `sluice-sync`, and
//! what the filter's tests do to the service besides starting it.

use crate::SyncService;
use std::time::{Duration, Instant};

/// The Envoy cluster name the rendered configs give the sync service. Never
/// `envoy`: docs/sync.md says why.
pub const SYNC_CLUSTER: &str = "sluice_sync";

/// An HTTP/2 (gRPC) cluster named [`SYNC_CLUSTER`] to 127.0.0.1:`port`,
/// for [`crate::FrontProxy::extra_clusters_yaml`], with HTTP/2 keepalive:
/// a hung server or connection fires nothing in Envoy, the PINGs notice it.
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

impl SyncService {
    /// The Envoy cluster for this service (see [`sync_cluster_yaml`]).
    pub fn cluster_yaml(&self) -> String {
        sync_cluster_yaml(self.addr().port())
    }

    /// SIGKILL by pid, no goodbye on its streams; returns once its port is
    /// closed. Start another on [`SyncService::addr`] to bring it back.
    pub fn kill(&mut self) {
        // SAFETY: kill(2) on the pid of our child, not reaped yet (the
        // handle reaps it on drop), so the pid cannot have been reused.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while crate::port_accepts(self.addr().port()) {
            assert!(Instant::now() < deadline, "sluice-sync outlived SIGKILL");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
