//! Two sidecar replicas on one Redis: an abuser split over both, each replica seeing it below
//! its own threshold, is caught once they merge their heavy hitters through Redis — and the
//! deny one replica writes is enforced by both.
//! Run with the test Redis up: `bash scripts/test.sh cargo test --test anomaly_replicas`.
#![allow(clippy::unwrap_used)]

mod support;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use support::check::{Answer, Check};
use support::redis::{standalone_url, unique_prefix};
use support::{Sidecar, eventually, http_with};

const TOKEN: &str = "t0ken-for-tests";

fn start(dir: &tempfile::TempDir, replica: &str, prefix: &str) -> Sidecar {
    let path = dir.path().join(format!("{replica}.yaml"));
    let settings = format!(
        "settings:\n  admin_token: {TOKEN}\n  storage: \"{}\"\n  redis:\n    prefix: \"{prefix}\"\n\
         anomaly:\n  warmup: 1s\n  replica: {replica}\n  \
         volumetric: {{floor: 30, p99_multiple: 3}}\n  ttl: {{base: 1m, cap: 10m, jitter: 0}}\n",
        standalone_url()
    );
    std::fs::write(&path, settings).unwrap();
    Sidecar::start(Some(&path), &[])
}

/// `rate` Checks a second from `ip` to `s` until `stop`; counts the 403s.
fn client(
    s: &Sidecar,
    ips: Vec<String>,
    rate: u64,
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
        let mut c = AuthorizationClient::new(channel);
        let gap = Duration::from_millis(1000 / rate);
        while !stop.load(Relaxed) {
            for ip in &ips {
                let r = c.check(Check::new(ip).path("/api").build()).await.unwrap();
                if Answer::of(&r.into_inner()).http == 403 {
                    denied.fetch_add(1, Relaxed);
                }
            }
            tokio::time::sleep(gap).await;
        }
    })
}

/// Whether the runtime block list `s` serves holds the abuser.
async fn blocked(s: &Sidecar) -> bool {
    let auth = format!("Bearer {TOKEN}");
    let (_, body) = http_with(
        s.admin,
        "GET",
        "/v1/lists/block",
        "",
        &[("authorization", &auth)],
    )
    .await;
    body.contains("10.9.9.9")
}

async fn decisions(s: &Sidecar) -> serde_json::Value {
    let auth = format!("Bearer {TOKEN}");
    let (code, body) = http_with(
        s.admin,
        "GET",
        "/v1/anomaly/decisions",
        "",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(body.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abuser_split_over_two_replicas_is_caught_by_merging_and_denied_on_both() {
    let prefix = unique_prefix("anomaly-replicas");
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir, "replica-a", &prefix);
    let b = start(&dir, "replica-b", &prefix);
    let stop = Arc::new(AtomicBool::new(false));
    let bg_denied = Arc::new(AtomicU64::new(0));
    let abuser_denied = Arc::new(AtomicU64::new(0));
    // Ordinary traffic on both (20 addresses, ~2/s each) keeps the population p99 low.
    let ordinary: Vec<String> = (1..=20).map(|i| format!("10.1.0.{i}")).collect();
    let mut tasks = vec![
        client(&a, ordinary.clone(), 2, stop.clone(), bg_denied.clone()),
        client(&b, ordinary, 2, stop.clone(), bg_denied.clone()),
    ];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The abuser: ~20 a second to each replica, under the floor of 30 a window on either.
    for s in [&a, &b] {
        tasks.push(client(
            s,
            vec!["10.9.9.9".into()],
            20,
            stop.clone(),
            abuser_denied.clone(),
        ));
    }
    // Watched through the admin API: probing with Checks from the abuser's address would add
    // to its count on both replicas.
    eventually(
        Duration::from_secs(10),
        "the split abuser is blocked",
        || async { blocked(&a).await && blocked(&b).await },
    )
    .await;
    // The abuser's clients (one request every 50 ms per replica) meet the block from their next
    // request on; stopping them the moment the lists show it could leave none sent since.
    eventually(
        Duration::from_secs(5),
        "the abuser's own requests are denied",
        || async { abuser_denied.load(Relaxed) > 0 },
    )
    .await;
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(a.check(&Check::new("10.9.9.9")).await.http, 403);
    assert_eq!(b.check(&Check::new("10.9.9.9")).await.http, 403);
    assert_eq!(
        bg_denied.load(Relaxed),
        0,
        "a well-behaved client was denied"
    );
    // The decision came from merged counts: its evidence names both replicas, and neither
    // replica's own count crossed the floor.
    let mut merged = None;
    for s in [&a, &b] {
        let d = decisions(s).await;
        if let Some(x) = d["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["value"] == "10.9.9.9" && x["action"] == "deny")
        {
            merged = Some(x.clone());
        }
    }
    let dec = merged.expect("a deny decision on one replica");
    let replicas = dec["evidence"]["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{dec}");
    assert!(dec["evidence"]["count"].as_u64().unwrap() > 30, "{dec}");
    assert_eq!(dec["enforced"], true, "{dec}");
}
