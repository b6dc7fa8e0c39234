//! The endpoint record's codec and the FIFO hand-over on it.
//!
//! Record layout (little endian), version 2:
//!
//! | bytes | field | |
//! |---|---|---|
//! | 1 | `version` | 2 |
//! | 4 | `active` | slots in use, granted-but-unclaimed included |
//! | 4 | `next_ticket` | |
//! | 4 | `capacity` | in force; 0: none, requests pass (counted, never queued) |
//! | 4 | `configured` | the capacity of the last configuration seen; 0: none |
//! | 8 | `sync_version` | version of the snapshot that last set it; 0: never |
//! | 1 | `flags` | bit 0: capacity came from sync; bit 1: backend unhealthy |
//!
//! then one 8-byte waiter each: `ticket:u32, worker:u16, flags:u16`.

use super::{AdmissionError, Wakeups, WorkerId};
use crate::cas::{u16_at, u32_at, u64_at};

const VERSION: u8 = 2;
pub(super) const HEADER_LEN: usize = 26;
pub(super) const WAITER_LEN: usize = 8;
const FLAG_GRANTED: u16 = 1;
const FLAG_FROM_SYNC: u8 = 1;
const FLAG_UNHEALTHY: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub ticket: u32,
    pub worker: WorkerId,
    /// A slot has been handed to this waiter; its worker has not claimed it yet.
    pub granted: bool,
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
    /// Slots in use, including those granted to waiters not yet claimed.
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
        if !(bytes.len() - HEADER_LEN).is_multiple_of(WAITER_LEN) {
            return Err(AdmissionError::Corrupt("truncated waiter list"));
        }
        // In bounds: the lengths are checked above.
        let (u16_at, u32_at) = (
            |b, i| u16_at(b, i).unwrap_or(0),
            |b, i| u32_at(b, i).unwrap_or(0),
        );
        let waiters = bytes[HEADER_LEN..]
            .chunks_exact(WAITER_LEN)
            .map(|w| Waiter {
                ticket: u32_at(w, 0),
                worker: u16_at(w, 4),
                granted: u16_at(w, 6) & FLAG_GRANTED != 0,
            })
            .collect();
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
        let mut out = Vec::with_capacity(HEADER_LEN + self.waiters.len() * WAITER_LEN);
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
        out.push(flags);
        for w in &self.waiters {
            out.extend_from_slice(&w.ticket.to_le_bytes());
            out.extend_from_slice(&w.worker.to_le_bytes());
            let flags = if w.granted { FLAG_GRANTED } else { 0 };
            out.extend_from_slice(&flags.to_le_bytes());
        }
        out
    }

    /// Requests waiting for a slot (granted ones already hold theirs).
    pub fn queued(&self) -> u32 {
        self.waiters.iter().filter(|w| !w.granted).count() as u32
    }

    /// Slots admissions may use: without a capacity, no limit.
    pub(super) fn limit(&self) -> u32 {
        self.capacity.unwrap_or(u32::MAX)
    }

    /// Hands free slots to the oldest waiters; returns whether anything
    /// changed. Nothing is handed out while the backend is unhealthy: those
    /// waiters are being answered 503.
    pub(super) fn pump(&mut self, wake: &mut Wakeups) -> bool {
        if self.unhealthy {
            return false;
        }
        let limit = self.limit();
        let mut changed = false;
        for w in self.waiters.iter_mut() {
            if self.active >= limit {
                break;
            }
            if !w.granted {
                w.granted = true;
                self.active += 1;
                wake.add(w.worker);
                changed = true;
            }
        }
        changed
    }
}
