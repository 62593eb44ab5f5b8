//! ext_authz with the Redis store: runtime list changes reach every replica within a second,
//! limits are shared, and a failing Redis keeps the last lists in force. Needs the servers
//! `scripts/test.sh` starts.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};
use support::check::Check;
use support::redis::{RedisServer, standalone_url, unique_prefix};
use support::{Sidecar, eventually, http_with};

const TOKEN: &str = "replica-token";

fn config(storage: &str, prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        r#"
settings:
  storage: {storage}
  admin_token: {TOKEN}
  redis:
    prefix: "{prefix}"
    timeout: 200ms
authz:
  domain: edge
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
            rate_limit: {{unit: minute, requests_per_unit: 3}}
"#
    );
    std::fs::write(dir.path().join("ratethrottle.yaml"), yaml).expect("write");
    dir
}

async fn admin(sc: &Sidecar, method: &str, path: &str, body: &str) -> u16 {
    let auth = format!("Bearer {TOKEN}");
    http_with(sc.admin, method, path, body, &[("authorization", &auth)])
        .await
        .0
}

async fn list(sc: &Sidecar, which: &str) -> String {
    let auth = format!("Bearer {TOKEN}");
    let (code, text) = http_with(
        sc.admin,
        "GET",
        &format!("/v1/lists/{which}"),
        "",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(code, 200, "{text}");
    text
}

#[tokio::test]
async fn blocklist_changes_reach_another_replica_within_a_second() {
    let dir = config(&standalone_url(), &unique_prefix("lists"));
    let file = dir.path().join("ratethrottle.yaml");
    let a = Sidecar::start(Some(&file), &[]);
    let b = Sidecar::start(Some(&file), &[]);
    let victim = Check::new("192.0.2.200");
    assert!(b.check(&victim).await.ok());

    let code = admin(
        &a,
        "POST",
        "/v1/lists/block",
        r#"{"value": "192.0.2.0/24", "reason": "incident 7", "code": "incident"}"#,
    )
    .await;
    assert_eq!(code, 201);
    let added = Instant::now();
    // Replica A applies its own change at once; B within a second.
    assert_eq!(a.check(&victim).await.http, 403);
    eventually(
        Duration::from_secs(1),
        "replica B sees the new block entry",
        || async { b.check(&victim).await.http == 403 },
    )
    .await;
    eprintln!(
        "block reached the other replica after {:?}",
        added.elapsed()
    );
    let body = b.check(&victim).await.json();
    assert_eq!(body["code"], "incident");

    // And back: a removal on B reaches A.
    assert_eq!(
        admin(&b, "DELETE", "/v1/lists/block/192.0.2.0/24", "").await,
        200
    );
    eventually(
        Duration::from_secs(1),
        "replica A sees the removal",
        || async { a.check(&victim).await.ok() },
    )
    .await;

    // Allowlist entries and expiry travel the same way.
    assert_eq!(
        admin(
            &a,
            "POST",
            "/v1/lists/allow",
            r#"{"value": "user:probe", "ttl_seconds": 1}"#
        )
        .await,
        201
    );
    eventually(
        Duration::from_secs(1),
        "B lists the allow entry",
        || async { list(&b, "allow").await.contains("user:probe") },
    )
    .await;
    eventually(
        Duration::from_secs(3),
        "the entry expires everywhere",
        || async { !list(&b, "allow").await.contains("user:probe") },
    )
    .await;
}

#[tokio::test]
async fn ext_authz_limits_are_shared_between_replicas() {
    let dir = config(&standalone_url(), &unique_prefix("authz-limits"));
    let file = dir.path().join("ratethrottle.yaml");
    let a = Sidecar::start(Some(&file), &[]);
    let b = Sidecar::start(Some(&file), &[]);
    let login = Check::new("192.0.2.210").method("POST").path("/login");
    assert!(a.check(&login).await.ok());
    assert!(b.check(&login).await.ok());
    assert!(a.check(&login).await.ok());
    assert_eq!(
        b.check(&login).await.http,
        429,
        "3 per minute across both replicas"
    );
    assert_eq!(a.check(&login).await.http, 429);
}

#[tokio::test]
async fn a_failing_redis_keeps_the_last_lists_and_refuses_changes() {
    let mut redis = RedisServer::start(&[]);
    let dir = config(&redis.url(), &unique_prefix("lists-down"));
    let sc = Sidecar::start(Some(&dir.path().join("ratethrottle.yaml")), &[]);
    assert_eq!(
        admin(
            &sc,
            "POST",
            "/v1/lists/block",
            r#"{"value": "192.0.2.220"}"#
        )
        .await,
        201
    );
    assert_eq!(sc.check(&Check::new("192.0.2.220")).await.http, 403);
    redis.kill();
    eventually(
        Duration::from_secs(5),
        "the sidecar notices Redis is gone",
        || async { sc.get("/readyz").await.1.contains("degraded") },
    )
    .await;
    // Still enforced from the snapshot, and a change is refused rather than kept locally.
    assert_eq!(sc.check(&Check::new("192.0.2.220")).await.http, 403);
    assert_eq!(
        admin(
            &sc,
            "POST",
            "/v1/lists/block",
            r#"{"value": "192.0.2.221"}"#
        )
        .await,
        503
    );
    redis.restart();
    // The restarted server is empty: the lists follow it once it answers again.
    eventually(
        Duration::from_secs(5),
        "lists follow Redis again",
        || async {
            admin(
                &sc,
                "POST",
                "/v1/lists/block",
                r#"{"value": "192.0.2.221"}"#,
            )
            .await
                == 201
        },
    )
    .await;
    assert_eq!(sc.check(&Check::new("192.0.2.221")).await.http, 403);
}
