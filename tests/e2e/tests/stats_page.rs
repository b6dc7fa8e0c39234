//! The stats JSON where the configuration puts it (`stats.path`), or
//! nowhere (`stats.enable: false`): in the real Envoy, the path Sluice no
//! longer answers reaches the backend. Needs `make wasm` and
//! `cargo build --release -p sluice-backend`.

use serde_json::json;
use sluice_harness::http::HttpResponse;
use sluice_harness::{Backend, Envoy, FrontProxy};
use std::time::Duration;

/// admin:pw
const AUTH: &str = "Basic YWRtaW46cHc=";

fn get(envoy: &Envoy, path: &str, auth: bool) -> HttpResponse {
    let mut request = envoy.request("GET", path).timeout(Duration::from_secs(5));
    if auth {
        request = request.header("authorization", AUTH);
    }
    request.send().unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Whether the backend answered (Envoy adds this header to upstream
/// responses only) and Sluice did not.
fn from_backend(response: &HttpResponse) -> bool {
    response.header("x-envoy-upstream-service-time").is_some()
        && response.header("x-sluice-reason").is_none()
}

fn start(backend: &Backend, stats: serde_json::Value, ui: serde_json::Value) -> Envoy {
    let config = json!({
        "service": "moved",
        "stats": stats,
        "ui": ui,
        "endpoints": {"/predict": {"capacity": 2}},
    });
    Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 2)
}

#[test]
fn stats_served_at_the_configured_path_and_the_old_one_reaches_the_backend() {
    let backend = Backend::start(&["/predict:service_ms=10"]);
    let envoy = start(
        &backend,
        json!({"path": "/ops/sluice/stats"}),
        json!({"enable": true, "path": "/ops/sluice/ui", "username": "admin", "password": "pw"}),
    );

    let denied = get(&envoy, "/ops/sluice/stats", false);
    assert_eq!(denied.status, 401, "{denied:?}");
    let stats = get(&envoy, "/ops/sluice/stats", true);
    assert_eq!(stats.status, 200, "{stats:?}");
    assert_eq!(stats.header("x-sluice-reason"), Some("stats"));
    let doc = stats.json();
    assert_eq!(doc["service"], "moved");
    assert_eq!(doc["endpoints"]["/predict"]["capacity"], 2);
    // The page polls the moved path.
    let page = get(&envoy, "/ops/sluice/ui", true);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.text().contains("\"/ops/sluice/stats\""), "{}", page.text());

    // fastapi-balancer's path is the application's now, with or without
    // credentials.
    for auth in [false, true] {
        let old = get(&envoy, "/balancer/stats", auth);
        assert!(from_backend(&old), "{old:?}");
    }
}

#[test]
fn stats_disabled_answers_nothing_and_everything_reaches_the_backend() {
    let backend = Backend::start(&["/predict:service_ms=10"]);
    let envoy = start(&backend, json!({"enable": false}), json!({}));
    for path in ["/balancer/stats", "/balancer/ui"] {
        let response = get(&envoy, path, false);
        assert!(from_backend(&response), "{path}: {response:?}");
    }
    // Admission is unchanged.
    let predict = envoy
        .request("POST", "/predict")
        .timeout(Duration::from_secs(5))
        .send()
        .unwrap();
    assert_eq!(predict.status, 200, "{predict:?}");
    assert_eq!(
        backend.path_stats("/predict")["completed"].as_u64(),
        Some(1)
    );
}

#[test]
fn the_dashboard_without_stats_is_refused_at_start() {
    let backend = Backend::start(&["/predict:service_ms=10"]);
    let config = json!({
        "stats": {"enable": false},
        "ui": {"enable": true},
        "endpoints": {"/predict": {"capacity": 2}},
    });
    let (_, log) = Envoy::start_expecting_failure(
        &FrontProxy::new(backend.port(), config.to_string()),
        1,
    );
    assert!(
        log.contains("ui.enable: the dashboard reads the stats JSON"),
        "{log}"
    );
}

