//! Metrics and logs.
//!
//! Owns: the service-level counters, the Prometheus text rendering of every metric (names
//! follow envoyproxy/ratelimit's statsd-to-Prometheus mapping, so existing dashboards keep
//! working), the decision latency histograms, and the tracing subscriber set-up (logs, and
//! OpenTelemetry span export in `otel`).
//!
//! Must not touch: decisions. Counters are plain atomics bumped by their owners; rendering
//! reads them off the hot path.

pub mod anomaly;
pub mod authz;
pub mod otel;
pub mod violations;

use crate::rules::{RuleStats, StatsRegistry};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Process-wide counters of the services and the config loader.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    pub requests: AtomicU64,
    pub over_limit: AtomicU64,
    pub invalid_requests: AtomicU64,
    pub storage_errors: AtomicU64,
    pub config_load_success: AtomicU64,
    pub config_load_error: AtomicU64,
    /// Failed `accept()` calls (out of file descriptors, …) on the gRPC port.
    pub accept_errors_grpc: AtomicU64,
    /// Failed `accept()` calls on the admin port.
    pub accept_errors_admin: AtomicU64,
    /// Recent over-limit and blocked events (sampled, bounded) for `WatchViolations`.
    pub violations: violations::ViolationLog,
    /// How long ShouldRateLimit calls took to decide (the handler, storage included).
    pub latency_should_rate_limit: Histogram,
    /// How long ext_authz Check calls took to decide.
    pub latency_check: Histogram,
}

/// Upper bounds of the latency buckets, in seconds (100 µs to 1 s).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
const BUCKET_NANOS: [u64; 12] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// A fixed-bucket latency histogram: two relaxed atomic adds per observation.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; 13],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BUCKET_NANOS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BUCKET_NANOS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(ns, Relaxed);
    }

    /// Cumulative counts per bucket (the last is the total), and the sum in seconds.
    pub fn snapshot(&self) -> ([u64; 13], f64) {
        let mut out = [0u64; 13];
        let mut acc = 0;
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            acc += b.load(Relaxed);
            *o = acc;
        }
        (out, self.sum_nanos.load(Relaxed) as f64 / 1e9)
    }
}

/// `ratethrottle_decision_duration_seconds` for both services.
fn render_latency(out: &mut String, metrics: &ServiceMetrics) {
    // Written out in full: tests/metrics.rs looks the dashboard's names up in this file.
    let (name, bucket) = (
        "ratethrottle_decision_duration_seconds",
        "ratethrottle_decision_duration_seconds_bucket",
    );
    let _ = writeln!(
        out,
        "# HELP {name} Time to decide a ShouldRateLimit or Check call (storage included).\n# TYPE {name} histogram"
    );
    for (service, h) in [
        ("should_rate_limit", &metrics.latency_should_rate_limit),
        ("check", &metrics.latency_check),
    ] {
        let (counts, sum) = h.snapshot();
        for (le, n) in LATENCY_BUCKETS.iter().zip(&counts) {
            let _ = writeln!(out, "{bucket}{{service=\"{service}\",le=\"{le}\"}} {n}");
        }
        let total = counts[LATENCY_BUCKETS.len()];
        let _ = writeln!(out, "{bucket}{{service=\"{service}\",le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum{{service=\"{service}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{service=\"{service}\"}} {total}");
    }
}

/// The span exporter's counters (all zero while tracing is off).
fn render_trace_export(out: &mut String) {
    let s = &otel::STATS;
    let name = "ratethrottle_trace_spans_exported_total";
    let _ = writeln!(
        out,
        "# HELP {name} Spans sent to the OTLP collector.\n# TYPE {name} counter\n{name} {}",
        s.exported.load(Relaxed)
    );
    let name = "ratethrottle_trace_spans_dropped_total";
    let _ = writeln!(
        out,
        "# HELP {name} Spans dropped: the export queue was full, or their export failed or timed out.\n# TYPE {name} counter"
    );
    for (reason, v) in [
        ("queue_full", &s.dropped_queue_full),
        ("export_failed", &s.dropped_export_failed),
    ] {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {}", v.load(Relaxed));
    }
}

/// Facts the renderer needs that live elsewhere (storage, config).
#[derive(Debug, Default)]
pub struct Gauges {
    pub config_version: String,
    pub domains: usize,
    pub memory_keys: Option<usize>,
    pub memory_capacity: Option<usize>,
    pub memory_evictions: Option<u64>,
    pub redis: Option<RedisGauges>,
}

/// What the Redis store reports.
#[derive(Debug, Default)]
pub struct RedisGauges {
    pub degraded: bool,
    pub errors: u64,
    pub fallbacks: u64,
    pub commands: u64,
    pub batches: u64,
    pub batched: u64,
    pub local_cache_hits: u64,
}

type StatField = fn(&RuleStats) -> &AtomicU64;

