//! The endpoint record's codec and the FIFO hand-over on it.
//!
//! Record layout (little endian), version 6:
//!
//! | bytes | field | |
//! |---|---|---|
//! | 1 | `version` | 6 |
//! | 4 | `active` | units in use (a request is 1 unit without `cost`), granted-but-unclaimed included |
//! | 4 | `next_ticket` | |
//! | 4 | `capacity` | in force; 0: none, requests pass (counted, never queued) |
//! | 4 | `configured` | the capacity of the last configuration seen; 0: none |
//! | 8 | `sync_version` | version of the snapshot that last set it; 0: never |
//! | 1 | `flags` | bit 0: capacity came from sync; bit 1: backend unhealthy; bit 2: the instance set came from sync; bit 3: the endpoint is a shared pool (`share` below) |
//! | 2 | `instances` | how many instance entries follow the header |
//! | 2 | `turn` | the instance picked last, where the next tie-break starts |
//! | 4 | `virtual_time` | fair queueing's clock: the start tag of the request served last (wrapping) |
//! | 1 | `flows` | how many flow finish tags follow the instances (0 without tenants) |
//! | 4 | `share` | with flag bit 3: this Envoy's share of the endpoint (sync's grant); 0 admits nothing |
//! | 4 | `share_fallback` | what it admits once the lease ran out, until `fallback_until_ns` |
//! | 8 | `share_until_ns` | host time the lease of every share in the record ends |
//! | 8 | `fallback_until_ns` | host time the fallback ends; then every share is 0 |
//!
//! then one 49-byte instance each (see [`Instance`]): `address` (family `4`
//! or `6`:u8, 16 address bytes, port:u16), `own_capacity:u32` (0: the
//! endpoint's), `active:u32` (units), `flags:u8` (bit 0 gone, bit 1 own capacity
//! from sync, bit 2 a shared pool), `strikes:u8`, `eject_until_ns:u64`,
//! `picks_missed:u32`, `share:u32`, `share_fallback:u32`;
//! then one `finish:u32` per flow (the tag its next request starts from);
//! then one 21-byte waiter each: `ticket:u32, worker:u16, flags:u16`
//! (bit 0 granted, bit 1 pinned, bit 2 pushed out), `instance:u16` (an
//! index into the instances, `0xffff`: none), `class:u8` (its index in the
//! configuration's classes), `priority:u8` (higher is served first),
//! `flow:u8` (its tenant's flow), `tag:u32` (its start tag), `cost:u32`
//! (the units it holds once granted, at least 1; see [`super::cost`]).
//!
//! Waiters are kept in the order they are served: by priority, highest
//! first; within one priority by start tag, lowest first (start-time fair
//! queueing over the tenants' flows, [`EndpointState::tag`]); then in arrival
//! order (without tenants every tag is 0: FIFO within a priority). A grant
//! goes to the first waiter in that order, and only when its cost fits:
//! nobody behind it is granted before it (no backfill).

use super::cost::fits;
use super::{AdmissionError, Wakeups, WorkerId};
use crate::cas::{u16_at, u32_at, u64_at};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const VERSION: u8 = 6;
pub(super) const HEADER_LEN: usize = 59;
pub(super) const INSTANCE_LEN: usize = 49;
pub(super) const WAITER_LEN: usize = 21;
pub(super) const FLOW_LEN: usize = 4;
const FLAG_GRANTED: u16 = 1;
const FLAG_PINNED: u16 = 2;
const FLAG_PUSHED_OUT: u16 = 4;
const FLAG_FROM_SYNC: u8 = 1;
const FLAG_UNHEALTHY: u8 = 2;
const FLAG_INSTANCES_FROM_SYNC: u8 = 4;
const FLAG_SHARED: u8 = 8;
const INSTANCE_GONE: u8 = 1;
const INSTANCE_OWN_FROM_SYNC: u8 = 2;
const INSTANCE_SHARED: u8 = 4;
const NO_INSTANCE: u16 = u16::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub ticket: u32,
    pub worker: WorkerId,
    /// A slot has been handed to this waiter; its worker has not claimed it yet.
    pub granted: bool,
    /// Index of its instance in [`EndpointState::instances`]: the one its
    /// slot is on once granted; before that, the one it is pinned to
    /// (sticky), if `pinned`.
    pub instance: Option<u16>,
    /// It waits for a slot on `instance` only (a sticky request).
    pub pinned: bool,
    /// A request of a higher class took its place in a full queue: its
    /// worker answers it (queue full) when it claims; it holds nothing.
    pub pushed_out: bool,
    /// Its class: an index into the configuration's classes.
    pub class: u8,
    /// Its class's priority when it arrived.
    pub priority: u8,
    /// Its tenant's flow (0 without tenants).
    pub flow: u8,
    /// Its start tag in fair queueing (0 without tenants): lower is served
    /// first within its priority. Compared wrapping ([`tag_before`]).
    pub tag: u32,
    /// The units it holds once granted (1 without `cost`).
    pub cost: u32,
}

