//! Per-endpoint admission across every worker of one Envoy process.
//!
//! Each endpoint has one shared-data record (its *key*) holding the number of
//! slots in use, the FIFO of waiting requests of all workers, and the
//! capacity in force. Every operation is one read-modify-CAS-write of that
//! record, so the record is the single source of truth: capacity holds
//! exactly whatever the number of workers, and a capacity change (from sync,
//! or from a new Envoy configuration) reaches every worker, old VMs still
//! draining included, with the read the request path does anyway.
//!
//! A freed slot is *handed over*: `release` does not lower `active` while
//! someone waits; it marks the oldest waiter `granted` (the slot stays
//! counted) and names that waiter's worker to be woken. The woken worker
//! `claim`s its granted tickets and resumes those requests. New arrivals can
//! never overtake a waiter, because a slot is only free when nobody waits.
//! A paused request can only be resumed by its own worker (Envoy), which is
//! why waiters carry their worker index.
//!
//! With instances (`instances:` in the configuration, or discovered by
//! sync), the record also holds each instance's slots in use: a request is
//! admitted when some instance has room, and [`acquire`] says which one (see
//! [`instances`]). Every operation that can hand out a slot takes the host's
//! time, which passive ejection needs.
//!
//! With `cost`, the record counts units instead of requests ([`cost`]):
//! a request holds its cost in units, and a slot is handed over only when
//! the units of the next waiter fit.
//!
//! The record's layout is in [`record`].

pub mod cost;
mod instances;
mod record;

pub use cost::OverCapacity;
pub use instances::{Ejection, InstanceSource, Pin, MAX_INSTANCES};
pub use record::{tag_before, CapacitySource, EndpointState, Instance, Share, ShareLease, Waiter};

use std::net::SocketAddr;

use crate::cas::{self, MAX_CAS_ATTEMPTS};
use crate::shared_data::{SharedData, StoreError};

/// Identifies one VM (root context) of the plugin; see the filter for how it
/// is allocated.
pub type WorkerId = u16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionError {
    Store(StoreError),
    /// The record could not be decoded (another plugin wrote our key, or a
    /// different Sluice version shares the vm_id).
    Corrupt(&'static str),
    /// More than [`MAX_CAS_ATTEMPTS`] conflicts in a row.
    Contention,
    /// A release with no slot in use: a bug, reported rather than hidden.
    ReleaseWithoutSlot,
    /// More instances than one record holds ([`MAX_INSTANCES`]).
    TooManyInstances(usize),
}

impl std::fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdmissionError::Store(e) => write!(f, "{e}"),
            AdmissionError::Corrupt(why) => write!(f, "endpoint record is corrupt: {why}"),
            AdmissionError::Contention => {
                write!(f, "gave up after {MAX_CAS_ATTEMPTS} CAS conflicts")
            }
            AdmissionError::ReleaseWithoutSlot => f.write_str("release with no slot in use"),
            AdmissionError::TooManyInstances(n) => {
                write!(
                    f,
                    "{n} instances, more than the {MAX_INSTANCES} one endpoint holds"
                )
            }
        }
    }
}

// `Store` is transparent: its Display is the store error's own, so it names
// no `source()` (a report would print the same text twice).
impl std::error::Error for AdmissionError {}

impl From<StoreError> for AdmissionError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Contention => AdmissionError::Contention,
            e => AdmissionError::Store(e),
        }
    }
}
/// Workers that must be told they have granted tickets to claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wakeups(Vec<WorkerId>);

impl Wakeups {
    pub(super) fn add(&mut self, w: WorkerId) {
        if !self.0.contains(&w) {
            self.0.push(w);
        }
    }
    pub fn workers(&self) -> &[WorkerId] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Adds the workers of `other`.
    pub fn merge(&mut self, other: &Wakeups) {
        for &w in &other.0 {
            self.add(w);
        }
    }
}

/// How the request of a released slot fared upstream, for passive ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The instance answered.
    Served,
    /// The instance refused the connection or reset it before answering.
    Failed,
    /// Nothing is known (client gone, Envoy's own reply).
    Unknown,
}

