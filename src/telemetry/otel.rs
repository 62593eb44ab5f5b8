//! OpenTelemetry trace export: the request spans of the gRPC face, their sampling, the
//! W3C `traceparent` they join, and a bounded exporter that never slows a decision.
//!
//! Owns: merging the settings file's `tracing:` block with the standard `OTEL_*` variables
//! (given as a lookup function: this module reads no environment), the OTLP/gRPC exporter and
//! its bounded queue, the export counters, and [`server_span`] (the span of one RPC, or a
//! disabled span). Must not touch: decisions, or what a span says about them beyond the
//! attributes its caller records (the callers choose; identities and descriptor values are
//! recorded only with `record_values`).
//!
//! Cost when off: one relaxed atomic load per RPC ([`server_span`] answers `Span::none()`).
//! When on, requests are sampled here, before any span exists: an unsampled request costs a
//! random number (and reading its `traceparent`, if any) and allocates nothing.

use crate::config::otel::{SamplerKind, TracingSettings, check_endpoint};
use crossbeam_queue::ArrayQueue;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, Span as SdkSpan, SpanData, SpanExporter as _, SpanProcessor,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::Notify;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span meant for export. The log output never shows it.
pub const TARGET: &str = "ratethrottle::trace";

/// Export on/off and the root sampling threshold, set once by [`install`].
static ENABLED: AtomicBool = AtomicBool::new(false);
static RECORD_VALUES: AtomicBool = AtomicBool::new(false);
static PARENT_BASED: AtomicBool = AtomicBool::new(true);
/// A request without a (parent-based) decision is sampled when a random u64 is below this.
static ROOT_THRESHOLD: AtomicU64 = AtomicU64::new(0);

/// What the exporter did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full (a slow or dead collector).
    pub dropped_queue_full: AtomicU64,
    /// Spans dropped because their export failed or timed out.
    pub dropped_export_failed: AtomicU64,
}

/// The process's exporter counters (one exporter per process, like the subscriber).
pub static STATS: ExportStats = ExportStats {
    exported: AtomicU64::new(0),
    dropped_queue_full: AtomicU64::new(0),
    dropped_export_failed: AtomicU64::new(0),
};

/// Whether spans are being exported.
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Whether spans may carry descriptor values and identities (`record_values`).
pub fn record_values() -> bool {
    RECORD_VALUES.load(Relaxed)
}

/// Everything the exporter needs, resolved from the settings block and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportOptions {
    pub endpoint: String,
    pub service_name: String,
    pub sampler: SamplerKind,
    pub sample_ratio: f64,
    pub resource_attributes: BTreeMap<String, String>,
    pub queue_size: usize,
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub export_timeout: Duration,
    pub record_values: bool,
}

/// Merges the `tracing:` block with the standard variables `env` answers (the command line
/// passes `std::env::var`). The variables win. Export is on with an enabled block, or with
/// `OTEL_EXPORTER_OTLP_ENDPOINT`/`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set;
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off. A bad value is an
/// error naming its variable.
pub fn resolve(
    settings: Option<&TracingSettings>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<ExportOptions>, String> {
    let var = |k: &str| {
        env(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none")
    {
        return Ok(None);
    }
    let endpoint_var = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|k| var(k).map(|v| (k, v)));
    if settings.is_none() && endpoint_var.is_none() {
        return Ok(None);
    }
    let s = settings.cloned().unwrap_or_default();
    let endpoint = match endpoint_var {
        Some((k, v)) => {
            check_endpoint(&v).map_err(|e| format!("{k}: {e}"))?;
            v
        }
        None => s
            .endpoint
            .clone()
            .unwrap_or_else(|| "http://localhost:4317".to_string()),
    };
    let sampler = match var("OTEL_TRACES_SAMPLER") {
        Some(v) => SamplerKind::parse(&v).ok_or_else(|| {
            format!(
                "OTEL_TRACES_SAMPLER: unknown sampler {v:?} (expected one of {})",
                SamplerKind::NAMES.join(", ")
            )
        })?,
        None => s.sampler,
    };
    let sample_ratio = match var("OTEL_TRACES_SAMPLER_ARG") {
        Some(v) => match v.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            _ => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER_ARG: must be a number from 0 to 1, found {v:?}"
                ));
            }
        },
        None => s.sample_ratio,
    };
    let mut resource_attributes = s.resource_attributes.clone();
    if let Some(v) = var("OTEL_RESOURCE_ATTRIBUTES") {
        for pair in v.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("OTEL_RESOURCE_ATTRIBUTES: {pair:?} is not key=value"))?;
            resource_attributes.insert(unescape(k.trim()), unescape(v.trim()));
        }
    }
    let service_name = var("OTEL_SERVICE_NAME")
        .or(s.service_name.clone())
        .or_else(|| resource_attributes.get("service.name").cloned())
        .unwrap_or_else(|| "ratethrottle".to_string());
    Ok(Some(ExportOptions {
        endpoint,
        service_name,
        sampler,
        sample_ratio,
        resource_attributes,
        queue_size: s.queue_size,
        batch_size: s.batch_size.min(s.queue_size),
        flush_interval: Duration::from_millis(s.flush_interval_ms),
        export_timeout: Duration::from_millis(s.export_timeout_ms),
        record_values: s.record_values,
    }))
}

