//! The anomaly module through the real process: a client hammering Check is denied (403)
//! within seconds while the others keep passing; dry-run changes nothing a client sees but
//! reports the decision; an unban lets the client through; garbage access-log streams and
//! entries break nothing.
#![allow(clippy::unwrap_used)]

mod support;

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use support::check::Check;
use support::{Sidecar, eventually, http_with};

const TOKEN: &str = "t0ken-for-tests";

fn config(dry_run: bool) -> String {
    format!(
        "settings:\n  admin_token: {TOKEN}\nanomaly:\n  dry_run: {dry_run}\n  warmup: 1s\n  \
         replica: test-a\n  volumetric: {{floor: 30, p99_multiple: 3}}\n  \
         ttl: {{base: 1m, cap: 10m, jitter: 0}}\n  unban_suppress: 1m\n"
    )
}

fn start(dir: &tempfile::TempDir, dry_run: bool) -> Sidecar {
    let path = dir.path().join("settings.yaml");
    std::fs::write(&path, config(dry_run)).unwrap();
    Sidecar::start(Some(&path), &[])
}

async fn admin(s: &Sidecar, method: &str, path: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {TOKEN}");
    let (code, body) = http_with(s.admin, method, path, "", &[("authorization", &auth)]).await;
    let json = serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null);
    (code, json)
}

