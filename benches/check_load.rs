//! gRPC ext_authz Check under concurrent load, next to ShouldRateLimit on the same server and
//! empty tonic servers answering each RPC with a fixed response — the ceilings for our own
//! cost. All run in this process on ephemeral ports, one after the other, driven by the same
//! client code, so the ratios are meaningful on a noisy machine.
//!
//! The Check request is what Envoy sends for a GET without a body: source and destination
//! peers and a dozen headers, an API key naming the caller. The server resolves the
//! identity, looks the client IP up among 10 000 blocked CIDRs (IPv4 and IPv6), matches a
//! policy and decides its descriptor (generic_key + identity) in the in-memory store — the
//! same descriptor the ShouldRateLimit row sends.
//!
//! The client shares the machine's cores with the server, and a typed tonic client spends
//! several times more CPU building and encoding a CheckRequest (a map of headers) than a
//! RateLimitRequest; in production that is Envoy's work, on its own cores. So requests are
//! encoded once, before the clock starts, and sent as bytes (`RawCodec`): the rows compare
//! what the servers spend. `BENCH_TYPED_CLIENT=1` uses the typed clients instead.
//!
//! `cargo bench --bench check_load` (env: BENCH_SECONDS=5, BENCH_CONNECTIONS=4,
//! BENCH_STREAMS=32, BENCH_KEYS=4096).
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]
// The engine's request future nests deeply (storage coalescing): rustc's default layout
// query depth is not enough for crates that await it.
#![recursion_limit = "256"]

#[path = "../tests/support/check.rs"]
mod check;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use ratethrottle::server::{BoundServer, ServerOptions};
use std::fmt::Write;
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
impl Authorization for Empty {
    async fn check(
        &self,
        _r: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        use envoy_types::ext_authz::v3::{CheckResponseExt, OkHttpResponseBuilder};
        let mut ok = OkHttpResponseBuilder::new();
        ok.add_header("x-ratethrottle-identity", "api_key:key-1", None, false);
        let mut r = CheckResponse::with_status(tonic::Status::ok(""));
        r.set_http_response(ok);
        Ok(tonic::Response::new(r))
    }
}

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
                limit_remaining: 999_999_999,
                ..Default::default()
            }],
            ..Default::default()
        }))
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Check,
    ShouldRateLimit,
}

/// Sends a message encoded ahead of time; decodes the answer as `R`.
struct RawCodec<R>(std::marker::PhantomData<R>);

struct RawEncoder;
struct RawDecoder<R>(std::marker::PhantomData<R>);

impl tonic::codec::Encoder for RawEncoder {
    type Item = tonic::codegen::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: tonic::codegen::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl<R: prost::Message + Default> tonic::codec::Decoder for RawDecoder<R> {
    type Item = R;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<R>, tonic::Status> {
        R::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl<R: prost::Message + Default + Send + 'static> tonic::codec::Codec for RawCodec<R> {
    type Encode = tonic::codegen::Bytes;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder<R>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder<R> {
        RawDecoder(std::marker::PhantomData)
    }
}

async fn raw<R: prost::Message + Default + Send + Sync + 'static>(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    body: tonic::codegen::Bytes,
) -> Option<R> {
    grpc.ready().await.ok()?;
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec::<R>(std::marker::PhantomData),
    )
    .await
    .ok()
    .map(tonic::Response::into_inner)
}

struct Row {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

/// Requests are built before the clock starts, so the client's cost is a clone for both RPCs.
fn check_requests(keys: u64) -> Vec<CheckRequest> {
    (0..keys)
        .map(|i| {
            check::Check::new(&format!("192.0.{}.{}", 2 + (i / 250) % 50, 1 + i % 250))
                .path("/api/orders/42")
                .header("x-api-key", &format!("key-{i}"))
                .header("authorization", "Basic dXNlcjpwYXNz")
                .header("accept-encoding", "gzip, br")
                .build()
        })
        .collect()
}

fn rls_requests(keys: u64) -> Vec<RateLimitRequest> {
    (0..keys)
        .map(|i| RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![
                    Entry {
                        key: "generic_key".into(),
                        value: "api".into(),
                    },
                    Entry {
                        key: "identity".into(),
                        value: format!("api_key:key-{i}"),
                    },
                ],
                ..Default::default()
            }],
            hits_addend: 0,
        })
        .collect()
}

