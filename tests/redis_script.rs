//! The Redis script against the Rust limiter it mirrors.
//!
//! Differential: random sequences (fixed seeds) of single-op calls through `Limit` on a
//! `CounterState` and through the script at the same whole-microsecond instants, and random
//! batches through a reference of the batch contract; decisions must be equal and times the
//! limiter's rounded up to the microsecond. Plus the batch rules spelled out, key expiry, the
//! Redis clock, and limits beyond the script's exact range.
//!
//! Needs a Redis: `RATETHROTTLE_TEST_REDIS_URL`, set by `bash scripts/test.sh`. Every test uses
//! its own key prefix, so tests share the server and never flush it.
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::*;
use ratethrottle::limiter::{
    AlgoState, Algorithm, CounterState, Limit, NANOS_PER_SECOND, Outcome, RejectedHits, Unit,
};
use ratethrottle::storage::redis::script::{SOURCE, ScriptOp, call_args, parse_reply, redis_key};

const ALL: [Algorithm; 6] = Algorithm::ALL;

/// How much longer than its state a key lives (`GRACE_MS` in the script).
const GRACE_MS: i64 = 1_000;

fn redis_url() -> String {
    std::env::var("RATETHROTTLE_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "RATETHROTTLE_TEST_REDIS_URL is not set: run the tests with `bash scripts/test.sh`, which starts Redis"
        )
    })
}

/// A connection with the script loaded and a key prefix of its own.
struct Redis {
    client: Client,
    sha: String,
    prefix: String,
}

async fn redis(test: &str) -> Redis {
    let config = Config::from_url(&redis_url()).expect("RATETHROTTLE_TEST_REDIS_URL");
    let client = Client::new(config, None, None, None);
    client.init().await.expect("connect to Redis");
    let sha: String = client.script_load(SOURCE).await.expect("SCRIPT LOAD");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    Redis {
        client,
        sha,
        prefix: format!("t:script:{test}:{nanos:x}:"),
    }
}

impl Redis {
    fn key(&self, k: u128) -> String {
        redis_key(&self.prefix, k)
    }

    async fn raw(&self, ops: &[ScriptOp], now_us: Option<u64>, mode: RejectedHits) -> Vec<i64> {
        let (keys, args) = call_args(ops, now_us, mode);
        self.client
            .evalsha(&self.sha, keys, args)
            .await
            .expect("EVALSHA")
    }

    /// One script call at `now_us` (µs); outcomes in the limiter's nanoseconds.
    async fn call(&self, ops: &[ScriptOp], now_us: u64, mode: RejectedHits) -> Vec<Outcome> {
        let reply = self.raw(ops, Some(now_us), mode).await;
        parse_reply(&reply, ops.len(), now_us * 1_000).expect("script reply")
    }

    async fn pttl(&self, key: &str) -> i64 {
        self.client.pttl(key).await.expect("PTTL")
    }

    async fn exists(&self, key: &str) -> bool {
        let n: i64 = self.client.exists(key).await.expect("EXISTS");
        n == 1
    }

    /// What a counter's two keys hold, to compare before and after a call.
    async fn snapshot(&self, key: &str) -> (Vec<(String, String)>, Vec<(String, f64)>) {
        let mut hash: Vec<(String, String)> = self
            .client
            .hgetall::<HashMap<String, String>, _>(key)
            .await
            .expect("HGETALL")
            .into_iter()
            .collect();
        hash.sort();
        let log: Vec<(String, f64)> = self
            .client
            .zrange(format!("{key}:log"), 0, -1, None, false, None, true)
            .await
            .expect("ZRANGE");
        (hash, log)
    }
}

fn op(key: &str, limit: Limit, hits: u32) -> ScriptOp {
    ScriptOp {
        key: key.to_string(),
        limit,
        hits,
        shadow: false,
        negative: false,
    }
}

fn limit(algorithm: Algorithm, l: u32, unit: Unit, burst: u32) -> Limit {
    Limit {
        algorithm,
        requests_per_unit: l,
        unit,
        burst,
        block_duration: 0,
    }
}

/// The script's "never": durations saturate at 2^53 − 1 µs (285 years), in nanoseconds.
const NEVER_NS: u64 = ((1 << 53) - 1) * 1_000;

/// A duration in nanoseconds rounded up to whole microseconds, back in nanoseconds: what the
/// script reports for the limiter's `d`.
fn up_to_us(d: u64) -> u64 {
    d.div_ceil(1_000).saturating_mul(1_000).min(NEVER_NS)
}

