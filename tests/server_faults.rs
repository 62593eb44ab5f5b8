//! Connection faults against the real process: clients that connect and never speak, half-sent
//! requests, SIGTERM with those open, running out of file descriptors, undecodable protobuf.
//!
//! Every setting is passed through the environment (`RATETHROTTLE_*`), so each test also runs
//! against a build without them and fails there on behaviour, not on an unknown flag.

mod support;

use futures_util::StreamExt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};
use support::Sidecar;

type RlsClient = envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>;

/// A raw TCP connection that sends `bytes` (maybe nothing) and then only listens.
fn raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(bytes).expect("write");
    s
}

/// Reads until the server closes the connection; the time since `start` when it did, or
/// `None` if it was still open `within` after `start`.
fn closed_within(s: &mut TcpStream, start: Instant, within: Duration) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            // Reset by the server: closed too.
            Err(_) => return Some(start.elapsed()),
        }
    }
}

/// The HTTP/2 connection preface and an empty SETTINGS frame: a client that completed the
/// handshake and then went silent (it never answers a PING).
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
const HALF_SENT_REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nhost: test\r\n";

fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// Waits up to `within` for the child to exit; its status, or `None` if still running.
fn exit_within(sidecar: &mut Sidecar, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = sidecar.child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sigterm_with_silent_connections_and_half_sent_requests_exits_within_the_drain_bound() {
    let drain = Duration::from_millis(1000);
    let mut sidecar = Sidecar::start_with_env(
        None,
        &[],
        &[
            ("RATETHROTTLE_SHUTDOWN_DRAIN_MS", "1000"),
            // Long enough that only the drain bound can end these connections in time.
            ("RATETHROTTLE_HANDSHAKE_TIMEOUT_MS", "60000"),
            ("RATETHROTTLE_HTTP2_KEEPALIVE_MS", "60000"),
        ],
    );
    let _silent: Vec<TcpStream> = (0..20).map(|_| raw(sidecar.grpc, b"")).collect();
    let _half_h2: Vec<TcpStream> = (0..3)
        .map(|_| raw(sidecar.grpc, &H2_PREFACE_AND_SETTINGS[..10]))
        .collect();
    let _half_sent: Vec<TcpStream> = (0..5)
        .map(|_| raw(sidecar.admin, HALF_SENT_REQUEST))
        .collect();
    std::thread::sleep(Duration::from_millis(200));

    let start = Instant::now();
    sigterm(sidecar.child.id());
    // The bound plus a generous margin for a loaded machine: this is about exiting at all
    // (a build without the drain waits for the clients, forever here), not a speed test.
    let status = exit_within(&mut sidecar, drain + Duration::from_secs(5));
    let took = start.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running {took:?} after SIGTERM with silent connections open; stderr:\n{}",
            sidecar.stderr()
        )
    });
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took >= drain - Duration::from_millis(50),
        "left before the drain bound: {took:?}"
    );
    eprintln!("exited {took:?} after SIGTERM (drain bound {drain:?})");
}

#[test]
fn silent_connections_and_half_sent_requests_are_closed_by_the_server() {
    let sidecar = Sidecar::start_with_env(
        None,
        &[],
        &[
            ("RATETHROTTLE_HANDSHAKE_TIMEOUT_MS", "300"),
            ("RATETHROTTLE_HTTP2_KEEPALIVE_MS", "300"),
        ],
    );
    let within = Duration::from_secs(5);
    let cases: [(&str, SocketAddr, &[u8]); 5] = [
        ("gRPC, connected and silent", sidecar.grpc, b""),
        (
            "gRPC, half an HTTP/2 preface",
            sidecar.grpc,
            &H2_PREFACE_AND_SETTINGS[..10],
        ),
        (
            "gRPC, handshake done, PINGs unanswered",
            sidecar.grpc,
            H2_PREFACE_AND_SETTINGS,
        ),
        ("admin, connected and silent", sidecar.admin, b""),
        (
            "admin, half-sent HTTP/1 request",
            sidecar.admin,
            HALF_SENT_REQUEST,
        ),
    ];
    let opened = Instant::now();
    let mut conns: Vec<_> = cases
        .iter()
        .map(|(what, addr, bytes)| (*what, raw(*addr, bytes)))
        .collect();
    for (what, conn) in &mut conns {
        let took = closed_within(conn, opened, within)
            .unwrap_or_else(|| panic!("{what}: still open after {within:?}"));
        eprintln!("{what}: closed {took:?} after connecting");
    }
    // A client that speaks is served as before.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (code, body) = rt.block_on(sidecar.get("/healthz"));
    assert_eq!((code, body.as_str()), (200, "OK\n"));
}

