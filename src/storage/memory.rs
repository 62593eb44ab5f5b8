//! The in-memory store: sharded maps of counter states.
//!
//! Exact under concurrency because each decision runs under its shard's lock (there is no
//! global lock: 256 shards, picked by the key's digest). Bounded: at most `max_keys` states;
//! when a shard is full, expired states go first, then those closest to expiry.
//!
//! Compact for the default algorithm: a fixed window state is kept as its four numbers (a
//! 48-byte table entry with its key), every other state as a whole `CounterState` (96 bytes).
//! Each shard has one map of each; a key's state is in exactly one of them, the one its
//! layout belongs to, and moves when a rule changes algorithm. What a key's state means does
//! not depend on the map it is in.

use super::CounterOp;
use crate::limiter::{
    AlgoState, Algorithm, CounterState, FixedWindowState, Limit, Nanos, Outcome, RejectedHits,
};
use crate::rules::CounterKey;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SHARDS: usize = 256;

#[derive(Debug, Default)]
struct Slot {
    state: CounterState,
    expires_at: Nanos,
}

/// A fixed window `CounterState` and its expiry, unpacked: 32 bytes where a `Slot` takes 80.
/// A table entry (with the 16-byte key) is 48 bytes instead of 96, which is what brings the
/// default algorithm's memory per key down (see the README's performance section).
///
/// The window's two numbers are deliberately not neighbours: when they were, the compiler
/// copied them back from the limiter's state with one 16-byte load right after the limiter's
/// two 8-byte stores, a store-forwarding stall that showed in the hot-key benchmark.
#[derive(Debug, Clone, Copy)]
struct FixedSlot {
    window_start: Nanos,
    blocked_until: Nanos,
    count: u64,
    expires_at: Nanos,
}

const _: () = assert!(std::mem::size_of::<(CounterKey, FixedSlot)>() == 48);

impl FixedSlot {
    /// The compact form of `state`, when it is a fixed window's.
    #[inline]
    fn of(state: &CounterState, expires_at: Nanos) -> Option<FixedSlot> {
        match &state.algo {
            AlgoState::FixedWindow(s) => Some(FixedSlot {
                window_start: s.window_start(),
                count: s.count(),
                blocked_until: state.blocked_until,
                expires_at,
            }),
            _ => None,
        }
    }

    #[inline]
    fn state(&self) -> CounterState {
        CounterState {
            blocked_until: self.blocked_until,
            algo: AlgoState::FixedWindow(FixedWindowState::from_parts(
                self.window_start,
                self.count,
            )),
        }
    }
}

/// Keys are already uniform 128-bit digests: hashing them again is wasted work.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | *b as u64;
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Digest = BuildHasherDefault<DigestHasher>;

/// One shard's states: fixed windows unpacked, the other algorithms' states whole.
#[derive(Debug, Default)]
struct Maps {
    fixed: HashMap<CounterKey, FixedSlot, Digest>,
    other: HashMap<CounterKey, Slot, Digest>,
}

impl Maps {
    fn len(&self) -> usize {
        self.fixed.len() + self.other.len()
    }

    /// Keeps the states whose expiry passes `keep`.
    fn retain(&mut self, mut keep: impl FnMut(Nanos) -> bool) {
        self.fixed.retain(|_, s| keep(s.expires_at));
        self.other.retain(|_, s| keep(s.expires_at));
    }

    /// Stores the state of a key held in neither map, in the map its layout belongs to.
    fn insert(&mut self, key: CounterKey, state: CounterState, expires_at: Nanos) {
        match FixedSlot::of(&state, expires_at) {
            Some(slot) => {
                self.fixed.insert(key, slot);
            }
            None => {
                self.other.insert(key, Slot { state, expires_at });
            }
        }
    }

