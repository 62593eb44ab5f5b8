//! The engine's answers, without gRPC: every matching rule of the reference and every
//! extension, with an injected clock.

use super::*;
use crate::config::parse_str;
use crate::limiter::{Algorithm, ManualClock, NANOS_PER_SECOND};
use crate::storage::MemoryStore;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use envoy_types::pb::google::protobuf::UInt64Value;
use std::sync::atomic::Ordering::Relaxed;

/// An epoch-aligned start, so fixed windows begin exactly now.
const START: u64 = 1_800_000_000 * NANOS_PER_SECOND;

struct Harness {
    engine: RateLimitEngine,
    clock: Arc<ManualClock>,
    stats: Arc<StatsRegistry>,
}

fn harness(yaml: &str) -> Harness {
    let config = parse_str("test.yaml", yaml).unwrap_or_else(|e| panic!("config: {e}"));
    let stats = Arc::new(StatsRegistry::default());
    let rules = Arc::new(ArcSwap::from_pointee(RuleSet::compile(&config, &stats)));
    let clock = Arc::new(ManualClock::new(START));
    let engine = RateLimitEngine::new(
        rules,
        Arc::new(Storage::Memory(MemoryStore::new(10_000))),
        clock.clone(),
        stats.clone(),
        Arc::new(ServiceMetrics::default()),
    );
    Harness {
        engine,
        clock,
        stats,
    }
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| PbEntry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: &[&[(&str, &str)]]) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: descriptors.iter().map(|d| descriptor(d)).collect(),
        hits_addend: 0,
    }
}

impl Harness {
    fn ask(&self, req: &RateLimitRequest) -> RateLimitResponse {
        futures_lite_block_on(self.engine.should_rate_limit(req)).expect("answered")
    }
    fn one(&self, domain: &str, entries: &[(&str, &str)]) -> DescriptorStatus {
        let r = self.ask(&request(domain, &[entries]));
        r.statuses[0].clone()
    }
    fn advance_secs(&self, s: u64) {
        self.clock.advance(std::time::Duration::from_secs(s));
    }
    /// The stats of `domain.key` (split at the first dot: test domains have none).
    fn stat(&self, full: &str) -> Arc<RuleStats> {
        let (domain, key) = full.split_once('.').unwrap_or((full, ""));
        self.stats.get(domain, key)
    }
}

/// The memory store never awaits, so polling once completes the future.
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn ok(s: &DescriptorStatus) -> bool {
    s.code == Code::Ok as i32
}

fn limit_of(s: &DescriptorStatus) -> Option<(u32, PbUnit)> {
    s.current_limit
        .as_ref()
        .map(|l| (l.requests_per_unit, PbUnit::try_from(l.unit).expect("unit")))
}

const BASIC: &str = r#"
domain: basic
descriptors:
  - key: api_key
    rate_limit: {unit: second, requests_per_unit: 3}
"#;

#[test]
fn fixed_window_counts_down_and_resets_at_the_window_edge() {
    let h = harness(BASIC);
    for expected in [2, 1, 0] {
        let s = h.one("basic", &[("api_key", "a")]);
        assert!(ok(&s));
        assert_eq!(s.limit_remaining, expected);
        assert_eq!(limit_of(&s), Some((3, PbUnit::Second)));
        assert_eq!(
            s.duration_until_reset,
            Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 1,
                nanos: 0
            })
        );
    }
    let r = h.ask(&request("basic", &[&[("api_key", "a")]]));
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    // Envoy puts this on its 429.
    let retry: Vec<(&str, &str)> = r
        .response_headers_to_add
        .iter()
        .map(|h| (h.key.as_str(), h.value.as_str()))
        .collect();
    assert_eq!(retry, vec![("retry-after", "1")]);
    h.clock.advance(std::time::Duration::from_millis(1000));
    assert!(ok(&h.one("basic", &[("api_key", "a")])));
}

#[test]
fn key_only_nodes_count_each_value_separately() {
    let h = harness(BASIC);
    for _ in 0..3 {
        assert!(ok(&h.one("basic", &[("api_key", "a")])));
    }
    assert!(!ok(&h.one("basic", &[("api_key", "a")])));
    assert!(ok(&h.one("basic", &[("api_key", "b")])));
}

const PRECEDENCE: &str = r#"
domain: p
descriptors:
  - key: k
    value: exact
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: k
    value: "ex*"
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: k
    value: "e*"
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 4}
  - key: k
    value: free
  - key: parent
    value: p
    rate_limit: {unit: hour, requests_per_unit: 5}
    descriptors:
      - key: child
        rate_limit: {unit: hour, requests_per_unit: 6}
