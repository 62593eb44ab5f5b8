//! Generic cell rate algorithm: the token bucket's decisions from a single timestamp.
//!
//! Owns: the theoretical arrival time (TAT), the instant at which the key would be idle again
//! if hits keep their pace of one per emission interval `T = W / L`. A hit is admitted iff the
//! TAT it pushes forward stays within the tolerance `B × T` of now. `T` is generally not a
//! whole number of nanoseconds, so the TAT is kept in units of `1/L` ns, where `T` is exactly
//! `W` units; the state remembers which `L` it was kept in, so a rate change rescales it
//! instead of misreading it.

use super::{Limit, Nanos, Outcome, RejectedHits, sat_u32, sat_u64};

/// The theoretical arrival time × `per`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub(super) tat: u128,
    /// The `requests_per_unit` that `tat` is scaled by; 0 for a fresh state.
    pub(super) per: u32,
}

/// `ceil(x × num / den)` without overflowing on the way (saturating at the end).
fn rescale_ceil(x: u128, num: u128, den: u128) -> u128 {
    let whole = (x / den).saturating_mul(num);
    let part = ((x % den) * num).div_ceil(den);
    whole.saturating_add(part)
}

/// The TAT in units of `1/L` ns for this limit.
fn tat_for(limit: &Limit, st: &State) -> u128 {
    let l = limit.requests_per_unit;
    match st.per {
        0 => 0,
        per if per == l => st.tat,
        // Rounding up keeps the key at least as limited as it was.
        per => rescale_ceil(st.tat, u128::from(l), u128::from(per)),
    }
}

pub(super) fn check(
    limit: &Limit,
    st: &mut State,
    now: Nanos,
    hits: u32,
    rejected: RejectedHits,
) -> Outcome {
    let l = u128::from(limit.requests_per_unit);
    let interval = u128::from(limit.unit.nanos());
    let tolerance = u128::from(limit.burst) * interval;
    let now_units = u128::from(now) * l;
    let mut tat = tat_for(limit, st);
    let pushed = tat
        .max(now_units)
        .saturating_add(u128::from(hits) * interval);
    let allowed = pushed - now_units <= tolerance;
    if hits > 0 && (allowed || rejected == RejectedHits::Counted) {
        tat = pushed;
        *st = State {
            tat,
            per: limit.requests_per_unit,
        };
    }
    // How far ahead of now the TAT runs: the token bucket's missing tokens, as time.
    let ahead = tat.saturating_sub(now_units);
    let remaining = tolerance.saturating_sub(ahead) / interval;
    let reset_after = if remaining >= 1 {
        0
    } else {
        // Until one more emission interval fits in the tolerance.
        sat_u64((ahead - (tolerance - interval)).div_ceil(l))
    };
    Outcome {
        allowed,
        remaining: sat_u32(remaining),
        reset_after,
        expires_at: sat_u64(tat.div_ceil(l)).max(now),
    }
}

pub(super) fn expires_at(limit: &Limit, st: &State, now: Nanos) -> Nanos {
    let l = u128::from(limit.requests_per_unit);
    sat_u64(tat_for(limit, st).div_ceil(l)).max(now)
}

