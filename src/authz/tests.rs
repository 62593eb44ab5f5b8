//! The Check pipeline as plain Rust: no gRPC, an injected clock, so expiry and windows are
//! tested without sleeping. (The gRPC face is tested in tests/authz.rs.)

#[path = "../../tests/support/check.rs"]
mod check;

use super::*;
use crate::config::parse_str;
use crate::limiter::{ManualClock, NANOS_PER_SECOND};
use crate::rules::{RuleSet, StatsRegistry};
use crate::storage::{MemoryStore, Storage};
use crate::telemetry::ServiceMetrics;
use check::{Answer, Check};
use std::time::Duration;

/// A window start for every unit, in 2011; config expiries are relative to it.
const START: u64 = ManualClock::DEFAULT_START;

fn engine(yaml: &str) -> (AuthzEngine, Arc<ManualClock>) {
    engine_with_trust(yaml, Arc::new(crate::anomaly::TrustTable::default()))
}

/// `engine`, with adaptive limits reading callers' trust from `trust`.
fn engine_with_trust(
    yaml: &str,
    trust: Arc<crate::anomaly::TrustTable>,
) -> (AuthzEngine, Arc<ManualClock>) {
    let config = parse_str("rt.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    let stats = Arc::new(StatsRegistry::default());
    let clock = Arc::new(ManualClock::new(START));
    let limits = RateLimitEngine::new(
        Arc::new(ArcSwap::from_pointee(RuleSet::compile(&config, &stats))),
        Arc::new(Storage::Memory(MemoryStore::new(10_000))),
        clock.clone(),
        stats,
        Arc::new(ServiceMetrics::default()),
    )
    .with_trust(trust);
    let lists = Arc::new(Lists::memory(clock.clone()));
    let e = AuthzEngine::new(
        limits,
        lists,
        Arc::new(AuthzMetrics::default()),
        clock.clone(),
    );
    e.install(&config);
    (e, clock)
}

fn ask(e: &AuthzEngine, c: &Check) -> Answer {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    Answer::of(&rt.block_on(e.check(&CheckInput::from(&c.build()))))
}

#[test]
fn config_entries_expire_on_the_clock() {
    let expires = START / NANOS_PER_SECOND + 60;
    let (e, clock) = engine(&format!(
        "authz:\n  lists:\n    block:\n      - {{value: 192.0.2.0/24, expires: {expires}}}\n"
    ));
    assert_eq!(ask(&e, &Check::new("192.0.2.9")).http, 403);
    clock.advance(Duration::from_secs(59));
    assert_eq!(ask(&e, &Check::new("192.0.2.9")).http, 403);
    clock.advance(Duration::from_secs(1));
    assert!(ask(&e, &Check::new("192.0.2.9")).ok());
}

#[test]
fn the_closest_rejecting_limit_is_reported_and_windows_reset() {
    let (e, clock) = engine(
        "authz:
  domain: d
  policies:
    - name: p
      descriptors:
        - [{generic_key: {descriptor_value: all}}, {identity: {}}]
        - [{generic_key: {descriptor_value: strict}}, {identity: {}}]
domains:
  - domain: d
    descriptors:
      - key: generic_key
        value: all
        descriptors: [{key: identity, rate_limit: {unit: minute, requests_per_unit: 10}}]
      - key: generic_key
        value: strict
        descriptors: [{key: identity, rate_limit: {unit: minute, requests_per_unit: 2}}]
",
    );
    let c = Check::new("192.0.2.1");
    assert!(ask(&e, &c).ok());
    assert!(ask(&e, &c).ok());
    for _ in 0..5 {
        let a = ask(&e, &c);
        assert_eq!(a.http, 429);
        assert_eq!(
            a.header("x-ratelimit-limit"),
            Some("2"),
            "the rejecting limit is reported"
        );
    }
    clock.advance(Duration::from_secs(60));
    assert!(ask(&e, &c).ok(), "a new window admits again");
    assert_eq!(e.metrics().get_outcome(Outcome::RateLimited), 5);
    assert_eq!(e.metrics().get_stage(Stage::LimitsEvaluated), 8);
}

#[test]
fn without_an_authz_block_everything_is_allowed_and_named_by_ip() {
    let (e, _) = engine("domain: x\n");
    let a = ask(
        &e,
        &Check::new("2001:db8::1").header("x-ratethrottle-identity", "forged"),
    );
    assert!(a.ok());
    assert_eq!(a.header("x-ratethrottle-identity"), Some("ip:2001:db8::1"));
}

/// Trust only scales limits: a caller at full trust (adaptive factor × max) is still denied
/// by a manual block entry and by an anomaly `deny` entry, and its limit is the scaled one.
#[test]
fn full_trust_never_exempts_a_caller_from_a_block_or_an_anomaly_deny() {
    let yaml = "authz:\n  domain: api\n  identity:\n    sources:\n      - header: x-api-key\n        name: api_key\n  lists:\n    block: [\"api_key:blocked\"]\n  policies:\n    - name: all\n      match: {path: {prefix: /}}\n      descriptors:\n        - [{identity: {}}]\ndomains:\n  - domain: api\n    descriptors:\n      - key: identity\n        rate_limit: {unit: minute, requests_per_unit: 1, adaptive: {min_factor: 0.5, max_factor: 4.0}}\n";
    let trust = Arc::new(crate::anomaly::TrustTable::new(1024));
    let (e, _) = engine_with_trust(yaml, trust.clone());
    let lists = e.lists().clone();
    for who in ["api_key:blocked", "api_key:abuser", "api_key:fine"] {
        trust.set(
            crate::anomaly::subject(who, None).expect("subject"),
            Some(u16::MAX),
        );
    }
    let call = |key: &str| ask(&e, &Check::new("198.51.100.20").header("x-api-key", key));
    // Full trust: the limit of 1/min is 4/min for this caller.
    for _ in 0..4 {
        assert!(call("fine").ok());
    }
    assert_eq!(call("fine").http, 429, "the scaled limit still holds");
    // A manual block entry wins over full trust.
    assert_eq!(call("blocked").http, 403);
    // So does an anomaly decision written to the lists.
    assert!(call("abuser").ok());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(lists.add(
        crate::lists::ListKind::Block,
        "api_key:abuser",
        Some(Duration::from_secs(600)),
        "anomaly:volumetric/v1 test",
        Some("anomaly"),
    ))
    .expect("add");
    let denied = call("abuser");
    assert_eq!(denied.http, 403);
}

/// As for ShouldRateLimit (engine tests): the Check future is boxed per request, so a
/// store's awaits must not inflate it.
#[test]
fn the_check_future_stays_small() {
    let (e, _) = engine("authz:\n  domain: gate\n");
    let req = CheckInput::from(&Check::new("198.51.100.1").build());
    let size = std::mem::size_of_val(&e.check(&req));
    assert!(size <= 8192, "the Check future is {size} bytes");
}

#[test]
fn a_jwt_key_that_cannot_be_used_is_counted_and_refuses_its_tokens() {
    // A reload may name a variable this process never had (serve checks them only at start).
    let with = |var: &str| {
        format!(
            "authz:\n  domain: edge\n  identity:\n    sources:\n      - jwt: {{hs256_secret_env: {var}}}\n        name: user\n      - client_ip\n"
        )
    };
    let (e, _) = engine(&with("RATETHROTTLE_TEST_VARIABLE_NOBODY_SETS"));
    assert_eq!(e.metrics().jwt_keys_skipped(), 1);
    let mut text = String::new();
    crate::telemetry::render_authz(&mut text, e.metrics(), 0, 0);
    assert!(
        text.contains("\nratethrottle_authz_jwt_keys_skipped 1\n"),
        "{text}"
    );
    // The source verifies nothing: a token signed with any secret is not an identity.
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "alice"}),
        &jsonwebtoken::EncodingKey::from_secret(b"guess"),
    )
    .unwrap();
    let a = ask(
        &e,
        &Check::new("10.0.0.1").header("authorization", &format!("Bearer {token}")),
    );
    assert_eq!(
        (a.http, a.header("x-ratethrottle-identity")),
        (401, None),
        "{a:?}"
    );
    assert!(a.body.contains("invalid_token"), "{}", a.body);
    // A config whose keys all work clears the gauge.
    let fine = "authz:\n  domain: edge\n  identity:\n    sources:\n      - jwt: {hs256_secret: s3cret}\n        name: user\n";
    e.install(&parse_str("rt.yaml", fine).unwrap());
    assert_eq!(e.metrics().jwt_keys_skipped(), 0);
}
