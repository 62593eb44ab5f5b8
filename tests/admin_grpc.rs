//! The admin gRPC API against the real binary: on the admin port beside the HTTP routes, in
//! reflection, the list rules and token of `/v1/lists`, and the stats and violation streams
//! fed by real decisions.

mod support;

use pb::admin_service_client::AdminServiceClient;
use ratethrottle::proto::admin::v1 as pb;
use ratethrottle::telemetry::violations::MAX_VALUE_CHARS;
use std::time::Duration;
use support::check::Check;
use support::{Sidecar, request};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const TOKEN: &str = "grpc-admin-t0ken";

const CONFIG: &str = r#"
settings:
  admin_token: grpc-admin-t0ken
authz:
  domain: gate
  identity:
    sources:
      - header: x-api-key
        name: api_key
      - client_ip
  policies:
    - name: all
      match: {path: {prefix: /}}
      descriptors:
        - [{generic_key: {descriptor_value: all}}, {identity: {}}]
domains:
  - domain: edge
    descriptors:
      - key: api_key
        rate_limit: {unit: minute, requests_per_unit: 2, name: per_key}
  - domain: gate
    descriptors:
      - key: generic_key
        value: all
        descriptors:
          - key: identity
            rate_limit: {unit: minute, requests_per_unit: 1, name: per_identity}
"#;

fn start() -> (tempfile::TempDir, Sidecar) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, CONFIG).expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    (dir, sc)
}

async fn admin(sc: &Sidecar) -> AdminServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", sc.admin))
        .expect("uri")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the admin port over HTTP/2");
    AdminServiceClient::new(channel)
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