/// `a` comes before `b` on fair queueing's wrapping clock.
pub fn tag_before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// Fair queueing's clock moves on to the start tag of a request served.
fn advance_clock(clock: &mut u32, tag: u32) {
    if tag_before(*clock, tag) {
        *clock = tag;
    }
}

impl Waiter {
    /// Still waiting for a slot (neither granted nor pushed out).
    pub fn waiting(&self) -> bool {
        !self.granted && !self.pushed_out
    }
}

/// One instance (`host:port`) of the service behind this endpoint, with its
/// own count of slots in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub address: SocketAddr,
    /// Its capacity for this endpoint; `None`: the endpoint's capacity.
    pub own_capacity: Option<u32>,
    /// `own_capacity` came from sync (a per-instance figure in Redis): a
    /// configuration seen again does not undo it.
    pub own_from_sync: bool,
    /// Units of the requests picked for it that have not ended (granted
    /// ones included): one per request without `cost`.
    pub active: u32,
    /// No longer in the set: never picked again, kept until `active` is 0.
    pub gone: bool,
    /// Failures (refused or reset connections) in a row.
    pub strikes: u8,
    /// Not picked before this host time (passive ejection); after it, one
    /// trial request at a time until one is served.
    pub eject_until_ns: u64,
    /// Requests picked for it that Envoy sent elsewhere.
    pub picks_missed: u32,
    /// This Envoy's part of the instance's capacity when several Envoys
    /// share it (`sync.shares`); `None`: not shared.
    pub share: Option<Share>,
}

/// This Envoy's part of a pool that several Envoys share (sync's grant,
/// docs/sync.md "Shares among Envoy replicas"). A flag, not a zero: a
/// share of 0 admits nothing, while a capacity of 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Share {
    /// What it admits while the lease runs (`share_until_ns`).
    pub slots: u32,
    /// What it admits after the lease, until `fallback_until_ns`; then 0.
    pub fallback: u32,
}

impl Share {
    /// What the share admits at `now_ns` under the record's lease.
    pub fn at(&self, lease: &ShareLease, now_ns: u64) -> u32 {
        if now_ns < lease.until_ns {
            self.slots
        } else if now_ns < lease.fallback_until_ns {
            self.fallback.min(self.slots)
        } else {
            0
        }
    }
}

/// When the shares of a record stop being valid (one grant gives them all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShareLease {
    pub until_ns: u64,
    pub fallback_until_ns: u64,
}

impl Instance {
    pub fn new(address: SocketAddr, own_capacity: Option<u32>) -> Instance {
        Instance {
            address,
            own_capacity,
            own_from_sync: false,
            active: 0,
            gone: false,
            strikes: 0,
            eject_until_ns: 0,
            picks_missed: 0,
            share: None,
        }
    }

    /// Out of picking at `now_ns` (ejected and its back-off not over).
    pub fn ejected(&self, now_ns: u64) -> bool {
        self.strikes > 0 && now_ns < self.eject_until_ns
    }
}

