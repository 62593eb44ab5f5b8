//! Coalescing against real servers: requests in flight to one Redis node at once go out as
//! one batch script call, and stay exact — many concurrent requests on one key admit exactly
//! the limit (standalone and Cluster), a batch spanning keys of every algorithm decides as
//! the memory store does, a request the script fails on (a key of another type) fails alone,
//! and a Redis paused or killed under load leaves no request waiting.

mod support;

use ratethrottle::config::{FailureMode, Settings};
use ratethrottle::limiter::{Algorithm, Limit, NANOS_PER_SECOND, RejectedHits, Unit};
use ratethrottle::storage::redis::BatchRequest;
use ratethrottle::storage::redis::script::{ScriptOp, redis_key};
use ratethrottle::storage::{CounterOp, MemoryStore, Storage, StorageError};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use support::redis::{RedisServer, cli, unique_prefix};

const NOW: u64 = 1_800_000_000 * NANOS_PER_SECOND;

fn limit(algorithm: Algorithm, n: u32) -> Limit {
    Limit {
        algorithm,
        requests_per_unit: n,
        unit: Unit::Hour,
        burst: n,
        block_duration: 0,
    }
}

const ALGORITHMS: [Algorithm; 6] = Algorithm::ALL;

async fn store(url: &str, test: &str, timeout: Duration, mode: FailureMode) -> Arc<Storage> {
    let mut settings = Settings::default();
    settings.redis.prefix = unique_prefix(test);
    settings.redis.timeout = timeout.as_nanos() as u64;
    settings.redis.failure_mode = mode;
    match Storage::connect(url, &settings).await.expect("storage") {
        Storage::Redis(r) => {
            assert!(!r.health().is_degraded(), "{:?}", r.health().last_error());
            Arc::new(Storage::Redis(r.with_client_clock()))
        }
        Storage::Memory(_) => panic!("not Redis"),
    }
}

/// `tasks` tasks × `each` requests, every request the ops `make(task)` returns, all at
/// `NOW`; returns per task how many requests were admitted, and how many failed.
async fn hammer(
    storage: &Arc<Storage>,
    tasks: usize,
    each: usize,
    make: impl Fn(usize) -> Vec<CounterOp>,
) -> (Vec<u32>, u32) {
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let storage = storage.clone();
            let ops = make(t);
            tokio::spawn(async move {
                let (mut admitted, mut failed) = (0, 0);
                for _ in 0..each {
                    let mut ops = ops.clone();
                    match storage
                        .check_and_update(&mut ops, NOW, RejectedHits::Free)
                        .await
                    {
                        Ok(()) => {
                            let all = ops.iter().all(|o| o.outcome.expect("decided").allowed);
                            admitted += u32::from(all);
                        }
                        Err(_) => failed += 1,
                    }
                }
                (admitted, failed)
            })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut failed = 0;
    for h in handles {
        let (a, f) = h.await.expect("task");
        admitted.push(a);
        failed += f;
    }
    (admitted, failed)
}

fn coalesced(storage: &Storage) -> (u64, u64) {
    let h = storage.health().expect("redis");
    (h.batches.load(Relaxed), h.batched.load(Relaxed))
}

