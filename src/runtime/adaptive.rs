//! Adaptive limits at run time: where the trust the anomaly task learns goes, so the engine
//! reads it — straight into this replica's table with memory storage; through Redis when the
//! counters are there, so every replica applies the same factor to the same caller.
//!
//! With Redis, a replica writes the changes it computes to `<prefix>{adaptive}:trust` (hash:
//! caller key in hex → trust × 65535) and logs them in `<prefix>{adaptive}:changes` (sorted
//! set scored by write time), and *every* replica, the writer included, fills its table only
//! from what it reads back each second. Two replicas judging one caller differently both
//! apply whichever value was written last: the same factor everywhere within a poll.
//!
//! Owns: the Redis layout of shared trust and its poll. Must not touch: the score (in
//! `anomaly::trust`), the request path (it only reads the table).

use std::sync::Arc;
use std::time::Duration;

use fred::clients::Pool;
use fred::interfaces::LuaInterface;
use parking_lot::Mutex;

use crate::anomaly::{TrustQ, TrustTable};

/// Deadline of one publish or poll (never on the request path).
const TIMEOUT: Duration = Duration::from_secs(1);
/// How often replicas read each other's changes.
pub const POLL: Duration = Duration::from_secs(1);
/// Change log entries older than this are trimmed (a replica that missed more reloads all).
const LOG_KEEP_MS: u64 = 600_000;
/// Read back this far before the newest change seen: replicas' clocks differ a little.
const SKEW_MS: u64 = 5_000;
/// Most changes read per poll.
const POLL_LIMIT: usize = 20_000;

const PUBLISH: &str = r"
local now = tonumber(ARGV[1])
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('ZADD', KEYS[2], now, ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
return 1
";

const POLL_CHANGES: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for i = 1, #ids, 2 do
  out[#out + 1] = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], ids[i]) or ''
end
return out
";

const LOAD_ALL: &str = r"
local out = {}
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  out[#out + 1] = h[i]
  out[#out + 1] = '0'
  out[#out + 1] = h[i + 1]
end
return out
";

/// Where published trust goes.
pub enum TrustSink {
    /// This replica's table only.
    Local(Arc<TrustTable>),
    /// Redis, read back into the table by [`TrustSink::poll`].
    Redis(RedisTrust),
}

impl TrustSink {
    pub fn table(&self) -> &Arc<TrustTable> {
        match self {
            TrustSink::Local(t) => t,
            TrustSink::Redis(r) => &r.table,
        }
    }

    /// Publishes `changes` (`None`: back to neutral, out of the table).
    pub async fn publish(
        &self,
        changes: &[(u64, Option<TrustQ>)],
        now_ms: u64,
    ) -> Result<(), String> {
        match self {
            TrustSink::Local(t) => {
                for &(key, q) in changes {
                    t.set(key, q);
                }
                Ok(())
            }
            TrustSink::Redis(r) => r.publish(changes, now_ms).await,
        }
    }

    /// Reads other replicas' changes into the table (Redis only). Returns how many.
    pub async fn poll(&self, now_ms: u64) -> Result<usize, String> {
        match self {
            TrustSink::Local(_) => Ok(0),
            TrustSink::Redis(r) => r.poll(now_ms).await,
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, TrustSink::Redis(_))
    }
}

/// Trust shared through Redis (standalone, Sentinel or Cluster: both keys share a slot).
pub struct RedisTrust {
    pool: Pool,
    values: String,
    changes: String,
    table: Arc<TrustTable>,
    /// Newest change score read; `None` until the first full load.
    seen_ms: Mutex<Option<u64>>,
}

impl RedisTrust {
    pub fn new(pool: Pool, prefix: &str, table: Arc<TrustTable>) -> RedisTrust {
        RedisTrust {
            pool,
            values: format!("{prefix}{{adaptive}}:trust"),
            changes: format!("{prefix}{{adaptive}}:changes"),
            table,
            seen_ms: Mutex::new(None),
        }
    }

    async fn call<R: fred::types::FromValue>(
        &self,
        script: &'static str,
        args: Vec<String>,
    ) -> Result<R, String> {
        let keys = vec![self.values.clone(), self.changes.clone()];
        match tokio::time::timeout(
            TIMEOUT,
            self.pool.next().eval::<R, _, _, _>(script, keys, args),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
        }
    }

    async fn publish(&self, changes: &[(u64, Option<TrustQ>)], now_ms: u64) -> Result<(), String> {
        for chunk in changes.chunks(1000) {
            let mut args = Vec::with_capacity(2 + chunk.len() * 2);
            args.push(now_ms.to_string());
            args.push(LOG_KEEP_MS.to_string());
            for &(key, q) in chunk {
                args.push(format!("{key:016x}"));
                args.push(q.map(|q| q.to_string()).unwrap_or_default());
            }
            self.call::<i64>(PUBLISH, args).await?;
        }
        Ok(())
    }

    async fn poll(&self, now_ms: u64) -> Result<usize, String> {
        let since = *self.seen_ms.lock();
        let flat: Vec<String> = match since {
            None => self.call(LOAD_ALL, vec![]).await?,
            Some(ms) => {
                let from = ms.saturating_sub(SKEW_MS);
                self.call(POLL_CHANGES, vec![from.to_string(), POLL_LIMIT.to_string()])
                    .await?
            }
        };
        // After a full load, changes from now on (minus the skew margin) are what's new.
        let mut newest = since.unwrap_or(now_ms);
        let mut n = 0;
        for item in flat.chunks_exact(3) {
            let (Ok(key), Ok(score)) = (u64::from_str_radix(&item[0], 16), item[1].parse::<f64>())
            else {
                continue;
            };
            newest = newest.max(score as u64);
            self.table.set(key, item[2].parse::<TrustQ>().ok());
            n += 1;
        }
        *self.seen_ms.lock() = Some(newest);
        Ok(n)
    }
}
