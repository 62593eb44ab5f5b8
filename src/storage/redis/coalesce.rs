//! Coalescing: the requests in flight to one Redis node at the same moment go out as one
//! script call (group commit, no timer).
//!
//! Each node allows `IN_FLIGHT` calls on the wire at once. A request that finds a free slot
//! and nobody waiting goes out alone at once, from its own task (the single-request script,
//! no extra hop: at low load nothing changes). Otherwise it queues; whoever frees a slot
//! takes everything queued (up to `MAX_BATCH` requests) as one `main_batch` call, from a
//! spawned sender that keeps the slot while the queue is not empty. So a batch is whatever
//! queued while the node's previous calls were on the wire.
//!
//! Nobody is left waiting: a waiter gives up at the store's deadline; a sender that is
//! dropped (runtime shutdown) or panics answers every queued request with an error, which
//! the store answers by the failure mode.
//!
//! Owns: the per-node queue, batch forming, handing each request its answer.
//! Must not touch: the wire (wire), the script's encoding (script), failure modes (the store).

use super::shards::Node;
use super::wire::{Request, Wire};
use crate::limiter::Outcome;
use crate::storage::StorageError;
use parking_lot::Mutex;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Calls on the wire per node at once (one being answered while the next one is sent).
pub const IN_FLIGHT: usize = 2;
/// Requests per batch call at most: bounds the call's size and Redis's time in one script.
pub const MAX_BATCH: usize = 128;

type Answer = Result<Vec<Outcome>, StorageError>;

const ABANDONED: StorageError =
    StorageError::Unavailable(Cow::Borrowed("Redis batch sender stopped before answering"));

#[derive(Debug)]
struct Waiting {
    request: Request,
    answer: oneshot::Sender<Answer>,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Waiting>,
    in_flight: usize,
}

/// One node's queue of requests waiting for a call.
#[derive(Debug, Default)]
pub struct Queue {
    state: Mutex<State>,
}

enum Entered {
    /// A free slot and nobody waiting: the request goes alone, holding the slot.
    Alone(Request),
    /// Queued; `start`: a slot was free, start a sender holding it.
    Queued {
        rx: oneshot::Receiver<Answer>,
        start: bool,
    },
}

impl Queue {
    fn enter(&self, request: Request) -> Entered {
        let mut s = self.state.lock();
        if s.in_flight < IN_FLIGHT && s.queue.is_empty() {
            s.in_flight += 1;
            return Entered::Alone(request);
        }
        let (tx, rx) = oneshot::channel();
        s.queue.push_back(Waiting {
            request,
            answer: tx,
        });
        let start = s.in_flight < IN_FLIGHT;
        if start {
            s.in_flight += 1;
        }
        Entered::Queued { rx, start }
    }

    /// Takes the next batch (requests whose waiter gave up are dropped); releases the slot
    /// and returns None when nothing waits.
    fn next_batch(&self) -> Option<Vec<Waiting>> {
        let mut s = self.state.lock();
        s.queue.retain(|w| !w.answer.is_closed());
        if s.queue.is_empty() {
            s.in_flight -= 1;
            return None;
        }
        let n = s.queue.len().min(MAX_BATCH);
        Some(s.queue.drain(..n).collect())
    }

    /// Releases a slot held by a request that went alone; true when requests queued
    /// meanwhile and the slot is kept for a sender to take them.
    fn release(&self) -> bool {
        let mut s = self.state.lock();
        if s.queue.is_empty() {
            s.in_flight -= 1;
            false
        } else {
            true
        }
    }

    /// Gives up a slot and fails everything queued (a sender that cannot go on).
    fn abandon(&self) {
        let mut s = self.state.lock();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            for w in s.queue.drain(..) {
                let _ = w.answer.send(Err(ABANDONED));
            }
        }
    }
}

/// Decides `request` on `node`: alone at once when the node is idle enough, else in the next
/// batch. The caller bounds the wait (its deadline).
pub async fn submit(wire: &Arc<Wire>, node: &Arc<Node>, request: Request) -> Answer {
    let rx = match node.queue.enter(request) {
        Entered::Alone(request) => {
            let _slot = Slot {
                wire: wire.clone(),
                node: node.clone(),
            };
            // Boxed: the client's call future is large, and inline it would size every
            // waiter's future too (most requests under load wait in a batch).
            return Box::pin(wire.call(node, &request.ops, request.rejected, request.now)).await;
        }
        Entered::Queued { rx, start } => {
            if start {
                spawn_sender(wire.clone(), node.clone());
            }
            rx
        }
    };
    // Queued behind calls on the wire: the deadline covers the wait and the batch's call.
    match tokio::time::timeout(wire.timeout, rx).await {
        Ok(answer) => answer.unwrap_or(Err(ABANDONED)),
        Err(_) => Err(StorageError::Timeout(wire.timeout)),
    }
}

/// The slot of a request that went alone: on release (also when its caller is dropped
/// mid-call), hands the slot to a sender if requests queued meanwhile.
struct Slot {
    wire: Arc<Wire>,
    node: Arc<Node>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.node.queue.release() {
            spawn_sender(self.wire.clone(), self.node.clone());
        }
    }
}

fn spawn_sender(wire: Arc<Wire>, node: Arc<Node>) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn(send_batches(wire, node));
        }
        Err(_) => node.queue.abandon(),
    }
}

/// Holds a sender's slot; a sender dropped or panicking before it finished fails what
/// waits rather than leave it waiting.
struct Sender {
    node: Arc<Node>,
    done: bool,
}

impl Drop for Sender {
    fn drop(&mut self) {
        if !self.done {
            self.node.queue.abandon();
        }
    }
}

/// Sends batches to `node` until its queue is empty, then releases the slot.
async fn send_batches(wire: Arc<Wire>, node: Arc<Node>) {
    let mut guard = Sender {
        node: node.clone(),
        done: false,
    };
    while let Some(batch) = node.queue.next_batch() {
        let (requests, answers): (Vec<Request>, Vec<oneshot::Sender<Answer>>) =
            batch.into_iter().map(|w| (w.request, w.answer)).unzip();
        if let [one] = requests.as_slice() {
            let r = wire.call(&node, &one.ops, one.rejected, one.now).await;
            if let Some(a) = answers.into_iter().next() {
                let _ = a.send(r);
            }
            continue;
        }
        match wire.call_batch(&node, &requests).await {
            Ok(results) => {
                let mut results = results.into_iter();
                for a in answers {
                    let _ = a.send(results.next().unwrap_or(Err(ABANDONED)));
                }
            }
            Err(e) => {
                for a in answers {
                    let _ = a.send(Err(clone_error(&e)));
                }
            }
        }
    }
    guard.done = true;
}

fn clone_error(e: &StorageError) -> StorageError {
    match e {
        StorageError::Unavailable(c) => StorageError::Unavailable(c.clone()),
        StorageError::Timeout(d) => StorageError::Timeout(*d),
        StorageError::Config(s) => StorageError::Config(s.clone()),
    }
}