/// 20 well-behaved addresses, 2 requests a second each, until `stop`; counts their denials.
fn background(
    s: &Sidecar,
    stop: Arc<AtomicBool>,
    denied: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let grpc = s.grpc;
    tokio::spawn(async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client =
            envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(channel);
        while !stop.load(Relaxed) {
            for i in 0..20 {
                let c = Check::new(&format!("10.1.0.{}", i + 1)).path("/home");
                let r = client.check(c.build()).await.unwrap().into_inner();
                if !support::check::Answer::of(&r).ok() {
                    denied.fetch_add(1, Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// ~200 Checks a second from `ip` until `stop`; records the first 403.
fn hammer(
    s: &Sidecar,
    ip: &'static str,
    stop: Arc<AtomicBool>,
    first_403: Arc<AtomicU64>,
    start: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|_| {
            let grpc = s.grpc;
            let (stop, first) = (stop.clone(), first_403.clone());
            tokio::spawn(async move {
                let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(channel);
                while !stop.load(Relaxed) {
                    let c = Check::new(ip).path("/api/search");
                    let r = client.check(c.build()).await.unwrap().into_inner();
                    let a = support::check::Answer::of(&r);
                    if a.http == 403 && first.load(Relaxed) == 0 {
                        first.store(start.elapsed().as_millis() as u64 + 1, Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_denied_the_others_pass_and_an_unban_lets_it_through() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(&dir, false);
    let stop = Arc::new(AtomicBool::new(false));
    let bg_denied = Arc::new(AtomicU64::new(0));
    let bg = background(&s, stop.clone(), bg_denied.clone());
    // Warm-up (1 s) passes on ordinary traffic; then the flood starts.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let start_at = Instant::now();
    let first_403 = Arc::new(AtomicU64::new(0));
    let flood = hammer(&s, "10.9.9.9", stop.clone(), first_403.clone(), start_at);
    eventually(
        Duration::from_secs(8),
        "the flooding client gets 403",
        || {
            let f = first_403.clone();
            async move { f.load(Relaxed) > 0 }
        },
    )
    .await;
    let denied_after_ms = first_403.load(Relaxed);
    eprintln!("flooding client denied {denied_after_ms} ms after the flood started");
    assert!(denied_after_ms < 5_000, "{denied_after_ms} ms");
    // The block names its code; the decision shows with evidence.
    let a = s.check(&Check::new("10.9.9.9")).await;
    assert_eq!(a.http, 403);
    assert!(a.body.contains("anomaly"), "{}", a.body);
    let (code, d) = admin(&s, "GET", "/v1/anomaly/decisions").await;
    assert_eq!(code, 200, "{d}");
    let dec = d["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["value"] == "10.9.9.9")
        .cloned()
        .unwrap_or_else(|| panic!("{d}"));
    assert_eq!(dec["action"], "deny");
    assert_eq!(dec["reason"], "volumetric/v1");
    assert_eq!(dec["enforced"], true);
    assert_eq!(dec["dry_run"], false);
    assert_eq!(dec["replica"], "test-a");
    assert!(dec["evidence"]["count"].as_u64().unwrap() > 30, "{dec}");
    let (code, list) = admin(&s, "GET", "/v1/lists/block").await;
    assert_eq!(code, 200);
    assert!(list.to_string().contains("anomaly:volumetric/v1"), "{list}");
    // Nobody else was touched.
    stop.store(true, Relaxed);
    for t in flood {
        t.await.unwrap();
    }
    bg.await.unwrap();
    assert_eq!(
        bg_denied.load(Relaxed),
        0,
        "a well-behaved client was denied"
    );
    assert!(s.check(&Check::new("10.1.0.3")).await.ok());
    // Why: explain names the counts and thresholds.
    let (code, x) = admin(&s, "GET", "/v1/anomaly/explain?key=10.9.9.9").await;
    assert_eq!(code, 200, "{x}");
    assert_eq!(x["scope"], "ip");
    assert!(x["offenses"].as_u64().unwrap() >= 1, "{x}");
    assert!(x["active_until_ms"].is_null() || x["active_until_ms"].as_u64().is_some());
    let (code, _) = admin(&s, "GET", "/v1/anomaly/explain?key=10.0.0.0/8").await;
    assert_eq!(code, 400);
    // Metrics.
    let (_, text) = http_with(s.admin, "GET", "/metrics", "", &[]).await;
    assert!(
        text.contains(
            "ratethrottle_anomaly_decisions_total{detector=\"volumetric\",action=\"deny\",mode=\"enforced\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("ratethrottle_anomaly_events_dropped_total 0"));
    assert!(text.contains("ratethrottle_anomaly_detection_latency_seconds_count 1"));
    // The token rule of /v1/lists.
    let (code, _) = http_with(s.admin, "GET", "/v1/anomaly/decisions", "", &[]).await;
    assert_eq!(code, 401);
    // The same through `ratethrottle manage`.
    let manage = |args: &[&str]| {
        let out = std::process::Command::new(support::BIN)
            .args([
                "manage",
                "--admin-addr",
                &s.admin.to_string(),
                "--token",
                TOKEN,
            ])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (rc, out, err) = manage(&["--anomaly-decisions"]);
    assert_eq!(rc, Some(0), "{err}");
    let row = out
        .lines()
        .find(|l| l.contains("10.9.9.9"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("deny") && row.contains("volumetric/v1") && row.contains("enforced"),
        "{row}"
    );
    let (rc, out, err) = manage(&["--anomaly-explain", "10.9.9.9"]);
    assert_eq!(rc, Some(0), "{err}");
    let x: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(x["scope"], "ip", "{out}");
    let (rc, _, err) = manage(&["--anomaly-explain", "10.0.0.0/8"]);
    assert_eq!(rc, Some(1));
    assert!(err.contains("400"), "{err}");
    let (rc, _, err) = manage(&["--anomaly-unban", "10.9.9.8"]);
    assert_eq!(rc, Some(1));
    assert!(err.contains("404"), "{err}");
    // Unban: the entry goes, the client passes, and re-detection is suppressed.
    let (code, u) = admin(&s, "DELETE", "/v1/anomaly/decisions/10.9.9.9").await;
    assert_eq!(code, 200, "{u}");
    assert!(s.check(&Check::new("10.9.9.9")).await.ok());
    let (code, _) = admin(&s, "DELETE", "/v1/anomaly/decisions/10.9.9.8").await;
    assert_eq!(code, 404);
    assert!(s.child_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_without_enforcing_and_garbage_access_logs_break_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(&dir, true);
    let stop = Arc::new(AtomicBool::new(false));
    let bg_denied = Arc::new(AtomicU64::new(0));
    let bg = background(&s, stop.clone(), bg_denied.clone());

    // Access logs: garbage entries, an empty message, a stream cut mid-way, then good ones.
    let mut als = AccessLogServiceClient::new(s.channel().await);
    let entry = |ip: &str, status: Option<u32>| HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            downstream_remote_address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.into(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: status.map(|value| UInt32Value { value }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let msg = |entries: Vec<HttpAccessLogEntry>| StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: entries,
        })),
    };
    let garbage = vec![
        StreamAccessLogsMessage::default(),
        msg(vec![
            HttpAccessLogEntry::default(),
            entry("not-an-ip", Some(200)),
            entry("10.1.0.1", Some(99_999)),
            entry("10.1.0.1", None),
        ]),
        msg(vec![
            entry("10.1.0.1", Some(200)),
            entry("2001:db8::1", Some(404)),
        ]),
    ];
    als.stream_access_logs(tokio_stream::iter(garbage))
        .await
        .unwrap();
    // A stream whose client goes away mid-way.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(msg(vec![entry("10.1.0.2", Some(200))]))
        .await
        .unwrap();
    let mut als2 = AccessLogServiceClient::new(s.channel().await);
    let call = tokio::spawn(async move {
        als2.stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    call.abort();
    drop(tx);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let start_at = Instant::now();
    let first_403 = Arc::new(AtomicU64::new(0));
    let flood = hammer(&s, "10.9.9.9", stop.clone(), first_403.clone(), start_at);
    eventually(
        Duration::from_secs(8),
        "a dry-run decision is reported",
        || {
            let s = &s;
            async move {
                let (_, d) = admin(s, "GET", "/v1/anomaly/decisions").await;
                d["decisions"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x["value"] == "10.9.9.9" && x["dry_run"] == true)
                })
            }
        },
    )
    .await;
    // Keep flooding a little longer: still nothing a client sees.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Relaxed);
    for t in flood {
        t.await.unwrap();
    }
    bg.await.unwrap();
    assert_eq!(
        first_403.load(Relaxed),
        0,
        "dry run denied the flooding client"
    );
    assert_eq!(bg_denied.load(Relaxed), 0);
    let (_, d) = admin(&s, "GET", "/v1/anomaly/decisions").await;
    let dec = d["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["value"] == "10.9.9.9")
        .cloned()
        .unwrap();
    assert_eq!(dec["enforced"], false);
    let (_, list) = admin(&s, "GET", "/v1/lists/block").await;
    assert!(!list.to_string().contains("10.9.9.9"), "{list}");
    let (_, text) = http_with(s.admin, "GET", "/metrics", "", &[]).await;
    assert!(
        text.contains("ratethrottle_anomaly_access_log_entries_total 3"),
        "{text}"
    );
    assert!(
        text.contains("ratethrottle_anomaly_access_log_skipped_total 4"),
        "{text}"
    );
    assert!(
        text.contains("ratethrottle_anomaly_decisions_total{detector=\"volumetric\",action=\"deny\",mode=\"dry_run\"} 1"),
        "{text}"
    );
    // The service still answers after all that.
    let mut als = AccessLogServiceClient::new(s.channel().await);
    als.stream_access_logs(tokio_stream::iter(vec![msg(vec![entry(
        "10.1.0.1",
        Some(200),
    )])]))
    .await
    .unwrap();
    let services = support::health_and_reflected_services(
        s.channel().await,
        "envoy.service.accesslog.v3.AccessLogService",
    )
    .await;
    assert!(
        services
            .iter()
            .any(|x| x == "envoy.service.accesslog.v3.AccessLogService"),
        "{services:?}"
    );
    assert!(s.child_alive());
}

/// A reloaded `anomaly:` block takes effect without a restart: dry-run on, a flooder is only
/// reported; the file turns dry-run off; the next flooder is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_anomaly_block_takes_effect_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(&dir, true);
    let stop = Arc::new(AtomicBool::new(false));
    let bg_denied = Arc::new(AtomicU64::new(0));
    let bg = background(&s, stop.clone(), bg_denied.clone());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let t0 = Instant::now();
    let first = Arc::new(AtomicU64::new(0));
    let flood = hammer(&s, "10.9.9.1", stop.clone(), first.clone(), t0);
    eventually(Duration::from_secs(8), "a dry-run decision", || async {
        let (_, d) = admin(&s, "GET", "/v1/anomaly/decisions").await;
        d["decisions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["value"] == "10.9.9.1"))
    })
    .await;
    assert_eq!(first.load(Relaxed), 0, "dry-run denied the flooder");
    // The operator turns dry-run off in the file.
    support::write_atomically(&dir.path().join("settings.yaml"), &config(false));
    eventually(
        Duration::from_secs(10),
        "the reload is in force",
        || async {
            let (_, c) = admin(&s, "GET", "/v1/config").await;
            c.to_string().contains("\"dry_run\":false")
        },
    )
    .await;
    let first2 = Arc::new(AtomicU64::new(0));
    let flood2 = hammer(&s, "10.9.9.2", stop.clone(), first2.clone(), Instant::now());
    eventually(Duration::from_secs(8), "the new flooder gets 403", || {
        let f = first2.clone();
        async move { f.load(Relaxed) > 0 }
    })
    .await;
    stop.store(true, Relaxed);
    for t in flood.into_iter().chain(flood2) {
        t.await.unwrap();
    }
    bg.await.unwrap();
    assert_eq!(
        bg_denied.load(Relaxed),
        0,
        "a well-behaved client was denied"
    );
    assert!(s.child_alive());
}

/// An mTLS identity is a SPIFFE ID of ~50–80 bytes, longer than the 46 bytes an anomaly event
/// carries. A flooding workload is first throttled, then (second offense) blocked by its digest
/// (`#xxh3:<hex>`), which matches it and no other identity — not even its siblings that share
/// the first 46 bytes — and an unban by the full name lifts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_mtls_identity_longer_than_an_event_is_blocked_by_its_digest() {
    const FLOODER: &str = "spiffe://cluster.local/ns/payments/sa/checkout-worker-0099";
    let sibling =
        |i: usize| format!("spiffe://cluster.local/ns/payments/sa/checkout-worker-{i:04}");
    let identity = format!("mtls:{FLOODER}");
    assert!(identity.len() > 46 && identity[..46] == format!("mtls:{}", sibling(1))[..46]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.yaml");
    let authz = "authz:\n  domain: edge\n  identity:\n    sources: [mtls, client_ip]\n";
    // A 5 s first offense (throttle) so the second (deny, 10 s) comes within the test.
    let settings = config(false).replace("ttl: {base: 1m,", "ttl: {base: 5s,");
    std::fs::write(&path, format!("{settings}{authz}")).unwrap();
    let mut s = Sidecar::start(Some(&path), &[]);
    let grpc = s.grpc;
    let client = || async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel,
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    // 20 siblings, 2 requests a second each, each from its own address.
    let bg_denied = Arc::new(AtomicU64::new(0));
    let bg = {
        let (stop, denied, mut c) = (stop.clone(), bg_denied.clone(), client().await);
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                for i in 0..20 {
                    let req = Check::new(&format!("10.1.0.{}", i + 1)).principal(&sibling(i));
                    let r = c.check(req.build()).await.unwrap().into_inner();
                    if !support::check::Answer::of(&r).ok() {
                        denied.fetch_add(1, Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // The flooder, ~200 Checks a second, every one from a new address in a new /24: only its
    // identity is heavy.
    let first_403 = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for t in 0..4u32 {
        let (stop, first, mut c) = (stop.clone(), first_403.clone(), client().await);
        flood.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Relaxed) {
                n += 1;
                let ip = format!("10.{}.{}.{}", 10 + t, n % 250, 1 + (n / 250) % 250);
                let req = Check::new(&ip).principal(FLOODER).path("/api/pay");
                let r = c.check(req.build()).await.unwrap().into_inner();
                if support::check::Answer::of(&r).http == 403 {
                    first.fetch_add(1, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    eventually(
        Duration::from_secs(8),
        "the flooding identity gets 403",
        || {
            let f = first_403.clone();
            async move { f.load(Relaxed) > 0 }
        },
    )
    .await;
    // From an address it never used, the flooder is refused with the anomaly code.
    let a = s.check(&Check::new("192.0.2.200").principal(FLOODER)).await;
    assert_eq!(a.http, 403);
    assert!(a.body.contains("anomaly"), "{}", a.body);
    // The entry is the digest; its reason names the identity's first bytes.
    let digest = {
        let h = xxhash_rust::xxh3::xxh3_64(identity.as_bytes()).max(1);
        format!("#xxh3:{h:016x}")
    };
    let (_, list) = admin(&s, "GET", "/v1/lists/block").await;
    let entry = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["value"] == digest.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no {digest} in {list}"));
    let reason = entry["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(
            "anomaly:volumetric/v1 identity=\"mtls:spiffe://cluster.local/ns/payments/sa/che…\""
        ),
        "{reason}"
    );
    let (_, d) = admin(&s, "GET", "/v1/anomaly/decisions").await;
    let dec = d["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["value"] == digest.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{d}"));
    assert_eq!(
        (dec["scope"].as_str(), dec["enforced"].as_bool()),
        (Some("identity"), Some(true)),
        "{dec}"
    );
    assert!(dec["label"].as_str().unwrap().ends_with('…'), "{dec}");
    stop.store(true, Relaxed);
    for t in flood {
        t.await.unwrap();
    }
    bg.await.unwrap();
    assert_eq!(
        bg_denied.load(Relaxed),
        0,
        "a sibling sharing the first 46 bytes was denied"
    );
    // Explain and unban by the full name (what an operator has), through `ratethrottle manage`.
    let manage = |args: &[&str]| {
        std::process::Command::new(support::BIN)
            .args([
                "manage",
                "--admin-addr",
                &s.admin.to_string(),
                "--token",
                TOKEN,
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = manage(&["--anomaly-explain", &identity]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let x: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(x["offenses"].as_u64().unwrap() >= 1, "{x}");
    let out = manage(&["--anomaly-unban", &identity]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        s.check(&Check::new("192.0.2.200").principal(FLOODER))
            .await
            .ok()
    );
    let (_, list) = admin(&s, "GET", "/v1/lists/block").await;
    assert!(!list.to_string().contains(&digest), "{list}");
    assert!(s.child_alive());
}
