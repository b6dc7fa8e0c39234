//! The root context: one per plugin VM (each worker thread, the main thread,
//! and a short-lived canary at each configuration). It reads the
//! configuration, creates the shared records, takes a worker index, and
//! hands its worker to every HTTP context it creates. Process-wide duties
//! (the sync stream, health checks) are the leader's: every root context is
//! a candidate (`leader`).

use crate::admin::Dashboard;
use crate::host::{Envoy, Host};
use crate::leader::Leader;
use crate::routes::Routes;
use crate::stream::Stream;
use crate::worker::{Worker, BASE_TICK};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, MapType};
use sluice_core::config::FilterConfig;
use sluice_core::lease::Holder;
use sluice_core::sync_config::CalloutConfig;
use sluice_core::{admission, config_seen, queued_bytes, services, worker_ids};
use std::cell::RefCell;
use std::rc::Rc;

pub struct Root<H> {
    host: H,
    /// `None` until configured.
    worker: RefCell<Option<Rc<Worker<H>>>>,
    /// What this VM needs to stand for the lease once it has an index.
    candidacy: RefCell<Option<Candidacy>>,
    leader: RefCell<Option<Leader<H>>>,
}

struct Candidacy {
    started_ns: u64,
    config_since_ns: u64,
    callouts: CalloutConfig,
}

impl<H: Host + Clone> Root<H> {
    pub fn new(host: H) -> Root<H> {
        Root {
            host,
            worker: RefCell::new(None),
            candidacy: RefCell::new(None),
            leader: RefCell::new(None),
        }
    }

    /// Takes the plugin configuration (JSON text) of the VM `vm_id`. An error
    /// names what is wrong; the plugin must then fail to start.
    pub fn configure(&mut self, configuration: &str, vm_id: String) -> Result<(), String> {
        let FilterConfig {
            config,
            ui,
            callouts,
        } = FilterConfig::from_json_str(configuration)
            .map_err(|e| format!("invalid configuration: {e}"))?;
        let first = config_seen::first_to_see(&self.host, configuration);
        if first {
            for w in &config.warnings {
                log::warn!("{w}");
            }
        }
        for w in &callouts.warnings {
            log::warn!("{w}");
        }
        let mut routes = Routes::new(&config);
        routes.shares = callouts.sync.as_ref().is_some_and(|s| s.shares);
        for (_, key) in routes
            .endpoints
            .iter()
            .filter_map(|r| r.queued_bytes.as_ref())
        {
            queued_bytes::ensure(&self.host, key).map_err(|e| format!("shared data {key}: {e}"))?;
        }
        worker_ids::ensure(&self.host).map_err(|e| format!("shared data: {e}"))?;
        if first {
            log::info!(
                "service {:?}, {} endpoints",
                config.service,
                config.endpoints.len()
            );
            // Before this configuration's records are touched: a rename
            // under load leaves the old records busy (docs/filter.md).
            let paths: Vec<&str> = config.endpoints.iter().map(|e| e.path.as_str()).collect();
            for r in services::note(&self.host, &config.service, &paths) {
                log::warn!(
                    "service {:?} has {} requests in flight on {} in this vm_id, now configured \
                     as service {:?}: if this is a rename, old listeners still draining admit \
                     into {:?}'s records and new ones into {:?}'s, so until the drain ends the \
                     backend may see both capacities at once; rename with a restart or after \
                     draining (docs/filter.md, \"Renaming service or changing vm_id\")",
                    r.old_service,
                    r.in_flight,
                    r.path,
                    config.service,
                    r.old_service,
                    config.service
                );
            }
        }
        let mut worker = Worker::new(self.host.clone(), vm_id, routes);
        worker.dashboard = Dashboard::new(&ui);
        let worker = Rc::new(worker);
        // Create every endpoint's record before traffic (Envoy runs this on
        // the main thread before any worker VM exists, and a write to a
        // missing key ignores CAS) and apply this configuration's
        // capacities, in force at once on every worker, old VMs included.
        let now = self.host.now_ns();
        for route in &worker.routes.endpoints {
            let key = &route.key;
            // Through the worker's host, so the capacity gauge follows.
            let wakeups = admission::configure(&worker.host, key, route.configured, now)
                .map_err(|e| format!("shared data {key}: {e}"))?;
            worker.wake(&wakeups);
            // The static instances (none: a set an older configuration gave
            // leaves; one sync discovered stays).
            let wakeups = admission::set_instances(
                &worker.host,
                key,
                &route.hosts,
                admission::InstanceSource::Config,
                now,
            )
            .map_err(|e| format!("shared data {key}: {e}"))?;
            worker.wake(&wakeups);
        }
        // The lease and the leader's duties run on the base tick, from the
        // first tick on, once this VM has its worker index (the canary VM is
        // destroyed before its first tick, so it never takes an index nor
        // opens a stream).
        *self.candidacy.borrow_mut() = Some(Candidacy {
            started_ns: now,
            config_since_ns: config_seen::config_since(
                &self.host,
                &config.service,
                configuration,
                now,
            ),
            callouts,
        });
        worker.set_idle_tick(BASE_TICK);
        worker.start();
        *self.worker.borrow_mut() = Some(worker);
        Ok(())
    }

