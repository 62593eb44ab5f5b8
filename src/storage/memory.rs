//! The in-memory store: sharded maps of counter states.
//!
//! Exact under concurrency because each decision runs under its shard's lock (there is no
//! global lock: 256 shards, picked by the key's digest). Bounded: at most `max_keys` states;
//! when a shard is full, expired states go first, then those closest to expiry.

use super::CounterOp;
use crate::limiter::{CounterState, Limit, Nanos, Outcome, RejectedHits};
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

type Map = HashMap<CounterKey, Slot, BuildHasherDefault<DigestHasher>>;

/// Cache-line aligned so two cores locking neighbouring shards don't share a line.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Shard(Mutex<Map>);

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
    fn shard(&self, key: CounterKey) -> &Mutex<Map> {
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
        let mut map = self.shard(key).lock();
        if let Some(slot) = map.get_mut(&key) {
            let outcome = limit.check_and_update(&mut slot.state, now, hits, rejected);
            slot.expires_at = outcome.expires_at;
            return outcome;
        }
        let mut state = CounterState::default();
        let outcome = limit.check_and_update(&mut state, now, hits, rejected);
        // Looking (hits 0) or a state that is already fresh again needs no slot.
        if state != CounterState::default() && outcome.expires_at > now {
            if map.len() >= self.max_per_shard {
                self.evict(&mut map, now);
            }
            map.insert(
                key,
                Slot {
                    state,
                    expires_at: outcome.expires_at,
                },
            );
        }
        outcome
    }

    /// Undoes admitted hits (see `Limit::refund`).
    pub fn refund(&self, key: CounterKey, limit: &Limit, now: Nanos, hits: u32) {
        let mut map = self.shard(key).lock();
        if let Some(slot) = map.get_mut(&key) {
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
    fn evict(&self, map: &mut Map, now: Nanos) {
        map.retain(|_, s| s.expires_at > now);
        let before = map.len();
        let target = self.max_per_shard - self.max_per_shard / 8;
        if map.len() > target {
            let mut expiries: Vec<Nanos> = map.values().map(|s| s.expires_at).collect();
            let cut = map.len() - target;
            let (_, nth, _) = expiries.select_nth_unstable(cut - 1);
            let threshold = *nth;
            let mut to_drop = cut;
            map.retain(|_, s| {
                if to_drop > 0 && s.expires_at <= threshold {
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
            map.retain(|_, s| s.expires_at > now);
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
