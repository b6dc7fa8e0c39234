//! When a worker's `on_tick` runs next, and whether Envoy's timer keeps
//! time. Queue timeouts and held slots are due to the millisecond, so the
//! tick is set to what is due next; lost wake-ups need a backstop while
//! anyone waits; otherwise the idle tick does the leader's rounds.

use crate::host::Host;
use sluice_core::{config_seen, shared_keys};
use std::cell::Cell;
use std::time::Duration;

/// The longest tick while requests wait: the backstop for lost wake-ups.
pub const FAST_TICK: Duration = Duration::from_millis(5);
/// Tick otherwise: the leader's lease, sync watchdog and health checks.
pub const BASE_TICK: Duration = Duration::from_millis(100);

/// A tick later than this after its planned time is late: Envoy's timers
/// on libevent's coarse clock come up to a kernel tick (4 ms at 250 Hz)
/// late, on its precise one (`EVENT_PRECISE_TIMER=1`) within about 0.1 ms.
const LATE_TICK_NS: u64 = 1_500_000;
/// A tick later than this says nothing about the timer: a starved worker,
/// a clock step, a test that moved the clock.
const STRAY_TICK_NS: u64 = 6_000_000;
/// How many ticks each judgement takes.
const JUDGED_TICKS: u32 = 32;

/// `ns` as a tick period: whole milliseconds (Envoy's unit), rounded up so
/// that the tick is never early, and at least 1 ms.
fn ceil_ms(ns: u64) -> Duration {
    Duration::from_millis(ns.div_ceil(1_000_000).max(1))
}

#[derive(Default)]
pub struct Ticker {
    /// The period last set (zero: none yet).
    period: Cell<Duration>,
    /// Host time (ns) at which the tick is due next; `u64::MAX`: none.
    next_tick_ns: Cell<u64>,
    /// Configured, first tick not yet run: tick soon to take the index.
    starting: Cell<bool>,
    /// The period when nobody waits ([`BASE_TICK`] once the root has duties).
    idle: Cell<Duration>,
    /// Ticks judged in this round and how many of them were late; `None`
    /// once found late.
    lateness: Cell<Option<(u32, u32)>>,
    /// The tick planned last is for a deadline or a held slot.
    timed: Cell<bool>,
}

impl Ticker {
    pub fn new() -> Ticker {
        Ticker {
            next_tick_ns: Cell::new(u64::MAX),
            lateness: Cell::new(Some((0, 0))),
            ..Ticker::default()
        }
    }

    pub fn set_idle(&self, period: Duration) {
        self.idle.set(period);
    }

    /// From `on_configure`: tick once soon.
    pub fn start(&self) {
        self.starting.set(true);
    }

    /// A tick runs: judges how late it came.
    pub fn ticked<H: Host>(&self, host: &H) {
        self.judge(host);
        self.starting.set(false);
    }

    /// Judges Envoy's timer by how late the ticks that answer deadlines
    /// come (queue timeouts, held slots), 32 at a time, and says once per
    /// process if most come late enough to make queue timeouts late: Envoy
    /// started without `EVENT_PRECISE_TIMER=1`.
    fn judge<H: Host>(&self, host: &H) {
        let Some((judged, late)) = self.lateness.get() else {
            return;
        };
        if !self.timed.get() {
            return;
        }
        let lateness = host.now_ns().saturating_sub(self.next_tick_ns.get());
        if lateness > STRAY_TICK_NS {
            return;
        }
        let (judged, late) = (judged + 1, late + u32::from(lateness > LATE_TICK_NS));
        if judged < JUDGED_TICKS {
            self.lateness.set(Some((judged, late)));
            return;
        }
        if late * 2 <= judged {
            self.lateness.set(Some((0, 0)));
            return;
        }
        self.lateness.set(None);
        if config_seen::first_at(host, shared_keys::COARSE_TIMER_LOGGED, "") {
            log::warn!(
                "Envoy's timers fire late: {late} of {judged} ticks came more than 1.5 ms after \
                 their time, so queue timeouts will be answered late too. Unless its workers \
                 are overloaded, Envoy's event loop (libevent) is timing them by the kernel's \
                 coarse clock, up to 4 ms behind: set EVENT_PRECISE_TIMER=1 in Envoy's \
                 environment (docs/filter.md, \"Timer precision\")"
            );
        }
    }

    /// Sets the tick to what is due next (`due`: the nearest queue deadline
    /// or held slot), rounded up to Envoy's millisecond, but at most
    /// [`FAST_TICK`] while anything is due; the idle tick otherwise. Setting
    /// a period restarts Envoy's timer from now, so outside a tick
    /// (`from_tick` false: a request started waiting) it only moves the tick
    /// sooner.
    pub fn schedule<H: Host>(&self, host: &H, due: Option<u64>, from_tick: bool) {
        let now = host.now_ns();
        let period = match due {
            Some(at) => FAST_TICK.min(ceil_ms(at.saturating_sub(now))),
            None if self.starting.get() => FAST_TICK,
            None => self.idle.get(),
        };
        let next = if period.is_zero() {
            u64::MAX
        } else {
            now.saturating_add(period.as_nanos() as u64)
        };
        if !from_tick && next >= self.next_tick_ns.get() {
            return;
        }
        self.next_tick_ns.set(next);
        self.timed.set(due.is_some());
        // From a tick Envoy re-arms the timer with the period after the
        // callback; from elsewhere only a new period restarts it.
        if from_tick && period == self.period.get() {
            return;
        }
        self.period.set(period);
        if let Err(e) = host.set_tick_period(period) {
            log::warn!("cannot set tick period: {e:?}");
        }
    }
}
