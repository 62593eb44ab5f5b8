//! OpenTelemetry trace export against a real OTLP/gRPC receiver (tests/support/
//! otlp_collector.py, PyPI opentelemetry-proto + grpcio, installed by scripts/otel-tools.sh):
//! spans join the caller's `traceparent`, carry the documented attributes and no descriptor
//! values or identities, have Redis children; a malformed `traceparent` starts a new root; a
//! dead or hanging collector leaves decisions answering and the drops counted; and a real
//! Envoy with tracing configured ends up as the parent of the sidecar's spans.
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

mod support;

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::envoy::Envoy;
use support::{Sidecar, eventually, http_request, request};

/// A running collector, killed on drop; `spans()` is everything received so far.
struct Collector {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    fn start() -> Collector {
        let python = std::env::var("RATETHROTTLE_TEST_OTLP_PYTHON").unwrap_or_else(|_| {
            panic!("RATETHROTTLE_TEST_OTLP_PYTHON is not set: run the tests with `bash scripts/test.sh`, which installs the OTLP receiver")
        });
        let script = std::env::var("RATETHROTTLE_TEST_OTLP_RECEIVER").unwrap_or_else(|_| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/otlp_collector.py"
            )
            .to_string()
        });
        let mut child = Command::new(python)
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the OTLP collector");
        let stdout = child.stdout.take().expect("stdout");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = spans.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(p) = line.strip_prefix("PORT ") {
                    let _ = tx.send(p.parse::<u16>().expect("port"));
                } else if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    s.lock().expect("spans").push(v);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("collector listening");
        Collector { child, port, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().expect("spans").clone()
    }

    fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.spans().into_iter().find(|s| pred(s))
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(Duration::from_secs(10), what, || {
            let found = self.find(&pred).is_some();
            async move { found }
        })
        .await;
        self.find(&pred).expect("found")
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- spans received ---\n{:#?}", self.spans());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

const DOMAINS: &str = r#"
domains:
  - domain: otel
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 2}
"#;

fn config(tracing: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, format!("{tracing}\n{DOMAINS}")).expect("write");
    (dir, file)
}

fn traced<T>(msg: T, traceparent: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    r
}

const SECRET: &str = "alice-7f3a-secret";

fn user(u: &str) -> RateLimitRequest {
    request("otel", &[&[("user", u)]])
}

