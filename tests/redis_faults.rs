//! Redis faults under load, through the real `ratethrottle serve` process over gRPC: a
//! standalone Redis killed (SIGKILL) and restarted for every failure mode, ext_authz during
//! an outage, and a Redis Cluster master killed. Every server here is private (own
//! processes on free loopback ports), so killing them disturbs no other test.
//!
//! The Redis timeout is set large (2 s): once the connection is known down, answers must
//! come from the failure mode at once, not after the timeout — the 500 ms bounds below are a
//! wide behavioural margin, not a speed benchmark.

mod support;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};
use support::check::Check;
use support::redis::{RedisCluster, RedisServer, unique_prefix};
use support::{Sidecar, eventually, request};

const RULES: &str = "  - domain: r\n    descriptors:\n      - key: k\n        rate_limit: {unit: hour, requests_per_unit: 1000000}\n      - key: small\n        rate_limit: {unit: hour, requests_per_unit: 3}\n";

fn settings(storage: &str, mode: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "settings:\n  storage: \"{storage}\"\n  redis:\n    prefix: \"{}\"\n    timeout: 2s\n    failure_mode: {mode}\n{extra}domains:\n{RULES}",
        unique_prefix(mode)
    );
    std::fs::write(dir.path().join("ratethrottle.yaml"), yaml).expect("write");
    dir
}

async fn ask(sc: &Sidecar, key: &str, value: &str) -> (i32, u32) {
    let r = sc
        .client()
        .await
        .should_rate_limit(request("r", &[&[(key, value)]]))
        .await
        .expect("answered")
        .into_inner();
    (r.overall_code, r.statuses[0].limit_remaining)
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
}

async fn metrics(sc: &Sidecar) -> String {
    sc.get("/metrics").await.1
}

/// One answered request of the load.
#[derive(Debug, Clone, Copy)]
struct Sample {
    start: Instant,
    took: Duration,
    code: i32,
}

