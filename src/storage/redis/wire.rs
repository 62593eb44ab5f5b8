//! One script call on the wire: sending it to a node, reloading the code a server lost, the
//! deadline, and what a failure does to the node's circuit.
//!
//! Owns: FCALL/EVALSHA of one request (`call`) and of a coalesced batch of requests
//! (`call_batch`), NOSCRIPT reloads, redirects (which ask for a new slot table), the circuit
//! and the command counters. Shared (an `Arc`) by the store and the per-node batch senders.
//!
//! Must not touch: which requests go together (coalesce), the failure mode's answers (the
//! store), the script's encoding (script).

use super::script::{self, ScriptOp};
use super::shards::{Node, Shards};
use super::{
    KNOWN_DOWN, StorageHealth, classify, is_missing_code, is_redirect, is_unknown_command,
};
use crate::config::FailureMode;
use crate::limiter::{Nanos, Outcome, RejectedHits};
use crate::storage::StorageError;
use fred::error::ErrorKind;
use fred::interfaces::{ClientLike, FunctionInterface, LuaInterface};
use fred::types::config::Options;
use fred::types::{ClientState, Value};
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

/// One request waiting in (or sent in) a batch.
#[derive(Debug)]
pub struct Request {
    pub ops: Vec<ScriptOp>,
    pub rejected: RejectedHits,
    pub now: Nanos,
}

#[derive(Debug)]
pub struct Wire {
    pub script: fred::types::scripts::Script,
    pub library: script::Library,
    /// FCALL while the server has functions (Redis ≥ 7); EVALSHA after it said it hasn't.
    pub functions: AtomicBool,
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    pub health: StorageHealth,
    /// Send the caller's clock instead of letting the script read Redis's `TIME`.
    pub client_clock: AtomicBool,
    /// Commands fail at once (rather than queue) while their client is reconnecting.
    pub fail_fast: Options,
    /// Cluster: told when the slot table looks stale.
    pub shards: Option<Arc<Shards>>,
}