/// Renders every metric in the Prometheus text exposition format.
pub fn render(metrics: &ServiceMetrics, stats: &StatsRegistry, gauges: &Gauges) -> String {
    let mut out = String::with_capacity(4096);
    let counters: [(&str, &str, &AtomicU64); 6] = [
        (
            "ratelimit_service_should_rate_limit_total",
            "ShouldRateLimit calls received.",
            &metrics.requests,
        ),
        (
            "ratelimit_service_should_rate_limit_over_limit_total",
            "ShouldRateLimit calls answered OVER_LIMIT.",
            &metrics.over_limit,
        ),
        (
            "ratelimit_service_call_should_rate_limit_invalid_request",
            "ShouldRateLimit calls rejected as INVALID_ARGUMENT.",
            &metrics.invalid_requests,
        ),
        (
            "ratelimit_service_call_should_rate_limit_redis_error",
            "ShouldRateLimit calls that failed in storage.",
            &metrics.storage_errors,
        ),
        (
            "ratelimit_service_config_load_success",
            "Configurations loaded.",
            &metrics.config_load_success,
        ),
        (
            "ratelimit_service_config_load_error",
            "Configuration loads that failed (the last good one stays in force).",
            &metrics.config_load_error,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", v.load(Relaxed));
    }
    let name = "ratethrottle_accept_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Failed accepts by port (out of file descriptors, …); each backs off 50 ms doubling to 1 s.\n# TYPE {name} counter"
    );
    for (port, v) in [
        ("grpc", &metrics.accept_errors_grpc),
        ("admin", &metrics.accept_errors_admin),
    ] {
        let _ = writeln!(out, "{name}{{port=\"{port}\"}} {}", v.load(Relaxed));
    }
    render_latency(&mut out, metrics);
    render_trace_export(&mut out);

    let _ = writeln!(
        out,
        "# HELP ratethrottle_config_info The configuration version in force.\n# TYPE ratethrottle_config_info gauge"
    );
    let _ = writeln!(
        out,
        "ratethrottle_config_info{{version=\"{}\",domains=\"{}\"}} 1",
        escape(&gauges.config_version),
        gauges.domains
    );
    if let (Some(keys), Some(cap), Some(ev)) = (
        gauges.memory_keys,
        gauges.memory_capacity,
        gauges.memory_evictions,
    ) {
        let _ = writeln!(
            out,
            "# HELP ratethrottle_memory_keys Counter states held in memory.\n# TYPE ratethrottle_memory_keys gauge\nratethrottle_memory_keys {keys}"
        );
        let _ = writeln!(
            out,
            "# HELP ratethrottle_memory_capacity_keys Maximum counter states held in memory.\n# TYPE ratethrottle_memory_capacity_keys gauge\nratethrottle_memory_capacity_keys {cap}"
        );
        let _ = writeln!(
            out,
            "# HELP ratethrottle_memory_evictions_total States dropped before expiry because the store was full.\n# TYPE ratethrottle_memory_evictions_total counter\nratethrottle_memory_evictions_total {ev}"
        );
    }

    if let Some(r) = &gauges.redis {
        let rows: [(&str, &str, &str, u64); 7] = [
            (
                "ratethrottle_storage_degraded",
                "gauge",
                "Whether Redis is failing or missing its deadline (1) or not (0).",
                r.degraded as u64,
            ),
            (
                "ratethrottle_redis_errors_total",
                "counter",
                "Redis calls that failed or missed their deadline.",
                r.errors,
            ),
            (
                "ratethrottle_redis_failure_mode_answers_total",
                "counter",
                "Requests answered by the failure mode.",
                r.fallbacks,
            ),
            (
                "ratethrottle_redis_commands_total",
                "counter",
                "Script calls sent to Redis.",
                r.commands,
            ),
            (
                "ratethrottle_redis_batch_calls_total",
                "counter",
                "Script calls that decided several coalesced requests at once.",
                r.batches,
            ),
            (
                "ratethrottle_redis_batched_requests_total",
                "counter",
                "Requests decided in coalesced calls (divide by the calls for the mean batch size).",
                r.batched,
            ),
            (
                "ratelimit_service_rate_limit_over_limit_with_local_cache_total",
                "counter",
                "Counters answered over limit from the local cache.",
                r.local_cache_hits,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }

    let series = stats.snapshot();
    let fields: [(&str, StatField); 5] = [
        ("total_hits", |s| &s.total_hits),
        ("over_limit", |s| &s.over_limit),
        ("near_limit", |s| &s.near_limit),
        ("within_limit", |s| &s.within_limit),
        ("shadow_mode", |s| &s.shadow_mode),
    ];
    for (field, get) in fields {
        let name = format!("ratelimit_service_rate_limit_{field}");
        let _ = writeln!(
            out,
            "# HELP {name} Hits per rule (envoyproxy/ratelimit's {field}).\n# TYPE {name} counter"
        );
        for (id, s) in &series {
            let _ = write!(
                out,
                "{name}{{domain=\"{}\",key=\"{}\"",
                escape(&id.domain),
                escape(&id.key)
            );
            if !id.value.is_empty() {
                let _ = write!(out, ",value=\"{}\"", escape(&id.value));
            }
            let _ = writeln!(out, "}} {}", get(s).load(Relaxed));
        }
    }
    out
}

/// The Kubernetes watcher's series.
pub fn render_kubernetes(out: &mut String, k: &KubernetesStatus) {
    let _ = writeln!(
        out,
        "# HELP ratethrottle_kubernetes_synced Whether the first list of both kinds is in force.\n\
         # TYPE ratethrottle_kubernetes_synced gauge\nratethrottle_kubernetes_synced {}",
        u8::from(k.synced)
    );
    let name = "ratethrottle_kubernetes_resources";
    let _ = writeln!(
        out,
        "# HELP {name} Resources known, by kind and whether they are accepted (in force).\n# TYPE {name} gauge"
    );
    for (accepted, counts) in [("true", &k.accepted), ("false", &k.refused)] {
        for (kind, n) in counts {
            let _ = writeln!(out, "{name}{{kind=\"{kind}\",accepted=\"{accepted}\"}} {n}");
        }
    }
    let name = "ratethrottle_kubernetes_lists_total";
    let _ = writeln!(
        out,
        "# HELP {name} Full lists, by kind: the first, then one per relist (watch expiry, outage).\n# TYPE {name} counter"
    );
    for (kind, n) in &k.lists {
        let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {n}");
    }
    for (name, help, v) in [
        (
            "ratethrottle_kubernetes_watch_errors_total",
            "List/watch failures (retried with backoff; the rules in force stay).",
            k.watch_errors,
        ),
        (
            "ratethrottle_kubernetes_status_writes_total",
            "Status subresource patches made.",
            k.status_writes,
        ),
        (
            "ratethrottle_kubernetes_status_write_errors_total",
            "Status subresource patches that failed (retried).",
            k.status_write_errors,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
}

/// The ext_authz series: checks by outcome, stage results, list sizes.
pub fn render_authz(
    out: &mut String,
    m: &crate::telemetry::authz::AuthzMetrics,
    allow_entries: usize,
    block_entries: usize,
) {
    let name = "ratethrottle_authz_checks_total";
    let _ = writeln!(
        out,
        "# HELP {name} ext_authz Check calls by outcome.\n# TYPE {name} counter"
    );
    for (outcome, v) in m.outcomes() {
        let _ = writeln!(out, "{name}{{outcome=\"{outcome}\"}} {v}");
    }
    let name = "ratethrottle_authz_stage_total";
    let _ = writeln!(
        out,
        "# HELP {name} ext_authz pipeline stage results.\n# TYPE {name} counter"
    );
    for (stage, result, v) in m.stages() {
        let _ = writeln!(out, "{name}{{stage=\"{stage}\",result=\"{result}\"}} {v}");
    }
    let name = "ratethrottle_authz_list_entries";
    let _ = writeln!(
        out,
        "# HELP {name} Allow and block list entries in force (settings file and runtime).\n# TYPE {name} gauge"
    );
    let _ = writeln!(out, "{name}{{list=\"allow\"}} {allow_entries}");
    let _ = writeln!(out, "{name}{{list=\"block\"}} {block_entries}");
    let name = "ratethrottle_authz_jwt_keys_skipped";
    let _ = writeln!(
        out,
        "# HELP {name} JWT keys of the configuration in force that could not be used (unset hs256_secret_env, unparsable key): tokens signed with them are refused.\n# TYPE {name} gauge\n{name} {}",
        m.jwt_keys_skipped()
    );
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Logs to stderr; `RUST_LOG` filters (default `info`), `--log-json` for JSON. With `otel`,
/// the spans of `otel::TARGET` are also exported (and never logged).
pub fn init_tracing(json: bool, otel: Option<otel::Installed>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    type Boxed = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let filter = match format!("{}=off", otel::TARGET).parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let mut layers: Vec<Boxed> = vec![if json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    }];
    if let Some(o) = otel {
        let only_spans = tracing_subscriber::filter::Targets::new()
            .with_target(otel::TARGET, tracing::Level::TRACE);
        layers.push(o.layer.with_filter(only_spans).boxed());
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

/// What the Kubernetes watcher reports (at `/readyz`, `/v1/config` and `/metrics`).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct KubernetesStatus {
    /// False until the first list of both kinds is in force: the replica is not ready, since
    /// the resources' rules are not in force yet.
    pub synced: bool,
    /// The watch's current failure, if it is failing (it retries with backoff).
    pub error: Option<String>,
    /// Resources known, by kind, and whether each is accepted.
    pub accepted: std::collections::BTreeMap<&'static str, u64>,
    pub refused: std::collections::BTreeMap<&'static str, u64>,
    /// Full lists made, by kind (the first one and every relist after a 410 or an outage).
    pub lists: std::collections::BTreeMap<&'static str, u64>,
    pub watch_errors: u64,
    pub status_writes: u64,
    pub status_write_errors: u64,
}
