//! Counters known to be over their limit, answered locally until their reset.
//!
//! Like envoyproxy/ratelimit's local cache: once Redis says a counter rejects, every request
//! on it until `reset_after` would be rejected too, so asking Redis again only costs a round
//! trip. Sharded and bounded like the memory store.

use crate::limiter::Nanos;
use crate::rules::CounterKey;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SHARDS: usize = 64;

#[derive(Debug)]
pub struct OverLimitCache {
    shards: Box<[Mutex<HashMap<CounterKey, Nanos>>]>,
    max_per_shard: usize,
    hits: AtomicU64,
}

impl OverLimitCache {
    pub fn new(max_keys: usize) -> Self {
        OverLimitCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
            hits: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: CounterKey) -> &Mutex<HashMap<CounterKey, Nanos>> {
        &self.shards[(key >> 120) as usize % SHARDS]
    }

    /// The instant until which `key` is known to reject, if it is.
    pub fn over_until(&self, key: CounterKey, now: Nanos) -> Option<Nanos> {
        let mut shard = self.shard(key).lock();
        match shard.get(&key) {
            Some(&until) if until > now => {
                self.hits.fetch_add(1, Relaxed);
                Some(until)
            }
            Some(_) => {
                shard.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, key: CounterKey, until: Nanos, now: Nanos) {
        let mut shard = self.shard(key).lock();
        if shard.len() >= self.max_per_shard {
            shard.retain(|_, u| *u > now);
            if shard.len() >= self.max_per_shard {
                // Still full of live entries: forgetting one only costs a Redis round trip.
                shard.clear();
            }
        }
        shard.insert(key, until);
    }

    /// Requests answered from the cache (`over_limit_with_local_cache` in the reference).
    pub fn hits(&self) -> u64 {
        self.hits.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_at_their_reset() {
        let c = OverLimitCache::new(100);
        c.insert(1, 1_000, 0);
        assert_eq!(c.over_until(1, 999), Some(1_000));
        assert_eq!(c.over_until(1, 1_000), None);
        assert_eq!(c.over_until(2, 0), None);
        assert_eq!(c.hits(), 1);
    }

    #[test]
    fn bounded() {
        let c = OverLimitCache::new(SHARDS);
        for k in 0..10_000u128 {
            c.insert(k << 120 | k, u64::MAX, 0);
        }
        let total: usize = c.shards.iter().map(|s| s.lock().len()).sum();
        assert!(total <= SHARDS * 2, "{total}");
    }
}