/// A slowloris at the scale the adversarial run used: 1,000 connections that never finish a
/// request (half on each port) are all closed by the handshake timeout, and the sidecar keeps
/// serving while they are open.
#[test]
fn a_thousand_slowloris_connections_are_all_closed() {
    let sidecar = Sidecar::start_with_env(
        None,
        &[],
        &[
            ("RATETHROTTLE_HANDSHAKE_TIMEOUT_MS", "500"),
            ("RATETHROTTLE_HTTP2_KEEPALIVE_MS", "500"),
        ],
    );
    let opened = Instant::now();
    let mut conns: Vec<TcpStream> = (0..1000)
        .map(|i| {
            if i % 2 == 0 {
                raw(sidecar.grpc, &H2_PREFACE_AND_SETTINGS[..10])
            } else {
                raw(sidecar.admin, HALF_SENT_REQUEST)
            }
        })
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (code, _) = rt.block_on(sidecar.get("/healthz"));
    assert_eq!(code, 200, "served while 1,000 slow connections are open");
    let within = Duration::from_secs(15);
    let mut last = Duration::ZERO;
    for (i, conn) in conns.iter_mut().enumerate() {
        let took = closed_within(conn, opened, within)
            .unwrap_or_else(|| panic!("connection {i} still open after {within:?}"));
        last = last.max(took);
    }
    eprintln!("1,000 slowloris connections: the last closed {last:?} after opening");
}

/// `utime + stime` of `pid` in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The command name may hold spaces; the fields after it are space-separated.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so fields 14 and 15 are at 11 and 12.
    let ticks = |i: usize| fields[i].parse::<u64>().expect("clock ticks");
    ticks(11) + ticks(12)
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK")
}

fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn out_of_file_descriptors_backs_off_counts_and_recovers() {
    // `ulimit -n` sets the soft and the hard limit, so raising soft → hard at start keeps 64.
    let mut sidecar = Sidecar::start_via(
        &["sh", "-c", "ulimit -n 64 && exec \"$@\"", "sh"],
        None,
        &[],
        &[("RATETHROTTLE_HANDSHAKE_TIMEOUT_MS", "60000")],
    );
    let pid = sidecar.child.id();
    // More connections than descriptors: the rest wait in the backlog, and every accept of
    // them fails with EMFILE until some close.
    let flood: Vec<TcpStream> = (0..120).map(|_| raw(sidecar.grpc, b"")).collect();
    std::thread::sleep(Duration::from_millis(500));

    let hz = clock_ticks_per_second();
    let window = Duration::from_secs(2);
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    let used = (cpu_ticks(pid) - before) as f64 / hz as f64 / window.as_secs_f64();
    eprintln!(
        "CPU while out of descriptors: {:.1} % of a core",
        used * 100.0
    );
    // A spinning accept loop is ~100 %; backing off is ~0. Half a core leaves a wide margin
    // on a loaded machine.
    assert!(
        used < 0.5,
        "accept loop spins: {:.0} % of a core; stderr:\n{}",
        used * 100.0,
        sidecar.stderr()
    );
    assert!(sidecar.child_alive());

    drop(flood);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let errors = loop {
        // The admin port answers again once the descriptors are back.
        let answer = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), async {
                let mut s = tokio::net::TcpStream::connect(sidecar.admin).await.ok()?;
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(b"GET /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                    .await
                    .ok()?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.ok()?;
                Some(String::from_utf8_lossy(&buf).to_string())
            })
            .await
            .ok()
            .flatten()
        });
        if let Some(text) = answer.filter(|t| t.starts_with("HTTP/1.1 200")) {
            break metric(&text, "ratethrottle_accept_errors_total{port=\"grpc\"}");
        }
        assert!(
            Instant::now() < deadline,
            "admin port not answering after the flood closed; stderr:\n{}",
            sidecar.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let errors = errors.expect("ratethrottle_accept_errors_total{port=\"grpc\"} in /metrics");
    assert!(errors > 0, "accept errors not counted");
    eprintln!("accept errors counted: {errors}");
    let log = sidecar.stderr();
    let lines = log.matches("accepting a connection failed").count();
    assert!(
        (1..=3).contains(&lines),
        "accept failures logged {lines} times (rate-limited: ≤ 1 per 5 s); stderr:\n{log}"
    );
}

