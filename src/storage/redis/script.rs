//! The server-side script of the Redis store, and its encoding.
//!
//! Owns: `script.lua` (every counter decision of one request in one atomic EVALSHA, mirroring
//! `limiter` and the batch contract of the memory store), the Redis keys a counter lives
//! under, the KEYS/ARGV of a call and the decoding of its reply. The header of `script.lua`
//! is the reference for the encoding; this file and the script change together.
//!
//! Must not touch: connections, retries, grouping by hash slot, failure modes (the store).
//!
//! Encoding, per op `i` (0-based):
//! - KEYS `[2i]` the state hash [`redis_key`], `[2i + 1]` the log zset (the same key with
//!   `:log` appended after the hash tag, so both live in one cluster slot).
//! - ARGV `[0]` now in µs (`0` = the script reads Redis's `TIME`), `[1]` rejected hits
//!   (`0` Free, `1` Counted), then 8 per op: algorithm code (1 fixed_window,
//!   2 sliding_window_log, 3 sliding_window_counter, 4 token_bucket, 5 leaky_bucket, 6 gcra),
//!   requests_per_unit, unit in µs, burst, block_duration in µs rounded up, hits, shadow
//!   (`0`/`1`), negative (`0`/`1`).
//! - Reply: 4 integers per op: allowed (`0`/`1`), remaining, reset_after in µs, expires_in in
//!   µs (the outcome's `expires_at` − now).
//!
//! Precision: at instants that are whole microseconds the script decides (allowed,
//! remaining) exactly as `Limit::check_and_update` / `Limit::refund` and the memory store's
//! batch rules, and its `reset_after` and `expires_at` are the limiter's rounded UP to the next
//! whole microsecond (equal when those are whole microseconds; `parse_reply` turns them back
//! into nanoseconds). That holds within the exact range of its double arithmetic: instants and
//! durations below 2^53 µs (the year 2255; beyond, they saturate there as "never"), counts
//! below 2^53, `(L + Counted overshoot) × unit_µs < 2^53` for sliding_window_counter and
//! `(burst + Counted debt) × unit_µs < 2^53` for the buckets and GCRA (a unit of a second is
//! exact for every `u32`; a minute up to 150 119 987, an hour 2 501 999, a day 104 249, a week
//! 14 892, a month 3 474, a year 285). Beyond it results are rounded, never errors, and never
//! admit more than the limit except where the exact usage is within relative 2^-53 of it.
//!
//! Expiry: every key the script writes gets a TTL of its state's remaining life (until it is
//! equivalent to a fresh one and any block has ended) plus one second of grace; a block on a
//! state of another algorithm only lengthens the TTL. Redis's expiry plays the part of the
//! memory store's sweep.

use crate::limiter::{Algorithm, Limit, Nanos, Outcome, RejectedHits};

/// The algorithms and `main(KEYS, ARGV)`, shared by both ways of running them.
const BODY: &str = include_str!("script.lua");

/// The script for EVAL/EVALSHA (Redis < 7): every call re-creates the helper functions. A
/// call without KEYS whose first argument is `B` is a batch (`main_batch`).
pub const SOURCE: &str = concat!(
    include_str!("script.lua"),
    "\nif #KEYS == 0 and ARGV[1] == 'B' then return main_batch(KEYS, ARGV) end\nreturn main(KEYS, ARGV)\n"
);

/// The same code as a Redis 7 function library (FUNCTION LOAD + FCALL): the helpers are
/// created once per load rather than once per call (about a third of the script's time),
/// and functions, unlike scripts, are replicated and persisted, so a promoted replica has
/// them. The name carries a digest of the code, so sidecars of two versions coexist during a
/// rolling upgrade instead of replacing each other's library.
#[derive(Debug, Clone)]
pub struct Library {
    /// The function to FCALL.
    pub function: String,
    /// The batch function (`main_batch`): many requests, keys in ARGV, any slots of one node.
    pub batch_function: String,
    /// The code to FUNCTION LOAD.
    pub code: String,
}

impl Library {
    pub fn new() -> Library {
        // FNV-1a: stable across builds and platforms.
        let mut fnv = crate::digest::Fnv64::new();
        fnv.write(BODY.as_bytes());
        let name = format!("ratethrottle_{:016x}", fnv.finish());
        Library {
            code: format!(
                "#!lua name={name}\n{BODY}\nredis.register_function('{name}', main)\n\
                 redis.register_function{{function_name='{name}_batch', callback=main_batch, \
                 flags={{'allow-cross-slot-keys'}}}}\n"
            ),
            batch_function: format!("{name}_batch"),
            function: name,
        }
    }
}

