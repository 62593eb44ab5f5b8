//! tonic adapters: decode, call the engine, map errors to gRPC codes in one place.

use super::{RateLimitEngine, RequestError};
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