/// `OTEL_RESOURCE_ATTRIBUTES` values are percent-encoded.
fn unescape(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The `tracing` layer exporting spans, and the handle that flushes it at shutdown.
pub struct Installed {
    pub layer: tracing_opentelemetry::OpenTelemetryLayer<
        tracing_subscriber::Registry,
        opentelemetry_sdk::trace::Tracer,
    >,
    pub exporter: Exporter,
}

/// Builds the exporter (no connection yet: the channel connects lazily) and turns sampling
/// on. Nothing is sent until [`Exporter::run`] runs.
pub fn install(opts: &ExportOptions) -> Result<Installed, String> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(opts.endpoint.clone())
        .with_timeout(opts.export_timeout)
        .build()
        .map_err(|e| format!("OTLP exporter for {}: {e}", opts.endpoint))?;
    let resource = Resource::builder_empty()
        .with_attributes(
            opts.resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_service_name(opts.service_name.clone())
        .build();
    exporter.set_resource(&resource);
    let queue = Arc::new(ArrayQueue::new(opts.queue_size.max(1)));
    let wake = Arc::new(Notify::new());
    let exporter = Exporter {
        queue: queue.clone(),
        inner: Arc::new(exporter),
        batch: opts.batch_size.max(1),
        timeout: opts.export_timeout,
        failing: Arc::new(AtomicBool::new(false)),
        interval: opts.flush_interval,
        wake: wake.clone(),
    };
    let provider = SdkTracerProvider::builder()
        // Sampling is decided in `server_span`, before a span exists; every span made is kept.
        .with_sampler(Sampler::AlwaysOn)
        .with_span_processor(BoundedProcessor {
            queue,
            wake,
            batch: opts.batch_size.max(1),
        })
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("ratethrottle");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_level(false)
        .with_tracked_inactivity(false);
    RECORD_VALUES.store(opts.record_values, Relaxed);
    PARENT_BASED.store(opts.sampler.parent_based(), Relaxed);
    ROOT_THRESHOLD.store(
        threshold(opts.sampler.root_ratio(opts.sample_ratio)),
        Relaxed,
    );
    ENABLED.store(true, Relaxed);
    Ok(Installed { layer, exporter })
}

fn threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else if ratio <= 0.0 {
        0
    } else {
        (ratio * u64::MAX as f64) as u64
    }
}

/// The queue's consumer: sends batches, each bounded by the export timeout.
#[derive(Clone)]
pub struct Exporter {
    queue: Arc<ArrayQueue<SpanData>>,
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    batch: usize,
    timeout: Duration,
    failing: Arc<AtomicBool>,
    /// How often [`Exporter::run`] drains without being woken.
    interval: Duration,
    /// Rung by the span processor when a batch is full.
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl Exporter {
    /// The export loop: drains every `flush_interval`, or sooner when a batch is full. The
    /// server runs it with its other background tasks (a panic there ends the process with
    /// the task's name instead of silently stopping export).
    pub async fn run(self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.wake.notified() => {}
            }
            self.drain().await;
        }
    }

    /// Sends everything queued now. Spans whose export fails or times out are dropped and
    /// counted; the queue keeps bounding memory meanwhile.
    pub async fn drain(&self) {
        while !self.queue.is_empty() {
            let mut batch = Vec::with_capacity(self.batch.min(self.queue.len()));
            while batch.len() < self.batch {
                match self.queue.pop() {
                    Some(s) => batch.push(s),
                    None => break,
                }
            }
            let n = batch.len() as u64;
            let result = tokio::time::timeout(self.timeout, self.inner.export(batch)).await;
            let error = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {:?}", self.timeout)),
            };
            match error {
                None => {
                    STATS.exported.fetch_add(n, Relaxed);
                    if self.failing.swap(false, Relaxed) {
                        tracing::info!("OTLP span export works again");
                    }
                }
                Some(e) => {
                    STATS.dropped_export_failed.fetch_add(n, Relaxed);
                    if !self.failing.swap(true, Relaxed) {
                        tracing::warn!(error = %e, "OTLP span export failed: dropping spans (counted in ratethrottle_trace_spans_dropped_total) until it works again");
                    }
                    // A dead collector: leave the rest for the next tick rather than spin.
                    return;
                }
            }
        }
    }

    /// At shutdown: what is queued gets one last chance, bounded by `within`.
    pub async fn flush(&self, within: Duration) {
        let _ = tokio::time::timeout(within, self.drain()).await;
    }
}

