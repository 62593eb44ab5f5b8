//! Kuadrant Limitador's Envoy RLS server, rebuilt here from the `limitador` library crate for the
//! side-by-side benchmark rows of scripts/bench.py (`BENCH_ONLY=limitador`). The
//! `limitador-server` binary is not published on crates.io and GitHub is not reachable from the
//! benchmark machine, so this is a port of its request path, not a copy of the binary.
//!
//! Ported from Kuadrant/limitador (https://github.com/Kuadrant/limitador, Apache-2.0,
//! Copyright the Kuadrant authors): behaviour reproduced, not pasted, from limitador-server's
//! sources of the CEL era the `limitador` 0.14.0 crate belongs to (the crate was published from
//! commit 4f9c75aa30df0d4208dcd1f92b7cbb3406e276f5; the server files read were `server.rs` and
//! `prometheus_metrics.rs` at 0194f94ba3e15a8c4a12d97c5da63eafed8b4fcc, `metrics.rs` at
//! 0cf8bd37cb9947f61d53bf80e95b82b83165f77f and the `main.rs` of the same period). One call
//! differs by the crate's API: 0.14.0's `check_rate_limited_and_update` has no
//! `load_counters` argument (the server passes "rate-limit headers enabled" there). The crate
//! is the published one with two `cfg`s widened (prepare.sh), so `redis_storage` builds without
//! RocksDB.
//! - `limitador-server/src/envoy_rls/server.rs` (`MyRateLimiter::should_rate_limit`): an empty
//!   domain answers `UNKNOWN`; the domain is the namespace; each descriptor becomes one map of
//!   its entries, bound as the CEL list `descriptors`; `hits_addend` 0 means 1; one
//!   `check_rate_limited_and_update` call; a storage error is gRPC `UNAVAILABLE`; `OK` /
//!   `OVER_LIMIT` with the `authorized_calls` + `authorized_hits` or `limited_calls` Prometheus
//!   counters (labelled by namespace); no rate-limit headers (upstream's default
//!   `--rate-limit-headers NONE`); a plain `tonic` `Server::builder()` with default settings.
//! - `limitador-server/src/main.rs`: `#[actix_rt::main]`, i.e. one tokio **current-thread**
//!   runtime (I/O + time drivers) driving a `LocalSet`, with the RLS server `tokio::spawn`ed
//!   onto it — the whole gRPC path (and the Redis clients and the `redis_cached` flusher, which
//!   the library spawns) runs on that one thread. Storage: `memory` = `RateLimiterBuilder::new(
//!   cache_size)` with upstream's guessed cache size (70 % of available memory / (size of a
//!   `Counter` + 16)); `redis <url>` = `AsyncRedisStorage::new`; `redis_cached <url>` =
//!   `CachedRedisStorageBuilder` with upstream's CLI defaults (`DEFAULT_BATCH_SIZE`,
//!   `DEFAULT_FLUSHING_PERIOD_SEC` * 1000 ms, `DEFAULT_MAX_CACHED_COUNTERS`,
//!   `DEFAULT_RESPONSE_TIMEOUT_MS`). Limits come from a limits file in upstream's YAML format
//!   (a list of `Limit`s read with `serde_yaml`, applied with `configure_with`). The tracing
//!   subscriber is upstream's default: a fmt layer filtered at ERROR, plus — for the Redis
//!   storages only — the metrics layer that times `datastore` spans inside `should_rate_limit`
//!   spans into the `datastore_latency` histogram (`limitador-server/src/metrics.rs`). That
//!   layer has no level filter, so on the Redis storages every span of every crate (h2's,
//!   hyper's, tower's TRACE spans too) is created and timed, as upstream's code reads; the
//!   one knob that is not upstream's, `LIMITADOR_PORT_SPAN_LEVEL=info|debug|error|...`, caps
//!   it, to measure that cost.
//! - `limitador-server/src/prometheus_metrics.rs`: the global `metrics-exporter-prometheus`
//!   recorder and the counters above.
//!
//! Left out (off the ShouldRateLimit path or idle during the benchmark): the actix-web HTTP API
//! (its own worker threads), the Kuadrant `CheckRateLimit`/`Report` service and gRPC
//! reflection, the limits-file watcher, the OpenTelemetry exporter (off unless
//! `--tracing-endpoint` is set; the per-request trace-context extraction is kept), loading
//! custom metric labels (the empty set is still read per request, as upstream does), disk and
//! distributed storages.
//!
//! Usage: `limitador-bench-server LIMITS_FILE --rls-ip IP --rls-port PORT memory|redis URL|redis_cached URL`;
//! on SIGTERM it prints its Prometheus metrics to stdout and exits (the benchmark's decision count).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use limitador::counter::Counter;
use limitador::limit::{Context, Expression, Limit, Namespace};
use limitador::storage::redis::{
    AsyncRedisStorage, CachedRedisStorageBuilder, DEFAULT_BATCH_SIZE, DEFAULT_FLUSHING_PERIOD_SEC,
    DEFAULT_MAX_CACHED_COUNTERS, DEFAULT_RESPONSE_TIMEOUT_MS,
};
use limitador::storage::{AsyncCounterStorage, AsyncStorage};
use limitador::{AsyncRateLimiter, AsyncRateLimiterBuilder, RateLimiter, RateLimiterBuilder};
use opentelemetry::propagation::Extractor;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Limiter {
    Blocking(RateLimiter),
    Async(AsyncRateLimiter),
}