/// The script's outcome at `now` (whole µs, in ns) must be the limiter's, with times rounded
/// up to the microsecond.
fn same(got: Outcome, want: Outcome, now: u64) -> bool {
    got.allowed == want.allowed
        && got.remaining == want.remaining
        && got.reset_after == up_to_us(want.reset_after)
        && got.expires_at - now == up_to_us(want.expires_at - now)
}

/// SplitMix64: a small deterministic generator, so every run plays the same cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn upto(&mut self, n: u64) -> u64 {
        self.below(n + 1)
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// A random limit of `algorithm`, biased to small numbers where limits are reached, with
/// blocks (of durations that are not whole microseconds) and limits that admit nothing.
/// `long`: a unit of a day or more, with numbers small enough that a bucket's level stays in
/// the exact range across changes between those units (burst × 15 330 days < 2^53 µs).
fn random_limit(rng: &mut Rng, algorithm: Algorithm, long: bool) -> Limit {
    if long {
        let unit = rng.pick(&[Unit::Day, Unit::Week, Unit::Month, Unit::Year]);
        let l = rng.below(7) as u32;
        return Limit {
            algorithm,
            requests_per_unit: l,
            unit,
            burst: if rng.chance(2) {
                algorithm.default_burst(l).min(6)
            } else {
                rng.below(7) as u32
            },
            block_duration: 0,
        };
    }
    let l = match rng.below(8) {
        0..=3 => 1 + rng.below(5) as u32,
        4 | 5 => 1 + rng.below(20) as u32,
        6 => 1 + rng.below(1_000) as u32,
        _ => rng.below(3) as u32,
    };
    let unit = rng.pick(&[
        Unit::Second,
        Unit::Second,
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
    ]);
    let burst = match rng.below(6) {
        0 => 0,
        1 | 2 => algorithm.default_burst(l),
        _ => 1 + rng.below(u64::from(l.max(1)) * 2) as u32,
    };
    let block_duration = if rng.chance(4) {
        1 + rng.below(2 * unit.nanos())
    } else {
        0
    };
    Limit {
        algorithm,
        requests_per_unit: l,
        unit,
        burst,
        block_duration,
    }
}

/// The next instant in µs: mostly forwards, onto the instants where things happen (window
/// boundaries, emission intervals), sometimes backwards (a clock that stepped back).
fn step(rng: &mut Rng, now_us: u64, lim: &Limit) -> u64 {
    let w = lim.unit.seconds() * 1_000_000;
    let interval = (w / u64::from(lim.requests_per_unit.max(1))).max(1);
    let dt = match rng.below(10) {
        0 | 1 => 0,
        2 => 1 + rng.below(3),
        3 => w,
        4 => w - 1,
        5 => interval,
        6 => interval + 1,
        7 => rng.upto(2 * interval),
        8 => rng.upto(2 * w),
        _ => return now_us.saturating_sub(rng.upto(interval.min(w))),
    };
    now_us + dt
}

fn random_hits(rng: &mut Rng, lim: &Limit) -> u32 {
    match rng.below(8) {
        0 => 0,
        1..=5 => 1 + rng.below(3) as u32,
        _ => rng.upto(u64::from(lim.requests_per_unit.max(lim.burst)) + 1) as u32,
    }
}

/// A start instant in µs: a window boundary for every unit, or anywhere in 2000–2040.
fn random_start(rng: &mut Rng) -> u64 {
    if rng.chance(2) {
        // 2011-12-21, the least common multiple of every unit's length.
        1_324_512_000_000_000 * (1 + rng.below(2))
    } else {
        946_684_800_000_000 + rng.below(1_262_304_000_000_000)
    }
}

