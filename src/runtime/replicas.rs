//! Carrying the anomaly detectors' heavy hitters between replicas through Redis, so an abuser
//! spread over several replicas — each below its local threshold — is still caught.
//!
//! Each replica, once per closed window, writes its [`TopKeys`] into the hash
//! `<prefix>{anomaly}:top:<epoch>` (field: the replica, value: JSON; the key expires after a
//! minute) and, every tick, reads that window's hash and hands the other replicas' exports to
//! its detector. Windows are aligned to wall time, so every replica's epoch names the same
//! window; merging is idempotent (a replica's export counts once per key), so reading the same
//! hash four times a window is harmless. A window's merge ends when the next one closes.
//!
//! Owns: the Redis layout of the exchange and its JSON. Must not touch: the detector's
//! judgement (`anomaly::Detector::merge`), the lists.

use std::time::Duration;

use fred::clients::Pool;
use fred::interfaces::LuaInterface;
use serde_json::{Value, json};

use crate::anomaly::{RemoteCount, Scope, TopKeys};

/// Deadline of one exchange call (the detector task waits for it; never the request path).
const TIMEOUT: Duration = Duration::from_millis(500);
/// How long a window's exports are kept.
const KEEP_SECONDS: u64 = 60;
/// Largest export read from another replica (a bad or hostile writer can't balloon memory).
const MAX_EXPORT_BYTES: usize = 1 << 20;

const PUBLISH: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
";

const READ: &str = r"return redis.call('HGETALL', KEYS[1])";

/// The exchange over one Redis (standalone, Sentinel or Cluster: one key per window).
pub struct TopKeysExchange {
    pool: Pool,
    prefix: String,
}

impl TopKeysExchange {
    pub fn new(pool: Pool, prefix: &str) -> TopKeysExchange {
        TopKeysExchange {
            pool,
            prefix: prefix.to_string(),
        }
    }

    fn key(&self, epoch: u64) -> String {
        format!("{}{{anomaly}}:top:{epoch}", self.prefix)
    }

    async fn eval<R: fred::types::FromValue>(
        &self,
        script: &'static str,
        key: String,
        args: Vec<String>,
    ) -> Result<R, String> {
        match tokio::time::timeout(
            TIMEOUT,
            self.pool.next().eval::<R, _, _, _>(script, vec![key], args),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
        }
    }

    /// Writes this replica's export for its window.
    pub async fn publish(&self, top: &TopKeys) -> Result<(), String> {
        let body = encode(top).to_string();
        self.eval::<i64>(
            PUBLISH,
            self.key(top.epoch),
            vec![top.replica.clone(), body, KEEP_SECONDS.to_string()],
        )
        .await
        .map(|_| ())
    }

    /// Every export written for `epoch`, this replica's included (the detector skips its
    /// own). Unreadable exports are skipped and counted in the second value.
    pub async fn read(&self, epoch: u64) -> Result<(Vec<TopKeys>, usize), String> {
        let flat: Vec<String> = self.eval(READ, self.key(epoch), vec![]).await?;
        let mut out = Vec::new();
        let mut bad = 0;
        for pair in flat.chunks_exact(2) {
            match decode(&pair[1], epoch) {
                Some(t) if t.replica == pair[0] => out.push(t),
                _ => bad += 1,
            }
        }
        Ok((out, bad))
    }
}

fn scope_name(s: Scope) -> &'static str {
    s.name()
}

fn scope_of(name: &str) -> Option<Scope> {
    Scope::LEVELS.into_iter().find(|s| s.name() == name)
}

fn encode(top: &TopKeys) -> Value {
    json!({
        "replica": top.replica,
        "epoch": top.epoch,
        "keys": top.keys.iter().map(|k| json!([
            scope_name(k.scope),
            format!("{:016x}", k.hash),
            k.value,
            k.count,
            k.error_bound,
            k.exempt,
        ])).collect::<Vec<_>>(),
    })
}

/// An export as another replica wrote it; `None` when malformed or not for `epoch`.
fn decode(text: &str, epoch: u64) -> Option<TopKeys> {
    if text.len() > MAX_EXPORT_BYTES {
        return None;
    }
    let v: Value = serde_json::from_str(text).ok()?;
    if v["epoch"].as_u64()? != epoch {
        return None;
    }
    let keys = v["keys"]
        .as_array()?
        .iter()
        .filter_map(|k| {
            Some(RemoteCount {
                scope: scope_of(k[0].as_str()?)?,
                hash: u64::from_str_radix(k[1].as_str()?, 16).ok()?,
                value: k[2].as_str()?.to_string(),
                count: u32::try_from(k[3].as_u64()?).ok()?,
                error_bound: u32::try_from(k[4].as_u64()?).ok()?,
                exempt: k[5].as_bool()?,
            })
        })
        .collect();
    Some(TopKeys {
        replica: v["replica"].as_str()?.to_string(),
        epoch,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_round_trip_and_garbage_is_refused() {
        let top = TopKeys {
            replica: "pod-a".into(),
            epoch: 42,
            keys: vec![
                RemoteCount {
                    scope: Scope::Ip,
                    hash: 0xdead_beef,
                    value: "10.0.0.1".into(),
                    count: 17,
                    error_bound: 2,
                    exempt: false,
                },
                RemoteCount {
                    scope: Scope::Identity,
                    hash: u64::MAX,
                    value: "user:é…".into(),
                    count: 9,
                    error_bound: 0,
                    exempt: true,
                },
            ],
        };
        let text = encode(&top).to_string();
        assert_eq!(decode(&text, 42), Some(top));
        assert_eq!(decode(&text, 43), None, "another window's export");
        assert_eq!(decode("", 42), None);
        assert_eq!(decode("{\"epoch\": 42}", 42), None);
        assert_eq!(decode(&"x".repeat(MAX_EXPORT_BYTES + 1), 42), None);
        // A key with a bad scope is dropped, the rest kept.
        let t = decode(
            r#"{"replica":"b","epoch":1,"keys":[["nope","1","v",1,0,false],["ip","2","10.0.0.2",3,0,false]]}"#,
            1,
        )
        .expect("decoded");
        assert_eq!(t.keys.len(), 1);
        assert_eq!(t.keys[0].count, 3);
    }
}
