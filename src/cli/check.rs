//! `ratethrottle check`: one ShouldRateLimit call, printed for humans.

use clap::Args;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, rate_limit::Unit};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Address of a running `ratethrottle serve` gRPC port.
    #[arg(long, env = "RATETHROTTLE_GRPC_ADDR", default_value = "127.0.0.1:8081")]
    addr: String,
    #[arg(long)]
    domain: String,
    /// `k=v[,k2=v2]`: one descriptor; repeat for several. `k` alone means an empty value.
    #[arg(long = "descriptor", required = true)]
    descriptors: Vec<String>,
    /// Hits this request adds (0 = look without counting).
    #[arg(long)]
    hits: Option<u32>,
}

pub fn run(args: CheckArgs) -> ExitCode {
    let descriptors = match args
        .descriptors
        .iter()
        .map(|d| parse_descriptor(d, args.hits))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let request = RateLimitRequest {
        domain: args.domain,
        descriptors,
        hits_addend: 0,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = if args.addr.contains("://") {
        args.addr
    } else {
        format!("http://{}", args.addr)
    };
    let result = rt.block_on(async move {
        let mut client = RateLimitServiceClient::connect(addr.clone())
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        client
            .should_rate_limit(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    });
    match result {
        Ok(resp) => {
            let code = |c: i32| Code::try_from(c).unwrap_or(Code::Unknown).as_str_name();
            println!("overall_code: {}", code(resp.overall_code));
            for (i, s) in resp.statuses.iter().enumerate() {
                let limit = s
                    .current_limit
                    .as_ref()
                    .map_or("no limit".to_string(), |l| {
                        let unit = Unit::try_from(l.unit)
                            .unwrap_or(Unit::Unknown)
                            .as_str_name();
                        let name = if l.name.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", l.name)
                        };
                        format!(
                            "{}/{}{}",
                            l.requests_per_unit,
                            unit.to_ascii_lowercase(),
                            name
                        )
                    });
                let reset = s.duration_until_reset.as_ref().map_or(String::new(), |d| {
                    format!(", reset in {:.3}s", d.seconds as f64 + d.nanos as f64 / 1e9)
                });
                println!(
                    "descriptor {i}: {} limit {limit}, remaining {}{reset}",
                    code(s.code),
                    s.limit_remaining
                );
            }
            if resp.overall_code == Code::OverLimit as i32 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(super) fn parse_descriptor(s: &str, hits: Option<u32>) -> Result<RateLimitDescriptor, String> {
    let mut entries = Vec::new();
    for part in s.split(',') {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if k.is_empty() {
            return Err(format!("descriptor {s:?}: empty key"));
        }
        entries.push(Entry {
            key: k.to_string(),
            value: v.to_string(),
        });
    }
    Ok(RateLimitDescriptor {
        entries,
        hits_addend: hits
            .map(|h| envoy_types::pb::google::protobuf::UInt64Value { value: h as u64 }),
        ..Default::default()
    })
}
