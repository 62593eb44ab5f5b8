//! tonic adapters: decode, call the engine, map errors to gRPC codes in one place.

use crate::authz::AuthzEngine;
use crate::engine::{RateLimitEngine, RequestError};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

/// `envoy.service.ratelimit.v3.RateLimitService` over the engine.
#[derive(Debug, Clone)]
pub struct RateLimitGrpc {
    engine: RateLimitEngine,
}

impl RateLimitGrpc {
    pub fn new(engine: RateLimitEngine) -> Self {
        RateLimitGrpc { engine }
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitGrpc {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.engine
            .should_rate_limit(request.get_ref())
            .await
            .map(Response::new)
            .map_err(to_status)
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

#[tonic::async_trait]
impl Authorization for AuthorizationGrpc {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.engine.check(request.get_ref()).await))
    }
}
