//! The Redis store against real servers: key layout and TTLs, two sidecar processes sharing
//! one limit, every failure mode with Redis killed and brought back, a missed deadline,
//! a flushed script cache, authentication, and a cluster master killed under load.

mod support;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;
use support::redis::{RedisCluster, RedisServer, cli, unique_prefix};
use support::{Sidecar, eventually, request};

fn settings_file(storage: &str, prefix: &str, extra_redis: &str, rules: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "settings:\n  storage: \"{storage}\"\n  redis:\n    prefix: \"{prefix}\"\n{extra_redis}domains:\n{rules}"
    );
    std::fs::write(dir.path().join("ratethrottle.yaml"), yaml).expect("write");
    dir
}

const RULES: &str = "  - domain: r\n    descriptors:\n      - key: k\n        rate_limit: {unit: hour, requests_per_unit: 100}\n      - key: log\n        rate_limit: {unit: minute, requests_per_unit: 5, algorithm: sliding_window_log}\n";

async fn ask(sc: &Sidecar, key: &str, value: &str) -> (i32, u32) {
    let mut c = sc.client().await;
    let r = c
        .should_rate_limit(request("r", &[&[(key, value)]]))
        .await
        .expect("answered")
        .into_inner();
    (r.overall_code, r.statuses[0].limit_remaining)
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("port")
}

