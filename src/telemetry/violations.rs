//! Recent over-limit and blocked events, for operators watching (`WatchViolations`, the
//! blocked identities of `WatchStats`).
//!
//! Owns: a bounded ring the hot path pushes into only when it rejects. Recording never waits
//! and costs nothing on the OK path: a rate budget (at most `MAX_PER_SECOND` events a second,
//! checked with two atomics before anything is built) samples a flood, and a ring whose lock
//! is busy drops the event (counted) instead of waiting. Values and identities are truncated
//! to `MAX_VALUE_CHARS` before they are stored.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Events kept; older ones are overwritten.
pub const CAPACITY: usize = 1024;
/// Events recorded per wall-clock second at most; the rest are counted as sampled out.
pub const MAX_PER_SECOND: u64 = 200;
/// Characters of a value or identity kept (the rest becomes `…`).
pub const MAX_VALUE_CHARS: usize = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// ShouldRateLimit answered OVER_LIMIT.
    OverLimit,
    /// ext_authz denied by a limit.
    RateLimited,
    /// ext_authz denied by the block list.
    Blocked,
}

/// One recorded event, already truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub seq: u64,
    pub unix_ms: u64,
    pub kind: ViolationKind,
    pub domain: String,
    pub entries: Vec<(String, String)>,
    pub limit: String,
    pub identity: String,
}

/// What the ring has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViolationCounts {
    pub recorded: u64,
    pub sampled_out: u64,
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Violation>,
    next_seq: u64,
}

/// The ring and its counters; one per process, inside `ServiceMetrics`.
#[derive(Debug)]
pub struct ViolationLog {
    ring: Mutex<Ring>,
    /// The second the budget is counting, and how much of it is used.
    second: AtomicU64,
    used: AtomicU64,
    recorded: AtomicU64,
    sampled_out: AtomicU64,
    dropped: AtomicU64,
}

impl Default for ViolationLog {
    fn default() -> Self {
        ViolationLog {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(CAPACITY),
                next_seq: 1,
            }),
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            sampled_out: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
}

/// `s` cut to `MAX_VALUE_CHARS` characters, with `…` when something was cut.
pub fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_VALUE_CHARS) {
        None => s.to_string(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

impl ViolationLog {
    /// Whether an event at `unix_ms` may be recorded: call before building it. Lock-free.
    pub fn admit(&self, unix_ms: u64) -> bool {
        let second = unix_ms / 1000;
        let current = self.second.load(Relaxed);
        if second > current
            && self
                .second
                .compare_exchange(current, second, Relaxed, Relaxed)
                .is_ok()
        {
            self.used.store(0, Relaxed);
        }
        if self.used.fetch_add(1, Relaxed) < MAX_PER_SECOND {
            true
        } else {
            self.sampled_out.fetch_add(1, Relaxed);
            false
        }
    }

    /// Records an admitted event (its `seq` is assigned here); drops it if the ring is busy.
    pub fn push(&self, mut event: Violation) {
        let Some(mut ring) = self.ring.try_lock() else {
            self.dropped.fetch_add(1, Relaxed);
            return;
        };
        event.seq = ring.next_seq;
        ring.next_seq += 1;
        if ring.events.len() == CAPACITY {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
        self.recorded.fetch_add(1, Relaxed);
    }

    /// Events with `seq >= from`, oldest first (what a watcher has not seen yet).
    pub fn since(&self, from: u64) -> Vec<Violation> {
        let ring = self.ring.lock();
        let skip = ring.events.partition_point(|e| e.seq < from);
        ring.events.iter().skip(skip).cloned().collect()
    }

    /// The `seq` the next event will get.
    pub fn next_seq(&self) -> u64 {
        self.ring.lock().next_seq
    }

    /// The `n` identities with the most events in the ring, most first.
    pub fn top_identities(&self, n: usize) -> Vec<(String, u64)> {
        let mut counts: std::collections::HashMap<String, u64> = Default::default();
        for e in self.ring.lock().events.iter() {
            if !e.identity.is_empty() {
                *counts.entry(e.identity.clone()).or_default() += 1;
            }
        }
        let mut top: Vec<(String, u64)> = counts.into_iter().collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(n);
        top
    }

    pub fn counts(&self) -> ViolationCounts {
        ViolationCounts {
            recorded: self.recorded.load(Relaxed),
            sampled_out: self.sampled_out.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(identity: &str) -> Violation {
        Violation {
            seq: 0,
            unix_ms: 0,
            kind: ViolationKind::Blocked,
            domain: "d".into(),
            entries: Vec::new(),
            limit: String::new(),
            identity: identity.into(),
        }
    }

    #[test]
    fn the_budget_samples_a_flood_and_renews_each_second() {
        let log = ViolationLog::default();
        let admitted = (0..MAX_PER_SECOND + 50)
            .filter(|_| log.admit(5_000))
            .count();
        assert_eq!(admitted as u64, MAX_PER_SECOND);
        assert_eq!(log.counts().sampled_out, 50);
        assert!(log.admit(6_000), "a new second has a new budget");
    }

    #[test]
    fn the_ring_is_bounded_and_numbered() {
        let log = ViolationLog::default();
        for i in 0..CAPACITY + 10 {
            log.push(event(&format!("user:{}", i % 3)));
        }
        let all = log.since(0);
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all[0].seq, 11, "the oldest ten were overwritten");
        assert_eq!(log.since(CAPACITY as u64 + 9).len(), 2);
        assert_eq!(log.next_seq(), CAPACITY as u64 + 11);
        let top = log.top_identities(2);
        assert_eq!(top.len(), 2);
        assert!(top[0].1 >= top[1].1);
    }

    #[test]
    fn a_busy_ring_drops_instead_of_waiting() {
        let log = ViolationLog::default();
        let guard = log.ring.lock();
        log.push(event("x"));
        drop(guard);
        assert_eq!(log.counts().dropped, 1);
        assert!(log.since(0).is_empty());
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("short"), "short");
        let long = "é".repeat(MAX_VALUE_CHARS + 5);
        let t = truncate(&long);
        assert_eq!(t.chars().count(), MAX_VALUE_CHARS + 1);
        assert!(t.ends_with('…'));
    }
}