"#;

#[test]
fn exact_before_wildcard_in_config_order_before_key_only() {
    let h = harness(PRECEDENCE);
    assert_eq!(
        limit_of(&h.one("p", &[("k", "exact")])),
        Some((1, PbUnit::Minute))
    );
    assert_eq!(
        limit_of(&h.one("p", &[("k", "exactly")])),
        Some((2, PbUnit::Minute))
    );
    assert_eq!(
        limit_of(&h.one("p", &[("k", "eel")])),
        Some((3, PbUnit::Minute))
    );
    assert_eq!(
        limit_of(&h.one("p", &[("k", "zzz")])),
        Some((4, PbUnit::Minute))
    );
}

#[test]
fn an_exact_node_without_a_limit_whitelists_its_value() {
    let h = harness(PRECEDENCE);
    for _ in 0..10 {
        let s = h.one("p", &[("k", "free")]);
        assert!(ok(&s));
        assert_eq!(s.current_limit, None);
    }
}

#[test]
fn a_rule_applies_only_at_the_request_descriptors_depth() {
    let h = harness(PRECEDENCE);
    assert_eq!(
        limit_of(&h.one("p", &[("parent", "p")])),
        Some((5, PbUnit::Hour))
    );
    assert_eq!(
        limit_of(&h.one("p", &[("parent", "p"), ("child", "x")])),
        Some((6, PbUnit::Hour))
    );
    // Deeper than the tree, or a different parent value: no limit.
    assert_eq!(
        limit_of(&h.one("p", &[("parent", "p"), ("child", "x"), ("more", "y")])),
        None
    );
    assert_eq!(
        limit_of(&h.one("p", &[("parent", "q"), ("child", "x")])),
        None
    );
    assert_eq!(limit_of(&h.one("p", &[("child", "x")])), None);
}

#[test]
fn unmatched_and_unknown_domain_are_ok_without_limit() {
    let h = harness(PRECEDENCE);
    let s = h.one("p", &[("nope", "x")]);
    assert!(ok(&s));
    assert_eq!(s.current_limit, None);
    assert_eq!(s.limit_remaining, 0);
    let r = h.ask(&request("unknown", &[&[("k", "exact")]]));
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses.len(), 1);
}

#[test]
fn matching_is_on_pairs_not_the_joined_key_value_string() {
    // The reference joins key and value with `_`, so key `a_b` value `c` would hit the rule
    // for key `a` value `b_c`. We must not.
    let h = harness(
        r#"
domain: j
descriptors:
  - key: a
    value: b_c
    rate_limit: {unit: second, requests_per_unit: 1}
"#,
    );
    assert_eq!(limit_of(&h.one("j", &[("a_b", "c")])), None);
    assert_eq!(
        limit_of(&h.one("j", &[("a", "b_c")])),
        Some((1, PbUnit::Second))
    );
}

#[test]
fn unlimited_answers_max_remaining() {
    let h = harness(
        r#"
domain: u
descriptors:
  - key: internal
    rate_limit: {unlimited: true}
"#,
    );
    for _ in 0..5 {
        let s = h.one("u", &[("internal", "x")]);
        assert!(ok(&s));
        assert_eq!(s.limit_remaining, u32::MAX);
        assert_eq!(s.current_limit, None);
    }
}

#[test]
fn shadow_mode_answers_ok_but_counts_and_reports() {
    let h = harness(
        r#"
domain: s
descriptors:
  - key: k
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
"#,
    );
    assert!(ok(&h.one("s", &[("k", "v")])));
    let r = h.ask(&request("s", &[&[("k", "v")]]));
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert!(ok(&r.statuses[0]));
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let st = h.stat("s.k");
    assert_eq!(st.total_hits.load(Relaxed), 2);
    assert_eq!(st.over_limit.load(Relaxed), 1);
    assert_eq!(st.shadow_mode.load(Relaxed), 1);
}

#[test]
fn overall_is_over_limit_when_any_enforced_status_is() {
    let h = harness(
        r#"
domain: o
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: b
    rate_limit: {unit: minute, requests_per_unit: 100}
"#,
    );
    h.one("o", &[("a", "1")]);
    let r = h.ask(&request("o", &[&[("b", "1")], &[("a", "1")]]));
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert!(ok(&r.statuses[0]));
    assert_eq!(r.statuses[1].code, Code::OverLimit as i32);
}

