//! tonic adapters: decode, call the engine, map errors to gRPC codes in one place; time each
//! decision and, when trace export is on and the request sampled, wrap it in a span joined
//! to the caller's `traceparent` (attributes: domain, decision, store, descriptor keys;
//! descriptor values only with `tracing.record_values`, identities never).

use crate::anomaly;
use crate::authz::AuthzEngine;
use crate::authz::wire::CheckInput;
use crate::engine::{RateLimitEngine, RequestError};
use crate::telemetry::otel;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use futures_util::TryFutureExt;
use futures_util::future::{Either, MapOk};
use std::net::IpAddr;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing::field::Empty;

/// `envoy.service.ratelimit.v3.RateLimitService` over the engine.
#[derive(Debug, Clone)]
pub struct RateLimitGrpc {
    engine: RateLimitEngine,
    anomaly: Option<anomaly::Sink>,
}

impl RateLimitGrpc {
    pub fn new(engine: RateLimitEngine) -> Self {
        RateLimitGrpc {
            engine,
            anomaly: None,
        }
    }

    /// Feeds every decided request to the anomaly module through `sink`.
    pub fn with_anomaly(mut self, sink: Option<anomaly::Sink>) -> Self {
        self.anomaly = sink;
        self
    }
}

/// What a `ShouldRateLimit` request tells the anomaly module, read from the descriptor
/// entries Envoy's actions produce: the client address from a `remote_address` entry, the
/// identity from an `identity` entry (ext_authz's `identity` action, or a `request_headers`
/// action with `descriptor_key: identity`), the path from a `path` entry (the domain when
/// there is none) and the method from a `method` entry. A request without a `remote_address`
/// entry tells it nothing and is not pushed. No allocation: labels copy at most 46 bytes.
pub fn rate_limit_event(req: &RateLimitRequest, limited: bool) -> Option<anomaly::Event> {
    let mut ip = None;
    let mut identity = anomaly::Label::EMPTY;
    let mut path = None;
    let mut method = anomaly::Method::Other;
    for e in req.descriptors.iter().flat_map(|d| d.entries.iter()) {
        match e.key.as_str() {
            "remote_address" if ip.is_none() => ip = e.value.parse::<IpAddr>().ok(),
            "identity" if identity.is_empty() => identity = anomaly::Label::new(&e.value),
            "path" if path.is_none() => path = Some(anomaly::Label::new(&e.value)),
            "method" => method = anomaly::Method::parse(&e.value),
            _ => {}
        }
    }
    Some(anomaly::Event {
        at_ms: 0,
        ip: ip?,
        identity,
        path: path.unwrap_or_else(|| anomaly::Label::new(&req.domain)),
        method,
        source: anomaly::Source::RateLimit,
        outcome: anomaly::Outcome::Request {
            limited,
            blocked: false,
        },
        denied_by_us: limited,
    })
}

#[tonic::async_trait]
impl RateLimitService for RateLimitGrpc {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let start = Instant::now();
        let req = request.get_ref();
        let span = otel::server_span("ShouldRateLimit", request.metadata(), || {
            tracing::info_span!(
                target: otel::TARGET,
                "ShouldRateLimit",
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = "envoy.service.ratelimit.v3.RateLimitService",
                rpc.method = "ShouldRateLimit",
                ratethrottle.domain = %req.domain,
                ratethrottle.store = self.engine.storage().kind(),
                ratethrottle.descriptors = req.descriptors.len() as i64,
                ratethrottle.descriptor_keys = Empty,
                ratethrottle.descriptor_values = Empty,
                ratethrottle.decision = Empty,
                otel.status_code = Empty,
            )
        });
        let result = if span.is_none() {
            self.engine.should_rate_limit(req).await
        } else {
            let r = self
                .engine
                .should_rate_limit(req)
                .instrument(span.clone())
                .await;
            record_rate_limit(&span, req, &r);
            r
        };
        self.engine
            .metrics()
            .latency_should_rate_limit
            .observe(start.elapsed());
        if let (Some(sink), Ok(r)) = (&self.anomaly, &result) {
            let limited = r.overall_code == Code::OverLimit as i32;
            if let Some(ev) = rate_limit_event(request.get_ref(), limited) {
                sink.push(ev);
            }
        }
        result.map(Response::new).map_err(to_status)
    }
}