#[tokio::test]
async fn keys_have_the_documented_layout_and_a_ttl() {
    let url = support::redis::standalone_url();
    let prefix = unique_prefix("layout");
    let dir = settings_file(&url, &prefix, "", RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    assert_eq!(ask(&sc, "k", "a").await.1, 99);
    assert_eq!(ask(&sc, "log", "a").await.1, 4);
    let port = port_of(&url);
    let keys = cli(port, &["--scan", "--pattern", &format!("{prefix}*")]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert!(!keys.is_empty());
    for key in &keys {
        // prefix + {32 hex digits} (+ suffix): the braces are the cluster hash tag.
        let rest = key.strip_prefix(prefix.as_str()).expect("prefix");
        assert!(
            rest.starts_with('{') && rest[1..].find('}') == Some(32),
            "{key}"
        );
        let ttl: i64 = cli(port, &["pttl", key]).trim().parse().expect("pttl");
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
    }
}

#[tokio::test]
async fn two_sidecars_never_admit_more_than_the_limit_together() {
    let url = support::redis::standalone_url();
    let prefix = unique_prefix("race");
    let rules = "  - domain: r\n    descriptors:\n      - key: k\n        rate_limit: {unit: hour, requests_per_unit: 300}\n";
    let dir = settings_file(&url, &prefix, "    timeout: 2s\n", rules);
    let a = Sidecar::start(Some(dir.path()), &[]);
    let b = Sidecar::start(Some(dir.path()), &[]);
    let admitted = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for sc in [&a, &b] {
        for _ in 0..8 {
            let mut client = sc.client().await;
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let r = client
                        .should_rate_limit(request("r", &[&[("k", "hot")]]))
                        .await
                        .expect("answered")
                        .into_inner();
                    if r.overall_code == Code::Ok as i32 {
                        admitted.fetch_add(1, Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    // 800 attempts from two processes at one key of limit 300.
    assert_eq!(admitted.load(Relaxed), 300);
    let (_, m) = a.get("/metrics").await;
    assert!(m.contains("ratethrottle_storage_degraded 0"), "{m}");
}

/// Starts a sidecar on a private Redis with the given failure mode.
fn sidecar_on(redis: &RedisServer, mode: &str, test: &str) -> (Sidecar, tempfile::TempDir) {
    let extra = format!("    failure_mode: {mode}\n    timeout: 200ms\n");
    let dir = settings_file(&redis.url(), &unique_prefix(test), &extra, RULES);
    (Sidecar::start(Some(dir.path()), &[]), dir)
}

async fn degraded(sc: &Sidecar) -> bool {
    sc.get("/metrics")
        .await
        .1
        .contains("ratethrottle_storage_degraded 1")
}

#[tokio::test]
async fn redis_down_with_failure_mode_allow() {
    let mut redis = RedisServer::start(&[]);
    let (sc, _dir) = sidecar_on(&redis, "allow", "allow");
    assert_eq!(ask(&sc, "log", "x").await.1, 4);
    redis.kill();
    for _ in 0..10 {
        assert_eq!(ask(&sc, "log", "x").await.0, Code::Ok as i32);
    }
    assert!(degraded(&sc).await);
    let (code, body) = sc.get("/readyz").await;
    assert_eq!(code, 200, "allow keeps the replica ready");
    assert!(body.contains("degraded"), "{body}");
    redis.restart();
    eventually(Duration::from_secs(15), "recovered", || async {
        !degraded(&sc).await
    })
    .await;
    // Redis came back empty: counting resumes there without a restart.
    assert_eq!(ask(&sc, "log", "x").await, (Code::Ok as i32, 4));
}

#[tokio::test]
async fn redis_down_with_failure_mode_deny() {
    let mut redis = RedisServer::start(&[]);
    let (sc, _dir) = sidecar_on(&redis, "deny", "deny");
    assert_eq!(ask(&sc, "k", "x").await.0, Code::Ok as i32);
    redis.kill();
    for _ in 0..5 {
        assert_eq!(ask(&sc, "k", "x").await.0, Code::OverLimit as i32);
    }
    assert_eq!(sc.get("/readyz").await.0, 503);
    redis.restart();
    eventually(Duration::from_secs(15), "recovered", || async {
        ask(&sc, "k", "x").await.0 == Code::Ok as i32
    })
    .await;
    assert_eq!(sc.get("/readyz").await.0, 200);
}

#[tokio::test]
async fn redis_down_with_failure_mode_local() {
    let mut redis = RedisServer::start(&[]);
    let (mut sc, _dir) = sidecar_on(&redis, "local", "local");
    redis.kill();
    // The in-memory limiter enforces the same rule meanwhile.
    let mut codes = Vec::new();
    for _ in 0..7 {
        codes.push(ask(&sc, "log", "y").await);
    }
    let ok = Code::Ok as i32;
    let over = Code::OverLimit as i32;
    assert_eq!(
        codes,
        vec![
            (ok, 4),
            (ok, 3),
            (ok, 2),
            (ok, 1),
            (ok, 0),
            (over, 0),
            (over, 0)
        ]
    );
    assert!(sc.stderr().contains("Redis degraded"));
    let (_, m) = sc.get("/metrics").await;
    assert!(
        !m.contains("ratethrottle_redis_failure_mode_answers_total 0"),
        "{m}"
    );
    redis.restart();
    eventually(Duration::from_secs(15), "recovered", || async {
        !degraded(&sc).await
    })
    .await;
    assert_eq!(ask(&sc, "log", "y").await, (ok, 4));
    assert!(sc.child_alive());
}

#[tokio::test]
async fn a_missed_deadline_is_answered_by_the_failure_mode() {
    let redis = RedisServer::start(&[]);
    let (sc, _dir) = sidecar_on(&redis, "deny", "deadline");
    assert_eq!(ask(&sc, "k", "x").await.0, Code::Ok as i32);
    // Redis stops answering commands for two seconds; the sidecar answers within its 200 ms.
    redis.cli(&["client", "pause", "2000", "all"]);
    let started = std::time::Instant::now();
    assert_eq!(ask(&sc, "k", "x").await.0, Code::OverLimit as i32);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered by the deadline, not by Redis"
    );
    eventually(Duration::from_secs(15), "recovered", || async {
        ask(&sc, "k", "x").await.0 == Code::Ok as i32
    })
    .await;
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded() {
    let redis = RedisServer::start(&[]);
    let (sc, _dir) = sidecar_on(&redis, "deny", "noscript");
    assert_eq!(ask(&sc, "k", "x").await, (Code::Ok as i32, 99));
    redis.cli(&["script", "flush"]);
    redis.cli(&["function", "flush"]);
    assert_eq!(ask(&sc, "k", "x").await, (Code::Ok as i32, 98));
    assert!(!degraded(&sc).await);
}

#[tokio::test]
async fn password_and_sentinel_urls() {
    let prefix = unique_prefix("auth");
    let dir = settings_file(
        &support::redis::auth_url(),
        &prefix,
        "    failure_mode: deny\n    timeout: 2s\n",
        RULES,
    );
    let sc = Sidecar::start(Some(dir.path()), &[]);
    assert_eq!(ask(&sc, "k", "x").await, (Code::Ok as i32, 99));

    let wrong = support::redis::auth_url().replace("s3cret", "wrong");
    let dir = settings_file(
        &wrong,
        &prefix,
        "    failure_mode: deny\n    timeout: 200ms\n",
        RULES,
    );
    let sc = Sidecar::start(Some(dir.path()), &[]);
    assert_eq!(ask(&sc, "k", "x").await.0, Code::OverLimit as i32);
    assert!(degraded(&sc).await);
    assert!(
        !sc.stderr().contains("wrong"),
        "password must not be logged"
    );

    let dir = settings_file(
        &support::redis::sentinel_url(),
        &prefix,
        "    timeout: 2s\n",
        RULES,
    );
    let sc = Sidecar::start(Some(dir.path()), &[]);
    assert_eq!(ask(&sc, "k", "x").await, (Code::Ok as i32, 99));
}

#[tokio::test]
async fn cluster_failover_under_load() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("cluster");
    let prefix = unique_prefix("failover");
    let rules = "  - domain: r\n    descriptors:\n      - key: k\n        rate_limit: {unit: hour, requests_per_unit: 1000000}\n";
    let dir = settings_file(
        &cluster.url(),
        &prefix,
        "    failure_mode: local\n    timeout: 300ms\n",
        rules,
    );
    let mut sc = Sidecar::start(Some(dir.path()), &[]);

    let answered = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut client = sc.client().await;
        let answered = answered.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Relaxed) {
                i += 1;
                let value = format!("v{t}-{}", i % 50);
                client
                    .should_rate_limit(request("r", &[&[("k", value.as_str())]]))
                    .await
                    .expect("every request is answered");
                answered.fetch_add(1, Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let master = cluster.a_master();
    cluster.nodes[master].kill();
    // Load continues through the failover (node timeout 1 s) and after it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    })
    .await
    .expect("cluster healthy again");
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.expect("load task did not panic");
    }
    assert!(answered.load(Relaxed) > 100);
    // Counting is exact again on the promoted replica: a fresh value counts down by one.
    let mut n = 0;
    eventually(
        Duration::from_secs(20),
        "counting resumes after failover",
        || {
            n += 1;
            let v = format!("after-{n}");
            let sc = &sc;
            async move {
                let first = ask(sc, "k", &v).await;
                let second = ask(sc, "k", &v).await;
                first == (Code::Ok as i32, 999_999)
                    && second == (Code::Ok as i32, 999_998)
                    && !degraded(sc).await
            }
        },
    )
    .await;
    assert!(sc.child_alive(), "sidecar did not crash");
    drop(cluster);
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[tokio::test]
async fn cached_mode_is_exact_on_one_replica_and_writes_behind() {
    let url = support::redis::standalone_url();
    let prefix = unique_prefix("cached1");
    let rules = "  - domain: r\n    descriptors:\n      - key: k\n        rate_limit: {unit: hour, requests_per_unit: 50}\n";
    let dir = settings_file(
        &url,
        &prefix,
        "    timeout: 2s\n    cached_flush_interval: 50ms\n",
        rules,
    );
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let mut admitted = 0;
    for _ in 0..80 {
        admitted += (ask(&sc, "k", "hot").await.0 == Code::Ok as i32) as u32;
    }
    assert_eq!(admitted, 50);
    let (_, m) = sc.get("/metrics").await;
    let commands = metric(&m, "ratethrottle_redis_commands_total ");
    assert!(commands < 40, "80 requests cost {commands} Redis commands");
    // The hits reached Redis: an uncached replica sees the counter full.
    let plain = settings_file(&url, &prefix, "    timeout: 2s\n", rules);
    let other = Sidecar::start(Some(plain.path()), &[]);
    eventually(Duration::from_secs(5), "hits flushed to Redis", || async {
        ask(&other, "k", "hot").await.0 == Code::OverLimit as i32
    })
    .await;
}

#[tokio::test]
async fn cached_mode_accuracy_with_two_replicas() {
    let url = support::redis::standalone_url();
    let prefix = unique_prefix("cached2");
    let rules = "  - domain: r\n    descriptors:\n      - key: k\n        rate_limit: {unit: hour, requests_per_unit: 200}\n";
    let dir = settings_file(
        &url,
        &prefix,
        "    timeout: 2s\n    cached_flush_interval: 100ms\n",
        rules,
    );
    let a = Sidecar::start(Some(dir.path()), &[]);
    let b = Sidecar::start(Some(dir.path()), &[]);
    let admitted = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for sc in [&a, &b] {
        for _ in 0..4 {
            let mut client = sc.client().await;
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    let r = client
                        .should_rate_limit(request("r", &[&[("k", "hot")]]))
                        .await
                        .expect("answered")
                        .into_inner();
                    if r.overall_code == Code::Ok as i32 {
                        admitted.fetch_add(1, Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    let n = admitted.load(Relaxed);
    eprintln!("cached mode, 2 replicas, limit 200, 800 attempts: {n} admitted");
    // The documented bound: never more than replicas × limit, never less than the limit.
    assert!((200..=400).contains(&n), "{n}");
}
