//! `ratethrottle serve`.

use crate::server::{BoundServer, ConnectionOptions, ServerError, ServerOptions};
use crate::storage::StorageError;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A settings file (`ratethrottle.yaml`), an envoyproxy/ratelimit domain file, or a
    /// directory of them. Watched and hot-reloaded. Without it every request is allowed.
    #[arg(long, env = "RATETHROTTLE_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (rate limit service, health, reflection).
    #[arg(long, env = "RATETHROTTLE_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Admin HTTP listen address (/healthz, /readyz, /metrics, /json, /v1/config).
    #[arg(long, env = "RATETHROTTLE_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// Counter storage: `memory` (default), `redis://[user:pass@]host:port/db`, `rediss://…`
    /// (TLS), `redis-sentinel://host:port,host:port/<service>`, `redis-cluster://host:port,…`.
    #[arg(long, env = "RATETHROTTLE_STORAGE")]
    storage: Option<String>,
    /// Bearer token of the admin list endpoints (`/v1/lists`); without one (here or in
    /// `settings.admin_token`) list management is disabled.
    #[arg(long, env = "RATETHROTTLE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Also take rules from `RateLimitPolicy` and lists from `AccessList` resources,
    /// watched live (in-cluster service account, else KUBECONFIG).
    #[arg(long, env = "RATETHROTTLE_KUBERNETES")]
    kubernetes: bool,
    /// Namespace to watch (default: the pod's own, or the kubeconfig context's).
    #[arg(
        long,
        env = "RATETHROTTLE_NAMESPACE",
        requires = "kubernetes",
        conflicts_with = "all_namespaces"
    )]
    namespace: Option<String>,
    /// Watch every namespace (needs a ClusterRole).
    #[arg(long, env = "RATETHROTTLE_ALL_NAMESPACES", requires = "kubernetes")]
    all_namespaces: bool,
    /// Only resources with these labels (`team=payments,tier!=dev`).
    #[arg(long, env = "RATETHROTTLE_SELECTOR", requires = "kubernetes")]
    selector: Option<String>,
    /// Password for a Redis storage URL that has none (from a Secret, kept out of the URL).
    #[arg(long, env = "RATETHROTTLE_REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    /// How often the config is re-read even without a file event.
    #[arg(long, env = "RATETHROTTLE_RELOAD_INTERVAL_MS", default_value_t = 2000)]
    reload_interval_ms: u64,
    /// Let a reload put in force a configuration without any domain while the one in force
    /// has some (refused by default: an emptied or truncated file must not drop every limit).
    #[arg(long, env = "RATETHROTTLE_ALLOW_EMPTY_CONFIG")]
    allow_empty_config: bool,
    /// A new connection (either port) must send its HTTP/2 preface or HTTP/1 request head
    /// within this or it is closed; also the admin port's HTTP/1 header read / keep-alive
    /// idle timeout.
    #[arg(
        long,
        env = "RATETHROTTLE_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    handshake_timeout_ms: u64,
    /// HTTP/2 PING interval on both ports; a peer that leaves a PING unanswered this long
    /// is disconnected.
    #[arg(
        long,
        env = "RATETHROTTLE_HTTP2_KEEPALIVE_MS",
        default_value_t = 30_000
    )]
    http2_keepalive_ms: u64,
    /// After SIGTERM/SIGINT, requests in flight get this long to finish; then the process
    /// exits whatever is still connected. Keep it under the pod's termination grace period
    /// (Kubernetes default 30 s).
    #[arg(long, env = "RATETHROTTLE_SHUTDOWN_DRAIN_MS", default_value_t = 10_000)]
    shutdown_drain_ms: u64,
    /// Serve gRPC connections on this many single-threaded runtimes, each connection pinned
    /// to one for its life (default: one per core available). 0 serves them on one shared
    /// multi-threaded pool instead, which spreads the streams of a single connection over
    /// every core: better only when one client connection carries all the load.
    /// At most 1024: each is an OS thread with its own runtime.
    #[arg(long, env = "RATETHROTTLE_GRPC_THREADS", value_parser = clap::value_parser!(u16).range(..=1024))]
    grpc_threads: Option<u16>,
    /// Log as JSON lines.
    #[arg(long, env = "RATETHROTTLE_LOG_JSON")]
    log_json: bool,
}