/// Field 1 as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(bytes = "vec", tag = "1")]
    value: Vec<u8>,
}

#[tokio::test]
async fn undecodable_protobuf_is_invalid_argument() {
    use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
    use tonic::codegen::http::uri::PathAndQuery;

    let sidecar = Sidecar::start(None, &[]);
    // Field 1 as bytes that are no valid UTF-8 (RateLimitRequest.domain is a string) and no
    // valid message (CheckRequest.attributes): protobuf on the wire, undecodable for us.
    let garbage = Garbage {
        value: vec![0xff, 0xfe, 0xfd],
    };
    async fn call<R: prost::Message + Default + Send + std::fmt::Debug + 'static>(
        channel: tonic::transport::Channel,
        path: &'static str,
        body: Garbage,
    ) -> tonic::Status {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        let codec = tonic_prost::ProstCodec::<Garbage, R>::default();
        grpc.unary(
            tonic::Request::new(body),
            PathAndQuery::from_static(path),
            codec,
        )
        .await
        .expect_err("an undecodable request fails")
    }
    for (path, status) in [
        (
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            call::<RateLimitResponse>(
                sidecar.channel().await,
                "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
                garbage.clone(),
            )
            .await,
        ),
        (
            "/envoy.service.auth.v3.Authorization/Check",
            call::<CheckResponse>(
                sidecar.channel().await,
                "/envoy.service.auth.v3.Authorization/Check",
                garbage.clone(),
            )
            .await,
        ),
    ] {
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{path}: {status:?}"
        );
    }
    // A well-formed request is still answered.
    let ok = sidecar
        .client()
        .await
        .should_rate_limit(support::request("d", &[&[("k", "v")]]))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

/// The soft and hard open-file limits of a process, from /proc.
fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn serve_raises_the_soft_open_file_limit_to_the_hard_one() {
    // Only the soft limit is lowered (`ulimit -S`): the hard limit stays where it was, and
    // `serve` lifts the soft one to it at start (every Envoy connection is a descriptor).
    let sidecar = Sidecar::start_via(
        &["sh", "-c", "ulimit -S -n 128 && exec \"$@\"", "sh"],
        None,
        &[],
        &[],
    );
    let (soft, hard) = nofile_limits(sidecar.child.id());
    assert!(
        hard > 128,
        "this machine's hard limit is {hard}: nothing to raise"
    );
    assert_eq!(soft, hard, "the soft limit was left at {soft}");
    assert!(
        sidecar.stderr().contains("raised the open file limit"),
        "{}",
        sidecar.stderr()
    );
}

