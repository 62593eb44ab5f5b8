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
/// Change log entries kept (the newest); a replica that fell further behind reloads all.
const LOG_KEEP: u64 = 1_000_000;
/// Most changes read per poll.
const POLL_LIMIT: usize = 20_000;

/// Values are `trust,requests,written_ms`. A write loses to a value written in the last
/// `ARGV[3]` ms from at least twice its requests: the replica that saw most of a caller's
/// traffic decides its trust, instead of replicas overwriting each other every second.
///
/// The change log (KEYS[2]) is scored by a sequence (KEYS[3]) that Redis increments for every
/// change it writes: unique, increasing scores, so a reader resumes exactly after the last one
/// it read — no clock skew between replicas, no ties among thousands of changes written in
/// one millisecond, no page that can be read forever.
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
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), field)
  end
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -1 - tonumber(ARGV[2]))
return 1
";
/// How long a value backed by more traffic holds against writes backed by less.
const HOLD_MS: u64 = 60_000;

/// Changes after sequence ARGV[1], oldest first, at most ARGV[2]; first the oldest sequence
/// still in the log (a reader behind it missed trimmed changes and must reload) and the
/// sequence now (below the reader's: Redis lost its data — a restart without persistence, a
/// failover to a lagging replica — and the reader must reload too).
const POLL_CHANGES: &str = r"
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or '0'
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {oldest, redis.call('GET', KEYS[3]) or '0'}
for i = 1, #ids, 2 do
  out[#out + 1] = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], ids[i]) or ''
end
return out
";

/// One page of the first load: the next cursor, the change sequence now, then
/// `field, '0', value` triples. HSCAN, not HGETALL: a table of 262,144 callers is read in
/// bounded pages, never one huge reply that blocks Redis and the replica's memory at once.
const LOAD_PAGE: &str = r"
local r = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local out = {r[1], redis.call('GET', KEYS[3]) or '0'}
local h = r[2]
for i = 1, #h, 2 do
  out[#out + 1] = h[i]
  out[#out + 1] = '0'
  out[#out + 1] = h[i + 1]
end
return out
";
/// Fields asked per page of the first load (a hint Redis follows closely for a big hash).
const PAGE: usize = 2_000;
/// Pages read per poll while loading: like a poll of changes, ~`POLL_LIMIT` entries at most.
const PAGES_PER_POLL: usize = POLL_LIMIT / PAGE;

/// How far a replica has read the shared trust.
#[derive(Debug, Clone, PartialEq)]
enum Progress {
    /// The first load, page by page: the HSCAN cursor, and the change sequence when it began
    /// (changes after it are read next, so nothing written meanwhile is missed).
    Loading {
        cursor: String,
        from_seq: Option<u64>,
    },
    /// Loaded: the last change sequence read.
    Polling { seq: u64 },
}

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
    pub async fn poll(&self) -> Result<usize, String> {
        match self {
            TrustSink::Local(_) => Ok(0),
            TrustSink::Redis(r) => r.poll().await,
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
    /// The change sequence (same hash tag: one slot on a Cluster).
    sequence: String,
    table: Arc<TrustTable>,
    progress: Mutex<Progress>,
}

impl RedisTrust {
    pub fn new(pool: Pool, prefix: &str, table: Arc<TrustTable>) -> RedisTrust {
        RedisTrust {
            pool,
            values: format!("{prefix}{{adaptive}}:trust"),
            changes: format!("{prefix}{{adaptive}}:changes"),
            sequence: format!("{prefix}{{adaptive}}:seq"),
            table,
            progress: Mutex::new(Progress::Loading {
                cursor: "0".into(),
                from_seq: None,
            }),
        }
    }

    async fn call<R: fred::types::FromValue>(
        &self,
        script: &'static str,
        args: Vec<String>,
    ) -> Result<R, String> {
        let keys = vec![
            self.values.clone(),
            self.changes.clone(),
            self.sequence.clone(),
        ];
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
            args.push(LOG_KEEP.to_string());
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

    async fn poll(&self) -> Result<usize, String> {
        let progress = self.progress.lock().clone();
        match progress {
            Progress::Loading { cursor, from_seq } => self.load_pages(cursor, from_seq).await,
            Progress::Polling { seq } => {
                let args = vec![seq.to_string(), POLL_LIMIT.to_string()];
                let flat: Vec<String> = self.call(POLL_CHANGES, args).await?;
                let [oldest, now_seq, flat @ ..] = flat.as_slice() else {
                    return Err("a change page without its sequences".into());
                };
                let trimmed = oldest
                    .parse::<u64>()
                    .is_ok_and(|o| o > seq.saturating_add(1));
                let lost = now_seq.parse::<u64>().is_ok_and(|n| n < seq);
                if trimmed || lost {
                    // Changes this replica never read were trimmed, or Redis started over:
                    // read everything again.
                    *self.progress.lock() = Progress::Loading {
                        cursor: "0".into(),
                        from_seq: None,
                    };
                    return Ok(0);
                }
                let (n, last) = self.apply(flat, seq);
                *self.progress.lock() = Progress::Polling { seq: last };
                Ok(n)
            }
        }
    }

    /// Up to [`PAGES_PER_POLL`] pages of the first load from `cursor`; the progress is kept
    /// after every page, so a failed page is retried at the next poll, not the whole load.
    async fn load_pages(
        &self,
        mut cursor: String,
        mut from_seq: Option<u64>,
    ) -> Result<usize, String> {
        let mut n = 0;
        for _ in 0..PAGES_PER_POLL {
            let page: Vec<String> = self
                .call(LOAD_PAGE, vec![cursor.clone(), PAGE.to_string()])
                .await?;
            let [next, seq, flat @ ..] = page.as_slice() else {
                return Err("a trust page without its cursor and sequence".into());
            };
            // The sequence when the load began: every change after it is read next.
            let from = *from_seq.get_or_insert(seq.parse().unwrap_or(0));
            n += self.apply(flat, 0).0;
            cursor = next.clone();
            let done = cursor == "0";
            *self.progress.lock() = if done {
                Progress::Polling { seq: from }
            } else {
                Progress::Loading {
                    cursor: cursor.clone(),
                    from_seq: Some(from),
                }
            };
            if done {
                break;
            }
        }
        Ok(n)
    }

    /// Puts `key, score, value` triples in the table; returns how many and the highest score
    /// (a change sequence; at least `newest`).
    fn apply(&self, flat: &[String], mut newest: u64) -> (usize, u64) {
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
        (n, newest)
    }
}
