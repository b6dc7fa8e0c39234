//! Every shared-data key the filter uses, in one place (the table is in
//! `docs/filter.md`). All start with `sluice:`: Istio's WasmPlugin sets no
//! `vm_id`, so every plugin on a proxy shares one namespace. Keys never go
//! away in Envoy, so there is a key per endpoint and per process, never one
//! per request or client.

use crate::admission::WorkerId;

/// Worker indices handed out so far (`worker_ids`).
pub const WORKERS: &str = "sluice:workers";
/// Indices of VMs that are gone, for reuse (`worker_ids`).
pub const WORKERS_FREE: &str = "sluice:workers:free";
/// Hash of the last configuration whose warnings were logged (`config_seen`).
pub const CONFIG_LOGGED: &str = "sluice:config-logged";
/// Set once some VM has said Envoy's timers are coarse (`config_seen`).
pub const COARSE_TIMER_LOGGED: &str = "sluice:coarse-timer-logged";
/// The services configured in this `vm_id`, newest last (`services`).
pub const SERVICES: &str = "sluice:services";

/// One endpoint's admission record (`admission`).
pub fn endpoint(service: &str, path: &str) -> String {
    format!("sluice:{service}:ep:{path}")
}

/// Bytes the endpoint's queued requests announced (`queued_bytes`).
pub fn queued_bytes(endpoint_key: &str) -> String {
    format!("{endpoint_key}:queued-bytes")
}

/// The endpoint's published upstream duration (`abandon`).
pub fn upstream_estimate(endpoint_key: &str) -> String {
    format!("{endpoint_key}:upstream-ns")
}

/// When a request of the endpoint was last abandoned after every recent
/// duration (`abandon`): the completions no longer bound its durations.
pub fn outlived(endpoint_key: &str) -> String {
    format!("{endpoint_key}:outlived-ns")
}

/// The leader lease of a service (`lease`).
pub fn leader(service: &str) -> String {
    format!("sluice:{service}:leader")
}

/// When the service's current configuration first appeared (`config_seen`).
pub fn config_since(service: &str) -> String {
    format!("sluice:{service}:config")
}

/// The leader's report (sync, health) for the stats, JSON.
pub fn status(service: &str) -> String {
    format!("sluice:{service}:status")
}

/// Not a shared-data key: the shared queue that wakes worker `id`. Envoy
/// notifies only the last VM that registered a name, so each has its own.
pub fn wake_queue(id: WorkerId) -> String {
    format!("sluice:wake:{id}")
}
