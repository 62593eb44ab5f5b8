//! ratethrottle: an Envoy rate limit and external authorization sidecar.
//!
//! Data flows one way: config → rules → limiter → storage, with `service` the thin gRPC face
//! and `admin` the HTTP one. See each module's top comment for what it owns.
#![forbid(unsafe_code)]

pub mod admin;
pub mod anomaly;
pub mod authz;
pub mod cli;
pub mod config;
pub mod digest;
pub mod engine;
pub mod k8s;
pub mod limiter;
pub mod lists;
pub mod rules;
pub mod runtime;
pub mod server;
pub mod service;
pub mod storage;
pub mod telemetry;
