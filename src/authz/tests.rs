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
    let config = parse_str("rt.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
    let stats = Arc::new(StatsRegistry::default());
    let clock = Arc::new(ManualClock::new(START));
    let limits = RateLimitEngine::new(
        Arc::new(ArcSwap::from_pointee(RuleSet::compile(&config, &stats))),
        Arc::new(Storage::Memory(MemoryStore::new(10_000))),
        clock.clone(),
        stats,
        Arc::new(ServiceMetrics::default()),
    );
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
    Answer::of(&rt.block_on(e.check(&c.build())))
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
