//! Leaky bucket as a meter: every hit pours one unit into a bucket of capacity `burst` that
//! drains continuously at `requests_per_unit` per unit; a hit that would overflow it is
//! refused.
//!
//! Owns: the bucket's fill level, in units × `SCALE`, as of the instant `last`. Its default
//! capacity is 1 (`Algorithm::default_burst`), which makes it a smoother rather than a
//! burst allowance: admitted hits are spaced at least `W / L` apart. With
//! `RejectedHits::Counted` the level can rise above the capacity and must drain back first.

use super::{Limit, Nanos, Outcome, RejectedHits, SCALE, sat_u32, sat_u64};

/// The meter as of `last`. An empty bucket (the default) is a new key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// Fill level × `SCALE`.
    pub(super) level: u128,
    pub(super) last: Nanos,
}

/// The meter's numbers in `SCALE` units.
struct Meter {
    /// How much drains per nanosecond.
    drain: u128,
    /// What one hit pours in.
    unit: u128,
    /// Capacity: a level above this is overflowing.
    capacity: u128,
}

impl Meter {
    fn of(limit: &Limit) -> Meter {
        Meter {
            drain: u128::from(limit.requests_per_unit) * limit.unit.scale_per_nano(),
            unit: SCALE,
            capacity: u128::from(limit.burst) * SCALE,
        }
    }

    /// The level at `at`, after draining since `last`. A clock that stepped back drains
    /// nothing.
    fn level_at(&self, st: &State, at: Nanos) -> u128 {
        let elapsed = u128::from(at.saturating_sub(st.last));
        st.level.saturating_sub(elapsed * self.drain)
    }

    /// Nanoseconds for `level` to drain down to `target`.
    fn drain_time(&self, level: u128, target: u128) -> u64 {
        sat_u64(level.saturating_sub(target).div_ceil(self.drain))
    }
}

pub(super) fn check(
    limit: &Limit,
    st: &mut State,
    now: Nanos,
    hits: u32,
    rejected: RejectedHits,
) -> Outcome {
    let m = Meter::of(limit);
    let at = now.max(st.last);
    let mut level = m.level_at(st, at);
    let poured = level.saturating_add(u128::from(hits) * m.unit);
    let allowed = poured <= m.capacity;
    if hits > 0 && (allowed || rejected == RejectedHits::Counted) {
        level = poured;
        *st = State { level, last: at };
    }
    let headroom = m.capacity.saturating_sub(level) / m.unit;
    let skew = at - now;
    let reset_after = if headroom >= 1 {
        0
    } else {
        // Until one more hit fits without overflowing.
        skew.saturating_add(m.drain_time(level, m.capacity - m.unit))
    };
    Outcome {
        allowed,
        remaining: sat_u32(headroom),
        reset_after,
        expires_at: at.saturating_add(m.drain_time(level, 0)),
    }
}

pub(super) fn expires_at(limit: &Limit, st: &State, now: Nanos) -> Nanos {
    let m = Meter::of(limit);
    let at = now.max(st.last);
    at.saturating_add(m.drain_time(m.level_at(st, at), 0))
}

