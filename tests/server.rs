//! The real binary over real gRPC and HTTP: services, admin endpoints, hot reload.
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

mod support;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use std::time::Duration;
use support::{Sidecar, eventually, request, write_atomically};

const RULES: &str = r#"
domain: edge
descriptors:
  - key: api_key
    rate_limit:
      unit: minute
      requests_per_unit: 3
      name: per_key
  - key: path
    value: "/health*"
"#;

fn config_dir(contents: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("edge.yaml"), contents).expect("write");
    dir
}

#[tokio::test]
async fn should_rate_limit_over_grpc() {
    let dir = config_dir(RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let mut client = sc.client().await;
    for expected in [2, 1, 0] {
        let r = client
            .should_rate_limit(request("edge", &[&[("api_key", "k1")]]))
            .await
            .expect("rpc")
            .into_inner();
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, expected);
        assert_eq!(
            r.statuses[0].current_limit.as_ref().expect("limit").name,
            "per_key"
        );
    }
    let r = client
        .should_rate_limit(request(
            "edge",
            &[&[("api_key", "k1")], &[("path", "/healthz")]],
        ))
        .await
        .expect("rpc")
        .into_inner();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses.len(), 2);
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    assert!(r.statuses[1].current_limit.is_none());
}

#[tokio::test]
async fn malformed_requests_get_invalid_argument_and_the_server_lives_on() {
    let dir = config_dir(RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let mut client = sc.client().await;
    for bad in [
        request("", &[&[("api_key", "x")]]),
        request("edge", &[]),
        request("edge", &[&[("", "x")]]),
        request("edge", &[&[]]),
    ] {
        let err = client.should_rate_limit(bad).await.expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    let big = "v".repeat(1 << 20);
    let r = client
        .should_rate_limit(request("edge", &[&[("api_key", big.as_str())]]))
        .await
        .expect("a megabyte value is answered")
        .into_inner();
    assert_eq!(r.overall_code, Code::Ok as i32);
    let mut absurd = request("edge", &[&[("api_key", "y")]]);
    absurd.hits_addend = u32::MAX;
    let r = client
        .should_rate_limit(absurd)
        .await
        .expect("rpc")
        .into_inner();
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert!(sc.get("/healthz").await.0 == 200);
}

#[tokio::test]
async fn health_and_reflection_share_the_grpc_port() {
    let sc = Sidecar::start(None, &[]);
    let names = support::health_and_reflected_services(
        sc.channel().await,
        "envoy.service.ratelimit.v3.RateLimitService",
    )
    .await;
    for expected in [
        "envoy.service.ratelimit.v3.RateLimitService",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected}: {names:?}");
    }
}

#[tokio::test]
async fn admin_endpoints() {
    let dir = config_dir(RULES);
    let sc = Sidecar::start(Some(dir.path()), &[]);
    assert_eq!(sc.get("/healthz").await.0, 200);
    assert_eq!(sc.get("/readyz").await.0, 200);

    let body = r#"{"domain":"edge","descriptors":[{"entries":[{"key":"api_key","value":"j"}]}]}"#;
    let (status, json) = sc.post("/json", body).await;
    assert_eq!(status, 200, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["overallCode"], "OK");
    assert_eq!(v["statuses"][0]["currentLimit"]["requestsPerUnit"], 3);
    assert_eq!(v["statuses"][0]["currentLimit"]["unit"], "MINUTE");
    assert_eq!(v["statuses"][0]["limitRemaining"], 2);
    sc.post("/json", body).await;
    sc.post("/json", body).await;
    let (status, json) = sc.post("/json", body).await;
    assert_eq!(status, 429, "{json}");
    assert!(json.contains("\"OVER_LIMIT\""));
    assert_eq!(sc.post("/json", "{not json").await.0, 400);
    assert_eq!(sc.post("/json", r#"{"domain":""}"#).await.0, 400);

    let (status, metrics) = sc.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .contains("ratelimit_service_rate_limit_total_hits{domain=\"edge\",key=\"api_key\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("ratelimit_service_rate_limit_over_limit{domain=\"edge\",key=\"api_key\"} 1")
    );
    assert!(metrics.contains("ratelimit_service_config_load_success 1"));

    let (status, cfg) = sc.get("/v1/config").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    assert!(!v["version"].as_str().expect("version").is_empty());
    assert_eq!(v["config"]["domains"][0]["domain"], "edge");
}

async fn remaining(sc: &Sidecar, domain: &str, k: &str, v: &str) -> (i32, u32) {
    let mut c = sc.client().await;
    let r = c
        .should_rate_limit(request(domain, &[&[(k, v)]]))
        .await
        .expect("rpc")
        .into_inner();
    (r.overall_code, r.statuses[0].limit_remaining)
}

async fn version(sc: &Sidecar) -> String {
    let (_, cfg) = sc.get("/v1/config").await;
    let v: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    v["version"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn hot_reload_applies_good_configs_and_keeps_the_last_good_one() {
    let dir = config_dir(RULES);
    let file = dir.path().join("edge.yaml");
    let sc = Sidecar::start(Some(dir.path()), &[]);
    assert_eq!(remaining(&sc, "edge", "api_key", "a").await.1, 2);
    let v1 = version(&sc).await;

    // A new rule appears; the unchanged rule keeps its counter.
    write_atomically(
        &file,
        &format!("{RULES}  - key: user\n    rate_limit: {{unit: hour, requests_per_unit: 7}}\n"),
    );
    eventually(Duration::from_secs(10), "new rule in force", || async {
        remaining(&sc, "edge", "user", "u").await.1 != 0
    })
    .await;
    assert_ne!(version(&sc).await, v1);
    assert_eq!(
        remaining(&sc, "edge", "api_key", "a").await.1,
        1,
        "counter survived"
    );
    let v2 = version(&sc).await;

    // A broken file: the last good config stays, the error is visible with file and line.
    write_atomically(
        &file,
        "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
    );
    eventually(Duration::from_secs(10), "load error reported", || async {
        let (_, m) = sc.get("/metrics").await;
        m.contains("ratelimit_service_config_load_error 1")
    })
    .await;
    let (_, cfg) = sc.get("/v1/config").await;
    let v: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    assert_eq!(v["version"], v2.as_str());
    let err = v["last_error"].as_str().expect("last_error");
    assert!(err.contains("edge.yaml:4"), "{err}");
    assert!(err.contains("unit"), "{err}");
    assert_eq!(
        remaining(&sc, "edge", "user", "u").await.1,
        5,
        "old rules still in force"
    );
    assert!(sc.stderr().contains("edge.yaml:4"));
}

#[cfg(unix)]
#[tokio::test]
async fn hot_reload_follows_a_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let v1 = root.join("..2026_01");
    std::fs::create_dir(&v1).expect("mkdir");
    std::fs::write(v1.join("edge.yaml"), RULES).expect("write");
    symlink("..2026_01", root.join("..data")).expect("symlink");
    symlink("..data/edge.yaml", root.join("edge.yaml")).expect("symlink");
    let sc = Sidecar::start(Some(root), &[]);
    assert_eq!(remaining(&sc, "edge", "api_key", "a").await.1, 2);

    // kubelet: write the new version dir, point a temp link at it, rename over `..data`.
    let v2 = root.join("..2026_02");
    std::fs::create_dir(&v2).expect("mkdir");
    std::fs::write(
        v2.join("edge.yaml"),
        RULES.replace("requests_per_unit: 3", "requests_per_unit: 30"),
    )
    .expect("write");
    symlink("..2026_02", root.join("..data_tmp")).expect("symlink");
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap");
    std::fs::remove_dir_all(&v1).expect("rm old");
    eventually(
        Duration::from_secs(10),
        "swapped config in force",
        || async { remaining(&sc, "edge", "api_key", "b").await.1 == 29 },
    )
    .await;
}

#[tokio::test]
async fn hot_reload_handles_a_burst_of_writes() {
    let dir = config_dir(RULES);
    let file = dir.path().join("edge.yaml");
    let sc = Sidecar::start(Some(dir.path()), &[]);
    for n in 10..60 {
        write_atomically(
            &file,
            &RULES.replace("requests_per_unit: 3", &format!("requests_per_unit: {n}")),
        );
    }
    eventually(
        Duration::from_secs(10),
        "final version in force",
        || async {
            remaining(&sc, "edge", "api_key", &format!("z{}", rand_suffix()))
                .await
                .1
                == 58
        },
    )
    .await;
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A domain with a dot keeps its name in the `domain` label (the stat key is never split
/// again at its first dot), and a detailed series carries its value apart.
#[tokio::test]
async fn metrics_label_a_dotted_domain_correctly() {
    let dir = config_dir(
        "domain: api.v1\ndescriptors:\n  - key: path\n    detailed_metric: true\n    rate_limit: {unit: hour, requests_per_unit: 5}\n",
    );
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let mut client = sc.client().await;
    client
        .should_rate_limit(request("api.v1", &[&[("path", "/a.b")]]))
        .await
        .expect("rpc");
    let (_, metrics) = sc.get("/metrics").await;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ratelimit_service_rate_limit_total_hits{"))
        .collect();
    assert!(
        series
            .contains(&r#"ratelimit_service_rate_limit_total_hits{domain="api.v1",key="path"} 1"#),
        "{series:?}"
    );
    assert!(
        series.contains(
            &r#"ratelimit_service_rate_limit_total_hits{domain="api.v1",key="path",value="path_/a.b"} 1"#
        ),
        "{series:?}"
    );
    assert!(!metrics.contains(r#"domain="api""#), "{metrics}");
}
