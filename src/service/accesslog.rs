//! Envoy's gRPC access log service (`envoy.service.accesslog.v3.AccessLogService`), served
//! on the gRPC port when the anomaly module is on: every HTTP entry becomes one outcome event
//! (status, response flags, duration, client address, path, method, and the identity
//! ext_authz resolved, from the `x-ratethrottle-identity` request header when Envoy logs it
//! through `additional_request_headers_to_log`).
//!
//! Always served (so an Envoy configured for it never sees an unknown service); without an
//! `anomaly:` block the entries are read and dropped.
//!
//! Lossy by design, as the API itself is: an entry it cannot use (no address, no status) is
//! skipped and counted; a stream that breaks ends that stream only; a full queue drops.
//!
//! Traced per batch (one message of the stream), not per stream: a stream lives as long as
//! the Envoy connection. The span says how many entries the batch had and how many became
//! events; never an address, path or identity.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::data::accesslog::v3::{HttpAccessLogEntry, ResponseFlags};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::anomaly;
use crate::telemetry::anomaly::AnomalyMetrics;
use crate::telemetry::otel;

/// The service: entries to events, pushed to the anomaly queue.
#[derive(Debug, Clone)]
pub struct AccessLogGrpc {
    sink: Option<anomaly::Sink>,
    identity_header: Arc<str>,
    counters: Arc<AnomalyMetrics>,
}

impl AccessLogGrpc {
    pub fn new(
        sink: Option<anomaly::Sink>,
        identity_header: &str,
        counters: Arc<AnomalyMetrics>,
    ) -> Self {
        AccessLogGrpc {
            sink,
            identity_header: identity_header.into(),
            counters,
        }
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogGrpc {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let (metadata, _, mut stream) = request.into_parts();
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    let span = otel::server_span("AccessLogBatch", &metadata, || {
                        tracing::info_span!(
                            target: otel::TARGET,
                            "AccessLogBatch",
                            otel.kind = "server",
                            rpc.system = "grpc",
                            rpc.service = "envoy.service.accesslog.v3.AccessLogService",
                            rpc.method = "StreamAccessLogs",
                            ratethrottle.entries = tracing::field::Empty,
                            ratethrottle.events = tracing::field::Empty,
                        )
                    });
                    if let Some(LogEntries::HttpLogs(logs)) = &msg.log_entries {
                        span.record("ratethrottle.entries", logs.log_entry.len() as i64);
                    }
                    let Some(sink) = &self.sink else {
                        continue;
                    };
                    let mut events = 0i64;
                    if let Some(LogEntries::HttpLogs(logs)) = msg.log_entries {
                        for e in &logs.log_entry {
                            match entry_event(e, &self.identity_header) {
                                Some(ev) => {
                                    events += 1;
                                    self.counters.log_entries.fetch_add(1, Relaxed);
                                    sink.push(ev);
                                }
                                None => {
                                    self.counters.log_skipped.fetch_add(1, Relaxed);
                                }
                            }
                        }
                    }
                    span.record("ratethrottle.events", events);
                }
                Ok(None) => return Ok(Response::new(StreamAccessLogsResponse {})),
                Err(status) => {
                    self.counters.log_stream_errors.fetch_add(1, Relaxed);
                    tracing::debug!(%status, "access log stream ended with an error");
                    return Err(status);
                }
            }
        }
    }
}

/// One HTTP entry as an outcome event; `None` without a client address or a status.
pub fn entry_event(e: &HttpAccessLogEntry, identity_header: &str) -> Option<anomaly::Event> {
    let common = e.common_properties.as_ref()?;
    let ip = socket_ip(common.downstream_remote_address.as_ref()?)?;
    let status = e.response.as_ref()?.response_code.as_ref()?.value;
    let status = u16::try_from(status)
        .ok()
        .filter(|s| (100..600).contains(s))?;
    let request = e.request.as_ref();
    let path = request.map_or("", |r| r.path.as_str());
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let method = request.map_or(anomaly::Method::Other, |r| method(r.request_method));
    let identity = request
        .and_then(|r| r.request_headers.get(identity_header))
        .map_or(anomaly::Label::EMPTY, |v| identity_label(v));
    let duration_ms = common
        .time_to_last_downstream_tx_byte
        .as_ref()
        .map_or(0, |d| {
            let ms = d.seconds.max(0).saturating_mul(1000) + i64::from(d.nanos.max(0) / 1_000_000);
            u32::try_from(ms).unwrap_or(u32::MAX)
        });
    let flags = common.response_flags.as_ref();
    // Our own ext_authz denial (UAEX) or rate limit (RL): never evidence.
    let denied_by_us = flags.is_some_and(|f| f.unauthorized_details.is_some() || f.rate_limited);
    Some(anomaly::Event {
        at_ms: 0,
        ip,
        identity,
        path: anomaly::Label::new(path),
        method,
        source: anomaly::Source::AccessLog,
        outcome: anomaly::Outcome::Response {
            status,
            response_flags: flags.map_or(0, flag_bits),
            duration_ms,
        },
        denied_by_us,
    })
}

