//! `cached` mode: fixed-window counters of very hot keys decided locally and written to
//! Redis in batches.
//!
//! A counter is read from Redis once (the normal atomic path); from then on this replica
//! admits against the remaining count it last saw, and a flusher adds the hits it admitted
//! to Redis every `flush_interval`, learning the fleet-wide remaining count in return.
//!
//! The trade-off (README, "cached mode"): between two flushes each replica spends the last
//! remaining count it saw without seeing the others', so a fleet of N replicas can admit up
//! to (N − 1) × (what one replica admits in one interval) above the limit, and never more
//! than N × the limit in one window. In exchange a hot key costs one Redis command per
//! interval instead of one per request. Only `fixed_window` counters are cached: their
//! counts add up, which the other algorithms' states don't.

use crate::limiter::{Algorithm, Limit, Nanos, Outcome};
use crate::rules::CounterKey;
use parking_lot::Mutex;
use std::collections::HashMap;

const SHARDS: usize = 64;

#[derive(Debug)]
struct Entry {
    limit: Limit,
    window_start: Nanos,
    /// Remaining count of the window as Redis last reported it (after our last flush).
    remote_remaining: u32,
    /// Hits admitted here and not yet written to Redis.
    pending: u32,
    /// Pending hits of this window already on their way to Redis.
    in_flight: u32,
}

/// Hits to write for one counter.
#[derive(Debug, Clone)]
pub struct Flush {
    pub key: CounterKey,
    pub limit: Limit,
    pub hits: u32,
    pub window_start: Nanos,
}

#[derive(Debug)]
pub struct CachedCounters {
    shards: Box<[Mutex<HashMap<CounterKey, Entry>>]>,
    max_per_shard: usize,
}

impl CachedCounters {
    pub fn new(max_keys: usize) -> Self {
        CachedCounters {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    pub fn eligible(limit: &Limit) -> bool {
        limit.algorithm == Algorithm::FixedWindow && limit.block_duration == 0
    }

    fn shard(&self, key: CounterKey) -> &Mutex<HashMap<CounterKey, Entry>> {
        &self.shards[(key >> 120) as usize % SHARDS]
    }

    /// Decides locally when this counter is known; `None` sends it to Redis.
    pub fn try_decide(
        &self,
        key: CounterKey,
        limit: &Limit,
        now: Nanos,
        hits: u32,
    ) -> Option<Outcome> {
        let w = limit.unit.nanos();
        let window_start = now - now % w;
        let mut shard = self.shard(key).lock();
        let e = shard.get_mut(&key)?;
        if e.limit != *limit || e.window_start != window_start {
            // A new window (or a changed rule): learn the count from Redis again.
            if e.pending == 0 && e.in_flight == 0 {
                shard.remove(&key);
            }
            return None;
        }
        let used = e.pending.saturating_add(e.in_flight);
        let left = e.remote_remaining.saturating_sub(used);
        let allowed = hits <= left;
        if allowed {
            e.pending = e.pending.saturating_add(hits);
        }
        Some(Outcome {
            allowed,
            remaining: if allowed { left - hits } else { left },
            reset_after: window_start + w - now,
            expires_at: window_start + w,
        })
    }

    /// Gives back hits `try_decide` admitted (another counter of the request rejected it).
    pub fn undo(&self, key: CounterKey, hits: u32) {
        if let Some(e) = self.shard(key).lock().get_mut(&key) {
            e.pending = e.pending.saturating_sub(hits);
        }
    }

    /// Starts caching a counter Redis just decided.
    pub fn learn(&self, key: CounterKey, limit: &Limit, now: Nanos, outcome: &Outcome) {
        let w = limit.unit.nanos();
        let mut shard = self.shard(key).lock();
        if shard.len() >= self.max_per_shard {
            shard.retain(|_, e| e.pending > 0 || e.in_flight > 0);
            if shard.len() >= self.max_per_shard {
                return;
            }
        }
        shard.entry(key).or_insert(Entry {
            limit: *limit,
            window_start: now - now % w,
            remote_remaining: outcome.remaining,
            pending: 0,
            in_flight: 0,
        });
    }

    /// Takes every counter's pending hits for one flush.
    pub fn take_pending(&self) -> Vec<Flush> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (key, e) in shard.lock().iter_mut() {
                if e.pending > 0 {
                    out.push(Flush {
                        key: *key,
                        limit: e.limit,
                        hits: e.pending,
                        window_start: e.window_start,
                    });
                    e.in_flight = e.in_flight.saturating_add(e.pending);
                    e.pending = 0;
                }
            }
        }
        out
    }

