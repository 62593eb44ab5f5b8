//! End to end: real HTTP and gRPC through a real Envoy running the shipped
//! `ext-authz.yaml` to a real ratethrottle answering Check — what clients actually see.

mod support;

use std::time::Duration;
use support::envoy::Envoy;
use support::{Sidecar, http_request, http_with};

const TOKEN: &str = "e2e-token";

/// Envoy's downstream is this test, on 127.0.0.1: that is the client IP Check sees.
const SETTINGS: &str = r#"
settings:
  admin_token: e2e-token
authz:
  domain: edge
  identity:
    sources:
      - header: x-api-key
        name: api_key
      - client_ip
  policies:
    - name: api
      match: {path: {prefix: /api/}}
      descriptors:
        - [{generic_key: {descriptor_value: api}}, {identity: {}}]
    - name: health
      match: {grpc: {service: grpc.health.v1.Health}}
      descriptors:
        - [{grpc_service: {}}, {identity: {}}]
  graphql:
    paths: [/graphql]
    max_depth: 3
domains:
  - domain: edge
    descriptors:
      - key: generic_key
        value: api
        descriptors:
          - key: identity
            rate_limit: {unit: minute, requests_per_unit: 2}
      - key: grpc_service
        value: grpc.health.v1.Health
        descriptors:
          - key: identity
            rate_limit: {unit: minute, requests_per_unit: 1}
"#;

fn start() -> (tempfile::TempDir, Sidecar, Envoy) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, SETTINGS).expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let envoy = Envoy::start("ext-authz.yaml", &[sc.grpc], |t| t);
    (dir, sc, envoy)
}

#[tokio::test]
async fn allowed_limited_and_blocked_answers_reach_the_client_as_sent() {
    let (_dir, sc, envoy) = start();
    let get = |key: &'static str| {
        let addr = envoy.listener;
        async move { http_request(addr, "GET", "/api/items", &[("x-api-key", key)], "").await }
    };
    for _ in 0..2 {
        let r = get("alice").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{r:?}");
    }
    let r = get("alice").await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!((1..=60).contains(&retry), "{r:?}");
    let body: serde_json::Value = serde_json::from_str(&r.body).expect("json body");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(get("bob").await.status, 200, "another identity");

    // Block this client's address at run time: Envoy answers 403 with the public code only.
    let auth = format!("Bearer {TOKEN}");
    let (code, _) = http_with(
        sc.admin,
        "POST",
        "/v1/lists/block",
        r#"{"value": "127.0.0.1", "reason": "internal note", "code": "e2e"}"#,
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(code, 201);
    let r = get("carol").await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body, r#"{"code":"e2e","error":"blocked"}"#);
    assert!(!r.body.contains("internal note"));
}

