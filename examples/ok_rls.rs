//! A minimal `RateLimitService` and `Authorization` that answer every request OK — the
//! ceiling the benchmarks compare ratethrottle against (what tonic and Envoy cost on their
//! own). `cargo run --release --example ok_rls -- 127.0.0.1:8091`
//!
//! With `--write-bodies <dir>` it instead writes the gRPC-framed request bodies h2load sends
//! (`rls.bin`: one descriptor; `check.bin`: a realistic CheckRequest without a body).

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use prost::Message;

#[path = "../tests/support/check.rs"]
mod check;

struct AlwaysOk;

#[tonic::async_trait]
impl RateLimitService for AlwaysOk {
    async fn should_rate_limit(
        &self,
        r: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let statuses = r
            .get_ref()
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
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
            })
            .collect();
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses,
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl Authorization for AlwaysOk {
    async fn check(
        &self,
        _r: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        use envoy_types::ext_authz::v3::{CheckResponseExt, OkHttpResponseBuilder};
        let mut ok = OkHttpResponseBuilder::new();
        ok.add_header("x-ratethrottle-identity", "api_key:bench", None, false);
        let mut r = CheckResponse::with_status(tonic::Status::ok(""));
        r.set_http_response(ok);
        Ok(tonic::Response::new(r))
    }
}

fn framed(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn write_bodies(dir: &std::path::Path) -> std::io::Result<()> {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    let rls = RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "api_key".into(),
                value: "bench-key".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    };
    std::fs::write(dir.join("rls.bin"), framed(&rls))?;
    let check = check::Check::new("198.51.100.7")
        .header("x-api-key", "bench-key")
        .build();
    std::fs::write(dir.join("check.bin"), framed(&check))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--write-bodies") {
        let dir = args.get(2).ok_or("--write-bodies <dir>")?;
        write_bodies(std::path::Path::new(dir))?;
        return Ok(());
    }
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:8091".into())
        .parse()?;
    println!("ok_rls listening {addr}");
    tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(AlwaysOk))
        .add_service(AuthorizationServer::new(AlwaysOk))
        .serve(addr)
        .await?;
    Ok(())
}
