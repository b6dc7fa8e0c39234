//! Closed-loop clients against the test backend, served in-process.

use sluice_backend::{route::RouteSpec, Options, Server};
use sluice_loadgen::{run_closed_loop, ClosedLoop};
use std::time::Duration;

async fn backend(route: &str) -> std::net::SocketAddr {
    let opts = Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        routes: vec![route.parse::<RouteSpec>().unwrap()],
        threads: 1,
        workers: None,
        trace: false,
        name: None,
    };
    let server = Server::bind(&opts).await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.serve());
    addr
}

#[tokio::test]
async fn clients_keep_the_path_busy_for_the_duration() {
    let addr = backend("/p:capacity=2,service_ms=20").await;
    let spec = ClosedLoop::new(addr, "/p", 4, Duration::from_millis(400));
    let report = run_closed_loop(&spec).await;
    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(report.aborted, 0);
    // 2 slots of 20 ms for 0.4 s: about 40 answers.
    let ok = report.status(200);
    assert!((25..=45).contains(&ok), "{report:?}");
    assert_eq!(report.sent, ok);
    assert!(report.ok_per_second() > 50.0, "{report:?}");
}

#[tokio::test]
async fn aborts_close_the_connection_and_the_client_carries_on() {
    let addr = backend("/p:capacity=1,service_ms=30").await;
    let mut spec = ClosedLoop::new(addr, "/p", 3, Duration::from_millis(500));
    spec.abort_share = 0.5;
    spec.abort_within = Duration::from_millis(60);
    let report = run_closed_loop(&spec).await;
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(report.aborted > 0 && report.status(200) > 0, "{report:?}");
    assert_eq!(report.sent, report.aborted + report.status(200));
}
