//! Assembles a running ratethrottle: config → rules → storage → engine → gRPC + admin.
//!
//! Owns: binding (before anything runs, so a taken port fails fast and loud), running every
//! server task together — if one ends, the process ends — and the bounded shutdown drain.
//! Must not touch: decisions.

mod admin_http;
pub mod listen;
mod per_core;

use crate::admin::{self, AdminState};
use crate::alerts::{AlertTask, Alerts};
use crate::authz::AuthzEngine;
use crate::config::Config;
use crate::engine::RateLimitEngine;
use crate::k8s::{KubernetesOptions, Watcher};
use crate::limiter::{Clock, SystemClock};
use crate::rules::{RuleSet, StatsRegistry};
use crate::runtime::adaptive::{RedisTrust, TrustSink};
use crate::runtime::anomaly::Anomaly;
use crate::runtime::blocklist::{Lists, RedisLists};
use crate::runtime::live::LiveConfig;
use crate::runtime::reload::{ReloadStatus, Reloader};
use crate::runtime::replicas::TopKeysExchange;
use crate::service::accesslog::AccessLogGrpc;
use crate::service::check::AuthorizationServer;
use crate::service::grpc::{AuthorizationGrpc, DecodeErrorsAreInvalidArgument, RateLimitGrpc};
use crate::storage::{Storage, StorageError};
use crate::telemetry::ServiceMetrics;
use crate::telemetry::anomaly::AnomalyMetrics;
use crate::telemetry::authz::AuthzMetrics;
use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use listen::{Incoming, Port};
use parking_lot::RwLock;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The reflection descriptors of the gRPC port's services (checked in under `proto/`).
const REFLECTION: &[u8] = crate::proto::ENVOY_DESCRIPTOR_SET;

/// Everything `serve` needs, already validated.
#[derive(Debug)]
pub struct ServerOptions {
    pub config_path: Option<PathBuf>,
    /// The config loaded from `config_path` before binding.
    pub config: Option<Config>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub reload_interval: Duration,
    /// Let a reload remove every domain in force (`--allow-empty-config`).
    pub allow_empty_config: bool,
    /// `memory` or a Redis URL; `None` takes `settings.storage`, then `memory`.
    pub storage: Option<String>,
    /// Password for a Redis URL that has none (kept out of the URL, e.g. from a Secret).
    pub redis_password: Option<String>,
    /// Bearer token of the admin list endpoints; `None` takes `settings.admin_token`.
    pub admin_token: Option<String>,
    /// Also take rules and lists from `RateLimitPolicy`/`AccessList` resources.
    pub kubernetes: Option<KubernetesOptions>,
    /// Timeouts of client connections and of the shutdown drain.
    pub connections: ConnectionOptions,
}

/// How long clients may hold connections, on both ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// A new connection must send its HTTP/2 preface (or HTTP/1 request head) within this,
    /// or it is closed. On the admin port it is also the HTTP/1 header read timeout, which
    /// closes a keep-alive connection idle this long.
    pub handshake_timeout: Duration,
    /// HTTP/2 PING interval; a peer that leaves a PING unanswered this long is dropped.
    pub http2_keepalive: Duration,
    /// After SIGTERM: requests in flight get this long to finish, then the process exits
    /// whatever is still connected.
    pub shutdown_drain: Duration,
    /// gRPC connections are served on this many single-threaded runtimes, each connection on
    /// one for its life (`server::per_core`); 0 serves them on the shared tokio pool. Default:
    /// one per core the process may use (`default_grpc_threads`).
    pub grpc_threads: usize,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            handshake_timeout: Duration::from_secs(10),
            http2_keepalive: Duration::from_secs(30),
            shutdown_drain: Duration::from_secs(10),
            grpc_threads: default_grpc_threads(),
        }
    }
}

/// One serving thread per core this process may run on (its CPU affinity and cgroup quota,
/// rounded up), at least one.
pub fn default_grpc_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("admin server: {0}")]
    Admin(std::io::Error),
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A background task (reload, list polling, the watcher, sweeping, Redis health) ended:
    /// they loop for the life of the process, so this is a bug or a panic, never silence.
    #[error("background task {task} stopped: {reason}")]
    Background { task: &'static str, reason: String },
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::KubernetesError),
    /// An `alerts:` sink whose secret or URL cannot be used (`alerts.sinks[0].url: ...`).
    #[error("{0}")]
    Alerts(String),
    /// A secret the settings name that cannot be resolved
    /// (`authz.identity.sources[0].hs256_secret_env: ...`).
    #[error("{0}")]
    Secrets(String),
}

