//! Decisions per second, in process, one thread: each algorithm on one hot key and on one
//! million distinct keys, through the memory store and through the whole engine (match +
//! key digest + store); a lookup in an allow/block list of 50,000 networks. Fixed seed, fixed
//! scenario table.
// The engine's request future nests deeply (storage coalescing): rustc's default layout
// query depth is not enough for crates that await it.
#![recursion_limit = "256"]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use ratethrottle::anomaly::{TrustTable, subject};
use ratethrottle::config::parse_str;
use ratethrottle::engine::RateLimitEngine;
use ratethrottle::limiter::{Algorithm, Limit, ManualClock, NANOS_PER_SECOND, RejectedHits, Unit};
use ratethrottle::rules::{RuleSet, StatsRegistry};
use ratethrottle::storage::{MemoryStore, Storage};
use ratethrottle::telemetry::ServiceMetrics;
use std::hint::black_box;
use std::sync::Arc;

const ALGORITHMS: [Algorithm; 6] = Algorithm::ALL;
const DISTINCT: u64 = 1_000_000;
const NOW: u64 = 1_800_000_000 * NANOS_PER_SECOND;

/// Keys as the engine makes them: xxh3-128 digests, here of a counter (fixed seed).
fn key(i: u64) -> u128 {
    xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes())
}

fn store(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    for algorithm in ALGORITHMS {
        // A limit high enough that the hot key keeps being admitted (the common case).
        let limit = Limit {
            algorithm,
            requests_per_unit: u32::MAX / 2,
            unit: Unit::Hour,
            burst: u32::MAX / 2,
            block_duration: 0,
        };
        let s = MemoryStore::new(2 * DISTINCT as usize);
        let mut t = NOW;
        g.bench_with_input(
            BenchmarkId::new("hot_key", algorithm.as_str()),
            &limit,
            |b, l| {
                b.iter(|| {
                    t += 1_000;
                    black_box(s.apply(7, l, t, 1, RejectedHits::Free))
                })
            },
        );
        let s = MemoryStore::new(2 * DISTINCT as usize);
        let keys: Vec<u128> = (0..DISTINCT).map(key).collect();
        let mut i = 0usize;
        g.bench_with_input(
            BenchmarkId::new("1M_keys", algorithm.as_str()),
            &limit,
            |b, l| {
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    black_box(s.apply(keys[i], l, NOW, 1, RejectedHits::Free))
                })
            },
        );
    }
    g.finish();
}

fn engine(c: &mut Criterion) {
    let yaml = r#"
domain: bench
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 1000000000}
  - key: path
    value: "/api/*"
    descriptors:
      - key: method
        rate_limit: {unit: hour, requests_per_unit: 1000000000}
"#;
    let config = parse_str("bench.yaml", yaml).expect("bench config");
    let stats = Arc::new(StatsRegistry::default());
    let rules = Arc::new(arc_swap::ArcSwap::from_pointee(RuleSet::compile(
        &config, &stats,
    )));
    let engine = RateLimitEngine::new(
        rules,
        Arc::new(Storage::Memory(MemoryStore::new(2 * DISTINCT as usize))),
        Arc::new(ManualClock::new(NOW)),
        stats,
        Arc::new(ServiceMetrics::default()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let requests: Vec<RateLimitRequest> = (0..10_000u64)
        .map(|i| RateLimitRequest {
            domain: "bench".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "api_key".into(),
                    value: format!("key-{i}"),
                }],
                ..Default::default()
            }],
            hits_addend: 0,
        })
        .collect();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("should_rate_limit_one_descriptor_10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            black_box(
                rt.block_on(engine.should_rate_limit(&requests[i]))
                    .expect("ok"),
            )
        })
    });
    let nested = RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![
            RateLimitDescriptor {
                entries: vec![
                    Entry {
                        key: "path".into(),
                        value: "/api/users".into(),
                    },
                    Entry {
                        key: "method".into(),
                        value: "GET".into(),
                    },
                ],
                ..Default::default()
            },
            RateLimitDescriptor {
                entries: vec![Entry {
                    key: "api_key".into(),
                    value: "k".into(),
                }],
                ..Default::default()
            },
        ],
        hits_addend: 0,
    };
    g.bench_function("should_rate_limit_two_descriptors_wildcard", |b| {
        b.iter(|| black_box(rt.block_on(engine.should_rate_limit(&nested)).expect("ok")))
    });
    g.finish();
}

/// An engine over `yaml` with a trust table holding `trusted` callers.
fn engine_with_trust(yaml: &str, trusted: u64) -> RateLimitEngine {
    let config = parse_str("bench.yaml", yaml).expect("bench config");
    let stats = Arc::new(StatsRegistry::default());
    let rules = Arc::new(arc_swap::ArcSwap::from_pointee(RuleSet::compile(
        &config, &stats,
    )));
    let table = Arc::new(TrustTable::new(1 << 18));
    for i in 0..trusted {
        let key = subject(&format!("user:{i}"), None).expect("key");
        table.set(key, Some((i % 65_536) as u16));
    }
    RateLimitEngine::new(
        rules,
        Arc::new(Storage::Memory(MemoryStore::new(2 * DISTINCT as usize))),
        Arc::new(ManualClock::new(NOW)),
        stats,
        Arc::new(ServiceMetrics::default()),
    )
    .with_trust(table)
}