impl Default for Library {
    fn default() -> Self {
        Library::new()
    }
}

/// Suffix of the sliding window log's zset, after the hash tag so it shares the counter's slot.
const LOG_SUFFIX: &str = ":log";
const KEYS_PER_OP: usize = 2;
const REPLY_PER_OP: usize = 4;
/// The largest duration or instant sent, in µs: the script computes in doubles, exact below
/// 2^53, and saturates there ("never").
const MAX_US: u64 = (1 << 53) - 1;

/// The Redis key of a counter: `{prefix}{<32 lowercase hex digits of key>}` — the braces are the
/// cluster hash tag, so every key the script touches for one counter lives in one slot.
pub fn redis_key(prefix: &str, key: u128) -> String {
    format!("{prefix}{{{key:032x}}}")
}

/// One counter decision to send.
#[derive(Debug, Clone)]
pub struct ScriptOp {
    pub key: String,
    pub limit: Limit,
    pub hits: u32,
    pub shadow: bool,
    pub negative: bool,
}

/// The script's algorithm codes (see `script.lua`).
fn algorithm_code(a: Algorithm) -> u8 {
    match a {
        Algorithm::FixedWindow => 1,
        Algorithm::SlidingWindowLog => 2,
        Algorithm::SlidingWindowCounter => 3,
        Algorithm::TokenBucket => 4,
        Algorithm::LeakyBucket => 5,
        Algorithm::Gcra => 6,
    }
}

/// A script argument. Numbers go as integers, which the client writes straight into the
/// command buffer as RESP bulk strings (what the script's `ARGV` reads): no string is made
/// per argument. A batch of 90 requests had ~1,000 small `String`s before.
pub type Arg = fred::types::Value;

fn int(n: u64) -> Arg {
    // Every value sent is at most MAX_US (2^53 - 1) or a u32: it fits an i64.
    Arg::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

fn flag(b: bool) -> Arg {
    Arg::Integer(i64::from(b))
}

/// KEYS and ARGV for one EVALSHA over `ops` (all ops must share a hash slot in cluster mode; the caller groups them).
/// `now_us: None` makes the script read Redis's own clock (TIME) — production; tests pass a fixed time.
/// `Some(0)` means the same as `None` (0 is the script's "read TIME").
pub fn call_args(
    ops: &[ScriptOp],
    now_us: Option<u64>,
    rejected: RejectedHits,
) -> (Vec<String>, Vec<Arg>) {
    let mut keys = Vec::with_capacity(ops.len() * KEYS_PER_OP);
    let mut args = Vec::with_capacity(2 + ops.len() * 8);
    args.push(int(now_us.map_or(0, |n| n.min(MAX_US))));
    args.push(flag(rejected == RejectedHits::Counted));
    for op in ops {
        keys.push(op.key.clone());
        keys.push(format!("{}{LOG_SUFFIX}", op.key));
        push_op_args(&mut args, op);
    }
    (keys, args)
}

/// The 8 arguments of one op.
fn push_op_args(args: &mut Vec<Arg>, op: &ScriptOp) {
    let l = &op.limit;
    // Rounding the block up changes no decision at whole-microsecond instants:
    // `now_µs < start_µs + ceil(d / 1000)` iff `now_µs × 1000 < start_µs × 1000 + d`.
    let block_us = l.block_duration.div_ceil(1_000).min(MAX_US);
    args.extend([
        int(u64::from(algorithm_code(l.algorithm))),
        int(u64::from(l.requests_per_unit)),
        int(l.unit.seconds() * 1_000_000),
        int(u64::from(l.burst)),
        int(block_us),
        int(u64::from(op.hits)),
        flag(op.shadow),
        flag(op.negative),
    ]);
}

/// Why a reply could not be decoded: the script and this file disagree, or something other
/// than the script answered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScriptError {
    #[error("script reply has {got} integers, expected {expected} ({REPLY_PER_OP} per op)")]
    Length { expected: usize, got: usize },
    #[error("batch reply malformed at element {at}")]
    Batch { at: usize },
    #[error("script reply for op {op}: {field} = {value} is out of range")]
    Value {
        op: usize,
        field: &'static str,
        value: i64,
    },
}

