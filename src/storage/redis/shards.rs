//! Redis Cluster routing of the script calls: one standalone connection pool per master,
//! each with its own circuit, and a slot table swapped atomically.
//!
//! Why not fred's cluster client for this: when one master's connection drops, its router
//! task reconnects to *every* node in a loop (CLUSTER SLOTS still names the dead master
//! until the failover, so the reconnect fails and backs off) and processes no command
//! meanwhile — every slot stalls until the replica is promoted. Here a dead master stalls
//! only the calls for its own slots (answered at once by the failure mode once its circuit
//! is open); the store's health task re-reads CLUSTER SLOTS from a live node and routes the
//! dead master's slots to the promoted replica.

use super::circuit::Circuit;
use arc_swap::ArcSwap;
use fred::clients::Pool;
use fred::types::cluster::ClusterRouting;
use fred::types::config::Server;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

const SLOTS: usize = 16384;

/// One node's connections and whether they are known down.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub pool: Pool,
    pub circuit: Circuit,
    /// Wakes the calls in flight when the circuit opens: a command queued while fred
    /// reconnects would otherwise wait for the whole timeout.
    pub opened: tokio::sync::Notify,
    /// Requests waiting to go out together (see `coalesce`).
    pub queue: super::coalesce::Queue,
}

impl Node {
    /// Also listens to the pool's connection errors: a closed or reset connection opens the
    /// circuit at once, before any call has to find out.
    pub fn new(name: String, pool: Pool) -> Arc<Node> {
        use fred::interfaces::EventInterface;
        let node = Arc::new(Node {
            name,
            pool,
            circuit: Circuit::default(),
            opened: tokio::sync::Notify::new(),
            queue: Default::default(),
        });
        for client in node.pool.clients() {
            let mut errors = client.error_rx();
            let weak = Arc::downgrade(&node);
            tokio::spawn(async move {
                while let Ok((e, _)) = errors.recv().await {
                    let Some(node) = weak.upgrade() else { return };
                    if matches!(
                        e.kind(),
                        fred::error::ErrorKind::IO | fred::error::ErrorKind::Canceled
                    ) {
                        node.trip(true);
                    }
                }
            });
        }
        node
    }

    /// Records a failure; true when it opened the circuit (calls in flight are woken).
    pub fn trip(&self, down: bool) -> bool {
        let opened = self.circuit.failure(down);
        if opened {
            self.opened.notify_waiters();
        }
        opened
    }
}

#[derive(Debug, Default)]
struct SlotMap {
    /// Index into `nodes` per slot; empty until the first CLUSTER SLOTS.
    owner: Vec<u16>,
    nodes: Vec<Arc<Node>>,
}

#[derive(Debug, Default)]
pub struct Shards {
    map: ArcSwap<SlotMap>,
    /// Every node ever routed to, by `host:port`: a master that comes back (as a replica,
    /// or master again) reuses its pool, which kept reconnecting in the background.
    known: Mutex<HashMap<String, Arc<Node>>>,
    /// Asks the health task for a new slot table (a MOVED, a node known down).
    pub stale: tokio::sync::Notify,
}

fn name(s: &Server) -> String {
    format!("{}:{}", s.host, s.port)
}

impl Shards {
    /// The master owning `slot`, if known.
    pub fn node(&self, slot: u16) -> Option<Arc<Node>> {
        let map = self.map.load();
        let i = *map.owner.get(usize::from(slot))?;
        map.nodes.get(usize::from(i)).cloned()
    }

    /// The masters routed to.
    pub fn masters(&self) -> Vec<Arc<Node>> {
        self.map.load().nodes.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.map.load().nodes.is_empty()
    }

    /// Routes by `routing` (a CLUSTER SLOTS answer); `make` builds the pool of a master not
    /// seen before. Returns the masters that were not routed to before (their scripts need
    /// loading).
    pub fn install<E>(
        &self,
        routing: &ClusterRouting,
        make: impl Fn(&Server) -> Result<Pool, E>,
    ) -> Result<Vec<Arc<Node>>, E> {
        let old: Vec<String> = self.masters().iter().map(|n| n.name.clone()).collect();
        let mut known = self.known.lock();
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        let mut owner = vec![u16::MAX; SLOTS];
        for range in routing.slots() {
            let key = name(&range.primary);
            let i = match nodes.iter().position(|n| n.name == key) {
                Some(i) => i,
                None => {
                    let node = match known.get(&key) {
                        Some(n) => n.clone(),
                        None => {
                            let n = Node::new(key.clone(), make(&range.primary)?);
                            known.insert(key.clone(), n.clone());
                            n
                        }
                    };
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            let i = u16::try_from(i).unwrap_or(u16::MAX);
            let end = usize::from(range.end).min(SLOTS - 1);
            if let Some(slots) = owner.get_mut(usize::from(range.start)..=end) {
                slots.fill(i);
            }
        }
        let added = nodes
            .iter()
            .filter(|n| !old.contains(&n.name))
            .cloned()
            .collect();
        self.map.store(Arc::new(SlotMap { owner, nodes }));
        Ok(added)
    }
}