pub fn run(args: ServeArgs) -> ExitCode {
    // Config is parsed and validated before any port is bound.
    let config = match &args.config {
        Some(path) => match crate::config::load(path) {
            Ok(c) => Some(c),
            Err(errors) => {
                for e in errors.iter() {
                    eprintln!("{e}");
                }
                eprintln!("error: {} is not a valid configuration", path.display());
                return ExitCode::from(super::EXIT_CONFIG);
            }
        },
        None => None,
    };
    let settings = config
        .as_ref()
        .map(|c| c.settings.clone())
        .unwrap_or_default();
    let addr = |flag: Option<SocketAddr>, setting: &Option<String>, default: &str, what: &str| {
        match flag {
            Some(a) => Ok(a),
            None => setting
                .as_deref()
                .unwrap_or(default)
                .parse::<SocketAddr>()
                .map_err(|e| format!("settings.{what}: {e}")),
        }
    };
    let (grpc_addr, admin_addr) = match (
        addr(
            args.grpc_addr,
            &settings.grpc_addr,
            "127.0.0.1:8081",
            "grpc_addr",
        ),
        addr(
            args.admin_addr,
            &settings.admin_addr,
            "127.0.0.1:8080",
            "admin_addr",
        ),
    ) {
        (Ok(g), Ok(a)) => (g, a),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    // Trace export: the settings file's `tracing:` block and the standard OTEL_* variables
    // (read here, once: the config module reads no environment).
    let export = match crate::telemetry::otel::resolve(
        config.as_ref().and_then(|c| c.tracing.as_ref()),
        |k| std::env::var(k).ok(),
    ) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let installed = match &export {
        Some(opts) => {
            let _guard = rt.enter();
            match crate::telemetry::otel::install(opts) {
                Ok(i) => Some(i),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(super::EXIT_CONFIG);
                }
            }
        }
        None => None,
    };
    let exporter = installed.as_ref().map(|i| i.exporter.clone());
    crate::telemetry::init_tracing(args.log_json, installed);
    raise_nofile_limit();
    if let Some(o) = &export {
        tracing::info!(
            endpoint = %o.endpoint,
            service_name = %o.service_name,
            sampler = ?o.sampler,
            sample_ratio = o.sample_ratio,
            "exporting trace spans over OTLP/gRPC"
        );
    }
    let kubernetes = args.kubernetes.then(|| crate::k8s::KubernetesOptions {
        scope: match (&args.namespace, args.all_namespaces) {
            (_, true) => crate::k8s::Scope::All,
            (Some(ns), _) => crate::k8s::Scope::Namespace(ns.clone()),
            (None, false) => crate::k8s::Scope::Default,
        },
        selector: args.selector.clone().filter(|s| !s.trim().is_empty()),
    });
    let opts = ServerOptions {
        config_path: args.config,
        config,
        grpc_addr,
        admin_addr,
        reload_interval: Duration::from_millis(args.reload_interval_ms.max(100)),
        allow_empty_config: args.allow_empty_config,
        storage: args.storage,
        redis_password: args.redis_password,
        admin_token: args.admin_token,
        kubernetes,
        connections: ConnectionOptions {
            handshake_timeout: Duration::from_millis(args.handshake_timeout_ms.max(1)),
            http2_keepalive: Duration::from_millis(args.http2_keepalive_ms.max(1)),
            shutdown_drain: Duration::from_millis(args.shutdown_drain_ms),
            grpc_threads: args
                .grpc_threads
                .map_or_else(crate::server::default_grpc_threads, usize::from),
        },
    };
    let result = rt.block_on(async move {
        let mut server = BoundServer::bind(opts).await?;
        if let Some(e) = exporter.clone() {
            server = server.with_trace_export(e);
        }
        let result = server.run(shutdown_signal()).await;
        if let Some(e) = exporter {
            e.flush(Duration::from_secs(1)).await;
        }
        result
    });
    // Tasks still running (connections past the drain bound, background probes) are
    // dropped, not waited for.
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            // A storage URL that cannot work, or no way to reach Kubernetes, is a
            // configuration error, like a bad rule.
            if matches!(
                e,
                ServerError::Storage(StorageError::Config(_))
                    | ServerError::Kubernetes(_)
                    | ServerError::Alerts(_)
                    | ServerError::Secrets(_)
            ) {
                ExitCode::from(super::EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every Envoy connection is a file
/// descriptor, and the usual soft limit of 1024 runs out long before memory or CPU do.
/// Running out is survivable (accepts back off and are counted) but refuses clients.
fn raise_nofile_limit() {
    #[cfg(unix)]
    {
        use rlimit::Resource;
        let before = Resource::NOFILE.get().map(|(soft, _)| soft).ok();
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(now) if before.is_some_and(|b| b < now) => {
                tracing::info!(
                    from = before,
                    to = now,
                    "raised the open file limit (RLIMIT_NOFILE soft → hard)"
                )
            }
            Ok(now) => tracing::debug!(limit = now, "open file limit"),
            Err(e) => {
                tracing::warn!(error = %e, "could not raise the open file limit (RLIMIT_NOFILE)")
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
