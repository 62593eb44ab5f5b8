//! The gRPC services Envoy calls, and the decision logic behind them.
//!
//! Owns: `RateLimitEngine` (one `ShouldRateLimit` answer: validate, match, count, report —
//! plain Rust that tests call without gRPC) and the thin tonic adapters in `grpc`.
//!
//! Must not touch: configuration loading, the algorithms' arithmetic, storage internals.

pub mod grpc;
pub mod ratelimit;

pub use ratelimit::{
    Descriptor, OnStorageFailure, RateLimitEngine, RequestError, Verdict, VerdictLimit, Verdicts,
};