enum StorageArg {
    Memory,
    Redis(String),
    RedisCached(String),
}

struct Args {
    limits_file: String,
    address: String,
    storage: StorageArg,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = std::env::args().skip(1);
    let (mut limits_file, mut ip, mut port, mut storage) =
        (None, "0.0.0.0".to_owned(), 8081u16, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rls-ip" | "-b" => ip = args.next().ok_or("--rls-ip IP")?,
            "--rls-port" | "-p" => port = args.next().ok_or("--rls-port PORT")?.parse()?,
            "memory" => storage = Some(StorageArg::Memory),
            "redis" => storage = Some(StorageArg::Redis(args.next().ok_or("redis URL")?)),
            "redis_cached" => {
                storage = Some(StorageArg::RedisCached(
                    args.next().ok_or("redis_cached URL")?,
                ))
            }
            other if limits_file.is_none() && !other.starts_with('-') => {
                limits_file = Some(other.to_owned())
            }
            other => return Err(format!("unexpected argument {other:?}").into()),
        }
    }
    Ok(Args {
        limits_file: limits_file.ok_or("LIMITS_FILE is required")?,
        address: format!("{ip}:{port}"),
        // Upstream's default storage (no subcommand, no REDIS_URL) is memory.
        storage: storage.unwrap_or(StorageArg::Memory),
    })
}

/// Upstream's `guess_cache_size`: 70 % of the available memory (sysinfo's `available_memory`,
/// which on Linux is `MemAvailable`) divided by the size of a cached counter.
fn guess_cache_size() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("MemAvailable:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1 << 30, |kb| kb * 1024);
    (available as f64 * 0.7 / (std::mem::size_of::<Counter>() + 16) as f64) as u64
}

async fn limiter(storage: &StorageArg) -> Result<Limiter, BoxError> {
    Ok(match storage {
        StorageArg::Memory => {
            Limiter::Blocking(RateLimiterBuilder::new(guess_cache_size()).build())
        }
        StorageArg::Redis(url) => {
            let counters: Box<dyn AsyncCounterStorage> =
                Box::new(AsyncRedisStorage::new(url).await?);
            Limiter::Async(
                AsyncRateLimiterBuilder::new(AsyncStorage::with_counter_storage(counters)).build(),
            )
        }
        StorageArg::RedisCached(url) => {
            let cached = CachedRedisStorageBuilder::new(url)
                .batch_size(DEFAULT_BATCH_SIZE)
                .flushing_period(Duration::from_millis(DEFAULT_FLUSHING_PERIOD_SEC * 1000))
                .max_cached_counters(DEFAULT_MAX_CACHED_COUNTERS)
                .response_timeout(Duration::from_millis(DEFAULT_RESPONSE_TIMEOUT_MS))
                .build()
                .await?;
            let counters: Box<dyn AsyncCounterStorage> = Box::new(cached);
            Limiter::Async(
                AsyncRateLimiterBuilder::new(AsyncStorage::with_counter_storage(counters)).build(),
            )
        }
    })
}