/// `streams` concurrent gRPC streams asking about values spread over `spread` keys until
/// `stop`; every request must be answered.
async fn load(sc: &Sidecar, streams: usize, spread: u32, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let mut tasks = Vec::new();
    for t in 0..streams {
        let mut client = sc.client().await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = 0u32;
            while !stop.load(Relaxed) {
                i += 1;
                let value = format!("v{}", (i * streams as u32 + t as u32) % spread);
                let start = Instant::now();
                let r = client
                    .should_rate_limit(request("r", &[&[("k", value.as_str())]]))
                    .await
                    .expect("every request is answered")
                    .into_inner();
                out.push(Sample {
                    start,
                    took: start.elapsed(),
                    code: r.overall_code,
                });
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

fn p99(samples: &[&Sample]) -> Duration {
    let mut t: Vec<Duration> = samples.iter().map(|s| s.took).collect();
    t.sort();
    t[(t.len() * 99 / 100).min(t.len() - 1)]
}

/// Kills Redis under load, keeps the load on for 2 s, restarts it and checks: answers while
/// the connection is known down come from `mode` at once; the error metric counts them;
/// counting in Redis is exact again after the restart.
async fn outage(mode: &str) {
    let mut redis = RedisServer::start(&[]);
    let dir = settings(&redis.url(), mode, "");
    let sc = Arc::new(Sidecar::start(Some(dir.path()), &[]));
    assert_eq!(ask(&sc, "small", "before").await, (Code::Ok as i32, 2));
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (sc, stop) = (sc.clone(), stop.clone());
        tokio::spawn(async move { load(&sc, 8, 1000, stop).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // While down: the local limiter (if that is the mode) still counts exactly.
    let local_small = if mode == "local" {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(ask(&sc, "small", "during").await.0);
        }
        Some(v)
    } else {
        None
    };
    let restarted = Instant::now();
    stop.store(true, Relaxed);
    let samples = runner.await.expect("load");
    redis.restart();

    // Known down: from 300 ms after the kill until the restart.
    let down: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start >= killed + Duration::from_millis(300) && s.start < restarted)
        .collect();
    let before: Vec<&Sample> = samples.iter().filter(|s| s.start < killed).collect();
    assert!(!before.is_empty() && !down.is_empty(), "{}", samples.len());
    let p = p99(&down);
    eprintln!(
        "REDIS-FAULT standalone kill -9, failure_mode {mode}: {} requests while down, p99 {:?} (timeout 2 s); {} before, p99 {:?}",
        down.len(),
        p,
        before.len(),
        p99(&before)
    );
    assert!(
        p < Duration::from_millis(500),
        "answers while Redis is known down waited for the Redis timeout: p99 {p:?}"
    );
    let expected = if mode == "deny" {
        Code::OverLimit
    } else {
        Code::Ok
    } as i32;
    assert!(
        down.iter().all(|s| s.code == expected),
        "failure_mode {mode} answers {expected} while down"
    );
    if let Some(v) = local_small {
        let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
        assert_eq!(v, [ok, ok, ok, over], "the local limiter counts exactly");
    }

    // The error is visible: the reference's metric counts every request the failure mode
    // answered, and the degraded gauge is up.
    let m = metrics(&sc).await;
    let errors = metric(&m, "ratelimit_service_call_should_rate_limit_redis_error ");
    let fallbacks = metric(&m, "ratethrottle_redis_failure_mode_answers_total ");
    assert!(errors >= down.len() as u64, "{errors} < {}", down.len());
    assert_eq!(errors, fallbacks, "{m}");
    assert!(sc.stderr().contains("Redis"), "the outage is logged");
    // Logged, not flooded: at most one storage-error line a second, however many requests.
    let lines = sc.stderr().matches("storage error:").count();
    let outage_secs = (restarted - killed).as_secs_f64();
    assert!(
        lines >= 1 && (lines as f64) <= outage_secs + 2.0,
        "{lines} storage-error lines for {errors} failures in {outage_secs:.1} s"
    );

    // Back: Redis decides again, exactly, and no request is answered by the failure mode.
    eventually(Duration::from_secs(15), "Redis answers again", || async {
        !metrics(&sc)
            .await
            .contains("ratethrottle_storage_degraded 1")
    })
    .await;
    let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
    let mut counted = Vec::new();
    for _ in 0..4 {
        counted.push(ask(&sc, "small", "after").await);
    }
    assert_eq!(counted, [(ok, 2), (ok, 1), (ok, 0), (over, 0)]);
    let m = metrics(&sc).await;
    assert_eq!(
        metric(&m, "ratelimit_service_call_should_rate_limit_redis_error "),
        errors,
        "no failure-mode answer after recovery"
    );
    let keys = redis.cli(&["--scan", "--pattern", "t:*"]);
    assert!(!keys.trim().is_empty(), "the counter lives in Redis again");
}

#[tokio::test]
async fn redis_killed_under_load_failure_mode_allow() {
    outage("allow").await;
}

#[tokio::test]
async fn redis_killed_under_load_failure_mode_deny() {
    outage("deny").await;
}

#[tokio::test]
async fn redis_killed_under_load_failure_mode_local() {
    outage("local").await;
}

fn authz_settings(storage: &str, redis_mode: &str, authz_mode: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        r#"
settings:
  storage: "{storage}"
  redis:
    prefix: "{prefix}"
    timeout: 2s
    failure_mode: {redis_mode}
authz:
  domain: edge
  failure_mode: {authz_mode}
  policies:
    - name: login
      match: {{methods: [POST], path: {{exact: /login}}}}
      descriptors:
        - [{{generic_key: {{descriptor_value: login}}}}, {{remote_address: {{}}}}]
domains:
  - domain: edge
    descriptors:
      - key: generic_key
        value: login
        descriptors:
          - key: remote_address
            rate_limit: {{unit: minute, requests_per_unit: 2}}
"#,
        prefix = unique_prefix("authz-fault")
    );
    std::fs::write(dir.path().join("ratethrottle.yaml"), yaml).expect("write");
    dir
}

fn authz_metric(text: &str, series: &str) -> u64 {
    metric(text, &format!("{series} "))
}

/// A Redis outage in ext_authz is a storage failure, answered per `authz.failure_mode` —
/// never a rate limit — unless the Redis store's `local` failure mode still decides.
#[tokio::test]
async fn ext_authz_answers_a_redis_outage_as_a_storage_failure() {
    let mut redis = RedisServer::start(&[]);
    let deny_dir = authz_settings(&redis.url(), "deny", "deny");
    let allow_dir = authz_settings(&redis.url(), "allow", "allow");
    let local_dir = authz_settings(&redis.url(), "local", "deny");
    let deny = Sidecar::start(Some(deny_dir.path()), &[]);
    let allow = Sidecar::start(Some(allow_dir.path()), &[]);
    let local = Sidecar::start(Some(local_dir.path()), &[]);
    let login = |ip: &str| Check::new(ip).method("POST").path("/login");
    for sc in [&deny, &allow, &local] {
        assert!(sc.check(&login("192.0.2.1")).await.ok());
    }
    redis.kill();

    let started = Instant::now();
    let a = deny.check(&login("192.0.2.2")).await;
    assert_eq!(a.http, 503, "{a:?}");
    assert_eq!(a.json()["error"], "unavailable");
    assert!(a.header("retry-after").is_none(), "not a rate limit: {a:?}");
    for _ in 0..5 {
        assert_eq!(deny.check(&login("192.0.2.2")).await.http, 503);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the known-down connection is not waited for: {:?}",
        started.elapsed()
    );
    let m = metrics(&deny).await;
    assert!(
        authz_metric(
            &m,
            "ratethrottle_authz_checks_total{outcome=\"unavailable\"}"
        ) >= 6,
        "{m}"
    );
    assert_eq!(
        authz_metric(
            &m,
            "ratethrottle_authz_checks_total{outcome=\"rate_limited\"}"
        ),
        0
    );
    assert!(
        authz_metric(
            &m,
            "ratethrottle_authz_stage_total{stage=\"limits\",result=\"storage_error\"}"
        ) >= 6
    );
    assert!(deny.stderr().contains("storage"), "the failure is logged");

    let a = allow.check(&login("192.0.2.2")).await;
    assert!(a.ok(), "{a:?}");
    let m = metrics(&allow).await;
    assert!(
        authz_metric(
            &m,
            "ratethrottle_authz_checks_total{outcome=\"failed_open\"}"
        ) >= 1
    );

    // `local`: this replica's limiter still decides (2 per minute), so a limit is a limit.
    let codes: Vec<u32> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(local.check(&login("192.0.2.3")).await.http);
        }
        v
    };
    assert_eq!(codes, [200, 200, 429]);
    let m = metrics(&local).await;
    assert!(
        metric(&m, "ratethrottle_redis_failure_mode_answers_total ") >= 3,
        "{m}"
    );
}