async fn one_hot_key_admits_exactly_the_limit(url: &str, test: &str) {
    let storage = store(url, test, Duration::from_secs(5), FailureMode::Deny).await;
    let hot = limit(Algorithm::FixedWindow, 500);
    let (admitted, failed) =
        hammer(&storage, 64, 12, |_| vec![CounterOp::new(7, hot, 1, false)]).await;
    assert_eq!(failed, 0);
    assert_eq!(admitted.iter().sum::<u32>(), 500, "768 requests, limit 500");
    let (batches, batched) = coalesced(&storage);
    assert!(
        batches > 0 && batched > batches,
        "requests were coalesced: {batched} requests in {batches} batch calls"
    );
    let commands = storage.health().expect("redis").commands.load(Relaxed);
    assert!(commands < 768, "{commands} calls for 768 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_key_admit_exactly_the_limit() {
    one_hot_key_admits_exactly_the_limit(&support::redis::standalone_url(), "hot").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_key_admit_exactly_the_limit_on_a_cluster() {
    one_hot_key_admits_exactly_the_limit(&support::redis::cluster_url(), "hot-cluster").await;
}

/// Requests of every algorithm (one per key, and requests holding two algorithms at once)
/// coalesced together admit what the memory store admits for the same requests.
async fn batches_across_algorithms_decide_as_memory(url: &str, test: &str) {
    let storage = store(url, test, Duration::from_secs(5), FailureMode::Deny).await;
    // Task t: its own key with algorithm t % 6 and limit 5 + t; tasks 12.. hold two ops
    // (keys 100 + t and 200 + t, two algorithms), all-or-nothing.
    let make = |t: usize| -> Vec<CounterOp> {
        let a = ALGORITHMS[t % 6];
        let n = 5 + t as u32;
        if t < 12 {
            vec![CounterOp::new(t as u128, limit(a, n), 1, false)]
        } else {
            vec![
                CounterOp::new(100 + t as u128, limit(a, n), 1, false),
                CounterOp::new(
                    200 + t as u128,
                    limit(ALGORITHMS[(t + 1) % 6], n - 2),
                    1,
                    false,
                ),
            ]
        }
    };
    let tasks = 24;
    let each = 40;
    let (admitted, failed) = hammer(&storage, tasks, each, make).await;
    assert_eq!(failed, 0);
    let memory = MemoryStore::new(1_000_000);
    for (t, got) in admitted.iter().enumerate() {
        let mut want = 0;
        for _ in 0..each {
            let mut ops = make(t);
            memory.check_and_update(&mut ops, NOW, RejectedHits::Free);
            want += u32::from(ops.iter().all(|o| o.outcome.expect("decided").allowed));
        }
        assert_eq!(*got, want, "task {t} ({:?})", ALGORITHMS[t % 6]);
    }
    let (batches, batched) = coalesced(&storage);
    assert!(batches > 0 && batched > batches, "{batched} in {batches}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spanning_algorithms_decides_as_memory() {
    batches_across_algorithms_decide_as_memory(&support::redis::standalone_url(), "algos").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spanning_algorithms_and_slots_decides_as_memory_on_a_cluster() {
    batches_across_algorithms_decide_as_memory(&support::redis::cluster_url(), "algos-cluster")
        .await;
}

fn op(prefix: &str, key: u128, l: Limit) -> ScriptOp {
    ScriptOp {
        key: redis_key(prefix, key),
        limit: l,
        hits: 1,
        shadow: false,
        negative: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_script_fails_on_fails_alone() {
    let server = RedisServer::start(&[]);
    let prefix = unique_prefix("bad");
    let mut settings = Settings::default();
    settings.redis.prefix = prefix.clone();
    let Storage::Redis(redis) = Storage::connect(&server.url(), &settings)
        .await
        .expect("storage")
    else {
        panic!("not Redis")
    };
    // Counter 2's key holds a string: every command the script sends on it is WRONGTYPE.
    let bad_key = redis_key(&prefix, 2);
    server.cli(&["set", &bad_key, "not a hash"]);
    let fixed = limit(Algorithm::FixedWindow, 2);
    let request = |ops: Vec<ScriptOp>| BatchRequest {
        ops,
        rejected: RejectedHits::Free,
        now: NOW,
    };
    let requests = [
        request(vec![op(&prefix, 1, fixed)]),
        request(vec![op(&prefix, 2, fixed)]),
        request(vec![op(&prefix, 1, fixed)]),
        // Two ops, one on the bad key: the request fails as a whole, writing nothing.
        request(vec![
            op(&prefix, 3, limit(Algorithm::Gcra, 2)),
            op(&prefix, 2, limit(Algorithm::TokenBucket, 2)),
        ]),
        request(vec![op(&prefix, 1, fixed)]),
        request(vec![op(&prefix, 3, limit(Algorithm::Gcra, 2))]),
    ];
    let answers = redis.decide_batch(&requests).await.expect("the batch call");
    assert_eq!(answers.len(), 6);
    let allowed = |i: usize| -> (bool, u32) {
        let o = answers[i].as_ref().expect("answered")[0];
        (o.allowed, o.remaining)
    };
    // Counter 1, limit 2, in order: admitted, admitted, rejected.
    assert_eq!(allowed(0), (true, 1));
    assert_eq!(allowed(2), (true, 0));
    assert_eq!(allowed(4), (false, 0));
    for i in [1, 3] {
        match &answers[i] {
            Err(StorageError::Unavailable(e)) => assert!(e.contains("WRONGTYPE"), "{e}"),
            other => panic!("request {i}: {other:?}"),
        }
    }
    // The failed two-op request consumed nothing on counter 3: its GCRA still has both.
    assert_eq!(allowed(5), (true, 1));
    assert_eq!(server.cli(&["type", &bad_key]).trim(), "string");
    let h = redis.health();
    assert_eq!((h.batches.load(Relaxed), h.batched.load(Relaxed)), (1, 6));
}

/// Redis paused (DEBUG SLEEP), then killed, under coalesced load: every request gets an
/// answer — Redis's, or the failure mode's (`deny` here) — and none is left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_answers_every_request_by_the_failure_mode() {
    let mut server = RedisServer::start(&[]);
    let storage = store(
        &server.url(),
        "fail",
        Duration::from_millis(150),
        FailureMode::Deny,
    )
    .await;
    let health = {
        let storage = storage.clone();
        tokio::spawn(async move {
            if let Some(r) = storage.redis() {
                r.watch_health().await
            }
        })
    };
    let generous = limit(Algorithm::FixedWindow, 1_000_000);
    // Each task keeps deciding until Redis is gone (plus a little), however fast the
    // machine: a fixed count could all finish before the pause on a quiet machine.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run = |storage: Arc<Storage>| {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut by_redis, mut by_failure_mode) = (0u32, 0u32);
            let mut i = 0u32;
            while !stop.load(Relaxed) {
                i = i.wrapping_add(1);
                let mut ops = vec![CounterOp::new(u128::from(i % 4), generous, 1, false)];
                match storage
                    .check_and_update(&mut ops, NOW, RejectedHits::Free)
                    .await
                {
                    Ok(()) => {
                        assert!(ops[0].outcome.expect("decided").allowed);
                        by_redis += 1;
                    }
                    Err(_) => {
                        assert!(ops[0].outcome.is_none(), "a failed op has no outcome yet");
                        storage.answer_failure(&mut ops, NOW, RejectedHits::Free);
                        assert!(!ops[0].outcome.expect("failure mode").allowed, "deny");
                        by_failure_mode += 1;
                    }
                }
                tokio::task::yield_now().await;
            }
            (by_redis, by_failure_mode)
        })
    };
    let load: Vec<_> = (0..48).map(|_| run(storage.clone())).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Pause: Redis answers nothing for 0.6 s, mid-batch.
    let port = server.port;
    let pause = std::thread::spawn(move || cli(port, &["debug", "sleep", "0.6"]));
    tokio::time::sleep(Duration::from_millis(900)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Relaxed);
    let mut totals = (0, 0);
    for task in load {
        // Liveness, not speed: a request left waiting would hang here.
        let (r, f) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every request answered")
            .expect("task");
        totals.0 += r;
        totals.1 += f;
    }
    let _ = pause.join();
    health.abort();
    assert!(totals.0 > 0, "Redis decided some before the pause");
    assert!(totals.1 > 0, "the failure mode answered the rest");
    let (batches, batched) = coalesced(&storage);
    assert!(batches > 0 && batched > batches, "{batched} in {batches}");
}

/// The batch function keeps a fixed-window key's state for the whole call and writes it once
/// at the end: one batch of requests — most on one hot key, with a two-op request and a
/// negative one on that key in the middle (the general path, which must read what the batch
/// wrote so far), looks (0 hits), counted rejections, another algorithm — answers every
/// request and leaves every hash exactly as the same requests sent one per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_batch_decides_and_writes_as_the_same_requests_one_per_call() {
    let storage = store(
        &support::redis::standalone_url(),
        "hot-batch",
        Duration::from_secs(5),
        FailureMode::Deny,
    )
    .await;
    let redis = storage.redis().expect("redis");
    let fixed = limit(Algorithm::FixedWindow, 6);
    let gcra = limit(Algorithm::Gcra, 4);
    let bucket = limit(Algorithm::TokenBucket, 3);
    // (ops as (key, limit, hits, negative), rejected hits)
    type Spec = (Vec<(u128, Limit, u32, bool)>, RejectedHits);
    let one = |hits: u32| -> Spec { (vec![(1, fixed, hits, false)], RejectedHits::Free) };
    let mut specs: Vec<Spec> = Vec::new();
    specs.extend((0..3).map(|_| one(1)));
    specs.push((
        vec![(1, fixed, 1, false), (2, gcra, 1, false)],
        RejectedHits::Free,
    ));
    specs.push(one(0));
    specs.extend((0..4).map(|_| one(1)));
    specs.push((vec![(1, fixed, 1, false)], RejectedHits::Counted));
    specs.push((vec![(1, fixed, 2, true)], RejectedHits::Free));
    specs.push((vec![(3, bucket, 1, false)], RejectedHits::Free));
    specs.extend((0..3).map(|_| one(1)));
    specs.push((vec![(1, fixed, 3, false)], RejectedHits::Counted));
    specs.push(one(1));
    let requests = |prefix: &str| -> Vec<BatchRequest> {
        specs
            .iter()
            .map(|(ops, rejected)| BatchRequest {
                ops: ops
                    .iter()
                    .map(|&(key, l, hits, negative)| ScriptOp {
                        hits,
                        negative,
                        ..op(prefix, key, l)
                    })
                    .collect(),
                rejected: *rejected,
                now: NOW,
            })
            .collect()
    };
    let (batched, alone) = (unique_prefix("hot-b"), unique_prefix("hot-a"));
    let in_one = redis
        .decide_batch(&requests(&batched))
        .await
        .expect("the batch call");
    let mut one_by_one = Vec::new();
    for r in requests(&alone) {
        let mut answer = redis.decide_batch(&[r]).await.expect("a call");
        one_by_one.push(answer.pop().expect("one answer"));
    }
    assert_eq!(in_one.len(), specs.len());
    for (i, (a, b)) in in_one.iter().zip(&one_by_one).enumerate() {
        let (a, b) = (a.as_ref().expect("answered"), b.as_ref().expect("answered"));
        assert_eq!(a, b, "request {i}: {:?}", specs[i]);
    }
    let admitted = in_one
        .iter()
        .filter(|a| a.as_ref().is_ok_and(|o| o.iter().all(|o| o.allowed)))
        .count();
    assert!(
        admitted > 3 && admitted < specs.len(),
        "some admitted, some not: {admitted}"
    );
    let url = support::redis::standalone_url();
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').split('/').next()?.parse().ok())
        .expect("standalone port");
    for key in [1u128, 2, 3] {
        let state = |prefix: &str| {
            let mut fields: Vec<String> = cli(port, &["hgetall", &redis_key(prefix, key)])
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
                .chunks(2)
                .map(|kv| kv.join("="))
                .collect();
            fields.sort();
            fields
        };
        let ttl = |prefix: &str| -> i64 {
            cli(port, &["pttl", &redis_key(prefix, key)])
                .trim()
                .parse()
                .expect("pttl")
        };
        assert_eq!(state(&batched), state(&alone), "key {key}");
        assert!(!state(&batched).is_empty(), "key {key} written");
        let (tb, ta) = (ttl(&batched), ttl(&alone));
        assert!(
            tb > 0 && (tb - ta).abs() < 5_000,
            "key {key}: pttl {tb} vs {ta}"
        );
    }
}
