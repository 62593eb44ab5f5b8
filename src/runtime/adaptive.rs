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

/// A change to publish: the caller's key, its trust (`None`: back to neutral) and the
/// (decayed) requests it rests on.
pub type Published = (u64, Option<TrustQ>, f64);

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

/// Values are `trust,requests,written_ms`. A write loses to a value written in the last
/// `ARGV[3]` ms from at least twice its requests: the replica that saw most of a caller's
/// traffic decides its trust, instead of replicas overwriting each other every second.
const PUBLISH: &str = r"
local now = tonumber(ARGV[1])
local hold = tonumber(ARGV[3])
for i = 4, #ARGV, 3 do
  local field, q, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local old = redis.call('HGET', KEYS[1], field)
  local keep = false
  if old then
    local _, _, on, oms = string.find(old, '^[^,]*,([^,]*),(.*)$')
    on, oms = tonumber(on), tonumber(oms)
    keep = on ~= nil and oms ~= nil and now - oms < hold and on >= 2 * n
  end
  if not keep then
    if q == '' then
      redis.call('HDEL', KEYS[1], field)
    else
      redis.call('HSET', KEYS[1], field, q .. ',' .. n .. ',' .. now)
    end
    redis.call('ZADD', KEYS[2], now, field)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
return 1
";
/// How long a value backed by more traffic holds against writes backed by less.
const HOLD_MS: u64 = 60_000;

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
    pub async fn publish(&self, changes: &[Published], now_ms: u64) -> Result<(), String> {
        match self {
            TrustSink::Local(t) => {
                for &(key, q, _) in changes {
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

    async fn publish(&self, changes: &[Published], now_ms: u64) -> Result<(), String> {
        for chunk in changes.chunks(1000) {
            let mut args = Vec::with_capacity(3 + chunk.len() * 3);
            args.push(now_ms.to_string());
            args.push(LOG_KEEP_MS.to_string());
            args.push(HOLD_MS.to_string());
            for &(key, q, requests) in chunk {
                args.push(format!("{key:016x}"));
                args.push(q.map(|q| q.to_string()).unwrap_or_default());
                args.push(format!("{:.0}", requests.max(0.0)));
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
            let trust = item[2]
                .split(',')
                .next()
                .and_then(|q| q.parse::<TrustQ>().ok());
            self.table.set(key, trust);
            n += 1;
        }
        *self.seen_ms.lock() = Some(newest);
        Ok(n)
    }
}