    /// Records Redis's answer to a flush: the fleet-wide remaining count after our hits.
    /// `None` (the write failed) puts the hits back to be sent with the next flush.
    pub fn flushed(&self, f: &Flush, remaining: Option<u32>) {
        let mut shard = self.shard(f.key).lock();
        if let Some(e) = shard.get_mut(&f.key) {
            e.in_flight = e.in_flight.saturating_sub(f.hits);
            match remaining {
                Some(r) if e.window_start == f.window_start => e.remote_remaining = r,
                Some(_) => {}
                None => e.pending = e.pending.saturating_add(f.hits),
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{NANOS_PER_SECOND, Unit};

    const NOW: Nanos = 1_800_000_000 * NANOS_PER_SECOND;

    fn limit() -> Limit {
        Limit {
            algorithm: Algorithm::FixedWindow,
            requests_per_unit: 10,
            unit: Unit::Minute,
            burst: 10,
            block_duration: 0,
        }
    }

    fn seen(remaining: u32) -> Outcome {
        Outcome {
            allowed: true,
            remaining,
            reset_after: 0,
            expires_at: 0,
        }
    }

    #[test]
    fn unknown_counters_go_to_redis_then_decide_locally() {
        let c = CachedCounters::new(100);
        let l = limit();
        assert!(c.try_decide(1, &l, NOW, 1).is_none());
        c.learn(1, &l, NOW, &seen(3));
        let admitted: Vec<bool> = (0..5)
            .map(|_| c.try_decide(1, &l, NOW, 1).expect("cached").allowed)
            .collect();
        assert_eq!(admitted, vec![true, true, true, false, false]);
    }

    #[test]
    fn flush_moves_pending_to_in_flight_and_learns_the_fleet_count() {
        let c = CachedCounters::new(100);
        let l = limit();
        c.learn(1, &l, NOW, &seen(8));
        c.try_decide(1, &l, NOW, 2);
        let flushes = c.take_pending();
        assert_eq!(flushes.len(), 1);
        assert_eq!(flushes[0].hits, 2);
        // While in flight, those hits still count.
        assert_eq!(c.try_decide(1, &l, NOW, 0).expect("cached").remaining, 6);
        // Another replica used 4 meanwhile: Redis says 2 left after our 2.
        c.flushed(&flushes[0], Some(2));
        assert_eq!(c.try_decide(1, &l, NOW, 0).expect("cached").remaining, 2);
        assert!(c.take_pending().is_empty());
    }

    #[test]
    fn failed_flush_keeps_the_hits_and_undo_gives_back() {
        let c = CachedCounters::new(100);
        let l = limit();
        c.learn(1, &l, NOW, &seen(8));
        c.try_decide(1, &l, NOW, 3);
        c.undo(1, 1);
        let f = c.take_pending();
        assert_eq!(f[0].hits, 2);
        c.flushed(&f[0], None);
        assert_eq!(c.take_pending()[0].hits, 2);
    }

    #[test]
    fn a_new_window_is_learned_from_redis_again() {
        let c = CachedCounters::new(100);
        let l = limit();
        c.learn(1, &l, NOW, &seen(0));
        assert!(!c.try_decide(1, &l, NOW, 1).expect("cached").allowed);
        assert!(
            c.try_decide(1, &l, NOW + 60 * NANOS_PER_SECOND, 1)
                .is_none()
        );
    }
}
