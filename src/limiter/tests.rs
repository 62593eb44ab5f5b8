//! Tests that hold for every algorithm (blocking, looks, refunds, degenerate limits, extreme
//! inputs, switching algorithm) and the helpers the per-algorithm tests share: random cases,
//! a driver, exact fractions for the reference models, and a bisection for "how long until".

use std::cmp::Ordering;

use proptest::prelude::*;

use super::{AlgoState, Algorithm, CounterState, Limit, Outcome, RejectedHits, Unit};

const SEC: u64 = 1_000_000_000;

const ALL: [Algorithm; 6] = Algorithm::ALL;

const UNITS: [Unit; 7] = Unit::ALL;

pub(super) fn limit(algorithm: Algorithm, l: u32, unit: Unit, burst: u32) -> Limit {
    Limit {
        algorithm,
        requests_per_unit: l,
        unit,
        burst,
        block_duration: 0,
    }
}

/// One request of a random sequence: `dt` after the previous one.
#[derive(Debug, Clone)]
pub(super) struct Op {
    pub dt: u64,
    pub hits: u32,
    pub rejected: RejectedHits,
}

/// A random limit of `algorithm`, a start instant and a sequence of requests, with time steps
/// biased towards the instants where things happen (window boundaries, emission intervals).
pub(super) fn arb_case(algorithm: Algorithm) -> impl Strategy<Value = (Limit, u64, Vec<Op>)> {
    let l = prop_oneof![4 => 1u32..=5, 2 => 1u32..=20, 1 => 1u32..=1000];
    let unit = prop_oneof![3 => Just(Unit::Second), 1 => Just(Unit::Minute)];
    (l, unit, any::<bool>(), 0u32..1000).prop_flat_map(move |(l, unit, default_burst, b)| {
        let burst = if default_burst {
            algorithm.default_burst(l)
        } else {
            1 + b % l.saturating_mul(2)
        };
        let w = unit.nanos();
        let step = w / u64::from(l);
        let start = prop_oneof![(1u64..1_000_000).prop_map(move |k| k * w), 0u64..1 << 60];
        let dt = prop_oneof![
            Just(0u64),
            1u64..4,
            Just(w),
            Just(w - 1),
            Just(step),
            Just(step + 1),
            0..=2 * step,
            0..=2 * w,
        ];
        let most = l.max(burst).saturating_add(1);
        let hits = prop_oneof![1 => Just(0u32), 4 => 1u32..=2, 2 => 0..=most];
        let rejected = prop_oneof![
            3 => Just(RejectedHits::Free),
            1 => Just(RejectedHits::Counted),
        ];
        let op = (dt, hits, rejected).prop_map(|(dt, hits, rejected)| Op { dt, hits, rejected });
        (
            Just(limit(algorithm, l, unit, burst)),
            start,
            proptest::collection::vec(op, 1..60),
        )
    })
}

/// Any algorithm's case.
fn arb_any_case() -> impl Strategy<Value = (Limit, u64, Vec<Op>)> {
    proptest::sample::select(ALL.to_vec()).prop_flat_map(arb_case)
}

/// Plays `ops` on a fresh state, handing each outcome to `f`.
pub(super) fn run(
    lim: &Limit,
    start: u64,
    ops: &[Op],
    mut f: impl FnMut(u64, &Op, Outcome) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let mut st = CounterState::default();
    let mut now = start;
    for op in ops {
        now += op.dt;
        let out = lim.check_and_update(&mut st, now, op.hits, op.rejected);
        f(now, op, out)?;
    }
    Ok(())
}

/// An exact fraction, always reduced with a positive denominator, so equality is structural.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ratio {
    n: i128,
    d: i128,
}