/// What to send: one request's KEYS and ARGV (`main`), or a batch's ARGV (`main_batch`).
#[derive(Clone, Copy)]
enum Call<'a> {
    Single(&'a [ScriptOp], RejectedHits, Nanos),
    Batch(&'a [Request]),
}

impl Wire {
    fn now_us(&self, now: Nanos) -> Option<u64> {
        self.client_clock.load(Relaxed).then_some(now / 1_000)
    }

    /// Loads the function library (or, on a Redis without functions, the script) on a node.
    pub async fn load_script(&self, node: &Node) -> Result<(), StorageError> {
        let client = node.pool.next();
        let err = |e: fred::error::Error| classify(&e, self.timeout).0;
        if self.functions.load(Relaxed) {
            match client
                .function_load::<String, _>(true, self.library.code.clone())
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if is_unknown_command(&e) => {
                    tracing::info!("Redis has no functions (Redis < 7): using EVALSHA");
                    self.functions.store(false, Relaxed);
                }
                Err(e) => return Err(err(e)),
            }
        }
        client
            .script_load::<String, _>(script::SOURCE)
            .await
            .map(|_| ())
            .map_err(err)
    }

    async fn send(
        &self,
        client: &fred::clients::Client,
        call: Call<'_>,
    ) -> Result<Value, fred::error::Error> {
        let (function, keys, args) = match call {
            Call::Single(ops, rejected, now) => {
                let (keys, args) = script::call_args(ops, self.now_us(now), rejected);
                (&self.library.function, keys, args)
            }
            Call::Batch(requests) => {
                let args = script::batch_args(
                    requests
                        .iter()
                        .map(|r| (r.ops.as_slice(), self.now_us(r.now), r.rejected)),
                );
                (&self.library.batch_function, Vec::new(), args)
            }
        };
        if self.functions.load(Relaxed) {
            client
                .with_options(&self.fail_fast)
                .fcall(function.clone(), keys, args)
                .await
        } else {
            if client.state() != ClientState::Connected {
                return Err(fred::error::Error::new(
                    ErrorKind::Canceled,
                    "not connected",
                ));
            }
            client.evalsha(self.script.sha1().clone(), keys, args).await
        }
    }

    /// One script call to `node`; loads the code once more when the server lacks it (a
    /// restarted server, a flushed script cache, a promoted replica without the script).
    /// Answers at once, without awaiting Redis, while the node's connection is known down;
    /// records the result in the node's circuit.
    async fn exchange(&self, node: &Node, call: Call<'_>) -> Result<Value, StorageError> {
        if node.circuit.is_open() {
            return Err(KNOWN_DOWN);
        }
        let attempt = async {
            self.health.commands.fetch_add(1, Relaxed);
            let client = node.pool.next();
            match self.send(client, call).await {
                Err(e) if is_missing_code(&e) => {
                    // A child of the request's redis.script span when it is traced (and
                    // sent alone: a batch sender runs outside any request).
                    let load = super::traced(|| {
                        tracing::info_span!(
                            target: "ratethrottle::trace",
                            "redis.script_load",
                            otel.kind = "client",
                            db.system = "redis",
                            server.address = %node.name,
                        )
                    });
                    tracing::Instrument::instrument(self.load_script(node), load)
                        .await
                        .map_err(|e| (e, Some(false)))?;
                    self.health.commands.fetch_add(1, Relaxed);
                    self.send(client, call).await
                }
                other => other,
            }
            .map_err(|e| {
                if is_redirect(&e) {
                    // The cluster's state, not this connection's: re-read the slot table.
                    self.stale();
                    return (classify(&e, self.timeout).0, None);
                }
                let (e, down) = classify(&e, self.timeout);
                (e, Some(down))
            })
        };
        let answered = async {
            tokio::select! {
                r = attempt => r,
                _ = node.opened.notified() => Err((KNOWN_DOWN, None)),
            }
        };
        let reply = match tokio::time::timeout(self.timeout, answered).await {
            Ok(Ok(reply)) => reply,
            Ok(Err((e, None))) => return Err(e),
            Ok(Err((e, Some(down)))) => return Err(self.node_failed(node, e, down)),
            Err(_) => {
                return Err(self.node_failed(node, StorageError::Timeout(self.timeout), false));
            }
        };
        node.circuit.success();
        Ok(reply)
    }

    /// One request's ops in one call (`main`): all in one hash slot on a cluster.
    pub async fn call(
        &self,
        node: &Node,
        ops: &[ScriptOp],
        rejected: RejectedHits,
        now: Nanos,
    ) -> Result<Vec<Outcome>, StorageError> {
        let reply = self
            .exchange(node, Call::Single(ops, rejected, now))
            .await?;
        let ints: Vec<i64> = reply
            .convert()
            .map_err(|e| StorageError::Unavailable(Cow::Owned(format!("script reply: {e}"))))?;
        script::parse_reply(&ints, ops.len(), now)
            .map_err(|e| StorageError::Unavailable(Cow::Owned(e.to_string())))
    }

    /// Many requests in one call (`main_batch`), decided in order. The outer error fails
    /// every request; an inner one (the script failed on that request alone) fails only it.
    pub async fn call_batch(
        &self,
        node: &Node,
        requests: &[Request],
    ) -> Result<Vec<Result<Vec<Outcome>, StorageError>>, StorageError> {
        let reply = self.exchange(node, Call::Batch(requests)).await?;
        self.health.batches.fetch_add(1, Relaxed);
        self.health
            .batched
            .fetch_add(requests.len() as u64, Relaxed);
        let values = match reply {
            Value::Array(values) => values,
            other => {
                return Err(StorageError::Unavailable(Cow::Owned(format!(
                    "batch reply is not an array: {other:?}"
                ))));
            }
        };
        let answers =
            script::parse_batch_reply(&values, requests.iter().map(|r| (r.ops.len(), r.now)))
                .map_err(|e| StorageError::Unavailable(Cow::Owned(e.to_string())))?;
        Ok(answers
            .into_iter()
            .map(|a| {
                a.map_err(|failure| {
                    if let script::RequestFailure::SlotMoved(_) = failure {
                        // Like a MOVED reply: re-read the slot table.
                        self.stale();
                    }
                    StorageError::Unavailable(Cow::Owned(failure.to_string()))
                })
            })
            .collect())
    }

    fn stale(&self) {
        if let Some(s) = &self.shards {
            s.stale.notify_one();
        }
    }

    pub fn node_failed(&self, node: &Node, e: StorageError, down: bool) -> StorageError {
        if node.trip(down) {
            tracing::warn!(
                node = %node.name,
                failure_mode = self.failure_mode.as_str(),
                "Redis connection known down ({e}): answering by the failure mode at once, probing in the background"
            );
            self.stale();
        }
        e
    }
}