/// The ShouldRateLimit span's outcome attributes.
fn record_rate_limit(
    span: &tracing::Span,
    req: &RateLimitRequest,
    result: &Result<RateLimitResponse, RequestError>,
) {
    let decision = match result {
        Ok(r) if r.overall_code == Code::OverLimit as i32 => "OVER_LIMIT",
        Ok(_) => "OK",
        Err(RequestError::Storage(_)) => "UNAVAILABLE",
        Err(_) => "INVALID_ARGUMENT",
    };
    span.record("ratethrottle.decision", decision);
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    let entries = || req.descriptors.iter().map(|d| d.entries.iter());
    let keys: Vec<String> = entries()
        .map(|e| e.map(|e| e.key.as_str()).collect::<Vec<_>>().join(","))
        .collect();
    span.record("ratethrottle.descriptor_keys", keys.join(";"));
    if otel::record_values() {
        let values: Vec<String> = entries()
            .map(|e| {
                e.map(|e| format!("{}={}", e.key, e.value))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        span.record("ratethrottle.descriptor_values", values.join(";"));
    }
}

/// Bad requests are the caller's to fix (INVALID_ARGUMENT); storage failures are ours and
/// may pass (UNAVAILABLE), which Envoy's `failure_mode_deny` then decides on.
pub fn to_status(e: RequestError) -> Status {
    match e {
        RequestError::Storage(e) => Status::unavailable(e.to_string()),
        e => Status::invalid_argument(e.to_string()),
    }
}

/// `envoy.service.auth.v3.Authorization` over the ext_authz engine. Check always answers
/// with a CheckResponse (denials included); it never fails the RPC.
#[derive(Debug, Clone)]
pub struct AuthorizationGrpc {
    engine: AuthzEngine,
}

impl AuthorizationGrpc {
    pub fn new(engine: AuthzEngine) -> Self {
        AuthorizationGrpc { engine }
    }
}

impl AuthorizationGrpc {
    /// One Check (`check::AuthorizationServer` decodes it).
    pub async fn check(&self, request: Request<CheckInput>) -> Response<CheckResponse> {
        let start = Instant::now();
        let span = otel::server_span("Check", request.metadata(), || {
            tracing::info_span!(
                target: otel::TARGET,
                "Check",
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = "envoy.service.auth.v3.Authorization",
                rpc.method = "Check",
                ratethrottle.domain = %self.engine.domain(),
                ratethrottle.store = self.engine.limits().storage().kind(),
                ratethrottle.decision = Empty,
                ratethrottle.http_status = Empty,
            )
        });
        let resp = if span.is_none() {
            self.engine.check(request.get_ref()).await
        } else {
            let r = self
                .engine
                .check(request.get_ref())
                .instrument(span.clone())
                .await;
            let ok = r.status.as_ref().is_none_or(|s| s.code == 0);
            span.record("ratethrottle.decision", if ok { "allow" } else { "deny" });
            if let Some(envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse::DeniedResponse(d)) = &r.http_response
                && let Some(st) = &d.status
            {
                span.record("ratethrottle.http_status", st.code);
            }
            r
        };
        self.engine
            .limits()
            .metrics()
            .latency_check
            .observe(start.elapsed());
        Response::new(resp)
    }
}

/// Answers INVALID_ARGUMENT, not INTERNAL, when a RateLimitService or Authorization request
/// cannot be decoded (not protobuf, a truncated frame, a bad compression flag).
///
/// tonic's codec reports those as INTERNAL, following the table in gRPC's status code guide;
/// for a rate limit sidecar the difference matters: INTERNAL reads as our bug on dashboards
/// and in alerts, while the fault is the caller's. Our handlers never answer INTERNAL
/// ([`to_status`] maps every error, and `Check` always answers), so on these two services an
/// INTERNAL can only come from tonic's request decoding, before a handler ran; it arrives as
/// a trailers-only response with `grpc-status` in the headers, which is all this rewrites.
/// Other services (health, reflection) are left as tonic answers them.
#[derive(Debug, Clone)]
pub struct DecodeErrorsAreInvalidArgument<S> {
    inner: S,
}

/// The tower layer of [`DecodeErrorsAreInvalidArgument`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeErrorsLayer;

impl DecodeErrorsAreInvalidArgument<()> {
    pub fn layer() -> DecodeErrorsLayer {
        DecodeErrorsLayer
    }
}

impl<S> tower_layer::Layer<S> for DecodeErrorsLayer {
    type Service = DecodeErrorsAreInvalidArgument<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeErrorsAreInvalidArgument { inner }
    }
}

type Remap<B> = fn(http::Response<B>) -> http::Response<B>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for DecodeErrorsAreInvalidArgument<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Either<MapOk<S::Future, Remap<RB>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_ours(req.uri().path()) {
            Either::Left(
                self.inner
                    .call(req)
                    .map_ok(internal_to_invalid_argument as Remap<RB>),
            )
        } else {
            Either::Right(self.inner.call(req))
        }
    }
}

/// Whether `path` (`/package.Service/Method`) is one of the services whose handlers we own.
fn is_ours(path: &str) -> bool {
    let service = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map(|(service, _)| service);
    matches!(service, Some(s) if s == <RateLimitServiceServer<RateLimitGrpc> as NamedService>::NAME
        || s == <super::check::AuthorizationServer as NamedService>::NAME)
}

fn internal_to_invalid_argument<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let internal = tonic::Code::Internal as i32;
    let status = resp.headers().get(Status::GRPC_STATUS);
    if status.is_some_and(|v| v.as_bytes() == internal.to_string().as_bytes()) {
        let code = tonic::Code::InvalidArgument as i32;
        resp.headers_mut()
            .insert(Status::GRPC_STATUS, http::HeaderValue::from(code));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_internal_answers_of_our_services_are_rewritten() {
        assert!(is_ours(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
        ));
        assert!(is_ours("/envoy.service.auth.v3.Authorization/Check"));
        assert!(!is_ours("/grpc.health.v1.Health/Check"));
        assert!(!is_ours("/envoy.service.auth.v3.AuthorizationX/Check"));
        let with = |code: &str| {
            let mut r = http::Response::new(());
            r.headers_mut().insert(
                Status::GRPC_STATUS,
                http::HeaderValue::from_str(code).unwrap(),
            );
            internal_to_invalid_argument(r).headers()[Status::GRPC_STATUS].clone()
        };
        assert_eq!(with("13"), "3");
        assert_eq!(with("14"), "14");
        assert_eq!(with("0"), "0");
    }
}