fn gcd(a: i128, b: i128) -> i128 {
    let (mut a, mut b) = (a.abs(), b.abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

impl Ratio {
    pub fn new(n: i128, d: u64) -> Ratio {
        Ratio::reduced(n, i128::from(d))
    }

    fn reduced(n: i128, d: i128) -> Ratio {
        assert!(d > 0);
        let g = gcd(n, d);
        Ratio { n: n / g, d: d / g }
    }

    pub fn int(n: i128) -> Ratio {
        Ratio { n, d: 1 }
    }

    pub fn add(self, o: Ratio) -> Ratio {
        Ratio::reduced(self.n * o.d + o.n * self.d, self.d * o.d)
    }

    pub fn sub(self, o: Ratio) -> Ratio {
        self.add(Ratio { n: -o.n, d: o.d })
    }

    pub fn mul_int(self, k: i128) -> Ratio {
        Ratio::reduced(self.n * k, self.d)
    }

    pub fn div(self, o: Ratio) -> Ratio {
        assert!(o.n > 0);
        Ratio::reduced(self.n * o.d, self.d * o.n)
    }

    pub fn floor(self) -> i128 {
        self.n.div_euclid(self.d)
    }

    pub fn ceil(self) -> i128 {
        -(-self.n).div_euclid(self.d)
    }
}

impl Ord for Ratio {
    fn cmp(&self, o: &Ratio) -> Ordering {
        (self.n * o.d).cmp(&(o.n * self.d))
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, o: &Ratio) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// The smallest instant after `now` where the monotone `pred` holds (it must not hold at
/// `now`): a search that knows nothing of the formulas it checks.
pub(super) fn smallest_after(now: u64, pred: impl Fn(u64) -> bool) -> u64 {
    let (mut lo, mut step) = (now, 1u64);
    let mut hi = now + 1;
    while !pred(hi) {
        lo = hi;
        step *= 2;
        hi = now + step;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if pred(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

fn look(lim: &Limit, st: &CounterState, now: u64) -> Outcome {
    let mut copy = st.clone();
    let out = lim.check_and_update(&mut copy, now, 0, RejectedHits::Free);
    assert_eq!(&copy, st, "a look changed the state");
    out
}

proptest! {
    #[test]
    fn looks_and_free_rejections_change_nothing(case in arb_any_case()) {
        let (lim, start, ops) = case;
        let mut st = CounterState::default();
        let mut now = start;
        for op in &ops {
            now += op.dt;
            let before = st.clone();
            let seen = look(&lim, &st, now);
            let out = lim.check_and_update(&mut st, now, op.hits, op.rejected);
            if op.hits == 0 {
                prop_assert_eq!(out, seen);
            } else {
                // A request is admitted exactly when it fits in what a look reports.
                prop_assert_eq!(out.allowed, op.hits <= seen.remaining);
            }
            if op.hits == 0 || (!out.allowed && op.rejected == RejectedHits::Free) {
                prop_assert_eq!(&st, &before);
            }
        }
    }

    #[test]
    fn remaining_counts_the_single_hits_that_would_pass(case in arb_any_case()) {
        let (lim, start, ops) = case;
        let mut st = CounterState::default();
        let mut now = start;
        for op in &ops {
            now += op.dt;
            let out = lim.check_and_update(&mut st, now, op.hits, op.rejected);
            if out.remaining > 50 {
                continue;
            }
            let mut copy = st.clone();
            for i in 0..out.remaining {
                let single = lim.check_and_update(&mut copy, now, 1, RejectedHits::Free);
                prop_assert!(single.allowed, "hit {} of {} refused", i + 1, out.remaining);
                prop_assert_eq!(single.remaining, out.remaining - i - 1);
            }
            prop_assert!(!lim.check_and_update(&mut copy, now, 1, RejectedHits::Free).allowed);
            // reset_after: nothing more fits just before it, and something does at it, except
            // in the log, where the oldest entry leaving may not be enough after counted
            // rejections.
            if out.remaining == 0 && out.reset_after > 0 {
                let at = now + out.reset_after;
                let mut copy = st.clone();
                if out.reset_after > 1 {
                    let before = lim.check_and_update(&mut copy, at - 1, 0, RejectedHits::Free);
                    prop_assert_eq!(before.remaining, 0);
                }
                if lim.algorithm != Algorithm::SlidingWindowLog {
                    let then = lim.check_and_update(&mut copy, at, 0, RejectedHits::Free);
                    prop_assert!(then.remaining >= 1);
                }
            }
        }
    }

    #[test]
    fn refund_after_admit_restores_the_previous_state_of_play(
        case in arb_any_case(),
    ) {
        let (lim, start, ops) = case;
        let mut st = CounterState::default();
        let mut now = start;
        for op in &ops {
            now += op.dt;
            let before = look(&lim, &st, now);
            let mut admitted = st.clone();
            let out = lim.check_and_update(&mut admitted, now, op.hits, op.rejected);
            if out.allowed && op.hits > 0 {
                lim.refund(&mut admitted, now, op.hits);
                prop_assert_eq!(look(&lim, &admitted, now), before);
                // Never more generous than a fresh key.
                let fresh = look(&lim, &CounterState::default(), now);
                prop_assert!(before.remaining <= fresh.remaining);
            }
            lim.check_and_update(&mut st, now, op.hits, op.rejected);
        }
    }

    #[test]
    fn expiry_means_equivalent_to_fresh(
        case in arb_any_case(),
        later in 0u64..1_000_000,
        block in prop_oneof![Just(0u64), Just(1), 0..3 * SEC, 0..3 * 60 * SEC],
    ) {
        let (lim, start, ops) = case;
        let lim = Limit { block_duration: block, ..lim };
        let mut st = CounterState::default();
        let mut now = start;
        let mut expires_at = 0;
        for op in &ops {
            now += op.dt;
            expires_at = lim.check_and_update(&mut st, now, op.hits, op.rejected).expires_at;
            prop_assert!(expires_at >= now);
        }
        let at = expires_at + later;
        // From then on the stored state and a fresh one answer every request alike.
        let mut fresh = CounterState::default();
        for hits in [0, 1, 2, lim.requests_per_unit, lim.burst] {
            let a = lim.check_and_update(&mut st, at, hits, RejectedHits::Free);
            let b = lim.check_and_update(&mut fresh, at, hits, RejectedHits::Free);
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn buckets_admit_at_most_burst_plus_rate(
        case in prop_oneof![arb_case(Algorithm::TokenBucket), arb_case(Algorithm::Gcra)],
    ) {
        let (lim, start, ops) = case;
        let (l, b, w) = (
            u128::from(lim.requests_per_unit),
            u128::from(lim.burst),
            u128::from(lim.unit.nanos()),
        );
        let mut admitted: Vec<(u64, u128)> = Vec::new();
        run(&lim, start, &ops, |now, op, out| {
            if out.allowed && op.hits > 0 {
                admitted.push((now, u128::from(op.hits)));
            }
            Ok(())
        })?;
        for (i, &(t0, _)) in admitted.iter().enumerate() {
            let mut sum = 0;
            for &(t1, h) in &admitted[i..] {
                sum += h;
                let allowance = b * w + l * u128::from(t1 - t0);
                prop_assert!(sum * w <= allowance, "{} in [{}, {}]", sum, t0, t1);
            }
        }
    }

    /// Whatever the inputs (any rate, burst, unit, hits, clock going anywhere, rule changes
    /// on the same state), nothing panics and the answers stay sane.
    #[test]
    fn never_panics(
        steps in proptest::collection::vec(
            (
                proptest::sample::select(ALL.to_vec()),
                prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()],
                prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()],
                proptest::sample::select(UNITS.to_vec()),
                prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), 0..10 * SEC],
                prop_oneof![Just(0u64), Just(u64::MAX / 2), Just(u64::MAX), any::<u64>()],
                prop_oneof![Just(0u32), Just(1), Just(u32::MAX), any::<u32>()],
                any::<bool>(),
                any::<bool>(),
            ),
            1..40,
        ),
    ) {
        let mut st = CounterState::default();
        for (algorithm, l, burst, unit, block, now, hits, counted, refund) in steps {
            let lim = Limit { algorithm, requests_per_unit: l, unit, burst, block_duration: block };
            let rejected = if counted { RejectedHits::Counted } else { RejectedHits::Free };
            let out = lim.check_and_update(&mut st, now, hits, rejected);
            prop_assert!(out.remaining <= l.max(burst));
            prop_assert!(out.expires_at >= now);
            if refund {
                lim.refund(&mut st, now, hits);
            }
        }
    }
}

#[test]
fn scale_is_a_multiple_of_every_unit() {
    for unit in UNITS {
        assert_eq!(super::SCALE % u128::from(unit.nanos()), 0, "{unit:?}");
    }
}

#[test]
fn zero_rate_rejects_everything_without_recording() {
    for algorithm in ALL {
        for rejected in [RejectedHits::Free, RejectedHits::Counted] {
            let lim = limit(algorithm, 0, Unit::Minute, algorithm.default_burst(0));
            let w = Unit::Minute.nanos();
            let now = 1_000 * w + 7 * SEC;
            let mut st = CounterState::default();
            let out = lim.check_and_update(&mut st, now, 1, rejected);
            let window_end = match algorithm {
                Algorithm::FixedWindow | Algorithm::SlidingWindowCounter => w - 7 * SEC,
                _ => w,
            };
            assert_eq!(
                out,
                Outcome {
                    allowed: false,
                    remaining: 0,
                    reset_after: window_end,
                    expires_at: now,
                },
                "{algorithm:?}"
            );
            assert_eq!(st, CounterState::default(), "{algorithm:?}");
            assert!(
                lim.check_and_update(&mut st, now, u32::MAX, rejected)
                    .reset_after
                    > 0
            );
            let peek = lim.check_and_update(&mut st, now, 0, rejected);
            assert!(peek.allowed && peek.remaining == 0, "{algorithm:?}");
        }
    }
}

#[test]
fn zero_burst_bucket_admits_nothing() {
    for algorithm in [
        Algorithm::TokenBucket,
        Algorithm::LeakyBucket,
        Algorithm::Gcra,
    ] {
        let lim = limit(algorithm, 10, Unit::Second, 0);
        let mut st = CounterState::default();
        let out = lim.check_and_update(&mut st, 5 * SEC, 1, RejectedHits::Counted);
        assert_eq!(
            (out.allowed, out.remaining, out.reset_after),
            (false, 0, SEC)
        );
        lim.refund(&mut st, 5 * SEC, 1);
        assert_eq!(st, CounterState::default());
    }
}

#[test]
fn huge_hits_and_rates_do_not_overflow() {
    let now = u64::MAX / 2;
    for algorithm in ALL {
        for unit in UNITS {
            // The largest limit admits the largest request once, from a fresh state.
            let lim = limit(algorithm, u32::MAX, unit, u32::MAX);
            let mut st = CounterState::default();
            let out = lim.check_and_update(&mut st, now, u32::MAX, RejectedHits::Free);
            assert!(out.allowed, "{algorithm:?} {unit:?}");
            assert_eq!(out.remaining, 0);
            assert!(out.reset_after > 0 && out.expires_at > now);
            let out = lim.check_and_update(&mut st, now, u32::MAX, RejectedHits::Counted);
            assert!(!out.allowed);
            for _ in 0..100 {
                lim.check_and_update(&mut st, now, u32::MAX, RejectedHits::Counted);
            }
            let out = lim.check_and_update(&mut st, now, 1, RejectedHits::Free);
            assert!(!out.allowed && out.remaining == 0);
            lim.refund(&mut st, now, u32::MAX);
            // A tiny limit asked for the largest request refuses it.
            let small = limit(algorithm, 1, unit, 1);
            let mut st = CounterState::default();
            let out = small.check_and_update(&mut st, now, u32::MAX, RejectedHits::Free);
            assert!(!out.allowed);
            assert_eq!(out.remaining, 1, "{algorithm:?} {unit:?}");
            if algorithm != Algorithm::FixedWindow {
                assert_eq!(out.reset_after, 0, "{algorithm:?} {unit:?}");
            }
        }
    }
}

#[test]
fn end_of_time_saturates() {
    for algorithm in ALL {
        let lim = Limit {
            block_duration: u64::MAX,
            ..limit(algorithm, 1, Unit::Year, 1)
        };
        let mut st = CounterState::default();
        let out = lim.check_and_update(&mut st, u64::MAX - 1, 1, RejectedHits::Free);
        assert!(out.allowed, "{algorithm:?}");
        assert_eq!(out.expires_at, u64::MAX);
        let out = lim.check_and_update(&mut st, u64::MAX - 1, 1, RejectedHits::Counted);
        assert!(!out.allowed);
        assert_eq!(out.expires_at, u64::MAX);
        assert_eq!(st.blocked_until, u64::MAX);
        // Time running backwards from there is tolerated too.
        lim.check_and_update(&mut st, 0, 1, RejectedHits::Free);
    }
}

#[test]
fn blocking_holds_the_key_shut_then_lets_go() {
    for algorithm in ALL {
        let block = 30 * SEC;
        let lim = Limit {
            block_duration: block,
            ..limit(algorithm, 2, Unit::Second, 2)
        };
        let t = 1_000 * SEC;
        let mut st = CounterState::default();
        assert!(
            lim.check_and_update(&mut st, t, 2, RejectedHits::Free)
                .allowed
        );
        let out = lim.check_and_update(&mut st, t, 1, RejectedHits::Free);
        assert_eq!(
            (out.allowed, out.remaining, out.reset_after),
            (false, 0, block),
            "{algorithm:?}"
        );
        assert_eq!(st.blocked_until, t + block);
        assert!(out.expires_at >= t + block);
        let algo_before = st.algo.clone();
        // While blocked everything is refused and nothing else changes, not even the block.
        for (dt, hits) in [(SEC, 1), (10 * SEC, 0), (block - 1, 5)] {
            let out = lim.check_and_update(&mut st, t + dt, hits, RejectedHits::Counted);
            assert_eq!(
                out,
                Outcome {
                    allowed: false,
                    remaining: 0,
                    reset_after: block - dt,
                    expires_at: out.expires_at.max(t + block),
                },
                "{algorithm:?}"
            );
            assert_eq!(st.algo, algo_before);
            assert_eq!(st.blocked_until, t + block);
        }
        let out = lim.check_and_update(&mut st, t + block, 1, RejectedHits::Free);
        assert!(out.allowed, "{algorithm:?}");
        // A rejection because the request is too big also blocks: remaining becomes 0.
        let out = lim.check_and_update(&mut st, t + block, 100, RejectedHits::Free);
        assert_eq!((out.allowed, out.remaining), (false, 0));
        assert_eq!(st.blocked_until, t + 2 * block);
    }
}

#[test]
fn a_look_never_blocks() {
    let unblocking = limit(Algorithm::FixedWindow, 1, Unit::Second, 1);
    let lim = Limit {
        block_duration: SEC,
        ..unblocking
    };
    let mut st = CounterState::default();
    unblocking.check_and_update(&mut st, 0, 3, RejectedHits::Counted);
    // Over the limit, so the look is refused, but it requested nothing and blocks nothing.
    let out = lim.check_and_update(&mut st, 1, 0, RejectedHits::Free);
    assert!(!out.allowed);
    assert_eq!(out.reset_after, SEC - 1);
    assert_eq!(st.blocked_until, 0);
}

#[test]
fn reset_after_is_at_least_the_block() {
    // The window ends in 59 s, the block lasts 1 s: the window wins.
    let lim = Limit {
        block_duration: SEC,
        ..limit(Algorithm::FixedWindow, 1, Unit::Minute, 1)
    };
    let mut st = CounterState::default();
    let t = 100 * Unit::Minute.nanos() + SEC;
    lim.check_and_update(&mut st, t, 1, RejectedHits::Free);
    let out = lim.check_and_update(&mut st, t, 1, RejectedHits::Free);
    assert_eq!(out.reset_after, 59 * SEC);
    assert_eq!(st.blocked_until, t + SEC);
    // While blocked, the state still expires with its window, not with the block.
    let out = lim.check_and_update(&mut st, t + 1, 1, RejectedHits::Free);
    assert_eq!((out.reset_after, out.expires_at), (SEC - 1, t + 59 * SEC));
}

#[test]
fn switching_algorithm_starts_fresh() {
    let t = 500 * SEC;
    for from in ALL {
        for to in ALL {
            if from == to {
                continue;
            }
            let mut st = CounterState::default();
            let old = limit(from, 3, Unit::Second, 3);
            old.check_and_update(&mut st, t, 3, RejectedHits::Free);
            let old_algo = st.algo.clone();
            let new = limit(to, 3, Unit::Second, to.default_burst(3));
            let mut fresh = CounterState::default();
            // A look or a refund does not replace the old state.
            assert_eq!(
                look(&new, &st, t),
                look(&new, &fresh, t),
                "{from:?} -> {to:?}"
            );
            new.refund(&mut st, t, 1);
            assert_eq!(st.algo, old_algo);
            // A real request behaves as on a fresh key and takes the slot over.
            let a = new.check_and_update(&mut st, t, 1, RejectedHits::Free);
            let b = new.check_and_update(&mut fresh, t, 1, RejectedHits::Free);
            assert_eq!(a, b, "{from:?} -> {to:?}");
            assert_eq!(st, fresh);
        }
    }
}

#[test]
fn a_free_rejection_on_a_foreign_state_keeps_it() {
    let mut st = CounterState::default();
    limit(Algorithm::Gcra, 3, Unit::Second, 3).check_and_update(
        &mut st,
        SEC,
        1,
        RejectedHits::Free,
    );
    let before = st.clone();
    let out = limit(Algorithm::FixedWindow, 3, Unit::Second, 3).check_and_update(
        &mut st,
        SEC,
        4,
        RejectedHits::Free,
    );
    assert!(!out.allowed);
    assert_eq!(st, before);
    assert!(matches!(st.algo, AlgoState::Gcra(_)));
}

#[test]
fn rate_and_unit_changes_keep_bucket_levels() {
    // 6 per minute, burst 6, all taken: 6 tokens missing. The same state under
    // 1 per second still misses 6 tokens, refilled in 6 s instead of 60.
    for algorithm in [
        Algorithm::TokenBucket,
        Algorithm::LeakyBucket,
        Algorithm::Gcra,
    ] {
        let t = 1_000 * SEC;
        let mut st = CounterState::default();
        limit(algorithm, 6, Unit::Minute, 6).check_and_update(&mut st, t, 6, RejectedHits::Free);
        let faster = limit(algorithm, 1, Unit::Second, 6);
        let out = look(&faster, &st, t);
        if algorithm == Algorithm::Gcra {
            // GCRA keeps its debt as time: the TAT is 60 s ahead, and one more hit fits once
            // it is within 6 s − 1 s, after 55 s.
            assert_eq!((out.remaining, out.reset_after), (0, 55 * SEC));
        } else {
            assert_eq!(
                (out.remaining, out.reset_after, out.expires_at),
                (0, SEC, t + 6 * SEC)
            );
        }
    }
}

#[test]
fn documented_defaults() {
    assert_eq!(Algorithm::LeakyBucket.default_burst(50), 1);
    assert_eq!(Algorithm::TokenBucket.default_burst(50), 50);
    assert_eq!(RejectedHits::default(), RejectedHits::Free);
}