/// What a [`release`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    pub wakeups: Wakeups,
    /// The instance was taken out of picking by this failure.
    pub ejected: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// A slot is held: forward the request (to this instance, if the
    /// endpoint has instances), `release` at its end.
    Admitted(Option<SocketAddr>),
    /// Pause the request; its worker will be woken when `ticket` is granted.
    /// `backlog`: the requests waiting ahead of it, and the slots.
    Queued { ticket: u32, backlog: Backlog },
    /// `max_queue` requests already wait (or its class's `max_queue`):
    /// answer queue-full.
    QueueFull(Backlog),
    /// No free slot, and its class is sheddable (never queued): answer
    /// queue-full at once.
    Shed(Backlog),
    /// The backend is marked unhealthy: answer 503 at once. Holds nothing.
    Unhealthy,
    /// It costs more units than the largest capacity it could run under
    /// (given here), and its endpoint refuses such requests
    /// ([`OverCapacity::Refuse`]): answer `too-costly` at once.
    TooCostly(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    /// The waiter left the queue and holds nothing.
    Removed,
    /// The waiter had just been granted a slot: the caller holds it now (on
    /// this instance, these units) and must either forward the request or
    /// `release`.
    Granted(Option<SocketAddr>, u32),
    /// No such ticket (already claimed).
    NotFound,
}

/// What a worker's `claim` found for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    /// Tickets that now hold a slot (on this instance, of these units):
    /// resume those requests (or release).
    pub granted: Vec<(u32, Option<SocketAddr>, u32)>,
    /// Tickets taken out of the queue because the backend is unhealthy:
    /// answer those requests 503. They hold nothing.
    pub refused: Vec<u32>,
    /// Tickets a request of a higher class pushed out of a full queue:
    /// answer those queue-full. They hold nothing.
    pub pushed_out: Vec<u32>,
    pub wakeups: Wakeups,
}

/// What stood in the way of a refused request: the requests waiting ahead
/// of where it would have queued, and the slots they drain through, so the
/// refusal can say when a retry would find room (`Retry-After`). With
/// `cost`, both in units (the requests ahead: their costs together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub ahead: u32,
    /// The capacity in force (with instances, of those that can be
    /// picked); 0: none.
    pub slots: u32,
}

/// The class a request arrives in ([`acquire_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    /// Its index in the configuration's classes (0 without classes).
    pub index: u8,
    /// Higher is served first.
    pub priority: u8,
    /// At most this many of its class wait at once (the endpoint's
    /// `max_queue` bounds them all together as well).
    pub max_queue: Option<u32>,
    /// Admitted only when a slot is free; never queued.
    pub sheddable: bool,
    /// Its tenant's flow, and the tag units one request takes in it
    /// ([`tag_step`] of the tenant's weight); a step of 0: no tenants.
    pub flow: u8,
    pub step: u32,
    /// The units the request holds (at least 1; 1 without `cost`), and
    /// what becomes of it when that is more than the whole capacity.
    pub cost: u32,
    pub over_capacity: OverCapacity,
}

/// Flows an endpoint's tenants map onto, at most.
pub const MAX_FLOWS: usize = 255;

/// Fair queueing's units for one request of a tenant of `weight` (1 to
/// 1000): a weight of 3 takes a third of a weight of 1's, so it gets three
/// slots to the other's one while both wait.
pub fn tag_step(weight: u32) -> u32 {
    const UNIT: u32 = 3_000;
    UNIT / weight.clamp(1, 1000)
}

impl Class {
    /// The one class of an endpoint without `classes`.
    pub const DEFAULT: Class = Class {
        index: 0,
        priority: 0,
        max_queue: None,
        sheddable: false,
        flow: 0,
        step: 0,
        cost: 1,
        over_capacity: OverCapacity::Alone,
    };
}

/// One read-modify-CAS-write of the record at `key` ([`cas::update`]).
/// `op` returns its result and whether it changed the state (no write if not).
fn update<S: SharedData, R>(
    store: &S,
    key: &str,
    mut op: impl FnMut(&mut EndpointState) -> Result<(R, bool), AdmissionError>,
) -> Result<R, AdmissionError> {
    cas::update(store, key, |value| {
        // A missing key reads as the neutral state; `configure` creates keys
        // before traffic because a write to a missing key ignores CAS.
        let mut state = match value {
            Some(bytes) => EndpointState::from_stored(bytes)?,
            None => EndpointState::default(),
        };
        let (result, changed) = op(&mut state)?;
        Ok((result, changed.then(|| state.encode())))
    })
}

