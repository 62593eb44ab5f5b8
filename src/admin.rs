//! The admin HTTP server: health, readiness, metrics, the reference's `/json` check endpoint
//! and the effective configuration; and the admin gRPC API (`grpc`) on the same port.
//!
//! Owns: HTTP routing and JSON shapes of the admin API. Must not touch: decisions (it calls
//! the same engine as gRPC) or config loading (it reads the reloader's status).

mod anomaly;
mod grpc;
mod json;
mod lists;

pub use grpc::router as grpc_router;

use crate::authz::AuthzEngine;
use crate::config::FailureMode;
use crate::engine::RateLimitEngine;
use crate::lists::ListKind;
use crate::rules::StatsRegistry;
use crate::runtime::reload::ReloadStatus;
use crate::telemetry::{self, Gauges, RedisGauges, ServiceMetrics};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use parking_lot::RwLock;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// Everything the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub engine: RateLimitEngine,
    pub metrics: Arc<ServiceMetrics>,
    pub stats: Arc<StatsRegistry>,
    pub reload: Arc<RwLock<ReloadStatus>>,
    pub authz: AuthzEngine,
    /// Bearer token of `/v1/lists`; `None` disables list management.
    pub admin_token: Option<Arc<str>>,
    /// The anomaly module, when configured.
    pub anomaly: Option<Arc<crate::runtime::anomaly::Anomaly>>,
    /// Alerts (off without an `alerts:` block): dead sinks in `/readyz`, metrics.
    pub alerts: crate::alerts::Alerts,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "OK\n" }))
        .route("/healthcheck", get(|| async { "OK\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/json", post(json_check))
        .route("/v1/config", get(config))
        .route("/v1/lists", get(lists::all))
        .route("/v1/lists/{list}", get(lists::one).post(lists::add))
        .route("/v1/lists/{list}/{*value}", delete(lists::remove))
        .route("/v1/anomaly/decisions", get(anomaly::decisions))
        .route("/v1/anomaly/decisions/{*value}", delete(anomaly::unban))
        .route("/v1/anomaly/explain", get(anomaly::explain))
        .with_state(state)
}

/// Ready once a configuration is loaded. A degraded Redis is reported in the body; it makes
/// the replica unready only with `failure_mode: deny`, where it can do nothing but reject —
/// with `allow` or `local` it still answers usefully, and pulling every replica out of the
/// Service during a Redis outage would only turn it into an outage of the sidecar. A dead
/// alert sink is a line of the body, never a status: it answers requests as well as before.
async fn readyz(State(s): State<AdminState>) -> Response {
    let (code, body) = readiness(&s);
    let mut body = body;
    body.push_str(&s.alerts.readiness_detail());
    (code, body).into_response()
}

fn readiness(s: &AdminState) -> (StatusCode, String) {
    {
        let st = s.reload.read();
        if !st.loaded {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "no configuration loaded yet\n".into(),
            );
        }
        if let Some(k) = st.kubernetes.as_ref().filter(|k| !k.synced) {
            let why = k.error.as_deref().unwrap_or("listing");
            let body = format!("waiting for the first Kubernetes sync ({why})\n");
            return (StatusCode::SERVICE_UNAVAILABLE, body);
        }
    }
    if let Some(r) = s.engine.storage().redis()
        && r.health().is_degraded()
    {
        let mode = r.settings().failure_mode;
        let reason = r.health().last_error().unwrap_or_default();
        let body = format!(
            "storage degraded ({reason}); answering with failure_mode {}\n",
            mode.as_str()
        );
        let code = if mode == FailureMode::Deny {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        return (code, body);
    }
    (StatusCode::OK, "ready\n".into())
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let rules = s.engine.rules().load();
    let memory = s.engine.storage().memory();
    let gauges = Gauges {
        config_version: rules.version.clone(),
        domains: rules.domain_count(),
        memory_keys: memory.map(|m| m.len()),
        memory_capacity: memory.map(|m| m.capacity()),
        memory_evictions: memory.map(|m| m.evictions()),
        redis: s.engine.storage().redis().map(|r| RedisGauges {
            degraded: r.health().is_degraded(),
            errors: r.health().errors.load(Relaxed),
            fallbacks: r.health().fallbacks.load(Relaxed),
            commands: r.health().commands.load(Relaxed),
            batches: r.health().batches.load(Relaxed),
            batched: r.health().batched.load(Relaxed),
            local_cache_hits: r.cache().map_or(0, |c| c.hits()),
        }),
    };
    let mut text = telemetry::render(&s.metrics, &s.stats, &gauges);
    if let Some(k) = &s.reload.read().kubernetes {
        telemetry::render_kubernetes(&mut text, k);
    }
    let lists = s.authz.lists();
    telemetry::render_authz(
        &mut text,
        s.authz.metrics(),
        lists.entries(ListKind::Allow).len(),
        lists.entries(ListKind::Block).len(),
    );
    if let Some(a) = &s.anomaly {
        a.metrics().render(&mut text, &a.gauges());
    }
    s.alerts.render(&mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn json_check(State(s): State<AdminState>, body: Bytes) -> Response {
    let req = match json::parse_request(&body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad request: {e}\n")).into_response(),
    };
    match s.engine.should_rate_limit(&req).await {
        Ok(resp) => {
            let code = json::http_status(&resp);
            (
                code,
                [(header::CONTENT_TYPE, "application/json")],
                json::render_response(&resp),
            )
                .into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

async fn config(State(s): State<AdminState>) -> Response {
    let status = s.reload.read();
    let body = serde_json::json!({
        "version": status.version,
        "loaded_at_unix": status.loaded_at_unix,
        "source": status.source,
        "last_error": status.last_error,
        "storage": s.engine.storage().kind(),
        "storage_degraded": s.engine.storage().health().is_some_and(|h| h.is_degraded()),
        "kubernetes": status.kubernetes,
        "config": status.config,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