fn encode_address(out: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&[0; 12]);
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_le_bytes());
}

fn decode_address(b: &[u8]) -> Result<SocketAddr, AdmissionError> {
    let port = u16_at(b, 17).unwrap_or(0);
    let ip = match b[0] {
        4 => IpAddr::V4(Ipv4Addr::new(b[1], b[2], b[3], b[4])),
        6 => {
            let octets: [u8; 16] = b[1..17].try_into().unwrap_or([0; 16]);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err(AdmissionError::Corrupt("unknown address family")),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Who set the capacity in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CapacitySource {
    /// The plugin configuration (or none yet).
    #[default]
    Config,
    /// A snapshot of the sync service.
    Sync,
}

impl CapacitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            CapacitySource::Config => "config",
            CapacitySource::Sync => "sync",
        }
    }
}

/// The decoded shared record of one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointState {
    /// Units in use (one per request without `cost`), including those
    /// granted to waiters not yet claimed.
    pub active: u32,
    pub next_ticket: u32,
    /// The capacity in force; `None`: requests pass through (counted).
    pub capacity: Option<u32>,
    /// The capacity of the last configuration applied, to tell an operator's
    /// change from the same configuration seen again by another VM.
    pub configured: Option<u32>,
    pub source: CapacitySource,
    /// Version of the sync snapshot that last set `capacity` (0: never).
    pub sync_version: u64,
    /// The backend failed its health checks: new and queued requests get 503.
    pub unhealthy: bool,
    /// The instance set was discovered by sync: a configuration's static
    /// set no longer replaces it.
    pub instances_from_sync: bool,
    /// The instance picked last (ties are broken from the next one on).
    pub turn: u16,
    /// The instances the filter picks from; empty: none (the endpoint's
    /// capacity counts for everything behind this Envoy).
    pub instances: Vec<Instance>,
    /// Fair queueing's clock: the start tag of the request served last.
    pub virtual_time: u32,
    /// Each flow's finish tag: where its next request's tag starts.
    pub flows: Vec<u32>,
    /// This Envoy's share of the endpoint's capacity when several Envoys
    /// share it (an endpoint without instances); `None`: not shared.
    pub share: Option<Share>,
    /// How long the shares (the endpoint's and its instances') hold.
    pub share_lease: ShareLease,
    /// In arrival order.
    pub waiters: Vec<Waiter>,
}

fn nonzero(n: u32) -> Option<u32> {
    (n != 0).then_some(n)
}