/// Creates the endpoint's record with neutral values if it does not exist.
/// Never touches a live record. Call it before the endpoint sees traffic
/// (Envoy runs `on_configure` on the main thread before the workers' VMs).
pub fn ensure<S: SharedData>(store: &S, key: &str) -> Result<(), AdmissionError> {
    match store.get(key)? {
        Some((bytes, _)) => EndpointState::from_stored(&bytes).map(|_| ()),
        None => Ok(store.set(key, &EndpointState::default().encode(), 0)?),
    }
}

/// A configuration that gives the endpoint `configured` as its capacity is
/// being applied (by each of Envoy's N+2 `on_configure`s of it).
///
/// The most recent change wins: the configured value replaces the capacity
/// in force only when it differs from the last configured one (an operator
/// changed it); the same configuration seen again by another VM leaves a
/// capacity that sync set since alone. An endpoint configured without a
/// capacity keeps a capacity sync gave it. Creates the record if needed.
pub fn configure<S: SharedData>(
    store: &S,
    key: &str,
    configured: Option<u32>,
    now_ns: u64,
) -> Result<Wakeups, AdmissionError> {
    ensure(store, key)?;
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        if s.configured == configured {
            return Ok((wake, false));
        }
        s.configured = configured;
        match configured {
            Some(c) => {
                s.capacity = Some(c);
                s.source = CapacitySource::Config;
            }
            None if s.source == CapacitySource::Config => s.capacity = None,
            None => {}
        }
        // A raise (or a capacity removed) admits waiters at once.
        s.pump(now_ns, &mut wake);
        Ok((wake, true))
    })
}

/// A sync snapshot of `version` says the endpoint takes `capacity`. `None`
/// when the record already holds a newer version (the snapshot is ignored);
/// otherwise the workers whose waiters a raise admitted.
pub fn apply_sync<S: SharedData>(
    store: &S,
    key: &str,
    capacity: u32,
    version: u64,
    now_ns: u64,
) -> Result<Option<Wakeups>, AdmissionError> {
    update(store, key, |s| {
        if version < s.sync_version {
            return Ok((None, false));
        }
        let mut wake = Wakeups::default();
        if capacity == 0
            || (s.capacity == Some(capacity)
                && s.source == CapacitySource::Sync
                && s.sync_version == version)
        {
            return Ok((Some(wake), false));
        }
        s.capacity = Some(capacity);
        s.source = CapacitySource::Sync;
        s.sync_version = version;
        // Raised: the oldest waiters get the new slots now. Lowered: nothing
        // is cut; releases grant nothing until fewer than `capacity` are in
        // flight.
        s.pump(now_ns, &mut wake);
        Ok((Some(wake), true))
    })
}

/// This Envoy's shares of the endpoint's pools (`sync.shares`), from
/// sync's latest grant: `endpoint` for an endpoint without instances, and
/// one per instance; an instance `instances` does not name holds 0 (a pool
/// a grant does not list is 0). `None` ends sharing: the capacities hold
/// whole again. A lowered share cuts nothing (new admissions wait until
/// fewer are in flight); a raised one admits waiters at once.
pub fn set_shares<S: SharedData>(
    store: &S,
    key: &str,
    shares: Option<&EndpointShares>,
    now_ns: u64,
) -> Result<Wakeups, AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        let before = (s.share, s.share_lease, s.instances.clone());
        match shares {
            None => {
                s.share = None;
                s.share_lease = ShareLease::default();
                for i in s.instances.iter_mut() {
                    i.share = None;
                }
            }
            Some(shares) => {
                s.share = Some(shares.endpoint);
                s.share_lease = shares.lease;
                for i in s.instances.iter_mut() {
                    let granted = shares.instances.iter().find(|(a, _)| *a == i.address);
                    i.share = Some(granted.map_or(Share::default(), |&(_, share)| share));
                }
            }
        }
        let changed = (s.share, s.share_lease, &s.instances) != (before.0, before.1, &before.2);
        let pumped = s.pump(now_ns, &mut wake);
        Ok((wake, changed || pumped))
    })
}

/// One endpoint's part of a grant ([`set_shares`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointShares {
    pub endpoint: Share,
    pub instances: Vec<(SocketAddr, Share)>,
    pub lease: ShareLease,
}

/// Marks the endpoint's backend unhealthy or healthy again. Returns the
/// workers to wake: every worker with waiters when it turns unhealthy (they
/// answer them 503), the granted ones when it recovers.
pub fn set_unhealthy<S: SharedData>(
    store: &S,
    key: &str,
    unhealthy: bool,
    now_ns: u64,
) -> Result<Wakeups, AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        if s.unhealthy == unhealthy {
            return Ok((wake, false));
        }
        s.unhealthy = unhealthy;
        if unhealthy {
            for w in &s.waiters {
                wake.add(w.worker);
            }
        } else {
            s.pump(now_ns, &mut wake);
        }
        Ok((wake, true))
    })
}