async fn load_limits(limiter: &Limiter, path: &str) -> Result<(), BoxError> {
    let limits: Vec<Limit> = serde_yaml::from_reader(std::fs::File::open(path)?)?;
    match limiter {
        Limiter::Blocking(l) => l.configure_with(limits).map_err(|e| e.to_string())?,
        Limiter::Async(l) => l.configure_with(limits).await.map_err(|e| e.to_string())?,
    }
    Ok(())
}

/// Upstream's `PrometheusMetrics`; custom labels stay empty (upstream's default: no
/// `--custom-metric-labels` file), and there are no default labels.
struct PrometheusMetrics {
    handle: metrics_exporter_prometheus::PrometheusHandle,
    custom_labels: RwLock<HashMap<String, Expression>>,
}

impl PrometheusMetrics {
    fn install() -> Result<Self, BoxError> {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
        metrics::describe_histogram!(
            "datastore_latency",
            "Latency to the underlying counter datastore"
        );
        metrics::describe_counter!("authorized_calls", "Authorized calls");
        metrics::describe_counter!("limited_calls", "Limited calls");
        metrics::describe_gauge!("limitador_up", "Limitador is running");
        metrics::gauge!("limitador_up").set(1);
        metrics::describe_gauge!(
            "datastore_partitioned",
            "Limitador is partitioned from backing datastore"
        );
        metrics::gauge!("datastore_partitioned").set(0);
        Ok(Self {
            handle,
            custom_labels: RwLock::default(),
        })
    }

    fn labels(&self, namespace: &Namespace, ctx: &Context) -> Vec<(String, String)> {
        // Upstream: the custom labels (none unless `--custom-metric-labels`), then the namespace.
        let mut labels: Vec<(String, String)> = match self.custom_labels.read() {
            Ok(custom) => custom
                .iter()
                .filter_map(|(label, exp)| match exp.eval(ctx) {
                    Ok(Some(value)) => Some((label.to_string(), value)),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::default(),
        };
        labels.push((
            "limitador_namespace".to_string(),
            namespace.as_ref().to_string(),
        ));
        labels
    }

    fn incr_authorized_calls(&self, namespace: &Namespace, ctx: &Context, hits_addend: u64) {
        let labels = self.labels(namespace, ctx);
        metrics::counter!("authorized_calls", &labels).increment(1);
        metrics::counter!("authorized_hits", &labels).increment(hits_addend);
    }

    fn incr_limited_calls(&self, namespace: &Namespace, ctx: &Context) {
        let labels = self.labels(namespace, ctx);
        metrics::counter!("limited_calls", &labels).increment(1);
    }

    fn record_datastore_latency(timings: Timings) {
        metrics::histogram!("datastore_latency")
            .record(Duration::from_nanos(timings.idle + timings.busy).as_secs_f64());
    }
}

struct MyRateLimiter {
    limiter: Arc<Limiter>,
    metrics: Arc<PrometheusMetrics>,
}

#[tonic::async_trait]
impl RateLimitService for MyRateLimiter {
    #[tracing::instrument(skip_all)]
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        tracing::debug!("ShouldRateLimit Request received: {:?}", request);
        let (metadata, _ext, req) = request.into_parts();
        // Upstream joins the caller's trace: the global propagator (a no-op one unless
        // `--tracing-endpoint` installs W3C trace context) reads the request's headers and the
        // handler's span takes the result as its parent.
        let rl_headers = RateLimitRequestHeaders {
            inner: metadata.into_headers(),
        };
        let parent_context = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&rl_headers)
        });
        let _ = tracing::Span::current().set_parent(parent_context);
        if req.domain.is_empty() {
            return Ok(Response::new(response(Code::Unknown)));
        }
        let namespace: Namespace = req.domain.into();

        let mut values: Vec<HashMap<String, String>> = Vec::default();
        for descriptor in &req.descriptors {
            let mut map = HashMap::default();
            for entry in &descriptor.entries {
                map.insert(entry.key.clone(), entry.value.clone());
            }
            values.push(map);
        }
        // `hits_addend` is optional and defaults to 1, but the generated struct's default is 0.
        let hits_addend = if req.hits_addend == 0 {
            1
        } else {
            req.hits_addend
        } as u64;

        let mut ctx = Context::default();
        ctx.list_binding("descriptors".to_string(), values);

        let result = match &*self.limiter {
            Limiter::Blocking(limiter) => {
                limiter.check_rate_limited_and_update(&namespace, &ctx, hits_addend)
            }
            Limiter::Async(limiter) => {
                limiter
                    .check_rate_limited_and_update(&namespace, &ctx, hits_addend)
                    .await
            }
        };
        let result = match result {
            Ok(result) => result,
            Err(e) => {
                // Upstream: UNAVAILABLE (not UNKNOWN, which Envoy lets pass regardless of
                // failure_mode_deny).
                tracing::error!("Error: {:?}", e);
                return Err(Status::unavailable("Service unavailable"));
            }
        };
        let code = if result.limited {
            self.metrics.incr_limited_calls(&namespace, &ctx);
            Code::OverLimit
        } else {
            self.metrics
                .incr_authorized_calls(&namespace, &ctx, hits_addend);
            Code::Ok
        };
        Ok(Response::new(response(code)))
    }
}