/// `sequences` sequences of 100 single-op calls, each on its own key, against the limiter on
/// one `CounterState`: looks, refunds (negative ops: refund, then a look, as the memory store
/// does), blocks, both modes of rejected hits, clock steps back, and, one op in `change`, a
/// rule change (new rate, unit, burst or block; now and then another algorithm) on the key.
///
/// One sequence in eight uses long units (a day to a year) and Free only: levels then stay
/// below a burst, inside the exact range (Counted debt in years would leave it).
async fn differential(
    algorithm: Algorithm,
    mode: RejectedHits,
    seed: u64,
    change: u64,
    sequences: u128,
) {
    let r = redis(&format!("diff-{}-{mode:?}", algorithm.as_str())).await;
    let mut rng = Rng(seed);
    let ops_per_sequence = 100;
    let mut keys_written = Vec::new();
    for seq in 0..sequences {
        let key = r.key(seq);
        let long = rng.chance(8);
        let mode = if long { RejectedHits::Free } else { mode };
        let mut lim = random_limit(&mut rng, algorithm, long);
        let mut st = CounterState::default();
        let mut now_us = random_start(&mut rng);
        let mut history = Vec::new();
        for i in 0..ops_per_sequence {
            // A rule change: new numbers for the algorithm, or another algorithm.
            if rng.chance(change) {
                lim = random_limit(&mut rng, lim.algorithm, long);
            } else if rng.chance(40) {
                let other = rng.pick(&ALL);
                lim = random_limit(&mut rng, other, long);
            }
            now_us = step(&mut rng, now_us, &lim);
            let now = now_us * 1_000;
            let hits = random_hits(&mut rng, &lim);
            let negative = rng.chance(8);
            let rejected = if !long && rng.chance(10) {
                match mode {
                    RejectedHits::Free => RejectedHits::Counted,
                    RejectedHits::Counted => RejectedHits::Free,
                }
            } else {
                mode
            };
            let want = if negative {
                lim.refund(&mut st, now, hits);
                lim.check_and_update(&mut st, now, 0, rejected)
            } else {
                lim.check_and_update(&mut st, now, hits, rejected)
            };
            let sop = ScriptOp {
                negative,
                ..op(&key, lim, hits)
            };
            let got = r.call(std::slice::from_ref(&sop), now_us, rejected).await[0];
            history.push(format!(
                "{i}: now_us {now_us} {lim:?} hits {hits} negative {negative} {rejected:?} \
                 -> want {want:?}"
            ));
            assert!(
                same(got, want, now),
                "seed {seed} sequence {seq}: got {got:?}\nhistory:\n{}\nstate {st:?}",
                history.join("\n")
            );
            keys_written.extend(call_args(&[sop], None, mode).0);
        }
    }
    // Every key the script wrote carries a TTL.
    keys_written.sort();
    keys_written.dedup();
    for key in keys_written {
        let ttl = r.pttl(&key).await;
        assert!(ttl == -2 || ttl > 0, "{key} has PTTL {ttl}");
    }
}

#[tokio::test]
async fn fixed_window_matches_the_limiter() {
    differential(Algorithm::FixedWindow, RejectedHits::Free, 11, 15, 10).await;
    differential(Algorithm::FixedWindow, RejectedHits::Counted, 12, 15, 10).await;
}

#[tokio::test]
async fn sliding_window_log_matches_the_limiter() {
    differential(Algorithm::SlidingWindowLog, RejectedHits::Free, 21, 15, 10).await;
    differential(
        Algorithm::SlidingWindowLog,
        RejectedHits::Counted,
        22,
        15,
        10,
    )
    .await;
}

#[tokio::test]
async fn sliding_window_counter_matches_the_limiter() {
    differential(
        Algorithm::SlidingWindowCounter,
        RejectedHits::Free,
        31,
        15,
        10,
    )
    .await;
    differential(
        Algorithm::SlidingWindowCounter,
        RejectedHits::Counted,
        32,
        15,
        10,
    )
    .await;
}

#[tokio::test]
async fn token_bucket_matches_the_limiter() {
    differential(Algorithm::TokenBucket, RejectedHits::Free, 41, 15, 10).await;
    differential(Algorithm::TokenBucket, RejectedHits::Counted, 42, 15, 10).await;
}

#[tokio::test]
async fn leaky_bucket_matches_the_limiter() {
    differential(Algorithm::LeakyBucket, RejectedHits::Free, 51, 15, 10).await;
    differential(Algorithm::LeakyBucket, RejectedHits::Counted, 52, 15, 10).await;
}

#[tokio::test]
async fn gcra_matches_the_limiter() {
    differential(Algorithm::Gcra, RejectedHits::Free, 61, 15, 10).await;
    differential(Algorithm::Gcra, RejectedHits::Counted, 62, 15, 10).await;
}

/// Rule changes on live keys, every few ops: the bucket levels and GCRA's TAT carried across
/// units and rates round exactly as the limiter's.
#[tokio::test]
async fn rule_changes_on_live_keys_match_the_limiter() {
    for (i, algorithm) in ALL.into_iter().enumerate() {
        differential(algorithm, RejectedHits::Counted, 70 + i as u64, 3, 5).await;
    }
}

