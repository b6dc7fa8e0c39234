//! Sleeps that last what they say.
//!
//! tokio's timer wheel has a 1 ms tick and rounds up, so a 20 ms sleep takes
//! 20–22 ms. For a backend whose service time is the yardstick of the
//! benchmarks ("8 slots × 20 ms = 400 req/s") that error is larger than the
//! effects being measured. One thread sleeps until the earliest deadline on a
//! futex (`recv_timeout`), which is precise to tens of microseconds, and
//! completes the waiting futures.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

struct Due {
    at: Instant,
    seq: u64,
    done: oneshot::Sender<()>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

fn timer() -> &'static Mutex<Sender<Due>> {
    static TIMER: OnceLock<Mutex<Sender<Due>>> = OnceLock::new();
    TIMER.get_or_init(|| {
        let (tx, rx) = channel::<Due>();
        std::thread::Builder::new()
            .name("precise-sleep".into())
            .spawn(move || {
                let mut heap: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
                loop {
                    let now = Instant::now();
                    while heap.peek().is_some_and(|d| d.0.at <= now) {
                        // A receiver that gave up (client gone) is fine.
                        let _ = heap.pop().expect("peeked").0.done.send(());
                    }
                    let next = match heap.peek() {
                        Some(d) => rx.recv_timeout(d.0.at.saturating_duration_since(now)),
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    match next {
                        Ok(due) => heap.push(Reverse(due)),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            })
            .expect("spawn the precise-sleep thread");
        Mutex::new(tx)
    })
}

/// Completes `duration` from now, give or take tens of microseconds.
pub async fn sleep(duration: Duration) {
    if duration.is_zero() {
        return;
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let (done, wait) = oneshot::channel();
    let due = Due {
        at: Instant::now() + duration,
        seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        done,
    };
    if timer().lock().expect("timer lock").send(due).is_err() {
        // The timer thread is gone; fall back to tokio's coarser timer.
        tokio::time::sleep(duration).await;
        return;
    }
    let _ = wait.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_are_in_order_and_not_short() {
        let start = Instant::now();
        let a = tokio::spawn(sleep(Duration::from_millis(30)));
        let b = tokio::spawn(sleep(Duration::from_millis(10)));
        b.await.unwrap();
        let tb = start.elapsed();
        a.await.unwrap();
        let ta = start.elapsed();
        assert!(tb >= Duration::from_millis(10) && tb < ta, "{tb:?} {ta:?}");
        assert!(ta >= Duration::from_millis(30));
    }
}