#[test]
fn rejected_requests_consume_nothing_anywhere_by_default() {
    let yaml = r#"
domain: o
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: b
    rate_limit: {unit: minute, requests_per_unit: 3}
"#;
    let h = harness(yaml);
    h.one("o", &[("a", "1")]); // a is now exhausted
    for _ in 0..5 {
        let r = h.ask(&request("o", &[&[("b", "1")], &[("a", "1")]]));
        assert_eq!(r.overall_code, Code::OverLimit as i32);
        // b reports what it really holds: nothing was taken.
        assert_eq!(r.statuses[0].limit_remaining, 3);
    }
    for expected in [2, 1, 0] {
        assert_eq!(h.one("o", &[("b", "1")]).limit_remaining, expected);
    }
}

#[test]
fn count_rejected_hits_restores_the_references_counting() {
    let yaml = r#"
settings:
  count_rejected_hits: true
domains:
  - domain: o
    descriptors:
      - key: a
        rate_limit: {unit: minute, requests_per_unit: 1}
      - key: b
        rate_limit: {unit: minute, requests_per_unit: 3}
"#;
    let h = harness(yaml);
    h.one("o", &[("a", "1")]);
    for _ in 0..3 {
        h.ask(&request("o", &[&[("b", "1")], &[("a", "1")]]));
    }
    // b was charged for three rejected requests.
    assert!(!ok(&h.one("o", &[("b", "1")])));
}

#[test]
fn replaces_drops_the_named_limit() {
    let h = harness(
        r#"
domain: r
descriptors:
  - key: path
    rate_limit: {unit: second, requests_per_unit: 1, name: per_path}
  - key: premium
    value: "yes"
    rate_limit:
      unit: second
      requests_per_unit: 100
      replaces:
        - name: per_path
"#,
    );
    // Alone, per_path limits.
    h.one("r", &[("path", "/x")]);
    assert!(!ok(&h.one("r", &[("path", "/x")])));
    // With the premium descriptor in the same request, per_path is replaced.
    let r = h.ask(&request("r", &[&[("path", "/x")], &[("premium", "yes")]]));
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses[0].current_limit, None);
    assert_eq!(limit_of(&r.statuses[1]), Some((100, PbUnit::Second)));
}

#[test]
fn limit_name_is_reported() {
    let h = harness(
        r#"
domain: n
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 5, name: five}
"#,
    );
    let s = h.one("n", &[("k", "v")]);
    assert_eq!(s.current_limit.expect("limit").name, "five");
}

#[test]
fn hits_addend_request_level_and_per_descriptor() {
    let h = harness(BASIC);
    let mut r = request("basic", &[&[("api_key", "a")]]);
    r.hits_addend = 2;
    assert_eq!(h.ask(&r).statuses[0].limit_remaining, 1);
    // Per-descriptor 0 looks without counting.
    let mut look = request("basic", &[&[("api_key", "a")]]);
    look.descriptors[0].hits_addend = Some(UInt64Value { value: 0 });
    for _ in 0..3 {
        let s = &h.ask(&look).statuses[0];
        assert!(ok(s));
        assert_eq!(s.limit_remaining, 1);
    }
    // Per-descriptor overrides the request level.
    let mut r = request("basic", &[&[("api_key", "a")]]);
    r.hits_addend = 1;
    r.descriptors[0].hits_addend = Some(UInt64Value { value: 2 });
    assert!(!ok(&h.ask(&r).statuses[0]));
    assert_eq!(h.one("basic", &[("api_key", "a")]).limit_remaining, 0);
}

#[test]
fn absurd_hits_are_answered_over_limit() {
    let h = harness(BASIC);
    let mut r = request("basic", &[&[("api_key", "a")]]);
    r.descriptors[0].hits_addend = Some(UInt64Value { value: u64::MAX });
    assert_eq!(h.ask(&r).overall_code, Code::OverLimit as i32);
    r.descriptors[0].hits_addend = None;
    r.hits_addend = u32::MAX;
    assert_eq!(h.ask(&r).overall_code, Code::OverLimit as i32);
    // Nothing was consumed.
    assert_eq!(h.one("basic", &[("api_key", "a")]).limit_remaining, 2);
}

