//! `/metrics` of the real binary, after real decisions, checked by Prometheus' own
//! `promtool check metrics`: it must parse, and lint clean but for the reference's counter
//! names (envoyproxy/ratelimit's, kept so existing dashboards work) that lack `_total`.
//!
//! Needs promtool: `bash scripts/test.sh` installs it (scripts/observability-tools.sh) and
//! exports RATETHROTTLE_TEST_PROMTOOL.
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::check::Check;
use support::{Sidecar, request};

/// The reference's names; renaming them would break its users' dashboards and alerts.
const REFERENCE_COUNTERS: &[&str] = &[
    "ratelimit_service_call_should_rate_limit_invalid_request",
    "ratelimit_service_call_should_rate_limit_redis_error",
    "ratelimit_service_config_load_error",
    "ratelimit_service_config_load_success",
    "ratelimit_service_rate_limit_near_limit",
    "ratelimit_service_rate_limit_over_limit",
    "ratelimit_service_rate_limit_shadow_mode",
    "ratelimit_service_rate_limit_total_hits",
    "ratelimit_service_rate_limit_within_limit",
];

const CONFIG: &str = r#"
settings:
  admin_token: t
authz:
  domain: gate
  identity:
    sources: [client_ip]
  lists:
    block: [203.0.113.0/24]
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
      - key: user
        detailed_metric: true
        rate_limit: {unit: minute, requests_per_unit: 1}
  - domain: gate
    descriptors:
      - key: generic_key
        value: all
        descriptors:
          - key: identity
            rate_limit: {unit: minute, requests_per_unit: 1}
"#;

fn promtool() -> std::path::PathBuf {
    std::env::var_os("RATETHROTTLE_TEST_PROMTOOL")
        .map(Into::into)
        .unwrap_or_else(|| {
            panic!(
                "RATETHROTTLE_TEST_PROMTOOL is not set: run the tests with `bash scripts/test.sh` \
                 (e.g. `bash scripts/test.sh cargo test --test metrics`), which installs promtool \
                 (Debian prometheus, scripts/observability-tools.sh)"
            )
        })
}

/// promtool's exit code and the lint lines it printed.
fn check(text: &str) -> (Option<i32>, String) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), report)
}

#[tokio::test]
async fn metrics_parse_and_lint_clean_with_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, CONFIG).expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let mut rl = sc.client().await;
    for d in [("api_key", "a"), ("user", "u1"), ("user", "u\"2\\")] {
        for _ in 0..3 {
            rl.should_rate_limit(request("edge", &[&[d]]))
                .await
                .expect("rpc");
        }
    }
    for ip in ["198.51.100.1", "198.51.100.1", "203.0.113.5"] {
        sc.check(&Check::new(ip)).await;
    }
    let (code, text) = sc.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        text.contains("ratelimit_service_rate_limit_over_limit{"),
        "{text}"
    );

    assert_lints_clean(&text);
}

/// promtool's findings on `text`, beyond the reference's own counter names, fail the test.
fn assert_lints_clean(text: &str) {
    let (code, report) = check(text);
    let findings: Vec<&str> = report.lines().filter(|l| !l.is_empty()).collect();
    let unexpected: Vec<&&str> = findings
        .iter()
        .filter(|l| {
            !REFERENCE_COUNTERS
                .iter()
                .any(|n| **l == format!("{n} counter metrics should have \"_total\" suffix"))
        })
        .collect();
    assert!(
        unexpected.is_empty() && matches!(code, Some(0) | Some(3)),
        "promtool exit {code:?}, unexpected findings:\n{unexpected:#?}\n--- metrics ---\n{text}"
    );
}

/// The families only some setups print: Redis storage and batches, the anomaly module,
/// adaptive limits' trust book, alert sinks (one dead), the tracing exporter. All lint clean.
#[tokio::test]
async fn redis_anomaly_adaptive_alert_and_tracing_metrics_lint_clean_too() {
    let redis = std::env::var("RATETHROTTLE_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("RATETHROTTLE_TEST_REDIS_URL is not set: run the tests with `bash scripts/test.sh`")
    });
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(
        &file,
        format!(
            "settings:\n  storage: \"{redis}\"\n  redis: {{prefix: \"lint-{pid}:\"}}\n\
             anomaly:\n  enabled: true\n\
             tracing:\n  endpoint: http://127.0.0.1:{dead_port}\n  sample_ratio: 1.0\n\
             alerts:\n  timeout: 200ms\n  deadline: 1s\n  sinks:\n    - type: webhook\n      url: http://127.0.0.1:{dead_port}/\n\
             domains:\n  - domain: edge\n    descriptors:\n      - key: identity\n        rate_limit: {{unit: minute, requests_per_unit: 2, adaptive: {{min_factor: 0.5, max_factor: 2.0}}}}\n",
            pid = std::process::id()
        ),
    )
    .expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let mut rl = sc.client().await;
    for _ in 0..5 {
        rl.should_rate_limit(request(
            "edge",
            &[
                &[("identity", "user:lint")],
                &[("remote_address", "198.51.100.7")],
            ],
        ))
        .await
        .expect("rpc");
    }
    let (code, text) = sc.get("/metrics").await;
    assert_eq!(code, 200);
    for family in [
        "ratethrottle_redis_commands_total",
        "ratethrottle_anomaly_decisions_total",
        "ratethrottle_adaptive_identities",
        "ratethrottle_alerts_sent_total",
        "ratethrottle_trace_spans_exported_total",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    assert_lints_clean(&text);
}

