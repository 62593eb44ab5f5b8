//! The Redis store: standalone, Sentinel and Cluster through fred.
//!
//! Owns: connecting and reconnecting, grouping a request's counters into one atomic script
//! call per hash slot (all sent at once, pipelined on shared connections), the deadline of
//! every call and what happens when it is missed (`failure_mode`), the local over-limit cache,
//! and the health that `/readyz` and the metrics report.
//!
//! Must not touch: the algorithms' arithmetic (the script mirrors `limiter`), matching, gRPC.

mod cached;
mod local_cache;
pub mod script;
mod url;

pub use cached::CachedCounters;
pub use local_cache::OverLimitCache;
pub use url::{RedisUrl, Topology, UrlError, redact, with_password};

use super::{CounterOp, MemoryStore, StorageError};
use crate::config::{FailureMode, RedisSettings};
use crate::limiter::{Clock, Nanos, Outcome, RejectedHits};
use fred::clients::Pool;
use fred::interfaces::{ClientLike, FunctionInterface, LuaInterface};
use fred::types::config::{ReconnectPolicy, TlsConnector};
use parking_lot::Mutex;
use script::ScriptOp;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

fn is_missing_code(e: &fred::error::Error) -> bool {
    let d = e.details();
    d.starts_with("NOSCRIPT") || d.contains("Function not found")
}

fn is_unknown_command(e: &fred::error::Error) -> bool {
    let d = e.details().to_ascii_lowercase();
    d.contains("unknown command") || d.contains("unknown subcommand")
}

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
    last_error: Mutex<Option<String>>,
}

impl StorageHealth {
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    fn failed(&self, e: &str) {
        self.errors.fetch_add(1, Relaxed);
        if !self.degraded.swap(true, Relaxed) {
            tracing::warn!("Redis degraded: {e}");
        }
        *self.last_error.lock() = Some(e.to_string());
    }

    fn ok(&self) {
        if self.degraded.swap(false, Relaxed) {
            tracing::info!("Redis recovered");
        }
    }
}