/// Reads the record without changing it.
pub fn snapshot<S: SharedData>(store: &S, key: &str) -> Result<EndpointState, AdmissionError> {
    match store.get(key)? {
        Some((bytes, _)) => EndpointState::from_stored(&bytes),
        None => Ok(EndpointState::default()),
    }
}

/// A request arrives at `worker`, in the one class of an endpoint without
/// classes ([`acquire_as`]).
pub fn acquire<S: SharedData>(
    store: &S,
    key: &str,
    max_queue: u32,
    worker: WorkerId,
    pin: Option<Pin>,
    now_ns: u64,
) -> Result<(Acquired, Wakeups), AdmissionError> {
    acquire_as(store, key, max_queue, worker, pin, Class::DEFAULT, now_ns)
}

/// A request of `class` arrives at `worker`; at most `max_queue` may wait.
/// With instances, it is admitted on the instance [`EndpointState::pick`]
/// chooses; a `pin` (sticky session) admits it on its own instance only, or
/// queues it for that one. It queues behind every waiter of its priority or
/// higher; in a full queue it pushes out the newest waiter of the lowest
/// priority below its own, whose worker is woken to answer it.
pub fn acquire_as<S: SharedData>(
    store: &S,
    key: &str,
    max_queue: u32,
    worker: WorkerId,
    pin: Option<Pin>,
    class: Class,
    now_ns: u64,
) -> Result<(Acquired, Wakeups), AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        if s.unhealthy {
            return Ok(((Acquired::Unhealthy, wake), false));
        }
        let pumped = s.pump(now_ns, &mut wake);
        let cost = class.cost.max(1);
        if class.over_capacity == OverCapacity::Refuse && s.too_costly(cost) {
            let largest = s.largest_capacity().unwrap_or(0);
            return Ok(((Acquired::TooCostly(largest), wake), pumped));
        }
        // Its place among its tenant's requests (a request admitted at once
        // counts too, so that a tenant that keeps every slot busy has its
        // next waiters behind the others'), charged by its cost.
        let tag = if class.step > 0 && usize::from(class.flow) < MAX_FLOWS {
            s.tag(class.flow, cost::charge(class.step, cost))
        } else {
            0
        };
        // No backfill: a waiter that would be served before it goes first,
        // even when its own (smaller) cost fits now. Asked only once there
        // is room: without cost, room after pumping means nobody waits.
        let waits_ahead = |s: &EndpointState| {
            s.waiters[..s.insert_at(class.priority, tag)]
                .iter()
                .any(|w| w.waiting() && !w.pinned)
        };
        let (admitted, pinned) = if s.picks_instances() {
            let (room, pinned) = match pin.and_then(|p| s.sticky_instance(p, now_ns)) {
                Some(i) => (
                    s.has_room(usize::from(i), cost, now_ns).then_some(i),
                    Some(i),
                ),
                None => {
                    let turn = s.turn;
                    match s.pick(cost, now_ns) {
                        Some(_) if waits_ahead(s) => {
                            s.turn = turn;
                            (None, None)
                        }
                        picked => (picked, None),
                    }
                }
            };
            (room.map(Some), pinned)
        } else {
            let fits = cost::fits(s.active, cost, s.limit(now_ns)) && !waits_ahead(s);
            (fits.then_some(None), None)
        };
        if let Some(instance) = admitted {
            s.active = s.active.saturating_add(cost);
            s.served_tag(tag);
            let address = instance.map(|i| {
                let inst = &mut s.instances[usize::from(i)];
                inst.active = inst.active.saturating_add(cost);
                inst.address
            });
            return Ok(((Acquired::Admitted(address), wake), true));
        }
        let backlog = |s: &EndpointState| Backlog {
            ahead: s.queued_units(),
            slots: s.total_capacity(now_ns).unwrap_or(0),
        };
        if class.sheddable {
            return Ok(((Acquired::Shed(backlog(s)), wake), pumped));
        }
        if class
            .max_queue
            .is_some_and(|m| s.queued_of(class.index) >= m)
        {
            return Ok(((Acquired::QueueFull(backlog(s)), wake), pumped));
        }
        if s.queued() >= max_queue {
            let Some(victim) = s.push_out_victim(class.priority) else {
                return Ok(((Acquired::QueueFull(backlog(s)), wake), pumped));
            };
            let v = &mut s.waiters[victim];
            v.pushed_out = true;
            wake.add(v.worker);
        }
        let ticket = s.next_ticket;
        s.next_ticket = s.next_ticket.wrapping_add(1);
        let at = s.insert_at(class.priority, tag);
        s.waiters.insert(
            at,
            Waiter {
                ticket,
                worker,
                granted: false,
                instance: pinned,
                pinned: pinned.is_some(),
                pushed_out: false,
                class: class.index,
                priority: class.priority,
                flow: class.flow,
                tag,
                cost,
            },
        );
        let backlog = Backlog {
            ahead: s.waiters[..at]
                .iter()
                .filter(|w| w.waiting())
                .fold(0u32, |n, w| n.saturating_add(w.cost)),
            slots: s.total_capacity(now_ns).unwrap_or(0),
        };
        Ok(((Acquired::Queued { ticket, backlog }, wake), true))
    })
}