/// Decodes the script's reply (a flat integer array) into one Outcome per op. `now` (nanoseconds, local clock) anchors
/// `expires_at` (= now + the script's expires-in), reset_after is converted µs → ns.
pub fn parse_reply(reply: &[i64], ops: usize, now: Nanos) -> Result<Vec<Outcome>, ScriptError> {
    let expected = ops.saturating_mul(REPLY_PER_OP);
    if reply.len() != expected {
        return Err(ScriptError::Length {
            expected,
            got: reply.len(),
        });
    }
    reply
        .chunks_exact(REPLY_PER_OP)
        .enumerate()
        .map(|(op, chunk)| {
            let field = |i: usize, name: &'static str, max: u64| -> Result<u64, ScriptError> {
                let value = chunk[i];
                u64::try_from(value)
                    .ok()
                    .filter(|v| *v <= max)
                    .ok_or(ScriptError::Value {
                        op,
                        field: name,
                        value,
                    })
            };
            let allowed = field(0, "allowed", 1)? == 1;
            let remaining =
                u32::try_from(field(1, "remaining", u64::from(u32::MAX))?).unwrap_or(u32::MAX);
            let reset_us = field(2, "reset_after", u64::MAX)?;
            let expires_us = field(3, "expires_in", u64::MAX)?;
            Ok(Outcome {
                allowed,
                remaining,
                reset_after: reset_us.saturating_mul(1_000),
                expires_at: now.saturating_add(expires_us.saturating_mul(1_000)),
            })
        })
        .collect()
}

/// ARGV of one `main_batch` call over many requests, each `(ops, now_us, rejected)` as for
/// [`call_args`] (ops of one request may be in any slots of the node; the call has no KEYS).
pub fn batch_args<'a>(
    requests: impl IntoIterator<Item = (&'a [ScriptOp], Option<u64>, RejectedHits)>,
) -> Vec<Arg> {
    let mut args = vec![Arg::from_static_str("B")];
    for (ops, now_us, rejected) in requests {
        args.push(int(now_us.map_or(0, |n| n.min(MAX_US))));
        args.push(flag(rejected == RejectedHits::Counted));
        args.push(int(ops.len() as u64));
        for op in ops {
            args.push(Arg::String(op.key.as_str().into()));
            push_op_args(&mut args, op);
        }
    }
    args
}

/// Redis error text that means the cluster's slot table we route by is out of date.
pub fn is_redirect_text(d: &str) -> bool {
    d.starts_with("MOVED") || d.starts_with("ASK") || d.starts_with("CLUSTERDOWN")
}

/// Why the script failed on one request of a batch, alone (the others in it were decided).
/// Classified here, where the reply is read, so callers match on a type, not on text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestFailure {
    /// A key's slot is served by another node now (resharding, failover): the slot table
    /// must be re-read; retrying on the right node may succeed.
    #[error("key slot moved: {0}")]
    SlotMoved(String),
    /// Anything else the script met on this request (e.g. WRONGTYPE: a key of another type).
    #[error("script error: {0}")]
    Script(String),
}

impl RequestFailure {
    /// The script's error text, classified.
    pub fn from_text(text: String) -> RequestFailure {
        if text.contains("non local key") || is_redirect_text(&text) {
            RequestFailure::SlotMoved(text)
        } else {
            RequestFailure::Script(text)
        }
    }
}

/// One request's answer in a batch reply: its outcomes, or the failure the script met on it
/// alone.
pub type BatchAnswer = Result<Vec<Outcome>, RequestFailure>;