/// One op of a reference batch: which of the few keys, and the op.
#[derive(Debug, Clone)]
struct BatchOp {
    key: u128,
    limit: Limit,
    hits: u32,
    shadow: bool,
    negative: bool,
}

/// The batch contract on plain `CounterState`s: ops in order; with Free, a rejection by an
/// op that is neither shadow nor negative restores every state, replays the refunds and the
/// blocks started, and reports the admitted ops as looks at the final states.
fn reference_batch(
    states: &mut HashMap<u128, CounterState>,
    ops: &[BatchOp],
    now: u64,
    mode: RejectedHits,
) -> Vec<Outcome> {
    let original = states.clone();
    let mut out = Vec::new();
    let mut blocks = vec![None; ops.len()];
    let mut reject = false;
    for (i, op) in ops.iter().enumerate() {
        let st = states.entry(op.key).or_default();
        if op.negative {
            op.limit.refund(st, now, op.hits);
            out.push(op.limit.check_and_update(st, now, 0, mode));
            continue;
        }
        let before = st.blocked_until;
        let o = op.limit.check_and_update(st, now, op.hits, mode);
        if st.blocked_until != before {
            blocks[i] = Some(st.blocked_until);
        }
        reject |= !o.allowed && !op.shadow;
        out.push(o);
    }
    if reject && mode == RejectedHits::Free {
        *states = original;
        for (op, block) in ops.iter().zip(&blocks) {
            let st = states.entry(op.key).or_default();
            if op.negative {
                op.limit.refund(st, now, op.hits);
            } else if let Some(until) = block {
                st.blocked_until = *until;
            }
        }
        for (op, o) in ops.iter().zip(out.iter_mut()) {
            if !op.negative && op.hits > 0 && o.allowed {
                let st = states.entry(op.key).or_default();
                *o = op.limit.check_and_update(st, now, 0, mode);
            }
        }
    }
    out
}

/// Random batches of 1–4 ops over 3 keys (same-key ops, mixed algorithms, shadow and negative
/// ops) against the reference batch.
#[tokio::test]
async fn batches_match_the_reference() {
    batches_seeded(7).await;
}

