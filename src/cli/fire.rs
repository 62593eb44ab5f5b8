//! `ratethrottle test`: fire N ShouldRateLimit calls at a running server (C at a time) and
//! print how many were allowed, and how the remaining quota and the reset moved over time.

use super::check::parse_descriptor;
use clap::Args;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Address of a running `ratethrottle serve` gRPC port.
    #[arg(long, env = "RATETHROTTLE_GRPC_ADDR", default_value = "127.0.0.1:8081")]
    addr: String,
    #[arg(long)]
    domain: String,
    /// `k=v[,k2=v2]`: one descriptor; repeat for several.
    #[arg(long = "descriptor", required = true)]
    descriptors: Vec<String>,
    /// Calls to make.
    #[arg(long, default_value_t = 10)]
    requests: u64,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u64,
}

/// One answered call.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// Order of completion, from 0.
    n: u64,
    at: Duration,
    over: bool,
    /// The smallest remaining among the descriptors with a limit.
    remaining: Option<u32>,
    reset: Option<Duration>,
}

pub fn run(args: TestArgs) -> ExitCode {
    if args.requests == 0 || args.concurrency == 0 || args.concurrency > 1024 {
        eprintln!("error: --requests must be at least 1 and --concurrency 1..=1024");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    let descriptors = match args
        .descriptors
        .iter()
        .map(|d| parse_descriptor(d, None))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let request = RateLimitRequest {
        domain: args.domain.clone(),
        descriptors,
        hits_addend: 0,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fire(&args, request)) {
        Ok((answers, errors, elapsed)) => {
            report(&answers, errors, elapsed);
            if errors > 0 {
                ExitCode::FAILURE
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

async fn fire(
    args: &TestArgs,
    request: RateLimitRequest,
) -> Result<(Vec<Answer>, u64, Duration), String> {
    let url = super::remote::url(&args.addr);
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .map_err(|e| format!("bad address {:?}: {e}", args.addr))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| {
            let cause = super::remote::causes(&e);
            format!("cannot reach the gRPC port at {url}: {cause} (is `ratethrottle serve` running there? set --addr)")
        })?;
    let client = RateLimitServiceClient::new(channel);
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(parking_lot::Mutex::new(None::<String>));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.min(args.requests) {
        let mut client = client.clone();
        let request = request.clone();
        let (next, done, first_error) = (next.clone(), done.clone(), first_error.clone());
        let total = args.requests;
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut errors = 0u64;
            while next.fetch_add(1, Relaxed) < total {
                match client.should_rate_limit(request.clone()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let limited = r.statuses.iter().filter(|s| s.current_limit.is_some());
                        let remaining = limited.clone().map(|s| s.limit_remaining).min();
                        let reset = limited
                            .filter_map(|s| s.duration_until_reset.as_ref())
                            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
                            .max();
                        answers.push(Answer {
                            n: done.fetch_add(1, Relaxed),
                            at: start.elapsed(),
                            over: r.overall_code == Code::OverLimit as i32,
                            remaining,
                            reset,
                        });
                    }
                    Err(s) => {
                        errors += 1;
                        first_error
                            .lock()
                            .get_or_insert_with(|| format!("{:?}: {}", s.code(), s.message()));
                    }
                }
            }
            (answers, errors)
        }));
    }
    let mut answers = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (a, e) = t.await.map_err(|e| format!("worker: {e}"))?;
        answers.extend(a);
        errors += e;
    }
    if let Some(e) = first_error.lock().take() {
        eprintln!("error: {errors} call(s) failed; first: {e}");
    }
    answers.sort_by_key(|a| a.n);
    Ok((answers, errors, start.elapsed()))
}

fn report(answers: &[Answer], errors: u64, elapsed: Duration) {
    // A closed stdout (`| head`) ends the output, never the process with a panic.
    let mut out = std::io::stdout().lock();
    let over = answers.iter().filter(|a| a.over).count();
    let allowed = answers.len() - over;
    let _ = writeln!(
        out,
        "allowed: {allowed}  over_limit: {over}  errors: {errors}  in {:.3}s ({:.0} calls/s)",
        elapsed.as_secs_f64(),
        answers.len() as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    // At most ten lines: each a slice of the calls in the order they were answered.
    let per = answers.len().div_ceil(10).max(1);
    for chunk in answers.chunks(per) {
        let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
            continue;
        };
        let over = chunk.iter().filter(|a| a.over).count();
        let remaining = |a: &Answer| a.remaining.map_or("-".into(), |r| r.to_string());
        let reset = last
            .reset
            .map_or("-".into(), |r| format!("{:.1}s", r.as_secs_f64()));
        let _ = writeln!(
            out,
            "calls {:>5}-{:<5} at {:>7.3}s: {:>4} allowed {:>4} over_limit  remaining {}->{}  reset {}",
            first.n + 1,
            last.n + 1,
            last.at.as_secs_f64(),
            chunk.len() - over,
            over,
            remaining(first),
            remaining(last),
            reset
        );
    }
}
