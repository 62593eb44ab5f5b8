//! Exact sliding window: remembers when every recorded hit happened during the last window.
//!
//! Owns: the log of recorded hits. A hit recorded at `ts` counts while `now < ts + W`. Memory
//! grows with the number of distinct instants recorded within one window (at most `L` with
//! `RejectedHits::Free`), which is the price of exactness.
//!
//! The log holds running totals rather than per-entry counts, so the hits still inside the
//! window are one binary search and one subtraction away, even on the read-only paths (looks
//! and free rejections) that must not drop expired entries.

use std::collections::VecDeque;

use super::{Limit, Nanos, Outcome, RejectedHits, sat_u32};

/// The recorded hits of the last window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// `(timestamp, running total of hits through this entry)`, oldest first, timestamps
    /// strictly increasing. Totals wrap: only differences of totals are ever used, and the
    /// hits inside one window are kept below 2^64, so the differences are exact.
    entries: VecDeque<(Nanos, u64)>,
    /// The running total through the newest entry already dropped.
    dropped_total: u64,
}

impl State {
    /// Entries held, for storage to account memory: one per distinct instant recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn total(&self) -> u64 {
        self.entries.back().map_or(self.dropped_total, |e| e.1)
    }

    /// The running total before entry `i`.
    fn total_before(&self, i: usize) -> u64 {
        i.checked_sub(1)
            .and_then(|j| self.entries.get(j))
            .map_or(self.dropped_total, |e| e.1)
    }

    /// How many entries have left the window at `now`, and the running total before the
    /// first entry still in it.
    fn expired(&self, w: u64, now: Nanos) -> (usize, u64) {
        let n = self
            .entries
            .partition_point(|&(ts, _)| ts.saturating_add(w) <= now);
        (n, self.total_before(n))
    }
}

pub(super) fn check(
    limit: &Limit,
    st: &mut State,
    now: Nanos,
    hits: u32,
    rejected: RejectedHits,
) -> Outcome {
    let w = limit.unit.nanos();
    let cap = u64::from(limit.requests_per_unit);
    let (expired, before) = st.expired(w, now);
    let live = st.total().wrapping_sub(before);
    let h = u64::from(hits);
    let allowed = live.saturating_add(h) <= cap;
    let record = h > 0 && (allowed || rejected == RejectedHits::Counted);
    let mut used = live;
    let mut first_live = expired;
    if record {
        st.entries.drain(..expired);
        st.dropped_total = before;
        // A burst's worth of capacity is given back once the log has mostly drained.
        let capacity = st.entries.capacity();
        if capacity > 64 && st.entries.len() < capacity / 4 {
            st.entries.shrink_to(capacity / 2);
        }
        first_live = 0;
        // Counted rejections are uncapped in meaning, but hits beyond 2^64 - 1 in one window
        // would break the running totals; by then the key is over any limit anyway.
        let h = h.min(u64::MAX - live);
        used = live + h;
        let total = st.total().wrapping_add(h);
        match st.entries.back_mut() {
            // Same instant, or a clock that stepped back: fold into the newest entry, which
            // keeps timestamps increasing (the hit then expires a little later, never earlier).
            Some(newest) if now <= newest.0 => newest.1 = total,
            _ => st.entries.push_back((now, total)),
        }
    }
    let oldest = st.entries.get(first_live).map(|e| e.0);
    let newest = st.entries.back().map(|e| e.0).filter(|_| oldest.is_some());
    Outcome {
        allowed,
        remaining: sat_u32(u128::from(cap.saturating_sub(used))),
        reset_after: oldest.map_or(0, |ts| ts.saturating_add(w).saturating_sub(now)),
        expires_at: newest.map_or(now, |ts| ts.saturating_add(w).max(now)),
    }
}

pub(super) fn expires_at(limit: &Limit, st: &State, now: Nanos) -> Nanos {
    let w = limit.unit.nanos();
    match st.entries.back() {
        Some(&(ts, _)) => ts.saturating_add(w).max(now),
        None => now,
    }
}

