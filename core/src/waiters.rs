//! One worker's own paused requests, with their deadlines.
//!
//! The shared record says *which ticket* may go; only the worker that paused a
//! request can resume it (Envoy), so each worker keeps its waiters here to map
//! a ticket back to its HTTP context and to time it out.

/// A request this worker paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalWaiter<T> {
    pub context_id: u32,
    pub endpoint: usize,
    pub ticket: u32,
    /// Host time (ns) at which it gets its 504.
    pub deadline_ns: u64,
    /// Whatever the host glue needs to finish the request.
    pub handle: T,
}

#[derive(Debug)]
pub struct LocalWaiters<T> {
    // Few entries per worker and mostly removed from the front: a Vec is
    // simpler and faster than anything indexed.
    waiters: Vec<LocalWaiter<T>>,
}

impl<T> Default for LocalWaiters<T> {
    fn default() -> Self {
        LocalWaiters {
            waiters: Vec::new(),
        }
    }
}

impl<T> LocalWaiters<T> {
    pub fn push(&mut self, w: LocalWaiter<T>) {
        self.waiters.push(w);
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Removes and returns the waiter of `context_id` (its client went away).
    pub fn remove_context(&mut self, context_id: u32) -> Option<LocalWaiter<T>> {
        let i = self
            .waiters
            .iter()
            .position(|w| w.context_id == context_id)?;
        Some(self.waiters.remove(i))
    }

    /// Removes and returns the waiter holding `ticket` of `endpoint`.
    pub fn take_ticket(&mut self, endpoint: usize, ticket: u32) -> Option<LocalWaiter<T>> {
        let i = self
            .waiters
            .iter()
            .position(|w| w.endpoint == endpoint && w.ticket == ticket)?;
        Some(self.waiters.remove(i))
    }

    /// Removes and returns every waiter whose deadline has passed, oldest first.
    pub fn take_expired(&mut self, now_ns: u64) -> Vec<LocalWaiter<T>> {
        let mut expired = Vec::new();
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].deadline_ns <= now_ns {
                expired.push(self.waiters.remove(i));
            } else {
                i += 1;
            }
        }
        expired
    }

    /// The earliest deadline, if anyone waits.
    pub fn next_deadline(&self) -> Option<u64> {
        self.waiters.iter().map(|w| w.deadline_ns).min()
    }

    /// Endpoints this worker has waiters on (each once, ascending).
    pub fn endpoints(&self) -> Vec<usize> {
        let mut eps: Vec<usize> = self.waiters.iter().map(|w| w.endpoint).collect();
        eps.sort_unstable();
        eps.dedup();
        eps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn w(context_id: u32, endpoint: usize, ticket: u32, deadline_ns: u64) -> LocalWaiter<()> {
        LocalWaiter {
            context_id,
            endpoint,
            ticket,
            deadline_ns,
            handle: (),
        }
    }

    #[test]
    fn lookups_remove_exactly_one() {
        let mut q = LocalWaiters::default();
        q.push(w(10, 0, 1, 100));
        q.push(w(11, 1, 1, 100));
        q.push(w(12, 0, 2, 100));
        assert_eq!(q.endpoints(), vec![0, 1]);
        assert_eq!(q.take_ticket(0, 2).map(|w| w.context_id), Some(12));
        assert_eq!(q.take_ticket(0, 2), None);
        assert_eq!(q.remove_context(11).map(|w| w.ticket), Some(1));
        assert_eq!(q.remove_context(11), None);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn expiry_is_at_the_deadline_not_before() {
        let mut q = LocalWaiters::default();
        q.push(w(1, 0, 1, 300));
        q.push(w(2, 0, 2, 100));
        q.push(w(3, 0, 3, 200));
        assert_eq!(q.next_deadline(), Some(100));
        assert!(q.take_expired(99).is_empty());
        let got: Vec<u32> = q
            .take_expired(200)
            .into_iter()
            .map(|w| w.context_id)
            .collect();
        assert_eq!(got, vec![2, 3]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.next_deadline(), Some(300));
    }
}