#[test]
fn several_limits_report_the_closest_and_all_apply() {
    let h = harness(
        r#"
domain: m
descriptors:
  - key: k
    rate_limits:
      - {unit: second, requests_per_unit: 10}
      - {unit: day, requests_per_unit: 12}
"#,
    );
    // First call: 9 left of 10/s, 11 left of 12/day → per second is closest.
    let s = h.one("m", &[("k", "v")]);
    assert_eq!(limit_of(&s), Some((10, PbUnit::Second)));
    assert_eq!(s.limit_remaining, 9);
    for _ in 0..9 {
        h.one("m", &[("k", "v")]);
    }
    assert!(!ok(&h.one("m", &[("k", "v")])));
    h.advance_secs(1);
    // 10 used of 12/day: the day limit is now the closest.
    let s = h.one("m", &[("k", "v")]);
    assert_eq!(limit_of(&s), Some((12, PbUnit::Day)));
    assert_eq!(s.limit_remaining, 1);
    h.one("m", &[("k", "v")]);
    let s = h.one("m", &[("k", "v")]);
    assert!(!ok(&s));
    assert_eq!(limit_of(&s), Some((12, PbUnit::Day)));
}

#[test]
fn block_duration_keeps_a_violator_over_limit() {
    let h = harness(
        r#"
domain: b
descriptors:
  - key: ip
    rate_limit: {unit: second, requests_per_unit: 1, block_duration: 10s}
"#,
    );
    assert!(ok(&h.one("b", &[("ip", "1.2.3.4")])));
    let s = h.one("b", &[("ip", "1.2.3.4")]);
    assert!(!ok(&s));
    assert_eq!(s.duration_until_reset.expect("reset").seconds, 10);
    h.advance_secs(5);
    assert!(!ok(&h.one("b", &[("ip", "1.2.3.4")])));
    h.advance_secs(6);
    assert!(ok(&h.one("b", &[("ip", "1.2.3.4")])));
}

#[test]
fn every_algorithm_is_selectable_and_enforces_its_limit() {
    for algo in Algorithm::NAMES {
        let h = harness(&format!(
            "domain: a\ndescriptors:\n  - key: k\n    rate_limit: {{unit: minute, requests_per_unit: 5, algorithm: {algo}}}\n"
        ));
        let admitted = (0..20).filter(|_| ok(&h.one("a", &[("k", "v")]))).count();
        let expected = if algo == "leaky_bucket" { 1 } else { 5 };
        assert_eq!(admitted, expected, "{algo}");
    }
}

#[test]
fn default_algorithm_comes_from_settings() {
    let h = harness(
        r#"
settings: {default_algorithm: leaky_bucket}
domains:
  - domain: d
    descriptors:
      - key: k
        rate_limit: {unit: second, requests_per_unit: 10}
"#,
    );
    // Leaky bucket with capacity 1 smooths: one now, the next after 100 ms.
    assert!(ok(&h.one("d", &[("k", "v")])));
    assert!(!ok(&h.one("d", &[("k", "v")])));
    h.clock.advance(std::time::Duration::from_millis(100));
    assert!(ok(&h.one("d", &[("k", "v")])));
}

#[test]
fn token_bucket_allows_a_burst_then_the_rate() {
    let h = harness(
        r#"
domain: t
descriptors:
  - key: k
    rate_limit: {unit: second, requests_per_unit: 2, algorithm: token_bucket, burst: 6}
"#,
    );
    let burst = (0..10).filter(|_| ok(&h.one("t", &[("k", "v")]))).count();
    assert_eq!(burst, 6);
    let s = h.one("t", &[("k", "v")]);
    assert_eq!(
        s.duration_until_reset,
        Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 0,
            nanos: 500_000_000
        })
    );
    h.clock.advance(std::time::Duration::from_millis(500));
    assert!(ok(&h.one("t", &[("k", "v")])));
    assert!(!ok(&h.one("t", &[("k", "v")])));
}

#[test]
fn bad_requests_get_typed_errors() {
    let h = harness(BASIC);
    let run = |r: RateLimitRequest| futures_lite_block_on(h.engine.should_rate_limit(&r));
    assert!(matches!(
        run(request("", &[&[("k", "v")]])),
        Err(RequestError::EmptyDomain)
    ));
    assert!(matches!(
        run(request("basic", &[])),
        Err(RequestError::NoDescriptors)
    ));
    assert!(matches!(
        run(request("basic", &[&[]])),
        Err(RequestError::EmptyDescriptor(0))
    ));
    assert!(matches!(
        run(request("basic", &[&[("k", "v")], &[("", "v")]])),
        Err(RequestError::EmptyKey {
            descriptor: 1,
            entry: 0
        })
    ));
    let mut r = request("basic", &[&[("api_key", "a")]]);
    r.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: 0,
    });
    assert!(matches!(run(r), Err(RequestError::BadOverrideUnit(0))));
}