/// A request of one unit (an endpoint without `cost`) that held a slot
/// has ended ([`release_units`]).
pub fn release<S: SharedData>(
    store: &S,
    key: &str,
    instance: Option<SocketAddr>,
    outcome: Outcome,
    ejection: Ejection,
    now_ns: u64,
) -> Result<Released, AdmissionError> {
    release_units(store, key, instance, 1, outcome, ejection, now_ns)
}

/// A request that held `units` (on `instance`, if it was picked) has
/// ended; they go to the waiters in serving order. A `Failed` outcome
/// ejects the instance for its back-off; a `Served` one ends its ejection.
pub fn release_units<S: SharedData>(
    store: &S,
    key: &str,
    instance: Option<SocketAddr>,
    units: u32,
    outcome: Outcome,
    ejection: Ejection,
    now_ns: u64,
) -> Result<Released, AdmissionError> {
    update(store, key, |s| {
        if s.active == 0 || s.active < units {
            return Err(AdmissionError::ReleaseWithoutSlot);
        }
        s.active -= units;
        let mut out = Released::default();
        if let Some(i) = instance.and_then(|a| s.instance_index(&a)) {
            let inst = &mut s.instances[i];
            inst.active = inst.active.saturating_sub(units);
            match outcome {
                Outcome::Served => inst.strikes = 0,
                Outcome::Failed => {
                    inst.strikes = inst.strikes.saturating_add(1);
                    inst.eject_until_ns = now_ns.saturating_add(ejection.backoff_ns(inst.strikes));
                    out.ejected = true;
                }
                Outcome::Unknown => {}
            }
            s.drop_gone();
        }
        s.pump(now_ns, &mut out.wakeups);
        Ok((out, true))
    })
}

/// Envoy sent a request of `units` picked for `picked` to `served` instead
/// (the pick was not in its cluster): the books follow what really runs. Returns the
/// instance the request now counts against (`served`, if it is one of the
/// set) and the workers a slot freed on `picked` woke. `picked` is ejected
/// like an instance that failed: picking it again would only miss again
/// until Envoy's cluster has it.
pub fn missed<S: SharedData>(
    store: &S,
    key: &str,
    picked: SocketAddr,
    served: Option<SocketAddr>,
    units: u32,
    ejection: Ejection,
    now_ns: u64,
) -> Result<(Option<SocketAddr>, Wakeups), AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        let Some(i) = s.instance_index(&picked) else {
            return Ok(((None, wake), false));
        };
        let inst = &mut s.instances[i];
        inst.active = inst.active.saturating_sub(units);
        inst.picks_missed = inst.picks_missed.saturating_add(1);
        inst.strikes = inst.strikes.saturating_add(1);
        inst.eject_until_ns = now_ns.saturating_add(ejection.backoff_ns(inst.strikes));
        let now_on = served.and_then(|a| s.instance_index(&a)).map(|j| {
            let inst = &mut s.instances[j];
            inst.active = inst.active.saturating_add(units);
            inst.address
        });
        s.drop_gone();
        s.pump(now_ns, &mut wake);
        Ok(((now_on, wake), true))
    })
}

