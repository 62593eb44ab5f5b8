//! Talking to a running server's admin gRPC API: one connect with a bounded wait and an
//! error that says what to check; the snapshot's JSON and CSV shapes for `stats --export`.

use crate::proto::admin::v1 as pb;
use pb::admin_service_client::AdminServiceClient;
use std::time::Duration;
use tonic::transport::Channel;

/// How long a connect may take before the server counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// `host:port` or a URL → a URL tonic accepts.
pub fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

pub async fn connect(addr: &str) -> Result<AdminServiceClient<Channel>, String> {
    let url = url(addr);
    let endpoint = Channel::from_shared(url.clone())
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint.connect().await.map_err(|e| {
        let cause = causes(&e);
        format!(
            "cannot reach the admin API at {url}: {cause} (is `ratethrottle serve` running \
             there? set --admin-addr)"
        )
    })?;
    Ok(AdminServiceClient::new(channel))
}

/// An error and its causes, `a: b: c` (tonic's own message is only "transport error").
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// A request carrying the admin token when one is given.
pub fn request<T>(msg: T, token: Option<&str>) -> Result<tonic::Request<T>, String> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| "the admin token must be printable ASCII".to_string())?;
        r.metadata_mut().insert("authorization", v);
    }
    Ok(r)
}

/// A gRPC error for humans.
pub fn status(s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::Unauthenticated => {
            format!("{} (pass --token or RATETHROTTLE_ADMIN_TOKEN)", s.message())
        }
        tonic::Code::Unavailable => format!("server unavailable: {}", s.message()),
        c => format!("{c:?}: {}", s.message()),
    }
}

pub fn snapshot_json(s: &pb::StatsSnapshot) -> serde_json::Value {
    let storage = s.storage.clone().unwrap_or_default();
    let queues = s.queues.unwrap_or_default();
    let authz = s.authz.clone().unwrap_or_default();
    serde_json::json!({
        "unix_ms": s.unix_ms,
        "interval_ms": s.interval_ms,
        "config_version": s.config_version,
        "requests_total": s.requests_total,
        "over_limit_total": s.over_limit_total,
        "requests_per_second": s.requests_per_second,
        "over_limit_per_second": s.over_limit_per_second,
        "invalid_requests_total": s.invalid_requests_total,
        "storage_errors_total": s.storage_errors_total,
        "domains": s.domains.iter().map(|d| serde_json::json!({
            "domain": d.domain,
            "hits_per_second": d.hits_per_second,
            "over_limit_per_second": d.over_limit_per_second,
            "hits_total": d.hits_total,
            "over_limit_total": d.over_limit_total,
        })).collect::<Vec<_>>(),
        "top_limited": s.top_limited.iter().map(|d| serde_json::json!({
            "stat_key": d.stat_key,
            "over_limit_per_second": d.over_limit_per_second,
            "over_limit_total": d.over_limit_total,
            "hits_total": d.hits_total,
        })).collect::<Vec<_>>(),
        "blocked_identities": s.blocked_identities.iter().map(|i| serde_json::json!({
            "identity": i.identity, "count": i.count,
        })).collect::<Vec<_>>(),
        "identities_redacted": s.identities_redacted,
        "storage": {
            "kind": storage.kind,
            "degraded": storage.degraded,
            "last_error": storage.last_error,
            "errors_total": storage.errors_total,
            "fallbacks_total": storage.fallbacks_total,
            "commands_total": storage.commands_total,
            "ping_ms": storage.ping_ms,
            "memory_keys": storage.memory_keys,
            "memory_capacity": storage.memory_capacity,
        },
        "queues": {
            "violations_recorded": queues.violations_recorded,
            "violations_sampled_out": queues.violations_sampled_out,
            "violations_dropped": queues.violations_dropped,
            "violations_capacity": queues.violations_capacity,
        },
        "authz": {
            "checks_per_second": authz.checks_per_second,
            "denied_per_second": authz.denied_per_second,
            "outcomes_total": authz.outcomes_total,
        },
    })
}

pub const CSV_HEADER: &str = "unix_ms,interval_ms,config_version,requests_total,over_limit_total,\
requests_per_second,over_limit_per_second,invalid_requests_total,storage_errors_total,\
storage_kind,storage_degraded,storage_ping_ms,violations_recorded,violations_sampled_out,\
violations_dropped,authz_checks_per_second,authz_denied_per_second,top_limited";

/// One CSV row; the top limited descriptors as `key=rate` joined by `;`.
pub fn snapshot_csv(s: &pb::StatsSnapshot) -> String {
    let storage = s.storage.clone().unwrap_or_default();
    let queues = s.queues.unwrap_or_default();
    let authz = s.authz.clone().unwrap_or_default();
    let top: Vec<String> = s
        .top_limited
        .iter()
        .map(|d| format!("{}={:.2}", d.stat_key, d.over_limit_per_second))
        .collect();
    [
        s.unix_ms.to_string(),
        s.interval_ms.to_string(),
        csv_field(&s.config_version),
        s.requests_total.to_string(),
        s.over_limit_total.to_string(),
        format!("{:.3}", s.requests_per_second),
        format!("{:.3}", s.over_limit_per_second),
        s.invalid_requests_total.to_string(),
        s.storage_errors_total.to_string(),
        csv_field(&storage.kind),
        storage.degraded.to_string(),
        format!("{:.3}", storage.ping_ms),
        queues.violations_recorded.to_string(),
        queues.violations_sampled_out.to_string(),
        queues.violations_dropped.to_string(),
        format!("{:.3}", authz.checks_per_second),
        format!("{:.3}", authz.denied_per_second),
        csv_field(&top.join(";")),
    ]
    .join(",")
}

/// RFC 4180 quoting when needed.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_match_the_header_and_quote() {
        let s = pb::StatsSnapshot {
            config_version: "v,1".into(),
            top_limited: vec![pb::DescriptorStats {
                stat_key: "edge.a_b".into(),
                over_limit_per_second: 2.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        let row = snapshot_csv(&s);
        assert!(row.contains("\"v,1\""), "{row}");
        assert!(row.ends_with("edge.a_b=2.00"), "{row}");
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
        assert_eq!(CSV_HEADER.split(',').count(), 18);
    }
}
