//! The gRPC services Envoy calls: thin tonic adapters from the wire types to the engines.
//!
//! Owns: `RateLimitService` and `Authorization` over gRPC (status codes, request logging),
//! pushing their requests to the anomaly queue, and Envoy's access log service (outcomes for
//! the anomaly module).
//! Must not touch: decisions (`engine`, `authz`), configuration, storage.

pub mod accesslog;
pub mod check;
pub mod grpc;