/// Queues ended spans without blocking; a full queue drops (and counts) the span.
#[derive(Debug)]
struct BoundedProcessor {
    queue: Arc<ArrayQueue<SpanData>>,
    wake: Arc<Notify>,
    batch: usize,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, _span: &mut SdkSpan, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.queue.push(span) {
            Ok(()) if self.queue.len() >= self.batch => self.wake.notify_one(),
            Ok(()) => {}
            Err(_) => {
                STATS.dropped_queue_full.fetch_add(1, Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.wake.notify_one();
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Reads `traceparent`/`tracestate` from gRPC metadata.
struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        ["traceparent", "tracestate"]
            .into_iter()
            .filter(|k| self.0.contains_key(*k))
            .collect()
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

#[expect(
    clippy::disallowed_methods,
    reason = "a sampling coin's seed, not a time"
)]
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let id = format!("{:?}", std::thread::current().id());
    xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), t) | 1
}

/// xorshift64*: a sampling coin, not a secret.
fn random() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// Whether a request is sampled, and the remote parent it joins (if its `traceparent` is
/// valid). A malformed `traceparent` is no parent: the request is a new root.
fn sample(metadata: &tonic::metadata::MetadataMap) -> Option<Option<Context>> {
    let parent = metadata
        .contains_key("traceparent")
        .then(|| TraceContextPropagator::new().extract(&Metadata(metadata)));
    let parent = parent.filter(|cx| cx.span().span_context().is_valid());
    let sampled = match &parent {
        Some(cx) if PARENT_BASED.load(Relaxed) => cx.span().span_context().is_sampled(),
        _ => {
            let t = ROOT_THRESHOLD.load(Relaxed);
            t == u64::MAX || random() < t
        }
    };
    sampled.then_some(parent)
}

/// The span of one RPC of the gRPC face (`kind` is its name: `ShouldRateLimit`, `Check`,
/// `StreamAccessLogs`), joined to the caller's trace when its metadata carries a valid
/// `traceparent`. `Span::none()` when export is off or the request is not sampled: recording
/// on it is free, and storage calls under it make no child spans.
pub fn server_span(
    kind: &'static str,
    metadata: &tonic::metadata::MetadataMap,
    make: impl FnOnce() -> tracing::Span,
) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let Some(parent) = sample(metadata) else {
        return tracing::Span::none();
    };
    let span = make();
    if let Some(cx) = parent
        && span.set_parent(cx).is_err()
    {
        tracing::debug!(kind, "could not join the caller's trace");
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn off_without_a_block_or_an_endpoint() {
        assert_eq!(resolve(None, env(&[])), Ok(None));
        assert_eq!(resolve(None, env(&[("OTEL_SERVICE_NAME", "x")])), Ok(None));
        let on = resolve(
            None,
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(on.endpoint, "http://c:4317");
        assert_eq!(on.sampler, SamplerKind::ParentbasedTraceIdRatio);
        let block = TracingSettings::default();
        assert_eq!(
            resolve(Some(&block), env(&[("OTEL_SDK_DISABLED", "true")])),
            Ok(None)
        );
        assert_eq!(
            resolve(Some(&block), env(&[("OTEL_TRACES_EXPORTER", "none")])),
            Ok(None)
        );
    }

    #[test]
    fn variables_win_over_the_block() {
        let block = TracingSettings {
            endpoint: Some("http://file:4317".into()),
            service_name: Some("from-file".into()),
            resource_attributes: [("team".to_string(), "a".to_string())].into(),
            ..Default::default()
        };
        let o = resolve(Some(&block), env(&[])).unwrap().unwrap();
        assert_eq!(o.endpoint, "http://file:4317");
        assert_eq!(o.service_name, "from-file");
        assert_eq!(o.sample_ratio, 0.01);
        let o = resolve(
            Some(&block),
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317"),
                ("OTEL_SERVICE_NAME", "from-env"),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
                ("OTEL_RESOURCE_ATTRIBUTES", "team=b,region=eu%2Dwest"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(o.endpoint, "http://env:4317");
        assert_eq!(o.service_name, "from-env");
        assert_eq!(o.sampler, SamplerKind::TraceIdRatio);
        assert_eq!(o.sample_ratio, 0.5);
        assert_eq!(o.resource_attributes["team"], "b");
        assert_eq!(o.resource_attributes["region"], "eu-west");
    }

    #[test]
    fn bad_variables_name_themselves() {
        let block = TracingSettings::default();
        for (pairs, name) in [
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317")][..],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                &[("OTEL_TRACES_SAMPLER", "sometimes")][..],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                &[("OTEL_TRACES_SAMPLER_ARG", "2")][..],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                &[("OTEL_RESOURCE_ATTRIBUTES", "novalue")][..],
                "OTEL_RESOURCE_ATTRIBUTES",
            ),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = pairs;
            let e = resolve(Some(&block), env(pairs)).unwrap_err();
            assert!(e.starts_with(name), "{e}");
        }
    }

    #[test]
    fn thresholds_and_coin() {
        assert_eq!(threshold(1.0), u64::MAX);
        assert_eq!(threshold(0.0), 0);
        let t = threshold(0.25);
        let hits = (0..100_000).filter(|_| random() < t).count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
    }
}
