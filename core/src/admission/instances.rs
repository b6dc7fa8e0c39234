//! Picking an instance for each admitted request, as HAProxy's per-server
//! `maxconn` does: the endpoint's record holds every instance's slots in use,
//! so each instance is held to its own capacity across all of Envoy's
//! workers, and the filter steers the request there (Envoy's `override_host`
//! load balancer, see `docs/filter.md`).

use super::cost::fits;
use super::record::{EndpointState, Instance};
use crate::cas::fnv1a;
use std::net::SocketAddr;

/// Most instances one endpoint's record holds (the record is read and
/// written whole by every admission).
pub const MAX_INSTANCES: usize = 256;

/// How long an instance that failed stays out of picking: `base_ns` after
/// its first failure in a row, doubling with each further one up to `max_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub base_ns: u64,
    pub max_ns: u64,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            base_ns: 1_000_000_000,
            max_ns: 30_000_000_000,
        }
    }
}

impl Ejection {
    /// The back-off after `strikes` failures in a row (at least 1).
    pub fn backoff_ns(&self, strikes: u8) -> u64 {
        let doublings = u32::from(strikes.saturating_sub(1)).min(32);
        self.base_ns
            .saturating_mul(1u64 << doublings)
            .min(self.max_ns.max(self.base_ns))
    }
}

/// Who gave the record its instance set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceSource {
    /// `instances.hosts` of the plugin configuration.
    Config,
    /// Discovered by sync (DNS): replaces the configuration's from then on.
    Sync,
}

/// What sticks a request to an instance: the hash of its session key (the
/// sticky header or cookie), mapped by rendezvous hashing, so a set that
/// changes moves only the sessions of the instances that left or joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin(pub u64);

impl Pin {
    pub fn of(session: &[u8]) -> Pin {
        Pin(fnv1a(session))
    }
}

/// What a session's weight on one instance hashes: the pin, then the
/// instance's address as bytes (no text, no allocation per instance).
fn rendezvous_key(pin: Pin, address: &SocketAddr) -> [u8; 26] {
    let mut key = [0; 26];
    key[..8].copy_from_slice(&pin.0.to_le_bytes());
    let ip = match address.ip() {
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(ip) => ip.octets(),
    };
    key[8..24].copy_from_slice(&ip);
    key[24..].copy_from_slice(&address.port().to_le_bytes());
    key
}

impl EndpointState {
    /// Whether admissions pick an instance: the endpoint has a set with at
    /// least one instance still in it.
    pub fn picks_instances(&self) -> bool {
        self.instances.iter().any(|i| !i.gone)
    }

    /// The capacity of instance `i` for this endpoint; without one (neither
    /// its own nor the endpoint's), no limit.
    pub fn capacity_of(&self, i: &Instance) -> u32 {
        i.own_capacity.or(self.capacity).unwrap_or(u32::MAX)
    }

    /// What this Envoy may run on instance `i` at `now_ns`: its capacity,
    /// and no more than this Envoy's share of it when it shares it.
    pub fn limit_of(&self, i: &Instance, now_ns: u64) -> u32 {
        let capacity = self.capacity_of(i);
        match i.share {
            Some(share) => capacity.min(share.at(&self.share_lease, now_ns)),
            None => capacity,
        }
    }

    /// The sum of the capacities of the instances that can be picked at
    /// `now_ns`, or the endpoint's capacity without instances.
    pub fn total_capacity(&self, now_ns: u64) -> Option<u32> {
        if !self.picks_instances() {
            return self.capacity.map(|c| c.min(self.limit(now_ns)));
        }
        let mut total: u32 = 0;
        for i in self
            .instances
            .iter()
            .filter(|i| !i.gone && !i.ejected(now_ns))
        {
            let c = i.own_capacity.or(self.capacity)?;
            total = total.saturating_add(c.min(self.limit_of(i, now_ns)));
        }
        Some(total)
    }

    pub fn instance_index(&self, address: &SocketAddr) -> Option<usize> {
        self.instances.iter().position(|i| i.address == *address)
    }

    /// Instance `i` can take one more request of `cost` units at `now_ns`:
    /// in the set, not ejected, the units fit its capacity (or it runs
    /// alone, [`fits`]), and, on trial after an ejection, idle.
    pub(super) fn has_room(&self, i: usize, cost: u32, now_ns: u64) -> bool {
        let inst = &self.instances[i];
        if inst.gone || inst.ejected(now_ns) {
            return false;
        }
        if inst.strikes > 0 {
            return inst.active == 0;
        }
        fits(inst.active, cost, self.limit_of(inst, now_ns))
    }

