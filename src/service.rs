//! The gRPC services Envoy calls: thin tonic adapters from the wire types to the engines.
//!
//! Owns: `RateLimitService` and `Authorization` over gRPC (status codes, request logging).
//! Must not touch: decisions (`engine`, `authz`), configuration, storage.

pub mod grpc;