async fn drive(
    addr: SocketAddr,
    rpc: Rpc,
    seconds: u64,
    conns: u64,
    streams: u64,
    keys: u64,
) -> Row {
    use prost::Message;
    let typed = std::env::var("BENCH_TYPED_CLIENT").is_ok_and(|v| v == "1");
    let checks = std::sync::Arc::new(check_requests(keys));
    let rls = std::sync::Arc::new(rls_requests(keys));
    let checks_raw: std::sync::Arc<Vec<tonic::codegen::Bytes>> =
        std::sync::Arc::new(checks.iter().map(|r| r.encode_to_vec().into()).collect());
    let rls_raw: std::sync::Arc<Vec<tonic::codegen::Bytes>> =
        std::sync::Arc::new(rls.iter().map(|r| r.encode_to_vec().into()).collect());
    let mut tasks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    for c in 0..conns {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        for s in 0..streams {
            let channel = channel.clone();
            let (checks, rls) = (checks.clone(), rls.clone());
            let (checks_raw, rls_raw) = (checks_raw.clone(), rls_raw.clone());
            tasks.push(tokio::spawn(async move {
                let mut authz = AuthorizationClient::new(channel.clone());
                let mut limits = RateLimitServiceClient::new(channel.clone());
                let mut grpc = tonic::client::Grpc::new(channel);
                let mut lat = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                // A fixed, deterministic spread over the prebuilt requests.
                let mut i = ((c * 7919 + s * 104_729) % checks.len() as u64) as usize;
                while Instant::now() < deadline {
                    i = (i + 1) % checks.len();
                    let t = Instant::now();
                    let ok = match (rpc, typed) {
                        (Rpc::Check, true) => authz
                            .check(checks[i].clone())
                            .await
                            .is_ok_and(|r| r.get_ref().status.as_ref().is_none_or(|s| s.code == 0)),
                        (Rpc::ShouldRateLimit, true) => limits
                            .should_rate_limit(rls[i].clone())
                            .await
                            .is_ok_and(|r| r.get_ref().overall_code == Code::Ok as i32),
                        (Rpc::Check, false) => raw::<CheckResponse>(
                            &mut grpc,
                            "/envoy.service.auth.v3.Authorization/Check",
                            checks_raw[i].clone(),
                        )
                        .await
                        .is_some_and(|r| r.status.as_ref().is_none_or(|s| s.code == 0)),
                        (Rpc::ShouldRateLimit, false) => raw::<RateLimitResponse>(
                            &mut grpc,
                            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
                            rls_raw[i].clone(),
                        )
                        .await
                        .is_some_and(|r| r.overall_code == Code::Ok as i32),
                    };
                    if ok {
                        lat.push(t.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
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
    Row {
        rps: all.len() as f64 / seconds as f64,
        p50: pct(0.50),
        p99: pct(0.99),
        errors,
    }
}

/// The settings file: identity by API key, 10 000 blocked networks, one policy.
fn config() -> String {
    let mut blocks = String::new();
    for i in 0..5_000u32 {
        let _ = writeln!(
            blocks,
            "      - {}.{}.{}.0/24",
            100 + i / 65_536,
            (i / 256) % 256,
            i % 256
        );
        let _ = writeln!(blocks, "      - \"2001:db8:{:x}::/48\"", i);
    }
    format!(
        r#"
authz:
  domain: edge
  identity:
    sources:
      - header: x-api-key
        name: api_key
      - client_ip
  lists:
    block:
{blocks}
  policies:
    - name: api
      match: {{path: {{prefix: /api/}}}}
      descriptors:
        - [{{generic_key: {{descriptor_value: api}}}}, {{identity: {{}}}}]
domains:
  - domain: edge
    descriptors:
      - key: generic_key
        value: api
        descriptors:
          - key: identity
            rate_limit: {{unit: hour, requests_per_unit: 1000000000}}
"#
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful: run short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let seconds = if quick { 1 } else { env("BENCH_SECONDS", 5) };
    let conns = env("BENCH_CONNECTIONS", 4);
    let streams = env("BENCH_STREAMS", 32);
    let keys = env("BENCH_KEYS", 4096).clamp(1, 4096);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ratethrottle.yaml");
        std::fs::write(&path, config()).expect("write");
        let config = ratethrottle::config::load(&path).expect("config");
        let server = BoundServer::bind(ServerOptions {
            config_path: Some(path),
            config: Some(config),
            grpc_addr: "127.0.0.1:0".parse().expect("addr"),
            admin_addr: "127.0.0.1:0".parse().expect("addr"),
            reload_interval: Duration::from_secs(60),
            allow_empty_config: false,
            storage: std::env::var("BENCH_STORAGE").ok(),
            admin_token: None,
            redis_password: None,
            kubernetes: None,
            connections: Default::default(),
        })
        .await
        .expect("bind");
        let rt_addr = server.grpc_addr;
        tokio::spawn(server.run(std::future::pending()));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let empty_addr = listener.local_addr().expect("addr");
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AuthorizationServer::new(Empty))
                .add_service(RateLimitServiceServer::new(Empty))
                .serve_with_incoming(incoming),
        );

        println!(
            "gRPC Check vs ShouldRateLimit, {conns} connections x {streams} streams, {seconds}s each, \
             {} distinct identities, 10000 blocked CIDRs",
            keys
        );
        if std::env::var("BENCH_TYPED_CLIENT").is_ok_and(|v| v == "1") {
            println!("typed tonic clients (request building and encoding on the measured cores)");
        } else {
            println!("requests encoded before the clock starts (the servers' cost is compared)");
        }
        println!(
            "{:<36} {:>12} {:>10} {:>10} {:>8}",
            "server", "requests/s", "p50", "p99", "errors"
        );
        let mut rows = Vec::new();
        for (name, addr, rpc) in [
            ("empty tonic server: Check", empty_addr, Rpc::Check),
            ("ratethrottle: Check (no body)", rt_addr, Rpc::Check),
            ("empty tonic server: ShouldRateLimit", empty_addr, Rpc::ShouldRateLimit),
            ("ratethrottle: ShouldRateLimit", rt_addr, Rpc::ShouldRateLimit),
        ] {
            let r = drive(addr, rpc, seconds, conns, streams, keys).await;
            println!(
                "{:<36} {:>12.0} {:>10?} {:>10?} {:>8}",
                name, r.rps, r.p50, r.p99, r.errors
            );
            rows.push(r.rps);
        }
        println!(
            "Check / ShouldRateLimit = {:.1}%   Check / empty Check server = {:.1}%",
            100.0 * rows[1] / rows[3].max(1.0),
            100.0 * rows[1] / rows[0].max(1.0)
        );
    });
}