/// A server whose ports are bound; `run` serves until `shutdown` resolves or a task fails.
#[derive(Debug)]
pub struct BoundServer {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    grpc: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    connections: ConnectionOptions,
    metrics: Arc<ServiceMetrics>,
    engine: RateLimitEngine,
    authz: AuthzEngine,
    admin_state: AdminState,
    reloader: Option<Reloader>,
    reload_interval: Duration,
    watcher: Option<Watcher>,
    sink: Option<crate::anomaly::Sink>,
    anomaly: Option<Arc<Anomaly>>,
    anomaly_metrics: Arc<AnomalyMetrics>,
    identity_header: String,
    alert_task: Option<AlertTask>,
    trace_export: Option<crate::telemetry::otel::Exporter>,
}

/// This host's name (the pod name in Kubernetes), for the anomaly module's replica id.
#[expect(
    clippy::disallowed_methods,
    reason = "assembly reads the environment once"
)]
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into())
}

impl BoundServer {
    pub async fn bind(opts: ServerOptions) -> Result<BoundServer, ServerError> {
        let settings = opts
            .config
            .as_ref()
            .map(|c| c.settings.clone())
            .unwrap_or_default();
        let stats = Arc::new(StatsRegistry::default());
        let metrics = Arc::new(ServiceMetrics::default());
        let rules = Arc::new(ArcSwap::from_pointee(RuleSet::empty(&stats)));
        let status = Arc::new(RwLock::new(ReloadStatus::default()));
        let url = opts
            .storage
            .clone()
            .or_else(|| settings.storage.clone())
            .unwrap_or_else(|| "memory".into());
        let url = match opts.redis_password.as_deref().filter(|p| !p.is_empty()) {
            None => url,
            Some(_) if url == "memory" => {
                return Err(StorageError::Config(
                    "--redis-password needs a Redis storage URL (--storage)".into(),
                )
                .into());
            }
            Some(password) => crate::storage::with_password(&url, password)
                .map_err(|e| StorageError::Config(format!("--redis-password: {e}")))?,
        };
        // Secrets first: one that cannot be resolved fails before anything connects.
        if let Some(a) = opts.config.as_ref().and_then(|c| c.authz.as_ref()) {
            let unset = crate::authz::jwt::unset_env_secrets(a);
            if !unset.is_empty() {
                return Err(ServerError::Secrets(unset.join("\n")));
            }
        }
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let (alerts, alert_task) = match opts.config.as_ref().and_then(|c| c.alerts.as_ref()) {
            Some(a) => {
                #[expect(
                    clippy::disallowed_methods,
                    reason = "assembly reads the environment once"
                )]
                let env = |name: &str| std::env::var(name).ok();
                let (alerts, task) = crate::alerts::build(a, &env, hostname(), clock.clone())
                    .map_err(ServerError::Alerts)?;
                tracing::info!(sinks = a.sinks.len(), "alerts on");
                (alerts, Some(task))
            }
            None => (Alerts::off(), None),
        };
        let storage = Arc::new(Storage::connect(&url, &settings).await?);

        let anomaly_settings = opts
            .config
            .as_ref()
            .and_then(|c| c.anomaly.as_ref())
            .filter(|a| a.enabled);
        // Adaptive limits read callers' trust from this table; the anomaly task fills it.
        let trust_table = Arc::new(
            anomaly_settings.map_or_else(crate::anomaly::TrustTable::default, |a| {
                crate::anomaly::TrustTable::new(a.trust.table_slots)
            }),
        );
        let engine = RateLimitEngine::new(
            rules.clone(),
            storage.clone(),
            clock.clone(),
            stats.clone(),
            metrics.clone(),
        )
        .with_trust(trust_table.clone());
        // Runtime allow/block entries live where the counters do: shared through Redis when
        // the counters are, so every replica sees the same lists.
        let lists = Arc::new(match storage.redis() {
            Some(r) => Lists::redis(
                RedisLists::new(r.pool().clone(), &settings.redis.prefix),
                clock.clone(),
            ),
            None => Lists::memory(clock.clone()),
        });
        // The anomaly module, when the settings file has an `anomaly:` block: a bounded
        // queue the services push to, and the task that owns the detector.
        let anomaly_metrics = Arc::new(AnomalyMetrics::default());
        let (sink, anomaly) = match anomaly_settings {
            Some(a) => {
                let (sink, drain) = crate::anomaly::queue(a.queue_size);
                let mut cfg = a.detector.clone();
                if cfg.replica.is_empty() {
                    cfg.replica = hostname();
                }
                tracing::info!(replica = %cfg.replica, dry_run = cfg.dry_run, warmup_ms = cfg.warmup_ms, "anomaly detection on");
                let trust_sink = match storage.redis() {
                    Some(r) => TrustSink::Redis(RedisTrust::new(
                        r.pool().clone(),
                        &settings.redis.prefix,
                        trust_table.clone(),
                    )),
                    None => TrustSink::Local(trust_table.clone()),
                };
                let exchange = storage
                    .redis()
                    .map(|r| TopKeysExchange::new(r.pool().clone(), &settings.redis.prefix));
                let module = Anomaly::new(
                    cfg,
                    a.trust.clone(),
                    trust_sink,
                    exchange,
                    crate::runtime::anomaly::Wiring {
                        drain,
                        lists: lists.clone(),
                        metrics: anomaly_metrics.clone(),
                        clock: clock.clone(),
                    },
                );
                module.set_alerts(alerts.clone());
                (Some(sink), Some(module))
            }
            None => (None, None),
        };
        let mut authz = AuthzEngine::new(
            engine.clone(),
            lists,
            Arc::new(AuthzMetrics::default()),
            clock.clone(),
        );
        if let Some(s) = &sink {
            authz = authz.with_anomaly(s.clone());
        }
        let identity_header = opts
            .config
            .as_ref()
            .and_then(|c| c.authz.as_ref())
            .map_or_else(
                || crate::config::authz::AuthzConfig::default().identity.header,
                |a| a.identity.header.clone(),
            );
        let hook = authz.clone();
        let mut live = LiveConfig::new(
            rules.clone(),
            stats.clone(),
            metrics.clone(),
            status.clone(),
            clock.clone(),
        )
        .on_install(move |c| hook.install(c));
        if let Some(module) = anomaly.clone() {
            live = live.on_install(move |c| module.reconfigure(c.anomaly.as_ref()));
        }
        let live = Arc::new(live);
        let reloader = match (&opts.config_path, &opts.config) {
            (Some(path), Some(config)) => {
                let r = Reloader::new(path.clone(), live.clone(), metrics.clone(), status.clone())
                    .allow_empty(opts.allow_empty_config)
                    .alerts(alerts.clone());
                r.install(config);
                Some(r)
            }
            _ => {
                // No config file: serve OK-without-limit for everything (plus whatever the
                // resources define), and say the files are ready.
                let mut st = status.write();
                st.loaded = true;
                None
            }
        };
        if anomaly.is_none()
            && rules
                .load()
                .all_rules()
                .any(|r| r.limits.iter().any(|l| l.adaptive.is_some()))
        {
            tracing::warn!(
                "rules have adaptive limits but the settings file has no anomaly block: \
                 every caller keeps its limit's initial_factor"
            );
        }
        let watcher = match opts.kubernetes.clone() {
            Some(k) => Some(
                Watcher::connect(k, live.clone(), authz.lists().clone(), status.clone()).await?,
            ),
            None => None,
        };

        let admin_token = opts
            .admin_token
            .clone()
            .or_else(|| settings.admin_token.clone())
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        let bind = |what, addr| {
            listen::bind(addr, listen::BACKLOG).map_err(|source| ServerError::Bind {
                what,
                addr,
                source,
            })
        };
        let grpc = bind("gRPC", opts.grpc_addr)?;
        let admin = bind("admin HTTP", opts.admin_addr)?;
        let local = |l: &tokio::net::TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| ServerError::Bind { what, addr, source })
        };
        Ok(BoundServer {
            grpc_addr: local(&grpc, "gRPC", opts.grpc_addr)?,
            admin_addr: local(&admin, "admin HTTP", opts.admin_addr)?,
            grpc,
            admin,
            connections: opts.connections,
            metrics: metrics.clone(),
            admin_state: AdminState {
                engine: engine.clone(),
                metrics,
                stats,
                reload: status,
                authz: authz.clone(),
                admin_token,
                anomaly: anomaly.clone(),
                alerts,
            },
            sink,
            anomaly,
            anomaly_metrics,
            identity_header,
            alert_task,
            engine,
            authz,
            reloader,
            reload_interval: opts.reload_interval,
            watcher,
            trace_export: None,
        })
    }

    /// Runs `exporter`'s export loop with the other background tasks.
    pub fn with_trace_export(mut self, exporter: crate::telemetry::otel::Exporter) -> Self {
        self.trace_export = Some(exporter);
        self
    }

    pub fn engine(&self) -> &RateLimitEngine {
        &self.engine
    }

    pub fn authz(&self) -> &AuthzEngine {
        &self.authz
    }

    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<RateLimitServiceServer<RateLimitGrpc>>()
            .await;
        health_reporter.set_serving::<AuthorizationServer>().await;
        health_reporter
            .set_serving::<AccessLogServiceServer<AccessLogGrpc>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(REFLECTION)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let alerts = self.admin_state.alerts.clone();
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let conns = self.connections;
        let incoming = Incoming::new(
            self.grpc,
            Port::Grpc,
            self.metrics.clone(),
            conns.handshake_timeout,
        );
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(conns.http2_keepalive))
            .http2_keepalive_timeout(Some(conns.http2_keepalive))
            .layer(DecodeErrorsAreInvalidArgument::layer())
            .add_service(RateLimitServiceServer::new(
                RateLimitGrpc::new(self.engine.clone()).with_anomaly(self.sink.clone()),
            ))
            .add_service(AccessLogServiceServer::new(AccessLogGrpc::new(
                self.sink.clone(),
                &self.identity_header,
                self.anomaly_metrics.clone(),
            )))
            .add_service(AuthorizationServer::new(AuthorizationGrpc::new(
                self.authz.clone(),
            )))
            .add_service(health_service)
            .add_service(reflection);
        let grpc: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match conns.grpc_threads {
            0 => Box::pin(grpc.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()))),
            threads => Box::pin(per_core::serve(
                incoming,
                threads,
                conns.handshake_timeout,
                stop_rx.clone(),
                move |connections, stop| {
                    grpc.clone()
                        .serve_with_incoming_shutdown(connections, stopped(stop))
                },
            )),
        };
        let admin = admin_http::serve(
            Incoming::new(
                self.admin,
                Port::Admin,
                self.metrics.clone(),
                conns.handshake_timeout,
            ),
            admin::router(self.admin_state.clone()).merge(
                admin::grpc_router(self.admin_state, stop_rx.clone())
                    .map_err(ServerError::Reflection)?,
            ),
            conns,
            stop_rx.clone(),
        );

        let mut grpc = tokio::spawn(grpc);
        let mut admin = tokio::spawn(admin);
        let mut background = Background::default();
        if let Some(r) = self.reloader {
            background.spawn("config reload", r.run(self.reload_interval));
        }
        if let Some(w) = self.watcher {
            background.spawn("kubernetes watcher", w.run());
        }
        background.spawn(
            "counter sweeper",
            sweep(
                self.engine.storage().clone(),
                self.engine.clock().clone(),
                Duration::from_secs(10),
            ),
        );
        background.spawn("list polling", self.authz.lists().clone().run());
        if let Some(a) = self.anomaly.clone() {
            background.spawn("anomaly detector", a.run());
        }
        if let Some(task) = self.alert_task {
            background.spawn("alert sender", task.run());
            background.spawn(
                "alert storage watch",
                crate::alerts::watch::storage(self.engine.storage().clone(), alerts.clone()),
            );
            background.spawn(
                "alert violations watch",
                crate::alerts::watch::violations(self.metrics.clone(), alerts),
            );
        }
        if let Some(e) = self.trace_export {
            background.spawn("trace export", e.run());
        }
        if self.engine.storage().redis().is_some() {
            let storage = self.engine.storage().clone();
            let clock = self.engine.clock().clone();
            background.spawn("redis health", async move {
                if let Some(r) = storage.redis() {
                    tokio::join!(r.watch_health(), r.run_flusher(&*clock));
                }
            });
        }

        tracing::info!(grpc = %self.grpc_addr, admin = %self.admin_addr, "serving");
        // One plain line on stdout: scripts and tests learn the ports bound for `:0`.
        println!(
            "ratethrottle listening grpc={} admin={}",
            self.grpc_addr, self.admin_addr
        );
        let result = tokio::select! {
            _ = shutdown => {
                let drain = conns.shutdown_drain;
                tracing::info!(
                    drain_ms = drain.as_millis() as u64,
                    "shutting down: not accepting; open connections close after their requests in flight"
                );
                let _ = stop_tx.send(true);
                let both = async { ((&mut grpc).await, (&mut admin).await) };
                match tokio::time::timeout(drain, both).await {
                    Ok((g, a)) => flatten_grpc(g).and(a.map_err(ServerError::Task)),
                    Err(_) => {
                        tracing::warn!(
                            drain_ms = drain.as_millis() as u64,
                            "shutdown drain bound reached with connections still open; exiting"
                        );
                        grpc.abort();
                        admin.abort();
                        Ok(())
                    }
                }
            }
            g = &mut grpc => {
                let _ = stop_tx.send(true);
                Err(flatten_grpc(g).err().unwrap_or_else(|| ServerError::Admin(std::io::Error::other("gRPC server stopped"))))
            }
            a = &mut admin => {
                let _ = stop_tx.send(true);
                Err(a.err().map_or_else(|| ServerError::Admin(std::io::Error::other("admin server stopped")), ServerError::Task))
            }
            Some(e) = background.stopped() => {
                tracing::error!("{e}; shutting down");
                let _ = stop_tx.send(true);
                Err(e)
            }
        };
        background.tasks.abort_all();
        result
    }
}

