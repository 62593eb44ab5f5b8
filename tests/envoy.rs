//! End to end: real HTTP through a real Envoy (the shipped configs) to a real ratethrottle.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;
use support::envoy::{Envoy, shipped, validate};
use support::{Sidecar, eventually, http_request, write_atomically};

const RULES: &str = r#"
domain: example
descriptors:
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: api_key
    value: burst-key
    rate_limit: {unit: minute, requests_per_unit: 1, algorithm: token_bucket, burst: 4}
  - key: api_key
    value: smooth-key
    rate_limit: {unit: second, requests_per_unit: 2, algorithm: leaky_bucket}
  - key: path
    value: /grpc.health.v1.Health/Check
    rate_limit: {unit: minute, requests_per_unit: 0}
  - key: api_key
    value: fixed-key
    rate_limit: {unit: minute, requests_per_unit: 2, algorithm: fixed_window}
  - key: api_key
    value: log-key
    rate_limit: {unit: minute, requests_per_unit: 2, algorithm: sliding_window_log}
  - key: api_key
    value: counter-key
    rate_limit: {unit: minute, requests_per_unit: 2, algorithm: sliding_window_counter}
  - key: api_key
    value: gcra-key
    rate_limit: {unit: minute, requests_per_unit: 2, algorithm: gcra}
"#;

fn rules_dir(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("example.yaml"), text).expect("write");
    dir
}

async fn get(envoy: &Envoy, headers: &[(&str, &str)]) -> support::HttpResponse {
    http_request(envoy.listener, "GET", "/api/items", headers, "").await
}

#[test]
fn every_shipped_envoy_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/examples/envoy");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            validate(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 2, "found {checked} configs");
    assert!(shipped("http-ratelimit.yaml").exists());
}

#[tokio::test]
async fn limits_and_headers_through_envoy() {
    let dir = rules_dir(RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let envoy = Envoy::start("http-ratelimit.yaml", &[sc.grpc], |t| t);
    for expected in ["2", "1", "0"] {
        let r = get(&envoy, &[("x-api-key", "alice")]).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "ok\n");
        assert_eq!(r.header("x-ratelimit-remaining"), Some(expected), "{r:?}");
        assert!(
            r.header("x-ratelimit-limit")
                .is_some_and(|l| l.starts_with('3')),
            "{r:?}"
        );
    }
    let r = get(&envoy, &[("x-api-key", "alice")]).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let reset: u64 = r
        .header("x-ratelimit-reset")
        .and_then(|v| v.parse().ok())
        .expect("reset");
    assert!(reset <= 60);
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((1..=60).contains(&retry), "{r:?}");
    // Another key has its own counter; no key at all is not limited by the api_key rule.
    assert_eq!(get(&envoy, &[("x-api-key", "bob")]).await.status, 200);
    assert_eq!(get(&envoy, &[]).await.status, 200);
}

#[tokio::test]
async fn token_bucket_bursts_and_leaky_bucket_smooths_through_envoy() {
    let dir = rules_dir(RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let envoy = Envoy::start("http-ratelimit.yaml", &[sc.grpc], |t| t);
    let mut burst = Vec::new();
    for _ in 0..6 {
        burst.push(get(&envoy, &[("x-api-key", "burst-key")]).await.status);
    }
    assert_eq!(burst, vec![200, 200, 200, 200, 429, 429]);

    // 2/s with capacity 1: back-to-back requests are spaced 500 ms apart, not burst.
    let first = get(&envoy, &[("x-api-key", "smooth-key")]).await.status;
    let second = get(&envoy, &[("x-api-key", "smooth-key")]).await.status;
    assert_eq!((first, second), (200, 429));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        get(&envoy, &[("x-api-key", "smooth-key")]).await.status,
        200
    );
}

#[tokio::test]
async fn every_algorithm_limits_through_envoy() {
    let dir = rules_dir(RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let envoy = Envoy::start("http-ratelimit.yaml", &[sc.grpc], |t| t);
    for key in ["fixed-key", "log-key", "counter-key", "gcra-key"] {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = get(&envoy, &[("x-api-key", key)]).await;
            seen.push((
                r.status,
                r.header("x-ratelimit-remaining").map(str::to_string),
            ));
        }
        let remaining: Vec<_> = seen.iter().map(|(_, r)| r.as_deref()).collect();
        let statuses: Vec<u16> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(statuses, vec![200, 200, 429], "{key}");
        assert_eq!(remaining, vec![Some("1"), Some("0"), Some("0")], "{key}");
    }
}

