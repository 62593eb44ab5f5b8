//! The Redis store: standalone, Sentinel and Cluster through fred.
//!
//! Owns: connecting and reconnecting, grouping a request's counters into one atomic script
//! call per hash slot (all sent at once, pipelined on shared connections), the deadline of
//! every call and what happens when it is missed (`failure_mode`), the local over-limit cache,
//! and the health that `/readyz` and the metrics report, and the trace spans of its calls
//! (children of the request span being exported, if any; see `traced`).
//!
//! Must not touch: the algorithms' arithmetic (the script mirrors `limiter`), matching, gRPC.

mod cached;
mod circuit;
mod coalesce;
mod local_cache;
pub mod script;
mod shards;
mod url;
mod wire;

pub use cached::CachedCounters;
pub use circuit::Circuit;
pub use local_cache::OverLimitCache;
pub use url::{RedisUrl, Topology, UrlError, redact, with_password};
pub use wire::Request as BatchRequest;

use super::{CounterOp, MemoryStore, StorageError};
use crate::config::{FailureMode, RedisSettings};
use crate::limiter::{Clock, Nanos, Outcome, RejectedHits};
use fred::clients::Pool;
use fred::error::ErrorKind;
use fred::interfaces::{ClientLike, ClusterInterface};
use fred::types::config::Options;
use fred::types::config::{Config, ReconnectPolicy, ServerConfig, TlsConnector};
use parking_lot::Mutex;
use script::ScriptOp;
use shards::{Node, Shards};
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use wire::Wire;

fn is_missing_code(e: &fred::error::Error) -> bool {
    let d = e.details();
    d.starts_with("NOSCRIPT") || d.contains("Function not found")
}

fn is_unknown_command(e: &fred::error::Error) -> bool {
    let d = e.details().to_ascii_lowercase();
    d.contains("unknown command") || d.contains("unknown subcommand")
}

/// A cluster answer that means our slot table is out of date.
fn is_redirect(e: &fred::error::Error) -> bool {
    script::is_redirect_text(e.details())
}

/// A fred error as a storage error, and whether it says the connection is gone (refused,
/// reset, closed, not connected, refused credentials): then the circuit opens at once.
fn classify(e: &fred::error::Error, timeout: Duration) -> (StorageError, bool) {
    match e.kind() {
        ErrorKind::Timeout => (StorageError::Timeout(timeout), false),
        ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Routing | ErrorKind::Auth => {
            (StorageError::Unavailable(Cow::Owned(e.to_string())), true)
        }
        _ => (StorageError::Unavailable(Cow::Owned(e.to_string())), false),
    }
}

/// What a call gets while its connection is known down: no allocation, no await.
const KNOWN_DOWN: StorageError = StorageError::Unavailable(Cow::Borrowed(
    "Redis connection known down (probing in the background)",
));

/// Storage health as `/readyz` and `/metrics` show it.
#[derive(Debug, Default)]
pub struct StorageHealth {
    degraded: AtomicBool,
    /// Calls that failed or missed their deadline.
    pub errors: AtomicU64,
    /// Requests answered by the failure mode.
    pub fallbacks: AtomicU64,
    /// Script calls sent (divide by requests for commands per request).
    pub commands: AtomicU64,
    /// Calls that decided several coalesced requests (see `coalesce`).
    pub batches: AtomicU64,
    /// Requests decided in those calls (divide by `batches` for the mean batch size).
    pub batched: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl StorageHealth {
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// A failed call. The reason is kept (and logged) when health turns degraded; later
    /// failures only count, so an outage costs no lock or allocation per request.
    fn failed(&self, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Relaxed);
        if !self.degraded.load(Relaxed) && !self.degraded.swap(true, Relaxed) {
            tracing::warn!("Redis degraded: {e}");
            *self.last_error.lock() = Some(e.to_string());
        }
    }

    fn ok(&self) {
        if self.degraded.load(Relaxed) && self.degraded.swap(false, Relaxed) {
            tracing::info!("Redis recovered");
        }
    }
}