fn flatten_grpc(
    r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match r {
        Ok(r) => r.map_err(ServerError::Grpc),
        Err(e) => Err(ServerError::Admin(std::io::Error::other(e.to_string()))),
    }
}

/// The tasks that run beside the servers for the life of the process, in one place: one that
/// ends (a panic included) is noticed and ends the process with its name, instead of a part
/// of the sidecar silently stopping (lists no longer polled, config no longer reloaded).
#[derive(Default)]
struct Background {
    tasks: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Background {
    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end; `None` when there are none.
    async fn stopped(&mut self) -> Option<ServerError> {
        let (id, reason) = match self.tasks.join_next_with_id().await? {
            Ok((id, ())) => (id, "returned".to_string()),
            Err(e) if e.is_panic() => (e.id(), "panicked".to_string()),
            Err(e) => (e.id(), e.to_string()),
        };
        let task = self.names.get(&id).copied().unwrap_or("unnamed");
        Some(ServerError::Background { task, reason })
    }
}

/// Drops expired counter states so idle keys give their memory back.
async fn sweep(storage: Arc<Storage>, clock: Arc<dyn Clock>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let memory = match &*storage {
            Storage::Memory(m) => Some(m),
            Storage::Redis(r) => Some(r.fallback()),
        };
        if let Some(m) = memory {
            let removed = m.sweep(clock.now());
            tracing::debug!(removed, "swept expired counters");
        }
    }
}