#[tokio::test]
async fn config_lists_and_anomaly_rpcs_with_the_token_rules_of_v1_lists() {
    let (_dir, sc) = start();
    let mut c = admin(&sc).await;

    let cfg = c
        .get_config(pb::GetConfigRequest {})
        .await
        .expect("GetConfig needs no token")
        .into_inner();
    assert!(!cfg.version.is_empty());
    assert_eq!(cfg.storage, "memory");
    let json: serde_json::Value = serde_json::from_str(&cfg.config_json).expect("config json");
    assert!(json.to_string().contains("per_key"), "{json}");

    // No token, a wrong one: refused like /v1/lists.
    let add = pb::AddEntryRequest {
        list: pb::ListKind::Block as i32,
        value: "192.0.2.77".into(),
        ttl_seconds: 600,
        reason: "ticket 1".into(),
        code: "abuse".into(),
    };
    let e = c.add_entry(add.clone()).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = c
        .add_entry(with_token(add.clone(), "wrong"))
        .await
        .expect_err("wrong token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = c
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .expect_err("listing shows identities: token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    let added = c
        .add_entry(with_token(add, TOKEN))
        .await
        .expect("added")
        .into_inner()
        .entry
        .expect("entry");
    assert_eq!(added.value, "192.0.2.77");
    assert!(added.expires_at_ms > 0);
    assert_eq!(added.source, pb::EntrySource::Runtime as i32);

    // The same validation as the HTTP API.
    let bad = pb::AddEntryRequest {
        list: pb::ListKind::Block as i32,
        value: "10.0.0.0/99".into(),
        ..Default::default()
    };
    let e = c
        .add_entry(with_token(bad, TOKEN))
        .await
        .expect_err("bad CIDR");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = c
        .add_entry(with_token(pb::AddEntryRequest::default(), TOKEN))
        .await
        .expect_err("no list");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // The HTTP API on the same port sees the gRPC change.
    let (code, body) = support::http_with(
        sc.admin,
        "GET",
        "/v1/lists/block",
        "",
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("192.0.2.77"), "{body}");
    assert_eq!(sc.get("/healthz").await.0, 200);
    assert_eq!(sc.get("/no/such/path").await.0, 404);

    let listed = c
        .list_entries(with_token(
            pb::ListEntriesRequest {
                list: pb::ListKind::Block as i32,
            },
            TOKEN,
        ))
        .await
        .expect("listed")
        .into_inner();
    assert_eq!(listed.store, "memory");
    assert!(listed.entries.iter().any(|e| e.value == "192.0.2.77"));

    let remove = pb::RemoveEntryRequest {
        list: pb::ListKind::Block as i32,
        value: "192.0.2.77".into(),
    };
    let r = c.remove_entry(with_token(remove.clone(), TOKEN)).await;
    assert!(r.expect("removed").into_inner().removed);
    let r = c.remove_entry(with_token(remove, TOKEN)).await;
    assert!(!r.expect("answered").into_inner().removed);

    // No anomaly block: the anomaly RPCs say it is off, like /v1/anomaly.
    let e = c
        .list_decisions(with_token(pb::ListDecisionsRequest::default(), TOKEN))
        .await
        .expect_err("anomaly off");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = c
        .explain(pb::ExplainRequest::default())
        .await
        .expect_err("token first");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomaly_decisions_and_explain_over_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("settings.yaml");
    std::fs::write(
        &file,
        format!(
            "settings:\n  admin_token: {TOKEN}\nanomaly:\n  warmup: 1s\n  replica: grpc-a\n  \
             volumetric: {{floor: 30, p99_multiple: 3}}\n  ttl: {{base: 1m, cap: 10m, jitter: 0}}\n"
        ),
    )
    .expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let mut c = admin(&sc).await;
    let none = c
        .list_decisions(with_token(pb::ListDecisionsRequest::default(), TOKEN))
        .await
        .expect("decisions")
        .into_inner();
    assert!(none.decisions.is_empty());
    let e = c
        .explain(with_token(
            pb::ExplainRequest {
                subject: "10.0.0.0/8".into(),
            },
            TOKEN,
        ))
        .await
        .expect_err("a /8 is no key");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Past the warm-up, one address floods Check until a decision shows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut authz = sc.authz().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let found = loop {
        for _ in 0..20 {
            let _ = authz
                .check(Check::new("10.9.9.9").path("/api/search").build())
                .await;
        }
        let d = c
            .list_decisions(with_token(pb::ListDecisionsRequest::default(), TOKEN))
            .await
            .expect("decisions")
            .into_inner();
        if let Some(d) = d.decisions.into_iter().find(|d| d.value == "10.9.9.9") {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no decision in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(found.scope, pb::DecisionScope::Ip as i32);
    assert_eq!(found.action, pb::DecisionAction::Block as i32);
    assert_eq!(found.reason, "volumetric/v1");
    assert_eq!(found.replica, "grpc-a");
    assert!(found.enforced && !found.dry_run, "{found:?}");
    assert!(found.score > 30.0, "{found:?}");
    assert!(found.expires_at_ms > found.created_at_ms);

    let x = c
        .explain(with_token(
            pb::ExplainRequest {
                subject: "10.9.9.9".into(),
            },
            TOKEN,
        ))
        .await
        .expect("explain")
        .into_inner();
    assert!(x.offenses >= 1, "{x:?}");
    assert_eq!(
        x.decision.as_ref().map(|d| d.id.as_str()),
        Some(found.id.as_str())
    );
    let v = x
        .evidence
        .iter()
        .find(|e| e.signal == "volumetric")
        .expect("volumetric evidence");
    assert!(v.threshold >= 30.0, "{v:?}");
    assert!(x.summary.starts_with("ip 10.9.9.9"), "{}", x.summary);
}

#[tokio::test]
async fn every_rpc_is_reachable_through_reflection_on_the_admin_port() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (_dir, sc) = start();
    let channel = Channel::from_shared(format!("http://{}", sc.admin))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let methods = [
        "GetConfig",
        "ListEntries",
        "AddEntry",
        "RemoveEntry",
        "ListDecisions",
        "Explain",
        "WatchStats",
        "WatchViolations",
    ];
    let mut requests = vec![ask(MessageRequest::ListServices(String::new()))];
    requests.extend(methods.iter().map(|m| {
        ask(MessageRequest::FileContainingSymbol(format!(
            "ratethrottle.admin.v1.AdminService.{m}"
        )))
    }));
    let n = requests.len();
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let mut got = Vec::new();
    while let Some(a) = answers.next().await {
        got.push(a.expect("answer").message_response.expect("response"));
        if got.len() == n {
            break;
        }
    }
    match &got[0] {
        MessageResponse::ListServicesResponse(l) => {
            let names: Vec<&str> = l.service.iter().map(|s| s.name.as_str()).collect();
            assert!(
                names.contains(&"ratethrottle.admin.v1.AdminService"),
                "{names:?}"
            );
            assert!(
                !names.iter().any(|n| n.starts_with("envoy.")),
                "the admin port does not serve Envoy's services: {names:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    for (m, a) in methods.iter().zip(&got[1..]) {
        assert!(
            matches!(a, MessageResponse::FileDescriptorResponse(f) if !f.file_descriptor_proto.is_empty()),
            "{m}: {a:?}"
        );
    }
}

#[tokio::test]
async fn watch_stats_and_violations_follow_real_decisions() {
    let (_dir, sc) = start();
    let mut c = admin(&sc).await;
    let mut stats = c
        .watch_stats(pb::WatchStatsRequest {
            interval_ms: 100,
            top_n: 5,
        })
        .await
        .expect("WatchStats needs no token")
        .into_inner();
    let e = c
        .watch_violations(pb::WatchViolationsRequest::default())
        .await
        .expect_err("violations show identities: token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut violations = c
        .watch_violations(with_token(
            pb::WatchViolationsRequest {
                include_recent: true,
            },
            TOKEN,
        ))
        .await
        .expect("watch")
        .into_inner();

    let first = stats.next().await.expect("a snapshot").expect("ok");
    assert_eq!(first.over_limit_total, 0);
    assert!(first.identities_redacted);
    assert_eq!(first.storage.as_ref().expect("storage").kind, "memory");

    // Five calls against a limit of 2 with a long value: three OVER_LIMIT.
    let long = "k".repeat(200);
    let mut rl = sc.client().await;
    for _ in 0..5 {
        rl.should_rate_limit(request("edge", &[&[("api_key", &long)]]))
            .await
            .expect("rpc");
    }
    // And an ext_authz caller limited by identity (limit 1): the second Check is denied.
    for _ in 0..2 {
        sc.check(&Check::new("198.51.100.9").header("x-api-key", "alice"))
            .await;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let snap = loop {
        let s = tokio::time::timeout_at(deadline, stats.next())
            .await
            .expect("a snapshot with the over-limit calls in time")
            .expect("stream open")
            .expect("ok");
        if s.over_limit_total >= 3 && !s.top_limited.is_empty() {
            break s;
        }
    };
    assert!(snap.requests_total >= 5);
    let top = &snap.top_limited[0];
    assert!(top.stat_key.starts_with("edge.api_key"), "{top:?}");
    assert_eq!(top.over_limit_total, 3);
    assert!(
        snap.domains
            .iter()
            .any(|d| d.domain == "edge" && d.over_limit_total == 3)
    );
    assert!(
        snap.blocked_identities.is_empty(),
        "redacted without the token"
    );
    let queues = snap.queues.expect("queues");
    assert_eq!(
        queues.violations_recorded, 4,
        "3 OVER_LIMIT + 1 denied Check"
    );
    let authz = snap.authz.expect("authz");
    assert_eq!(authz.outcomes_total.get("rate_limited"), Some(&1));

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let v = tokio::time::timeout_at(deadline, violations.next())
            .await
            .expect("violations in time")
            .expect("open")
            .expect("ok");
        seen.push(v);
    }
    let over: Vec<_> = seen
        .iter()
        .filter(|v| v.kind == pb::ViolationKind::OverLimit as i32)
        .collect();
    assert_eq!(over.len(), 3);
    assert_eq!(over[0].domain, "edge");
    assert_eq!(over[0].limit, "per_key");
    let value = &over[0].entries[0].value;
    assert_eq!(
        value.chars().count(),
        MAX_VALUE_CHARS + 1,
        "truncated: {value}"
    );
    assert!(value.ends_with('…'));
    let limited = seen
        .iter()
        .find(|v| v.kind == pb::ViolationKind::RateLimited as i32)
        .expect("the denied Check");
    assert_eq!(limited.domain, "gate");
    assert!(limited.identity.contains("alice"), "{limited:?}");
    assert!(seen.windows(2).all(|w| w[1].seq == w[0].seq + 1));

    // With the token, the stats show who was limited.
    let mut stats = c
        .watch_stats(with_token(
            pb::WatchStatsRequest {
                interval_ms: 100,
                top_n: 5,
            },
            TOKEN,
        ))
        .await
        .expect("watch")
        .into_inner();
    let s = stats.next().await.expect("snapshot").expect("ok");
    assert!(!s.identities_redacted);
    assert!(
        s.blocked_identities
            .iter()
            .any(|i| i.identity.contains("alice") && i.count == 1),
        "{:?}",
        s.blocked_identities
    );
}

#[tokio::test]
async fn open_streams_end_on_sigterm_instead_of_holding_the_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, CONFIG).expect("write");
    // A drain bound far longer than the test waits: only the streams ending lets it exit.
    let mut sc = Sidecar::start_with_env(
        Some(&file),
        &[],
        &[("RATETHROTTLE_SHUTDOWN_DRAIN_MS", "60000")],
    );
    let mut c = admin(&sc).await;
    let mut stats = c
        .watch_stats(pb::WatchStatsRequest {
            interval_ms: 100,
            top_n: 1,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut violations = c
        .watch_violations(with_token(pb::WatchViolationsRequest::default(), TOKEN))
        .await
        .expect("watch")
        .into_inner();
    stats.next().await.expect("snapshot").expect("ok");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &sc.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(r) = stats.next().await {
            r.expect("no error, just the end");
        }
        while let Some(r) = violations.next().await {
            r.expect("no error, just the end");
        }
    })
    .await;
    assert!(end.is_ok(), "the streams did not end after SIGTERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = sc.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after SIGTERM: {}",
            sc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        !sc.stderr().contains("drain bound reached"),
        "the drain bound, not the streams, ended it:\n{}",
        sc.stderr()
    );
}