    /// A pin to instance `i` still holds: it is in the set and not ejected.
    /// A pin that no longer holds is dropped: the request goes anywhere.
    pub(super) fn pin_holds(&self, i: u16, now_ns: u64) -> bool {
        self.instances
            .get(usize::from(i))
            .is_some_and(|inst| !inst.gone && !inst.ejected(now_ns))
    }

    /// Chooses the instance for one more request of `cost` units and
    /// advances the turn: the least loaded (units in flight over capacity)
    /// with room for it; among equally loaded ones, the first after the
    /// last pick, so load spreads.
    pub(super) fn pick(&mut self, cost: u32, now_ns: u64) -> Option<u16> {
        let n = self.instances.len();
        if n == 0 {
            return None;
        }
        let start = (usize::from(self.turn) + 1) % n;
        let mut best: Option<(usize, u64, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !self.has_room(i, cost, now_ns) {
                continue;
            }
            let inst = &self.instances[i];
            let (load, cap) = (
                u64::from(inst.active),
                u64::from(self.limit_of(inst, now_ns)),
            );
            // load / cap < best_load / best_cap, without division.
            let better = match best {
                None => true,
                Some((_, bl, bc)) => load * bc < bl * cap,
            };
            if better {
                best = Some((i, load, cap));
            }
        }
        let (i, _, _) = best?;
        // n <= MAX_INSTANCES.
        self.turn = i as u16;
        Some(i as u16)
    }

    /// The instance a session sticks to: rendezvous hashing over the
    /// instances that are in the set and not ejected at `now_ns`.
    pub(super) fn sticky_instance(&self, pin: Pin, now_ns: u64) -> Option<u16> {
        let mut best: Option<(u64, usize)> = None;
        for (i, inst) in self.instances.iter().enumerate() {
            if inst.gone || inst.ejected(now_ns) {
                continue;
            }
            let weight = fnv1a(&rendezvous_key(pin, &inst.address));
            if best.is_none_or(|(w, _)| weight > w) {
                best = Some((weight, i));
            }
        }
        best.map(|(_, i)| i as u16)
    }

    /// Replaces the instance set with `hosts` (address, own capacity):
    /// instances that stay keep their counts, strikes and back-off; those
    /// that left are gone (dropped once nothing runs on them); new ones are
    /// picked at once. `own_from_sync` capacities survive a configuration's
    /// replacement. Returns whether anything changed.
    pub(super) fn replace_instances(
        &mut self,
        hosts: &[(SocketAddr, Option<u32>)],
        source: InstanceSource,
    ) -> bool {
        let before = self.instances.clone();
        for inst in self.instances.iter_mut() {
            match hosts.iter().find(|(a, _)| *a == inst.address) {
                Some(&(_, own)) => {
                    inst.gone = false;
                    if source == InstanceSource::Sync || !inst.own_from_sync {
                        inst.own_capacity = own;
                        inst.own_from_sync = source == InstanceSource::Sync && own.is_some();
                    }
                }
                None => inst.gone = true,
            }
        }
        for &(address, own) in hosts {
            if self.instance_index(&address).is_none() && self.instances.len() < MAX_INSTANCES {
                let mut inst = Instance::new(address, own);
                inst.own_from_sync = source == InstanceSource::Sync && own.is_some();
                // Shared: a newcomer holds nothing until a grant names it.
                inst.share = self.share.map(|_| super::record::Share::default());
                self.instances.push(inst);
            }
        }
        self.drop_gone();
        self.instances != before
    }

    /// Drops the instances that left the set and run nothing any more,
    /// renumbering the waiters' references to those that stay.
    pub(super) fn drop_gone(&mut self) {
        if !self.instances.iter().any(|i| i.gone && i.active == 0) {
            return;
        }
        let mut map = Vec::with_capacity(self.instances.len());
        let mut kept = 0u16;
        for inst in &self.instances {
            if inst.gone && inst.active == 0 {
                map.push(None);
            } else {
                map.push(Some(kept));
                kept += 1;
            }
        }
        self.instances.retain(|i| !(i.gone && i.active == 0));
        for w in self.waiters.iter_mut() {
            w.instance = w.instance.and_then(|i| map[usize::from(i)]);
            if w.instance.is_none() {
                w.pinned = false;
            }
        }
        self.turn = map
            .get(usize::from(self.turn))
            .copied()
            .flatten()
            .unwrap_or(0);
    }
}
