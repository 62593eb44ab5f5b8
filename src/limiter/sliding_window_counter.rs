//! Sliding window counter: the previous window's count, weighted by how much of it the sliding
//! window still covers, plus the current window's count.
//!
//! Owns: two counters per key, whatever the rate. With `elapsed` nanoseconds into the current
//! (epoch-aligned) window the usage estimate is `prev × (W − elapsed) / W + curr`. It is kept
//! real-valued: every comparison is multiplied through by `W` and done in `u128`, so there is
//! no rounding anywhere. The estimate is continuous in time, also across window boundaries,
//! and only falls while no hits are recorded, which is what makes `reset_after` well defined.

use super::{Limit, Nanos, Outcome, RejectedHits, sat_u32, sat_u64};

/// Counts of the window starting at `window_start` and of the one before it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub(super) window_start: Nanos,
    pub(super) prev: u64,
    pub(super) curr: u64,
}

/// The state as of the window holding `now`. A clock that stepped back into an earlier window
/// stays in the stored one (the returned `at` is the instant actually used).
fn rolled(w: u64, st: &State, now: Nanos) -> (Nanos, State) {
    let at = now.max(st.window_start);
    let window_start = at - at % w;
    // Anything else (older, or misaligned because the rule's unit changed) is long gone.
    let (prev, curr) = match window_start.checked_sub(st.window_start) {
        Some(0) => (st.prev, st.curr),
        Some(d) if d == w => (st.curr, 0),
        _ => (0, 0),
    };
    let state = State {
        window_start,
        prev,
        curr,
    };
    (at, state)
}

/// `W ×` the usage estimate at `elapsed` into the window.
fn scaled_usage(w: u64, st: &State, elapsed: u64) -> u128 {
    u128::from(st.prev) * u128::from(w - elapsed) + u128::from(st.curr) * u128::from(w)
}

pub(super) fn check(
    limit: &Limit,
    st: &mut State,
    now: Nanos,
    hits: u32,
    rejected: RejectedHits,
) -> Outcome {
    let w = limit.unit.nanos();
    let l = limit.requests_per_unit;
    let (at, mut cur) = rolled(w, st, now);
    let elapsed = at - cur.window_start;
    let cap = u128::from(l) * u128::from(w);
    let with_hits = scaled_usage(w, &cur, elapsed) + u128::from(hits) * u128::from(w);
    let allowed = with_hits <= cap;
    if hits > 0 && (allowed || rejected == RejectedHits::Counted) {
        cur.curr = cur.curr.saturating_add(u64::from(hits));
        *st = cur.clone();
    }
    let slack = cap.saturating_sub(scaled_usage(w, &cur, elapsed));
    let remaining = slack / u128::from(w);
    let reset_after = if remaining >= u128::from(l) {
        0
    } else {
        // `remaining < l <= u32::MAX`, so the cast below is lossless.
        (at - now).saturating_add(time_to_grow(w, l, &cur, elapsed, remaining as u32))
    };
    Outcome {
        allowed,
        remaining: sat_u32(remaining),
        reset_after,
        expires_at: cur.window_start.saturating_add(w.saturating_mul(2)),
    }
}

/// The least whole number of nanoseconds after which, with nothing recorded, `remaining`
/// (currently `r < l`) has grown to `r + 1`, i.e. the scaled usage has fallen to
/// `goal = (l − r − 1) × W`.
fn time_to_grow(w: u64, l: u32, st: &State, elapsed: u64, r: u32) -> Nanos {
    let w128 = u128::from(w);
    let goal = u128::from(l - r - 1) * w128;
    let curr_part = u128::from(st.curr) * w128;
    let to_boundary = w - elapsed;
    if goal >= curr_part {
        // Reached within this window, once the previous window's weight is small enough:
        // prev × (W − elapsed − dt) ≤ goal − curr × W. `prev > 0` here, or `r` would already
        // be larger.
        let weight_left = (goal - curr_part) / u128::from(st.prev.max(1));
        return to_boundary - sat_u64(weight_left.min(u128::from(to_boundary)));
    }
    // Only after the boundary, where `curr` becomes the previous window and fades out:
    // curr × (W − into_next) ≤ goal. `curr > 0` here because `goal < curr × W`.
    let weight_left = goal / u128::from(st.curr.max(1));
    let into_next = w - sat_u64(weight_left.min(w128));
    to_boundary.saturating_add(into_next)
}

