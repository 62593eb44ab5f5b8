//! Token bucket: `burst` tokens, refilled continuously at `requests_per_unit` per unit; a hit
//! takes a token. Allows bursts of up to `burst` after a quiet period.
//!
//! Owns: the bucket's level, kept as the number of tokens *missing* from a full bucket, in
//! tokens × `SCALE`, as of the instant `last`. Missing rather than present, so the derived
//! `Default` (nothing missing) is the full bucket a new key starts with. With
//! `RejectedHits::Counted` more than `burst` tokens can be missing: the bucket is in debt.

use super::{Limit, Nanos, Outcome, RejectedHits, SCALE, sat_u32, sat_u64};

/// The bucket as of `last`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// Tokens missing from a full bucket × `SCALE`.
    pub(super) missing: u128,
    pub(super) last: Nanos,
}

/// The bucket's numbers in `SCALE` units.
struct Params {
    /// Refill per nanosecond.
    rate: u128,
    /// One token.
    token: u128,
    /// A full bucket.
    capacity: u128,
}

fn params(limit: &Limit) -> Params {
    Params {
        rate: u128::from(limit.requests_per_unit) * limit.unit.scale_per_nano(),
        token: SCALE,
        capacity: u128::from(limit.burst) * SCALE,
    }
}

/// Tokens missing at `at`. A clock that stepped back (`at < last`) refills nothing.
fn missing_at(p: &Params, st: &State, at: Nanos) -> u128 {
    let elapsed = u128::from(at.saturating_sub(st.last));
    st.missing.saturating_sub(elapsed * p.rate)
}

pub(super) fn check(
    limit: &Limit,
    st: &mut State,
    now: Nanos,
    hits: u32,
    rejected: RejectedHits,
) -> Outcome {
    let p = params(limit);
    let at = now.max(st.last);
    let mut missing = missing_at(&p, st, at);
    let cost = u128::from(hits) * p.token;
    let allowed = missing.saturating_add(cost) <= p.capacity;
    if hits > 0 && (allowed || rejected == RejectedHits::Counted) {
        missing = missing.saturating_add(cost);
        *st = State { missing, last: at };
    }
    let remaining = p.capacity.saturating_sub(missing) / p.token;
    let skew = at - now;
    let reset_after = if remaining >= 1 {
        0
    } else {
        // Until at most `burst − 1` tokens are missing.
        let over = missing - (p.capacity - p.token);
        skew.saturating_add(sat_u64(over.div_ceil(p.rate)))
    };
    Outcome {
        allowed,
        remaining: sat_u32(remaining),
        reset_after,
        expires_at: at.saturating_add(sat_u64(missing.div_ceil(p.rate))),
    }
}

pub(super) fn expires_at(limit: &Limit, st: &State, now: Nanos) -> Nanos {
    let p = params(limit);
    let at = now.max(st.last);
    at.saturating_add(sat_u64(missing_at(&p, st, at).div_ceil(p.rate)))
}

/// Puts the tokens back, never beyond a full bucket.
pub(super) fn refund(limit: &Limit, st: &mut State, now: Nanos, hits: u32) {
    let p = params(limit);
    let at = now.max(st.last);
    let missing = missing_at(&p, st, at).saturating_sub(u128::from(hits) * p.token);
    *st = State { missing, last: at };
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Op, Ratio, arb_case, limit, run, smallest_after};
    use super::super::{Algorithm, CounterState, Outcome, RejectedHits, Unit};
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    /// The reference model: the number of tokens present as an exact fraction, refilled by
    /// `elapsed × L / W` and capped at B; times found by bisection.
    #[derive(Clone)]
    struct Model {
        l: u64,
        w: u64,
        b: u64,
        tokens: Ratio,
        at: u64,
    }

    impl Model {
        fn tokens_at(&self, t: u64) -> Ratio {
            let refill = Ratio::new(i128::from(t - self.at) * i128::from(self.l), self.w);
            self.tokens.add(refill).min(Ratio::int(self.b as i128))
        }

        fn check(&mut self, now: u64, hits: u32, rej: RejectedHits) -> Outcome {
            self.tokens = self.tokens_at(now);
            self.at = now;
            let h = Ratio::int(i128::from(hits));
            let allowed = self.tokens >= h;
            if hits > 0 && (allowed || rej == RejectedHits::Counted) {
                self.tokens = self.tokens.sub(h);
            }
            let remaining = self.tokens.floor().max(0) as u32;
            let reset_after = if remaining >= 1 {
                0
            } else {
                smallest_after(now, |t| self.tokens_at(t) >= Ratio::int(1)) - now
            };
            let full = Ratio::int(self.b as i128);
            let expires_at = if self.tokens >= full {
                now
            } else {
                smallest_after(now, |t| self.tokens_at(t) >= full)
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
        fn matches_reference_model(case in arb_case(Algorithm::TokenBucket)) {
            let (lim, start, ops) = case;
            let mut model = Model {
                l: u64::from(lim.requests_per_unit),
                w: lim.unit.nanos(),
                b: u64::from(lim.burst),
                tokens: Ratio::int(i128::from(lim.burst)),
                at: start,
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
        // 2 per second, burst 5: a full bucket takes 5 at once, then one every half second.
        let lim = limit(Algorithm::TokenBucket, 2, Unit::Second, 5);
        let mut st = CounterState::default();
        let t = 1_000 * SEC + 123;
        let out = lim.check_and_update(&mut st, t, 5, RejectedHits::Free);
        assert_eq!(
            out,
            Outcome {
                allowed: true,
                remaining: 0,
                reset_after: SEC / 2,
                expires_at: t + 5 * SEC / 2
            }
        );
        let out = lim.check_and_update(&mut st, t + SEC / 4, 1, RejectedHits::Free);
        assert!(!out.allowed);
        assert_eq!(out.reset_after, SEC / 4);
        assert!(
            lim.check_and_update(&mut st, t + SEC / 2, 1, RejectedHits::Free)
                .allowed
        );
        // Debt: 3 counted rejections push the next token 1.5 s further away.
        lim.check_and_update(&mut st, t + SEC / 2, 3, RejectedHits::Counted);
        let out = lim.check_and_update(&mut st, t + SEC / 2, 0, RejectedHits::Free);
        assert!(!out.allowed);
        assert_eq!(out.reset_after, 2 * SEC);
    }

    #[test]
    fn fractional_refill_is_exact() {
        // 7 per hour: a token every 3600/7 s, which is not a whole number of nanoseconds.
        let lim = limit(Algorithm::TokenBucket, 7, Unit::Hour, 1);
        let mut st = CounterState::default();
        assert!(
            lim.check_and_update(&mut st, 0, 1, RejectedHits::Free)
                .allowed
        );
        let interval = (3_600 * SEC).div_ceil(7);
        let out = lim.check_and_update(&mut st, 1, 1, RejectedHits::Free);
        assert_eq!(out.reset_after, interval - 1);
        assert!(
            !lim.check_and_update(&mut st, interval - 1, 1, RejectedHits::Free)
                .allowed
        );
        assert!(
            lim.check_and_update(&mut st, interval, 1, RejectedHits::Free)
                .allowed
        );
    }
}
