//! The filter's side of "who may watch" (docs/sync.md): with `sync.token`
//! it sends `authorization: Bearer <token>` on its Watch stream, which a
//! sync started with `--token-file` accepts; a wrong token is refused and
//! the filter says so in its sync status. The token shows nowhere.

use serde_json::{json, Value};
use sluice_harness::{
    wait_until, Backend, Envoy, FrontProxy, Redis, ScratchDir, SyncService, SYNC_CLUSTER,
};
use sluice_loadgen::{run_blocking, Burst};
use std::time::Duration;

const TOKEN: &str = "s3cret-token";
const WRONG: &str = "not-the-token";

/// The filter's stats, read by their length (the harness client waits for
/// the close, which Envoy delays after a local reply).
fn stats_text(envoy: &Envoy) -> String {
    let got = run_blocking(&Burst::new(envoy.listener_addr(), "/balancer/stats", 1));
    assert_eq!(got[0].status, 200, "{:?}", got[0]);
    got[0].body.clone()
}

fn stats(envoy: &Envoy) -> Value {
    serde_json::from_str(&stats_text(envoy)).expect("stats JSON")
}

#[test]
fn the_filter_sends_its_sync_token_and_reports_a_refusal() {
    let redis = Redis::start();
    let dir = ScratchDir::new("sync-token");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let sync = SyncService::start(
        &redis.url(),
        &["--token-file", token_file.to_str().unwrap()],
    );
    let backend = Backend::start(&["/k"]);
    let envoy_with = |token: &str| {
        let config = json!({
            "service": "e2e",
            "endpoints": {"/k": {"capacity": 2}},
            "sync": {"cluster": SYNC_CLUSTER, "heartbeat_timeout": 3, "token": token},
        });
        let mut proxy = FrontProxy::new(backend.port(), config.to_string());
        proxy.extra_clusters_yaml = sync.cluster_yaml();
        Envoy::start(&proxy, 2)
    };
    let right = envoy_with(TOKEN);
    let wrong = envoy_with(WRONG);
    wait_until(Duration::from_secs(10), "the right token's stream", || {
        let s = stats(&right);
        (s["sync"]["state"] == "connected").then_some(())
    });
    let refused = wait_until(Duration::from_secs(10), "the wrong token refused", || {
        let s = stats(&wrong);
        (s["sync"]["refused"] == "unauthenticated").then_some(s)
    });
    assert_ne!(refused["sync"]["state"], "connected", "{refused}");
    assert_eq!(refused["sync"]["last_close_grpc_status"], 16, "{refused}");
    // Still refused a while later (reopened with backoff), never connected.
    std::thread::sleep(Duration::from_millis(1500));
    let later = stats(&wrong);
    assert_eq!(later["sync"]["refused"], "unauthenticated", "{later}");
    assert!(
        wrong.log().contains("refused the stream: unauthenticated"),
        "{}",
        wrong.log()
    );
    for (envoy, token) in [(&right, TOKEN), (&wrong, WRONG)] {
        assert!(
            !stats_text(envoy).contains(token),
            "the stats show the token"
        );
        assert!(!envoy.log().contains(token), "Envoy's log shows the token");
    }
}