#[cfg(test)]
mod background_tests {
    use super::{Background, ServerError};

    #[tokio::test]
    async fn a_panicking_task_is_named_and_ends_the_wait() {
        let mut b = Background::default();
        b.spawn("forever", std::future::pending());
        b.spawn("list polling", async { panic!("boom") });
        match b.stopped().await {
            Some(ServerError::Background { task, reason }) => {
                assert_eq!(task, "list polling");
                assert_eq!(reason, "panicked");
            }
            other => panic!("{other:?}"),
        }
        b.spawn("reload", async {});
        match b.stopped().await {
            Some(ServerError::Background { task, reason }) => {
                assert_eq!((task, reason.as_str()), ("reload", "returned"));
            }
            other => panic!("{other:?}"),
        }
        assert!(Background::default().stopped().await.is_none());
    }

    /// The sweeper reads time off the server's clock, not the system's: with a manual clock
    /// that has not moved, nothing expires; moved past the window, the counter goes.
    #[tokio::test]
    async fn the_counter_sweeper_expires_on_the_injected_clock() {
        use crate::limiter::{Algorithm, Clock, Limit, ManualClock, RejectedHits, Unit};
        use crate::storage::{MemoryStore, Storage};
        use std::sync::Arc;
        let clock = Arc::new(ManualClock::default());
        let store = Arc::new(Storage::Memory(MemoryStore::new(100)));
        let Storage::Memory(m) = &*store else {
            unreachable!()
        };
        let limit = Limit {
            algorithm: Algorithm::FixedWindow,
            requests_per_unit: 10,
            unit: Unit::Second,
            burst: 1,
            block_duration: 0,
        };
        m.apply(1, &limit, clock.now(), 1, RejectedHits::Free);
        let dyn_clock: Arc<dyn Clock> = clock.clone();
        let every = std::time::Duration::from_millis(10);
        let task = tokio::spawn(super::sweep(store.clone(), dyn_clock, every));
        // Several sweeps on a clock still in the counter's second (the system clock is 15
        // years past it: a sweep reading it would drop the counter).
        tokio::time::sleep(every * 5).await;
        assert_eq!(m.len(), 1, "swept on the system clock");
        clock.advance(std::time::Duration::from_secs(5));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !m.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "not swept after the clock moved"
            );
            tokio::time::sleep(every).await;
        }
        task.abort();
    }
}
