//! Where counter states live.
//!
//! Owns: the `Storage` seam every backend sits behind and the batch contract — all limits of
//! one request are decided together, and a request rejected by any enforced limit consumes
//! nothing anywhere (unless the reference's counting of rejected hits is asked for).
//!
//! Must not touch: the algorithms' arithmetic (limiter), matching (rules), gRPC.

pub mod memory;
pub mod redis;

pub use memory::MemoryStore;
pub use redis::{RedisStore, StorageHealth, with_password};

use crate::limiter::{Limit, Nanos, Outcome, RejectedHits};
use crate::rules::CounterKey;

/// One counter to decide within a request.
#[derive(Debug, Clone)]
pub struct CounterOp {
    pub key: CounterKey,
    pub limit: Limit,
    pub hits: u32,
    /// Shadow-mode limits are counted but never reject the request.
    pub shadow: bool,
    /// Envoy's `is_negative_hits`: give `hits` back instead of taking them.
    pub negative: bool,
    /// Filled in by the storage.
    pub outcome: Option<Outcome>,
}

impl CounterOp {
    pub fn new(key: CounterKey, limit: Limit, hits: u32, shadow: bool) -> Self {
        CounterOp {
            key,
            limit,
            hits,
            shadow,
            negative: false,
            outcome: None,
        }
    }
}

/// Storage failures, classified so the service can map them to one answer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The store cannot answer: its connection is known down, refused, reset, or it
    /// answered with an error.
    #[error("storage unavailable: {0}")]
    Unavailable(std::borrow::Cow<'static, str>),
    /// It did not answer within its deadline.
    #[error("storage timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("storage configuration: {0}")]
    Config(String),
}

impl StorageError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable(_) | StorageError::Timeout(_)
        )
    }
}

/// The configured backend. An enum rather than a trait object: the memory path is
/// synchronous and stays free of boxed futures on the hot path.
#[derive(Debug)]
// One Storage per process, behind an Arc: its size doesn't matter, a Box would be one more
// pointer to chase on every request.
#[allow(clippy::large_enum_variant)]
pub enum Storage {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Storage {
    /// Decides every op of one request; fills `op.outcome`.
    pub async fn check_and_update(
        &self,
        ops: &mut [CounterOp],
        now: Nanos,
        rejected: RejectedHits,
    ) -> Result<(), StorageError> {
        match self {
            Storage::Memory(m) => {
                m.check_and_update(ops, now, rejected);
                Ok(())
            }
            // Boxed: the Redis call's state machine is ~15 KB (the batch it may lead), and
            // unboxed it would size every decision's future, memory path included: each
            // gRPC call boxes its future, so all of it was allocated and copied per request.
            Storage::Redis(r) => Box::pin(r.check_and_update(ops, now, rejected)).await,
        }
    }

    /// After `check_and_update` failed: answers the ops it left open by the store's
    /// failure mode (`allow`, `deny`, or `local`: the in-memory limiter).
    pub fn answer_failure(&self, ops: &mut [CounterOp], now: Nanos, rejected: RejectedHits) {
        match self {
            // The memory store never fails.
            Storage::Memory(_) => {}
            Storage::Redis(r) => r.answer_failure(ops, now, rejected),
        }
    }

    /// Whether a failed call is still decided with real limits (`failure_mode: local`),
    /// rather than by a blanket allow or deny.
    pub fn decides_locally_on_failure(&self) -> bool {
        match self {
            Storage::Memory(_) => true,
            Storage::Redis(r) => r.failure_mode() == crate::config::FailureMode::Local,
        }
    }

    /// Builds the store a storage URL names: `memory`, or a Redis URL (see `redis::RedisUrl`).
    pub async fn connect(
        url: &str,
        settings: &crate::config::Settings,
    ) -> Result<Storage, StorageError> {
        if url == "memory" {
            return Ok(Storage::Memory(MemoryStore::new(settings.max_keys)));
        }
        if url.starts_with("redis") {
            let store = RedisStore::connect(url, &settings.redis, settings.max_keys).await?;
            return Ok(Storage::Redis(store));
        }
        Err(StorageError::Config(format!(
            "unknown storage {:?} (expected memory, redis://, rediss://, redis-sentinel:// or redis-cluster://)",
            redis::redact(url)
        )))
    }

    pub fn health(&self) -> Option<&StorageHealth> {
        match self {
            Storage::Memory(_) => None,
            Storage::Redis(r) => Some(r.health()),
        }
    }

    pub fn redis(&self) -> Option<&RedisStore> {
        match self {
            Storage::Redis(r) => Some(r),
            Storage::Memory(_) => None,
        }
    }

    /// A short name for logs and `/v1/config`.
    pub fn kind(&self) -> &'static str {
        match self {
            Storage::Memory(_) => "memory",
            Storage::Redis(_) => "redis",
        }
    }

    pub fn memory(&self) -> Option<&MemoryStore> {
        match self {
            Storage::Memory(m) => Some(m),
            Storage::Redis(_) => None,
        }
    }
}
