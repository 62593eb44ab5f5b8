//! Epoch-aligned fixed window: the reference implementation's algorithm and the default.
//!
//! Owns: the counter of the current window. A window is `[k·W, (k+1)·W)`; a state from an
//! older window counts as zero, so nothing ever has to clear it. This is the hot path: one
//! remainder, one comparison, no allocation.

use super::{Limit, Nanos, Outcome, RejectedHits, sat_u32};

/// Hits recorded in the window starting at `window_start`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub(super) window_start: Nanos,
    /// `u64` because `RejectedHits::Counted` keeps adding past the limit.
    pub(super) count: u64,
}

impl State {
    /// The state from its two numbers, for a store that keeps them in its own layout.
    pub fn from_parts(window_start: Nanos, count: u64) -> Self {
        State {
            window_start,
            count,
        }
    }

    pub fn window_start(&self) -> Nanos {
        self.window_start
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The window holding `now`, and its count. A clock that stepped back into an earlier window
/// stays in the stored one, so a step back never hands out a second window's worth of hits.
#[inline]
fn current(w: u64, st: &State, now: Nanos) -> (Nanos, u64) {
    let at = now.max(st.window_start);
    let window_start = at - at % w;
    let count = if window_start == st.window_start {
        st.count
    } else {
        0
    };
    (window_start, count)
}

#[inline]
pub(super) fn check(
    limit: &Limit,
    st: &mut State,
    now: Nanos,
    hits: u32,
    rejected: RejectedHits,
) -> Outcome {
    let w = limit.unit.nanos();
    let (window_start, count) = current(w, st, now);
    let cap = u64::from(limit.requests_per_unit);
    let after = count.saturating_add(u64::from(hits));
    let allowed = after <= cap;
    let record = hits > 0 && (allowed || rejected == RejectedHits::Counted);
    let used = if record { after } else { count };
    if record {
        *st = State {
            window_start,
            count: after,
        };
    }
    let window_end = window_start.saturating_add(w);
    Outcome {
        allowed,
        remaining: sat_u32(u128::from(cap.saturating_sub(used))),
        reset_after: window_end.saturating_sub(now),
        expires_at: window_end,
    }
}

pub(super) fn expires_at(limit: &Limit, st: &State, now: Nanos) -> Nanos {
    let (window_start, _) = current(limit.unit.nanos(), st, now);
    window_start.saturating_add(limit.unit.nanos())
}

/// Hits admitted in an earlier window are gone already; only the current one is given back.
pub(super) fn refund(limit: &Limit, st: &mut State, now: Nanos, hits: u32) {
    let (window_start, _) = current(limit.unit.nanos(), st, now);
    if window_start == st.window_start {
        st.count = st.count.saturating_sub(u64::from(hits));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Op, arb_case, limit, run};
    use super::super::{Algorithm, CounterState, Outcome, RejectedHits, Unit};
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    /// The reference model: every recorded hit with its time; a window's count is a filter.
    #[derive(Default)]
    struct Model {
        recorded: Vec<(u64, u64)>,
    }

    impl Model {
        fn count(&self, w: u64, now: u64) -> u64 {
            self.recorded
                .iter()
                .filter(|(t, _)| t / w == now / w)
                .map(|(_, h)| h)
                .sum()
        }

        fn check(&mut self, l: u64, w: u64, now: u64, hits: u32, rej: RejectedHits) -> Outcome {
            let h = u64::from(hits);
            let allowed = self.count(w, now) + h <= l;
            if h > 0 && (allowed || rej == RejectedHits::Counted) {
                self.recorded.push((now, h));
            }
            let end = (now / w + 1) * w;
            Outcome {
                allowed,
                remaining: l.saturating_sub(self.count(w, now)) as u32,
                reset_after: end - now,
                expires_at: end,
            }
        }
    }

    proptest! {
        #[test]
        fn matches_reference_model(case in arb_case(Algorithm::FixedWindow)) {
            let (lim, start, ops) = case;
            let mut model = Model::default();
            let w = lim.unit.nanos();
            run(&lim, start, &ops, |now, op: &Op, got| {
                let l = u64::from(lim.requests_per_unit);
                let want = model.check(l, w, now, op.hits, op.rejected);
                prop_assert_eq!(got, want, "at {}", now);
                Ok(())
            })?;
        }

        #[test]
        fn admits_at_most_limit_per_aligned_window(case in arb_case(Algorithm::FixedWindow)) {
            let (lim, start, ops) = case;
            let w = lim.unit.nanos();
            let mut per_window = std::collections::HashMap::<u64, u64>::new();
            run(&lim, start, &ops, |now, op: &Op, got| {
                if got.allowed {
                    *per_window.entry(now / w).or_default() += u64::from(op.hits);
                }
                let in_window = per_window.get(&(now / w)).copied().unwrap_or(0);
                prop_assert!(in_window <= u64::from(lim.requests_per_unit));
                Ok(())
            })?;
        }
    }

    #[test]
    fn three_per_second_example() {
        let lim = limit(Algorithm::FixedWindow, 3, Unit::Second, 3);
        let mut st = CounterState::default();
        let start = 1_700_000_000 * SEC + 250_000_000;
        for i in 0..3u32 {
            let out = lim.check_and_update(&mut st, start + u64::from(i), 1, RejectedHits::Free);
            assert!(out.allowed);
            assert_eq!(out.remaining, 2 - i);
        }
        let out = lim.check_and_update(&mut st, start + 10, 1, RejectedHits::Free);
        assert_eq!(
            out,
            Outcome {
                allowed: false,
                remaining: 0,
                reset_after: 750_000_000 - 10,
                expires_at: 1_700_000_001 * SEC,
            }
        );
        // The next second is a new window.
        let out = lim.check_and_update(&mut st, 1_700_000_001 * SEC, 1, RejectedHits::Free);
        assert!(out.allowed);
        assert_eq!(out.remaining, 2);
        assert_eq!(out.reset_after, SEC);
    }

    #[test]
    fn boundary_at_exact_multiple_starts_a_new_window() {
        let lim = limit(Algorithm::FixedWindow, 1, Unit::Minute, 1);
        let w = Unit::Minute.nanos();
        let mut st = CounterState::default();
        let t = 28_000_000 * w;
        assert!(
            lim.check_and_update(&mut st, t - 1, 1, RejectedHits::Free)
                .allowed
        );
        let out = lim.check_and_update(&mut st, t, 1, RejectedHits::Free);
        assert!(out.allowed);
        assert_eq!(out.reset_after, w);
        assert_eq!(out.expires_at, t + w);
        let out = lim.check_and_update(&mut st, t + w - 1, 1, RejectedHits::Free);
        assert!(!out.allowed);
        assert_eq!(out.reset_after, 1);
    }

    #[test]
    fn counted_rejections_fill_the_window() {
        let lim = limit(Algorithm::FixedWindow, 2, Unit::Second, 2);
        let mut st = CounterState::default();
        let t = 10 * SEC;
        let out = lim.check_and_update(&mut st, t, 3, RejectedHits::Counted);
        assert!(!out.allowed);
        assert_eq!(out.remaining, 0);
        // Usage is 3 > 2: even a look is refused until the window ends.
        assert!(
            !lim.check_and_update(&mut st, t, 0, RejectedHits::Free)
                .allowed
        );
        assert!(
            lim.check_and_update(&mut st, t + SEC, 0, RejectedHits::Free)
                .allowed
        );
    }

    #[test]
    fn clock_stepping_back_stays_in_the_stored_window() {
        let lim = limit(Algorithm::FixedWindow, 1, Unit::Second, 1);
        let mut st = CounterState::default();
        assert!(
            lim.check_and_update(&mut st, 5 * SEC, 1, RejectedHits::Free)
                .allowed
        );
        let out = lim.check_and_update(&mut st, 4 * SEC, 1, RejectedHits::Free);
        assert!(!out.allowed);
        assert_eq!(out.reset_after, 2 * SEC);
    }
}
