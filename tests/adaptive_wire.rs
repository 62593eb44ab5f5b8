//! Adaptive limits through real processes: a caller's factor moves with its behaviour on one
//! replica, and a second replica on the same Redis applies the same factor to it (ShouldRateLimit
//! reports the effective limit in `current_limit`); `explain` shows the trust and the factor.
//! Run with the test Redis up: `bash scripts/test.sh cargo test --test adaptive_wire`.
#![allow(clippy::unwrap_used)]

mod support;

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use std::time::Duration;
use support::redis::{cluster_url, standalone_url, unique_prefix};
use support::{Sidecar, eventually, http_with, request};

const TOKEN: &str = "t0ken-for-tests";

fn settings(storage: &str, prefix: &str) -> String {
    format!(
        "settings:\n  admin_token: {TOKEN}\n  storage: \"{storage}\"\n  redis:\n    prefix: \"{prefix}\"\n\
         anomaly:\n  warmup: 1s\n  volume_from: should_rate_limit\n  \
         trust: {{history_requests: 20, window: 1s}}\n\
         domains:\n  - domain: api\n    descriptors:\n      - key: remote_address\n        \
         descriptors:\n          - key: identity\n            rate_limit: {{unit: hour, \
         requests_per_unit: 1000, adaptive: {{min_factor: 0.5, max_factor: 2}}}}\n"
    )
}

fn ask(identity: &str) -> RateLimitRequest {
    request(
        "api",
        &[&[("remote_address", "10.2.0.1"), ("identity", identity)]],
    )
}