impl EndpointState {
    pub fn decode(bytes: &[u8]) -> Result<Self, AdmissionError> {
        if bytes.is_empty() {
            return Err(AdmissionError::Corrupt("shorter than its header"));
        }
        if bytes[0] != VERSION {
            return Err(AdmissionError::Corrupt("unknown version"));
        }
        if bytes.len() < HEADER_LEN {
            return Err(AdmissionError::Corrupt("shorter than its header"));
        }
        // In bounds: the lengths are checked before each read.
        let (u16_at, u32_at) = (
            |b, i| u16_at(b, i).unwrap_or(0),
            |b, i| u32_at(b, i).unwrap_or(0),
        );
        let n = usize::from(u16_at(bytes, 26));
        let flows_at = HEADER_LEN + n * INSTANCE_LEN;
        let n_flows = usize::from(bytes[34]);
        let waiters_at = flows_at + n_flows * FLOW_LEN;
        if bytes.len() < flows_at {
            return Err(AdmissionError::Corrupt("truncated instance list"));
        }
        if bytes.len() < waiters_at {
            return Err(AdmissionError::Corrupt("truncated flow list"));
        }
        let flows = bytes[flows_at..waiters_at]
            .chunks_exact(FLOW_LEN)
            .map(|f| u32_at(f, 0))
            .collect();
        if !(bytes.len() - waiters_at).is_multiple_of(WAITER_LEN) {
            return Err(AdmissionError::Corrupt("truncated waiter list"));
        }
        let instances = bytes[HEADER_LEN..flows_at]
            .chunks_exact(INSTANCE_LEN)
            .map(|b| {
                Ok(Instance {
                    address: decode_address(b)?,
                    own_capacity: nonzero(u32_at(b, 19)),
                    active: u32_at(b, 23),
                    gone: b[27] & INSTANCE_GONE != 0,
                    own_from_sync: b[27] & INSTANCE_OWN_FROM_SYNC != 0,
                    strikes: b[28],
                    eject_until_ns: u64_at(b, 29).unwrap_or(0),
                    picks_missed: u32_at(b, 37),
                    share: (b[27] & INSTANCE_SHARED != 0).then(|| Share {
                        slots: u32_at(b, 41),
                        fallback: u32_at(b, 45),
                    }),
                })
            })
            .collect::<Result<Vec<_>, AdmissionError>>()?;
        let waiters = bytes[waiters_at..]
            .chunks_exact(WAITER_LEN)
            .map(|w| {
                let flags = u16_at(w, 6);
                let instance = u16_at(w, 8);
                if instance != NO_INSTANCE && usize::from(instance) >= n {
                    return Err(AdmissionError::Corrupt("waiter of no instance"));
                }
                Ok(Waiter {
                    ticket: u32_at(w, 0),
                    worker: u16_at(w, 4),
                    granted: flags & FLAG_GRANTED != 0,
                    pinned: flags & FLAG_PINNED != 0,
                    pushed_out: flags & FLAG_PUSHED_OUT != 0,
                    instance: (instance != NO_INSTANCE).then_some(instance),
                    class: w[10],
                    priority: w[11],
                    flow: w[12],
                    tag: u32_at(w, 13),
                    cost: u32_at(w, 17),
                })
            })
            .collect::<Result<Vec<_>, AdmissionError>>()?;
        let flags = bytes[25];
        Ok(EndpointState {
            active: u32_at(bytes, 1),
            next_ticket: u32_at(bytes, 5),
            capacity: nonzero(u32_at(bytes, 9)),
            configured: nonzero(u32_at(bytes, 13)),
            sync_version: u64_at(bytes, 17).unwrap_or(0),
            source: if flags & FLAG_FROM_SYNC != 0 {
                CapacitySource::Sync
            } else {
                CapacitySource::Config
            },
            unhealthy: flags & FLAG_UNHEALTHY != 0,
            instances_from_sync: flags & FLAG_INSTANCES_FROM_SYNC != 0,
            turn: u16_at(bytes, 28),
            virtual_time: u32_at(bytes, 30),
            flows,
            share: (flags & FLAG_SHARED != 0).then(|| Share {
                slots: u32_at(bytes, 35),
                fallback: u32_at(bytes, 39),
            }),
            share_lease: ShareLease {
                until_ns: u64_at(bytes, 43).unwrap_or(0),
                fallback_until_ns: u64_at(bytes, 51).unwrap_or(0),
            },
            instances,
            waiters,
        })
    }