#[derive(Debug)]
pub struct RedisStore {
    pool: Pool,
    cluster: bool,
    script: fred::types::scripts::Script,
    library: script::Library,
    /// FCALL while the server has functions (Redis ≥ 7); EVALSHA after it said it hasn't.
    functions: AtomicBool,
    settings: RedisSettings,
    timeout: Duration,
    fallback: MemoryStore,
    cache: Option<OverLimitCache>,
    cached: Option<CachedCounters>,
    health: StorageHealth,
    url: String,
    /// Send the caller's clock instead of letting the script read Redis's `TIME`.
    client_clock: bool,
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
        let pool = fred::types::Builder::from_config(config)
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
            // Forever, 50 ms doubling to 2 s: back off, but come back soon after Redis does.
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
            .build_pool(settings.pool_size)
            .map_err(|e| StorageError::Config(e.to_string()))?;
        pool.connect();
        let store = RedisStore {
            pool,
            cluster: parsed.is_cluster(),
            script: fred::types::scripts::Script::from_lua(script::SOURCE),
            library: script::Library::new(),
            functions: AtomicBool::new(true),
            settings: settings.clone(),
            timeout,
            fallback: MemoryStore::new(max_keys),
            cache: settings.local_cache.then(|| OverLimitCache::new(max_keys)),
            cached: settings
                .cached_flush_interval
                .map(|_| CachedCounters::new(max_keys)),
            health: StorageHealth::default(),
            url: redact(url),
            client_clock: false,
        };
        match tokio::time::timeout(Duration::from_secs(3), store.pool.wait_for_connect()).await {
            Ok(Ok(())) => {
                if let Err(e) = store.load_script().await {
                    store.health.failed(&e);
                }
            }
            Ok(Err(e)) => store.health.failed(&e.to_string()),
            Err(_) => store.health.failed("not reachable at start-up"),
        }
        if store.health.is_degraded() {
            tracing::warn!(
                url = %store.url,
                failure_mode = store.settings.failure_mode.as_str(),
                "Redis not reachable yet; answering with the failure mode while reconnecting"
            );
        }
        Ok(store)
    }

    /// Decide with the caller's clock rather than Redis's. Production keeps Redis's clock
    /// (replicas with skewed clocks then agree); the shared behavioural tests use this to
    /// drive every store with one injected clock.
    pub fn with_client_clock(mut self) -> Self {
        self.client_clock = true;
        self
    }

    pub fn health(&self) -> &StorageHealth {
        &self.health
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

    /// Loads the function library (or, on a Redis without functions, the script).
    async fn load_script(&self) -> Result<(), String> {
        let client = self.pool.next();
        if self.functions.load(Relaxed) {
            let loaded = if self.cluster {
                client
                    .function_load_cluster::<(), _>(true, self.library.code.clone())
                    .await
            } else {
                client
                    .function_load::<String, _>(true, self.library.code.clone())
                    .await
                    .map(|_| ())
            };
            match loaded {
                Ok(()) => return Ok(()),
                Err(e) if is_unknown_command(&e) => {
                    tracing::info!("Redis has no functions (Redis < 7): using EVALSHA");
                    self.functions.store(false, Relaxed);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        if self.cluster {
            client
                .script_load_cluster::<(), _>(script::SOURCE)
                .await
                .map_err(|e| e.to_string())
        } else {
            client
                .script_load::<String, _>(script::SOURCE)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }

    async fn send(
        &self,
        client: &fred::clients::Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Vec<i64>, fred::error::Error> {
        if self.functions.load(Relaxed) {
            client
                .fcall(self.library.function.clone(), keys, args)
                .await
        } else {
            client.evalsha(self.script.sha1().clone(), keys, args).await
        }
    }

    /// One script call; loads the code once more when the server lacks it (a restarted
    /// server, a flushed script cache, a promoted replica without the script).
    async fn call(
        &self,
        ops: &[ScriptOp],
        rejected: RejectedHits,
        now: Nanos,
    ) -> Result<Vec<Outcome>, String> {
        let now_us = self.client_clock.then_some(now / 1_000);
        let (keys, args) = script::call_args(ops, now_us, rejected);
        self.health.commands.fetch_add(1, Relaxed);
        let client = self.pool.next();
        let reply = match self.send(client, keys, args).await {
            Err(e) if is_missing_code(&e) => {
                self.load_script().await?;
                self.health.commands.fetch_add(1, Relaxed);
                // Rare: encode again rather than clone every call's arguments up front.
                let (keys, args) = script::call_args(ops, now_us, rejected);
                self.send(client, keys, args)
                    .await
                    .map_err(|e| e.to_string())?
            }
            other => other.map_err(|e| e.to_string())?,
        };
        script::parse_reply(&reply, ops.len(), now).map_err(|e| e.to_string())
    }

    /// Decides every op of one request (see `Storage::check_and_update`). Always answers:
    /// a Redis failure or a missed deadline is answered by the failure mode.
    pub async fn check_and_update(
        &self,
        ops: &mut [CounterOp],
        now: Nanos,
        rejected: RejectedHits,
    ) {
        let free = rejected == RejectedHits::Free;
        // A request with a counter known to reject is rejected; with free rejections it
        // consumes nothing, so its other counters are only looked at.
        let mut looks_only = false;
        if let Some(cache) = &self.cache
            && free
        {
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
                    looks_only = true;
                }
            }
        }
        // Cached mode: counters already known are decided here.
        let mut local_admitted: Vec<usize> = Vec::new();
        if let Some(cached) = &self.cached
            && free
            && !looks_only
        {
            for (i, op) in ops.iter_mut().enumerate() {
                if op.negative || op.outcome.is_some() || !CachedCounters::eligible(&op.limit) {
                    continue;
                }
                if let Some(o) = cached.try_decide(op.key, &op.limit, now, op.hits) {
                    if o.allowed {
                        local_admitted.push(i);
                    } else if !op.shadow {
                        looks_only = true;
                    }
                    op.outcome = Some(o);
                }
            }
            if looks_only {
                self.undo_local(ops, &local_admitted, now);
                local_admitted.clear();
            }
        }
        let pending: Vec<usize> = (0..ops.len())
            .filter(|&i| ops[i].outcome.is_none())
            .collect();
        if pending.is_empty() {
            return;
        }
        let script_ops: Vec<ScriptOp> = pending
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
            .collect();
        match tokio::time::timeout(self.timeout, self.decide(&script_ops, rejected, now)).await {
            Ok(Ok(outcomes)) => {
                self.health.ok();
                for (&i, o) in pending.iter().zip(outcomes) {
                    ops[i].outcome = Some(o);
                }
                let request_rejected = free
                    && ops.iter().any(|op| {
                        !op.shadow && !op.negative && op.outcome.is_some_and(|o| !o.allowed)
                    });
                if request_rejected {
                    self.undo_local(ops, &local_admitted, now);
                }
                if let Some(cached) = &self.cached
                    && free
                {
                    for &i in &pending {
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
            Ok(Err(e)) => {
                self.undo_local(ops, &local_admitted, now);
                self.fail(ops, &pending, now, rejected, &e)
            }
            Err(_) => {
                self.undo_local(ops, &local_admitted, now);
                let e = format!("no answer within {:?}", self.timeout);
                self.fail(ops, &pending, now, rejected, &e)
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

    /// Writes cached mode's pending hits every `cached_flush_interval`, until dropped.
    pub async fn run_flusher(&self) {
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
            let now = crate::limiter::SystemClock.now();
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
                let r = tokio::time::timeout(
                    self.timeout.max(Duration::from_millis(250)),
                    self.call(std::slice::from_ref(&op), RejectedHits::Counted, now),
                )
                .await;
                match r {
                    Ok(Ok(o)) => cached.flushed(f, o.first().map(|o| o.remaining)),
                    Ok(Err(e)) => {
                        self.health.failed(&e);
                        cached.flushed(f, None)
                    }
                    Err(_) => cached.flushed(f, None),
                }
            });
            futures_util::future::join_all(calls).await;
        }
    }

    fn fail(
        &self,
        ops: &mut [CounterOp],
        pending: &[usize],
        now: Nanos,
        rejected: RejectedHits,
        e: &str,
    ) {
        self.health.failed(e);
        self.health.fallbacks.fetch_add(1, Relaxed);
        match self.settings.failure_mode {
            FailureMode::Local => {
                let mut local: Vec<CounterOp> = pending.iter().map(|&i| ops[i].clone()).collect();
                self.fallback.check_and_update(&mut local, now, rejected);
                for (&i, op) in pending.iter().zip(local) {
                    ops[i].outcome = op.outcome;
                }
            }
            mode => {
                for &i in pending {
                    ops[i].outcome = Some(Outcome {
                        allowed: mode == FailureMode::Allow,
                        remaining: 0,
                        reset_after: 0,
                        expires_at: now,
                    });
                }
            }
        }
    }

    /// Standalone and Sentinel: one call with every op (atomic, all-or-nothing in the
    /// script). Cluster: one call per hash slot, all at once; if an enforced op rejects,
    /// ops admitted in other slots are given back in a second round (rejections only).
    async fn decide(
        &self,
        ops: &[ScriptOp],
        rejected: RejectedHits,
        now: Nanos,
    ) -> Result<Vec<Outcome>, String> {
        if !self.cluster || ops.len() == 1 {
            return self.call(ops, rejected, now).await;
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
            return self.call(ops, rejected, now).await;
        }
        let batches: Vec<Vec<ScriptOp>> = groups
            .iter()
            .map(|(_, members)| members.iter().map(|&i| ops[i].clone()).collect())
            .collect();
        let replies =
            futures_util::future::join_all(batches.iter().map(|b| self.call(b, rejected, now)))
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
            // Give back what other slots admitted; each refund answers with the state after it.
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
                    .map(|(_, op)| self.call(std::slice::from_ref(op), rejected, now)),
            )
            .await;
            for ((i, _), reply) in refunds.iter().zip(replies) {
                if let Some(o) = reply?.into_iter().next() {
                    outcomes[*i] = Some(o);
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| "script answered fewer ops than sent".to_string()))
            .collect()
    }

    /// Pings until the task is dropped, so health recovers (and is reported) without traffic.
    pub async fn watch_health(&self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let ping = tokio::time::timeout(
                Duration::from_secs(1),
                self.pool.next().ping::<String>(None),
            )
            .await;
            match ping {
                Ok(Ok(_)) => {
                    if self.health.is_degraded() {
                        // A restarted server lost its scripts; load them before traffic does.
                        match self.load_script().await {
                            Ok(()) => self.health.ok(),
                            Err(e) => self.health.failed(&e),
                        }
                    }
                }
                Ok(Err(e)) => self.health.failed(&e.to_string()),
                Err(_) => self.health.failed("PING timed out"),
            }
        }
    }
}
