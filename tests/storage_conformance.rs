//! One behavioural suite, every store: memory, Redis, Redis Cluster and Redis via Sentinel
//! answer every request identically. Time is one injected clock for all of them (the Redis
//! stores send it to the script instead of reading Redis's `TIME`); keys get a unique prefix
//! per test, so tests share the servers `scripts/test.sh` starts without flushing them.

mod support;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use ratethrottle::config::parse_str;
use ratethrottle::engine::RateLimitEngine;
use ratethrottle::limiter::{ManualClock, NANOS_PER_SECOND};
use ratethrottle::rules::{RuleSet, StatsRegistry};
use ratethrottle::storage::Storage;
use ratethrottle::telemetry::ServiceMetrics;
use std::sync::Arc;
use std::time::Duration;

/// Epoch-aligned for every unit up to a day.
const START: u64 =
    1_800_000_000 * NANOS_PER_SECOND / 86_400 / NANOS_PER_SECOND * 86_400 * NANOS_PER_SECOND;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    Redis,
    RedisCluster,
    RedisSentinel,
}

struct Harness {
    engine: RateLimitEngine,
    clock: Arc<ManualClock>,
}

async fn harness(backend: Backend, test: &str, yaml: &str) -> Harness {
    let mut config = parse_str("suite.yaml", yaml).unwrap_or_else(|e| panic!("config: {e}"));
    config.settings.redis.prefix = support::redis::unique_prefix(test);
    // Generous: the shared servers run beside a parallel test suite on two cores.
    config.settings.redis.timeout = 5 * NANOS_PER_SECOND;
    let url = match backend {
        Backend::Memory => "memory".to_string(),
        Backend::Redis => support::redis::standalone_url(),
        Backend::RedisCluster => support::redis::cluster_url(),
        Backend::RedisSentinel => support::redis::sentinel_url(),
    };
    let storage = match Storage::connect(&url, &config.settings)
        .await
        .expect("storage")
    {
        Storage::Redis(r) => {
            assert!(
                !r.health().is_degraded(),
                "{backend:?} not reachable: {:?}",
                r.health().last_error()
            );
            Storage::Redis(r.with_client_clock())
        }
        other => other,
    };
    let stats = Arc::new(StatsRegistry::default());
    let rules = Arc::new(arc_swap::ArcSwap::from_pointee(RuleSet::compile(
        &config, &stats,
    )));
    let clock = Arc::new(ManualClock::new(START));
    let engine = RateLimitEngine::new(
        rules,
        Arc::new(storage),
        clock.clone(),
        stats,
        Arc::new(ServiceMetrics::default()),
    );
    Harness { engine, clock }
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: "suite".into(),
        descriptors: descriptors.iter().map(|d| descriptor(d)).collect(),
        hits_addend: 0,
    }
}