#[tokio::test]
async fn a_grpc_request_over_its_method_limit_gets_a_grpc_status() {
    let dir = rules_dir(RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let envoy = Envoy::start("http-ratelimit.yaml", &[sc.grpc], |t| t);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", envoy.listener))
        .expect("uri")
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to envoy");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let err = client
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("limited");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
}

#[tokio::test]
async fn editing_rules_under_traffic_changes_the_limit_without_failures() {
    let dir = rules_dir(RULES);
    let file = dir.path().join("example.yaml");
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let envoy = Envoy::start("http-ratelimit.yaml", &[sc.grpc], |t| t);
    let failures = Arc::new(AtomicU32::new(0));
    let sent = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (failures, sent, stop) = (failures.clone(), sent.clone(), stop.clone());
        let addr = envoy.listener;
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Relaxed) {
                i += 1;
                // Distinct keys: never limited, so anything but 200 is a failure.
                let key = format!("traffic-{i}");
                let r = http_request(addr, "GET", "/", &[("x-api-key", key.as_str())], "").await;
                sent.fetch_add(1, Relaxed);
                if r.status != 200 {
                    failures.fetch_add(1, Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    write_atomically(
        &file,
        &RULES.replace("requests_per_unit: 3}", "requests_per_unit: 1}"),
    );
    eventually(Duration::from_secs(10), "new limit in force", || async {
        let key = format!("probe-{}", sent.load(Relaxed));
        let a = get(&envoy, &[("x-api-key", key.as_str())]).await.status;
        let b = get(&envoy, &[("x-api-key", key.as_str())]).await.status;
        (a, b) == (200, 429)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Relaxed);
    traffic.await.expect("traffic");
    assert!(sent.load(Relaxed) > 20);
    assert_eq!(failures.load(Relaxed), 0);
}

#[tokio::test]
async fn two_replicas_with_redis_behind_one_envoy_share_the_limit_exactly() {
    let prefix = support::redis::unique_prefix("envoy2");
    let settings = format!(
        "settings:\n  storage: \"{}\"\n  redis: {{prefix: \"{prefix}\", timeout: 2s}}\ndomains:\n  - domain: example\n    descriptors:\n      - key: api_key\n        rate_limit: {{unit: hour, requests_per_unit: 10}}\n",
        support::redis::standalone_url()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ratethrottle.yaml"), settings).expect("write");
    let a = Sidecar::start(Some(dir.path()), &[]);
    let b = Sidecar::start(Some(dir.path()), &[]);
    // Both replicas as endpoints of the ratethrottle cluster (round robin).
    let envoy = Envoy::start("http-ratelimit.yaml", &[a.grpc, b.grpc], |t| t);
    let mut ok = 0;
    for _ in 0..25 {
        if get(&envoy, &[("x-api-key", "shared")]).await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 10);
    // Both replicas answered some of them.
    for sc in [&a, &b] {
        let (_, m) = sc.get("/metrics").await;
        let n: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("ratelimit_service_should_rate_limit_total "))
            .and_then(|v| v.parse().ok())
            .expect("metric");
        assert!(n > 0, "a replica got no traffic");
    }
}

#[tokio::test]
async fn a_dead_sidecar_follows_envoys_failure_mode_deny() {
    let dir = rules_dir(RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let open = Envoy::start("http-ratelimit.yaml", &[sc.grpc], |t| t);
    let closed = Envoy::start("http-ratelimit.yaml", &[sc.grpc], |t| {
        t.replace("failure_mode_deny: false", "failure_mode_deny: true")
    });
    assert_eq!(get(&open, &[("x-api-key", "k")]).await.status, 200);
    assert_eq!(get(&closed, &[("x-api-key", "k")]).await.status, 200);
    drop(sc);
    // failure_mode_deny: false lets traffic through, true answers 500.
    assert_eq!(get(&open, &[("x-api-key", "k")]).await.status, 200);
    assert_eq!(get(&closed, &[("x-api-key", "k")]).await.status, 500);
}