    /// A stored value: an empty one (what Envoy's remove leaves behind)
    /// reads as the neutral state.
    pub(super) fn from_stored(bytes: &[u8]) -> Result<Self, AdmissionError> {
        if bytes.is_empty() {
            Ok(EndpointState::default())
        } else {
            EndpointState::decode(bytes)
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_LEN
                + self.instances.len() * INSTANCE_LEN
                + self.flows.len() * FLOW_LEN
                + self.waiters.len() * WAITER_LEN,
        );
        out.push(VERSION);
        out.extend_from_slice(&self.active.to_le_bytes());
        out.extend_from_slice(&self.next_ticket.to_le_bytes());
        out.extend_from_slice(&self.capacity.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.configured.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.sync_version.to_le_bytes());
        let mut flags = 0;
        if self.source == CapacitySource::Sync {
            flags |= FLAG_FROM_SYNC;
        }
        if self.unhealthy {
            flags |= FLAG_UNHEALTHY;
        }
        if self.instances_from_sync {
            flags |= FLAG_INSTANCES_FROM_SYNC;
        }
        if self.share.is_some() {
            flags |= FLAG_SHARED;
        }
        out.push(flags);
        // At most MAX_INSTANCES (checked where the set is replaced).
        out.extend_from_slice(&(self.instances.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.turn.to_le_bytes());
        out.extend_from_slice(&self.virtual_time.to_le_bytes());
        // At most MAX_FLOWS (checked where a flow is added).
        out.push(self.flows.len() as u8);
        let share = self.share.unwrap_or_default();
        out.extend_from_slice(&share.slots.to_le_bytes());
        out.extend_from_slice(&share.fallback.to_le_bytes());
        out.extend_from_slice(&self.share_lease.until_ns.to_le_bytes());
        out.extend_from_slice(&self.share_lease.fallback_until_ns.to_le_bytes());
        for i in &self.instances {
            encode_address(&mut out, &i.address);
            out.extend_from_slice(&i.own_capacity.unwrap_or(0).to_le_bytes());
            out.extend_from_slice(&i.active.to_le_bytes());
            let mut flags = 0;
            if i.gone {
                flags |= INSTANCE_GONE;
            }
            if i.own_from_sync {
                flags |= INSTANCE_OWN_FROM_SYNC;
            }
            if i.share.is_some() {
                flags |= INSTANCE_SHARED;
            }
            out.push(flags);
            out.push(i.strikes);
            out.extend_from_slice(&i.eject_until_ns.to_le_bytes());
            out.extend_from_slice(&i.picks_missed.to_le_bytes());
            let share = i.share.unwrap_or_default();
            out.extend_from_slice(&share.slots.to_le_bytes());
            out.extend_from_slice(&share.fallback.to_le_bytes());
        }
        for f in &self.flows {
            out.extend_from_slice(&f.to_le_bytes());
        }
        for w in &self.waiters {
            out.extend_from_slice(&w.ticket.to_le_bytes());
            out.extend_from_slice(&w.worker.to_le_bytes());
            let mut flags = 0;
            if w.granted {
                flags |= FLAG_GRANTED;
            }
            if w.pinned {
                flags |= FLAG_PINNED;
            }
            if w.pushed_out {
                flags |= FLAG_PUSHED_OUT;
            }
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&w.instance.unwrap_or(NO_INSTANCE).to_le_bytes());
            out.push(w.class);
            out.push(w.priority);
            out.push(w.flow);
            out.extend_from_slice(&w.tag.to_le_bytes());
            out.extend_from_slice(&w.cost.to_le_bytes());
        }
        out
    }

    /// Requests waiting for a slot (granted ones already hold theirs;
    /// pushed-out ones are leaving).
    pub fn queued(&self) -> u32 {
        self.waiters.iter().filter(|w| w.waiting()).count() as u32
    }

    /// The units of the requests waiting for a slot (their number without
    /// `cost`).
    pub fn queued_units(&self) -> u32 {
        self.waiters
            .iter()
            .filter(|w| w.waiting())
            .fold(0, |n, w| n.saturating_add(w.cost))
    }

    /// Requests of class `class` waiting for a slot.
    pub fn queued_of(&self, class: u8) -> u32 {
        self.waiters
            .iter()
            .filter(|w| w.waiting() && w.class == class)
            .count() as u32
    }

    /// Where a new waiter of `priority` and start `tag` goes: behind every
    /// waiter of a higher priority, and of its own with a tag not after
    /// its own; ahead of the rest.
    pub(super) fn insert_at(&self, priority: u8, tag: u32) -> usize {
        self.waiters
            .iter()
            .rposition(|w| {
                w.priority > priority || (w.priority == priority && !tag_before(tag, w.tag))
            })
            .map_or(0, |i| i + 1)
    }

