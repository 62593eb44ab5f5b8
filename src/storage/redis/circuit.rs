//! Whether a Redis connection is known down: one atomic word read on every call.
//!
//! The circuit opens at once on an error that says the connection is gone (refused, reset,
//! closed, not connected) and after `TRIP_AFTER` consecutive missed deadlines. While it is
//! open, calls are answered by the failure mode without awaiting Redis; the store's health
//! task probes in the background and closes it when a probe succeeds.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// Consecutive missed deadlines that open the circuit.
pub const TRIP_AFTER: u32 = 3;

/// The open bit, above the count of consecutive failures.
const OPEN: u32 = 1 << 31;

#[derive(Debug, Default)]
pub struct Circuit {
    state: AtomicU32,
}

impl Circuit {
    pub fn is_open(&self) -> bool {
        self.state.load(Relaxed) & OPEN != 0
    }

    /// Records a failed call; `down`: the connection is known gone. True when this call
    /// opened the circuit.
    pub fn failure(&self, down: bool) -> bool {
        let before = self
            .state
            .fetch_update(Relaxed, Relaxed, |s| {
                let count = (s & !OPEN).saturating_add(1).min(OPEN - 1);
                let open = down || count >= TRIP_AFTER || s & OPEN != 0;
                Some(count | if open { OPEN } else { 0 })
            })
            .unwrap_or(0);
        before & OPEN == 0 && self.is_open()
    }

    /// Records an answered call: the count of consecutive failures starts again. Does not
    /// close an open circuit (only a probe does), and writes nothing in the common case.
    pub fn success(&self) {
        let s = self.state.load(Relaxed);
        if s != 0 && s & OPEN == 0 {
            let _ = self.state.compare_exchange(s, 0, Relaxed, Relaxed);
        }
    }

    /// Opens it (e.g. not reachable at start-up).
    pub fn open(&self) {
        self.state.fetch_or(OPEN, Relaxed);
    }

    /// A probe succeeded. True when it was open.
    pub fn close(&self) -> bool {
        self.state.swap(0, Relaxed) & OPEN != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_at_once_when_down_and_after_consecutive_timeouts() {
        let c = Circuit::default();
        assert!(!c.is_open());
        assert!(!c.failure(false));
        assert!(!c.failure(false));
        c.success();
        assert!(!c.failure(false));
        assert!(!c.failure(false));
        assert!(c.failure(false), "the third in a row opens it");
        assert!(c.is_open());
        assert!(!c.failure(true), "already open");
        c.success();
        assert!(c.is_open(), "only a probe closes it");
        assert!(c.close());
        assert!(!c.is_open());
        assert!(!c.close());
        assert!(c.failure(true), "a known-down connection opens it at once");
        c.close();
        c.open();
        assert!(c.is_open());
    }
}