#[derive(Debug)]
pub struct RedisStore {
    /// fred's client of the URL: standalone and Sentinel calls, the lists, and the first
    /// cluster topology.
    pool: Pool,
    /// Standalone and Sentinel: the one node (the pool above) and its circuit.
    single: Arc<Node>,
    /// Cluster: a pool per master, routed by slot.
    shards: Option<Arc<Shards>>,
    /// The client configuration a cluster master's pool is built from.
    config: Config,
    /// Script calls, shared with the per-node batch senders; holds the health.
    wire: Arc<Wire>,
    settings: RedisSettings,
    fallback: MemoryStore,
    cache: Option<OverLimitCache>,
    cached: Option<CachedCounters>,
    url: String,
}

fn build_pool(config: Config, settings: &RedisSettings) -> Result<Pool, fred::error::Error> {
    let timeout = Duration::from_nanos(settings.timeout);
    fred::types::Builder::from_config(config)
        .with_performance_config(|p| {
            // Commands never outlive the call that waits for them.
            p.default_command_timeout = timeout;
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
            c.max_redirections = 5;
        })
        // Forever, 50 ms doubling to 1 s: back off, but come back soon after Redis does.
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 1_000, 2))
        .build_pool(settings.pool_size)
}

impl RedisStore {
    /// Connects in the background: a Redis that is down at start-up does not stop the
    /// sidecar; requests follow the failure mode until it is reachable.
    pub async fn connect(
        url: &str,
        settings: &RedisSettings,
        max_keys: usize,
    ) -> Result<RedisStore, StorageError> {
        let parsed = RedisUrl::parse(url).map_err(|e| StorageError::Config(e.to_string()))?;
        let mut config = parsed.fred_config();
        if parsed.tls {
            let connector = TlsConnector::default_rustls()
                .map_err(|e| StorageError::Config(format!("TLS: {e}")))?;
            config.tls = Some(connector.into());
        }
        let timeout = Duration::from_nanos(settings.timeout);
        let pool = build_pool(config.clone(), settings)
            .map_err(|e| StorageError::Config(e.to_string()))?;
        pool.connect();
        let shards = parsed.is_cluster().then(|| Arc::new(Shards::default()));
        let wire = Wire {
            script: fred::types::scripts::Script::from_lua(script::SOURCE),
            library: script::Library::new(),
            functions: AtomicBool::new(true),
            timeout,
            failure_mode: settings.failure_mode,
            health: StorageHealth::default(),
            client_clock: AtomicBool::new(false),
            fail_fast: Options {
                fail_fast: true,
                ..Default::default()
            },
            shards: shards.clone(),
        };
        let store = RedisStore {
            single: Node::new(redact(url), pool.clone()),
            pool,
            shards,
            config,
            wire: Arc::new(wire),
            settings: settings.clone(),
            fallback: MemoryStore::new(max_keys),
            cache: settings.local_cache.then(|| OverLimitCache::new(max_keys)),
            cached: settings
                .cached_flush_interval
                .map(|_| CachedCounters::new(max_keys)),
            url: redact(url),
        };
        match tokio::time::timeout(Duration::from_secs(3), store.pool.wait_for_connect()).await {
            Ok(Ok(())) => {
                if let Err(e) = store.route_cluster().await {
                    store.wire.health.failed(&e);
                }
                for node in store.nodes() {
                    if let Err(e) = store.load_script(&node).await {
                        store.wire.health.failed(&e);
                        node.circuit.open();
                    }
                }
            }
            Ok(Err(e)) => store.wire.health.failed(&e),
            Err(_) => store.wire.health.failed(&"not reachable at start-up"),
        }
        if store.wire.health.is_degraded() {
            store.single.circuit.open();
            tracing::warn!(
                url = %store.url,
                failure_mode = store.settings.failure_mode.as_str(),
                "Redis not reachable yet; answering with the failure mode while reconnecting"
            );
        }
        Ok(store)
    }

