//! What the filter serves about itself: the stats JSON, the dashboard page,
//! and the HTTP Basic guard in front of both. Read only on those paths,
//! never on a watched request's.

mod dashboard;
mod stats;
pub mod status;

pub use dashboard::Dashboard;

use crate::host::Host;
use crate::metrics::Metrics;
use crate::routes::Routes;
use sluice_core::admission::WorkerId;

/// Where the filter answers with its stats JSON unless `stats.path` says
/// otherwise (fastapi-balancer's path), for the tests.
#[cfg(test)]
pub const STATS_PATH: &str = sluice_core::config::DEFAULT_STATS_PATH;

/// Answers the request for normalised `path` if it is the stats or the
/// dashboard (or either without valid credentials); whether it did. They win
/// over any endpoint (a prefix `/` included); the stats path only for reads:
/// other methods are the application's business, and so is every method
/// with `stats.enable: false`. `worker` is the index of the answering
/// worker, if it has one yet.
pub fn answer<H: Host>(
    host: &H,
    dashboard: &Dashboard,
    routes: &Routes,
    metrics: &Metrics,
    worker: Option<WorkerId>,
    path: &str,
) -> bool {
    if dashboard.stats_path() == Some(path) {
        let method = host.get_http_request_header(":method").unwrap_or_default();
        if method != "GET" && method != "HEAD" {
            return false;
        }
        // Asks for credentials when the dashboard has them.
        if !dashboard.answer(host, path) {
            stats::send(host, routes, metrics, worker, &dashboard.stats_cache);
        }
        return true;
    }
    dashboard.answer(host, path)
}