struct RateLimitRequestHeaders {
    inner: tonic::codegen::http::HeaderMap,
}

impl Extractor for RateLimitRequestHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        self.inner.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.inner.keys().map(|k| k.as_str()).collect()
    }
}

fn response(code: Code) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: code.into(),
        statuses: vec![],
        request_headers_to_add: vec![],
        // RateLimitHeaders::None (upstream's default): no headers.
        response_headers_to_add: vec![],
        raw_body: vec![],
        dynamic_metadata: None,
        quota: None,
    }
}

// ---- upstream's MetricsLayer (limitador-server/src/metrics.rs), same algorithm ----
// Spans named after an aggregate ("should_rate_limit", "flush_batcher_and_update_counters")
// carry a per-group map of timings; it is cloned into every span opened inside them; spans
// named as a record ("datastore") time their idle + busy time, which is added to the group's
// entry when they close and handed back up to the parent; when the aggregate closes its total
// is recorded (datastore_latency).

#[derive(Debug, Clone, Copy)]
struct Timings {
    idle: u64,
    busy: u64,
    last: Instant,
}

impl Timings {
    fn new() -> Self {
        Self {
            idle: 0,
            busy: 0,
            last: Instant::now(),
        }
    }

    fn add(&mut self, other: Timings) {
        self.idle += other.idle;
        self.busy += other.busy;
        self.last = self.last.max(other.last);
    }
}

#[derive(Debug, Clone)]
struct SpanState {
    group_times: HashMap<String, Timings>,
}

struct MetricsGroup {
    consumer: fn(Timings),
    records: Vec<String>,
}

#[derive(Default)]
struct MetricsLayer {
    groups: HashMap<String, MetricsGroup>,
}

impl MetricsLayer {
    fn gather(mut self, aggregate: &str, consumer: fn(Timings), records: Vec<&str>) -> Self {
        let records = records.iter().map(|r| r.to_string()).collect();
        self.groups
            .entry(aggregate.to_string())
            .or_insert(MetricsGroup { consumer, records });
        self
    }
}

impl<S> Layer<S> for MetricsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        _attrs: &Attributes<'_>,
        id: &Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        let name = span.name();
        if let Some(parent) = span.parent() {
            if let Some(state) = parent.extensions_mut().get_mut::<SpanState>() {
                extensions.insert(state.clone());
            }
        }
        if self.groups.contains_key(name) {
            if let Some(state) = extensions.get_mut::<SpanState>() {
                state
                    .group_times
                    .entry(name.to_string())
                    .or_insert(Timings::new());
            } else {
                extensions.insert(SpanState {
                    group_times: HashMap::from([(name.to_string(), Timings::new())]),
                });
            }
        }
        if let Some(state) = extensions.get_mut::<SpanState>() {
            let is_record = state.group_times.keys().any(|group| {
                self.groups
                    .get(group)
                    .is_some_and(|g| g.records.iter().any(|r| r == name))
            });
            if is_record {
                extensions.insert(Timings::new());
            }
        }
    }

    fn on_enter(&self, id: &Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(t) = extensions.get_mut::<Timings>() {
            let now = Instant::now();
            t.idle += (now - t.last).as_nanos() as u64;
            t.last = now;
        }
    }

    fn on_exit(&self, id: &Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(t) = extensions.get_mut::<Timings>() {
            let now = Instant::now();
            t.busy += (now - t.last).as_nanos() as u64;
            t.last = now;
        }
    }

    fn on_close(&self, id: Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let mut extensions = span.extensions_mut();
        let name = span.name();
        let timing = extensions.get_mut::<Timings>().map(|t| {
            let mut t = *t;
            t.idle += (Instant::now() - t.last).as_nanos() as u64;
            t
        });
        if let Some(state) = extensions.get_mut::<SpanState>() {
            if let Some(timing) = timing {
                let groups: Vec<String> = state.group_times.keys().cloned().collect();
                for group in groups {
                    if self
                        .groups
                        .get(&group)
                        .is_some_and(|g| g.records.iter().any(|r| r == name))
                    {
                        state
                            .group_times
                            .entry(group)
                            .and_modify(|t| t.add(timing))
                            .or_insert(timing);
                    }
                }
            }
            if let Some(parent) = span.parent() {
                parent.extensions_mut().replace(state.clone());
            }
            if let Some(group) = self.groups.get(name) {
                if let Some(total) = state.group_times.get(name) {
                    (group.consumer)(*total);
                }
            }
        }
    }
}

