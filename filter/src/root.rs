//! The root context: one per plugin VM (each worker thread, the main thread,
//! and a short-lived canary at each configuration). It reads the
//! configuration, creates the shared records, takes a worker index, and
//! hands its worker to every HTTP context it creates. Process-wide duties
//! that only one root context should do belong here too.

use crate::dashboard::Dashboard;
use crate::host::{Envoy, Host};
use crate::routes::Routes;
use crate::stream::Stream;
use crate::worker::Worker;
use crate::worker_ids;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use sluice_core::admission;
use sluice_core::config::Config;
use std::rc::Rc;

pub struct Root<H> {
    host: H,
    /// `None` until configured.
    worker: Option<Rc<Worker<H>>>,
}

impl<H: Host + Clone> Root<H> {
    pub fn new(host: H) -> Root<H> {
        Root { host, worker: None }
    }

    /// Takes the plugin configuration (JSON text) of the VM `vm_id`. An error
    /// names what is wrong; the plugin must then fail to start.
    pub fn configure(&mut self, configuration: &str, vm_id: String) -> Result<(), String> {
        let config = Config::from_json_str(configuration)
            .map_err(|e| format!("invalid configuration: {e}"))?;
        let first = crate::config_log::first_to_see(&self.host, configuration);
        if first {
            for w in &config.warnings {
                log::warn!("{w}");
            }
        }
        let routes = Routes::new(&config);
        // Create every endpoint's record before traffic. Envoy runs this on
        // the main thread before any worker VM exists, and a write to a
        // missing key ignores CAS, so creating later could race.
        for key in routes.keys() {
            admission::ensure(&self.host, key).map_err(|e| format!("shared data {key}: {e}"))?;
        }
        for (_, key) in routes
            .endpoints
            .iter()
            .filter_map(|r| r.queued_bytes.as_ref())
        {
            crate::queued_bytes::ensure(&self.host, key)
                .map_err(|e| format!("shared data {key}: {e}"))?;
        }
        worker_ids::ensure(&self.host).map_err(|e| format!("shared data: {e}"))?;
        if first {
            log::info!(
                "service {:?}, {} endpoints",
                config.service,
                config.endpoints.len()
            );
        }
        let mut worker = Worker::new(self.host.clone(), vm_id, routes);
        worker.dashboard = Dashboard::from_configuration(configuration)?;
        worker.start();
        self.worker = Some(Rc::new(worker));
        Ok(())
    }

    /// This worker's wake-up queue has messages.
    pub fn wake_up(&self, queue_id: u32) {
        // The messages carry nothing: being woken means "claim your grants".
        while let Ok(Some(_)) = self.host.dequeue_shared_queue(queue_id) {}
        if let Some(w) = &self.worker {
            w.claim_granted();
        }
    }

    pub fn tick(&self) {
        if let Some(w) = &self.worker {
            w.tick();
        }
    }

    /// The VM is going away (Envoy's `on_done`): slots it holds for
    /// abandoned requests go back now, as no tick will release them.
    /// Its worker index goes back for a later VM to reuse.
    pub fn done(&mut self) {
        if let Some(w) = self.worker.take() {
            w.release_all_held();
            if let Some(id) = w.taken_id() {
                if let Err(e) = worker_ids::free(&self.host, id) {
                    log::warn!("cannot free worker index {id}: {e}");
                }
            }
        }
    }

    #[cfg(test)]
    pub fn worker_id(&self) -> Option<sluice_core::admission::WorkerId> {
        self.worker.as_ref().and_then(|w| w.taken_id())
    }

    /// The state of a new request; `None` before configuration.
    pub fn new_stream(&self, context_id: u32) -> Option<Stream<H>> {
        let worker = self.worker.clone()?;
        Some(Stream::new(worker, context_id))
    }
}

impl Context for Root<Envoy> {
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
