//! `/v1/anomaly`: the anomaly module's recent decisions (enforced and dry-run, with their
//! evidence), why a key is or isn't flagged, and unbans. The same bearer-token rule as
//! `/v1/lists`; 404 when no `anomaly:` block is configured.
//!
//! ```text
//! GET    /v1/anomaly/decisions              newest first
//! GET    /v1/anomaly/explain?key=203.0.113.7   (an address, a /24, /64 or /48, an identity)
//! DELETE /v1/anomaly/decisions/{value}      unban: removes the anomaly block entry and
//!                                           suppresses re-detection for a while
//! ```

use super::AdminState;
use super::lists::{authorize, error, reply};
use crate::runtime::anomaly::{Anomaly, Recorded, parse_target};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

fn module(s: &AdminState, headers: &HeaderMap) -> Result<Arc<Anomaly>, Box<Response>> {
    if let Some(r) = authorize(s, headers) {
        return Err(Box::new(r));
    }
    s.anomaly.clone().ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "anomaly detection is off: the settings file has no anomaly block",
        ))
    })
}

fn record_json(r: &Recorded) -> serde_json::Value {
    let d = &r.decision;
    let e = &d.evidence;
    let figures: serde_json::Map<String, serde_json::Value> = e
        .figures
        .iter()
        .map(|(k, v)| ((*k).to_string(), json!(v)))
        .collect();
    json!({
        "scope": d.scope.name(),
        "value": d.value,
        // For people: an identity written by digest shows its first bytes and `…`.
        "label": match d.target {
            crate::anomaly::Target::Identity(l) => l.display(),
            _ => d.value.clone(),
        },
        "action": d.action.name(),
        "reason": d.reason,
        "dry_run": d.dry_run,
        "enforced": r.enforced,
        "note": r.note,
        "ttl_ms": d.ttl_ms,
        "decided_at_ms": d.at_ms,
        "expires_at_ms": r.expires_at_ms,
        "unbanned_at_ms": r.unbanned_at_ms,
        "replica": d.replica,
        "offense": d.offense,
        "evidence": {
            "count": e.count,
            "error_bound": e.error_bound,
            "threshold": e.threshold,
            "window_ms": e.window_ms,
            "figures": figures,
            "sample_paths": e.sample_paths,
            "members": e.members,
            "replicas": e.replicas,
        },
    })
}

pub async fn decisions(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    let m = match module(&s, &headers) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let list: Vec<serde_json::Value> = m.decisions().iter().map(record_json).collect();
    reply(
        StatusCode::OK,
        json!({ "replica": m.replica(), "decisions": list }),
    )
}

#[derive(Deserialize)]
pub struct ExplainQuery {
    key: Option<String>,
}

pub async fn explain(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Response {
    let m = match module(&s, &headers) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let key = q.key.unwrap_or_default();
    let Some(target) = parse_target(&key) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "key {} is not an address, an IPv4 /24, an IPv6 /64 or /48, or an identity",
                crate::lists::shorten(&key)
            ),
        );
    };
    let x = m.explain(&target);
    let trust = m.explain_trust(&target).map(|t| trust_json(&s, &t));
    reply(
        StatusCode::OK,
        json!({
            "trust": trust,
            "scope": x.scope.name(),
            "value": x.value,
            "tracked": x.tracked,
            "sketch_count": x.sketch_count,
            "sketch_error_bound": x.sketch_error_bound,
            "window_count": x.window_count,
            "last_window_count": x.last_window_count,
            "slow_responses": x.slow_responses,
            "slow_failures": x.slow_failures,
            "failing_paths": x.failing_paths,
            "distinct_identities": x.distinct_identities,
            "shared": x.shared,
            "baseline": {
                "mean_ln": x.baseline_mean,
                "std_ln": x.baseline_std,
                "windows": x.baseline_windows,
            },
            "thresholds": {
                "population_p99": x.population_p99,
                "volumetric": x.volumetric_threshold,
                "self_anomaly_z": x.self_anomaly_z,
                "failure_min": x.failure_min,
                "failure_ratio": x.failure_ratio,
                "path_spread_min": x.path_spread_min,
            },
            "offenses": x.offenses,
            "active_until_ms": x.active_until_ms,
            "suppressed_until_ms": x.suppressed_until_ms,
            "allowlisted": x.allowlisted,
        }),
    )
}

/// The caller's trust, its inputs, and what each adaptive limit in force becomes for it.
fn trust_json(s: &AdminState, t: &crate::runtime::anomaly::TrustExplained) -> serde_json::Value {
    let l = &t.local;
    let rules = s.engine.rules().load();
    let limits: Vec<serde_json::Value> = rules
        .all_rules()
        .flat_map(|r| r.limits.iter().map(move |l| (r, l)))
        .filter_map(|(r, l)| {
            let a = l.adaptive?;
            let factor = a.factor(t.in_force);
            Some(json!({
                "rule": &*r.stat_key,
                "name": l.name.as_deref(),
                "requests_per_unit": l.limit.requests_per_unit,
                "factor": factor,
                "effective_requests_per_unit":
                    crate::anomaly::Adaptive::scale(l.limit.requests_per_unit, factor),
            }))
        })
        .collect();
    json!({
        "in_force": t.in_force.map(|q| f64::from(q) / 65535.0),
        "shared_through_redis": t.shared,
        "local": {
            "known": l.known,
            "trust": l.trust,
            "requests": l.requests,
            "bad_requests": l.bad_requests,
            "history": l.history,
            "bad_share": l.bad_share,
            "erratic": l.erratic,
            "baseline_windows": l.baseline_windows,
            "throttled_until_ms": l.throttled_until_ms,
        },
        "adaptive_limits": limits,
    })
}

pub async fn unban(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(value): Path<String>,
) -> Response {
    let m = match module(&s, &headers) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let Some(target) = parse_target(&value) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} is not an address, an IPv4 /24, an IPv6 /64 or /48, or an identity",
                crate::lists::shorten(&value)
            ),
        );
    };
    match m.unban(&target).await {
        Ok(true) => reply(
            StatusCode::OK,
            json!({ "unbanned": target.value(), "suppressed": true }),
        ),
        // Re-detection is suppressed either way; say there was nothing to lift.
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!(
                "no anomaly decision for {} (re-detection is suppressed anyway)",
                target.value()
            ),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