/// Decodes a `main_batch` reply; `requests` gives each request's op count and `now`, in the
/// order sent. Err when the reply as a whole is malformed.
pub fn parse_batch_reply(
    reply: &[fred::types::Value],
    requests: impl IntoIterator<Item = (usize, Nanos)>,
) -> Result<Vec<BatchAnswer>, ScriptError> {
    use fred::types::Value;
    let mut at = 0;
    let mut answers = Vec::new();
    let shape = |at: usize| ScriptError::Batch { at };
    for (ops, now) in requests {
        match reply.get(at) {
            Some(Value::Integer(-1)) => {
                let text = reply
                    .get(at + 1)
                    .and_then(|v| v.as_str().map(|s| s.to_string()))
                    .ok_or(shape(at + 1))?;
                answers.push(Err(RequestFailure::from_text(text)));
                at += 2;
            }
            Some(Value::Integer(n)) if usize::try_from(*n).ok() == Some(ops * REPLY_PER_OP) => {
                let ints = reply
                    .get(at + 1..at + 1 + ops * REPLY_PER_OP)
                    .ok_or(shape(at + 1))?
                    .iter()
                    .map(|v| match v {
                        Value::Integer(i) => Ok(*i),
                        _ => Err(shape(at)),
                    })
                    .collect::<Result<Vec<i64>, _>>()?;
                answers.push(Ok(parse_reply(&ints, ops, now)?));
                at += 1 + ops * REPLY_PER_OP;
            }
            _ => return Err(shape(at)),
        }
    }
    if at != reply.len() {
        return Err(shape(at));
    }
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Unit;

    fn limit(algorithm: Algorithm) -> Limit {
        Limit {
            algorithm,
            requests_per_unit: 7,
            unit: Unit::Minute,
            burst: 3,
            block_duration: 1_500_001,
        }
    }

    #[test]
    fn key_is_prefix_and_hash_tagged_hex() {
        assert_eq!(
            redis_key("rl:", 0xab),
            "rl:{000000000000000000000000000000ab}"
        );
        assert_eq!(redis_key("", u128::MAX), format!("{{{}}}", "f".repeat(32)));
    }

    /// Arguments as the script's ARGV reads them.
    fn texts(args: &[Arg]) -> Vec<String> {
        args.iter().map(|a| a.as_string().unwrap()).collect()
    }

    #[test]
    fn call_args_encode_every_op_with_its_log_key() {
        let ops = [
            ScriptOp {
                key: redis_key("p", 1),
                limit: limit(Algorithm::SlidingWindowLog),
                hits: 2,
                shadow: true,
                negative: false,
            },
            ScriptOp {
                key: redis_key("p", 2),
                limit: Limit {
                    block_duration: 0,
                    ..limit(Algorithm::Gcra)
                },
                hits: 0,
                shadow: false,
                negative: true,
            },
        ];
        let (keys, args) = call_args(&ops, Some(1_700_000_000_123_456), RejectedHits::Counted);
        let k1 = redis_key("p", 1);
        let k2 = redis_key("p", 2);
        assert_eq!(
            keys,
            [
                k1.clone(),
                format!("{k1}:log"),
                k2.clone(),
                format!("{k2}:log")
            ]
        );
        // The log key keeps the hash tag: the text between the first `{` and `}` is the same.
        assert!(keys[1].ends_with("}:log"));
        assert_eq!(
            texts(&args),
            [
                "1700000000123456",
                "1",
                "2",
                "7",
                "60000000",
                "3",
                "1501",
                "2",
                "1",
                "0",
                "6",
                "7",
                "60000000",
                "3",
                "0",
                "0",
                "0",
                "1"
            ]
        );
    }

    #[test]
    fn call_args_clock_mode_and_extremes() {
        let op = ScriptOp {
            key: "k".into(),
            limit: Limit {
                block_duration: u64::MAX,
                requests_per_unit: u32::MAX,
                burst: u32::MAX,
                unit: Unit::Year,
                ..limit(Algorithm::FixedWindow)
            },
            hits: u32::MAX,
            shadow: false,
            negative: false,
        };
        let (_, args) = call_args(std::slice::from_ref(&op), None, RejectedHits::Free);
        let args = texts(&args);
        assert_eq!(args[0], "0");
        assert_eq!(args[1], "0");
        assert_eq!(args[3], "4294967295");
        assert_eq!(args[4], "31536000000000");
        assert_eq!(args[6], MAX_US.to_string());
        assert_eq!(args[7], "4294967295");
        let (_, args) = call_args(&[op], Some(u64::MAX), RejectedHits::Free);
        assert_eq!(texts(&args)[0], MAX_US.to_string());
        let (keys, args) = call_args(&[], Some(5), RejectedHits::Free);
        assert!(keys.is_empty());
        assert_eq!(texts(&args), ["5", "0"]);
    }

    #[test]
    fn every_algorithm_has_a_distinct_code() {
        let codes: std::collections::BTreeSet<u8> =
            Algorithm::ALL.into_iter().map(algorithm_code).collect();
        assert_eq!(codes, (1..=6).collect());
    }

    #[test]
    fn reply_decodes_to_outcomes_in_nanoseconds() {
        let now = 1_000_000_000_000;
        let out = parse_reply(&[1, 4, 0, 250, 0, 0, 1_500, 2_000_000], 2, now).unwrap();
        assert_eq!(
            out,
            [
                Outcome {
                    allowed: true,
                    remaining: 4,
                    reset_after: 0,
                    expires_at: now + 250_000,
                },
                Outcome {
                    allowed: false,
                    remaining: 0,
                    reset_after: 1_500_000,
                    expires_at: now + 2_000_000_000,
                },
            ]
        );
        assert_eq!(parse_reply(&[], 0, now).unwrap(), []);
        // Durations past u64 nanoseconds saturate rather than wrap.
        let far = parse_reply(&[0, 0, i64::MAX, i64::MAX], 1, u64::MAX - 5).unwrap();
        assert_eq!(far[0].reset_after, u64::MAX);
        assert_eq!(far[0].expires_at, u64::MAX);
        let full = parse_reply(&[1, i64::from(u32::MAX), 0, 0], 1, 0).unwrap();
        assert_eq!(full[0].remaining, u32::MAX);
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert_eq!(
            parse_reply(&[1, 2, 3], 1, 0),
            Err(ScriptError::Length {
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            parse_reply(&[1, 2, 3, 4], 2, 0),
            Err(ScriptError::Length {
                expected: 8,
                got: 4
            })
        );
        let bad = |reply: &[i64], field, value| {
            assert_eq!(
                parse_reply(reply, reply.len() / 4, 0),
                Err(ScriptError::Value {
                    op: reply.len() / 4 - 1,
                    field,
                    value
                }),
                "{reply:?}"
            );
        };
        bad(&[2, 0, 0, 0], "allowed", 2);
        bad(&[-1, 0, 0, 0], "allowed", -1);
        bad(&[1, 0, 0, 0, 1, -3, 0, 0], "remaining", -3);
        bad(&[1, 1 << 32, 0, 0], "remaining", 1 << 32);
        bad(&[1, 0, -1, 0], "reset_after", -1);
        bad(&[1, 0, 0, -7], "expires_in", -7);
        assert!(
            ScriptError::Length {
                expected: 4,
                got: 3
            }
            .to_string()
            .contains("expected 4")
        );
    }

    #[test]
    fn batch_args_carry_each_request_with_its_clock_and_keys() {
        let a = ScriptOp {
            key: redis_key("p", 1),
            limit: limit(Algorithm::FixedWindow),
            hits: 1,
            shadow: false,
            negative: false,
        };
        let b = ScriptOp {
            key: redis_key("p", 2),
            ..a.clone()
        };
        let one = [a.clone()];
        let two = [a, b];
        let args = batch_args([
            (&one[..], Some(5), RejectedHits::Free),
            (&two[..], None, RejectedHits::Counted),
        ]);
        let k1 = redis_key("p", 1);
        let k2 = redis_key("p", 2);
        let op = ["1", "7", "60000000", "3", "1501", "1", "0", "0"];
        let mut want: Vec<&str> = vec!["B", "5", "0", "1", &k1];
        want.extend(op);
        want.extend(["0", "1", "2", &k1]);
        want.extend(op);
        want.push(&k2);
        want.extend(op);
        assert_eq!(texts(&args), want);
    }

    #[test]
    fn batch_reply_decodes_per_request_answers_and_errors() {
        use fred::types::Value;
        let int = Value::Integer;
        let reply = [
            int(4),
            int(1),
            int(4),
            int(0),
            int(250),
            int(-1),
            Value::String("WRONGTYPE Operation against a key".into()),
            int(8),
            int(1),
            int(0),
            int(0),
            int(0),
            int(0),
            int(0),
            int(7),
            int(9),
        ];
        let answers = parse_batch_reply(&reply, [(1, 10), (3, 10), (2, 20)]).unwrap();
        assert_eq!(answers.len(), 3);
        assert_eq!(answers[0].as_ref().unwrap()[0].expires_at, 10 + 250_000);
        assert!(matches!(
            answers[1].as_ref().unwrap_err(),
            RequestFailure::Script(t) if t.starts_with("WRONGTYPE")
        ));
        let third = answers[2].as_ref().unwrap();
        assert_eq!(third[1].reset_after, 7_000);
        assert_eq!(third[1].expires_at, 20 + 9_000);
        // A request count that disagrees, a short reply, a trailing element: malformed.
        assert!(parse_batch_reply(&reply, [(2, 0)]).is_err());
        assert!(parse_batch_reply(&reply[..3], [(1, 0)]).is_err());
        assert!(parse_batch_reply(&reply, [(1, 0), (3, 0)]).is_err());
    }

    #[test]
    fn a_failure_on_one_request_is_classified_where_it_is_read() {
        for moved in [
            "MOVED 3999 127.0.0.1:6381",
            "ASK 3999 127.0.0.1:6381",
            "CLUSTERDOWN The cluster is down",
            "ERR Script attempted to access a non local key in a cluster node script: main_batch",
        ] {
            let f = RequestFailure::from_text(moved.into());
            assert_eq!(f, RequestFailure::SlotMoved(moved.into()), "{moved}");
        }
        let f = RequestFailure::from_text("WRONGTYPE Operation against a key".into());
        assert_eq!(
            f.to_string(),
            "script error: WRONGTYPE Operation against a key"
        );
    }

    #[test]
    fn source_is_the_script() {
        assert!(SOURCE.contains("ratethrottle"));
        assert!(SOURCE.contains("redis.call"));
    }
}