async fn batches_seeded(seed: u64) {
    let r = redis("batches").await;
    let mut rng = Rng(seed);
    for seq in 0..12u128 {
        let mode = if seq % 2 == 0 {
            RejectedHits::Free
        } else {
            RejectedHits::Counted
        };
        let limits: Vec<Limit> = (0..3)
            .map(|_| {
                let algorithm = rng.pick(&ALL);
                random_limit(&mut rng, algorithm, false)
            })
            .collect();
        let mut states = HashMap::new();
        let mut now_us = random_start(&mut rng);
        for i in 0..60 {
            now_us = step(&mut rng, now_us, &limits[0]);
            let n = 1 + rng.below(4) as usize;
            let ops: Vec<BatchOp> = (0..n)
                .map(|_| {
                    let k = rng.below(3) as usize;
                    // Mostly the key's own limit; sometimes another algorithm on it.
                    let limit = if rng.chance(6) {
                        limits[rng.below(3) as usize]
                    } else {
                        limits[k]
                    };
                    BatchOp {
                        key: seq * 8 + k as u128,
                        limit,
                        hits: random_hits(&mut rng, &limit),
                        shadow: rng.chance(5),
                        negative: rng.chance(8),
                    }
                })
                .collect();
            let want = reference_batch(&mut states, &ops, now_us * 1_000, mode);
            let script_ops: Vec<ScriptOp> = ops
                .iter()
                .map(|o| ScriptOp {
                    key: r.key(o.key),
                    limit: o.limit,
                    hits: o.hits,
                    shadow: o.shadow,
                    negative: o.negative,
                })
                .collect();
            let got = r.call(&script_ops, now_us, mode).await;
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    same(*g, *w, now_us * 1_000),
                    "seed {seed} sequence {seq} batch {i} op {j} at {now_us} µs ({mode:?}): got \
                     {g:?} want {w:?}\nops {ops:#?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_enforced_rejection_rolls_back_the_ops_admitted_before_it() {
    let r = redis("rollback").await;
    let now_us = 1_700_000_000_000_000;
    for (i, algorithm) in ALL.into_iter().enumerate() {
        let wide = r.key(2 * i as u128);
        let tight = r.key(2 * i as u128 + 1);
        let wide_limit = limit(algorithm, 10, Unit::Minute, 10);
        let tight_limit = limit(Algorithm::FixedWindow, 1, Unit::Minute, 1);
        let both = [op(&wide, wide_limit, 2), op(&tight, tight_limit, 1)];
        let out = r.call(&both, now_us, RejectedHits::Free).await;
        assert!(out.iter().all(|o| o.allowed), "{algorithm:?}: {out:?}");
        assert_eq!(out[0].remaining, 8);
        let before = r.snapshot(&wide).await;
        // The tight counter is used up: the request is rejected and consumes nothing.
        let out = r.call(&both, now_us + 1, RejectedHits::Free).await;
        assert!(!out[1].allowed);
        assert!(out[0].allowed, "reported as a look at the restored counter");
        assert_eq!(out[0].remaining, 8, "{algorithm:?}");
        assert_eq!(
            r.snapshot(&wide).await,
            before,
            "{algorithm:?}: nothing written"
        );
        let look = r
            .call(&[op(&wide, wide_limit, 0)], now_us + 1, RejectedHits::Free)
            .await;
        assert_eq!(look[0].remaining, 8, "{algorithm:?}");
        // Counted keeps every hit.
        let out = r.call(&both, now_us + 2, RejectedHits::Counted).await;
        assert!(!out[1].allowed);
        assert_eq!(out[0].remaining, 6, "{algorithm:?}");
    }
}

#[tokio::test]
async fn a_shadow_rejection_rolls_nothing_back() {
    let r = redis("shadow").await;
    let now_us = 1_700_000_000_000_000;
    let (a, b) = (r.key(1), r.key(2));
    let wide = limit(Algorithm::TokenBucket, 10, Unit::Hour, 10);
    let none = limit(Algorithm::FixedWindow, 0, Unit::Hour, 0);
    let ops = [
        op(&a, wide, 3),
        ScriptOp {
            shadow: true,
            ..op(&b, none, 1)
        },
    ];
    let out = r.call(&ops, now_us, RejectedHits::Free).await;
    assert!(out[0].allowed);
    assert!(!out[1].allowed);
    assert_eq!(out[0].remaining, 7);
    let look = r.call(&[op(&a, wide, 0)], now_us, RejectedHits::Free).await;
    assert_eq!(look[0].remaining, 7);
}

#[tokio::test]
async fn a_rolled_back_call_keeps_its_refunds_and_the_blocks_it_started() {
    let r = redis("keeps").await;
    let now_us = 1_700_000_000_000_000;
    let (a, b, c) = (r.key(1), r.key(2), r.key(3));
    let counter = limit(Algorithm::SlidingWindowLog, 5, Unit::Minute, 5);
    let blocking = Limit {
        block_duration: 30 * NANOS_PER_SECOND,
        ..limit(Algorithm::FixedWindow, 1, Unit::Second, 1)
    };
    r.call(&[op(&a, counter, 4)], now_us, RejectedHits::Free)
        .await;
    r.call(&[op(&b, blocking, 1)], now_us, RejectedHits::Free)
        .await;
    let ops = [
        op(&c, counter, 1),
        ScriptOp {
            negative: true,
            ..op(&a, counter, 3)
        },
        op(&b, blocking, 1),
    ];
    let out = r.call(&ops, now_us + 10, RejectedHits::Free).await;
    assert!(out[0].allowed);
    assert_eq!(out[0].remaining, 5, "c rolled back");
    assert_eq!(out[1].remaining, 4, "a refunded");
    assert!(!out[2].allowed);
    assert_eq!(out[2].reset_after, 30 * NANOS_PER_SECOND);
    // Two seconds on, the fixed window is new but the block holds.
    let later = now_us + 2_000_000;
    let out = r
        .call(&[op(&b, blocking, 0)], later, RejectedHits::Free)
        .await;
    assert!(!out[0].allowed);
    assert_eq!(out[0].reset_after, 28 * NANOS_PER_SECOND + 10_000);
    let out = r
        .call(&[op(&a, counter, 0)], later, RejectedHits::Free)
        .await;
    assert_eq!(out[0].remaining, 4);
    assert!(!r.exists(&c).await, "nothing was written for c");
}

/// A rule that moves a log key to another algorithm drops the log, like the limiter; moving
/// back starts a fresh log.
#[tokio::test]
async fn switching_algorithm_starts_fresh_and_drops_the_log() {
    let r = redis("switch").await;
    let now_us = 1_700_000_000_000_000;
    let k = r.key(1);
    let log = limit(Algorithm::SlidingWindowLog, 5, Unit::Minute, 5);
    let fixed = limit(Algorithm::FixedWindow, 5, Unit::Minute, 5);
    let mut st = CounterState::default();
    for (lim, hits, dt) in [
        (log, 3, 0),
        (fixed, 0, 1),
        (fixed, 1, 2),
        (log, 0, 3),
        (log, 1, 4),
    ] {
        let now = now_us + dt;
        let want = lim.check_and_update(&mut st, now * 1_000, hits, RejectedHits::Free);
        let got = r.call(&[op(&k, lim, hits)], now, RejectedHits::Free).await[0];
        assert!(
            same(got, want, now * 1_000),
            "{lim:?} {hits}: {got:?} vs {want:?}"
        );
        if lim.algorithm == Algorithm::FixedWindow && hits > 0 {
            assert!(!r.exists(&format!("{k}:log")).await, "the log is dropped");
        }
    }
    assert_eq!(r.snapshot(&k).await.1.len(), 1, "one fresh entry");
}

#[tokio::test]
async fn ops_on_one_key_see_each_other() {
    let r = redis("same-key").await;
    let now_us = 1_700_000_000_000_000;
    let k = r.key(1);
    let lim = limit(Algorithm::Gcra, 3, Unit::Second, 3);
    let out = r
        .call(
            &[op(&k, lim, 1), op(&k, lim, 1), op(&k, lim, 1)],
            now_us,
            RejectedHits::Counted,
        )
        .await;
    let remaining: Vec<u32> = out.iter().map(|o| o.remaining).collect();
    assert_eq!(remaining, [2, 1, 0]);
}

/// Every key a write touches has a TTL covering its state (and no more than the grace past
/// it); a key whose state is fresh again is gone once that has passed on Redis's clock.
#[tokio::test]
async fn written_keys_expire_with_their_state() {
    let r = redis("ttl").await;
    let now_us = 1_700_000_000_000_000;
    for (i, algorithm) in ALL.into_iter().enumerate() {
        let k = r.key(i as u128);
        let lim = limit(algorithm, 2, Unit::Minute, 2);
        let out = r.call(&[op(&k, lim, 1)], now_us, RejectedHits::Free).await;
        let lives_ms = (out[0].expires_at - now_us * 1_000).div_ceil(1_000_000) as i64;
        let ttl = r.pttl(&k).await;
        assert!(
            ttl > lives_ms - 1_000 && ttl <= lives_ms + GRACE_MS,
            "{algorithm:?}: PTTL {ttl}, state lives {lives_ms} ms"
        );
        let log_ttl = r.pttl(&format!("{k}:log")).await;
        if algorithm == Algorithm::SlidingWindowLog {
            assert!(
                log_ttl > 0 && log_ttl <= lives_ms + GRACE_MS,
                "log PTTL {log_ttl}"
            );
        } else {
            assert_eq!(log_ttl, -2, "{algorithm:?} writes no log");
        }
        // A block lengthens it.
        let blocking = Limit {
            block_duration: 3_600 * NANOS_PER_SECOND,
            ..lim
        };
        r.call(&[op(&k, blocking, 5)], now_us, RejectedHits::Free)
            .await;
        assert!(r.pttl(&k).await > 3_599_000, "{algorithm:?}");
    }

    // On Redis's clock: a one-second state is gone within about a second plus the grace.
    let (fixed, log) = (r.key(100), r.key(101));
    let second = |a| limit(a, 5, Unit::Second, 5);
    for (k, a) in [
        (&fixed, Algorithm::FixedWindow),
        (&log, Algorithm::SlidingWindowLog),
    ] {
        let reply = r
            .raw(&[op(k, second(a), 1)], None, RejectedHits::Free)
            .await;
        assert_eq!(reply[0], 1);
        assert!(r.exists(k).await);
    }
    assert!(r.exists(&format!("{log}:log")).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for k in [fixed.clone(), log.clone(), format!("{log}:log")] {
        while r.exists(&k).await {
            assert!(tokio::time::Instant::now() < deadline, "{k} never expired");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn without_a_time_the_script_reads_redis_time() {
    let r = redis("time").await;
    let k = r.key(1);
    let lim = limit(Algorithm::TokenBucket, 2, Unit::Hour, 2);
    let (keys, args) = call_args(&[op(&k, lim, 2)], None, RejectedHits::Free);
    assert_eq!(args[0].as_string().as_deref(), Some("0"));
    let reply: Vec<i64> = r.client.evalsha(&r.sha, keys, args).await.expect("EVALSHA");
    let local = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    let out = parse_reply(&reply, 1, local).expect("reply");
    assert!(out[0].allowed);
    assert_eq!(out[0].remaining, 0);
    assert_eq!(out[0].reset_after, 1_800 * NANOS_PER_SECOND);
    let out = r.raw(&[op(&k, lim, 1)], None, RejectedHits::Free).await;
    let out = parse_reply(&out, 1, local).expect("reply");
    assert!(!out[0].allowed);
    // A few microseconds of Redis's clock have passed since.
    let reset = out[0].reset_after;
    assert!(reset <= 1_800 * NANOS_PER_SECOND && reset > 1_790 * NANOS_PER_SECOND);
    // The state was written at Redis's time: a call at an explicit time far later sees it gone.
    let far = (local / 1_000) + 3_600_000_000;
    let out = r.call(&[op(&k, lim, 0)], far, RejectedHits::Free).await;
    assert_eq!(out[0].remaining, 2);
}

/// Limits that admit nothing, and limits far beyond the exact range: no errors, and never
/// more admitted than the limit.
#[tokio::test]
async fn degenerate_and_huge_limits_are_safe() {
    let r = redis("extremes").await;
    let now_us = 1_700_000_000_123_456;
    for (i, algorithm) in ALL.into_iter().enumerate() {
        // Nothing admitted, nothing recorded, the block still applies.
        let k = r.key(i as u128);
        let none = Limit {
            block_duration: 5 * NANOS_PER_SECOND,
            ..limit(algorithm, 0, Unit::Minute, 0)
        };
        let mut st = CounterState::default();
        for (dt, hits) in [(0, 0), (0, 1), (1, 0), (6_000_000, 0), (6_000_000, 3)] {
            let now = now_us + dt;
            let want = none.check_and_update(&mut st, now * 1_000, hits, RejectedHits::Counted);
            let got = r
                .call(&[op(&k, none, hits)], now, RejectedHits::Counted)
                .await[0];
            assert!(
                same(got, want, now * 1_000),
                "{algorithm:?}: {got:?} vs {want:?}"
            );
        }
        assert!(matches!(st.algo, AlgoState::Fresh));

        // The largest limit there is, for a year: beyond the exact range of every algorithm
        // but the fixed window.
        let k = r.key(100 + i as u128);
        let huge = limit(algorithm, u32::MAX, Unit::Year, u32::MAX);
        for mode in [RejectedHits::Free, RejectedHits::Counted] {
            let mut st = CounterState::default();
            let mut admitted = 0u64;
            for (j, hits) in [u32::MAX - 1, 0, 1, 1, u32::MAX, 0, 7]
                .into_iter()
                .enumerate()
            {
                let now = now_us + j as u64;
                let want = huge.check_and_update(&mut st, now * 1_000, hits, mode);
                let got = r.call(&[op(&k, huge, hits)], now, mode).await[0];
                if got.allowed {
                    admitted += u64::from(hits);
                }
                assert!(admitted <= u64::from(u32::MAX), "{algorithm:?} {mode:?}");
                assert_eq!(got.allowed, want.allowed, "{algorithm:?} {mode:?} op {j}");
                assert!(
                    got.remaining.abs_diff(want.remaining) <= 1,
                    "{algorithm:?} {mode:?} op {j}: {got:?} vs {want:?}"
                );
            }
            r.client.del::<i64, _>(&k).await.expect("DEL");
        }
    }
}

#[tokio::test]
async fn malformed_calls_are_errors_not_crashes() {
    let r = redis("malformed").await;
    let bad: Result<Vec<i64>, _> = r
        .client
        .evalsha(&r.sha, vec![r.key(1)], vec!["0", "0", "1"])
        .await;
    assert!(bad.is_err());
    let none: Vec<i64> = r
        .client
        .evalsha(&r.sha, Vec::<String>::new(), vec!["0", "0"])
        .await
        .expect("an empty batch is fine");
    assert!(none.is_empty());
}
