//! gRPC ShouldRateLimit under concurrent load: ratethrottle (memory store) next to an empty
//! tonic server answering the same RPC with a fixed response — the ceiling for our own cost.
//! Both run in this process on ephemeral ports and are driven by the same client code, one
//! after the other, so the ratio is meaningful on a noisy machine.
//!
//! `cargo bench --bench grpc_load` (env: BENCH_SECONDS=5, BENCH_CONNECTIONS=4,
//! BENCH_STREAMS=32, BENCH_KEYS=100000).
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]
// The engine's request future nests deeply (storage coalescing): rustc's default layout
// query depth is not enough for crates that await it.
#![recursion_limit = "256"]

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratethrottle::server::{BoundServer, ServerOptions};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Empty;

#[tonic::async_trait]
impl RateLimitService for Empty {
    async fn should_rate_limit(
        &self,
        _r: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![DescriptorStatus {
                code: Code::Ok as i32,
                current_limit: Some(RateLimit {
                    name: String::new(),
                    requests_per_unit: 1_000_000_000,
                    unit: 3,
                }),
                limit_remaining: 999_999_999,
                duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 1800,
                    nanos: 0,
                }),
                quota: None,
            }],
            ..Default::default()
        }))
    }
}

struct Result_ {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

async fn drive(addr: SocketAddr, seconds: u64, conns: u64, streams: u64, keys: u64) -> Result_ {
    let mut tasks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    for c in 0..conns {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        for s in 0..streams {
            let mut client = RateLimitServiceClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                // Deterministic spread over many distinct descriptor values.
                let mut i = (c * 7919 + s * 104_729) % keys;
                while Instant::now() < deadline {
                    i = (i + 1) % keys;
                    let req = RateLimitRequest {
                        domain: "bench".into(),
                        descriptors: vec![RateLimitDescriptor {
                            entries: vec![Entry {
                                key: "api_key".into(),
                                value: format!("key-{i}"),
                            }],
                            ..Default::default()
                        }],
                        hits_addend: 0,
                    };
                    let t = Instant::now();
                    match client.should_rate_limit(req).await {
                        Ok(r) if r.get_ref().overall_code == Code::Ok as i32 => {
                            lat.push(t.elapsed().as_micros() as u32)
                        }
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            }));
        }
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        Duration::from_micros(
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as u64,
        )
    };
    Result_ {
        rps: all.len() as f64 / seconds as f64,
        p50: pct(0.50),
        p99: pct(0.99),
        errors,
    }
}

async fn start_sidecar(
    storage: &str,
    dir: &std::path::Path,
) -> (SocketAddr, ratethrottle::engine::RateLimitEngine) {
    let path = dir.join(format!("bench-{}.yaml", storage.len()));
    std::fs::write(
        &path,
        "settings:\n  redis: {timeout: 1s, prefix: \"bench:\"}\ndomains:\n  - domain: bench\n    descriptors:\n      - key: api_key\n        rate_limit: {unit: hour, requests_per_unit: 1000000000}\n",
    )
    .expect("write");
    let config = ratethrottle::config::load(&path).expect("config");
    let server = BoundServer::bind(ServerOptions {
        config_path: Some(path),
        config: Some(config),
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        admin_addr: "127.0.0.1:0".parse().expect("addr"),
        reload_interval: Duration::from_secs(60),
        allow_empty_config: false,
        storage: Some(storage.to_string()),
        admin_token: None,
        redis_password: None,
        kubernetes: None,
        connections: Default::default(),
    })
    .await
    .expect("bind");
    let addr = server.grpc_addr;
    let engine = server.engine().clone();
    tokio::spawn(server.run(std::future::pending()));
    (addr, engine)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful: run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let seconds = if quick { 1 } else { env("BENCH_SECONDS", 5) };
    let conns = env("BENCH_CONNECTIONS", 4);
    let streams = env("BENCH_STREAMS", 32);
    let keys = env("BENCH_KEYS", 100_000);
    // Redis rows run when the servers are there (`bash scripts/test.sh cargo bench --bench grpc_load`).
    let mut stores = vec![("ratethrottle (memory)".to_string(), "memory".to_string())];
    if !quick {
        for (name, var) in [
            ("ratethrottle (Redis)", "RATETHROTTLE_TEST_REDIS_URL"),
            (
                "ratethrottle (Redis Cluster)",
                "RATETHROTTLE_TEST_REDIS_CLUSTER_URL",
            ),
        ] {
            if let Ok(url) = std::env::var(var) {
                stores.push((name.to_string(), url));
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let empty_addr = listener.local_addr().expect("addr");
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RateLimitServiceServer::new(Empty))
                .serve_with_incoming(incoming),
        );

        println!("gRPC ShouldRateLimit, {conns} connections x {streams} streams, {seconds}s each, {keys} distinct keys");
        println!(
            "{:<30} {:>12} {:>10} {:>10} {:>8} {:>14}",
            "server", "requests/s", "p50", "p99", "errors", "Redis cmd/req"
        );
        let empty = drive(empty_addr, seconds, conns, streams, keys).await;
        println!(
            "{:<30} {:>12.0} {:>10?} {:>10?} {:>8} {:>14}",
            "empty tonic server", empty.rps, empty.p50, empty.p99, empty.errors, "-"
        );
        for (name, storage) in stores {
            let (addr, engine) = start_sidecar(&storage, dir.path()).await;
            let before = engine.storage().health().map(|h| h.commands.load(std::sync::atomic::Ordering::Relaxed));
            let r = drive(addr, seconds, conns, streams, keys).await;
            let per_req = match (before, engine.storage().health()) {
                (Some(b), Some(h)) => {
                    let c = h.commands.load(std::sync::atomic::Ordering::Relaxed) - b;
                    let fallbacks = h.fallbacks.load(std::sync::atomic::Ordering::Relaxed);
                    // Answers from the failure mode would not be Redis's: say so loudly.
                    if fallbacks > 0 {
                        println!("WARNING: {fallbacks} requests answered by the failure mode");
                    }
                    format!("{:.2}", c as f64 / (r.rps * seconds as f64).max(1.0))
                }
                _ => "-".to_string(),
            };
            println!(
                "{:<30} {:>12.0} {:>10?} {:>10?} {:>8} {:>14}",
                name, r.rps, r.p50, r.p99, r.errors, per_req
            );
            println!("{:<30} {:>11.1}% of the empty server", "", 100.0 * r.rps / empty.rps.max(1.0));
        }
    });
}
