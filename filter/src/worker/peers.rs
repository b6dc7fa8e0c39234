//! The other workers' wake-up queues, resolved once each.

use crate::host::Host;
use sluice_core::admission::WorkerId;
use sluice_core::shared_keys;
use std::cell::RefCell;
use std::collections::HashMap;

pub struct Peers {
    vm_id: String,
    queues: RefCell<HashMap<WorkerId, u32>>,
}

impl Peers {
    pub fn new(vm_id: String) -> Peers {
        Peers {
            vm_id,
            queues: RefCell::new(HashMap::new()),
        }
    }

    /// Tells `peer` it has granted tickets to claim.
    pub fn wake<H: Host>(&self, host: &H, peer: WorkerId) {
        let queue = self.queue(host, peer);
        match queue.map(|q| host.enqueue_shared_queue(q, b"w")) {
            Some(Ok(())) => {}
            // The tick's claim is the backstop: a worker whose wake-up is
            // lost (its VM replaced by a config update) still polls.
            other => log::debug!("cannot wake worker {peer}: {other:?}"),
        }
    }

    fn queue<H: Host>(&self, host: &H, peer: WorkerId) -> Option<u32> {
        if let Some(q) = self.queues.borrow().get(&peer) {
            return Some(*q);
        }
        let q = host
            .resolve_shared_queue(&self.vm_id, &shared_keys::wake_queue(peer))
            .ok()??;
        self.queues.borrow_mut().insert(peer, q);
        Some(q)
    }
}
