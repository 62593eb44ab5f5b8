//! The lists in Redis: `<prefix>{lists}:allow` and `<prefix>{lists}:block` hashes (field: the
//! canonical entry, value: its JSON) and `<prefix>{lists}:version`, incremented by every
//! change. The hash tag keeps the three keys in one slot, so each change is one atomic
//! script on standalone, Sentinel and Cluster alike. Replicas poll the version (one tiny
//! script call) and read both hashes in one call only when it moved.

use super::ListError;
use crate::lists::{ListEntry, ListKind};
use fred::clients::Pool;
use fred::interfaces::LuaInterface;
use parking_lot::Mutex;
use std::time::Duration;

const WRITE: &str = r"
local r
if ARGV[1] == 'set' then
  r = redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('INCR', KEYS[2])
else
  r = redis.call('HDEL', KEYS[1], ARGV[2])
  if r > 0 then redis.call('INCR', KEYS[2]) end
end
return r
";

const VERSION: &str = r"return redis.call('GET', KEYS[1]) or '0'";

const LOAD: &str = r"
local out = {redis.call('GET', KEYS[3]) or '0'}
local kinds = {'allow', 'block'}
for i = 1, 2 do
  local h = redis.call('HGETALL', KEYS[i])
  for j = 1, #h, 2 do
    out[#out + 1] = kinds[i]
    out[#out + 1] = h[j]
    out[#out + 1] = h[j + 1]
  end
end
return out
";

/// Deadline of one list call (admin writes and polls; never on the Check path).
const TIMEOUT: Duration = Duration::from_secs(1);

pub struct RedisLists {
    pool: Pool,
    allow: String,
    block: String,
    version: String,
    /// The version last loaded; `None` forces the next poll to load.
    seen: Mutex<Option<String>>,
}

impl RedisLists {
    pub fn new(pool: Pool, prefix: &str) -> RedisLists {
        RedisLists {
            pool,
            allow: format!("{prefix}{{lists}}:allow"),
            block: format!("{prefix}{{lists}}:block"),
            version: format!("{prefix}{{lists}}:version"),
            seen: Mutex::new(None),
        }
    }

    fn hash(&self, kind: ListKind) -> &str {
        match kind {
            ListKind::Allow => &self.allow,
            ListKind::Block => &self.block,
        }
    }

    async fn call<R: fred::types::FromValue>(
        &self,
        script: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, ListError> {
        match tokio::time::timeout(
            TIMEOUT,
            self.pool.next().eval::<R, _, _, _>(script, keys, args),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(ListError::Unavailable(e.to_string())),
            Err(_) => Err(ListError::Unavailable(format!(
                "no answer within {TIMEOUT:?}"
            ))),
        }
    }

    pub async fn set(&self, kind: ListKind, entry: &ListEntry) -> Result<(), ListError> {
        let json = serde_json::to_string(entry).map_err(|e| ListError::Invalid(e.to_string()))?;
        self.call::<i64>(
            WRITE,
            vec![self.hash(kind).to_string(), self.version.clone()],
            vec!["set".into(), entry.value.clone(), json],
        )
        .await
        .map(|_| ())
    }

    pub async fn delete(&self, kind: ListKind, value: &str) -> Result<bool, ListError> {
        self.call::<i64>(
            WRITE,
            vec![self.hash(kind).to_string(), self.version.clone()],
            vec!["del".into(), value.to_string()],
        )
        .await
        .map(|n| n > 0)
    }

    /// Every runtime entry, when the version moved since the last load.
    pub async fn load_if_changed(&self) -> Result<Option<Vec<(ListKind, ListEntry)>>, ListError> {
        let version: String = self
            .call(VERSION, vec![self.version.clone()], vec![])
            .await?;
        if self.seen.lock().as_deref() == Some(version.as_str()) {
            return Ok(None);
        }
        let flat: Vec<String> = self
            .call(
                LOAD,
                vec![self.allow.clone(), self.block.clone(), self.version.clone()],
                vec![],
            )
            .await?;
        let mut it = flat.into_iter();
        let loaded_version = it.next().unwrap_or_default();
        let mut out = Vec::new();
        while let (Some(kind), Some(field), Some(json)) = (it.next(), it.next(), it.next()) {
            let Some(kind) = ListKind::parse(&kind) else {
                continue;
            };
            match serde_json::from_str::<ListEntry>(&json) {
                Ok(mut e) => {
                    e.value = field;
                    out.push((kind, e));
                }
                Err(e) => tracing::warn!(entry = %field, "skipping unreadable list entry: {e}"),
            }
        }
        *self.seen.lock() = Some(loaded_version);
        Ok(Some(out))
    }

    /// Makes the next poll reload (after a failure the store may have been replaced).
    pub fn forget_version(&self) {
        *self.seen.lock() = None;
    }
}
