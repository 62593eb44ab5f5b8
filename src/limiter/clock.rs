//! Where "now" comes from.
//!
//! Owns: the `Clock` seam that the server reads time through, the real clock, and a manual
//! clock that tests (here and in the rest of the crate) move by hand instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{NANOS_PER_SECOND, Nanos};

/// A source of the current instant, so the decision code never reads the system time itself
/// and every caller can be driven deterministically.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since the Unix epoch.
    fn now(&self) -> Nanos;
}

/// Sharing one clock between the server and the test that moves it.
impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Nanos {
        (**self).now()
    }
}

/// The wall clock. Windows are aligned to the Unix epoch, so this is `SystemTime`, not a
/// monotonic clock; the algorithms tolerate it stepping backwards.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[expect(
        clippy::disallowed_methods,
        reason = "the one wall clock; every other reader is given it"
    )]
    fn now(&self) -> Nanos {
        nanos_since_epoch(SystemTime::now())
    }
}

/// A clock set before 1970 reads as the epoch, and one past the year 2554 as the end of time:
/// a wrong clock must not bring the server down.
fn nanos_since_epoch(t: SystemTime) -> Nanos {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A clock that only moves when told to, for tests.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// Where `ManualClock::default()` starts: 2011-12-21T00:00:00Z, the least common multiple
    /// of every unit's length, so it is the start of a window for every unit and tests can
    /// reason about boundaries without arithmetic.
    pub const DEFAULT_START: Nanos = 1_324_512_000 * NANOS_PER_SECOND;

    pub fn new(start: Nanos) -> Self {
        ManualClock {
            now: AtomicU64::new(start),
        }
    }

    pub fn set(&self, now: Nanos) {
        self.now.store(now, Ordering::SeqCst);
    }

    /// Moves the clock forward, stopping at the end of time rather than wrapping.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // The closure always returns `Some`, so this cannot fail.
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(by))
            });
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new(Self::DEFAULT_START)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.now.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Unit;
    use super::*;

    #[test]
    fn wall_clock_readings_are_clamped_not_panicking() {
        assert_eq!(nanos_since_epoch(UNIX_EPOCH + Duration::from_nanos(5)), 5);
        assert_eq!(nanos_since_epoch(UNIX_EPOCH - Duration::from_secs(1)), 0);
        let far = UNIX_EPOCH + Duration::from_secs(20_000_000_000);
        assert_eq!(nanos_since_epoch(far), u64::MAX);
        // The real clock goes through the same conversion.
        let _ = SystemClock.now();
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(5);
        assert_eq!(clock.now(), 5);
        clock.advance(Duration::from_nanos(7));
        assert_eq!(clock.now(), 12);
        clock.set(3);
        assert_eq!(clock.now(), 3);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now(), u64::MAX);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now(), u64::MAX);
    }

    #[test]
    fn default_start_is_a_window_start_for_every_unit() {
        let start = ManualClock::default().now();
        for unit in Unit::ALL {
            assert_eq!(start % unit.nanos(), 0, "{unit:?}");
        }
    }

    #[test]
    fn shared_clock_reads_through_arc() {
        let clock = Arc::new(ManualClock::new(1));
        let dyn_clock: Arc<dyn Clock> = clock.clone();
        clock.advance(Duration::from_nanos(1));
        assert_eq!(dyn_clock.now(), 2);
        assert_eq!(Clock::now(&clock), 2);
    }
}