/// Takes the hits' units back out of the bucket, never below empty.
pub(super) fn refund(limit: &Limit, st: &mut State, now: Nanos, hits: u32) {
    let m = Meter::of(limit);
    let at = now.max(st.last);
    let level = m.level_at(st, at).saturating_sub(u128::from(hits) * m.unit);
    *st = State { level, last: at };
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Op, Ratio, arb_case, limit, run, smallest_after};
    use super::super::{Algorithm, CounterState, Outcome, RejectedHits, Unit};
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    /// The reference model: the history of admitted pours, and the level at any instant
    /// replayed from it as an exact fraction.
    struct Model {
        l: u64,
        w: u64,
        b: u64,
        pours: Vec<(u64, u64)>,
    }

    impl Model {
        fn level(&self, t: u64) -> Ratio {
            let mut level = Ratio::int(0);
            let mut at = 0;
            for &(when, units) in self.pours.iter().chain([(t, 0)].iter()) {
                let drained = Ratio::new(i128::from(when - at) * i128::from(self.l), self.w);
                level = level.sub(drained).max(Ratio::int(0));
                level = level.add(Ratio::int(i128::from(units)));
                at = when;
            }
            level
        }

        fn check(&mut self, now: u64, hits: u32, rej: RejectedHits) -> Outcome {
            let cap = Ratio::int(i128::from(self.b));
            let allowed = self.level(now).add(Ratio::int(i128::from(hits))) <= cap;
            if hits > 0 && (allowed || rej == RejectedHits::Counted) {
                self.pours.push((now, u64::from(hits)));
            }
            let level = self.level(now);
            let remaining = cap.sub(level).floor().max(0) as u32;
            let fits_one = |t| self.level(t).add(Ratio::int(1)) <= cap;
            let reset_after = if remaining >= 1 {
                0
            } else {
                smallest_after(now, fits_one) - now
            };
            let expires_at = if level == Ratio::int(0) {
                now
            } else {
                smallest_after(now, |t| self.level(t) == Ratio::int(0))
            };
            Outcome {
                allowed,
                remaining,
                reset_after,
                expires_at,
            }
        }
    }

    proptest! {
        #[test]
        fn matches_reference_model(case in arb_case(Algorithm::LeakyBucket)) {
            let (lim, start, ops) = case;
            let mut model = Model {
                l: u64::from(lim.requests_per_unit),
                w: lim.unit.nanos(),
                b: u64::from(lim.burst),
                pours: Vec::new(),
            };
            run(&lim, start, &ops, |now, op: &Op, got| {
                let want = model.check(now, op.hits, op.rejected);
                prop_assert_eq!(got, want, "at {}", now);
                Ok(())
            })?;
        }

        #[test]
        fn with_burst_one_admissions_are_spaced(
            l in 1u32..50,
            unit in prop_oneof![Just(Unit::Second), Just(Unit::Minute)],
            gaps in proptest::collection::vec(0u64..3_000_000_000, 1..60),
        ) {
            let lim = limit(Algorithm::LeakyBucket, l, unit, 1);
            let spacing = unit.nanos().div_ceil(u64::from(l));
            let mut st = CounterState::default();
            let mut now = 1_000 * unit.nanos();
            let mut last_admitted: Option<u64> = None;
            for gap in gaps {
                now += gap;
                if lim.check_and_update(&mut st, now, 1, RejectedHits::Free).allowed {
                    if let Some(prev) = last_admitted {
                        prop_assert!(now - prev >= spacing, "{} then {}", prev, now);
                    }
                    last_admitted = Some(now);
                }
            }
        }
    }

    #[test]
    fn documented_example() {
        // 4 per second with the default burst of 1: one hit every 250 ms, no bursts.
        let lim = limit(Algorithm::LeakyBucket, 4, Unit::Second, 1);
        let mut st = CounterState::default();
        let t = 9 * SEC + 1;
        let out = lim.check_and_update(&mut st, t, 1, RejectedHits::Free);
        assert_eq!(
            out,
            Outcome {
                allowed: true,
                remaining: 0,
                reset_after: SEC / 4,
                expires_at: t + SEC / 4
            }
        );
        let out = lim.check_and_update(&mut st, t + SEC / 4 - 1, 1, RejectedHits::Free);
        assert_eq!((out.allowed, out.reset_after), (false, 1));
        assert!(
            lim.check_and_update(&mut st, t + SEC / 4, 1, RejectedHits::Free)
                .allowed
        );
        // Two at once never fit a bucket of one.
        let out = lim.check_and_update(&mut st, t + 10 * SEC, 2, RejectedHits::Free);
        assert_eq!((out.allowed, out.remaining, out.reset_after), (false, 1, 0));
    }
}