#[test]
fn megabyte_values_are_answered() {
    let h = harness(BASIC);
    let big = "x".repeat(1 << 20);
    let s = h.one("basic", &[("api_key", &big)]);
    assert!(ok(&s));
    assert_eq!(s.limit_remaining, 2);
}

#[test]
fn descriptor_limit_override_wins_inside_a_known_domain() {
    let h = harness(BASIC);
    let mut r = request("basic", &[&[("api_key", "a")]]);
    r.descriptors[0].limit = Some(RateLimitOverride {
        requests_per_unit: 1,
        unit: PbUnit::Hour as i32,
    });
    let s = &h.ask(&r).statuses[0];
    assert_eq!(limit_of(s), Some((1, PbUnit::Hour)));
    assert!(!ok(&h.ask(&r).statuses[0]));
    // The config's own counter for this value was not touched.
    assert_eq!(h.one("basic", &[("api_key", "a")]).limit_remaining, 2);
}

#[test]
fn negative_hits_give_quota_back() {
    let h = harness(BASIC);
    for _ in 0..3 {
        h.one("basic", &[("api_key", "a")]);
    }
    let mut r = request("basic", &[&[("api_key", "a")]]);
    r.descriptors[0].hits_addend = Some(UInt64Value { value: 2 });
    r.descriptors[0].is_negative_hits = true;
    let s = &h.ask(&r).statuses[0];
    assert!(ok(s));
    assert_eq!(s.limit_remaining, 2);
}

#[test]
fn detailed_metric_adds_per_value_series() {
    let h = harness(
        r#"
domain: dm
descriptors:
  - key: user
    detailed_metric: true
    rate_limit: {unit: minute, requests_per_unit: 10}
"#,
    );
    h.one("dm", &[("user", "alice")]);
    h.one("dm", &[("user", "bob")]);
    let series: Vec<String> = h
        .stats
        .snapshot()
        .into_iter()
        .map(|(k, _)| k.to_string())
        .collect();
    assert!(
        series.contains(&"dm.user|user_alice".to_string()),
        "{series:?}"
    );
    assert!(series.contains(&"dm.user|user_bob".to_string()));
    assert_eq!(h.stat("dm.user").total_hits.load(Relaxed), 2);
}

#[test]
fn counters_of_unchanged_rules_survive_a_reload() {
    let v1 = r#"
domain: r
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: b
    rate_limit: {unit: minute, requests_per_unit: 3}
"#;
    let v2 = r#"
domain: r
descriptors:
  - key: a
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: b
    rate_limit: {unit: minute, requests_per_unit: 5}
"#;
    let h = harness(v1);
    h.one("r", &[("a", "x")]);
    h.one("r", &[("b", "x")]);
    let config = parse_str("v2.yaml", v2).expect("v2");
    h.engine
        .rules()
        .store(Arc::new(RuleSet::compile(&config, &h.stats)));
    assert_eq!(
        h.one("r", &[("a", "x")]).limit_remaining,
        1,
        "unchanged rule kept its count"
    );
    assert_eq!(
        h.one("r", &[("b", "x")]).limit_remaining,
        4,
        "changed rule starts fresh"
    );
}

const ADAPTIVE: &str = r"
domain: api
descriptors:
  - key: identity
    rate_limit:
      unit: minute
      requests_per_unit: 100
      adaptive: {min_factor: 0.25, max_factor: 2.0}
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 10, algorithm: token_bucket, burst: 4, adaptive: {min_factor: 0.5, max_factor: 3, initial_factor: 0.5}}
  - key: plain
    rate_limit: {unit: minute, requests_per_unit: 10}
";

fn trust_of(h: &Harness, identity: &str, q: Option<u16>) {
    let key = crate::anomaly::subject(identity, None).expect("key");
    h.engine.trust().set(key, q);
}

fn adaptive_harness() -> Harness {
    let mut h = harness(ADAPTIVE);
    h.engine = h
        .engine
        .clone()
        .with_trust(Arc::new(crate::anomaly::TrustTable::new(1024)));
    h
}

