//! The dashboard in a real browser: Debian's chromium, headless, driven by
//! `tests/e2e/browser/dashboard.mjs` (playwright-core; `make deps` installs
//! both) against the page served by the filter in the real Envoy, during a
//! burst. Set `SLUICE_SCREENSHOT=docs/dashboard.png` to refresh the README's
//! picture from this run.

use serde_json::{json, Value};
use sluice_harness::{workspace_root, Backend, Envoy, FrontProxy};
use sluice_loadgen::{run_blocking, Burst};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const USER: &str = "admin";
const PASSWORD: &str = "s3cret:with colon";

fn browser_dir() -> PathBuf {
    workspace_root().join("tests/e2e/browser")
}

/// Runs the driver; its JSON report.
fn drive(options: &Value) -> Value {
    let dir = browser_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir()
            && PathBuf::from("/usr/bin/chromium").is_file(),
        "chromium or playwright-core is missing: run `make deps`"
    );
    let out = Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .arg(options.to_string())
        .current_dir(&dir)
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser driver failed:\n{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("driver report ({e}): {stdout}"))
}

/// Starts `n` requests to `path`, `spacing` apart, in the background. They
/// outlive the test; Envoy going away ends them.
fn load(envoy: &Envoy, path: &str, n: usize, spacing: Duration) {
    let mut burst = Burst::new(envoy.listener_addr(), path, n);
    burst.spacing = spacing;
    std::thread::spawn(move || run_blocking(&burst));
}

#[test]
fn dashboard_in_chromium_matches_the_stats_and_asks_for_credentials() {
    let backend = Backend::start(&[
        "/predict:service_ms=120000",
        "/embed:service_ms=120000",
        "/score:service_ms=120000",
    ]);
    let config = json!({
        "service": "demo",
        "ui": {"enable": true, "username": USER, "password": PASSWORD, "refresh": 0.5},
        // The page shows each class's queue and what became of its requests.
        "classes": {"interactive": {"priority": 10}, "default": {"priority": 1}},
        "endpoints": {
            "/predict": {"capacity": 4, "queue_timeout": 120, "max_queue": 100},
            "/embed": {"capacity": 10, "queue_timeout": 120},
            "/score": {"capacity": 10, "queue_timeout": 120},
        }
    });
    let envoy = Envoy::start(&FrontProxy::new(backend.port(), config.to_string()), 2);
    let screenshot = envoy.work_dir().join("dashboard.png");
    let options = json!({
        "url": format!("http://{}/balancer/ui", envoy.listener_addr()),
        "username": USER,
        "password": PASSWORD,
        "minPoints": 5,
        // 12 s of history for the picture.
        "screenshotPoints": 40,
        "screenshot": screenshot,
        "timeoutMs": 60000,
        "expect": {
            "/predict": {"in_flight": 4, "queued": 6},
            "/embed": {"in_flight": 8},
            "/score": {"in_flight": 2},
        },
    });
    let driver = std::thread::spawn(move || drive(&options));
    // Once the page polls (4 refused requests, the page's challenge and its
    // load, then polls), a ramp, so the chart has a shape: /predict fills
    // its 4 slots, then 6 wait (red, badge); /embed reaches 80 % (yellow);
    // /score 20 % (green).
    envoy.wait_stat(
        "http.sluice_front.downstream_rq_completed",
        Duration::from_secs(60),
        |n| n >= 8,
    );
    load(&envoy, "/predict", 10, Duration::from_millis(700));
    load(&envoy, "/embed", 8, Duration::from_millis(900));
    load(&envoy, "/score", 2, Duration::from_millis(3000));
    let report = driver.join().expect("driver thread");

    let challenge = Some("Basic realm=\"sluice\"");
    for path in ["/balancer/ui", "/balancer/stats"] {
        let denied = &report["denied"][path];
        assert_eq!(denied["status"], 401, "{path}: {report}");
        assert_eq!(denied["challenge"].as_str(), challenge, "{path}");
        let browser = denied["browser"].as_str().unwrap_or_default();
        assert!(
            browser.contains("ERR_INVALID_AUTH_CREDENTIALS"),
            "{path}: {browser}"
        );
    }
    // The page matched /balancer/stats once the whole burst had arrived.
    let matched = &report["matched"];
    assert_eq!(matched["/predict"]["in_flight"], 4, "{report}");
    assert_eq!(matched["/predict"]["queued"], 6, "{report}");
    assert_eq!(matched["/predict"]["colour"], "red");
    assert_eq!(matched["/predict"]["badge"], "6 waiting");
    let classes = &matched["/predict"]["classes"];
    assert_eq!(classes["default"]["queued"], 6, "{report}");
    assert_eq!(classes["default"]["admitted"], "4");
    assert_eq!(classes["interactive"]["queued"], 0);
    assert_eq!(matched["/embed"]["colour"], "yellow");
    assert_eq!(matched["/score"]["colour"], "green");
    for (path, points) in report["points"].as_object().expect("points") {
        assert!(points.as_u64() >= Some(5), "{path}: {points} points");
    }
    assert_eq!(
        report["outside"],
        json!([]),
        "the page fetched from elsewhere"
    );
    assert_eq!(report["errors"], json!([]), "script errors on the page");

    // The same as any client: stats need the credentials too.
    let anonymous = envoy.request("GET", "/balancer/stats").send().unwrap();
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.header("www-authenticate"), challenge);
    let wrong = envoy
        .request("GET", "/balancer/ui")
        .header("authorization", "Basic YWRtaW46c2VjcmV0")
        .send()
        .unwrap();
    assert_eq!(wrong.status, 401, "wrong password let in");

    if let Ok(dest) = std::env::var("SLUICE_SCREENSHOT") {
        std::fs::copy(&screenshot, workspace_root().join(dest)).expect("copy screenshot");
    }
}