/// ShouldRateLimit per identity with and without `adaptive` on the rule (issue 13's target:
/// within 3 %): 10k callers, every one in the trust table.
fn adaptive(c: &mut Criterion) {
    let plain = "domain: bench\ndescriptors:\n  - key: remote_address\n    descriptors:\n      - key: identity\n        rate_limit: {unit: hour, requests_per_unit: 1000000000}\n";
    let adaptive = plain.replace(
        "1000000000}",
        "1000000000, adaptive: {min_factor: 0.25, max_factor: 2}}",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let requests: Vec<RateLimitRequest> = (0..10_000u64)
        .map(|i| RateLimitRequest {
            domain: "bench".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    Entry {
                        key: "remote_address".into(),
                        value: format!("10.0.{}.{}", i / 256, i % 256),
                    },
                    Entry {
                        key: "identity".into(),
                        value: format!("user:{i}"),
                    },
                ],
                ..Default::default()
            }],
            hits_addend: 0,
        })
        .collect();
    let mut g = c.benchmark_group("adaptive");
    g.throughput(Throughput::Elements(1));
    for (name, yaml) in [("off", plain.to_string()), ("on", adaptive)] {
        let engine = engine_with_trust(&yaml, 10_000);
        let mut i = 0usize;
        g.bench_function(format!("should_rate_limit_identity_10k_{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % requests.len();
                black_box(
                    rt.block_on(engine.should_rate_limit(&requests[i]))
                        .expect("ok"),
                )
            })
        });
    }
    g.finish();
}

/// An allow/block list of 50,000 /24 networks (the CIDR trie): one lookup of an address in a
/// listed network and one outside all of them.
fn lists(c: &mut Criterion) {
    use ratethrottle::lists::cidr::parse_addr;
    use ratethrottle::lists::{CompiledList, EntrySource, ListEntry};
    let list = CompiledList::build((0..50_000u32).map(|i| ListEntry {
        value: format!("1.{}.{}.0/24", i / 256, i % 256),
        reason: String::new(),
        code: None,
        expires_at_ms: None,
        added_at_ms: 0,
        source: EntrySource::Runtime,
    }));
    let mut g = c.benchmark_group("lists");
    g.throughput(Throughput::Elements(1));
    for (name, addr) in [
        ("50k_networks_hit", "1.0.200.77"),
        ("50k_networks_miss", "1.196.0.1"),
    ] {
        let a = parse_addr(addr).expect("address");
        g.bench_function(name, |b| {
            b.iter(|| list.match_addr(black_box(a), 0).is_some())
        });
    }
    g.finish();
}

#[path = "../tests/support/check.rs"]
mod check;

/// One ext_authz Check (the realistic request `ok_rls --write-bodies` sends: ten headers,
/// both peers) in its parts: the protobuf decode as envoy-types' `CheckRequest` and as the
/// lean `CheckInput` the service uses, and the whole decision + response encode on the bench
/// config's policy (identity from `x-api-key`, two descriptors counted in memory).
fn authz(c: &mut Criterion) {
    use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
    use prost::Message;
    use ratethrottle::authz::AuthzEngine;
    use ratethrottle::authz::wire::CheckInput;
    use ratethrottle::runtime::blocklist::Lists;
    use ratethrottle::telemetry::authz::AuthzMetrics;
    let body = prost::bytes::Bytes::from(
        check::Check::new("198.51.100.7")
            .header("x-api-key", "bench-key")
            .build()
            .encode_to_vec(),
    );
    let mut g = c.benchmark_group("check");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_envoy_types", |b| {
        b.iter(|| CheckRequest::decode(black_box(body.clone())).expect("decodes"))
    });
    g.bench_function("decode_lean", |b| {
        b.iter(|| CheckInput::decode(black_box(body.clone())).expect("decodes"))
    });
    let yaml = r#"
domains:
  - domain: example
    descriptors:
      - key: generic_key
        value: api
        descriptors:
          - key: identity
            rate_limit: {unit: hour, requests_per_unit: 1000000000}
authz:
  domain: example
  identity:
    sources:
      - header: x-api-key
        name: api_key
      - client_ip
  lists:
    block:
      - 203.0.113.0/24
  policies:
    - name: api
      match: {path: {prefix: /}}
      descriptors:
        - [{generic_key: {descriptor_value: api}}, {identity: {}}]
"#;
    let config = parse_str("bench.yaml", yaml).expect("bench config");
    let stats = Arc::new(StatsRegistry::default());
    let clock = Arc::new(ManualClock::new(NOW));
    let limits = RateLimitEngine::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(RuleSet::compile(
            &config, &stats,
        ))),
        Arc::new(Storage::Memory(MemoryStore::new(10_000))),
        clock.clone(),
        stats,
        Arc::new(ServiceMetrics::default()),
    );
    let engine = AuthzEngine::new(
        limits,
        Arc::new(Lists::memory(clock.clone())),
        Arc::new(AuthzMetrics::default()),
        clock,
    );
    engine.install(&config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let input = CheckInput::decode(body.clone()).expect("decodes");
    g.bench_function("decide_and_encode", |b| {
        b.iter(|| rt.block_on(engine.check(black_box(&input))).encode_to_vec())
    });
    g.finish();
}

criterion_group!(benches, store, engine, adaptive, lists, authz);
criterion_main!(benches);