/// A master killed under load stalls only its own slots: requests for the healthy shards
/// keep being decided by Redis during the failover.
#[tokio::test]
async fn a_cluster_master_killed_under_load_stalls_only_its_slots() {
    // Without full coverage required, healthy masters keep serving their slots while one
    // is failed (Redis's default refuses every slot between the FAIL mark and the promotion).
    let mut cluster = tokio::task::spawn_blocking(|| {
        RedisCluster::start_with(&["--cluster-require-full-coverage", "no"])
    })
    .await
    .expect("cluster");
    // deny: every failure-mode answer is an OVER_LIMIT (the limit itself is never reached).
    let dir = settings(&cluster.url(), "deny", "");
    let sc = Arc::new(Sidecar::start(Some(dir.path()), &[]));
    eventually(Duration::from_secs(10), "cluster answers", || async {
        ask(&sc, "k", "warm").await.0 == Code::Ok as i32
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (sc, stop) = (sc.clone(), stop.clone());
        tokio::spawn(async move { load(&sc, 8, 3000, stop).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let master = cluster.a_master();
    let killed = Instant::now();
    cluster.nodes[master].kill();
    // Node timeout 1 s: the replica is promoted within a few seconds.
    let cluster = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let live = (0..cluster.nodes.len()).filter(|&i| i != master);
            let masters = live
                .clone()
                .filter(|&i| {
                    cluster.nodes[i]
                        .cli(&["info", "replication"])
                        .contains("role:master")
                })
                .count();
            let ok = live.into_iter().all(|i| {
                cluster.nodes[i]
                    .cli(&["cluster", "info"])
                    .contains("cluster_state:ok")
            });
            if masters == 3 && ok {
                return cluster;
            }
            assert!(Instant::now() < deadline, "no replica was promoted");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("cluster healthy again");
    let healthy = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Relaxed);
    let samples = runner.await.expect("load");

    let before = samples.iter().filter(|s| s.start < killed).count();
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start >= killed && s.start < healthy)
        .collect();
    let failed = during
        .iter()
        .filter(|s| s.code == Code::OverLimit as i32)
        .count();
    // The sidecar learns the promotion from MOVED replies and its background probe: within
    // 2 s of the cluster reporting healthy (a loaded machine once needed more than 300 ms).
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start >= healthy + Duration::from_secs(2))
        .collect();
    let last_failure = samples
        .iter()
        .filter(|s| s.start >= healthy && s.code != Code::Ok as i32)
        .map(|s| s.start - healthy)
        .max();
    let share = failed as f64 / during.len().max(1) as f64;
    eprintln!(
        "REDIS-FAULT cluster master kill -9 (1 of 3 masters, node timeout 1 s): failover took {:?}; {} requests during it, {:.1} % answered by the failure mode, p99 {:?}; {before} before",
        healthy - killed,
        during.len(),
        share * 100.0,
        p99(&during)
    );
    assert!(before > 0 && during.len() > 50, "{}", samples.len());
    assert!(
        share <= 0.5,
        "{:.1} % of requests got the failure-mode answer while one master of three was down",
        share * 100.0
    );
    eprintln!("REDIS-FAULT last failure-mode answer after healthy: {last_failure:?}");
    assert!(
        !after.is_empty() && after.iter().all(|s| s.code == Code::Ok as i32),
        "every slot is decided by Redis again within 2 s of the failover (last failure-mode answer {last_failure:?} after it)"
    );
    let m = metrics(&sc).await;
    assert!(metric(&m, "ratelimit_service_call_should_rate_limit_redis_error ") > 0);
    assert!(sc.stderr().contains("Redis"));
    drop(cluster);
}