    /// Start-time fair queueing over the tenants' flows: the start tag of
    /// a request of `flow` costing `step` (the tag's units per request,
    /// inversely to its tenant's weight), and the flow's finish tag moved
    /// past it. A flow that has been idle starts at the clock, so it gets
    /// no credit for idling; a busy one's requests are spaced by `step`,
    /// so flows with waiters take the slots in turn, in proportion to
    /// their weights.
    pub(super) fn tag(&mut self, flow: u8, step: u32) -> u32 {
        let f = usize::from(flow);
        if self.flows.len() <= f {
            self.flows.resize(f + 1, self.virtual_time);
        }
        let finish = self.flows[f];
        let start = if tag_before(finish, self.virtual_time) {
            self.virtual_time
        } else {
            finish
        };
        self.flows[f] = start.wrapping_add(step);
        start
    }

    /// A request with start `tag` is served: the clock moves to it.
    pub(super) fn served_tag(&mut self, tag: u32) {
        advance_clock(&mut self.virtual_time, tag);
    }

    /// The waiter a request of `priority` pushes out of a full queue: the
    /// newest of the lowest priority below it, if any waits.
    pub(super) fn push_out_victim(&self, priority: u8) -> Option<usize> {
        let lowest = self
            .waiters
            .iter()
            .filter(|w| w.waiting() && w.priority < priority)
            .map(|w| w.priority)
            .min()?;
        self.waiters
            .iter()
            .rposition(|w| w.waiting() && w.priority == lowest)
    }

    /// Units admissions may use at `now_ns`: the capacity (none: no
    /// limit), and no more than this Envoy's share when it shares it.
    pub fn limit(&self, now_ns: u64) -> u32 {
        let capacity = self.capacity.unwrap_or(u32::MAX);
        match self.share {
            Some(share) => capacity.min(share.at(&self.share_lease, now_ns)),
            None => capacity,
        }
    }

    /// Hands free units to the waiters in serving order, each while its
    /// cost fits (the first that does not fit stops the round: no
    /// backfill); returns whether anything changed. Nothing is handed out
    /// while the backend is unhealthy: those waiters are being answered
    /// 503. With instances, each waiter gets its units on the instance
    /// [`EndpointState::pick`] chooses, or, pinned, on its own instance
    /// only; a pinned waiter whose instance is full lets the ones behind it
    /// by.
    pub(super) fn pump(&mut self, now_ns: u64, wake: &mut Wakeups) -> bool {
        if self.unhealthy {
            return false;
        }
        if self.picks_instances() {
            return self.pump_instances(now_ns, wake);
        }
        let limit = self.limit(now_ns);
        let mut changed = false;
        for w in self.waiters.iter_mut() {
            if !w.waiting() {
                continue;
            }
            if !fits(self.active, w.cost, limit) {
                break;
            }
            w.granted = true;
            self.active = self.active.saturating_add(w.cost);
            advance_clock(&mut self.virtual_time, w.tag);
            wake.add(w.worker);
            changed = true;
        }
        changed
    }

    fn pump_instances(&mut self, now_ns: u64, wake: &mut Wakeups) -> bool {
        let mut changed = false;
        // Once the first unpinned waiter fits on no instance, only pinned
        // waiters can go (each on its own instance): no backfill.
        let mut full = false;
        for n in 0..self.waiters.len() {
            let w = self.waiters[n];
            if !w.waiting() {
                continue;
            }
            let pin = w
                .instance
                .filter(|&i| w.pinned && self.pin_holds(i, now_ns));
            let target = match pin {
                Some(i) => self.has_room(usize::from(i), w.cost, now_ns).then_some(i),
                None if full => None,
                None => self.pick(w.cost, now_ns),
            };
            let Some(i) = target else {
                full |= pin.is_none();
                continue;
            };
            let inst = &mut self.instances[usize::from(i)];
            inst.active = inst.active.saturating_add(w.cost);
            self.active = self.active.saturating_add(w.cost);
            let w = &mut self.waiters[n];
            w.granted = true;
            w.instance = Some(i);
            wake.add(w.worker);
            let tag = w.tag;
            self.served_tag(tag);
            changed = true;
        }
        changed
    }
}