#[tokio::test]
async fn graphql_errors_come_back_as_graphql_json_through_envoy() {
    let (_dir, _sc, envoy) = start();
    let post = |body: &'static str| {
        let addr = envoy.listener;
        async move {
            http_request(
                addr,
                "POST",
                "/graphql",
                &[("content-type", "application/json")],
                body,
            )
            .await
        }
    };
    let ok = post(r#"{"query": "{ me { name } }"}"#).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    // Too deep through a fragment: Envoy forwarded the body (with_request_body).
    let deep = post(r#"{"query": "{ a { ...F } } fragment F on A { b { c { d } } }"}"#).await;
    assert_eq!(deep.status, 400, "{deep:?}");
    let body: serde_json::Value = serde_json::from_str(&deep.body).expect("json");
    assert_eq!(body["errors"][0]["extensions"]["code"], "QUERY_TOO_DEEP");
    let bad = post(r#"{"query": "{ a { "}"#).await;
    assert_eq!(bad.status, 400);
    let body: serde_json::Value = serde_json::from_str(&bad.body).expect("json");
    assert_eq!(
        body["errors"][0]["extensions"]["code"],
        "GRAPHQL_PARSE_FAILED"
    );
}

#[tokio::test]
async fn a_limited_grpc_call_gets_resource_exhausted_through_envoy() {
    let (_dir, _sc, envoy) = start();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", envoy.listener))
        .expect("uri")
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to envoy");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    // The stand-in upstream answers HTTP 200 "ok", which is no gRPC answer: the first call
    // passing ext_authz fails upstream with something other than RESOURCE_EXHAUSTED.
    let first = client
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(
        first
            .as_ref()
            .err()
            .is_none_or(|e| e.code() != tonic::Code::ResourceExhausted),
        "{first:?}"
    );
    let err = client
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect_err("limited");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("rate limited: retry after "),
        "{err:?}"
    );
}

/// The shipped config with both filters: ext_authz resolves the identity, the rate limit
/// filter counts per that identity, blocks and guards answer first.
const BOTH: &str = r#"
settings:
  admin_token: e2e-token
authz:
  domain: edge
  identity:
    xff_num_trusted_hops: 0
    sources:
      - header: x-api-key
        name: api_key
      - client_ip
  lists:
    allow:
      - api_key:vip
  graphql:
    paths: [/graphql]
    max_depth: 3
domains:
  - domain: edge
    descriptors: []
  - domain: example
    descriptors:
      - key: identity
        rate_limit: {unit: minute, requests_per_unit: 3}
"#;

#[tokio::test]
async fn both_filters_in_the_recommended_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, BOTH).expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let envoy = Envoy::start("ratelimit-and-ext-authz.yaml", &[sc.grpc], |t| t);
    let get = |headers: Vec<(&'static str, &'static str)>| {
        let addr = envoy.listener;
        async move { http_request(addr, "GET", "/api/items", &headers, "").await }
    };
    // The rate limit filter counts per identity ext_authz resolved; a client's own
    // x-ratethrottle-identity header cannot pick another counter.
    let mut statuses = Vec::new();
    for spoof in ["api_key:a", "api_key:b", "api_key:c", "api_key:d"] {
        let r = get(vec![
            ("x-api-key", "dave"),
            ("x-ratethrottle-identity", spoof),
        ])
        .await;
        statuses.push(r.status);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    assert_eq!(get(vec![("x-api-key", "erin")]).await.status, 200);

    // GraphQL over the depth limit: a GraphQL error from ext_authz, before any counting.
    let deep = r#"{"query":"{ a { b { c { d { e } } } } }"}"#;
    let r = http_request(
        envoy.listener,
        "POST",
        "/graphql",
        &[("content-type", "application/json"), ("x-api-key", "frank")],
        deep,
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    let body: serde_json::Value = serde_json::from_str(&r.body).expect("graphql json");
    assert!(body["errors"][0]["message"].is_string(), "{body}");

    // Block the client's network: 403 whatever x-forwarded-for it claims.
    let auth = format!("Bearer {TOKEN}");
    let (code, _) = http_with(
        sc.admin,
        "POST",
        "/v1/lists/block",
        r#"{"value": "127.0.0.0/8", "reason": "e2e", "code": "e2e"}"#,
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(code, 201);
    for xff in ["", "1.2.3.4", "8.8.8.8, 9.9.9.9"] {
        let mut headers = vec![("x-api-key", "grace")];
        if !xff.is_empty() {
            headers.push(("x-forwarded-for", xff));
        }
        let r = get(headers).await;
        assert_eq!(r.status, 403, "xff {xff:?}: {r:?}");
    }
}

#[tokio::test]
async fn an_allowlisted_client_is_never_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(
        &file,
        SETTINGS.replace(
            "  graphql:",
            "  lists:\n    allow:\n      - api_key:vip\n  graphql:",
        ),
    )
    .expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let envoy = Envoy::start("ext-authz.yaml", &[sc.grpc], |t| t);
    for _ in 0..10 {
        let r = http_request(
            envoy.listener,
            "GET",
            "/api/items",
            &[("x-api-key", "vip")],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // The same policy limits everyone else at 2.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            http_request(
                envoy.listener,
                "GET",
                "/api/items",
                &[("x-api-key", "norm")],
                "",
            )
            .await
            .status,
        );
    }
    assert_eq!(statuses, vec![200, 200, 429]);
}

/// A JWT whose identity claim carries CR LF must never become a header upstream: through a
/// real Envoy the client gets 401 and the upstream (which echoes what it received) sees no
/// injected header; a clean claim arrives as the identity header.
#[tokio::test]
async fn jwt_claims_cannot_inject_headers_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(
        &file,
        "authz:\n  identity:\n    sources:\n      - jwt: {hs256_secret: s3cret}\n        name: user\n      - client_ip\n",
    )
    .expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    // The stand-in upstream answers with the identity and injected headers it received.
    let envoy = Envoy::start("ext-authz.yaml", &[sc.grpc], |t| {
        let direct = r#"direct_response: { status: 200, body: { inline_string: "ok\n" } }"#;
        let (before, _) = t.split_once(direct).expect("upstream route");
        let indent = before.rsplit('\n').next().unwrap_or_default();
        t.replace(
            direct,
            &format!(
                "{direct}\n{indent}response_headers_to_add:\n{indent}  - header: {{ key: x-seen-identity, value: \"%REQ(x-ratethrottle-identity)%\" }}\n{indent}  - header: {{ key: x-seen-injected, value: \"%REQ(x-injected)%\" }}"
            ),
        )
    });
    let token = |sub: &str| {
        let claims =
            serde_json::json!({"sub": sub, "exp": jsonwebtoken::get_current_timestamp() + 300});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"s3cret"),
        )
        .expect("sign")
    };
    let get = |sub: &str| {
        let auth = format!("Bearer {}", token(sub));
        let addr = envoy.listener;
        async move { http_request(addr, "GET", "/", &[("authorization", auth.as_str())], "").await }
    };
    let ok = get("alice/42").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        ok.header("x-seen-identity"),
        Some("user:alice/42"),
        "{ok:?}"
    );
    assert!(
        ok.header("x-seen-injected").is_none_or(str::is_empty),
        "{ok:?}"
    );

    for sub in ["a\r\nx-injected: 1", "a\nx-injected: 1", "a\rx-injected: 1"] {
        let r = get(sub).await;
        assert_eq!(r.status, 401, "{sub:?}: {r:?}");
        assert!(
            r.header("x-seen-injected").is_none_or(str::is_empty),
            "{r:?}"
        );
        assert!(r.header("x-injected").is_none(), "{r:?}");
    }
}