async fn limit_on(s: &Sidecar, identity: &str) -> u32 {
    let mut c = s.client().await;
    let r = c
        .should_rate_limit(ask(identity))
        .await
        .unwrap()
        .into_inner();
    r.statuses[0]
        .current_limit
        .as_ref()
        .map(|l| l.requests_per_unit)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_redis_apply_the_same_factor_to_the_same_caller() {
    let prefix = unique_prefix("adaptive");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.yaml");
    std::fs::write(&path, settings(&standalone_url(), &prefix)).unwrap();
    let a = Sidecar::start(Some(&path), &[]);
    let b = Sidecar::start(Some(&path), &[]);
    // A new caller gets the initial factor (1.0) on both.
    assert_eq!(limit_on(&a, "user:steady").await, 1000);
    assert_eq!(limit_on(&b, "user:fresh").await, 1000);
    // A steady, never-limited caller on replica A only, 20 a second.
    let mut client = a.client().await;
    let steady = tokio::spawn(async move {
        for _ in 0..80 {
            for _ in 0..4 {
                client.should_rate_limit(ask("user:steady")).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Replica B, which never saw the caller, raises its limit: the factor came through Redis.
    eventually(
        Duration::from_secs(20),
        "replica B applies A's factor",
        || async { limit_on(&b, "user:steady").await > 1300 },
    )
    .await;
    steady.await.unwrap();
    // Quiet now: within a poll both report exactly the same effective limit.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (la, lb) = (
        limit_on(&a, "user:steady").await,
        limit_on(&b, "user:steady").await,
    );
    assert_eq!(la, lb);
    assert!(la > 1300 && la <= 2000, "{la}");
    // A caller nobody saw still has the base limit on both.
    assert_eq!(limit_on(&a, "user:other").await, 1000);
    // explain on B: trust in force from Redis, the limit's factor, B's own state unknown.
    let auth = format!("Bearer {TOKEN}");
    let (code, body) = http_with(
        b.admin,
        "GET",
        "/v1/anomaly/explain?key=user:steady",
        "",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    let t = &j["trust"];
    assert_eq!(t["shared_through_redis"], true, "{j}");
    assert!(t["in_force"].as_f64().unwrap() > 0.65, "{j}");
    // B saw only this test's probes of the caller: far less evidence than A.
    let b_requests = t["local"]["requests"].as_f64().unwrap_or(0.0);
    let limit = &t["adaptive_limits"][0];
    assert_eq!(limit["requests_per_unit"], 1000, "{j}");
    assert_eq!(limit["effective_requests_per_unit"], u64::from(lb), "{j}");
    // On A the same caller is known, with its inputs.
    let (_, body) = http_with(
        a.admin,
        "GET",
        "/v1/anomaly/explain?key=user:steady",
        "",
        &[("authorization", &auth)],
    )
    .await;
    let j: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(j["trust"]["local"]["known"], true, "{j}");
    let a_requests = j["trust"]["local"]["requests"].as_f64().unwrap();
    assert!(a_requests > 100.0 && a_requests > 4.0 * b_requests, "{j}");
    assert_eq!(j["trust"]["local"]["bad_share"], 0.0, "{j}");
    // The factor is counted in metrics on both replicas' tables.
    let (_, metrics) = b.get("/metrics").await;
    let entries = metrics
        .lines()
        .find(|l| l.starts_with("ratethrottle_adaptive_table_entries "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(entries.is_some_and(|n| n >= 1), "{metrics}");
}

fn algorithms() -> [&'static str; 6] {
    ratethrottle::limiter::Algorithm::ALL.map(|a| a.as_str())
}

/// The effective limit is what every algorithm enforces on every store: 4 an hour (a bucket
/// of 4) at
/// `initial_factor` 0.5 (no `anomaly:` block, so every caller keeps it) admits exactly 2, and
/// `current_limit` says 2 — on memory, Redis and a Redis Cluster (where the script gets the
/// scaled limit as its argument).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_enforces_the_scaled_limit_on_memory_redis_and_cluster() {
    let mut rules = String::new();
    for a in algorithms() {
        // Buckets hold `burst` (leaky_bucket's default is 1: smooth); 4, scaled to 2 here.
        let burst = if a.ends_with("bucket") || a == "gcra" {
            ", burst: 4"
        } else {
            ""
        };
        rules += &format!(
            "      - key: algorithm\n        value: {a}\n        descriptors:\n          - key: identity\n            \
             rate_limit: {{unit: hour, requests_per_unit: 4, algorithm: {a}{burst}, \
             adaptive: {{min_factor: 0.25, max_factor: 2, initial_factor: 0.5}}}}\n"
        );
    }
    for (store, storage) in [
        ("memory", "memory".to_string()),
        ("redis", standalone_url()),
        ("cluster", cluster_url()),
    ] {
        let prefix = unique_prefix("adaptive-algorithms");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings.yaml");
        std::fs::write(
            &path,
            format!(
                "settings:\n  storage: \"{storage}\"\n  redis:\n    prefix: \"{prefix}\"\n\
                 domains:\n  - domain: api\n    descriptors:\n{rules}"
            ),
        )
        .unwrap();
        let sc = Sidecar::start(Some(&path), &[]);
        let mut c = sc.client().await;
        for a in algorithms() {
            let mut codes = Vec::new();
            for _ in 0..3 {
                let r = c
                    .should_rate_limit(request(
                        "api",
                        &[&[("algorithm", a), ("identity", "user:scaled")]],
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                let limit = r.statuses[0]
                    .current_limit
                    .as_ref()
                    .map(|l| l.requests_per_unit);
                assert_eq!(limit, Some(2), "{store} {a}: current_limit");
                codes.push(r.overall_code);
            }
            assert_eq!(codes, [1, 1, 2], "{store} {a}: OK, OK, OVER_LIMIT");
        }
    }
}

/// A replica that joins reads the shared trust table in pages (HSCAN, ~20k entries a poll),
/// never one reply of the whole table, and misses nothing written while it was reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_replica_loads_a_large_trust_table_in_pages_and_misses_no_change() {
    use ratethrottle::anomaly::TrustTable;
    use ratethrottle::runtime::adaptive::{RedisTrust, TrustSink};
    use std::sync::Arc;
    // Its own server: 30,000 writes in Lua would hold up the shared one past other tests'
    // 15 ms deadlines.
    let mut server = support::redis::RedisServer::start(&[]);
    let config = fred::types::config::Config::from_url(&server.url()).unwrap();
    // Reconnecting, like the sidecar's own pool: the server is restarted below.
    let pool = fred::types::Builder::from_config(config)
        .set_policy(fred::types::config::ReconnectPolicy::new_constant(0, 100))
        .build_pool(2)
        .unwrap();
    fred::interfaces::ClientLike::init(&pool).await.unwrap();
    let prefix = unique_prefix("trust-pages");
    let sink =
        |table: Arc<TrustTable>| TrustSink::Redis(RedisTrust::new(pool.clone(), &prefix, table));
    const CALLERS: u64 = 30_000;
    // Keys are identity hashes in production: spread them like hashes (the table's buckets
    // and tags assume it), in a table big enough that none is evicted.
    let key = |i: u64| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()) | 1;
    let now = 1_800_000_000_000u64;
    let writer = sink(Arc::new(TrustTable::new(1 << 20)));
    let all: Vec<_> = (1..=CALLERS)
        .map(|i| (key(i), Some((i % 1000) as u16), 100.0))
        .collect();
    writer.publish(&all, now).await.unwrap();

    let table = Arc::new(TrustTable::new(1 << 20));
    let reader = sink(table.clone());
    let first = reader.poll().await.unwrap();
    assert!(
        first > 0 && first < CALLERS as usize,
        "one poll read {first} of {CALLERS}: not paged"
    );
    // Written while the reader is part-way through its load.
    writer
        .publish(&[(key(7), Some(999), 1e9)], now + 2_000)
        .await
        .unwrap();
    let mut polls = 1;
    let mut read = first;
    loop {
        let n = reader.poll().await.unwrap();
        polls += 1;
        read += n;
        if n == 0 || polls > 20 {
            break;
        }
    }
    assert!(
        (3..20).contains(&polls),
        "{polls} polls: paged, and caught up (a poll that reads nothing new)"
    );
    assert!(read >= CALLERS as usize, "{read} entries read");
    for i in (1..=CALLERS).filter(|i| *i != 7) {
        assert_eq!(
            table.get(key(i), now),
            Some((i % 1000) as u16),
            "caller {i}"
        );
    }
    assert_eq!(
        table.get(key(7), now),
        Some(999),
        "the change made during the load"
    );
    // Redis starts over empty (no persistence): its change sequence restarts below the
    // reader's. The reader notices, reloads, and reads what is written from then on.
    server.restart();
    let mut fresh = Vec::new();
    for _ in 0..50 {
        if writer
            .publish(&[(key(8), Some(555), 1e9)], now + 10_000)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        fresh.push(reader.poll().await);
        if table.get(key(8), now) == Some(555) {
            break;
        }
    }
    assert_eq!(
        table.get(key(8), now),
        Some(555),
        "after Redis lost its data: {fresh:?}"
    );
}
