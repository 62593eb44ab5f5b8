//! ext_authz over real gRPC against the real binary: every stage and answer of the Check
//! pipeline with realistic `AttributeContext` requests.
// Helpers outside #[test] fns unwrap too: a panic here is a failed assertion.
#![allow(clippy::unwrap_used)]

mod support;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use std::path::Path;
use std::time::Duration;
use support::check::{Answer, Check};
use support::{BIN, Sidecar, eventually, http_with, write_atomically};

const TOKEN: &str = "t0ken-for-tests";

/// The settings file the tests run with: every identity source, both lists, policies for
/// REST and gRPC, the GraphQL and WebSocket guards, and the rules they count on.
const CONFIG: &str = r#"
settings:
  admin_token: t0ken-for-tests
authz:
  domain: edge
  identity:
    xff_num_trusted_hops: 1
    sources:
      - header: x-api-key
        name: api_key
      - jwt:
          hs256_secret: s3cret
          rsa_public_key_file: rsa.pub.pem
          ec_public_key_file: ec.pub.pem
          jwks_file: jwks.json
          issuer: https://issuer.test
          audiences: [api]
          leeway: 0
        name: user
      - mtls
      - client_ip
    strip_headers: [x-user-id]
  lists:
    allow:
      - {value: 198.51.100.0/24, reason: synthetic monitoring}
      - user:ops
    block:
      - {value: 203.0.113.0/24, reason: "abuse ticket 4521", code: abuse}
      - {value: "2001:db8:bad::/48", reason: scanners}
      - {value: 192.0.2.1, reason: long gone, expires: 2000-01-01T00:00:00Z}
      - api_key:stolen
  policies:
    - name: login
      match: {methods: [POST], path: {exact: /login}}
      descriptors:
        - [{generic_key: {descriptor_value: login}}, {remote_address: {}}]
    - name: api
      match: {hosts: [api.example.com], path: {prefix: /api/}}
      descriptors:
        - [{generic_key: {descriptor_value: api}}, {identity: {}}]
    - name: cart
      match: {grpc: {service: shop.Cart}}
      descriptors:
        - [{grpc_service: {}}, {grpc_method: {}}, {identity: {}}]
  graphql:
    paths: [/graphql]
    max_depth: 4
    max_complexity: 200
    list_arguments: [first, limit]
  websocket: {}
  rate_limit_headers: true
domains:
  - domain: edge
    descriptors:
      - key: generic_key
        value: login
        descriptors:
          - key: remote_address
            rate_limit: {unit: minute, requests_per_unit: 3}
      - key: generic_key
        value: api
        descriptors:
          - key: identity
            rate_limit: {unit: minute, requests_per_unit: 5, algorithm: sliding_window_log}
      - key: grpc_service
        value: shop.Cart
        descriptors:
          - key: grpc_method
            value: Checkout
            descriptors:
              - key: identity
                rate_limit: {unit: minute, requests_per_unit: 2, algorithm: token_bucket}
      - key: generic_key
        value: graphql_cost
        descriptors:
          - key: identity
            rate_limit: {unit: hour, requests_per_unit: 400, algorithm: token_bucket}
      - key: generic_key
        value: websocket
        descriptors:
          - key: identity
            rate_limit: {unit: minute, requests_per_unit: 2, algorithm: gcra}
"#;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt"))
}

/// A config directory holding `ratethrottle.yaml` and the JWT public keys.
fn config_dir(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["rsa.pub.pem", "ec.pub.pem", "jwks.json"] {
        std::fs::copy(fixtures().join(f), dir.path().join(f)).expect("copy key");
    }
    std::fs::write(dir.path().join("ratethrottle.yaml"), yaml).expect("write config");
    dir
}