#[test]
fn adaptive_limits_scale_by_the_callers_trust_and_report_the_effective_limit() {
    let h = adaptive_harness();
    // Unknown caller: the initial factor (1.0 by default).
    let s = h.one("api", &[("identity", "user:new")]);
    assert_eq!(limit_of(&s), Some((100, PbUnit::Minute)));
    // Full trust: ×2; trust 0 (a throttle): ×0.25; the same counter throughout.
    trust_of(&h, "user:good", Some(u16::MAX));
    let s = h.one("api", &[("identity", "user:good")]);
    assert_eq!(limit_of(&s), Some((200, PbUnit::Minute)));
    assert_eq!(s.limit_remaining, 199);
    trust_of(&h, "user:good", Some(0));
    let s = h.one("api", &[("identity", "user:good")]);
    assert_eq!(limit_of(&s), Some((25, PbUnit::Minute)));
    assert_eq!(
        s.limit_remaining, 23,
        "the counter was not reset: 2 hits so far"
    );
    // 23 more fit the scaled limit, the next is over it.
    for _ in 0..23 {
        assert!(ok(&h.one("api", &[("identity", "user:good")])));
    }
    let s = h.one("api", &[("identity", "user:good")]);
    assert!(!ok(&s));
    // Trust back up: the same counter has headroom again at once.
    trust_of(&h, "user:good", Some(u16::MAX));
    let s = h.one("api", &[("identity", "user:good")]);
    assert!(ok(&s));
    assert_eq!(s.limit_remaining, 200 - 26);
}

#[test]
fn adaptive_address_rules_scale_burst_and_rate_from_the_initial_factor() {
    let h = adaptive_harness();
    // initial_factor 0.5: 10/min → 5, burst 4 → 2 for an unknown address.
    let s = h.one("api", &[("remote_address", "203.0.113.9")]);
    assert_eq!(limit_of(&s), Some((5, PbUnit::Minute)));
    assert!(ok(&h.one("api", &[("remote_address", "203.0.113.9")])));
    assert!(
        !ok(&h.one("api", &[("remote_address", "203.0.113.9")])),
        "the bucket holds 2"
    );
    // The address's trust is keyed like the anomaly module keys it (IPv4-mapped too).
    let key = crate::anomaly::subject("", "203.0.113.10".parse().ok()).expect("key");
    h.engine.trust().set(key, Some(u16::MAX));
    let s = h.one("api", &[("remote_address", "::ffff:203.0.113.10")]);
    assert_eq!(limit_of(&s), Some((30, PbUnit::Minute)));
}

#[test]
fn limits_without_adaptive_ignore_trust_entirely() {
    let h = adaptive_harness();
    trust_of(&h, "user:x", Some(0));
    h.engine.trust().set_population_surge(u64::MAX);
    let s = h.one("api", &[("plain", "user:x")]);
    assert_eq!(limit_of(&s), Some((10, PbUnit::Minute)));
    // The same config without `adaptive` answers exactly as before whatever the table holds.
    let plain = harness(
        &ADAPTIVE
            .replace(
                ", adaptive: {min_factor: 0.5, max_factor: 3, initial_factor: 0.5}",
                "",
            )
            .replace("      adaptive: {min_factor: 0.25, max_factor: 2.0}\n", ""),
    );
    let plain = Harness {
        engine: plain.engine.with_trust(h.engine.trust().clone()),
        ..plain
    };
    // user:x has trust 0 and a surge is on: without `adaptive` it still gets exactly 100.
    let limits: Vec<_> = (0..150)
        .map(|_| plain.one("api", &[("identity", "user:x")]))
        .collect();
    assert!(
        limits
            .iter()
            .all(|s| limit_of(s) == Some((100, PbUnit::Minute)))
    );
    assert_eq!(limits.iter().filter(|s| ok(s)).count(), 100);
}

#[test]
fn a_population_surge_gives_unknown_callers_the_minimum() {
    let h = adaptive_harness();
    h.engine.trust().set_population_surge(u64::MAX);
    let s = h.one("api", &[("identity", "user:brand-new")]);
    assert_eq!(limit_of(&s), Some((25, PbUnit::Minute)));
    trust_of(&h, "user:known", Some(u16::MAX));
    let s = h.one("api", &[("identity", "user:known")]);
    assert_eq!(limit_of(&s), Some((200, PbUnit::Minute)));
}

/// Every gRPC call boxes its decision future, so its size is allocated and copied per
/// request. A store's awaits must not inflate it: the Redis call inline once made it
/// 16.8 KB on every path, memory included (now ~1.5 KB).
#[test]
fn the_decision_future_stays_small() {
    let h = harness(ADAPTIVE);
    let req = RateLimitRequest::default();
    let size = std::mem::size_of_val(&h.engine.should_rate_limit(&req));
    assert!(size <= 4096, "the ShouldRateLimit future is {size} bytes");
}