/// Replaces the endpoint's instance set with `hosts` (address, own
/// capacity; `None`: the endpoint's). A configuration's set is ignored once
/// sync discovered one. At most [`MAX_INSTANCES`]; more is refused.
pub fn set_instances<S: SharedData>(
    store: &S,
    key: &str,
    hosts: &[(SocketAddr, Option<u32>)],
    source: InstanceSource,
    now_ns: u64,
) -> Result<Wakeups, AdmissionError> {
    if hosts.len() > MAX_INSTANCES {
        return Err(AdmissionError::TooManyInstances(hosts.len()));
    }
    ensure(store, key)?;
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        if source == InstanceSource::Config && s.instances_from_sync {
            return Ok((wake, false));
        }
        let mut changed = s.replace_instances(hosts, source);
        if source == InstanceSource::Sync && !s.instances_from_sync {
            s.instances_from_sync = true;
            changed = true;
        }
        changed |= s.pump(now_ns, &mut wake);
        Ok((wake, changed))
    })
}

/// Per-instance capacities from sync for a set the configuration gave:
/// each named instance of the set takes its figure (the others keep theirs).
pub fn set_instance_capacities<S: SharedData>(
    store: &S,
    key: &str,
    capacities: &[(SocketAddr, u32)],
    now_ns: u64,
) -> Result<Wakeups, AdmissionError> {
    update(store, key, |s| {
        let mut wake = Wakeups::default();
        let mut changed = false;
        for &(address, c) in capacities {
            if let Some(i) = s.instance_index(&address) {
                let inst = &mut s.instances[i];
                if c > 0 && (inst.own_capacity != Some(c) || !inst.own_from_sync) {
                    inst.own_capacity = Some(c);
                    inst.own_from_sync = true;
                    changed = true;
                }
            }
        }
        changed |= s.pump(now_ns, &mut wake);
        Ok((wake, changed))
    })
}

/// Takes the tickets granted to `worker` out of the queue; each now holds a
/// slot and its request must be resumed (or released). Also hands out any
/// slots that are free (a backstop for lost wake-ups and capacity raises).
/// While the backend is unhealthy, takes all of `worker`'s tickets out
/// instead, giving back the slots of granted ones: every one is refused.
pub fn claim<S: SharedData>(
    store: &S,
    key: &str,
    worker: WorkerId,
    now_ns: u64,
) -> Result<Claimed, AdmissionError> {
    update(store, key, |s| {
        let mut claimed = Claimed::default();
        if s.unhealthy {
            let mut freed: u32 = 0;
            let mut freed_on = Vec::new();
            s.waiters.retain(|w| {
                if w.worker != worker {
                    return true;
                }
                if w.granted {
                    freed = freed.saturating_add(w.cost);
                    freed_on.extend(w.instance.map(|i| (i, w.cost)));
                }
                claimed.refused.push(w.ticket);
                false
            });
            s.active = s.active.saturating_sub(freed);
            for (i, units) in freed_on {
                let inst = &mut s.instances[usize::from(i)];
                inst.active = inst.active.saturating_sub(units);
            }
            let changed = !claimed.refused.is_empty();
            return Ok((claimed, changed));
        }
        let pumped = s.pump(now_ns, &mut claimed.wakeups);
        let instances = &s.instances;
        s.waiters.retain(|w| {
            if w.worker != worker {
                true
            } else if w.granted {
                let on = w.instance.map(|i| instances[usize::from(i)].address);
                claimed.granted.push((w.ticket, on, w.cost));
                false
            } else if w.pushed_out {
                claimed.pushed_out.push(w.ticket);
                false
            } else {
                true
            }
        });
        let changed = pumped || !claimed.granted.is_empty() || !claimed.pushed_out.is_empty();
        Ok((claimed, changed))
    })
}

/// A waiter leaves the queue (timed out, or its client went away).
pub fn withdraw<S: SharedData>(
    store: &S,
    key: &str,
    ticket: u32,
) -> Result<Withdrawn, AdmissionError> {
    update(store, key, |s| {
        match s.waiters.iter().position(|w| w.ticket == ticket) {
            None => Ok((Withdrawn::NotFound, false)),
            Some(i) => {
                let w = s.waiters.remove(i);
                let on = w.instance.map(|i| s.instances[usize::from(i)].address);
                Ok((
                    if w.granted {
                        Withdrawn::Granted(on, w.cost)
                    } else {
                        Withdrawn::Removed
                    },
                    true,
                ))
            }
        }
    })
}

#[cfg(test)]
mod cost_tests;
#[cfg(test)]
mod instance_tests;
#[cfg(test)]
mod share_tests;
#[cfg(test)]
mod tests;
