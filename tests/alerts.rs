//! Alerts received by real local HTTP servers: a webhook receiver in this test checks bodies
//! and HMAC signatures; a real Alertmanager (Debian `prometheus-alertmanager`, installed by
//! scripts/alerting-tools.sh, exported as RATETHROTTLE_TEST_ALERTMANAGER) shows the alerts in
//! its API. The sources are driven through the real `ratethrottle serve` process: a broken
//! config file (reload failure), a flooding client (anomaly decision), a killed Redis
//! (storage degraded, then recovered), over-limit answers (violation rate). Grouping and
//! cooldown are asserted exactly through the library with the same receiver.
#![allow(clippy::unwrap_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ratethrottle::alerts::{AlertEvent, AlertKind, AlertSettings, SecretRef, Severity, SinkType};
use ratethrottle::config::alerts::SinkConfig;
use support::check::Check;
use support::redis::RedisServer;
use support::{BIN, Sidecar, eventually, http, write_atomically};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// A webhook receiver: records every request; answers 200, 500, or never.

#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Ok,
    Error500,
    Hang,
}

#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Receiver {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = l.accept().await {
                let g = g.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: head, then content-length bytes.
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                        let mut lines = head.lines();
                        let path = lines
                            .next()
                            .and_then(|l| l.split_whitespace().nth(1))
                            .unwrap_or_default()
                            .to_string();
                        let headers: HashMap<String, String> = lines
                            .filter_map(|l| l.split_once(':'))
                            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                            .collect();
                        let len: usize = headers
                            .get("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + len {
                            let mut chunk = [0u8; 4096];
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body = buf[head_end..head_end + len].to_vec();
                        buf.drain(..head_end + len);
                        g.lock().unwrap().push(Received {
                            path,
                            headers,
                            body,
                        });
                        let reply: &[u8] = match answer {
                            Answer::Ok => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                            Answer::Error500 => {
                                b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops"
                            }
                            Answer::Hang => {
                                std::future::pending::<()>().await;
                                return;
                            }
                        };
                        if conn.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Receiver { addr, got }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn requests(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Alert bodies of `kind` received so far.
    fn alerts(&self, kind: &str) -> Vec<serde_json::Value> {
        self.requests()
            .iter()
            .map(Received::json)
            .filter(|v| v["kind"] == kind)
            .collect()
    }
}

fn verify(key: &[u8], r: &Received, header: &str) {
    let sig = r
        .headers
        .get(header)
        .unwrap_or_else(|| panic!("no {header} header in {:?}", r.headers));
    let hex = sig.strip_prefix("sha256=").expect("sha256= prefix");
    let tag: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::verify(&k, &r.body, &tag).expect("the signature is HMAC-SHA256 of the body");
    let mut other = r.body.clone();
    other.push(b' ');
    assert!(ring::hmac::verify(&k, &other, &tag).is_err());
}

async fn metric(s: &Sidecar, line_start: &str) -> Option<f64> {
    let (_, text) = s.get("/metrics").await;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------
// A real Alertmanager.

struct Alertmanager {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    async fn start() -> Alertmanager {
        let bin = std::env::var("RATETHROTTLE_TEST_ALERTMANAGER").unwrap_or_else(|_| {
            panic!(
                "RATETHROTTLE_TEST_ALERTMANAGER is not set: run the tests with `bash \
                 scripts/test.sh` (e.g. `bash scripts/test.sh cargo test --test alerts`), which \
                 installs Alertmanager (Debian prometheus-alertmanager, scripts/alerting-tools.sh)"
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("alertmanager.yml");
        std::fs::write(
            &cfg,
            "route:\n  receiver: none\n  group_wait: 1s\nreceivers:\n  - name: none\n",
        )
        .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // No peers: a single instance (the default would bind the cluster port 9094).
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start alertmanager");
        let am = Alertmanager {
            child,
            port,
            _dir: dir,
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually(
            Duration::from_secs(15),
            "alertmanager ready",
            || async move {
                // `http` wants a listener: connect first.
                tokio::net::TcpStream::connect(addr).await.is_ok()
                    && tokio::time::timeout(
                        Duration::from_secs(2),
                        http(addr, "GET", "/-/ready", ""),
                    )
                    .await
                    .is_ok_and(|(code, _)| code == 200)
            },
        )
        .await;
        am
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The active alerts, as `GET /api/v2/alerts` lists them.
    async fn alerts(&self) -> Vec<serde_json::Value> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let (code, body) = http(addr, "GET", "/api/v2/alerts", "").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn find(&self, alertname: &str) -> Option<serde_json::Value> {
        self.alerts()
            .await
            .into_iter()
            .find(|a| a["labels"]["alertname"] == alertname)
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------

fn webhook(url: &str, key: Option<&str>) -> SinkConfig {
    SinkConfig {
        name: "hook".into(),
        kind: SinkType::Webhook,
        url: SecretRef::Literal(url.into()),
        hmac_key: key.map(|k| SecretRef::Literal(k.into())),
        signature_header: "x-ratethrottle-signature".into(),
        min_severity: Severity::Info,
    }
}

fn decision(value: &str, dry_run: bool) -> AlertEvent {
    AlertEvent::Decision {
        detector: "volumetric",
        action: "deny",
        scope: "ip",
        value: value.into(),
        dry_run,
    }
}

#[tokio::test]
async fn n_decisions_in_a_window_are_one_signed_alert_with_count_n_and_the_cooldown_holds() {
    let rx = Receiver::start(Answer::Ok).await;
    let mut settings = AlertSettings::default();
    settings.sinks.push(webhook(&rx.url(), Some("k3y")));
    let k = &mut settings.kinds[AlertKind::AnomalyDecision.index()];
    k.window_ms = 400;
    k.cooldown_ms = 60_000;
    let (alerts, task) = ratethrottle::alerts::build(
        &settings,
        &|_| None,
        "pod-a".into(),
        std::sync::Arc::new(ratethrottle::limiter::SystemClock),
    )
    .unwrap();
    tokio::spawn(task.run());
    for i in 0..500 {
        alerts.emit(decision(&format!("10.0.{}.{}", i / 250, i % 250), false));
    }
    // A dry-run decision of the same detector is its own alert, marked.
    alerts.emit(decision("10.7.7.7", true));
    eventually(Duration::from_secs(5), "two alerts", || {
        let rx = rx.clone();
        async move { rx.requests().len() >= 2 }
    })
    .await;
    let got = rx.requests();
    let enforced = got
        .iter()
        .find(|r| r.json()["dry_run"] == false)
        .expect("the enforced decisions' alert");
    let v = enforced.json();
    assert_eq!(v["kind"], "anomaly_decision");
    assert_eq!(v["count"], 500, "{v}");
    assert_eq!(v["key"], "volumetric");
    assert_eq!(v["replica"], "pod-a");
    assert_eq!(v["severity"], "warning");
    assert_eq!(v["samples"].as_array().unwrap().len(), 5, "{v}");
    assert!(
        v["summary"]
            .as_str()
            .unwrap()
            .contains("500 anomaly decisions"),
        "{v}"
    );
    assert_eq!(enforced.path, "/hook");
    assert_eq!(enforced.headers["content-type"], "application/json");
    verify(b"k3y", enforced, "x-ratethrottle-signature");
    let dry = got
        .iter()
        .find(|r| r.json()["dry_run"] == true)
        .unwrap()
        .json();
    assert_eq!(
        (dry["count"].clone(), dry["key"].clone()),
        (1.into(), "volumetric (dry run)".into())
    );

    // Within the cooldown: counted, not sent.
    for i in 0..20 {
        alerts.emit(decision(&format!("10.1.0.{i}"), false));
    }
    let mut text = String::new();
    eventually(
        Duration::from_secs(5),
        "the group closes in the cooldown",
        || {
            text.clear();
            alerts.render(&mut text);
            let done = text.contains("ratethrottle_alerts_suppressed_total 1\n");
            async move { done }
        },
    )
    .await;
    assert_eq!(rx.requests().len(), 2, "no alert during the cooldown");
    assert!(
        text.contains("ratethrottle_alerts_events_total{kind=\"anomaly_decision\"} 521\n"),
        "{text}"
    );
    assert!(
        text.contains("ratethrottle_alerts_total{kind=\"anomaly_decision\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("ratethrottle_alerts_sent_total{sink=\"hook\",type=\"webhook\"} 2\n"),
        "{text}"
    );
}

fn settings_file(dir: &std::path::Path, alerts: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    let text = format!(
        "domains:\n  - domain: shop\n    descriptors:\n      - key: user\n        \
         rate_limit: {{unit: minute, requests_per_unit: 1}}\n{alerts}"
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_reload_reaches_the_webhook_signed_with_a_key_from_the_environment() {
    let rx = Receiver::start(Answer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hmac");
    std::fs::write(&key_file, "from-a-secret\n").unwrap();
    let path = settings_file(
        dir.path(),
        &format!(
            "alerts:\n  labels: {{cluster: test}}\n  sinks:\n    - type: webhook\n      url: env:HOOK_URL\n      \
             hmac_key: file:{}\n  kinds:\n    config_reload_failed: {{window: 0s, cooldown: 0s}}\n",
            key_file.display()
        ),
    );
    let hook = rx.url();
    let s = Sidecar::start_with_env(Some(&path), &[], &[("HOOK_URL", hook.as_str())]);
    // The secret is not shown; its reference is.
    let (_, cfg) = s.get("/v1/config").await;
    assert!(cfg.contains("env:HOOK_URL"), "{cfg}");
    assert!(
        !cfg.contains(&hook) && !cfg.contains("from-a-secret"),
        "{cfg}"
    );

    write_atomically(&path, "domains: [\n");
    eventually(
        Duration::from_secs(10),
        "a config_reload_failed alert",
        || {
            let rx = rx.clone();
            async move { !rx.alerts("config_reload_failed").is_empty() }
        },
    )
    .await;
    let r = rx
        .requests()
        .into_iter()
        .find(|r| r.json()["kind"] == "config_reload_failed")
        .unwrap();
    verify(b"from-a-secret", &r, "x-ratethrottle-signature");
    let v = r.json();
    assert_eq!(v["severity"], "warning");
    assert_eq!(v["labels"]["cluster"], "test");
    assert!(
        v["samples"][0].as_str().unwrap().contains("invalid YAML"),
        "{v}"
    );
    assert!(
        v["summary"]
            .as_str()
            .unwrap()
            .contains("last good configuration stays in force"),
        "{v}"
    );
    // Still serving the last good config.
    let (code, ready) = s.get("/readyz").await;
    assert_eq!((code, ready.as_str()), (200, "ready\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomaly_and_storage_alerts_reach_a_real_alertmanager() {
    let am = Alertmanager::start().await;
    let mut redis = RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let path = settings_file(
        dir.path(),
        &format!(
            "anomaly:\n  dry_run: true\n  warmup: 1s\n  volumetric: {{floor: 30, p99_multiple: 3}}\n\
             alerts:\n  sinks:\n    - type: alertmanager\n      url: {}\n  \
             kinds:\n    anomaly_decision: {{window: 500ms}}\n",
            am.url()
        ),
    );
    let storage = redis.url();
    let s = Sidecar::start(Some(&path), &["--storage", &storage]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // One client floods Check: the volumetric detector decides (dry run).
    let mut client = s.authz().await;
    let flood = async {
        for _ in 0..600 {
            let _ = client
                .check(Check::new("10.9.9.9").path("/x").build())
                .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let seen = async {
        eventually(
            Duration::from_secs(15),
            "the decision in Alertmanager",
            || async { am.find("RatethrottleAnomalyDecision").await.is_some() },
        )
        .await;
    };
    tokio::join!(flood, seen);
    let a = am.find("RatethrottleAnomalyDecision").await.unwrap();
    assert_eq!(a["labels"]["dry_run"], "true", "{a}");
    assert_eq!(a["labels"]["service"], "ratethrottle");
    assert_eq!(a["labels"]["key"], "volumetric (dry run)");
    assert_eq!(a["labels"]["severity"], "warning");
    assert!(
        a["annotations"]["samples"]
            .as_str()
            .unwrap()
            .contains("10.9.9.9"),
        "{a}"
    );
    assert!(
        a["annotations"]["count"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(a["status"]["state"], "active", "{a}");

    // Redis dies: a request fails over to the failure mode, and the storage-degraded alert
    // arrives; Redis back: the recovery resolves it.
    redis.kill();
    let rl = s.client().await;
    eventually(
        Duration::from_secs(15),
        "storage degraded in Alertmanager",
        || {
            let req = support::request("shop", &[&[("user", "a")]]);
            let mut rl = rl.clone();
            let am = &am;
            async move {
                let _ = rl.should_rate_limit(req).await;
                am.find("RatethrottleStorageDegraded").await.is_some()
            }
        },
    )
    .await;
    let a = am.find("RatethrottleStorageDegraded").await.unwrap();
    assert_eq!(a["labels"]["severity"], "critical", "{a}");
    assert!(
        a["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("storage degraded"),
        "{a}"
    );
    redis.restart();
    eventually(
        Duration::from_secs(20),
        "the degraded alert resolved",
        || {
            let req = support::request("shop", &[&[("user", "b")]]);
            let am = &am;
            let mut rl = rl.clone();
            async move {
                let _ = rl.should_rate_limit(req).await;
                am.find("RatethrottleStorageDegraded").await.is_none()
            }
        },
    )
    .await;
    let (_, m) = s.get("/metrics").await;
    assert!(
        m.contains("ratethrottle_alerts_events_total{kind=\"storage_recovered\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ratethrottle_alerts_sink_dead{sink=\"alertmanager\",type=\"alertmanager\"} 0"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_failing_and_unreachable_sinks_do_not_stop_decisions_and_are_reported_dead() {
    let hung = Receiver::start(Answer::Hang).await;
    let broken = Receiver::start(Answer::Error500).await;
    let good = Receiver::start(Answer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let path = settings_file(
        dir.path(),
        &format!(
            "alerts:\n  timeout: 300ms\n  deadline: 1s\n  dead_after: 2\n  sinks:\n    \
             - {{name: hung, type: webhook, url: '{}'}}\n    - {{name: broken, type: slack, url: '{}'}}\n    \
             - {{name: gone, type: webhook, url: 'http://127.0.0.1:1/'}}\n    - {{name: good, type: webhook, url: '{}'}}\n  \
             kinds:\n    violation_rate: {{threshold: 1, window: 0s, cooldown: 0s}}\n",
            hung.url(),
            broken.url(),
            good.url()
        ),
    );
    let mut s = Sidecar::start(Some(&path), &[]);
    let mut client = s.client().await;
    // Over-limit answers for ~4 s: a violation_rate alert every second to every sink.
    let (mut answered, mut admitted) = (0, 0);
    let until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < until {
        let r = client
            .should_rate_limit(support::request("shop", &[&[("user", "u")]]))
            .await
            .expect("decisions keep answering")
            .into_inner();
        answered += 1;
        if r.overall_code != 2 {
            admitted += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(answered > 100, "{answered}");
    // 1 a minute: the first answer is OK, the rest OVER_LIMIT — plus one more OK when the 4 s
    // cross a minute boundary (the fixed window starts again; CI once ran across 14:04:00).
    assert!(admitted <= 2, "{admitted} of {answered} admitted");
    eventually(Duration::from_secs(10), "three sinks dead", || async {
        let (code, body) = s.get("/readyz").await;
        assert_eq!(
            code, 200,
            "a dead sink never makes the replica unready: {body}"
        );
        ["hung", "broken", "gone"]
            .iter()
            .all(|n| body.contains(&format!("alert sink {n} dead")))
    })
    .await;
    let (_, body) = s.get("/readyz").await;
    assert!(body.starts_with("ready\n"), "{body}");
    assert!(body.contains("no answer within 300 ms"), "{body}");
    assert!(body.contains("HTTP 500: oops"), "{body}");
    assert!(!body.contains("alert sink good dead"), "{body}");
    // The good sink got the alerts with their counts; the others were retried and counted.
    let got = good.alerts("violation_rate");
    assert!(got.len() >= 2, "{got:?}");
    assert!(
        got.iter()
            .all(|v| v["key"] == "shop" && v["count"].as_u64().unwrap() >= 1)
    );
    assert!(!broken.requests().is_empty() && !hung.requests().is_empty());
    for sink in ["hung", "broken", "gone"] {
        let dead = metric(
            &s,
            &format!("ratethrottle_alerts_sink_dead{{sink=\"{sink}\""),
        )
        .await;
        assert_eq!(dead, Some(1.0), "{sink}");
        let failed = metric(
            &s,
            &format!("ratethrottle_alerts_failed_total{{sink=\"{sink}\""),
        )
        .await;
        assert!(failed.unwrap() >= 2.0, "{sink}: {failed:?}");
        let retries = metric(
            &s,
            &format!("ratethrottle_alerts_retries_total{{sink=\"{sink}\""),
        )
        .await;
        assert!(retries.unwrap() >= 1.0, "{sink}: {retries:?}");
    }
    assert_eq!(
        metric(&s, "ratethrottle_alerts_sink_dead{sink=\"good\"").await,
        Some(0.0)
    );
    assert!(s.child_alive());
}

#[test]
fn bad_alert_blocks_are_validate_errors_with_key_paths_and_unresolvable_secrets_stop_serve() {
    let dir = tempfile::tempdir().unwrap();
    let path = settings_file(
        dir.path(),
        "alerts:\n  sinks:\n    - type: slak\n      url: http://x\n    - type: webhook\n      \
         url: 'hooks.example.com/x'\n    - type: alertmanager\n      url: 'http://am:notaport'\n  \
         kinds:\n    violation_rate: {threshold: many}\n",
    );
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for needle in [
        "alerts.sinks[0].type: unknown sink type \"slak\" (did you mean \"slack\"?",
        "alerts.sinks[1].url: \"hooks.example.com/x\" is not a URL",
        "alerts.sinks[2].url: \"http://am:notaport\" has an invalid port",
        "alerts.kinds.violation_rate.threshold:",
    ] {
        assert!(err.contains(needle), "no {needle:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");

    // A reference to a variable that is not set: serve refuses to start, naming the key.
    let path = settings_file(
        dir.path(),
        "alerts:\n  sinks:\n    - type: slack\n      url: env:RATETHROTTLE_TEST_UNSET_HOOK\n",
    );
    let out = Command::new(BIN)
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&path)
        .env_remove("RATETHROTTLE_TEST_UNSET_HOOK")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(
            "alerts.sinks[0].url: environment variable RATETHROTTLE_TEST_UNSET_HOOK is not set"
        ),
        "{err}"
    );
}

/// Every `ratethrottle_*`/`ratelimit_*` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("ratethrottle_") || word.starts_with("ratelimit_") {
            out.insert(word.to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_rules_pass_their_promtool_tests_and_name_real_metrics() {
    let promtool = std::env::var("RATETHROTTLE_TEST_PROMTOOL").unwrap_or_else(|_| {
        panic!(
            "RATETHROTTLE_TEST_PROMTOOL is not set: run the tests with `bash scripts/test.sh` \
             (scripts/observability-tools.sh installs promtool)"
        )
    });
    let rules_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/ratethrottle/rules");
    let out = Command::new(&promtool)
        .args(["test", "rules", "ratethrottle.rules.test.yaml"])
        .current_dir(&rules_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The names the rules and their tests use are the names a sidecar exports (Redis storage,
    // anomaly and alerts on, so every family is there).
    let rules = std::fs::read_to_string(rules_dir.join("ratethrottle.rules.yaml")).unwrap();
    let tests = std::fs::read_to_string(rules_dir.join("ratethrottle.rules.test.yaml")).unwrap();
    let mut used = metric_names(&rules);
    used.extend(metric_names(&tests));
    assert!(used.len() >= 6, "{used:?}");
    let redis = RedisServer::start(&[]);
    let rx = Receiver::start(Answer::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let path = settings_file(
        dir.path(),
        &format!(
            "anomaly:\n  dry_run: true\nalerts:\n  sinks:\n    - {{type: webhook, url: '{}'}}\n",
            rx.url()
        ),
    );
    let storage = redis.url();
    let s = Sidecar::start(Some(&path), &["--storage", &storage]);
    let (_, text) = s.get("/metrics").await;
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the rules use metrics the sidecar does not export: {missing:?}"
    );
}