pub(super) fn expires_at(limit: &Limit, st: &State, now: Nanos) -> Nanos {
    let w = limit.unit.nanos();
    let (_, cur) = rolled(w, st, now);
    cur.window_start.saturating_add(w.saturating_mul(2))
}

/// Hits admitted in an earlier window have been folded into `prev`, where they are fading out
/// anyway; only the current window's count is given back.
pub(super) fn refund(limit: &Limit, st: &mut State, now: Nanos, hits: u32) {
    let (_, mut cur) = rolled(limit.unit.nanos(), st, now);
    cur.curr = cur.curr.saturating_sub(u64::from(hits));
    *st = cur;
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Op, arb_case, limit, run};
    use super::super::{Algorithm, CounterState, Outcome, RejectedHits, Unit};
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    /// The reference model: every recorded hit with its time. The estimate is recomputed from
    /// the history at any instant, and `reset_after` is found by bisection on that function
    /// rather than by a formula.
    struct Model {
        l: u64,
        w: u64,
        recorded: Vec<(u64, u64)>,
    }

    impl Model {
        fn in_window(&self, k: u64) -> u64 {
            self.recorded
                .iter()
                .filter(|(t, _)| t / self.w == k)
                .map(|e| e.1)
                .sum()
        }

        /// floor(L − estimate), at least 0, at instant `t`.
        fn remaining(&self, t: u64) -> u64 {
            let k = t / self.w;
            let prev = if k == 0 { 0 } else { self.in_window(k - 1) };
            let curr = self.in_window(k);
            let elapsed = t % self.w;
            let slack = i128::from(self.l) * i128::from(self.w)
                - i128::from(prev) * i128::from(self.w - elapsed)
                - i128::from(curr) * i128::from(self.w);
            if slack <= 0 {
                0
            } else {
                (slack / i128::from(self.w)) as u64
            }
        }

        fn check(&mut self, now: u64, hits: u32, rej: RejectedHits) -> Outcome {
            let h = u64::from(hits);
            let before = self.remaining(now);
            // Admission needs estimate + h ≤ L, i.e. slack ≥ h·W, i.e. floor(slack/W) ≥ h —
            // except that slack may be negative (Counted), where the look (h = 0) fails.
            let k = now / self.w;
            let prev = if k == 0 { 0 } else { self.in_window(k - 1) };
            let slack = i128::from(self.l) * i128::from(self.w)
                - i128::from(prev) * i128::from(self.w - now % self.w)
                - i128::from(self.in_window(k)) * i128::from(self.w);
            let allowed = slack >= i128::from(h) * i128::from(self.w);
            assert_eq!(allowed || h == 0, before >= h || h == 0);
            if h > 0 && (allowed || rej == RejectedHits::Counted) {
                self.recorded.push((now, h));
            }
            let r = self.remaining(now);
            let reset_after = if r == self.l {
                0
            } else {
                // Smallest t in (now, now + 2W] with remaining(t) > r; remaining only grows.
                let (mut lo, mut hi) = (now, now + 2 * self.w);
                assert!(self.remaining(hi) > r);
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if self.remaining(mid) > r {
                        hi = mid
                    } else {
                        lo = mid
                    }
                }
                hi - now
            };
            Outcome {
                allowed,
                remaining: r as u32,
                reset_after,
                expires_at: (now / self.w + 2) * self.w,
            }
        }
    }

    proptest! {
        #[test]
        fn matches_reference_model(case in arb_case(Algorithm::SlidingWindowCounter)) {
            let (lim, start, ops) = case;
            let mut model = Model {
                l: u64::from(lim.requests_per_unit),
                w: lim.unit.nanos(),
                recorded: Vec::new(),
            };
            run(&lim, start, &ops, |now, op: &Op, got| {
                let want = model.check(now, op.hits, op.rejected);
                prop_assert_eq!(got, want, "at {}", now);
                Ok(())
            })?;
        }
    }

    #[test]
    fn documented_example() {
        // 10 per minute; 8 hits late in the previous minute, 15 s into this one: the estimate
        // is 8 × 45/60 = 6, so 4 more fit.
        let lim = limit(Algorithm::SlidingWindowCounter, 10, Unit::Minute, 10);
        let w = Unit::Minute.nanos();
        let mut st = CounterState::default();
        let t0 = 1_000 * w;
        assert!(
            lim.check_and_update(&mut st, t0 + 50 * SEC, 8, RejectedHits::Free)
                .allowed
        );
        let now = t0 + w + 15 * SEC;
        let out = lim.check_and_update(&mut st, now, 4, RejectedHits::Free);
        assert!(out.allowed);
        assert_eq!(out.remaining, 0);
        // The estimate is 6 + 4 = 10; it is 9 once 8 × (45 s − dt)/60 s ≤ 5, i.e. after 7.5 s.
        assert_eq!(out.reset_after, 7_500_000_000);
        assert_eq!(out.expires_at, t0 + 3 * w);
        let out = lim.check_and_update(&mut st, now, 1, RejectedHits::Free);
        assert_eq!(
            out,
            Outcome {
                allowed: false,
                remaining: 0,
                reset_after: 7_500_000_000,
                expires_at: t0 + 3 * w,
            }
        );
        assert!(
            lim.check_and_update(&mut st, now + 7_500_000_000, 1, RejectedHits::Free)
                .allowed
        );
    }

    #[test]
    fn reset_after_can_cross_the_boundary() {
        // 2 per second, both used at the very start of a window: the previous window is empty,
        // so nothing fades until the next window, where the two fade out over a whole second.
        let lim = limit(Algorithm::SlidingWindowCounter, 2, Unit::Second, 2);
        let mut st = CounterState::default();
        let t = 50 * SEC;
        lim.check_and_update(&mut st, t, 2, RejectedHits::Free);
        let out = lim.check_and_update(&mut st, t + 100, 0, RejectedHits::Free);
        assert_eq!(out.remaining, 0);
        // 2 × (1 s − x) ≤ 1 × 1 s ⇒ x = 0.5 s into the next window.
        assert_eq!(out.reset_after, SEC - 100 + SEC / 2);
        // With the usage over the limit (Counted), it takes longer: 4 × (1 s − x) ≤ 1 s.
        lim.check_and_update(&mut st, t + 100, 2, RejectedHits::Counted);
        let out = lim.check_and_update(&mut st, t + 100, 0, RejectedHits::Free);
        assert!(!out.allowed);
        assert_eq!(out.reset_after, SEC - 100 + 3 * SEC / 4);
        // Two windows on, everything has faded.
        let out = lim.check_and_update(&mut st, t + 2 * SEC, 0, RejectedHits::Free);
        assert_eq!((out.remaining, out.reset_after), (2, 0));
    }

    #[test]
    fn boundary_at_exact_multiple() {
        let lim = limit(Algorithm::SlidingWindowCounter, 4, Unit::Second, 4);
        let mut st = CounterState::default();
        assert!(
            lim.check_and_update(&mut st, 7 * SEC - 1, 4, RejectedHits::Free)
                .allowed
        );
        // At the boundary the previous window weighs fully: nothing fits yet.
        let out = lim.check_and_update(&mut st, 7 * SEC, 1, RejectedHits::Free);
        assert!(!out.allowed);
        assert_eq!(out.reset_after, SEC / 4);
        assert_eq!(out.expires_at, 9 * SEC);
        assert!(
            lim.check_and_update(&mut st, 7 * SEC + SEC / 4, 1, RejectedHits::Free)
                .allowed
        );
    }
}
