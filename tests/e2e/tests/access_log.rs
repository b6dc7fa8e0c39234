//! Envoy's own access log tells Sluice's local replies apart from the
//! upstream's: the front-proxy recipe's shipped access-log format (stdout,
//! `%RESPONSE_CODE_DETAILS%`), run with a tighter `/predict` (capacity 1,
//! 1 s queue, one waiter) and health checks, against a real backend.
//! Needs `make wasm` and `cargo build --release -p sluice-backend`.

use sluice_harness::http::HttpResponse;
use sluice_harness::{wait_until, Backend, Envoy, Recipe};
use std::thread;
use std::time::Duration;

/// The recipe's `/predict` and its top level, as shipped.
const SHIPPED_ENDPOINT: &str =
    r#""/predict": {"capacity": 4, "queue_timeout": 2, "max_queue": 100}"#;
const SHIPPED_SERVICE: &str = r#""service": "demo","#;

fn send(envoy: &Envoy, method: &str, path: &str, auth: bool) -> HttpResponse {
    let mut request = envoy.request(method, path).timeout(Duration::from_secs(10));
    if auth {
        // admin:secret, the recipe's ui credentials.
        request = request.header("authorization", "Basic YWRtaW46c2VjcmV0");
    }
    request
        .send()
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn stats(envoy: &Envoy) -> serde_json::Value {
    send(envoy, "GET", "/balancer/stats", true).json()
}

#[test]
fn every_local_reply_names_itself_in_the_access_log() {
    let backend = Backend::start_with_args(&["--route", "/predict:capacity=4,service_ms=2000"]);
    let recipe = Recipe::load("front-proxy").upstream(8080, backend.port());
    let yaml = recipe.render();
    assert!(
        yaml.contains(SHIPPED_ENDPOINT) && yaml.contains(SHIPPED_SERVICE),
        "the front-proxy recipe changed; update this test"
    );
    assert!(
        yaml.contains("%RESPONSE_CODE_DETAILS%"),
        "the recipe's access log must show the details"
    );
    let yaml = yaml
        .replace(
            SHIPPED_ENDPOINT,
            r#""/predict": {"capacity": 1, "queue_timeout": 1, "max_queue": 1, "max_upload_time": 0.5}"#,
        )
        .replace(
            SHIPPED_SERVICE,
            // One line: it sits in a YAML block scalar.
            r#""service": "demo", "health_endpoint": "/__backend/health", "health_check_interval": 0.1, "health": {"cluster": "backend", "unhealthy_threshold": 1, "healthy_threshold": 1},"#,
        );
    let mut opts = recipe.envoy_options(2);
    opts.bootstrap_yaml = yaml;
    let envoy = Envoy::start_with(opts);

    assert_eq!(send(&envoy, "GET", "/balancer/stats", false).status, 401);
    assert_eq!(send(&envoy, "GET", "/balancer/stats", true).status, 200);
    assert_eq!(send(&envoy, "GET", "/balancer/ui", true).status, 200);
    wait_until(Duration::from_secs(5), "health checks pass", || {
        (stats(&envoy)["health"]["state"] == "healthy").then_some(())
    });

    // One in flight (2 s), one waiting (times out at 1 s), one more: the
    // queue is full. (Not watched through the stats: Envoy holds a local
    // reply's `connection: close` for its 1 s delayed-close timeout.)
    let (first, second, third) = thread::scope(|s| {
        let first = s.spawn(|| send(&envoy, "POST", "/predict", false));
        wait_until(Duration::from_secs(5), "the first is in flight", || {
            (backend.path_stats("/predict")["in_flight"] == 1).then_some(())
        });
        let second = s.spawn(|| send(&envoy, "POST", "/predict", false));
        thread::sleep(Duration::from_millis(300));
        let third = send(&envoy, "POST", "/predict", false);
        (first.join().unwrap(), second.join().unwrap(), third)
    });
    assert_eq!(
        (first.status, second.status, third.status),
        (200, 504, 503),
        "{first:?} {second:?} {third:?}"
    );

    // An admitted upload whose body stops coming: 408 at max_upload_time.
    let upload = {
        use std::io::{Read, Write};
        let addr = envoy.listener_addr();
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        let head = format!("POST /predict HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 10\r\n\r\nx");
        slow.write_all(head.as_bytes()).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") && slow.read(&mut byte).is_ok_and(|n| n == 1) {
            answer.push(byte[0]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    };
    assert!(upload.starts_with("HTTP/1.1 408"), "{upload}");

    let fail = sluice_harness::http::post(backend.addr(), "/__backend/health/fail", "").unwrap();
    assert_eq!(fail.status, 200, "{fail:?}");
    wait_until(
        Duration::from_secs(5),
        "the leader sees it unhealthy",
        || (stats(&envoy)["health"]["state"] == "unhealthy").then_some(()),
    );
    let unhealthy = send(&envoy, "POST", "/predict", false);
    assert_eq!(unhealthy.status, 503, "{unhealthy:?}");
    assert_eq!(unhealthy.header("x-sluice-reason"), Some("unhealthy"));

    // Every reply in the log, with what it was; Envoy flushes the access
    // log about once a second.
    let want = [
        ("GET /balancer/stats", "401 sluice_unauthorized"),
        ("GET /balancer/stats", "200 sluice_stats"),
        ("GET /balancer/ui", "200 sluice_dashboard"),
        ("POST /predict", "200 via_upstream"),
        ("POST /predict", "504 sluice_queue_timeout"),
        ("POST /predict", "503 sluice_queue_full"),
        ("POST /predict", "408 sluice_upload_timeout"),
        ("POST /predict", "503 sluice_unhealthy"),
    ];
    let missing = |log: &str| -> Vec<(&str, &str)> {
        want.iter()
            .copied()
            .filter(|(request, reply)| {
                !log.lines()
                    .any(|l| l.contains(&format!("\"{request} HTTP/1.1\" {reply} ")))
            })
            .collect()
    };
    let found = wait_until(Duration::from_secs(5), "the replies in the log", || {
        let log = envoy.log();
        missing(&log).is_empty().then_some(log)
    });
    // Nothing of Sluice's is logged as the upstream's, nor without details.
    for line in found.lines().filter(|l| l.contains("\"POST /predict")) {
        assert!(
            !line.contains(" 504 via_upstream") && !line.contains(" 503 via_upstream"),
            "{line}"
        );
    }
}