/// ext_authz's identity as its header carries it; an address-derived identity
/// (`<name>:<ip>`) or `anonymous` is no identity (the address is judged on its own).
fn identity_label(v: &str) -> anomaly::Label {
    let v = v.trim();
    let derived = v == "anonymous"
        || v.rsplit_once(':')
            .is_some_and(|(_, a)| a.parse::<IpAddr>().is_ok())
        || v.split_once(':')
            .is_some_and(|(_, a)| a.parse::<IpAddr>().is_ok());
    if derived || v.is_empty() {
        anomaly::Label::EMPTY
    } else {
        anomaly::Label::new(v)
    }
}

fn socket_ip(a: &envoy_types::pb::envoy::config::core::v3::Address) -> Option<IpAddr> {
    match a.address.as_ref()? {
        Address::SocketAddress(s) => s.address.parse().ok(),
        _ => None,
    }
}

/// `envoy.config.core.v3.RequestMethod`.
fn method(m: i32) -> anomaly::Method {
    match m {
        1 => anomaly::Method::Get,
        2 => anomaly::Method::Head,
        3 => anomaly::Method::Post,
        4 => anomaly::Method::Put,
        5 => anomaly::Method::Delete,
        7 => anomaly::Method::Options,
        9 => anomaly::Method::Patch,
        _ => anomaly::Method::Other,
    }
}

/// Envoy's response flags as bits, in the order of the `ResponseFlags` message.
fn flag_bits(f: &ResponseFlags) -> u32 {
    let bits = [
        f.failed_local_healthcheck,
        f.no_healthy_upstream,
        f.upstream_request_timeout,
        f.local_reset,
        f.upstream_remote_reset,
        f.upstream_connection_failure,
        f.upstream_connection_termination,
        f.upstream_overflow,
        f.no_route_found,
        f.delay_injected,
        f.fault_injected,
        f.rate_limited,
        f.unauthorized_details.is_some(),
        f.rate_limit_service_error,
        f.downstream_connection_termination,
        f.upstream_retry_limit_exceeded,
        f.stream_idle_timeout,
        f.invalid_envoy_request_headers,
        f.downstream_protocol_error,
        f.upstream_max_stream_duration_reached,
        f.response_from_cache_filter,
        f.no_filter_config_found,
        f.duration_timeout,
        f.upstream_protocol_error,
        f.no_cluster_found,
        f.overload_manager,
        f.dns_resolution_failure,
        f.downstream_remote_reset,
    ];
    bits.iter()
        .enumerate()
        .fold(0, |acc, (i, b)| acc | (u32::from(*b) << i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Address as PbAddress, SocketAddress};
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties, response_flags,
    };
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn entry(ip: &str, status: Option<u32>, identity: Option<&str>) -> HttpAccessLogEntry {
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                downstream_remote_address: Some(PbAddress {
                    address: Some(Address::SocketAddress(SocketAddress {
                        address: ip.into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                request_method: 3,
                path: "/login?x=1".into(),
                request_headers: identity
                    .map(|i| [("x-ratethrottle-identity".to_string(), i.to_string())].into())
                    .unwrap_or_default(),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: status.map(|value| UInt32Value { value }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn entries_become_outcome_events() {
        let ev = entry_event(
            &entry("203.0.113.7", Some(401), Some("user:alice")),
            "x-ratethrottle-identity",
        )
        .unwrap();
        assert_eq!(ev.ip, "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(ev.identity.prefix(), "user:alice");
        assert_eq!(ev.path.prefix(), "/login");
        assert_eq!(ev.method, anomaly::Method::Post);
        assert!(ev.is_failure());
        assert!(!ev.denied_by_us);
        assert_eq!(ev.source, anomaly::Source::AccessLog);
        // address-derived identities are no identity
        let ev = entry_event(
            &entry("2001:db8::1", Some(200), Some("ip:2001:db8::1")),
            "x-ratethrottle-identity",
        )
        .unwrap();
        assert!(ev.identity.is_empty());
    }

    #[test]
    fn our_own_denials_are_marked_and_garbage_is_skipped() {
        let mut e = entry("10.0.0.1", Some(403), None);
        if let Some(c) = e.common_properties.as_mut() {
            c.response_flags = Some(ResponseFlags {
                unauthorized_details: Some(response_flags::Unauthorized::default()),
                ..Default::default()
            });
        }
        let ev = entry_event(&e, "x-ratethrottle-identity").unwrap();
        assert!(ev.denied_by_us);
        assert!(matches!(
            ev.outcome,
            anomaly::Outcome::Response { response_flags, .. } if response_flags == 1 << 12
        ));
        assert!(entry_event(&entry("not an ip", Some(200), None), "h").is_none());
        assert!(entry_event(&entry("10.0.0.1", None, None), "h").is_none());
        assert!(entry_event(&entry("10.0.0.1", Some(70_000), None), "h").is_none());
        assert!(entry_event(&HttpAccessLogEntry::default(), "h").is_none());
    }
}
