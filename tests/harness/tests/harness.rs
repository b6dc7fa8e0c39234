//! The harness itself: each fixture starts, answers, reports and is gone
//! after drop.

use sluice_harness::http::{self, Request};
use sluice_harness::{empty_wasm_path, Backend, Envoy, FrontProxy, Redis, RespValue};
use std::path::Path;
use std::time::Duration;

fn process_is_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

const PLUGIN_CONFIG: &str = r#"{"service":"e2e","endpoints":{"/predict":{"capacity":2,"queue_timeout":2,"max_queue":100}}}"#;

#[test]
fn backend_serves_reports_and_resets() {
    let backend = Backend::start(&["/predict:capacity=1,service_ms=10", "/fast"]);
    let response = Request::new("POST", backend.addr(), "/predict?x=1")
        .header("x-seq", "7")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["path"], "/predict");
    assert_eq!(backend.arrivals("/predict"), ["7"]);
    assert_eq!(backend.path_stats("/predict")["completed"], 1);
    backend.reset();
    assert_eq!(backend.path_stats("/predict")["completed"], 0);
    assert!(backend.arrivals("/predict").is_empty());

    let pid = backend.pid();
    drop(backend);
    assert!(process_is_gone(pid), "backend {pid} still runs after drop");
}

#[test]
fn redis_answers_and_is_gone_after_drop() {
    let redis = Redis::start();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_eq!(
        redis.command(&["SET", "sluice:k", "v"]),
        RespValue::Simple("OK".into())
    );
    assert_eq!(
        redis.command(&["GET", "sluice:k"]).as_str().as_deref(),
        Some("v")
    );
    assert_eq!(redis.command(&["GET", "missing"]), RespValue::Bulk(None));
    assert_eq!(redis.command(&["INCR", "n"]), RespValue::Integer(1));
    let pid = redis.pid();
    drop(redis);
    assert!(process_is_gone(pid), "redis {pid} still runs after drop");
}

#[test]
fn plain_envoy_proxies_to_the_backend() {
    let backend = Backend::start(&["/predict"]);
    let proxy = FrontProxy::without_wasm(backend.port());
    let envoy = Envoy::start(&proxy, 2);
    for _ in 0..4 {
        let response = envoy.request("GET", "/predict").send().unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.header("server"), Some("envoy"));
    }
    assert_eq!(backend.path_stats("/predict")["completed"], 4);
    assert!(envoy
        .stats_text()
        .contains("cluster.backend.upstream_rq_total"));
    assert_eq!(envoy.stat("cluster.backend.upstream_rq_200"), Some(4));
    assert_eq!(envoy.stat("no.such.stat"), None);
    assert!(envoy.workers_that_served() >= 1);
    envoy.wait_for_log("starting main dispatch loop", Duration::from_secs(5));
    let pid = envoy.pid();
    drop(envoy);
    assert!(process_is_gone(pid), "envoy {pid} still runs after drop");
}

#[test]
fn envoy_runs_the_sluice_and_the_empty_filter() {
    let backend = Backend::start(&["/predict"]);
    let sluice = Envoy::start(&FrontProxy::new(backend.port(), PLUGIN_CONFIG), 2);
    let stats: serde_json::Value =
        serde_json::from_str(&sluice.get("/balancer/stats").unwrap()).unwrap();
    assert_eq!(stats["endpoints"]["/predict"]["capacity"], 2, "{stats}");
    assert_eq!(
        sluice.request("GET", "/predict").send().unwrap().status,
        200
    );

    let mut empty = FrontProxy::new(backend.port(), PLUGIN_CONFIG);
    empty.wasm_path = Some(empty_wasm_path());
    let empty = Envoy::start(&empty, 1);
    assert_eq!(empty.request("GET", "/predict").send().unwrap().status, 200);
    assert_eq!(backend.path_stats("/predict")["completed"], 2);
}

#[test]
fn lds_updates_are_applied_and_rejections_reported() {
    let backend = Backend::start(&["/predict"]);
    let mut proxy = FrontProxy::new(backend.port(), PLUGIN_CONFIG);
    proxy.use_lds = true;
    let envoy = Envoy::start(&proxy, 2);
    let capacity = || {
        let stats: serde_json::Value =
            serde_json::from_str(&envoy.get("/balancer/stats").unwrap()).unwrap();
        stats["endpoints"]["/predict"]["capacity"].clone()
    };
    assert_eq!(capacity(), 2);

    proxy.plugin_config_json = PLUGIN_CONFIG.replace("\"capacity\":2", "\"capacity\":7");
    envoy.update_lds(&proxy);
    assert_eq!(capacity(), 7);

    proxy.plugin_config_json = PLUGIN_CONFIG.replace("\"capacity\":2", "\"capacity\":0");
    let err = envoy
        .try_update_lds_yaml(&proxy.render_lds())
        .expect_err("capacity 0 must be rejected");
    assert!(err.contains("rejected"), "{err}");
    assert_eq!(
        capacity(),
        7,
        "a rejected update must leave the old listener"
    );
}

#[test]
fn envoy_that_refuses_its_config_exits_with_the_reason() {
    let backend = Backend::start(&["/predict"]);
    let mut proxy = FrontProxy::new(backend.port(), PLUGIN_CONFIG);
    proxy.wasm_path = Some("/nonexistent/sluice.wasm".into());
    let (status, log) = Envoy::start_expecting_failure(&proxy, 1);
    assert!(!status.success());
    assert!(log.contains("/nonexistent/sluice.wasm"), "{log}");
}

#[test]
fn small_http_client_reads_envoy_admin() {
    let backend = Backend::start(&[]);
    let envoy = Envoy::start(&FrontProxy::without_wasm(backend.port()), 1);
    // Admin answers chunked; the client must decode it.
    let ready = http::get(envoy.admin_addr(), "/ready").unwrap();
    assert_eq!((ready.status, ready.text().trim()), (200, "LIVE"));
    let mut envoy = envoy;
    assert_eq!(envoy.wait_exit(Duration::from_millis(100)), None);
}