#[tokio::test]
async fn spans_join_the_callers_trace_with_redis_children_and_no_values() {
    let collector = Collector::start();
    let (_dir, file) = config(&format!(
        "tracing:\n  endpoint: {}\n  flush_interval: 50ms\n  service_name: rt-under-test\n",
        collector.endpoint()
    ));
    let url = support::redis::standalone_url();
    let sc = Sidecar::start(Some(&file), &["--storage", &url]);
    // The shared Redis keeps counters across runs: users unique to this run.
    let run = support::redis::unique_prefix("otel");
    let (secret, bob) = (format!("{SECRET}{run}"), format!("bob{run}"));
    let mut client = sc.client().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    // An unsampled parent is followed: no span for it (checked once the sampled ones arrived).
    let r = client
        .should_rate_limit(traced(
            user(&bob),
            &format!("00-{unsampled}-b7ad6b7169203331-00"),
        ))
        .await
        .expect("answer");
    assert_eq!(r.get_ref().overall_code, Code::Ok as i32);
    let mut codes = Vec::new();
    for _ in 0..3 {
        let r = client
            .should_rate_limit(traced(user(&secret), &format!("00-{trace}-{parent}-01")))
            .await
            .expect("answer");
        codes.push(r.get_ref().overall_code);
    }
    assert_eq!(
        codes,
        [Code::Ok as i32, Code::Ok as i32, Code::OverLimit as i32]
    );

    let over = collector
        .wait_for("the OVER_LIMIT ShouldRateLimit span", |s| {
            s["name"] == "ShouldRateLimit" && attr(s, "ratethrottle.decision") == "OVER_LIMIT"
        })
        .await;
    assert_eq!(over["trace_id"], trace, "{over}");
    assert_eq!(over["parent_span_id"], parent, "{over}");
    assert_eq!(over["kind"], 2, "SPAN_KIND_SERVER: {over}");
    assert_eq!(attr(&over, "ratethrottle.domain"), "otel");
    assert_eq!(attr(&over, "ratethrottle.store"), "redis");
    assert_eq!(attr(&over, "ratethrottle.descriptor_keys"), "user");
    assert_eq!(attr(&over, "rpc.method"), "ShouldRateLimit");
    assert_eq!(over["resource"]["service.name"], "rt-under-test");
    let oks = collector
        .spans()
        .into_iter()
        .filter(|s| s["name"] == "ShouldRateLimit" && attr(s, "ratethrottle.decision") == "OK")
        .count();
    assert_eq!(oks, 2, "{:#?}", collector.spans());

    // Every ShouldRateLimit span has its Redis round trip as a child, in the same trace.
    let children = collector
        .wait_for("a redis.script child span", |s| {
            s["name"] == "redis.script" && s["parent_span_id"] == over["span_id"]
        })
        .await;
    assert_eq!(children["trace_id"], trace);
    assert_eq!(attr(&children, "db.system"), "redis");
    assert_eq!(attr(&children, "ratethrottle.outcome"), "ok");
    assert_eq!(attr(&children, "ratethrottle.ops"), 1);
    assert_eq!(children["kind"], 3, "SPAN_KIND_CLIENT: {children}");

    let all = collector.spans();
    assert!(
        all.iter().all(|s| s["trace_id"] != unsampled),
        "an unsampled parent was traced: {all:#?}"
    );
    let text = serde_json::to_string(&all).expect("json");
    assert!(
        !text.contains(SECRET),
        "a descriptor value was exported: {text}"
    );
    assert!(
        !text.contains(&bob),
        "a descriptor value was exported: {text}"
    );

    let (_, metrics) = sc.get("/metrics").await;
    assert!(
        metrics.contains("ratethrottle_trace_spans_exported_total "),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "ratethrottle_decision_duration_seconds_count{service=\"should_rate_limit\"} 4"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn standard_variables_malformed_traceparents_and_record_values() {
    let collector = Collector::start();
    // No tracing block: the standard variables alone turn export on.
    let (_dir, file) = config("tracing:\n  enabled: false\n  flush_interval: 50ms\n");
    let endpoint = collector.endpoint();
    let sc = Sidecar::start_with_env(
        Some(&file),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        ],
    );
    let mut client = sc.client().await;
    for (i, bad) in [
        "not-a-traceparent",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-zzzzzzzzzzzzzzzz-01",
    ]
    .into_iter()
    .enumerate()
    {
        let r = client
            .should_rate_limit(traced(user(&format!("m{i}")), bad))
            .await
            .unwrap_or_else(|e| panic!("{bad}: {e}"));
        assert_eq!(r.get_ref().overall_code, Code::Ok as i32, "{bad}");
    }
    eventually(Duration::from_secs(10), "three root spans", || {
        let n = collector
            .spans()
            .iter()
            .filter(|s| s["name"] == "ShouldRateLimit")
            .count();
        async move { n >= 3 }
    })
    .await;
    for s in collector.spans() {
        assert_eq!(
            s["parent_span_id"], "",
            "a malformed traceparent is no parent: {s}"
        );
        assert_ne!(s["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{s}");
        assert_eq!(s["resource"]["service.name"], "from-env", "{s}");
        assert_eq!(s["resource"]["deployment.environment"], "test", "{s}");
        assert_eq!(attr(&s, "ratethrottle.store"), "memory");
        assert!(attr(&s, "ratethrottle.descriptor_values").is_null(), "{s}");
    }
    let ids: std::collections::BTreeSet<String> = collector
        .spans()
        .iter()
        .map(|s| s["trace_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 3, "each is a new root");
    drop(sc);

    // `record_values: true` is the one way values reach a span.
    let (_dir2, file) = config(&format!(
        "tracing:\n  endpoint: {endpoint}\n  flush_interval: 50ms\n  sampler: always_on\n  record_values: true\n"
    ));
    let sc = Sidecar::start(Some(&file), &[]);
    let mut client = sc.client().await;
    client
        .should_rate_limit(tonic::Request::new(user(SECRET)))
        .await
        .expect("answer");
    let s = collector
        .wait_for("a span with values", |s| {
            !attr(s, "ratethrottle.descriptor_values").is_null()
        })
        .await;
    assert_eq!(
        attr(&s, "ratethrottle.descriptor_values"),
        &Value::from(format!("user={SECRET}"))
    );

    // An access-log batch is a span too, joined to the stream's traceparent.
    use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
    use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
    use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
    use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
        HttpAccessLogEntries, LogEntries,
    };
    let batch = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![HttpAccessLogEntry::default(), HttpAccessLogEntry::default()],
        })),
    };
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    AccessLogServiceClient::new(sc.channel().await)
        .stream_access_logs(traced(
            tokio_stream::iter(vec![batch]),
            &format!("00-{trace}-00f067aa0ba902b7-01"),
        ))
        .await
        .expect("stream accepted");
    let s = collector
        .wait_for("an AccessLogBatch span", |s| s["name"] == "AccessLogBatch")
        .await;
    assert_eq!(s["trace_id"], trace, "{s}");
    assert_eq!(s["parent_span_id"], "00f067aa0ba902b7", "{s}");
    assert_eq!(attr(&s, "ratethrottle.entries"), 2, "{s}");
}