/// Both layouts of the gRPC port (tokio's shared pool, `RATETHROTTLE_GRPC_THREADS=0`, and one
/// single-threaded runtime per core, `=2`), under load from many connections at once:
/// - one counter hit from 8 connections admits exactly its limit (the threads share it);
/// - SIGTERM with requests in flight on 8 connections answers every request that was sent
///   before the stop with a decision, fails the later ones with a closed connection (never an
///   answer that is neither), ends every client within the drain bound and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_count_exactly_and_sigterm_under_load_answers_every_request_in_flight() {
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
    let (_dir, config) = support::config_file(
        "config.yaml",
        "domain: d\ndescriptors:\n  - key: shared\n    rate_limit: {unit: hour, requests_per_unit: 250}\n  - key: free\n    rate_limit: {unit: hour, requests_per_unit: 1000000000}\n",
    );
    for threads in ["0", "2"] {
        let mut sidecar = Sidecar::start_with_env(
            Some(&config),
            &[],
            &[
                ("RATETHROTTLE_GRPC_THREADS", threads),
                ("RATETHROTTLE_SHUTDOWN_DRAIN_MS", "3000"),
            ],
        );
        // The layout asked for is the one running: its serving threads are named.
        let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", sidecar.child.id()))
            .expect("tasks")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect();
        let serving = names.iter().filter(|n| n.starts_with("grpc-")).count();
        assert_eq!(
            serving,
            if threads == "0" { 0 } else { 2 },
            "threads: {names:?}"
        );
        // 8 connections × 100 requests, 10 in flight per connection, on one counter.
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let client = sidecar.client().await;
            tasks.spawn(async move {
                let calls = (0..100).map(|_| {
                    let mut c = client.clone();
                    async move {
                        c.should_rate_limit(support::request("d", &[&[("shared", "x")]]))
                            .await
                            .expect("answered")
                            .into_inner()
                            .overall_code
                    }
                });
                futures_util::stream::iter(calls)
                    .buffer_unordered(10)
                    .collect::<Vec<i32>>()
                    .await
            });
        }
        let codes: Vec<i32> = tasks.join_all().await.into_iter().flatten().collect();
        let ok = codes.iter().filter(|&&c| c == Code::Ok as i32).count();
        let over = codes
            .iter()
            .filter(|&&c| c == Code::OverLimit as i32)
            .count();
        assert_eq!((ok, over), (250, 550), "grpc threads {threads}");

        // SIGTERM under load: each connection keeps 8 requests in flight until one fails. A
        // request sent well before the signal (100 ms: the signal is a `kill` away) must be
        // answered; one sent later may find the connection closing.
        let sigterm_at = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
        let mut load = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let client = sidecar.client().await;
            let sigterm_at = sigterm_at.clone();
            load.spawn(async move {
                let (mut answered, mut failed_in_flight) = (0u64, Vec::new());
                let mut inflight = futures_util::stream::FuturesUnordered::new();
                let send = |mut c: RlsClient| async move {
                    let sent = Instant::now();
                    let r = c
                        .should_rate_limit(support::request("d", &[&[("free", "y")]]))
                        .await;
                    (r, sent)
                };
                for _ in 0..8 {
                    inflight.push(send(client.clone()));
                }
                while let Some((r, sent)) = inflight.next().await {
                    match r {
                        Ok(a) => {
                            assert_eq!(a.into_inner().overall_code, Code::Ok as i32);
                            answered += 1;
                            inflight.push(send(client.clone()));
                        }
                        Err(status) => {
                            let in_flight = sigterm_at
                                .get()
                                .is_none_or(|&t| sent + Duration::from_millis(100) < t);
                            if in_flight {
                                failed_in_flight.push(status);
                            }
                        }
                    }
                }
                (answered, failed_in_flight)
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        let _ = sigterm_at.set(start);
        sigterm(sidecar.child.id());
        let ended = tokio::time::timeout(Duration::from_secs(3 + 10), load.join_all())
            .await
            .unwrap_or_else(|_| {
                panic!("grpc threads {threads}: a client still waits after SIGTERM")
            });
        for (answered, failed_in_flight) in &ended {
            assert!(
                *answered > 0,
                "grpc threads {threads}: a connection got no answer"
            );
            assert!(
                failed_in_flight.is_empty(),
                "grpc threads {threads}: requests in flight at SIGTERM failed: {failed_in_flight:?}"
            );
        }
        let status = exit_within(&mut sidecar, Duration::from_secs(3 + 10))
            .unwrap_or_else(|| panic!("grpc threads {threads}: still running after SIGTERM"));
        assert!(status.success(), "grpc threads {threads}: exit {status:?}");
        eprintln!(
            "grpc threads {threads}: {} answers under load, exited {:?} after SIGTERM",
            ended.iter().map(|e| e.0).sum::<u64>(),
            start.elapsed()
        );
    }
}

/// The serving thread count is bounded (each is an OS thread with a runtime): a value over
/// 1024, negative or not a number stops `serve` before it binds, naming the setting.
#[test]
fn an_out_of_range_grpc_thread_count_stops_serve_naming_it() {
    for bad in ["5000", "-1", "two", ""] {
        let mut child = Command::new(support::BIN)
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .env("RATETHROTTLE_GRPC_THREADS", bad)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run");
        // A build that accepts the value serves: stop it rather than wait forever.
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        assert!(stderr.contains("--grpc-threads"), "{bad:?}: {stderr}");
    }
}