    /// Decides on the key's state if it is a fixed window's.
    #[inline]
    fn apply_fixed(
        &mut self,
        key: CounterKey,
        limit: &Limit,
        now: Nanos,
        hits: u32,
        rejected: RejectedHits,
    ) -> Option<Outcome> {
        let slot = self.fixed.get_mut(&key)?;
        let mut state = slot.state();
        let outcome = limit.check_and_update(&mut state, now, hits, rejected);
        match FixedSlot::of(&state, outcome.expires_at) {
            Some(packed) => *slot = packed,
            // Another algorithm's limit replaced the state: the rule changed algorithm.
            None => self.move_to_other(key, state, outcome.expires_at),
        }
        Some(outcome)
    }

    #[cold]
    #[inline(never)]
    fn move_to_other(&mut self, key: CounterKey, state: CounterState, expires_at: Nanos) {
        self.fixed.remove(&key);
        self.other.insert(key, Slot { state, expires_at });
    }

    #[cold]
    #[inline(never)]
    fn move_to_fixed(&mut self, key: CounterKey) {
        if let Some(slot) = self.other.remove(&key) {
            self.insert(key, slot.state, slot.expires_at);
        }
    }

    /// Decides on the key's state if it is another algorithm's.
    #[inline]
    fn apply_other(
        &mut self,
        key: CounterKey,
        limit: &Limit,
        now: Nanos,
        hits: u32,
        rejected: RejectedHits,
    ) -> Option<Outcome> {
        let slot = self.other.get_mut(&key)?;
        let outcome = limit.check_and_update(&mut slot.state, now, hits, rejected);
        slot.expires_at = outcome.expires_at;
        // A fixed window limit replaced the state: the rule changed algorithm.
        if matches!(slot.state.algo, AlgoState::FixedWindow(_)) {
            self.move_to_fixed(key);
        }
        Some(outcome)
    }
}

/// Cache-line aligned so two cores locking neighbouring shards don't share a line.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard(Mutex<Maps>);

#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Shard]>,
    max_per_shard: usize,
    evictions: AtomicU64,
}

