//! The bounded queue between the hot path and the detector task: a fixed ring allocated once
//! (`crossbeam_queue::ArrayQueue`), so pushing an [`Event`] never locks, never allocates and
//! never waits. A full queue drops the event and counts it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crossbeam_queue::ArrayQueue;

use super::event::Event;

struct Shared {
    ring: ArrayQueue<Event>,
    dropped: AtomicU64,
}

/// The producer side, cloned into every service that sees requests. Cheap to clone (one
/// `Arc`).
#[derive(Clone)]
pub struct Sink(Arc<Shared>);

/// The consumer side, owned by the detector task.
pub struct Drain(Arc<Shared>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("capacity", &self.0.ring.capacity())
            .field("len", &self.0.ring.len())
            .finish()
    }
}

/// A queue holding at most `capacity` events (at least 1).
pub fn queue(capacity: usize) -> (Sink, Drain) {
    let shared = Arc::new(Shared {
        ring: ArrayQueue::new(capacity.max(1)),
        dropped: AtomicU64::new(0),
    });
    (Sink(shared.clone()), Drain(shared))
}

impl Sink {
    /// Offers one event; when the queue is full it is dropped and counted. Lock-free, no
    /// allocation, never waits.
    #[inline]
    pub fn push(&self, ev: Event) {
        if self.0.ring.push(ev).is_err() {
            self.0.dropped.fetch_add(1, Relaxed);
        }
    }
}

impl Drain {
    /// Takes up to `max` events, oldest first, handing each to `f`; returns how many.
    pub fn drain(&self, max: usize, mut f: impl FnMut(Event)) -> usize {
        let mut n = 0;
        while n < max {
            match self.0.ring.pop() {
                Some(ev) => {
                    f(ev);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Events waiting now.
    pub fn len(&self) -> usize {
        self.0.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.ring.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.0.ring.capacity()
    }

    /// Events dropped because the queue was full, since it was made.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anomaly::Label;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (sink, drain) = queue(2);
        let ev = Event::request(1, [10, 0, 0, 1].into(), Label::EMPTY, Label::new("/"));
        for _ in 0..5 {
            sink.push(ev);
        }
        assert_eq!(drain.len(), 2);
        assert_eq!(drain.dropped(), 3);
        let mut seen = 0;
        assert_eq!(drain.drain(10, |_| seen += 1), 2);
        assert_eq!(seen, 2);
        assert!(drain.is_empty());
        sink.push(ev);
        assert_eq!(drain.len(), 1);
    }
}