    /// Cluster: reads CLUSTER SLOTS from a master whose connection is up (else from fred's
    /// client of the URL) and routes by it. Standalone and Sentinel: nothing to do.
    async fn route_cluster(&self) -> Result<(), StorageError> {
        let Some(shards) = &self.shards else {
            return Ok(());
        };
        let mut answer = None;
        for node in shards.masters() {
            if node.circuit.is_open() {
                continue;
            }
            let slots = tokio::time::timeout(
                Duration::from_millis(500),
                node.pool
                    .next()
                    .with_options(&self.wire.fail_fast)
                    .cluster_slots::<fred::types::Value>(),
            )
            .await;
            if let Ok(Ok(v)) = slots {
                answer = Some((v, node.name.clone()));
                break;
            }
        }
        let routing = match answer {
            Some((v, from)) => {
                let host = from.rsplit_once(':').map_or(from.as_str(), |(h, _)| h);
                fred::types::cluster::ClusterRouting::from_cluster_slots(v, host)
                    .map_err(|e| StorageError::Unavailable(Cow::Owned(e.to_string())))?
            }
            None => self
                .pool
                .next()
                .cached_cluster_state()
                .ok_or(StorageError::Unavailable(Cow::Borrowed(
                    "no cluster node answers CLUSTER SLOTS",
                )))?,
        };
        let tls = self.config.tls.is_some();
        let added = shards
            .install(&routing, |server| {
                let mut config = self.config.clone();
                let mut server = server.clone();
                if tls && server.tls_server_name.is_none() {
                    server.tls_server_name = Some(server.host.clone());
                }
                config.server = ServerConfig::Centralized { server };
                let pool = build_pool(config, &self.settings)?;
                pool.connect();
                Ok::<_, fred::error::Error>(pool)
            })
            .map_err(|e| StorageError::Config(e.to_string()))?;
        for node in added {
            tracing::info!(node = %node.name, "Redis Cluster: routing slots to master");
            let _ =
                tokio::time::timeout(Duration::from_secs(1), node.pool.wait_for_connect()).await;
            if let Err(e) = self.load_script(&node).await {
                tracing::warn!(node = %node.name, "Redis Cluster: master not ready: {e}");
                node.circuit.open();
            }
        }
        Ok(())
    }

    /// The nodes calls go to: the one node, or the cluster's masters.
    fn nodes(&self) -> Vec<Arc<Node>> {
        match &self.shards {
            Some(s) => s.masters(),
            None => vec![self.single.clone()],
        }
    }

    /// Whether some node's connection is known down.
    fn any_open(&self) -> bool {
        match &self.shards {
            Some(s) => s.is_empty() || s.masters().iter().any(|n| n.circuit.is_open()),
            None => self.single.circuit.is_open(),
        }
    }

    /// Decide with the caller's clock rather than Redis's. Production keeps Redis's clock
    /// (replicas with skewed clocks then agree); the shared behavioural tests use this to
    /// drive every store with one injected clock.
    pub fn with_client_clock(self) -> Self {
        self.wire.client_clock.store(true, Relaxed);
        self
    }