#[test]
fn the_promtool_check_fails_a_broken_exposition() {
    let (code, report) = check("ratethrottle_x{a=\"1\" 1\n");
    assert_eq!(code, Some(1), "{report}");
    let (code, report) = check("# TYPE ratethrottle_y counter\nratethrottle_y 1\n");
    assert_eq!(code, Some(3), "{report}");
    assert!(report.contains("_total"), "{report}");
}

/// Metric names a PromQL expression uses (ours and the reference's).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("rat") {
        let tail = &rest[i..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if (name.starts_with("ratelimit_") || name.starts_with("ratethrottle_"))
            && (i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric())
        {
            out.push(name.clone());
        }
        rest = &tail[name.len().max(1)..];
    }
    out
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_we_export() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/ratethrottle/dashboards/ratethrottle.json"
    );
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    // Every family the renderer can print (some only with Redis or --kubernetes).
    let src = [
        include_str!("../src/telemetry.rs"),
        include_str!("../src/telemetry/authz.rs"),
        include_str!("../src/telemetry/anomaly.rs"),
        include_str!("../src/alerts.rs"),
    ]
    .concat();
    let panels = board["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut checked = 0;
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                let family = n
                    .strip_prefix("ratelimit_service_rate_limit_")
                    .map_or(n.clone(), |_| "ratelimit_service_rate_limit_".into());
                assert!(
                    src.contains(family.as_str()),
                    "{}: {n} is not exported",
                    p["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 20, "{checked}");
    assert_eq!(
        metric_names("rate(ratethrottle_x_total[1m]) / notratelimit_y"),
        ["ratethrottle_x_total"]
    );
}

/// A real Prometheus scraping the sidecar every second: the samples arrive with the values
/// the decisions produced, and every query of the Grafana dashboard evaluates.
#[tokio::test]
async fn a_real_prometheus_scrapes_the_sidecar_and_runs_the_dashboard_queries() {
    let bin = std::env::var_os("RATETHROTTLE_TEST_PROMETHEUS").unwrap_or_else(|| {
        panic!(
            "RATETHROTTLE_TEST_PROMETHEUS is not set: run the tests with `bash scripts/test.sh` \
             (scripts/observability-tools.sh installs Debian prometheus)"
        )
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, CONFIG).expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let mut rl = sc.client().await;
    for _ in 0..5 {
        rl.should_rate_limit(request("edge", &[&[("api_key", "p")]]))
            .await
            .expect("rpc");
    }
    let prom_cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: ratethrottle\n    static_configs: [{{targets: ['{}']}}]\n",
            sc.admin
        ),
    )
    .expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let prom = Command::new(bin)
        .arg(format!("--config.file={}", prom_cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    /// Prometheus is killed however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(prom);
    let api: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let query = |q: String| async move {
        let path = format!(
            "/api/v1/query?query={}",
            percent_encoding::utf8_percent_encode(&q, percent_encoding::NON_ALPHANUMERIC)
        );
        let (code, body) = support::http(api, "GET", &path, "").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        (code, v)
    };
    support::eventually(
        Duration::from_secs(20),
        "Prometheus listens",
        || async move { tokio::net::TcpStream::connect(api).await.is_ok() },
    )
    .await;
    // Targets apply within seconds of start: poll for the first sample (bounded).
    support::eventually(
        Duration::from_secs(20),
        "Prometheus has scraped the sidecar",
        || {
            let q = query("ratelimit_service_should_rate_limit_total".into());
            async move {
                let (code, v) = q.await;
                code == 200 && v["data"]["result"][0]["value"][1] == "5"
            }
        },
    )
    .await;
    let (_, v) = query("ratelimit_service_should_rate_limit_over_limit_total".into()).await;
    assert_eq!(v["data"]["result"][0]["value"][1], "3", "{v}");

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/ratethrottle/dashboards/ratethrottle.json"
    );
    let board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    for p in board["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "1m");
            let (code, v) = query(expr.clone()).await;
            assert!(
                code == 200 && v["status"] == "success",
                "{}: {expr} does not evaluate: {v}",
                p["title"]
            );
        }
    }
}