/// Moves the TAT back by the hits' emission intervals, never before now (an idle key).
pub(super) fn refund(limit: &Limit, st: &mut State, now: Nanos, hits: u32) {
    let l = u128::from(limit.requests_per_unit);
    let interval = u128::from(limit.unit.nanos());
    let back = tat_for(limit, st).saturating_sub(u128::from(hits) * interval);
    *st = State {
        tat: back.max(u128::from(now) * l),
        per: limit.requests_per_unit,
    };
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Op, Ratio, arb_case, limit, run, smallest_after};
    use super::super::{AlgoState, Algorithm, CounterState, Limit, Outcome, RejectedHits, Unit};
    use super::rescale_ceil;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    /// The reference model: the textbook virtual-scheduling GCRA with an exact fractional TAT
    /// and emission interval.
    struct Model {
        t: Ratio,
        tau: Ratio,
        tat: Ratio,
    }

    impl Model {
        fn ahead(&self, now: u64) -> Ratio {
            self.tat.sub(Ratio::int(i128::from(now))).max(Ratio::int(0))
        }

        fn remaining(&self, now: u64) -> i128 {
            self.tau.sub(self.ahead(now)).div(self.t).floor().max(0)
        }

        fn check(&mut self, now: u64, hits: u32, rej: RejectedHits) -> Outcome {
            let n = Ratio::int(i128::from(now));
            let pushed = self.tat.max(n).add(self.t.mul_int(i128::from(hits)));
            let allowed = pushed.sub(n) <= self.tau;
            if hits > 0 && (allowed || rej == RejectedHits::Counted) {
                self.tat = pushed;
            }
            let remaining = self.remaining(now);
            let reset_after = if remaining >= 1 {
                0
            } else {
                smallest_after(now, |t| self.remaining(t) >= 1) - now
            };
            let expires_at = if self.tat <= n {
                now
            } else {
                self.tat.ceil() as u64
            };
            Outcome {
                allowed,
                remaining: remaining as u32,
                reset_after,
                expires_at,
            }
        }
    }

    proptest! {
        #[test]
        fn matches_reference_model(case in arb_case(Algorithm::Gcra)) {
            let (lim, start, ops) = case;
            let t = Ratio::new(i128::from(lim.unit.nanos()), u64::from(lim.requests_per_unit));
            let mut model = Model { t, tau: t.mul_int(i128::from(lim.burst)), tat: Ratio::int(0) };
            run(&lim, start, &ops, |now, op: &Op, got| {
                let want = model.check(now, op.hits, op.rejected);
                prop_assert_eq!(got, want, "at {}", now);
                Ok(())
            })?;
        }

        #[test]
        fn decides_exactly_like_the_token_bucket(case in arb_case(Algorithm::Gcra)) {
            let (lim, start, ops) = case;
            let bucket = Limit { algorithm: Algorithm::TokenBucket, ..lim };
            let (mut g, mut b) = (CounterState::default(), CounterState::default());
            let mut now = start;
            for op in &ops {
                now += op.dt;
                let from_gcra = lim.check_and_update(&mut g, now, op.hits, op.rejected);
                let from_bucket = bucket.check_and_update(&mut b, now, op.hits, op.rejected);
                prop_assert_eq!(from_gcra, from_bucket, "at {}", now);
                if op.hits % 3 == 1 && from_gcra.allowed {
                    lim.refund(&mut g, now, op.hits / 2);
                    bucket.refund(&mut b, now, op.hits / 2);
                }
            }
        }
    }

    #[test]
    fn documented_example() {
        // 10 per second (T = 100 ms), burst 2: two at once, then one every 100 ms.
        let lim = limit(Algorithm::Gcra, 10, Unit::Second, 2);
        let mut st = CounterState::default();
        let t = 77 * SEC;
        let out = lim.check_and_update(&mut st, t, 2, RejectedHits::Free);
        assert_eq!(
            out,
            Outcome {
                allowed: true,
                remaining: 0,
                reset_after: SEC / 10,
                expires_at: t + SEC / 5
            }
        );
        let out = lim.check_and_update(&mut st, t + SEC / 20, 1, RejectedHits::Free);
        assert_eq!(
            (out.allowed, out.remaining, out.reset_after),
            (false, 0, SEC / 20)
        );
        assert!(
            lim.check_and_update(&mut st, t + SEC / 10, 1, RejectedHits::Free)
                .allowed
        );
    }

    #[test]
    fn a_rate_change_rescales_the_tat() {
        let mut st = CounterState::default();
        let slow = limit(Algorithm::Gcra, 3, Unit::Second, 3);
        let t = 5 * SEC;
        slow.check_and_update(&mut st, t, 3, RejectedHits::Free);
        // The TAT stays t + 1 s. At 6 per second and burst 3 the tolerance is 0.5 s, and one
        // more hit fits once the TAT is within 0.5 s − 1/6 s of now: after 2/3 s.
        let fast = limit(Algorithm::Gcra, 6, Unit::Second, 3);
        let out = fast.check_and_update(&mut st, t, 0, RejectedHits::Free);
        assert_eq!(
            (out.remaining, out.reset_after, out.expires_at),
            (0, (2 * SEC).div_ceil(3), t + SEC)
        );
        let AlgoState::Gcra(g) = &st.algo else {
            panic!("{st:?}")
        };
        assert_eq!(g.per, 3);
    }

    #[test]
    fn rescale_rounds_up_and_never_overflows() {
        assert_eq!(rescale_ceil(10, 1, 3), 4);
        assert_eq!(rescale_ceil(9, 2, 3), 6);
        assert_eq!(rescale_ceil(u128::MAX, u128::from(u32::MAX), 1), u128::MAX);
        assert_eq!(
            rescale_ceil(u128::MAX - 1, 1, u128::from(u32::MAX)),
            (u128::MAX - 1).div_ceil(u128::from(u32::MAX))
        );
    }
}