fn configure_tracing_subscriber(storage: &StorageArg) {
    // Upstream: the level of `-v`, else RUST_LOG's, else ERROR; here RUST_LOG's or ERROR.
    let level = tracing_subscriber::EnvFilter::try_from_default_env()
        .ok()
        .and_then(|f| f.max_level_hint())
        .unwrap_or(LevelFilter::ERROR);
    match storage {
        // "If running in memory initialize without metrics"
        StorageArg::Memory => tracing_subscriber::registry().with(fmt_layer(level)).init(),
        _ => {
            let metrics = MetricsLayer::default()
                .gather(
                    "should_rate_limit",
                    PrometheusMetrics::record_datastore_latency,
                    vec!["datastore"],
                )
                .gather(
                    "flush_batcher_and_update_counters",
                    PrometheusMetrics::record_datastore_latency,
                    vec!["datastore"],
                );
            // Upstream's metrics layer has no filter, so with it every span of every crate
            // (h2's, hyper's and tower's TRACE spans included) is created and timed. Not
            // upstream: LIMITADOR_PORT_SPAN_LEVEL=info (or debug, ...) caps that layer, to
            // measure what those spans cost; unset, the layer is upstream's.
            match std::env::var("LIMITADOR_PORT_SPAN_LEVEL")
                .ok()
                .filter(|l| !l.is_empty())
                .and_then(|l| l.parse::<LevelFilter>().ok())
            {
                None => tracing_subscriber::registry()
                    .with(metrics)
                    .with(fmt_layer(level))
                    .init(),
                Some(cap) => tracing_subscriber::registry()
                    .with(metrics.with_filter(cap))
                    .with(fmt_layer(level))
                    .init(),
            }
        }
    }
}

fn fmt_layer<S>(level: LevelFilter) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer().with_filter(level)
}

async fn run_envoy_rls_server(
    address: String,
    limiter: Arc<Limiter>,
    metrics: Arc<PrometheusMetrics>,
) -> Result<(), BoxError> {
    let service = RateLimitServiceServer::new(MyRateLimiter { limiter, metrics });
    Server::builder()
        .add_service(service)
        .serve(address.parse()?)
        .await?;
    Ok(())
}

async fn serve(args: Args) -> Result<(), BoxError> {
    let metrics = Arc::new(PrometheusMetrics::install()?);
    let limiter = Arc::new(limiter(&args.storage).await?);
    load_limits(&limiter, &args.limits_file).await?;
    eprintln!("Envoy RLS server starting on {}", args.address);
    let server = tokio::spawn(run_envoy_rls_server(args.address, limiter, metrics.clone()));
    // Not upstream (which serves /metrics from its actix-web HTTP API): on SIGTERM the Prometheus
    // exposition goes to stdout, so the benchmark counts the decisions the server made.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = server => result??,
        _ = sigterm.recv() => print!("{}", metrics.handle.render()),
    }
    Ok(())
}

fn main() {
    let result = parse_args().and_then(|args| {
        configure_tracing_subscriber(&args.storage);
        // `#[actix_rt::main]`: actix-rt's System runs on a current-thread runtime with the I/O
        // and time drivers, inside a LocalSet.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        tokio::task::LocalSet::new().block_on(&runtime, serve(args))
    });
    if let Err(e) = result {
        eprintln!("Error: {e}");
        std::process::exit(1);
    }
}