#[tokio::test]
async fn a_dead_or_hanging_collector_never_fails_decisions() {
    // A closed port, and one that accepts connections and never answers.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_port = closed.local_addr().expect("addr").port();
    drop(closed);
    let hanging = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hanging_port = hanging.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hanging.incoming().map_while(Result::ok) {
            held.push(s);
        }
    });
    for port in [closed_port, hanging_port] {
        let (_dir, file) = config(&format!(
            "tracing:\n  endpoint: http://127.0.0.1:{port}\n  sampler: always_on\n  queue_size: 16\n  batch_size: 8\n  flush_interval: 20ms\n  export_timeout: 300ms\n"
        ));
        let sc = Sidecar::start(Some(&file), &[]);
        let mut answered = 0;
        let mut client = sc.client().await;
        for i in 0..300 {
            let r = client
                .should_rate_limit(user(&format!("u{i}")))
                .await
                .unwrap_or_else(|e| panic!("collector on {port}: decision failed: {e}"));
            if r.get_ref().overall_code == Code::Ok as i32 {
                answered += 1;
            }
        }
        assert_eq!(answered, 300, "every user is under its limit");
        let dropped = |m: &str| -> u64 {
            m.lines()
                .filter(|l| l.starts_with("ratethrottle_trace_spans_dropped_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        eventually(Duration::from_secs(10), "drops counted", || async {
            dropped(&sc.get("/metrics").await.1) > 0
        })
        .await;
        let (_, m) = sc.get("/metrics").await;
        assert!(
            m.contains("ratethrottle_trace_spans_exported_total 0"),
            "collector on {port}: {m}"
        );
    }
}

#[tokio::test]
async fn config_validate_names_bad_tracing_keys() {
    let (_dir, file) = config(
        "tracing:\n  endpoint: collector:4317\n  sample_ratio: 1.5\n  sampler: parentbased_ratio\n",
    );
    let out = Command::new(support::BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "tracing.endpoint",
        "tracing.sample_ratio",
        "tracing.sampler",
    ] {
        assert!(err.contains(key), "{key} missing: {err}");
    }
    // A bad standard variable stops `serve` with its name, like a bad setting.
    let (_dir, file) = config("");
    let out = Command::new(support::BIN)
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(&file)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")
        .env("OTEL_TRACES_SAMPLER_ARG", "1.5")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("OTEL_TRACES_SAMPLER_ARG"), "{err}");
}

const AUTHZ: &str = r#"
authz:
  domain: example
  identity:
    sources: [client_ip]
"#;

#[tokio::test]
async fn a_real_envoy_is_the_parent_of_the_sidecars_spans() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(
        &file,
        format!(
            "tracing:\n  endpoint: {}\n  flush_interval: 50ms\n{AUTHZ}\ndomains:\n  - domain: example\n    descriptors:\n      - key: remote_address\n        rate_limit: {{unit: minute, requests_per_unit: 100}}\n",
            collector.endpoint()
        ),
    )
    .expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let port = collector.port;
    let envoy = Envoy::start("tracing.yaml", &[sc.grpc], |t| {
        // Envoy's exporter flushes every 5 s or 5 spans by default: make it prompt.
        t.replace("port_value: 4317", &format!("port_value: {port}"))
            + "\nlayered_runtime:\n  layers:\n    - name: static\n      static_layer:\n        tracing.opentelemetry.flush_interval_ms: 100\n        tracing.opentelemetry.min_flush_spans: 1\n"
    });
    // Envoy's exporter sends each span on its own and does not retry: a span it sends
    // while its collector connection is still coming up is lost (CI saw the ingress span
    // arrive without the egress span above Check). So the property is checked per trace:
    // requests go on until one trace holds both our span and Envoy's span above it.
    let mut pairs = Vec::new();
    for _ in 0..20 {
        let r = http_request(envoy.listener, "GET", "/api/items", &[], "").await;
        assert_eq!(r.status, 200, "{}", envoy.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let spans = collector.spans();
        pairs = ["Check", "ShouldRateLimit"]
            .into_iter()
            .filter_map(|ours| {
                spans.iter().filter(|s| s["name"] == ours).find_map(|span| {
                    let parent = spans.iter().find(|s| {
                        s["span_id"] == span["parent_span_id"] && s["trace_id"] == span["trace_id"]
                    })?;
                    Some((ours, span.clone(), parent.clone()))
                })
            })
            .collect();
        if pairs.len() == 2 {
            break;
        }
    }
    assert_eq!(pairs.len(), 2, "no trace with both spans after 20 requests");
    for ((ours, span, parent), theirs) in
        pairs.into_iter().zip(["Authorization", "RateLimitService"])
    {
        assert_eq!(parent["resource"]["service.name"], "envoy", "{parent}");
        let name = parent["name"].as_str().expect("name");
        assert!(name.contains(theirs), "{ours}'s parent is {name:?}");
        assert_eq!(span["resource"]["service.name"], "ratethrottle");
    }
    let check = collector.find(|s| s["name"] == "Check").expect("check");
    assert_eq!(attr(&check, "ratethrottle.decision"), "allow");
    assert_eq!(attr(&check, "ratethrottle.domain"), "example");
    // The client address is the identity here: it must not be on the sidecar's spans.
    for s in collector
        .spans()
        .iter()
        .filter(|s| s["resource"]["service.name"] == "ratethrottle")
    {
        assert!(!s["attributes"].to_string().contains("127.0.0.1"), "{s}");
    }
}
