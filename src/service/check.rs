//! `envoy.service.auth.v3.Authorization` as a tower service that decodes Check's request as
//! `authz::wire::CheckInput` (the fields ext_authz reads, sharing the request's buffer)
//! instead of envoy-types' `CheckRequest`.
//!
//! The generated `AuthorizationServer` fixes the request type, boxes three futures per call
//! (the route, the unary service, `async_trait`) and decodes every field Envoy sends: with
//! Envoy's ten-odd headers that is ~30 allocations and a SipHash map that no stage needs.
//! The route here is the generated one's (same path, same `Unimplemented` for other
//! methods, same compression and message size defaults: tonic's `Grpc` does both) with two
//! boxed futures (the route's and the method's; no `async_trait`).
//!
//! Owns: the Authorization route and its codec (CheckResponse out through prost,
//! `CheckInput::decode` in; a request that is no CheckRequest is INTERNAL here, which
//! `grpc::DecodeErrorsAreInvalidArgument` answers as INVALID_ARGUMENT). Must not touch: decisions
//! (`grpc::AuthorizationGrpc` answers).

use super::grpc::AuthorizationGrpc;
use crate::authz::wire::CheckInput;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use prost::bytes::Buf;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

/// The one method's path.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

/// The Authorization service over [`AuthorizationGrpc`].
#[derive(Debug, Clone)]
pub struct AuthorizationServer {
    inner: Arc<AuthorizationGrpc>,
}

impl AuthorizationServer {
    pub fn new(inner: AuthorizationGrpc) -> Self {
        AuthorizationServer {
            inner: Arc::new(inner),
        }
    }
}

impl NamedService for AuthorizationServer {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

/// Check as tonic's `Grpc::unary` calls it, once the request is decoded.
struct CheckMethod(Arc<AuthorizationGrpc>);

impl UnaryService<CheckInput> for CheckMethod {
    type Response = CheckResponse;
    type Future = BoxFuture<Response<CheckResponse>, Status>;

    fn call(&mut self, request: Request<CheckInput>) -> Self::Future {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { Ok(inner.check(request).await) })
    }
}

impl<B> Service<http::Request<B>> for AuthorizationServer
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(unimplemented()) });
        }
        let method = CheckMethod(Arc::clone(&self.inner));
        Box::pin(async move {
            let mut grpc = Grpc::new(CheckCodec);
            Ok(grpc.unary(method, req).await)
        })
    }
}

/// What tonic answers for a method the service does not have.
fn unimplemented() -> http::Response<Body> {
    let mut response = http::Response::new(Body::default());
    let headers = response.headers_mut();
    headers.insert(
        Status::GRPC_STATUS,
        (tonic::Code::Unimplemented as i32).into(),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    response
}

/// tonic's codec for the Authorization service: CheckResponse out (prost), CheckInput in.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckCodec;

/// Decodes each gRPC message as a [`CheckInput`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckDecoder;

impl tonic::codec::Decoder for CheckDecoder {
    type Item = CheckInput;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<CheckInput>, tonic::Status> {
        // One split of tonic's buffer (no copy); every span points into it.
        let bytes = buf.copy_to_bytes(buf.remaining());
        CheckInput::decode(bytes)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for CheckCodec {
    type Encode = envoy_types::pb::envoy::service::auth::v3::CheckResponse;
    type Decode = CheckInput;
    type Encoder = <crate::proto::Codec<Self::Encode, ()> as tonic::codec::Codec>::Encoder;
    type Decoder = CheckDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        crate::proto::Codec::<Self::Encode, ()>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckDecoder
    }
}