impl Harness {
    async fn ask(&self, req: &RateLimitRequest) -> RateLimitResponse {
        self.engine.should_rate_limit(req).await.expect("answered")
    }
    async fn one(&self, entries: &[(&str, &str)]) -> DescriptorStatus {
        self.ask(&request(&[entries])).await.statuses[0].clone()
    }
    fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

fn ok(s: &DescriptorStatus) -> bool {
    s.code == Code::Ok as i32
}

fn limits(algorithm: &str, rpu: u32, unit: &str, extra: &str) -> String {
    format!(
        "domain: suite\ndescriptors:\n  - key: k\n    rate_limit: {{unit: {unit}, requests_per_unit: {rpu}, algorithm: {algorithm}{extra}}}\n"
    )
}

// ---- the suite -------------------------------------------------------------------------

async fn every_algorithm_admits_exactly_its_limit(b: Backend) {
    for (algo, expected) in [
        ("fixed_window", 5),
        ("sliding_window_log", 5),
        ("sliding_window_counter", 5),
        ("token_bucket", 5),
        ("leaky_bucket", 1),
        ("gcra", 5),
    ] {
        let h = harness(b, &format!("limit-{algo}"), &limits(algo, 5, "minute", "")).await;
        let mut remaining = Vec::new();
        let mut admitted = 0;
        for _ in 0..8 {
            let s = h.one(&[("k", "v")]).await;
            if ok(&s) {
                admitted += 1;
            }
            remaining.push(s.limit_remaining);
        }
        assert_eq!(admitted, expected, "{algo} on {b:?}");
        if expected == 5 {
            assert_eq!(remaining, vec![4, 3, 2, 1, 0, 0, 0, 0], "{algo} on {b:?}");
        }
    }
}

async fn windows_reset_and_report_exact_durations(b: Backend) {
    let h = harness(b, "fixed-reset", &limits("fixed_window", 2, "second", "")).await;
    h.advance(Duration::from_millis(250));
    let s = h.one(&[("k", "v")]).await;
    assert_eq!(
        s.duration_until_reset.map(|d| (d.seconds, d.nanos)),
        Some((0, 750_000_000))
    );
    h.one(&[("k", "v")]).await;
    assert!(!ok(&h.one(&[("k", "v")]).await));
    h.advance(Duration::from_millis(750));
    assert!(ok(&h.one(&[("k", "v")]).await));

    let h = harness(
        b,
        "log-slide",
        &limits("sliding_window_log", 2, "second", ""),
    )
    .await;
    h.one(&[("k", "v")]).await;
    h.advance(Duration::from_millis(600));
    h.one(&[("k", "v")]).await;
    let s = h.one(&[("k", "v")]).await;
    assert!(!ok(&s));
    // The first hit leaves the window 400 ms from now.
    assert_eq!(
        s.duration_until_reset.map(|d| (d.seconds, d.nanos)),
        Some((0, 400_000_000))
    );
    h.advance(Duration::from_millis(400));
    assert!(ok(&h.one(&[("k", "v")]).await));
    assert!(!ok(&h.one(&[("k", "v")]).await));
}

async fn buckets_burst_and_smooth(b: Backend) {
    let h = harness(b, "tb", &limits("token_bucket", 2, "second", ", burst: 6")).await;
    let mut admitted = 0;
    for _ in 0..10 {
        admitted += ok(&h.one(&[("k", "v")]).await) as u32;
    }
    assert_eq!(admitted, 6);
    let s = h.one(&[("k", "v")]).await;
    assert_eq!(
        s.duration_until_reset.map(|d| (d.seconds, d.nanos)),
        Some((0, 500_000_000))
    );
    h.advance(Duration::from_millis(500));
    assert!(ok(&h.one(&[("k", "v")]).await));
    assert!(!ok(&h.one(&[("k", "v")]).await));

    let h = harness(b, "lb", &limits("leaky_bucket", 10, "second", "")).await;
    let mut admitted_at = Vec::new();
    for step in 0..50 {
        if ok(&h.one(&[("k", "v")]).await) {
            admitted_at.push(step * 20);
        }
        h.advance(Duration::from_millis(20));
    }
    // Capacity 1 draining 10/s: one request per 100 ms, never two closer.
    assert_eq!(
        admitted_at,
        (0..10).map(|i| i * 100).collect::<Vec<_>>(),
        "{b:?}"
    );
}

async fn several_limits_per_descriptor(b: Backend) {
    let yaml = "domain: suite\ndescriptors:\n  - key: k\n    rate_limits:\n      - {unit: second, requests_per_unit: 3}\n      - {unit: day, requests_per_unit: 4}\n";
    let h = harness(b, "multi", yaml).await;
    for _ in 0..3 {
        assert!(ok(&h.one(&[("k", "v")]).await));
    }
    assert!(!ok(&h.one(&[("k", "v")]).await));
    h.advance(Duration::from_secs(1));
    let s = h.one(&[("k", "v")]).await;
    assert!(ok(&s));
    assert_eq!(s.current_limit.map(|l| l.requests_per_unit), Some(4));
    assert_eq!(s.limit_remaining, 0);
    assert!(!ok(&h.one(&[("k", "v")]).await));
}

async fn rejected_requests_consume_nothing(b: Backend) {
    // Many descriptors: on a cluster they live in different slots.
    let yaml = "domain: suite\ndescriptors:\n  - key: a\n    rate_limit: {unit: hour, requests_per_unit: 1}\n  - key: b\n    rate_limit: {unit: hour, requests_per_unit: 3}\n";
    let h = harness(b, "nothing", yaml).await;
    h.one(&[("a", "1")]).await;
    for _ in 0..4 {
        let r = h
            .ask(&request(&[
                &[("b", "1")],
                &[("b", "2")],
                &[("b", "3")],
                &[("a", "1")],
            ]))
            .await;
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        for s in &r.statuses[..3] {
            assert_eq!(s.limit_remaining, 3, "{b:?}: {r:?}");
        }
    }
    for expected in [2, 1, 0] {
        assert_eq!(
            h.one(&[("b", "2")]).await.limit_remaining,
            expected,
            "{b:?}"
        );
    }
}

async fn counted_rejections_burn_quota(b: Backend) {
    let yaml = "settings: {count_rejected_hits: true}\ndomains:\n  - domain: suite\n    descriptors:\n      - key: a\n        rate_limit: {unit: hour, requests_per_unit: 1}\n      - key: b\n        rate_limit: {unit: hour, requests_per_unit: 3}\n";
    let h = harness(b, "counted", yaml).await;
    h.one(&[("a", "1")]).await;
    for _ in 0..3 {
        h.ask(&request(&[&[("b", "1")], &[("a", "1")]])).await;
    }
    assert!(!ok(&h.one(&[("b", "1")]).await), "{b:?}");
}

async fn block_duration_holds(b: Backend) {
    let h = harness(
        b,
        "block",
        &limits("fixed_window", 1, "second", ", block_duration: 10s"),
    )
    .await;
    assert!(ok(&h.one(&[("k", "ip")]).await));
    let s = h.one(&[("k", "ip")]).await;
    assert!(!ok(&s));
    assert_eq!(s.duration_until_reset.map(|d| d.seconds), Some(10));
    h.advance(Duration::from_secs(5));
    assert!(!ok(&h.one(&[("k", "ip")]).await));
    h.advance(Duration::from_secs(5));
    assert!(ok(&h.one(&[("k", "ip")]).await));
}

async fn shadow_looks_and_negative_hits(b: Backend) {
    let yaml = "domain: suite\ndescriptors:\n  - key: s\n    shadow_mode: true\n    rate_limit: {unit: hour, requests_per_unit: 1}\n  - key: k\n    rate_limit: {unit: hour, requests_per_unit: 3}\n";
    let h = harness(b, "shadow", yaml).await;
    h.one(&[("s", "1")]).await;
    let r = h.ask(&request(&[&[("s", "1")], &[("k", "1")]])).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "shadow never rejects");
    assert_eq!(r.statuses[1].limit_remaining, 2);
    let mut look = request(&[&[("k", "1")]]);
    look.descriptors[0].hits_addend = Some(UInt64Value { value: 0 });
    assert_eq!(h.ask(&look).await.statuses[0].limit_remaining, 2);
    assert_eq!(h.ask(&look).await.statuses[0].limit_remaining, 2);
    let mut give_back = request(&[&[("k", "1")]]);
    give_back.descriptors[0].is_negative_hits = true;
    assert_eq!(h.ask(&give_back).await.statuses[0].limit_remaining, 3);
    let mut heavy = request(&[&[("k", "1")]]);
    heavy.hits_addend = 4;
    assert_eq!(h.ask(&heavy).await.overall_code, Code::OverLimit as i32);
    assert_eq!(h.one(&[("k", "1")]).await.limit_remaining, 2, "{b:?}");
}

async fn concurrent_requests_never_exceed_the_limit(b: Backend) {
    let h = Arc::new(harness(b, "concurrent", &limits("fixed_window", 50, "hour", "")).await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..20 {
                    admitted += ok(&h.one(&[("k", "hot")]).await) as u32;
                }
                admitted
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    assert_eq!(total, 50, "{b:?}");
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod memory { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::Memory).await } )* }
        mod redis { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::Redis).await } )* }
        mod redis_cluster { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::RedisCluster).await } )* }
        mod redis_sentinel { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::RedisSentinel).await } )* }
    };
}

suite!(
    every_algorithm_admits_exactly_its_limit,
    windows_reset_and_report_exact_durations,
    buckets_burst_and_smooth,
    several_limits_per_descriptor,
    rejected_requests_consume_nothing,
    counted_rejections_burn_quota,
    block_duration_holds,
    shadow_looks_and_negative_hits,
    concurrent_requests_never_exceed_the_limit,
);