/// Takes the hits back from the newest entries, where the admission just put them.
pub(super) fn refund(_limit: &Limit, st: &mut State, _now: Nanos, hits: u32) {
    let mut left = u64::from(hits);
    while left > 0 {
        let Some(&(_, total)) = st.entries.back() else {
            return;
        };
        let in_entry = total.wrapping_sub(st.total_before(st.entries.len() - 1));
        if in_entry <= left {
            st.entries.pop_back();
            left -= in_entry;
        } else {
            if let Some(newest) = st.entries.back_mut() {
                newest.1 = total.wrapping_sub(left);
            }
            left = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Op, arb_case, limit, run};
    use super::super::{Algorithm, CounterState, Outcome, RejectedHits, Unit};
    use super::State;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    /// The reference model: every recorded hit, forever; the window is a filter.
    #[derive(Default)]
    struct Model {
        recorded: Vec<(u64, u64)>,
    }

    impl Model {
        fn live(&self, w: u64, now: u64) -> impl Iterator<Item = &(u64, u64)> {
            self.recorded.iter().filter(move |(t, _)| t + w > now)
        }

        fn check(&mut self, l: u64, w: u64, now: u64, hits: u32, rej: RejectedHits) -> Outcome {
            let h = u64::from(hits);
            let sum: u64 = self.live(w, now).map(|e| e.1).sum();
            let allowed = sum + h <= l;
            if h > 0 && (allowed || rej == RejectedHits::Counted) {
                self.recorded.push((now, h));
            }
            let sum: u64 = self.live(w, now).map(|e| e.1).sum();
            let oldest = self.live(w, now).map(|e| e.0).min();
            let newest = self.live(w, now).map(|e| e.0).max();
            Outcome {
                allowed,
                remaining: l.saturating_sub(sum) as u32,
                reset_after: oldest.map_or(0, |t| t + w - now),
                expires_at: newest.map_or(now, |t| t + w),
            }
        }
    }

    proptest! {
        #[test]
        fn matches_reference_model(case in arb_case(Algorithm::SlidingWindowLog)) {
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
        fn admits_at_most_limit_in_every_window_long_interval(
            case in arb_case(Algorithm::SlidingWindowLog)
        ) {
            let (lim, start, ops) = case;
            let w = lim.unit.nanos();
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            run(&lim, start, &ops, |now, op: &Op, got| {
                if got.allowed && op.hits > 0 {
                    admitted.push((now, u64::from(op.hits)));
                }
                Ok(())
            })?;
            // Any interval of length W holding admissions can be slid to end at one of them.
            for &(end, _) in &admitted {
                let inside: u64 = admitted
                    .iter()
                    .filter(|(t, _)| *t <= end && *t + w > end)
                    .map(|e| e.1)
                    .sum();
                prop_assert!(inside <= u64::from(lim.requests_per_unit));
            }
        }

        #[test]
        fn refund_takes_back_from_the_newest(
            case in arb_case(Algorithm::SlidingWindowLog),
            back in 0u32..20,
        ) {
            let (lim, start, ops) = case;
            let w = lim.unit.nanos();
            let mut model: Vec<(u64, u64)> = Vec::new();
            let mut st = CounterState::default();
            let mut now = start;
            for op in &ops {
                now += op.dt;
                let out = lim.check_and_update(&mut st, now, op.hits, op.rejected);
                if op.hits > 0 && (out.allowed || op.rejected == RejectedHits::Counted) {
                    model.push((now, u64::from(op.hits)));
                }
            }
            lim.refund(&mut st, now, back);
            let mut left = u64::from(back);
            while left > 0 {
                let Some(last) = model.last_mut() else { break };
                let take = last.1.min(left);
                last.1 -= take;
                left -= take;
                if last.1 == 0 {
                    model.pop();
                }
            }
            let live: u64 = model.iter().filter(|(t, _)| t + w > now).map(|e| e.1).sum();
            let look = lim.check_and_update(&mut st, now, 0, RejectedHits::Free);
            let want = u64::from(lim.requests_per_unit).saturating_sub(live);
            prop_assert_eq!(u64::from(look.remaining), want);
        }
    }

    #[test]
    fn three_per_second_example() {
        let lim = limit(Algorithm::SlidingWindowLog, 3, Unit::Second, 3);
        let mut st = CounterState::default();
        let t = 100 * SEC;
        for (i, dt) in [0, 300_000_000, 600_000_000].into_iter().enumerate() {
            let out = lim.check_and_update(&mut st, t + dt, 1, RejectedHits::Free);
            assert!(out.allowed);
            assert_eq!(out.remaining, 2 - i as u32);
            // Until the first hit leaves the window.
            assert_eq!(out.reset_after, SEC - dt);
        }
        let out = lim.check_and_update(&mut st, t + 900_000_000, 1, RejectedHits::Free);
        assert_eq!(
            out,
            Outcome {
                allowed: false,
                remaining: 0,
                reset_after: 100_000_000,
                expires_at: t + 600_000_000 + SEC,
            }
        );
        // Unlike a fixed window, crossing the second boundary frees only what has aged out.
        let out = lim.check_and_update(&mut st, t + SEC, 1, RejectedHits::Free);
        assert!(out.allowed);
        assert_eq!(out.remaining, 0);
        assert_eq!(out.reset_after, 300_000_000);
        assert!(
            !lim.check_and_update(&mut st, t + SEC + 1, 1, RejectedHits::Free)
                .allowed
        );
    }

    #[test]
    fn same_instant_merges_and_old_entries_are_dropped() {
        let lim = limit(Algorithm::SlidingWindowLog, 10, Unit::Second, 10);
        let mut st = CounterState::default();
        for _ in 0..3 {
            lim.check_and_update(&mut st, SEC, 2, RejectedHits::Free);
        }
        lim.check_and_update(&mut st, SEC + 1, 1, RejectedHits::Free);
        let super::super::AlgoState::SlidingWindowLog(log) = &st.algo else {
            panic!("not a log: {st:?}")
        };
        assert_eq!(log.len(), 2);
        let out = lim.check_and_update(&mut st, 2 * SEC, 1, RejectedHits::Free);
        assert_eq!(out.remaining, 8);
        let super::super::AlgoState::SlidingWindowLog(log) = &st.algo else {
            panic!("not a log: {st:?}")
        };
        assert_eq!(log.len(), 2);
    }

    #[test]
    fn clock_stepping_back_keeps_the_log_ordered() {
        let lim = limit(Algorithm::SlidingWindowLog, 2, Unit::Second, 2);
        let mut st = CounterState::default();
        assert!(
            lim.check_and_update(&mut st, 5 * SEC, 1, RejectedHits::Free)
                .allowed
        );
        assert!(
            lim.check_and_update(&mut st, 4 * SEC, 1, RejectedHits::Free)
                .allowed
        );
        assert!(
            !lim.check_and_update(&mut st, 4 * SEC, 1, RejectedHits::Free)
                .allowed
        );
        let out = lim.check_and_update(&mut st, 6 * SEC, 1, RejectedHits::Free);
        assert!(out.allowed);
        assert_eq!(out.remaining, 1);
    }

    #[test]
    fn running_totals_survive_wrapping() {
        let lim = limit(Algorithm::SlidingWindowLog, 5, Unit::Second, 5);
        let mut st = CounterState {
            blocked_until: 0,
            algo: super::super::AlgoState::SlidingWindowLog(State {
                entries: [(SEC, u64::MAX - 1)].into(),
                dropped_total: u64::MAX - 3,
            }),
        };
        // 2 hits live; 3 more wrap the total past zero.
        let out = lim.check_and_update(&mut st, SEC + 1, 3, RejectedHits::Free);
        assert!(out.allowed);
        assert_eq!(out.remaining, 0);
        lim.refund(&mut st, SEC + 1, 1);
        assert_eq!(
            lim.check_and_update(&mut st, SEC + 2, 0, RejectedHits::Free)
                .remaining,
            1
        );
        assert_eq!(
            lim.check_and_update(&mut st, 2 * SEC, 0, RejectedHits::Free)
                .remaining,
            3
        );
        assert_eq!(
            lim.check_and_update(&mut st, 2 * SEC + 1, 0, RejectedHits::Free)
                .remaining,
            5
        );
    }
}