impl MemoryStore {
    pub fn new(max_keys: usize) -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
            evictions: AtomicU64::new(0),
        }
    }

    #[inline]
    fn shard(&self, key: CounterKey) -> &Mutex<Maps> {
        // High bits pick the shard, low bits the bucket inside it.
        &self.shards[(key >> 120) as usize % SHARDS].0
    }

    /// Decides one counter.
    #[inline]
    pub fn apply(
        &self,
        key: CounterKey,
        limit: &Limit,
        now: Nanos,
        hits: u32,
        rejected: RejectedHits,
    ) -> Outcome {
        let mut maps = self.shard(key).lock();
        // The limit's algorithm says which map most likely holds the key: look there first.
        // (Written out rather than through `Maps::apply_fixed`/`apply_other`: returning the
        // outcome through an `Option` cost a store-forwarding stall on every decision.)
        if limit.algorithm == Algorithm::FixedWindow {
            if let Some(slot) = maps.fixed.get_mut(&key) {
                let mut state = slot.state();
                let outcome = limit.check_and_update(&mut state, now, hits, rejected);
                match FixedSlot::of(&state, outcome.expires_at) {
                    Some(packed) => *slot = packed,
                    None => maps.move_to_other(key, state, outcome.expires_at),
                }
                return outcome;
            }
        } else if let Some(slot) = maps.other.get_mut(&key) {
            let outcome = limit.check_and_update(&mut slot.state, now, hits, rejected);
            slot.expires_at = outcome.expires_at;
            if matches!(slot.state.algo, AlgoState::FixedWindow(_)) {
                maps.move_to_fixed(key);
            }
            return outcome;
        }
        self.apply_elsewhere(&mut maps, key, limit, now, hits, rejected)
    }

    /// `apply` for a key not in the map its limit's algorithm suggests: in the other map (the
    /// rule changed algorithm), or new. Out of line, to keep the common path short.
    #[inline(never)]
    fn apply_elsewhere(
        &self,
        maps: &mut Maps,
        key: CounterKey,
        limit: &Limit,
        now: Nanos,
        hits: u32,
        rejected: RejectedHits,
    ) -> Outcome {
        let found = if limit.algorithm == Algorithm::FixedWindow {
            maps.apply_other(key, limit, now, hits, rejected)
        } else {
            maps.apply_fixed(key, limit, now, hits, rejected)
        };
        if let Some(outcome) = found {
            return outcome;
        }
        let mut state = CounterState::default();
        let outcome = limit.check_and_update(&mut state, now, hits, rejected);
        // Looking (hits 0) or a state that is already fresh again needs no slot.
        if state != CounterState::default() && outcome.expires_at > now {
            if maps.len() >= self.max_per_shard {
                self.evict(maps, now);
            }
            maps.insert(key, state, outcome.expires_at);
        }
        outcome
    }

    /// Undoes admitted hits (see `Limit::refund`).
    pub fn refund(&self, key: CounterKey, limit: &Limit, now: Nanos, hits: u32) {
        let mut maps = self.shard(key).lock();
        if let Some(slot) = maps.fixed.get_mut(&key) {
            let mut state = slot.state();
            limit.refund(&mut state, now, hits);
            // A refund never changes a state's algorithm.
            if let Some(packed) = FixedSlot::of(&state, slot.expires_at) {
                *slot = packed;
            }
        } else if let Some(slot) = maps.other.get_mut(&key) {
            limit.refund(&mut slot.state, now, hits);
        }
    }

    /// Decides all ops of one request: each op is exact on its own; if an enforced op
    /// rejects, the ops admitted before it are refunded so the request consumes nothing.
    /// Between the admit and the refund another request may see the counter briefly higher:
    /// that can only reject, never over-admit.
    pub fn check_and_update(&self, ops: &mut [CounterOp], now: Nanos, rejected: RejectedHits) {
        let mut rejected_by_enforced = false;
        for op in ops.iter_mut() {
            if op.negative {
                self.refund(op.key, &op.limit, now, op.hits);
                op.outcome = Some(self.apply(op.key, &op.limit, now, 0, rejected));
                continue;
            }
            let outcome = self.apply(op.key, &op.limit, now, op.hits, rejected);
            rejected_by_enforced |= !outcome.allowed && !op.shadow;
            op.outcome = Some(outcome);
        }
        if !rejected_by_enforced || rejected == RejectedHits::Counted {
            return;
        }
        for op in ops.iter_mut() {
            if let Some(o) = op.outcome
                && o.allowed
                && op.hits > 0
                && !op.negative
            {
                self.refund(op.key, &op.limit, now, op.hits);
                // Report what the counter really holds now.
                op.outcome = Some(self.apply(op.key, &op.limit, now, 0, rejected));
            }
        }
    }

    /// Expiry-first eviction, amortised: drop every expired state; if that frees less than
    /// an eighth of the shard, drop the eighth closest to expiry.
    fn evict(&self, map: &mut Maps, now: Nanos) {
        map.retain(|expires_at| expires_at > now);
        let before = map.len();
        let target = self.max_per_shard - self.max_per_shard / 8;
        if map.len() > target {
            let mut expiries: Vec<Nanos> = (map.fixed.values().map(|s| s.expires_at))
                .chain(map.other.values().map(|s| s.expires_at))
                .collect();
            let cut = map.len() - target;
            let (_, nth, _) = expiries.select_nth_unstable(cut - 1);
            let threshold = *nth;
            let mut to_drop = cut;
            map.retain(|expires_at| {
                if to_drop > 0 && expires_at <= threshold {
                    to_drop -= 1;
                    false
                } else {
                    true
                }
            });
        }
        // Expired states are not counted: only states dropped while still meaningful.
        self.evictions
            .fetch_add((before - map.len()) as u64, Relaxed);
    }

    /// Removes expired states; run periodically so idle keys don't hold memory.
    pub fn sweep(&self, now: Nanos) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = shard.0.lock();
            let before = map.len();
            map.retain(|expires_at| expires_at > now);
            removed += before - map.len();
        }
        removed
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// States dropped before their expiry because the store was full.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Relaxed)
    }

    pub fn capacity(&self) -> usize {
        self.max_per_shard * SHARDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Algorithm, NANOS_PER_SECOND, Unit};
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    const NOW: Nanos = 1_800_000_000 * NANOS_PER_SECOND;

    fn limit(algorithm: Algorithm, rpu: u32) -> Limit {
        Limit {
            algorithm,
            requests_per_unit: rpu,
            unit: Unit::Hour,
            burst: algorithm.default_burst(rpu).max(1),
            block_duration: 0,
        }
    }

    #[test]
    fn many_threads_on_one_key_never_exceed_the_limit() {
        for algorithm in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindowLog,
            Algorithm::SlidingWindowCounter,
            Algorithm::TokenBucket,
            Algorithm::Gcra,
        ] {
            let store = Arc::new(MemoryStore::new(1000));
            let admitted = Arc::new(AtomicU32::new(0));
            let l = limit(algorithm, 1000);
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    let store = store.clone();
                    let admitted = admitted.clone();
                    std::thread::spawn(move || {
                        for _ in 0..1000 {
                            if store.apply(42, &l, NOW, 1, RejectedHits::Free).allowed {
                                admitted.fetch_add(1, Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("thread");
            }
            assert_eq!(admitted.load(Relaxed), 1000, "{algorithm:?}");
        }
    }

    #[test]
    fn batch_refunds_on_rejection_under_concurrency() {
        // Two limits per request; the second is the tighter one. Concurrent requests must
        // never leave the first counter charged for rejected requests.
        let store = Arc::new(MemoryStore::new(1000));
        let wide = limit(Algorithm::FixedWindow, 1_000_000);
        let tight = limit(Algorithm::FixedWindow, 100);
        let admitted = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let admitted = admitted.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let mut ops = [
                            CounterOp::new(1, wide, 1, false),
                            CounterOp::new(2, tight, 1, false),
                        ];
                        store.check_and_update(&mut ops, NOW, RejectedHits::Free);
                        if ops.iter().all(|o| o.outcome.is_some_and(|x| x.allowed)) {
                            admitted.fetch_add(1, Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(admitted.load(Relaxed), 100);
        let wide_left = store.apply(1, &wide, NOW, 0, RejectedHits::Free).remaining;
        assert_eq!(wide_left, 1_000_000 - 100);
    }

    #[test]
    fn memory_is_bounded_under_a_flood_of_distinct_keys() {
        let store = MemoryStore::new(SHARDS * 8);
        let long = limit(Algorithm::FixedWindow, 10);
        // A flood of distinct (spoofed) values cannot grow the store past its capacity.
        for k in 0..100_000u128 {
            let key = xxhash_rust::xxh3::xxh3_128(&k.to_le_bytes());
            store.apply(key, &long, NOW, 1, RejectedHits::Free);
            if k % 10_000 == 0 {
                assert!(store.len() <= store.capacity());
            }
        }
        assert!(store.len() <= store.capacity());
        assert!(store.evictions() > 0);
    }

    #[test]
    fn expired_short_keys_are_dropped_before_live_ones() {
        let store = MemoryStore::new(SHARDS * 8);
        let short = Limit {
            unit: Unit::Second,
            ..limit(Algorithm::FixedWindow, 10)
        };
        let long = limit(Algorithm::FixedWindow, 10);
        // One shard: keys with the same top byte.
        let key = |i: u128| (7u128 << 120) | i;
        for i in 0..4 {
            store.apply(key(i), &long, NOW, 1, RejectedHits::Free);
        }
        for i in 4..8 {
            store.apply(key(i), &short, NOW, 1, RejectedHits::Free);
        }
        let later = NOW + 2 * NANOS_PER_SECOND;
        store.apply(key(100), &long, later, 1, RejectedHits::Free);
        // The long-lived keys kept their counts; nothing live was evicted.
        for i in 0..4 {
            assert_eq!(
                store
                    .apply(key(i), &long, later, 0, RejectedHits::Free)
                    .remaining,
                9
            );
        }
        assert_eq!(store.evictions(), 0);
    }

    #[test]
    fn a_key_decides_like_one_state_whatever_map_holds_it() {
        // One key through random algorithm changes (the rule edited), blocks, looks, refunds
        // and counted rejections: the store answers exactly like a single `CounterState`
        // driven by the limiter, whether the state is held unpacked (fixed window) or whole.
        let algorithms = Algorithm::ALL;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..200 {
            let store = MemoryStore::new(1000);
            let mut model = CounterState::default();
            let key = round as u128;
            let mut now = NOW;
            for step in 0..200 {
                let l = Limit {
                    unit: Unit::Second,
                    block_duration: if next(3) == 0 {
                        2 * NANOS_PER_SECOND
                    } else {
                        0
                    },
                    ..limit(algorithms[next(6) as usize], 1 + next(5) as u32)
                };
                now += next(400_000_000);
                let hits = next(4) as u32;
                let rejected = if next(4) == 0 {
                    RejectedHits::Counted
                } else {
                    RejectedHits::Free
                };
                if next(5) == 0 {
                    store.refund(key, &l, now, hits);
                    l.refund(&mut model, now, hits);
                    continue;
                }
                let got = store.apply(key, &l, now, hits, rejected);
                let want = l.check_and_update(&mut model, now, hits, rejected);
                assert_eq!(got, want, "round {round} step {step}: {l:?}");
                // A state the store no longer holds is equivalent to a fresh one.
                if store.is_empty() {
                    model = CounterState::default();
                }
            }
        }
    }

    #[test]
    fn eviction_takes_the_closest_to_expiry_of_every_algorithm() {
        let store = MemoryStore::new(SHARDS * 8);
        let key = |i: u128| (3u128 << 120) | i;
        let at = |unit| Limit {
            unit,
            ..limit(Algorithm::FixedWindow, 10)
        };
        // One shard, full: fixed windows and token buckets, some long-lived, some short.
        for i in 0..4 {
            store.apply(key(i), &at(Unit::Day), NOW, 1, RejectedHits::Free);
        }
        for i in 4..6 {
            let l = Limit {
                unit: Unit::Day,
                ..limit(Algorithm::TokenBucket, 10)
            };
            store.apply(key(i), &l, NOW, 1, RejectedHits::Free);
        }
        for i in 6..8 {
            let l = Limit {
                unit: Unit::Minute,
                ..limit(Algorithm::TokenBucket, 10)
            };
            store.apply(key(i), &l, NOW, 1, RejectedHits::Free);
        }
        store.apply(key(100), &at(Unit::Day), NOW, 1, RejectedHits::Free);
        // The eighth closest to expiry went: one of the minute-long buckets, nothing else.
        assert_eq!(store.evictions(), 1);
        for i in 0..4 {
            let left = store.apply(key(i), &at(Unit::Day), NOW, 0, RejectedHits::Free);
            assert_eq!(left.remaining, 9);
        }
        assert_eq!(store.len(), 8);
    }

    #[test]
    fn looking_does_not_create_state_and_sweep_frees_expired() {
        let store = MemoryStore::new(100);
        let l = Limit {
            unit: Unit::Second,
            ..limit(Algorithm::FixedWindow, 10)
        };
        store.apply(1, &l, NOW, 0, RejectedHits::Free);
        assert!(store.is_empty());
        store.apply(1, &l, NOW, 1, RejectedHits::Free);
        assert_eq!(store.len(), 1);
        assert_eq!(store.sweep(NOW + 5 * NANOS_PER_SECOND), 1);
        assert!(store.is_empty());
    }
}