    pub fn health(&self) -> &StorageHealth {
        &self.wire.health
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    /// The in-memory limiter of `failure_mode: local`.
    pub fn fallback(&self) -> &MemoryStore {
        &self.fallback
    }

    pub fn cache(&self) -> Option<&OverLimitCache> {
        self.cache.as_ref()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection pool, shared with the runtime allow/block lists.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn load_script(&self, node: &Node) -> Result<(), StorageError> {
        self.wire.load_script(node).await
    }

    fn node_failed(&self, node: &Node, e: StorageError, down: bool) -> StorageError {
        self.wire.node_failed(node, e, down)
    }

    /// The failure mode of this store.
    pub fn failure_mode(&self) -> FailureMode {
        self.settings.failure_mode
    }

    /// Decides every op of one request (see `Storage::check_and_update`). A Redis failure,
    /// a missed deadline or a connection known down is an error, with the ops Redis should
    /// have decided left without an outcome: `answer_failure` fills them by the failure mode.
    ///
    /// Phases: the over-limit cache, cached counters, the script call (coalesced with the
    /// other requests in flight to the same node), then learning from its answer or undoing
    /// what was decided locally.
    pub async fn check_and_update(
        &self,
        ops: &mut [CounterOp],
        now: Nanos,
        rejected: RejectedHits,
    ) -> Result<(), StorageError> {
        let free = rejected == RejectedHits::Free;
        // A request with a counter known to reject is rejected; with free rejections it
        // consumes nothing, so its other counters are only looked at.
        let mut looks_only = free && self.known_over_limit(ops, now);
        let local_admitted = if free && !looks_only {
            self.decide_cached(ops, now, &mut looks_only)
        } else {
            Vec::new()
        };
        let pending: Vec<usize> = (0..ops.len())
            .filter(|&i| ops[i].outcome.is_none())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let script_ops = self.script_ops(ops, &pending, looks_only);
        match self.decide(script_ops, rejected, now).await {
            Ok(outcomes) => {
                for (&i, o) in pending.iter().zip(outcomes) {
                    ops[i].outcome = Some(o);
                }
                self.learn(ops, &pending, &local_admitted, free, now);
                Ok(())
            }
            Err(e) => {
                self.undo_local(ops, &local_admitted, now);
                for &i in &pending {
                    ops[i].outcome = None;
                }
                self.wire.health.failed(&e);
                Err(e)
            }
        }
    }

    /// Phase 1, the local over-limit cache: answers the counters known to be full until
    /// their reset; true when one of them rejects the request.
    fn known_over_limit(&self, ops: &mut [CounterOp], now: Nanos) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        let mut rejected = false;
        for op in ops.iter_mut() {
            if op.shadow || op.negative || op.hits == 0 {
                continue;
            }
            if let Some(until) = cache.over_until(op.key, now) {
                op.outcome = Some(Outcome {
                    allowed: false,
                    remaining: 0,
                    reset_after: until - now,
                    expires_at: until,
                });
                rejected = true;
            }
        }
        rejected
    }

    /// Phase 2, cached mode: decides the counters already known here. Returns the ops it
    /// admitted (given back if Redis rejects the request); sets `looks_only` when one of
    /// them rejects the request (then nothing it admitted stays).
    fn decide_cached(
        &self,
        ops: &mut [CounterOp],
        now: Nanos,
        looks_only: &mut bool,
    ) -> Vec<usize> {
        let mut admitted: Vec<usize> = Vec::new();
        let Some(cached) = &self.cached else {
            return admitted;
        };
        for (i, op) in ops.iter_mut().enumerate() {
            if op.negative || op.outcome.is_some() || !CachedCounters::eligible(&op.limit) {
                continue;
            }
            if let Some(o) = cached.try_decide(op.key, &op.limit, now, op.hits) {
                if o.allowed {
                    admitted.push(i);
                } else if !op.shadow {
                    *looks_only = true;
                }
                op.outcome = Some(o);
            }
        }
        if *looks_only {
            self.undo_local(ops, &admitted, now);
            admitted.clear();
        }
        admitted
    }

    /// Phase 3's input: the ops still open, as script ops (hits 0 when only looked at).
    fn script_ops(&self, ops: &[CounterOp], pending: &[usize], looks_only: bool) -> Vec<ScriptOp> {
        pending
            .iter()
            .map(|&i| {
                let op = &ops[i];
                ScriptOp {
                    key: script::redis_key(&self.settings.prefix, op.key),
                    limit: op.limit,
                    hits: if looks_only && !op.negative {
                        0
                    } else {
                        op.hits
                    },
                    shadow: op.shadow,
                    negative: op.negative,
                }
            })
            .collect()
    }

    /// Phase 4, after Redis answered: health, giving back what cached mode admitted for a
    /// request Redis rejected, and teaching the cached counters and the over-limit cache.
    fn learn(
        &self,
        ops: &mut [CounterOp],
        pending: &[usize],
        local_admitted: &[usize],
        free: bool,
        now: Nanos,
    ) {
        if self.wire.health.is_degraded() && !self.any_open() {
            self.wire.health.ok();
        }
        let request_rejected = free
            && ops
                .iter()
                .any(|op| !op.shadow && !op.negative && op.outcome.is_some_and(|o| !o.allowed));
        if request_rejected {
            self.undo_local(ops, local_admitted, now);
        }
        if let Some(cached) = &self.cached
            && free
        {
            for &i in pending {
                let op = &ops[i];
                if let Some(o) = &op.outcome
                    && !op.negative
                    && CachedCounters::eligible(&op.limit)
                {
                    cached.learn(op.key, &op.limit, now, o);
                }
            }
        }
        if let Some(cache) = &self.cache {
            for op in ops.iter() {
                if let Some(o) = op.outcome
                    && !o.allowed
                    // A heavy request rejected with room left says nothing about
                    // the next one-hit request: cache only counters that are full.
                    && o.remaining == 0
                    && !op.shadow
                    && !op.negative
                    && op.hits > 0
                    && o.reset_after > 0
                {
                    cache.insert(op.key, now.saturating_add(o.reset_after), now);
                }
            }
        }
    }

    /// Gives back hits cached mode admitted for a request that was rejected after all, and
    /// reports those counters as a look.
    fn undo_local(&self, ops: &mut [CounterOp], admitted: &[usize], now: Nanos) {
        let Some(cached) = &self.cached else { return };
        for &i in admitted {
            let op = &mut ops[i];
            cached.undo(op.key, op.hits);
            op.outcome = cached.try_decide(op.key, &op.limit, now, 0).or(op.outcome);
        }
    }

    /// Writes cached mode's pending hits every `cached_flush_interval`, until dropped; the
    /// hits are stamped with `clock` (the server's, the one they were admitted on).
    pub async fn run_flusher(&self, clock: &dyn Clock) {
        let (Some(cached), Some(every)) = (&self.cached, self.settings.cached_flush_interval)
        else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_nanos(every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let flushes = cached.take_pending();
            if flushes.is_empty() {
                continue;
            }
            let now = clock.now();
            let calls = flushes.iter().map(|f| async move {
                // Shadow + Counted: these hits were already admitted here; they must be
                // recorded even when the fleet went over meanwhile.
                let op = ScriptOp {
                    key: script::redis_key(&self.settings.prefix, f.key),
                    limit: f.limit,
                    hits: f.hits,
                    shadow: true,
                    negative: false,
                };
                let r = match self.route(&op.key) {
                    Ok(node) => {
                        self.wire
                            .call(&node, std::slice::from_ref(&op), RejectedHits::Counted, now)
                            .await
                    }
                    Err(e) => Err(e),
                };
                match r {
                    Ok(o) => cached.flushed(f, o.first().map(|o| o.remaining)),
                    Err(e) => {
                        self.wire.health.failed(&e);
                        cached.flushed(f, None)
                    }
                }
            });
            futures_util::future::join_all(calls).await;
        }
    }

    /// Answers the ops a failed `check_and_update` left open by the failure mode: `allow`
    /// admits, `deny` rejects, `local` decides with this replica's in-memory limiter.
    pub fn answer_failure(&self, ops: &mut [CounterOp], now: Nanos, rejected: RejectedHits) {
        self.wire.health.fallbacks.fetch_add(1, Relaxed);
        match self.settings.failure_mode {
            FailureMode::Local => {
                let pending: smallvec::SmallVec<[usize; 8]> = (0..ops.len())
                    .filter(|&i| ops[i].outcome.is_none())
                    .collect();
                let mut local: smallvec::SmallVec<[CounterOp; 8]> =
                    pending.iter().map(|&i| ops[i].clone()).collect();
                self.fallback.check_and_update(&mut local, now, rejected);
                for (&i, op) in pending.iter().zip(local) {
                    ops[i].outcome = op.outcome;
                }
            }
            mode => {
                for op in ops.iter_mut().filter(|op| op.outcome.is_none()) {
                    op.outcome = Some(Outcome {
                        allowed: mode == FailureMode::Allow,
                        remaining: 0,
                        reset_after: 0,
                        expires_at: now,
                    });
                }
            }
        }
    }

    /// The node owning `key`: the one node, or the cluster master of its slot.
    fn route(&self, key: &str) -> Result<Arc<Node>, StorageError> {
        match &self.shards {
            None => Ok(self.single.clone()),
            Some(s) => {
                s.node(fred::util::redis_keyslot(key.as_bytes()))
                    .ok_or(StorageError::Unavailable(Cow::Borrowed(
                        "no known Redis Cluster master owns the slot",
                    )))
            }
        }
    }

    /// One request's ops on the node owning them, coalesced with the other requests in
    /// flight to that node (see `coalesce`).
    async fn submit(
        &self,
        ops: Vec<ScriptOp>,
        rejected: RejectedHits,
        now: Nanos,
    ) -> Result<Vec<Outcome>, StorageError> {
        let node = match ops.first() {
            Some(op) => self.route(&op.key)?,
            None => return Ok(Vec::new()),
        };
        let span = traced(|| {
            tracing::info_span!(
                target: "ratethrottle::trace",
                "redis.script",
                otel.kind = "client",
                db.system = "redis",
                server.address = %node.name,
                ratethrottle.ops = ops.len() as i64,
                ratethrottle.outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        });
        let request = wire::Request { ops, rejected, now };
        if span.is_none() {
            return coalesce::submit(&self.wire, &node, request).await;
        }
        // The queue wait when coalesced, and the round trip (alone or in a batch).
        let r = tracing::Instrument::instrument(
            coalesce::submit(&self.wire, &node, request),
            span.clone(),
        )
        .await;
        match &r {
            Ok(_) => span.record("ratethrottle.outcome", "ok"),
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                span.record("ratethrottle.outcome", error_kind(e))
            }
        };
        r
    }

    /// Decides `requests` in one batch call (what coalescing sends when requests queue), on
    /// the node owning the first request's first key; each answer is that request's alone.
    /// For tests and tools: the request path reaches it through `check_and_update`.
    pub async fn decide_batch(
        &self,
        requests: &[BatchRequest],
    ) -> Result<Vec<Result<Vec<Outcome>, StorageError>>, StorageError> {
        let Some(op) = requests.first().and_then(|r| r.ops.first()) else {
            return Ok(Vec::new());
        };
        let node = self.route(&op.key)?;
        self.wire.call_batch(&node, requests).await
    }

    /// Standalone and Sentinel: one call with every op (atomic, all-or-nothing in the
    /// script). Cluster: one call per hash slot, all at once; if an enforced op rejects,
    /// ops admitted in other slots are given back in a second round (rejections only).
    async fn decide(
        &self,
        ops: Vec<ScriptOp>,
        rejected: RejectedHits,
        now: Nanos,
    ) -> Result<Vec<Outcome>, StorageError> {
        if self.shards.is_none() || ops.len() == 1 {
            return self.submit(ops, rejected, now).await;
        }
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let slot = fred::util::redis_keyslot(op.key.as_bytes());
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(i),
                None => groups.push((slot, vec![i])),
            }
        }
        if groups.len() == 1 {
            return self.submit(ops, rejected, now).await;
        }
        let replies = futures_util::future::join_all(groups.iter().map(|(_, members)| {
            let batch: Vec<ScriptOp> = members.iter().map(|&i| ops[i].clone()).collect();
            self.submit(batch, rejected, now)
        }))
        .await;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; ops.len()];
        for ((_, members), reply) in groups.iter().zip(replies) {
            for (&i, o) in members.iter().zip(reply?) {
                outcomes[i] = Some(o);
            }
        }
        let request_rejected = rejected == RejectedHits::Free
            && ops
                .iter()
                .zip(&outcomes)
                .any(|(op, o)| !op.shadow && !op.negative && o.is_some_and(|o| !o.allowed));
        if request_rejected {
            self.refund_other_slots(&ops, &mut outcomes, rejected, now)
                .await?;
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.ok_or(StorageError::Unavailable(Cow::Borrowed(
                    "script answered fewer ops than sent",
                )))
            })
            .collect()
    }

    /// Cluster, a request rejected in one slot: gives back what other slots admitted; each
    /// refund answers with the state after it.
    async fn refund_other_slots(
        &self,
        ops: &[ScriptOp],
        outcomes: &mut [Option<Outcome>],
        rejected: RejectedHits,
        now: Nanos,
    ) -> Result<(), StorageError> {
        let refunds: Vec<(usize, ScriptOp)> = ops
            .iter()
            .enumerate()
            .filter(|(i, op)| {
                !op.negative && op.hits > 0 && outcomes[*i].is_some_and(|o| o.allowed)
            })
            .map(|(i, op)| {
                (
                    i,
                    ScriptOp {
                        negative: true,
                        ..op.clone()
                    },
                )
            })
            .collect();
        let replies = futures_util::future::join_all(
            refunds
                .iter()
                .map(|(_, op)| self.submit(vec![op.clone()], rejected, now)),
        )
        .await;
        for ((i, _), reply) in refunds.iter().zip(replies) {
            if let Some(o) = reply?.into_iter().next() {
                outcomes[*i] = Some(o);
            }
        }
        Ok(())
    }

    /// Until the task is dropped: probes every node whose connection is known down and
    /// closes its circuit (after loading the scripts a restarted server lost) when it
    /// answers; pings the others so health is reported without traffic; on a cluster,
    /// re-reads the slot table when told it is stale and while anything is down.
    pub async fn watch_health(&self) {
        let mut since_routing = Duration::ZERO;
        loop {
            let down = self.wire.health.is_degraded() || self.any_open();
            let every = Duration::from_millis(if down { 100 } else { 500 });
            let stale = async {
                match &self.shards {
                    Some(s) => s.stale.notified().await,
                    None => std::future::pending().await,
                }
            };
            let woken = tokio::select! {
                _ = tokio::time::sleep(every) => false,
                _ = stale => true,
            };
            since_routing += every;
            if self.shards.is_some() && (woken || down || since_routing >= Duration::from_secs(5)) {
                since_routing = Duration::ZERO;
                if let Err(e) = self.route_cluster().await {
                    self.wire.health.failed(&e);
                }
            }
            let nodes = self.nodes();
            let probes = nodes.iter().map(|node| self.probe(node));
            let healthy = futures_util::future::join_all(probes)
                .await
                .into_iter()
                .all(|ok| ok);
            if healthy && !nodes.is_empty() {
                self.wire.health.ok();
            }
        }
    }

    /// One node's health check; true when it answers.
    async fn probe(&self, node: &Node) -> bool {
        let pings = node
            .pool
            .clients()
            .iter()
            .map(|c| tokio::time::timeout(Duration::from_millis(500), c.ping::<String>(None)));
        let result = futures_util::future::join_all(pings)
            .await
            .into_iter()
            .find_map(|r| match r {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(classify(&e, self.wire.timeout)),
                Err(_) => Some((StorageError::Timeout(Duration::from_millis(500)), false)),
            });
        match result {
            None if node.circuit.is_open() => {
                // A restarted server lost its scripts; load them before traffic does.
                match self.load_script(node).await {
                    Ok(()) => {
                        if node.circuit.close() {
                            tracing::info!(node = %node.name, "Redis connection back: Redis decides again");
                        }
                        true
                    }
                    Err(e) => {
                        self.wire.health.failed(&e);
                        false
                    }
                }
            }
            None => true,
            Some((e, down)) => {
                self.wire.health.failed(&e);
                self.node_failed(node, e, down);
                false
            }
        }
    }
}

/// A span made by `make` when it would be a child of a request span being exported (the
/// request was sampled); otherwise a disabled span, made without allocating: with export off
/// the `enabled!` check is a cached no, and an unsampled request has no current span.
fn traced(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    // The target is `telemetry::otel::TARGET` (a sibling layer, not importable from here).
    if tracing::enabled!(target: "ratethrottle::trace", tracing::Level::INFO)
        && !tracing::Span::current().is_none()
    {
        make()
    } else {
        tracing::Span::none()
    }
}

/// A span attribute naming what kind of failure a call met (never its text).
fn error_kind(e: &StorageError) -> &'static str {
    match e {
        StorageError::Timeout(_) => "timeout",
        StorageError::Unavailable(_) => "unavailable",
        StorageError::Config(_) => "error",
    }
}