    /// This worker's wake-up queue has messages.
    pub fn wake_up(&self, queue_id: u32) {
        // The messages carry nothing: being woken means "claim your grants".
        while let Ok(Some(_)) = self.host.dequeue_shared_queue(queue_id) {}
        if let Some(w) = self.worker.borrow().as_ref() {
            w.claim_granted();
        }
    }

    pub fn tick(&self) {
        let Some(w) = self.worker.borrow().clone() else {
            return;
        };
        w.tick();
        // A candidate for the lease from the first tick that has an index.
        if self.leader.borrow().is_none() {
            if let Some(id) = w.taken_id() {
                if let Some(c) = self.candidacy.borrow_mut().take() {
                    let me = Holder {
                        worker: id,
                        started_ns: c.started_ns,
                        config_since_ns: c.config_since_ns,
                    };
                    *self.leader.borrow_mut() = Some(Leader::new(Rc::clone(&w), me, c.callouts));
                }
            }
        }
        if let Some(l) = self.leader.borrow_mut().as_mut() {
            l.tick();
        }
    }

    pub fn on_grpc_message(&self, token: u32, message: &[u8]) {
        if let Some(l) = self.leader.borrow_mut().as_mut() {
            l.on_grpc_message(token, message);
        }
    }

    pub fn on_grpc_close(&self, token: u32, grpc_status: u32) {
        if let Some(l) = self.leader.borrow_mut().as_mut() {
            l.on_grpc_close(token, grpc_status);
        }
    }

    pub fn on_http_response(&self, token: u32, status: Option<u32>) {
        if let Some(l) = self.leader.borrow_mut().as_mut() {
            l.on_http_response(token, status);
        }
    }

    /// The VM is going away (Envoy's `on_done`): slots it holds for
    /// abandoned requests go back now, as no tick will release them.
    /// Its worker index goes back for a later VM to reuse.
    pub fn done(&self) {
        // A leader hands over at once.
        if let Some(l) = self.leader.borrow_mut().as_mut() {
            l.done();
        }
        *self.leader.borrow_mut() = None;
        let worker = self.worker.borrow_mut().take();
        if let Some(w) = worker {
            w.release_all_held();
            w.metrics.flush(&w.host);
            if let Some(id) = w.taken_id() {
                if let Err(e) = worker_ids::free(&self.host, id) {
                    log::warn!("cannot free worker index {id}: {e}");
                }
            }
        }
    }

    #[cfg(test)]
    pub fn worker_id(&self) -> Option<sluice_core::admission::WorkerId> {
        self.worker.borrow().as_ref().and_then(|w| w.taken_id())
    }

    /// The state of a new request; `None` before configuration.
    pub fn new_stream(&self, context_id: u32) -> Option<Stream<H>> {
        let worker = self.worker.borrow().clone()?;
        Some(Stream::new(worker, context_id))
    }
}

impl Context for Root<Envoy> {
    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        // Already without the 5-byte gRPC frame header.
        match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, message_size) {
            Ok(bytes) => self.on_grpc_message(token_id, &bytes.unwrap_or_default()),
            Err(e) => log::warn!("sync: cannot read a message: {e:?}"),
        }
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        self.on_grpc_close(token_id, status_code);
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        _body_size: usize,
        _num_trailers: usize,
    ) {
        // No `:status` when Envoy gave up on the call (timeout, reset).
        let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| s.parse().ok());
        self.on_http_response(token_id, status);
    }

    fn on_done(&mut self) -> bool {
        self.done();
        true
    }
}

impl RootContext for Root<Envoy> {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let vm_id = self
            .get_property(vec!["plugin_vm_id"])
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        match self.configure(&text, vm_id) {
            Ok(()) => true,
            Err(e) => {
                // Returning false fails plugin start: Envoy refuses the config.
                log::error!("{e}");
                false
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        self.wake_up(queue_id);
    }

    fn on_tick(&mut self) {
        self.tick();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(self.new_stream(context_id)?))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
