//! Metrics and logs.
//!
//! Owns: the service-level counters, the Prometheus text rendering of every metric (names
//! follow envoyproxy/ratelimit's statsd-to-Prometheus mapping, so existing dashboards keep
//! working) and the tracing subscriber set-up.
//!
//! Must not touch: decisions. Counters are plain atomics bumped by their owners; rendering
//! reads them off the hot path.

pub mod anomaly;
pub mod authz;
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
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Logs to stderr; `RUST_LOG` filters (default `info`), `RATETHROTTLE_LOG_FORMAT=json` for JSON.
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
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