fn start() -> (tempfile::TempDir, Sidecar) {
    let dir = config_dir(CONFIG);
    let sc = Sidecar::start(Some(&dir.path().join("ratethrottle.yaml")), &[]);
    (dir, sc)
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn claims(sub: &str, exp: u64) -> serde_json::Value {
    serde_json::json!({"sub": sub, "iss": "https://issuer.test", "aud": "api", "exp": exp})
}

fn jwt(alg: Algorithm, claims: &serde_json::Value) -> String {
    let (key, kid) = match alg {
        Algorithm::HS256 => (EncodingKey::from_secret(b"s3cret"), None),
        Algorithm::RS256 => (
            EncodingKey::from_rsa_pem(&std::fs::read(fixtures().join("rsa.key.pem")).unwrap())
                .unwrap(),
            None,
        ),
        Algorithm::ES256 => (
            EncodingKey::from_ec_pem(&std::fs::read(fixtures().join("ec.key.pem")).unwrap())
                .unwrap(),
            None,
        ),
        other => panic!("{other:?}"),
    };
    let mut header = Header::new(alg);
    header.kid = kid;
    encode(&header, claims, &key).unwrap()
}

async fn admin(
    sc: &Sidecar,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let (code, body) = http_with(sc.admin, method, path, body, &headers).await;
    (
        code,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn assert_blocked(a: &Answer, code: &str) {
    assert_eq!(a.http, 403, "{a:?}");
    assert_eq!(a.grpc_code, 7, "PERMISSION_DENIED: {a:?}");
    assert_eq!(
        a.json(),
        serde_json::json!({"error": "blocked", "code": code})
    );
}

#[tokio::test]
async fn allowed_requests_carry_the_identity_upstream_and_lose_spoofable_headers() {
    let (_dir, sc) = start();
    let a = sc
        .check(
            &Check::new("10.0.0.2")
                .header("x-forwarded-for", "192.0.2.10")
                .header("x-user-id", "admin")
                .header("x-ratethrottle-identity", "user:admin"),
        )
        .await;
    assert!(a.ok(), "{a:?}");
    // The client's own copy is overwritten, and the forgeable header removed.
    assert_eq!(a.header("x-ratethrottle-identity"), Some("ip:192.0.2.10"));
    assert!(a.removed.contains(&"x-user-id".to_string()), "{a:?}");

    let a = sc
        .check(&Check::new("10.0.0.2").header("x-api-key", "k-123"))
        .await;
    assert_eq!(a.header("x-ratethrottle-identity"), Some("api_key:k-123"));
    let a = sc
        .check(&Check::new("10.0.0.2").principal("spiffe://shop/ns/default/sa/web"))
        .await;
    assert_eq!(
        a.header("x-ratethrottle-identity"),
        Some("mtls:spiffe://shop/ns/default/sa/web")
    );
    // IPv6 clients and IPv4-mapped forms are canonical.
    let a = sc.check(&Check::new("2001:DB8:0:1::7")).await;
    assert_eq!(
        a.header("x-ratethrottle-identity"),
        Some("ip:2001:db8:0:1::7")
    );
    let a = sc.check(&Check::new("::ffff:192.0.2.44")).await;
    assert_eq!(a.header("x-ratethrottle-identity"), Some("ip:192.0.2.44"));
}

#[tokio::test]
async fn blocklist_matches_ipv4_ipv6_cidr_edges_identities_and_ignores_expired_entries() {
    let (_dir, sc) = start();
    for ip in ["203.0.113.0", "203.0.113.255", "::ffff:203.0.113.9"] {
        let a = sc.check(&Check::new(ip)).await;
        assert_blocked(&a, "abuse");
        assert!(
            !a.body.contains("ticket"),
            "internal reason leaked: {}",
            a.body
        );
    }
    for ip in ["203.0.112.255", "203.0.114.0"] {
        assert!(
            sc.check(&Check::new(ip)).await.ok(),
            "{ip} is outside the /24"
        );
    }
    for ip in ["2001:db8:bad::1", "2001:db8:bad:ffff:ffff:ffff:ffff:ffff"] {
        assert_blocked(&sc.check(&Check::new(ip)).await, "network_blocked");
    }
    for ip in ["2001:db8:bac:ffff::1", "2001:db8:bae::"] {
        assert!(
            sc.check(&Check::new(ip)).await.ok(),
            "{ip} is outside the /48"
        );
    }
    // An entry whose expiry passed no longer applies.
    assert!(sc.check(&Check::new("192.0.2.1")).await.ok());
    // Identities are blocked whatever the address.
    let a = sc
        .check(&Check::new("192.0.2.50").header("x-api-key", "stolen"))
        .await;
    assert_blocked(&a, "identity_blocked");
}

#[tokio::test]
async fn allowlist_bypasses_blocks_and_limits() {
    let (_dir, sc) = start();
    for _ in 0..6 {
        let a = sc
            .check(&Check::new("198.51.100.7").method("POST").path("/login"))
            .await;
        assert!(a.ok(), "allowlisted callers are never limited: {a:?}");
        assert_eq!(a.header("x-ratethrottle-identity"), Some("ip:198.51.100.7"));
    }
    let ops = jwt(Algorithm::HS256, &claims("ops", now() + 300));
    let a = sc
        .check(&Check::new("203.0.113.7").header("authorization", &format!("Bearer {ops}")))
        .await;
    assert!(
        a.ok(),
        "an allowlisted identity passes even from a blocked network: {a:?}"
    );
}

#[tokio::test]
async fn a_spoofed_x_forwarded_for_escapes_neither_a_block_nor_a_limit() {
    let (_dir, sc) = start();
    // One trusted hop: the proxy in front of Envoy appended the real client address.
    for fake in ["1.1.1.1", "8.8.8.8", "198.51.100.1"] {
        let a = sc
            .check(
                &Check::new("10.0.0.2").header("x-forwarded-for", &format!("{fake}, 203.0.113.66")),
            )
            .await;
        assert_blocked(&a, "abuse");
    }
    let login = |fake: String| {
        Check::new("10.0.0.2")
            .method("POST")
            .path("/login")
            .header("x-forwarded-for", &format!("{fake}, 192.0.2.77"))
    };
    for i in 0..3 {
        assert!(sc.check(&login(format!("6.6.6.{i}"))).await.ok());
    }
    let a = sc.check(&login("6.6.6.99".into())).await;
    assert_eq!(
        a.http, 429,
        "rotating the leftmost entry must not reset the limit: {a:?}"
    );
}

#[tokio::test]
async fn rate_limited_requests_get_429_with_retry_after_and_quota_headers() {
    let (_dir, sc) = start();
    let login = Check::new("192.0.2.20").method("POST").path("/login");
    for _ in 0..3 {
        let a = sc.check(&login).await;
        assert!(a.ok(), "{a:?}");
    }
    let a = sc.check(&login).await;
    assert_eq!(a.http, 429, "{a:?}");
    assert_eq!(a.grpc_code, 8, "RESOURCE_EXHAUSTED");
    assert_eq!(a.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(a.header("x-ratelimit-remaining"), Some("0"));
    let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        a.header("x-ratelimit-reset"),
        Some(retry.to_string().as_str())
    );
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(a.json()["error"], "rate_limited");
    // Another client address has its own counter; the limit is per policy and address.
    assert!(
        sc.check(&Check::new("192.0.2.21").method("POST").path("/login"))
            .await
            .ok()
    );

    // Policies keyed by identity, with the remaining quota sent upstream.
    let api = |key: &str| {
        Check::new("192.0.2.22")
            .path("/api/orders?page=2")
            .header("x-api-key", key)
    };
    for left in (0..5).rev() {
        let a = sc.check(&api("k-a")).await;
        assert!(a.ok());
        assert_eq!(
            a.header("x-ratelimit-remaining"),
            Some(left.to_string().as_str())
        );
    }
    assert_eq!(sc.check(&api("k-a")).await.http, 429);
    assert!(
        sc.check(&api("k-b")).await.ok(),
        "another identity, another counter"
    );
    // Host and path must both match the policy.
    assert!(sc.check(&api("k-a").host("other.example.com")).await.ok());
    assert!(
        sc.check(
            &Check::new("192.0.2.22")
                .path("/apix")
                .header("x-api-key", "k-a")
        )
        .await
        .ok()
    );
}

#[tokio::test]
async fn jwt_identity_good_bad_and_expired_signatures() {
    let (_dir, sc) = start();
    let bearer = |t: &str| Check::new("192.0.2.30").header("authorization", &format!("Bearer {t}"));
    for (alg, who) in [
        (Algorithm::HS256, "alice"),
        (Algorithm::RS256, "bob"),
        (Algorithm::ES256, "carol"),
    ] {
        let a = sc
            .check(&bearer(&jwt(alg, &claims(who, now() + 300))))
            .await;
        assert!(a.ok(), "{alg:?}: {a:?}");
        assert_eq!(
            a.header("x-ratethrottle-identity"),
            Some(format!("user:{who}").as_str())
        );
    }
    // The JWKS key (selected by kid) verifies too.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixtures().join("rsa.key.pem")).unwrap()).unwrap();
    let t = encode(&h, &claims("dave", now() + 300), &key).unwrap();
    assert_eq!(
        sc.check(&bearer(&t))
            .await
            .header("x-ratethrottle-identity"),
        Some("user:dave")
    );

    // A token signed with another secret.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims("mallory", now() + 300),
        &EncodingKey::from_secret(b"guessed"),
    )
    .unwrap();
    let a = sc.check(&bearer(&forged)).await;
    assert_eq!((a.http, a.grpc_code), (401, 16), "{a:?}");
    assert_eq!(
        a.json(),
        serde_json::json!({"error": "unauthenticated", "code": "invalid_token"})
    );
    assert!(
        a.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    // Tampered payload with the original signature.
    let good = jwt(Algorithm::RS256, &claims("bob", now() + 300));
    let root = jwt(Algorithm::RS256, &claims("root", now() + 300));
    let parts: Vec<&str> = good.split('.').collect();
    let evil_payload = root.split('.').nth(1).unwrap();
    let tampered = format!("{}.{}.{}", parts[0], evil_payload, parts[2]);
    assert_eq!(sc.check(&bearer(&tampered)).await.http, 401);
    // Expired (no leeway configured).
    let a = sc
        .check(&bearer(&jwt(Algorithm::ES256, &claims("carol", now() - 5))))
        .await;
    assert_eq!(a.http, 401);
    assert_eq!(a.json()["code"], "expired_token");
    // Wrong audience, garbage.
    let wrong_aud = serde_json::json!({"sub": "a", "iss": "https://issuer.test", "aud": "other", "exp": now() + 60});
    assert_eq!(
        sc.check(&bearer(&jwt(Algorithm::HS256, &wrong_aud)))
            .await
            .http,
        401
    );
    assert_eq!(sc.check(&bearer("not-a-jwt")).await.http, 401);
    // No bearer token: the next source (the client IP) names the caller.
    let a = sc
        .check(&Check::new("192.0.2.30").header("authorization", "Basic dXNlcjpwdw=="))
        .await;
    assert_eq!(a.header("x-ratethrottle-identity"), Some("ip:192.0.2.30"));
}

#[tokio::test]
async fn graphql_depth_is_counted_through_fragments() {
    let (_dir, sc) = start();
    let ok = "query { me { orders(first: 2) { id } } }";
    let a = sc.check(&Check::new("192.0.2.40").graphql(ok, None)).await;
    assert!(a.ok(), "{a:?}");
    // Each fragment is shallow; together they are 5 deep (the seed library saw 2).
    let sneaky = "query { me { ...A } }
        fragment A on User { orders(first: 1) { ...B } }
        fragment B on Order { items { ... on Item { product { name } } } }";
    let a = sc
        .check(&Check::new("192.0.2.40").graphql(sneaky, None))
        .await;
    assert_eq!(a.http, 400, "{a:?}");
    assert_eq!(a.grpc_code, 3);
    let body = a.json();
    assert_eq!(body["errors"][0]["extensions"]["code"], "QUERY_TOO_DEEP");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("depth 5"),
        "{body}"
    );
}

#[tokio::test]
async fn graphql_complexity_multiplies_list_arguments_and_is_charged_to_a_budget() {
    let (_dir, sc) = start();
    let q = "query Q($n: Int) { products(first: $n) { id name } viewer { id } }";
    let ask = |n: u64| {
        Check::new("192.0.2.41")
            .header("x-api-key", "gql")
            .graphql(q, Some(serde_json::json!({"n": n})))
    };
    // 60 × (1 + 2) + (1 + 1) = 182 ≤ 200.
    assert!(sc.check(&ask(60)).await.ok());
    // 70 × 3 + 2 = 212 > 200.
    let a = sc.check(&ask(70)).await;
    assert_eq!(a.http, 400);
    assert_eq!(
        a.json()["errors"][0]["extensions"]["code"],
        "QUERY_TOO_COMPLEX"
    );
    // Literal arguments multiply too, nested lists multiply each other.
    let nested = "{ users(limit: 10) { friends(first: 10) { name } } }";
    let a = sc
        .check(
            &Check::new("192.0.2.41")
                .header("x-api-key", "gql")
                .graphql(nested, None),
        )
        .await;
    assert_eq!(
        a.json()["errors"][0]["extensions"]["code"],
        "QUERY_TOO_COMPLEX"
    );
    // The budget is 400 per hour per identity: 182 was charged, 182 more fits, then not.
    assert!(sc.check(&ask(60)).await.ok());
    let a = sc.check(&ask(60)).await;
    assert_eq!(a.http, 429, "{a:?}");
    assert_eq!(a.json()["errors"][0]["extensions"]["code"], "RATE_LIMITED");
    assert!(a.header("retry-after").is_some());
    // A cheap query still fits the 36 left; another identity has its own budget.
    assert!(
        sc.check(
            &Check::new("192.0.2.41")
                .header("x-api-key", "gql")
                .graphql("{ viewer { id } }", None)
        )
        .await
        .ok()
    );
    assert!(
        sc.check(
            &Check::new("192.0.2.41")
                .header("x-api-key", "other")
                .graphql(q, Some(serde_json::json!({"n": 60})))
        )
        .await
        .ok()
    );
}

#[tokio::test]
async fn malformed_graphql_gets_a_400_graphql_error_not_a_crash() {
    let (_dir, mut sc) = start();
    let cases: Vec<Check> = vec![
        Check::new("192.0.2.42").graphql("query { me { ", None),
        Check::new("192.0.2.42").graphql("{ a(x: ) }", None),
        Check::new("192.0.2.42").graphql("type Query { a: Int }", None),
        Check::new("192.0.2.42").graphql(&"{a".repeat(50_000), None),
        Check::new("192.0.2.42")
            .method("POST")
            .path("/graphql")
            .body("application/json", "{not json"),
        Check::new("192.0.2.42")
            .method("POST")
            .path("/graphql")
            .body("application/json", "{\"variables\": {}}"),
        Check::new("192.0.2.42")
            .method("POST")
            .path("/graphql")
            .body("application/json", ""),
        Check::new("192.0.2.42")
            .method("POST")
            .path("/graphql")
            .body("application/graphql", "{ ...Missing }"),
    ];
    for c in &cases {
        let a = sc.check(c).await;
        assert_eq!(a.http, 400, "{a:?}");
        let body = a.json();
        let msg = body["errors"][0]["message"]
            .as_str()
            .expect("GraphQL-style error");
        assert!(!msg.is_empty());
    }
    let a = sc.check(&cases[0]).await;
    assert_eq!(
        a.json()["errors"][0]["extensions"]["code"],
        "GRAPHQL_PARSE_FAILED"
    );
    assert!(a.json()["errors"][0]["locations"][0]["line"].is_number());
    assert!(sc.child_alive());
    assert_eq!(sc.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn websocket_upgrades_are_limited_per_identity() {
    let (_dir, sc) = start();
    let upgrade = |ip: &str| {
        Check::new(ip)
            .path("/ws/prices")
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    // GCRA, 2 per minute with a burst of 2.
    assert!(sc.check(&upgrade("192.0.2.60")).await.ok());
    assert!(sc.check(&upgrade("192.0.2.60")).await.ok());
    let a = sc.check(&upgrade("192.0.2.60")).await;
    assert_eq!(a.http, 429, "{a:?}");
    assert!(a.header("retry-after").is_some());
    // Other identities, and plain requests of the same one, are not affected.
    assert!(sc.check(&upgrade("192.0.2.61")).await.ok());
    assert!(
        sc.check(&Check::new("192.0.2.60").path("/ws/prices"))
            .await
            .ok()
    );
}

#[tokio::test]
async fn grpc_methods_are_limited_and_denials_speak_grpc() {
    let (_dir, sc) = start();
    let call = |method: &str| {
        Check::new("192.0.2.70")
            .header("x-api-key", "shopper")
            .grpc("shop.Cart", method)
    };
    assert!(sc.check(&call("Checkout")).await.ok());
    assert!(sc.check(&call("Checkout")).await.ok());
    let a = sc.check(&call("Checkout")).await;
    assert_eq!(a.grpc_code, 8, "{a:?}");
    assert_eq!(
        a.header("grpc-status"),
        Some("8"),
        "RESOURCE_EXHAUSTED for gRPC clients"
    );
    assert!(
        a.header("grpc-message")
            .is_some_and(|m| m.starts_with("rate limited: retry after ")),
        "{a:?}"
    );
    assert_eq!(
        a.body,
        a.header("grpc-message").unwrap(),
        "Envoy makes the body the grpc-message"
    );
    // Other methods of the service have no rule; other services match no policy.
    for _ in 0..5 {
        assert!(sc.check(&call("View")).await.ok());
        assert!(
            sc.check(
                &Check::new("192.0.2.70")
                    .header("x-api-key", "shopper")
                    .grpc("shop.Catalog", "Checkout")
            )
            .await
            .ok()
        );
    }
    // A blocked gRPC caller gets PERMISSION_DENIED.
    let a = sc
        .check(&Check::new("203.0.113.1").grpc("shop.Cart", "View"))
        .await;
    assert_eq!(a.header("grpc-status"), Some("7"));
    assert_eq!(a.grpc_code, 7);
    assert_eq!(a.body, "blocked: abuse");
}

#[tokio::test]
async fn malformed_check_requests_follow_the_failure_mode() {
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    let (_dir, mut sc) = start();
    let client = sc.authz().await;
    let ask = |r: CheckRequest| {
        let mut c = client.clone();
        async move { Answer::of(&c.check(r).await.expect("answered").into_inner()) }
    };
    let a = ask(CheckRequest::default()).await;
    assert_eq!((a.http, a.grpc_code), (400, 3), "{a:?}");
    assert_eq!(a.json()["code"], "missing_attributes");
    let a = ask(CheckRequest {
        attributes: Some(AttributeContext::default()),
    })
    .await;
    assert_eq!(a.json()["code"], "missing_attributes");
    let huge = Check::new("192.0.2.80").header("x-junk", &"j".repeat(200_000));
    let a = ask(huge.build()).await;
    assert_eq!(a.http, 431);
    assert_eq!(a.json()["code"], "headers_too_large");
    let mut bad_body = Check::new("192.0.2.80").graphql("{ a }", None).build();
    if let Some(http) = bad_body
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.body.clear();
        http.raw_body = vec![0xff, 0xfe, 0x00];
    }
    let a = ask(bad_body).await;
    assert_eq!(a.json()["code"], "bad_body");
    assert!(sc.child_alive());
    drop(client);

    // With failure_mode: allow the same requests pass, without any identity header.
    let dir = config_dir(&CONFIG.replacen(
        "  domain: edge\n",
        "  domain: edge\n  failure_mode: allow\n",
        1,
    ));
    let open = Sidecar::start(Some(&dir.path().join("ratethrottle.yaml")), &[]);
    let mut client = open.authz().await;
    let r = client
        .check(CheckRequest::default())
        .await
        .expect("answered")
        .into_inner();
    let a = Answer::of(&r);
    assert!(a.ok(), "{a:?}");
    assert!(a.removed.contains(&"x-ratethrottle-identity".to_string()));
}

/// A CheckRequest's own bytes, sent as they are (field 1, `attributes`, as raw bytes).
#[derive(Clone, PartialEq, prost::Message)]
struct RawCheck {
    #[prost(bytes = "vec", tag = "1")]
    attributes: Vec<u8>,
}

/// `req` encoded, with every `marker` (ASCII) replaced by as many bytes `0xE9` (Latin-1 `é`,
/// no UTF-8), sent as it is.
async fn ask_with_latin1(
    sc: &Sidecar,
    req: &envoy_types::pb::envoy::service::auth::v3::CheckRequest,
    marker: &str,
) -> Answer {
    use prost::Message;
    let mut bytes = req.encode_to_vec();
    let m = marker.as_bytes();
    let mut i = 0;
    while let Some(at) = bytes[i..].windows(m.len()).position(|w| w == m) {
        bytes[i + at..i + at + m.len()].fill(0xe9);
        i += at + m.len();
    }
    assert!(i > 0, "marker {marker} not in the request");
    let raw = RawCheck::decode(&bytes[..]).expect("a CheckRequest is field 1");
    let r = raw_call(sc, "/envoy.service.auth.v3.Authorization/Check", raw)
        .await
        .expect("answered, not failed");
    Answer::of(&r)
}

/// `body` as it is to `path` on the gRPC port.
async fn raw_call(
    sc: &Sidecar,
    path: &'static str,
    body: RawCheck,
) -> Result<envoy_types::pb::envoy::service::auth::v3::CheckResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(sc.channel().await);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<
        RawCheck,
        envoy_types::pb::envoy::service::auth::v3::CheckResponse,
    >::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let r = grpc.unary(tonic::Request::new(body), path, codec).await?;
    Ok(r.into_inner())
}

/// Envoy copies header bytes as they arrived; an HTTP/1 client may send Latin-1 (obs-text).
/// Only what a stage reads must be text: an unread header that is not UTF-8 does not fail
/// the Check (it used to be INVALID_ARGUMENT, which Envoy turns into a 403 for a client
/// that did nothing wrong), an identity header that is not UTF-8 identifies nobody (the
/// next source decides), and a path that is not UTF-8 is a malformed request (400).
#[tokio::test]
async fn only_the_attributes_a_stage_reads_must_be_utf8() {
    let (_dir, mut sc) = start();
    let plain = Check::new("192.0.2.90")
        .host("api.example.com")
        .path("/api/x")
        .header("x-api-key", "alice")
        .header("user-agent", "MARKER-UA");
    let a = ask_with_latin1(&sc, &plain.build(), "MARKER-UA").await;
    assert!(a.ok(), "{a:?}");
    assert_eq!(a.header("x-ratethrottle-identity"), Some("api_key:alice"));

    let key = Check::new("192.0.2.91")
        .host("api.example.com")
        .path("/api/x")
        .header("x-api-key", "MARKER-KEY");
    let a = ask_with_latin1(&sc, &key.build(), "MARKER-KEY").await;
    assert!(a.ok(), "{a:?}");
    assert_eq!(a.header("x-ratethrottle-identity"), Some("ip:192.0.2.91"));

    let path = Check::new("192.0.2.92").path("/MARKER-PATH");
    let a = ask_with_latin1(&sc, &path.build(), "MARKER-PATH").await;
    assert_eq!((a.http, a.grpc_code), (400, 3), "{a:?}");
    assert_eq!(a.json()["code"], "bad_encoding");

    // The service's route: a method it does not have is UNIMPLEMENTED, as tonic answers.
    let path = "/envoy.service.auth.v3.Authorization/CheckMore";
    let status = raw_call(&sc, path, RawCheck::default())
        .await
        .expect_err("no such method");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(sc.child_alive());
}

#[tokio::test]
async fn admin_list_endpoints_need_the_token_and_changes_apply_at_once() {
    let (_dir, sc) = start();
    let body = r#"{"value": "192.0.2.99", "ttl_seconds": 600, "reason": "credential stuffing", "code": "stuffing"}"#;
    assert_eq!(
        admin(&sc, "POST", "/v1/lists/block", body, None).await.0,
        401
    );
    assert_eq!(
        admin(&sc, "POST", "/v1/lists/block", body, Some("wrong"))
            .await
            .0,
        401
    );
    assert_eq!(admin(&sc, "GET", "/v1/lists", "", None).await.0, 401);
    assert!(sc.check(&Check::new("192.0.2.99")).await.ok());

    let (code, v) = admin(&sc, "POST", "/v1/lists/block", body, Some(TOKEN)).await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["entry"]["value"], "192.0.2.99");
    assert_blocked(&sc.check(&Check::new("192.0.2.99")).await, "stuffing");

    let (code, v) = admin(&sc, "GET", "/v1/lists", "", Some(TOKEN)).await;
    assert_eq!(code, 200);
    let block = v["block"].as_array().unwrap();
    let e = block
        .iter()
        .find(|e| e["value"] == "192.0.2.99")
        .expect("listed");
    assert_eq!(e["reason"], "credential stuffing");
    assert_eq!(e["source"], "runtime");
    assert!(e["expires_at_ms"].as_u64().is_some());
    assert!(
        block
            .iter()
            .any(|e| e["value"] == "203.0.113.0/24" && e["source"] == "config")
    );
    assert!(
        v["allow"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["value"] == "user:ops")
    );

    // CIDRs and IPv6 in the path; identities too.
    let (code, _) = admin(
        &sc,
        "POST",
        "/v1/lists/block",
        r#"{"value": "2001:db8:beef::/64"}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 201);
    assert_blocked(
        &sc.check(&Check::new("2001:db8:beef::42")).await,
        "network_blocked",
    );
    assert_eq!(
        admin(
            &sc,
            "DELETE",
            "/v1/lists/block/2001:db8:beef::/64",
            "",
            Some(TOKEN)
        )
        .await
        .0,
        200
    );
    assert!(sc.check(&Check::new("2001:db8:beef::42")).await.ok());

    assert_eq!(
        admin(&sc, "DELETE", "/v1/lists/block/192.0.2.99", "", Some(TOKEN))
            .await
            .0,
        200
    );
    assert!(sc.check(&Check::new("192.0.2.99")).await.ok());
    assert_eq!(
        admin(&sc, "DELETE", "/v1/lists/block/192.0.2.99", "", Some(TOKEN))
            .await
            .0,
        404
    );

    // The allowlist, runtime: bypasses the config block.
    let (code, _) = admin(
        &sc,
        "POST",
        "/v1/lists/allow",
        r#"{"value": "203.0.113.5"}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 201);
    assert!(sc.check(&Check::new("203.0.113.5")).await.ok());

    // Bad input and settings-file entries are refused with a reason.
    for (path, body, code) in [
        ("/v1/lists/block", r#"{"value": "10.0.0.1/8"}"#, 400),
        ("/v1/lists/block", r#"{"value": ""}"#, 400),
        ("/v1/lists/block", "not json", 400),
        (
            "/v1/lists/block",
            r#"{"value": "1.2.3.4", "ttl_seconds": 0}"#,
            400,
        ),
        (
            "/v1/lists/block",
            r#"{"value": "1.2.3.4", "code": "Has Spaces"}"#,
            400,
        ),
        ("/v1/lists/block", r#"{"value": "203.0.113.0/24"}"#, 409),
        ("/v1/lists/grey", r#"{"value": "1.2.3.4"}"#, 404),
    ] {
        let (got, v) = admin(&sc, "POST", path, body, Some(TOKEN)).await;
        assert_eq!(got, code, "{path} {body}: {v}");
        assert!(v["error"].is_string());
    }
    assert_eq!(
        admin(
            &sc,
            "DELETE",
            "/v1/lists/block/203.0.113.0/24",
            "",
            Some(TOKEN)
        )
        .await
        .0,
        409
    );

    // Secrets never show in the effective configuration.
    let (code, text) = sc.get("/v1/config").await;
    assert_eq!(code, 200);
    assert!(
        text.contains("\"authz\"") && text.contains("<redacted>"),
        "{text}"
    );
    assert!(!text.contains("s3cret") && !text.contains(TOKEN), "{text}");

    // Without a configured token, list management is disabled.
    let dir = config_dir(&CONFIG.replace("  admin_token: t0ken-for-tests\n", "  max_keys: 1000\n"));
    let off = Sidecar::start(Some(&dir.path().join("ratethrottle.yaml")), &[]);
    let (code, v) = admin(&off, "GET", "/v1/lists", "", Some(TOKEN)).await;
    assert_eq!(code, 404);
    assert!(v["error"].as_str().unwrap().contains("disabled"));
}

#[tokio::test]
async fn runtime_entries_expire() {
    let (_dir, sc) = start();
    let (code, _) = admin(
        &sc,
        "POST",
        "/v1/lists/block",
        r#"{"value": "user:temp", "ttl_seconds": 1}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 201);
    let temp = jwt(Algorithm::HS256, &claims("temp", now() + 300));
    let c = Check::new("192.0.2.90").header("authorization", &format!("Bearer {temp}"));
    assert_blocked(&sc.check(&c).await, "identity_blocked");
    eventually(
        Duration::from_secs(3),
        "the entry expires after its TTL",
        || async { sc.check(&c).await.ok() },
    )
    .await;
}

#[tokio::test]
async fn manage_cli_adds_lists_and_removes_entries() {
    let (_dir, sc) = start();
    let addr = sc.admin.to_string();
    let manage = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(["manage", "--admin-addr", &addr])
            .args(args)
            .env_remove("RATETHROTTLE_ADMIN_TOKEN")
            .output()
            .expect("run manage")
    };
    let out = manage(&[
        "--token",
        TOKEN,
        "--blocklist-add",
        "192.0.2.123",
        "--duration",
        "300",
        "--reason",
        "scraper",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("192.0.2.123"));
    assert_blocked(&sc.check(&Check::new("192.0.2.123")).await, "ip_blocked");

    let out = manage(&["--token", TOKEN, "--allowlist-add", "user:partner"]);
    assert!(out.status.success());
    let out = manage(&["--token", TOKEN, "--list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("192.0.2.123") && text.contains("scraper"),
        "{text}"
    );
    assert!(
        text.contains("user:partner") && text.contains("203.0.113.0/24"),
        "{text}"
    );

    let out = manage(&["--token", TOKEN, "--blocklist-remove", "192.0.2.123"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sc.check(&Check::new("192.0.2.123")).await.ok());

    // Refusals are reported with the server's reason and a failing exit code.
    let out = manage(&["--token", "wrong", "--list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = manage(&["--token", TOKEN, "--blocklist-add", "not/a/cidr"]);
    assert_eq!(out.status.code(), Some(1));
    let out = manage(&["--token", TOKEN]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an action is required (clap usage error)"
    );
}

#[tokio::test]
async fn metrics_count_every_outcome_and_stage() {
    let (_dir, sc) = start();
    sc.check(&Check::new("192.0.2.100")).await;
    sc.check(&Check::new("203.0.113.100")).await;
    sc.check(&Check::new("198.51.100.100")).await;
    sc.check(&Check::new("192.0.2.100").graphql("{", None))
        .await;
    let (code, text) = sc.get("/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "ratethrottle_authz_checks_total{outcome=\"allowed\"} 1",
        "ratethrottle_authz_checks_total{outcome=\"blocked\"} 1",
        "ratethrottle_authz_checks_total{outcome=\"allowlisted\"} 1",
        "ratethrottle_authz_checks_total{outcome=\"graphql_rejected\"} 1",
        "ratethrottle_authz_stage_total{stage=\"identity\",result=\"client_ip\"} 4",
        "ratethrottle_authz_stage_total{stage=\"lists\",result=\"block_match\"} 1",
        "ratethrottle_authz_stage_total{stage=\"graphql\",result=\"parse_error\"} 1",
        "ratethrottle_authz_list_entries{list=\"block\"} 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[tokio::test]
async fn authz_settings_hot_reload_and_bad_ones_are_reported_with_lines() {
    let dir = config_dir(CONFIG);
    let file = dir.path().join("ratethrottle.yaml");
    let sc = Sidecar::start(Some(&file), &[]);
    assert!(sc.check(&Check::new("192.0.2.150")).await.ok());
    write_atomically(
        &file,
        &CONFIG.replace(
            "      - api_key:stolen\n",
            "      - api_key:stolen\n      - 192.0.2.150\n",
        ),
    );
    eventually(
        Duration::from_secs(5),
        "the reloaded block list applies",
        || async { sc.check(&Check::new("192.0.2.150")).await.http == 403 },
    )
    .await;

    let bad = CONFIG
        .replace("max_depth: 4", "max_depht: 4")
        .replace("prefix: /api/", "regex: \"/api/(\"");
    let out = std::process::Command::new(BIN)
        .args(["config", "validate"])
        .arg({
            write_atomically(&dir.path().join("bad.yaml"), &bad);
            dir.path().join("bad.yaml")
        })
        .output()
        .expect("validate");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "authz.graphql.max_depht: unknown key \"max_depht\" (did you mean \"max_depth\"?)"
        ),
        "{err}"
    );
    assert!(
        err.contains("authz.policies[1].match.path.regex: invalid regex"),
        "{err}"
    );
    assert!(err.contains("bad.yaml:"), "{err}");
}

#[tokio::test]
async fn the_grpc_port_serves_authorization_with_health_and_reflection() {
    let (_dir, sc) = start();
    let names = support::health_and_reflected_services(
        sc.channel().await,
        "envoy.service.auth.v3.Authorization",
    )
    .await;
    assert!(
        names
            .iter()
            .any(|n| n == "envoy.service.auth.v3.Authorization"),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n == "envoy.service.ratelimit.v3.RateLimitService")
    );
}
